"""FLUX.1 Redux: "more covers like this one". Each Redux image becomes 729 tokens at T5's width
(SigLIP's vision tower, then Redux's projection: `models.redux.ReduxEncoder`) appended to the
prompt's, as ComfyUI's CLIPVisionEncode -> StyleModelApply does:

    preprocess  ComfyUI's `clip_preprocess`: LoadImage's /255, torch's bicubic resize with
                antialias (crop center: the short side to 384, then the centre; none: squashed
                to 384x384), rounded to 255 levels, (x - 0.5) / 0.5
    strength    multiply: the tokens are scaled by it; attn_bias: attention to them gets
                log(strength) (`variants.Conditioning.attention_bias`)

The vision stage runs before the text stage and releases SigLIP before T5 loads.
"""

import math

import mlx.core as mx
import numpy as np

from .errors import SettingsError
from .variants import Conditioning

STRENGTH_TYPES = ("multiply", "attn_bias")
CROPS = ("center", "none")
MAX_STRENGTH = 10.0  # ComfyUI's StyleModelApply: 0 to 10
MEAN, STD = 0.5, 0.5  # SigLIP's normalization (ComfyUI's clip_vision_siglip_384.json)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic filter of torch's antialiased resize (and PIL's): a = -0.5."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] float32 weights of torch's `interpolate(mode="bicubic", antialias=True)` along
    one axis (ATen's `_compute_indices_min_size_weights_aa`, in its float32): each output
    pixel's window of input pixels, the filter stretched by the downscale factor, normalized
    to sum 1."""
    f = np.float32
    scale = f(size_in / size_out)
    support = f(2.0) * scale if scale >= 1.0 else f(2.0)
    invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        center = scale * f(i + 0.5)
        lo = max(int(center - support + f(0.5)), 0)  # C++'s truncation toward zero
        hi = min(int(center + support + f(0.5)), size_in)
        w = _cubic((np.arange(lo, hi, dtype=np.float32) - center + f(0.5)) * invscale)
        w = w.astype(np.float32)
        weights[i, lo:hi] = w / np.float32(np.cumsum(w, dtype=np.float32)[-1])
    return weights


def preprocess(image, crop: str = "center", size: int = 384) -> np.ndarray:
    """ComfyUI's `clip_preprocess` of a PIL image: [size, size, 3] float32, normalized. The
    resize is torch's in float32 (width, then height); a value on a rounding boundary may land
    one level of 255 apart from torch's (a few in 10^5)."""
    x = np.asarray(image.convert("RGB"), np.float32) / 255.0  # LoadImage
    h, w = x.shape[:2]
    if (h, w) != (size, size):
        if crop == "center":
            scale = size / min(h, w)
            th, tw = round(scale * h), round(scale * w)
        else:
            th, tw = size, size
        x = np.einsum("pw,hwc->hpc", resize_weights(w, tw), x)
        x = np.einsum("oh,hpc->opc", resize_weights(h, th), x)
        top, left = (th - size) // 2, (tw - size) // 2
        x = x[top : top + size, left : left + size]
    x = np.round(np.clip(255.0 * x, 0, 255)) / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


def parse_strength(value, name: str = "redux_images") -> float:
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"strength {value!r} is not a number", name) from None
    if not 0 <= strength <= MAX_STRENGTH or math.isnan(strength):
        raise SettingsError(f"strength {strength:g} is outside ComfyUI's 0-10", name)
    return strength


def conditioning(tokens: list[mx.array], strengths: list[float], kind: str) -> Conditioning:
    """The text-side conditioning of Redux images' tokens [1, 729, 4096] each, in order, as
    chained StyleModelApply nodes make it."""
    out = Conditioning()
    for t, s in zip(tokens, strengths, strict=True):
        if kind == "multiply":
            out = out + Conditioning(text=t * s, text_bias=((t.shape[1], 0.0),))
        else:  # ComfyUI: no mask at all when the strength is 1 (log 1 = 0: the same)
            bias = -math.inf if s == 0 else math.log(s)
            out = out + Conditioning(text=t, text_bias=((t.shape[1], bias),))
    return out


def encode(encoder, pictures, crop: str, after_layer=None) -> list[mx.array]:
    """Each picture's Redux tokens [1, 729, 4096], float32, evaluated one at a time."""
    size = encoder.config.image_size
    out = []
    for picture in pictures:
        pixels = mx.array(preprocess(picture.image, crop, size)[None])
        tokens = encoder(pixels, after_layer)
        mx.eval(tokens)
        out.append(tokens)
    return out
