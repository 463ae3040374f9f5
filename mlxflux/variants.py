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
from .image import unit_pixels
from .sampling import DEFAULT_SHIFT


@dataclass(frozen=True)
class Variant:
    name: str
    model_name: str  # what PNGs and reports call it
    title: str
    steps: int
    shift: float
    guidance: float
    in_channels: int = 64  # the transformer's input: the packed latent, + what the images add
    guided: bool = True  # has a guidance embedding (schnell has none)
    references: bool = False  # takes reference images (Kontext)
    control: bool = False  # a control image's latents on the input channels (Canny, Depth)
    fill: bool = False  # the masked image's latents and the mask on the input channels (Fill)

    @property
    def defaults(self) -> dict:
        """generate()'s settings that default to the model's."""
        return {"steps": self.steps, "shift": self.shift, "guidance": self.guidance}


# Guidance: BFL's and ComfyUI's examples (Kontext 2.5, BFL cli_kontext and ComfyUI's template;
# Canny 30 and Depth 10, BFL cli_control and diffusers' FluxControlPipeline examples; Fill 30,
# BFL cli_fill and ComfyUI's Fill example). Steps and shift: ComfyUI's (20 at a fixed 1.15).
VARIANTS = {
    v.name: v
    for v in (
        Variant("dev", "flux1-dev", "FLUX.1 dev", 20, DEFAULT_SHIFT, 3.5),
        # ComfyUI's schnell: ModelSamplingFlux at shift 1; no guidance input (any value works)
        Variant("schnell", "flux1-schnell", "FLUX.1 schnell", 4, 1.0, 3.5, guided=False),
        Variant("kontext", "flux1-kontext-dev", "FLUX.1 Kontext dev", 20, DEFAULT_SHIFT, 2.5,
                references=True),
        Variant("canny", "flux1-canny-dev", "FLUX.1 Canny dev", 20, DEFAULT_SHIFT, 30.0,
                in_channels=128, control=True),
        Variant("depth", "flux1-depth-dev", "FLUX.1 Depth dev", 20, DEFAULT_SHIFT, 10.0,
                in_channels=128, control=True),
        Variant("fill", "flux1-fill-dev", "FLUX.1 Fill dev", 20, DEFAULT_SHIFT, 30.0,
                in_channels=384, fill=True),
    )
}  # fmt: skip


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
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    guided = config.get("guidance_embed", True)
    if v.guided != guided:
        has = "has" if guided else "has no"
        raise ValueError(f"the transformer {has} a guidance embedding: it is not {v.title}")
    width = config.get("in_channels", 64)
    if width != v.in_channels:
        raise ValueError(f"the transformer takes {width} input channels, {v.title} {v.in_channels}")


