"""FLUX.1 model variants, and how an image becomes a variant's conditioning.

Every variant runs the same stages. They differ in their defaults and in what an image adds to
the transformer's input besides the noisy latent:

    dev, schnell   nothing
    kontext        reference tokens appended after the image tokens, with their own position
                   ids; the velocity of those tokens is dropped (`reference_tokens`)

`ImageConditioning` carries that addition into the denoise stage, which asks it for the
transformer's input, the position ids and the velocity; a new variant is a new entry here, not
new branches through the stages.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import ModelFolderError, SettingsError
from .sampling import DEFAULT_SHIFT


@dataclass(frozen=True)
class Variant:
    name: str
    model_name: str  # what PNGs and reports call it
    title: str
    steps: int
    shift: float
    guidance: float
    references: bool = False  # takes reference images (Kontext)

    @property
    def defaults(self) -> dict:
        """generate()'s settings that default to the model's."""
        return {"steps": self.steps, "shift": self.shift, "guidance": self.guidance}


VARIANTS = {
    v.name: v
    for v in (
        Variant("dev", "flux1-dev", "FLUX.1 dev", 20, DEFAULT_SHIFT, 3.5),
        # ComfyUI's schnell: ModelSamplingFlux at shift 1; no guidance input (any value works)
        Variant("schnell", "flux1-schnell", "FLUX.1 schnell", 4, 1.0, 3.5),
        # BFL's cli_kontext and ComfyUI's Kontext template: guidance 2.5
        Variant(
            "kontext",
            "flux1-kontext-dev",
            "FLUX.1 Kontext dev",
            20,
            DEFAULT_SHIFT,
            2.5,
            references=True,
        ),  # fmt: skip
    )
}
NAME_HINTS = ("kontext",)  # variants a file or repo name can suggest (their shapes equal dev's)


def variant_of(manifest: dict) -> Variant:
    """A model folder's variant: recorded at conversion, or (older folders) from its config."""
    name = manifest.get("variant")
    if name is None:
        guided = manifest["components"]["transformer"]["config"].get("guidance_embed", True)
        name = "dev" if guided else "schnell"
    if name not in VARIANTS:
        raise ModelFolderError(
            f"mlxflux.json: variant {str(name)!r} is not one this mlxflux runs "
            f"({', '.join(VARIANTS)}); a newer mlxflux may"
        )
    return VARIANTS[name]


def check_variant(name: str, config: dict) -> None:
    """Refuse a variant the transformer's shapes contradict (ValueError, one line)."""
    guided = config.get("guidance_embed", True)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
    if (name == "schnell") == guided:
        has = "has" if guided else "has no"
        raise ValueError(f"the transformer {has} a guidance embedding: it is not FLUX.1 {name}")
    if config.get("in_channels", 64) != 64:
        raise ValueError(
            f"the transformer takes {config['in_channels']} input channels, not the 64 of "
            f"FLUX.1 {name}"
        )


def hinted(names) -> tuple[str | None, str | None]:
    """(variant, the name that suggests it) from source file, folder or repo names."""
    for text in names:
        for hint in NAME_HINTS:
            if hint in str(text).lower():
                return hint, str(text)
    return None, None


# ---- Kontext: reference images -----------------------------------------------------------

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
    if scale == "none":
        return max(16, width // 16 * 16), max(16, height // 16 * 16)
    raise SettingsError(f"must be one of {', '.join(REFERENCE_SCALES)}, got {scale!r}",
                        "reference_scale")  # fmt: skip


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


@dataclass
class ImageConditioning:
    """What images add to the transformer's input for one generation (empty for text only).

    tokens [1, N, C] with ids [N, 3]: appended after the image tokens (Kontext's references);
    the trunk's velocity for them is dropped."""

    tokens: mx.array | None = None
    ids: np.ndarray | None = None

    @property
    def extra_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def ids_for(self, img_ids: np.ndarray) -> np.ndarray:
        return img_ids if self.ids is None else np.concatenate([img_ids, self.ids], axis=0)

    def inputs(self, x: mx.array) -> mx.array:
        """The packed latent [B, L, 64] -> the trunk's image input."""
        if self.tokens is None:
            return x
        tokens = mx.broadcast_to(self.tokens, (x.shape[0], *self.tokens.shape[1:]))
        return mx.concatenate([x, tokens.astype(x.dtype)], axis=1)

    def velocity(self, v: mx.array, image_tokens: int) -> mx.array:
        """The trunk's output -> the velocity of the image tokens alone."""
        return v if self.tokens is None else v[:, :image_tokens]


def reference_tokens(latents: list[mx.array]) -> ImageConditioning:
    """Kontext's conditioning from reference latents [1, 16, h, w] (Flux latent format)."""
    from .models.transformer import pack_latents

    if not latents:
        return ImageConditioning()
    ids = reference_ids([(z.shape[2], z.shape[3]) for z in latents])
    tokens = mx.concatenate([pack_latents(z.astype(mx.float32)) for z in latents], axis=1)
    return ImageConditioning(tokens=tokens, ids=np.concatenate(ids, axis=0))
