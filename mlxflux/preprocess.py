"""Control-image preprocessing: the Canny edge map FLUX.1 Canny dev is conditioned on.

A port of what ComfyUI's Canny node runs (comfy_extras/nodes_canny.py: `kornia.filters.canny`
on the image in [0, 1], thresholds 0.4 / 0.8), in numpy:

    grey        0.299 R + 0.587 G + 0.114 B
    blur        5x5 Gaussian, sigma 1, separable, reflected borders
    gradients   unnormalised Sobel (x: [-1 0 1; -2 0 2; -1 0 1]), replicated borders
    suppression each pixel against its two neighbours along the gradient, rounded to 45 degrees
                (a horizontal/vertical tie keeps the left/upper pixel), the magnitude zero-padded
                by one pixel as sqrt(eps)
    hysteresis  weak (> low) pixels joined to strong (> high) ones through 8-neighbours, until
                nothing changes

Returns an RGB image of 0 / 255 edges, as the node's output is saved.
"""

import numpy as np
from PIL import Image

from .pixels import unit_pixels

CANNY_LOW, CANNY_HIGH = 0.4, 0.8  # ComfyUI's Canny node defaults
EPS = 1e-6  # kornia's eps inside the magnitude's square root

# neighbour k of the 3x3 window (dy, dx), in the order directions are numbered: 0 is right,
# then clockwise in image coordinates (y down) by 45 degrees; 8 is the pixel itself
OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 0))


def _gaussian_blur(x: np.ndarray, size: int = 5, sigma: float = 1.0) -> np.ndarray:
    t = np.arange(size, dtype=np.float32) - size // 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    r = size // 2
    p = np.pad(x, ((0, 0), (r, r)), mode="reflect")
    x = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(size))
    p = np.pad(x, ((r, r), (0, 0)), mode="reflect")
    return sum(k[i] * p[i : i + x.shape[0], :] for i in range(size)).astype(np.float32)


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape

    def at(dy, dx):
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return gx.astype(np.float32), gy.astype(np.float32)


def canny_edges(rgb: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """rgb [H, W, 3] float in [0, 1] -> edges [H, W] bool."""
    grey = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)
    gx, gy = _sobel(_gaussian_blur(grey))
    padded = np.sqrt(np.pad(gx, 1) ** 2 + np.pad(gy, 1) ** 2 + np.float32(EPS))
    h, w = gx.shape
    window = np.stack([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in OFFSETS])
    magnitude = window[8]
    direction = np.round(np.arctan2(gy, gx) * np.float32(4 / np.pi)).astype(np.int64)
    pos, neg = direction % 8, (direction + 4) % 8
    rows, cols = np.indices((h, w))

    def beats(d):
        n = window[d, rows, cols]
        tie = (d == 0) | (d == 2)  # right and down accept a tie: the left/upper pixel is kept
        return (magnitude > n) | (tie & (magnitude == n))

    keep = beats(pos) & beats(neg) & (magnitude > padded[0, 0])
    magnitude = magnitude * keep
    strong = magnitude > high
    weak = (magnitude > low) & ~strong
    while True:  # a weak pixel with a strong 8-neighbour becomes strong
        p = np.pad(strong, 1)
        near = np.zeros_like(strong)
        for dy, dx in OFFSETS[:8]:
            near |= p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown = strong | (weak & near)
        if np.array_equal(grown, strong):
            return strong
        strong = grown


def canny_image(image: Image.Image) -> Image.Image:
    """ComfyUI's Canny node (default thresholds) on a PIL image: white edges on black, RGB."""
    edges = canny_edges(unit_pixels(image.convert("RGB")))
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2).astype(np.uint8) * 255)
