"""FLUX.1 Kontext dev: reference images, VAE-encoded, packed like the latents and appended after
the image tokens with their own position ids; the velocity of those tokens is dropped (BFL
`prepare_kontext`, diffusers' FluxKontextPipeline, ComfyUI's ReferenceLatent)."""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from PIL import Image

from ..pixels import Picture, unit_pixels
from .base import Conditioning, Family, Inputs, packed

# the resolutions Kontext was trained at, (width, height): ComfyUI's FluxKontextImageScale and
# diffusers' FluxKontextPipeline (PREFERRED_KONTEXT_RESOLUTIONS) share this list
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip
REFERENCE_SCALES = ("kontext", "none")


def reference_size(width: int, height: int, scale: str) -> tuple[int, int]:
    """The size a reference of width x height is encoded at: `kontext`, the preferred
    resolution of the nearest aspect ratio (ties: the smaller width, as both references
    take the minimum of (distance, w, h)); `none`, its own size floored to multiples of 16
    (diffusers' `image_width // multiple_of * multiple_of`)."""
    if scale == "kontext":
        aspect = width / height
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
        return w, h
    return max(16, width // 16 * 16), max(16, height // 16 * 16)


def scale_reference(image: Image.Image, scale: str) -> Image.Image:
    """A reference image as it is VAE-encoded.

    kontext: ComfyUI's FluxKontextImageScale, `common_upscale(..., "lanczos", "center")`: crop
    the centre to the target's aspect (offsets rounded as ComfyUI rounds them), then Lanczos.
    none: Lanczos to the floored size, as diffusers' image processor resizes (no crop)."""
    w, h = reference_size(image.width, image.height, scale)
    if scale == "kontext":
        old, new = image.width / image.height, w / h
        x = y = 0
        if old > new:
            x = round((image.width - image.width * (new / old)) / 2)
        elif old < new:
            y = round((image.height - image.height * (old / new)) / 2)
        if x or y:
            image = image.crop((x, y, image.width - x, image.height - y))
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    return image


def reference_ids(latent_sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Position ids [(h/2)(w/2), 3] for each reference latent of h x w (latent pixels).

    One reference gets [1, row, col] (BFL `prepare_kontext`, diffusers' FluxKontextPipeline).
    Several follow ComfyUI's default for FLUX.1 (`ref_latents_method` "offset",
    comfy/ldm/flux/model.py): all at index 1, each placed beside the ones before it (to the
    right when that keeps the grid squarer, else below), offsets in latent pixels rounded to
    patches as ComfyUI's `process_img` does, so no two references share a position."""
    out, h_total, w_total = [], 0, 0
    for h, w in latent_sizes:
        h_off = w_off = 0
        if h + h_total > w + w_total:
            w_off = w_total
        else:
            h_off = h_total
        h_total, w_total = max(h_total, h + h_off), max(w_total, w + w_off)
        rows, cols = (h + 1) // 2, (w + 1) // 2
        ids = np.zeros((rows, cols, 3), np.int32)
        ids[..., 0] = 1
        ids[..., 1] = np.arange(rows)[:, None] + (h_off + 1) // 2
        ids[..., 2] = np.arange(cols)[None, :] + (w_off + 1) // 2
        out.append(ids.reshape(rows * cols, 3))
    return out


def reference_tokens(latents: list[mx.array]) -> Conditioning:
    """Kontext's conditioning from reference latents [1, 16, h, w] (Flux latent format)."""
    if not latents:
        return Conditioning()
    ids = reference_ids([(z.shape[2], z.shape[3]) for z in latents])
    tokens = mx.concatenate([packed(z) for z in latents], axis=1)
    return Conditioning(tokens=tokens, ids=np.concatenate(ids, axis=0))


@dataclass
class References(Inputs):
    pictures: list[Picture] = field(default_factory=list)
    scale: str = "kontext"

    def sizes(self) -> list[tuple[int, int]]:
        return [reference_size(*p.image.size, self.scale) for p in self.pictures]

    @property
    def extra_tokens(self) -> int:
        return sum((w // 16) * (h // 16) for w, h in self.sizes())

    @property
    def encodes(self) -> bool:
        return bool(self.pictures)

    def default_size(self):
        return self.sizes()[0] if self.pictures else None

    def encode(self, encode, width: int, height: int) -> Conditioning:
        latents = [mx.array(encode(unit_pixels(scale_reference(p.image, self.scale))))
                   for p in self.pictures]  # fmt: skip
        return reference_tokens(latents)

    def record(self) -> dict:
        if not self.pictures:
            return {}
        refs = [{**p.record(), "size": list(size)}
                for p, size in zip(self.pictures, self.sizes(), strict=True)]  # fmt: skip
        return {"reference_images": refs, "reference_scale": self.scale}


class Kontext(Family):
    name = "kontext"
    inputs = ("reference_images",)
    needs = (
        "takes no reference images; they need a FLUX.1 Kontext model (convert one with "
        "`mlxflux convert --variant kontext`)"
    )

    def open(self, variant, request, init) -> References:
        return References(list(request.reference_images), request.reference_scale)

    def parameters(self, s: dict) -> str:
        return "".join(f", Reference image: {r['file']} (sha256 {r['sha256'][:16]})"
                       for r in s.get("reference_images", []))  # fmt: skip

    def graph_text(self, g, s: dict, positive: list, vae: str) -> list:
        for ref in s.get("reference_images") or []:  # chained ReferenceLatent nodes
            image = [g.add("LoadImage", image=ref["file"], upload="image"), 0]
            if s.get("reference_scale", "kontext") == "kontext":
                image = [g.add("FluxKontextImageScale", image=image), 0]
            latent = g.add("VAEEncode", pixels=image, vae=[vae, 0])
            positive = [g.add("ReferenceLatent", conditioning=positive, latent=[latent, 0]), 0]
        return positive


KONTEXT = Kontext()
