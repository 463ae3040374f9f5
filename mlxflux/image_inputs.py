"""A generation's input images, opened and checked before any stage runs, and what the encode
stage makes of them: the init latent (image to image) and the variant's conditioning.

    init_image        image to image on any model; the picture to fill on Fill models
    reference_images  Kontext: appended tokens (`variants.reference_tokens`)
    control_image     Canny/Depth: input channels (`variants.control_channels`), with
                      `preprocess` auto (Canny models: ComfyUI's Canny node; Depth: as given),
                      canny or none
    mask / outpaint   Fill: the masked picture's latent and the mask on the input channels
                      (`variants.fill_channels`); outpaint centres the init image on the
                      canvas and masks the rest (ComfyUI's ImagePadForOutpaint)

Every refusal is a one-line SettingsError naming the argument, raised here: before any stage.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import SettingsError
from .image import cover, size_of, unit_pixels
from .preprocess import canny_image
from .settings import open_init_image
from .variants import (
    REFERENCE_SCALES,
    ImageConditioning,
    Variant,
    control_channels,
    fill_channels,
    masked_pixels,
    outpaint_canvas,
    reference_size,
    reference_tokens,
    scale_reference,
)

PREPROCESS = ("auto", "canny", "none")
ASPECT_TOLERANCE = 0.01  # a mask's aspect ratio may differ from the init image's by this much

Encode = Callable[[np.ndarray], np.ndarray]  # pixels [H, W, 3] in [0, 1] -> latent [1, 16, ...]


@dataclass
class Picture:
    """An input image as given: the image, its file name and sha256."""

    image: Image.Image
    name: str
    sha256: str

    def record(self) -> dict:
        return {"file": self.name, "sha256": self.sha256}


@dataclass
class Reference(Picture):
    """A Kontext reference and the size it is encoded at."""

    size: tuple[int, int] = (0, 0)
    scale: str = "kontext"


@dataclass
class ImageInputs:
    variant: Variant
    init: Picture | None = None
    references: list[Reference] = field(default_factory=list)
    control: Picture | None = None
    preprocess: str = "auto"
    mask: Picture | None = None
    outpaint: bool = False

    @classmethod
    def open(cls, variant: Variant, kw: dict) -> "ImageInputs":
        """Open and check every image `generate` was given, against the model's variant."""
        inputs = cls(variant, preprocess=kw.get("preprocess", "auto"))
        if kw.get("init_image") is not None:
            inputs.init = Picture(*open_init_image(kw["init_image"]))
        inputs._open_references(kw.get("reference_images"), kw.get("reference_scale", "kontext"))
        inputs._open_control(kw.get("control_image"))
        inputs._open_fill(kw.get("mask"), bool(kw.get("outpaint")))
        return inputs

    # ---- checks --------------------------------------------------------------------------

    def _open_references(self, images, scale: str) -> None:
        if scale not in REFERENCE_SCALES:
            raise SettingsError(f"must be one of {', '.join(REFERENCE_SCALES)}, got {scale!r}",
                                "reference_scale")  # fmt: skip
        if images is None or isinstance(images, (str, Path, Image.Image)):
            images = [] if images is None else [images]
        images = list(images)
        if images and not self.variant.references:
            raise SettingsError(
                f"{self.variant.title} takes no reference images; they need a FLUX.1 Kontext "
                "model (convert one with `mlxflux convert --variant kontext`)",
                "reference_images",
            )
        for source in images:
            image, name, digest = open_init_image(source, "reference_images")
            size = reference_size(image.width, image.height, scale)
            self.references.append(Reference(image, name, digest, size, scale))

    def _open_control(self, source) -> None:
        v = self.variant
        if self.preprocess not in PREPROCESS:
            raise SettingsError(
                f"must be one of {', '.join(PREPROCESS)}, got {self.preprocess!r}", "preprocess"
            )
        if source is None:
            if v.control:
                what = "the picture whose edges it keeps" if v.name == "canny" else "a depth map"
                raise SettingsError(f"{v.title} needs a control image ({what})", "control_image")
            return
        if not v.control:
            raise SettingsError(
                f"{v.title} has no control input; a control image needs a FLUX.1 Canny or Depth "
                "dev model (convert one with `mlxflux convert --variant canny` or `depth`)",
                "control_image",
            )
        self.control = Picture(*open_init_image(source, "control_image"))

    def _open_fill(self, source, outpaint: bool) -> None:
        v = self.variant
        if source is not None or outpaint:
            what = "--outpaint" if outpaint else "a mask"
            if self.init is None:
                raise SettingsError(f"{what} needs an init image: the picture to fill", "mask")
            if not v.fill:
                raise SettingsError(
                    f"{v.title} cannot fill a masked area; {what} needs a FLUX.1 Fill dev model "
                    "(convert one with `mlxflux convert --variant fill`)",
                    "mask",
                )
            if source is not None and outpaint:
                raise SettingsError("give a mask or --outpaint, not both", "mask")
        elif v.fill:
            raise SettingsError(
                f"{v.title} repaints a masked area: give an init image and a mask (white = "
                "repaint), or outpaint",
                "mask",
            )
        self.outpaint = outpaint
        if source is None:
            return
        self.mask = Picture(*open_init_image(source, "mask"))
        (iw, ih), (mw, mh) = self.init.image.size, self.mask.image.size
        if abs(mw / mh - iw / ih) > ASPECT_TOLERANCE * iw / ih:
            raise SettingsError(
                f"{self.mask.name} is {mw}x{mh} and {self.init.name} {iw}x{ih}: a mask needs "
                "the init image's size or at least its aspect ratio",
                "mask",
            )

    def check_size(self, width: int, height: int) -> None:
        if self.outpaint and (width, height) == size_of(self.init.image):
            raise SettingsError(
                f"the canvas {width}x{height} is the init image's own size: give a larger or "
                "differently shaped one (a preset, or --width/--height) to outpaint to",
                "width",
            )

    # ---- what they imply -----------------------------------------------------------------

    def default_size(self) -> tuple[int, int] | None:
        """The output size when none is given (`output_size`)."""
        return output_size(*(p.image if p else None for p in (self.init, self.control)),
                           [r.image for r in self.references],
                           self.references[0].scale if self.references else "kontext")  # fmt: skip

    @property
    def extra_tokens(self) -> int:
        return sum((w // 16) * (h // 16) for w, h in (r.size for r in self.references))

    @property
    def encodes(self) -> bool:
        return any((self.init, self.references, self.control))

    def settings(self) -> dict:
        """What the PNG and the report record of the inputs (file names and sha256)."""
        out = {}
        if self.references:
            out["reference_images"] = [{**r.record(), "size": list(r.size)}
                                       for r in self.references]  # fmt: skip
            out["reference_scale"] = self.references[0].scale
        if self.control is not None:
            out["control_image"] = self.control.record()
            out["preprocess"] = self.applied_preprocess
        if self.mask is not None:
            out["mask"] = self.mask.record()
        if self.outpaint:
            out["outpaint"] = True
            out["init_image_size"] = list(self.init.image.size)
        return out

    @property
    def applied_preprocess(self) -> str:
        if self.preprocess == "auto":
            return "canny" if self.variant.name == "canny" else "none"
        return self.preprocess

    # ---- the encode stage ----------------------------------------------------------------

    def fill_pixels(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels [H, W, 3] in [0, 1], mask [H, W] in [0, 1]) of a Fill job at the size."""
        if self.outpaint:
            return outpaint_canvas(self.init.image, width, height)
        pixels = unit_pixels(cover(self.init.image, width, height))
        grey = self.mask.image.convert("L")
        return pixels, unit_pixels(cover(grey, width, height, Image.Resampling.BILINEAR))

    def control_picture(self, width: int, height: int) -> Image.Image:
        """The control image at the output size (scaled to cover, centre-cropped), as the
        model sees it: edges drawn for canny."""
        image = cover(self.control.image, width, height)
        return canny_image(image) if self.applied_preprocess == "canny" else image

    def encode(self, encode: Encode, width: int, height: int, init_latent: bool):
        """(init latent or None, the variant's ImageConditioning), through `encode`."""
        latent, extra = None, ImageConditioning()
        if self.variant.fill:
            pixels, mask = self.fill_pixels(width, height)
            extra = fill_channels(mx.array(encode(masked_pixels(pixels, mask))), mask)
            if init_latent:
                latent = encode(pixels)
        elif self.init is not None and init_latent:
            latent = encode(unit_pixels(cover(self.init.image, width, height)))
        if self.control is not None:
            control = unit_pixels(self.control_picture(width, height))
            extra = control_channels(mx.array(encode(control)))
        if self.references:
            refs = [mx.array(encode(unit_pixels(scale_reference(r.image, r.scale))))
                    for r in self.references]  # fmt: skip
            extra = reference_tokens(refs)
        return latent, extra


def output_size(init=None, control=None, references=(), scale="kontext"):
    """The output size when none is given, from the input images (PIL): the init image's,
    else the control image's (rounded to multiples of 16), else the first reference's as it is
    encoded (`reference_scale`); None without any."""
    for image in (init, control):
        if image is not None:
            return size_of(image)
    return reference_size(*references[0].size, scale) if references else None
