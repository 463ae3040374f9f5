"""FLUX.1 Canny and Depth dev: a control image's latents on the transformer's input channels,
after the noisy latent's (diffusers' FluxControlPipeline, BFL `prepare_control`, ComfyUI's
InstructPixToPixConditioning via the model's concat_cond). Canny models take the picture's
edges (ComfyUI's Canny node, `mlxflux.preprocess`), Depth models a depth map made elsewhere."""

from dataclasses import dataclass

import mlx.core as mx
from PIL import Image

from ..errors import SettingsError
from ..pixels import Picture, cover, size_of, unit_pixels
from ..preprocess import CANNY_HIGH, CANNY_LOW, canny_image
from .base import Conditioning, Family, Inputs, packed

PREPROCESS = ("auto", "canny", "none")


def control_channels(latent: mx.array) -> Conditioning:
    """The control image's latent [1, 16, H/8, W/8], packed, as input channels."""
    return Conditioning(channels=packed(latent))


@dataclass
class Control(Inputs):
    encodes = True
    picture: Picture
    preprocess: str  # canny or none: what was applied

    def default_size(self):
        return size_of(self.picture.image)

    def picture_at(self, width: int, height: int) -> Image.Image:
        """The control image at the output size (scaled to cover, centre-cropped), as the
        model sees it: edges drawn for canny."""
        image = cover(self.picture.image, width, height)
        return canny_image(image) if self.preprocess == "canny" else image

    def encode(self, encode, width: int, height: int) -> Conditioning:
        return control_channels(mx.array(encode(unit_pixels(self.picture_at(width, height)))))

    def record(self) -> dict:
        return {"control_image": self.picture.record(), "preprocess": self.preprocess}


class ControlFamily(Family):
    name = "control"
    inputs = ("control_image",)
    needs = (
        "has no control input; a control image needs a FLUX.1 Canny or Depth dev model "
        "(convert one with `mlxflux convert --variant canny` or `depth`)"
    )

    def open(self, variant, request, init) -> Control:
        if request.control_image is None:
            what = "the picture whose edges it keeps" if variant.name == "canny" else "a depth map"
            raise SettingsError(f"{variant.title} needs a control image ({what})", "control_image")
        preprocess = request.preprocess
        if preprocess == "auto":  # Canny models draw the edges, Depth models take the map
            preprocess = "canny" if variant.name == "canny" else "none"
        return Control(request.control_image, preprocess)

    def parameters(self, s: dict) -> str:
        c = s.get("control_image")
        if not c:
            return ""
        return (f", Control image: {c['file']} (sha256 {c['sha256'][:16]}), "
                f"Preprocess: {s.get('preprocess', 'none')}")  # fmt: skip

    def graph_model_input(self, g, s, positive, negative, vae, scaled):
        if not s.get("control_image"):
            return positive, negative, None
        pixels = scaled(s["control_image"]["file"])
        if s.get("preprocess") == "canny":
            pixels = [g.add("Canny", image=pixels, low_threshold=CANNY_LOW,
                            high_threshold=CANNY_HIGH), 0]  # fmt: skip
        cond = g.add("InstructPixToPixConditioning", positive=positive, negative=negative,
                     vae=[vae, 0], pixels=pixels)  # fmt: skip
        return [cond, 0], [cond, 1], None


CONTROL = ControlFamily()