def infer_variant(config: dict, names) -> tuple[str, str | None]:
    """(variant, a note when a name decided it) from the transformer's config and the names of
    its sources (files, folders, a repo id, a diffusers pipeline class): the input width and
    the guidance embedding decide where they can; Kontext has dev's shapes and Canny Depth's,
    so there a name containing the variant's name decides. ValueError when nothing does."""
    width, guided = config.get("in_channels", 64), config.get("guidance_embed", True)
    fits = [v for v in VARIANTS.values() if v.in_channels == width and v.guided == guided]
    if not fits:
        raise ValueError(
            f"a transformer with {width} input channels is no FLUX.1 model mlxflux knows "
            "(dev, schnell and Kontext take 64, Canny and Depth 128, Fill 384)"
        )
    names = [str(n) for n in names if n]
    candidates = fits[1:] if fits[0].name == "dev" else fits  # dev is the 64-channel default
    for v in candidates:
        for text in names:
            if v.name in text.lower():
                note = f"variant {v.name}: suggested by {text}"
                if v.in_channels == 64:
                    note += " (its shapes are FLUX.1 dev's); pass --variant dev if it is not"
                elif len(fits) > 1:
                    note += f" (the shapes fit {' and '.join(f.title for f in fits)})"
                return v.name, note
    if len(fits) > 1 and fits[0].name != "dev":
        raise ValueError(
            f"{' and '.join(v.title for v in fits)} have the same shapes and no file name says "
            f"which this is: pass --variant {' or --variant '.join(v.name for v in fits)}"
        )
    return fits[0].name, None


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

    channels [1, L, C]: concatenated to the packed latent's 64 channels, token by token (a
    control image's latents for Canny/Depth; the masked image's latents and the mask for Fill).
    tokens [1, N, C] with ids [N, 3]: appended after the image tokens (Kontext's references);
    the trunk's velocity for them is dropped."""

    tokens: mx.array | None = None
    ids: np.ndarray | None = None
    channels: mx.array | None = None

    @property
    def extra_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def ids_for(self, img_ids: np.ndarray) -> np.ndarray:
        return img_ids if self.ids is None else np.concatenate([img_ids, self.ids], axis=0)

    def inputs(self, x: mx.array) -> mx.array:
        """The packed latent [B, L, 64] -> the trunk's image input."""
        if self.channels is not None:
            extra = mx.broadcast_to(self.channels, (*x.shape[:2], self.channels.shape[2]))
            x = mx.concatenate([x, extra.astype(x.dtype)], axis=2)
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


# ---- Canny / Depth: a control image; Fill: a masked image and its mask ------------------------


def control_channels(latent: mx.array) -> ImageConditioning:
    """Canny/Depth dev: the control image's latent [1, 16, H/8, W/8], packed, on the input
    channels after the noisy latent's (diffusers' FluxControlPipeline, BFL `prepare_control`,
    ComfyUI's InstructPixToPixConditioning via the model's concat_cond)."""
    from .models.transformer import pack_latents

    return ImageConditioning(channels=pack_latents(latent.astype(mx.float32)))


def pack_mask(mask: np.ndarray) -> mx.array:
    """A mask [H, W] in [0, 1] -> [1, (H/16)(W/16), 256]: each 8x8 block of pixels becomes 64
    channels of its latent pixel (index 8 * dy + dx), then packed 2x2 as the latents are
    (diffusers' FluxFillPipeline.prepare_mask_latents, BFL `prepare_fill`)."""
    from .models.transformer import pack_latents

    h, w = mask.shape
    m = mask.astype(np.float32).reshape(h // 8, 8, w // 8, 8).transpose(1, 3, 0, 2)
    return pack_latents(mx.array(m.reshape(1, 64, h // 8, w // 8)))


def fill_channels(masked_latent: mx.array, mask: np.ndarray) -> ImageConditioning:
    """Fill dev: the masked image's packed latent (64) then the packed mask (256), the mask's
    values as they are: ComfyUI's InpaintModelConditioning hands the model the mask unrounded
    (a feathered outpaint edge stays soft); diffusers binarizes it, the same for a 0/1 mask."""
    from .models.transformer import pack_latents

    packed = pack_latents(masked_latent.astype(mx.float32))
    channels = mx.concatenate([packed, pack_mask(mask.astype(np.float32))], axis=2)
    return ImageConditioning(channels=channels)


def masked_pixels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture Fill is conditioned on, [H, W, 3] in [0, 1]: grey (0.5) where the rounded
    mask repaints. ComfyUI's InpaintModelConditioning: (pixels - 0.5) * (1 - round(mask)) + 0.5
    (round half to even, as torch.round); diffusers' FluxFillPipeline: image * (1 - mask) in
    [-1, 1] with the mask binarized, the same for a 0/1 mask."""
    keep = (1.0 - np.round(mask)).astype(np.float32)[..., None]
    return (pixels - 0.5) * keep + 0.5


OUTPAINT_FEATHERING = 40  # ComfyUI's ImagePadForOutpaint default


def outpaint_padding(size: tuple[int, int], width: int, height: int) -> tuple[int, ...]:
    """(left, top, right, bottom): an image of `size` scaled to fit width x height, centred."""
    s = min(width / size[0], height / size[1])
    w, h = min(width, round(size[0] * s)), min(height, round(size[1] * s))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, width - w - left, height - h - top


def outpaint_canvas(
    image: Image.Image, width: int, height: int, feathering: int = OUTPAINT_FEATHERING
) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [H, W, 3] in [0, 1], mask [H, W]) for outpainting `image` to width x height:
    the image scaled to fit (Lanczos) and centred, grey (0.5) around it, as ComfyUI's
    ImagePadForOutpaint pads, and its mask: 1 in
    the new area, and inside the image within `feathering` pixels of a padded side
    ((feathering - d) / feathering) ** 2, d the distance to that side."""
    left, top, right, bottom = outpaint_padding(image.size, width, height)
    w, h = width - left - right, height - top - bottom
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = np.full((height, width, 3), 0.5, np.float32)
    canvas[top : top + h, left : left + w] = unit_pixels(image)
    mask = np.ones((height, width), np.float32)
    t = np.zeros((h, w), np.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i, j = np.indices((h, w))
        d = np.minimum.reduce([
            i if top else np.full_like(i, h), h - i if bottom else np.full_like(i, h),
            j if left else np.full_like(j, w), w - j if right else np.full_like(j, w),
        ])  # fmt: skip
        v = (feathering - d) / feathering
        t = np.where(d < feathering, v * v, 0.0).astype(np.float32)
    mask[top : top + h, left : left + w] = t
    return canvas, mask
