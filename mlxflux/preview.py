"""Live previews: the picture as it forms, from the model's current estimate of the clean latent,
x0 = x - sigma * v (ComfyUI's `calculate_denoised`), after every step.

    latent2rgb  ComfyUI's Latent2RGBPreviewer (latent_preview.py) with the FLUX latent format's
                factors (comfy/latent_formats.py `Flux`): a 16 -> 3 linear map and a bias on
                x0, -1..1 to 0..255, at the latent's resolution (1/8 of the picture). Nearly
                free.
    taef1       madebyollin's tiny FLUX decoder (`models.taef1`), ComfyUI's TAESD previewer:
                a full picture for a few percent of a step; decoded from x0 averaged over
                f x f latent pixels so that the preview's long side stays within
                `preview_size()`: 512 on a GPU (ComfyUI shows previews at 512), 256 on MLX's
                CPU backend, whose convolutions are slow (bench/preview.py: the DVD cover's
                preview at 512 costs ~13% of a 1+1-block step there, at 256 ~5%).
    auto        taef1 when the model folder has it (`convert --taef1`), else latent2rgb.

A preview reads x0 and writes nothing back: the picture is the same with previews on or off.
"""

import math

import mlx.core as mx
import numpy as np
from PIL import Image

METHODS = ("auto", "latent2rgb", "taef1", "none")
PREVIEW_SIZE = 512  # ComfyUI's --preview-size default: the long side a preview is shown at
CPU_PREVIEW_SIZE = 256  # taef1's on MLX's CPU backend (see above)

# comfy/latent_formats.py, class Flux: rows are the 16 latent channels, columns R, G, B
LATENT_RGB_FACTORS = np.array([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
], dtype=np.float32)  # fmt: skip
LATENT_RGB_BIAS = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """ComfyUI's `preview_to_image`: -1..1 -> 0..255, clamped, truncated to uint8."""
    return (((values + np.float32(1.0)) / np.float32(2.0)).clip(0, 1) * np.float32(255)).astype(
        np.uint8
    )


def latent2rgb(x0: np.ndarray) -> Image.Image:
    """x0 [1, 16, h, w] (the model's latent space) -> an RGB picture of h x w, as ComfyUI's
    Latent2RGBPreviewer: linear(x0[0].movedim(0, -1), factors, bias) in float32."""
    values = np.asarray(x0[0], np.float32).transpose(1, 2, 0) @ LATENT_RGB_FACTORS
    return Image.fromarray(to_uint8(values + LATENT_RGB_BIAS))


def preview_size() -> int:
    """The long side taef1 previews are decoded at on this backend."""
    return PREVIEW_SIZE if mx.default_device().type == mx.DeviceType.gpu else CPU_PREVIEW_SIZE


def pool_factor(height: int, width: int, size: int) -> int:
    """How many latent pixels a side taef1 averages into one for a latent of height x width,
    so that its picture's long side (8x the latent's) stays within `size` pixels."""
    return max(1, math.ceil(max(height, width) * 8 / size))


def decoder_activation_bytes(height: int, width: int, size: int = PREVIEW_SIZE) -> int:
    """taef1's activations for a preview of a picture of height x width decoded at `size`:
    four float32 maps of 64 channels at the preview's size alive at once (a block's input,
    two convolutions, the sum)."""
    f = pool_factor(height // 8, width // 8, size)
    return 4 * 64 * 4 * (height // 8 // f * 8) * (width // 8 // f * 8)


class Previewer:
    """Turns x0 into a preview picture: `method` latent2rgb or taef1 (with its `decoder`)."""

    def __init__(self, method: str, decoder=None, size: int | None = None):
        self.method, self.decoder, self.size = method, decoder, size or preview_size()

    def __call__(self, x0: mx.array) -> Image.Image:
        """x0 [1, 16, h, w], float32, in the model's latent space."""
        if self.method == "latent2rgb":
            return latent2rgb(np.array(x0))
        f = pool_factor(x0.shape[2], x0.shape[3], self.size)
        if f > 1:  # average f x f latent pixels: a smaller picture, the same look
            b, c, h, w = x0.shape
            x0 = x0[:, :, : h - h % f, : w - w % f]
            x0 = x0.reshape(b, c, h // f, f, w // f, f).mean(axis=(3, 5))
        image = self.decoder(x0.astype(mx.float32))[0]
        # ComfyUI's TAESD.decode (x - 0.5) * 2, then preview_to_image back to 0..255
        return Image.fromarray(to_uint8(np.array((image - 0.5) * 2)))
