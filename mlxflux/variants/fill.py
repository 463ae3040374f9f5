"""FLUX.1 Fill dev: the masked picture's latents and the mask on the transformer's input
channels (diffusers' FluxFillPipeline, BFL `prepare_fill`, ComfyUI's InpaintModelConditioning).
The init image is the picture to fill: with a mask (white repaints), or outpainted (centred on
a larger canvas, the rest repainted, as ComfyUI's ImagePadForOutpaint)."""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from ..errors import SettingsError
from ..pixels import Picture, cover, size_of, unit_pixels
from .base import Conditioning, Family, Inputs, packed

ASPECT_TOLERANCE = 0.01  # a mask's aspect ratio may differ from the init image's by this much
OUTPAINT_FEATHERING = 40  # ComfyUI's ImagePadForOutpaint default


def pack_mask(mask: np.ndarray) -> mx.array:
    """A mask [H, W] in [0, 1] -> [1, (H/16)(W/16), 256]: each 8x8 block of pixels becomes 64
    channels of its latent pixel (index 8 * dy + dx), then packed 2x2 as the latents are
    (diffusers' FluxFillPipeline.prepare_mask_latents, BFL `prepare_fill`)."""
    h, w = mask.shape
    m = mask.astype(np.float32).reshape(h // 8, 8, w // 8, 8).transpose(1, 3, 0, 2)
    return packed(mx.array(m.reshape(1, 64, h // 8, w // 8)))


def fill_channels(masked_latent: mx.array, mask: np.ndarray) -> Conditioning:
    """The masked image's packed latent (64) then the packed mask (256), the mask's values as
    they are: ComfyUI's InpaintModelConditioning hands the model the mask unrounded (a
    feathered outpaint edge stays soft); diffusers binarizes it, the same for a 0/1 mask."""
    channels = mx.concatenate([packed(masked_latent), pack_mask(mask.astype(np.float32))], axis=2)
    return Conditioning(channels=channels)


def masked_pixels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture Fill is conditioned on, [H, W, 3] in [0, 1]: grey (0.5) where the rounded
    mask repaints. ComfyUI's InpaintModelConditioning: (pixels - 0.5) * (1 - round(mask)) + 0.5
    (round half to even, as torch.round); diffusers' FluxFillPipeline: image * (1 - mask) in
    [-1, 1] with the mask binarized, the same for a 0/1 mask."""
    keep = (1.0 - np.round(mask)).astype(np.float32)[..., None]
    return (pixels - 0.5) * keep + 0.5


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
    ImagePadForOutpaint pads, and its mask: 1 in the new area, and inside the image within
    `feathering` pixels of a padded side ((feathering - d) / feathering) ** 2, d the distance
    to that side."""
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


@dataclass
class Fill(Inputs):
    encodes = True
    init: Picture
    mask: Picture | None  # None: outpaint

    def check_size(self, width: int, height: int) -> None:
        if self.mask is None and (width, height) == size_of(self.init.image):
            raise SettingsError(
                f"the canvas {width}x{height} is the init image's own size: give a larger or "
                "differently shaped one (a preset, or --width/--height) to outpaint to",
                "width",
            )

    def pixels(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels [H, W, 3] in [0, 1], mask [H, W] in [0, 1]) at the output size."""
        if self.mask is None:
            return outpaint_canvas(self.init.image, width, height)
        pixels = unit_pixels(cover(self.init.image, width, height))
        grey = self.mask.image.convert("L")
        return pixels, unit_pixels(cover(grey, width, height, Image.Resampling.BILINEAR))

    def init_pixels(self, width: int, height: int) -> np.ndarray:
        return self.pixels(width, height)[0]

    def encode(self, encode, width: int, height: int) -> Conditioning:
        pixels, mask = self.pixels(width, height)
        return fill_channels(mx.array(encode(masked_pixels(pixels, mask))), mask)

    def record(self) -> dict:
        if self.mask is not None:
            return {"mask": self.mask.record()}
        return {"outpaint": True, "init_image_size": list(self.init.image.size)}


class FillFamily(Family):
    name = "fill"
    inputs = ("mask", "outpaint")
    takes_init_image = True
    needs = (
        "cannot fill a masked area; {what} needs a FLUX.1 Fill dev model "
        "(convert one with `mlxflux convert --variant fill`)"
    )

    def refuse(self, variant, request) -> SettingsError:
        what = "--outpaint" if request.outpaint else "a mask"
        if request.init_image is None:
            return SettingsError(f"{what} needs an init image: the picture to fill", "mask")
        return SettingsError(f"{variant.title} {self.needs.format(what=what)}", "mask")

    def open(self, variant, request, init) -> Fill:
        mask, outpaint = request.mask, request.outpaint
        if mask is None and not outpaint:
            raise SettingsError(
                f"{variant.title} repaints a masked area: give an init image and a mask (white = "
                "repaint), or outpaint",
                "mask",
            )
        what = "--outpaint" if outpaint else "a mask"
        if init is None:
            raise SettingsError(f"{what} needs an init image: the picture to fill", "mask")
        if mask is not None and outpaint:
            raise SettingsError("give a mask or --outpaint, not both", "mask")
        if mask is not None:
            (iw, ih), (mw, mh) = init.image.size, mask.image.size
            if abs(mw / mh - iw / ih) > ASPECT_TOLERANCE * iw / ih:
                raise SettingsError(
                    f"{mask.name} is {mw}x{mh} and {init.name} {iw}x{ih}: a mask needs "
                    "the init image's size or at least its aspect ratio",
                    "mask",
                )
        return Fill(init, mask)

    def parameters(self, s: dict) -> str:
        out = ""
        if s.get("mask"):
            out += f", Mask: {s['mask']['file']} (sha256 {s['mask']['sha256'][:16]})"
        if s.get("outpaint"):
            out += ", Outpaint: centred"
        return out

    def graph_model_input(self, g, s, positive, negative, vae, scaled):
        if not s.get("init_image"):
            return positive, negative, None
        w, h = s["width"], s["height"]
        if s.get("outpaint"):
            image = g.add("LoadImage", image=s["init_image"], upload="image")
            pad = outpaint_padding(s["init_image_size"], w, h)
            fw, fh = w - pad[0] - pad[2], h - pad[1] - pad[3]  # the image fitted, then padded
            fit = g.add("ImageScale", image=[image, 0], upscale_method="lanczos", width=fw,
                        height=fh, crop="disabled")  # fmt: skip
            padded = g.add("ImagePadForOutpaint", image=[fit, 0], left=pad[0], top=pad[1],
                           right=pad[2], bottom=pad[3], feathering=OUTPAINT_FEATHERING)  # fmt: skip
            pixels, mask = [padded, 0], [padded, 1]
        else:
            pixels = scaled(s["init_image"])
            mask_file = s["mask"]["file"]
            mask = [g.add("LoadImageMask", image=mask_file, channel="red", upload="image"), 0]
        cond = g.add("InpaintModelConditioning", positive=positive, negative=negative,
                     vae=[vae, 0], pixels=pixels, mask=mask, noise_mask=False)  # fmt: skip
        return [cond, 0], [cond, 1], [cond, 2]


FILL = FillFamily()
