"""FLUX's image tokens: the latent [B, 16, H/8, W/8] patchified 2x2 into tokens of 64 channels,
and their position ids (BFL `sampling.prepare` / `unpack`)."""

import mlx.core as mx
import numpy as np


def image_ids(height: int, width: int) -> np.ndarray:
    """Position ids [(H/16)(W/16), 3] = [0, row, col] for an image of height x width pixels."""
    h, w = height // 16, width // 16
    ids = np.zeros((h, w, 3), np.int32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def pack_latents(latents: mx.array) -> mx.array:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: `b c (h ph) (w pw) -> b (h w) (c ph pw)`."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: mx.array, height: int, width: int) -> mx.array:
    """Inverse of `pack_latents` for an image of height x width pixels."""
    b, _, d = x.shape
    h, w, c = height // 16, width // 16, d // 4
    x = x.reshape(b, h, w, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h * 2, w * 2)
