"""Building blocks shared by the Flux transformer: embeddings, RoPE, attention, norms."""

import functools
import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of `t * 1000`, [cos | sin] (BFL `timestep_embedding`, float32)."""
    t = t.astype(mx.float32) * 1000.0
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def rope_tables(
    ids: np.ndarray, axes_dim: tuple[int, ...], theta: float
) -> tuple[mx.array, mx.array]:
    """cos/sin tables [L, head_dim/2] for integer position ids [L, n_axes].

    BFL `rope` computes the angles in float64 and casts to float32; ids are host data, so numpy
    does it in float64 exactly as the reference does.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(ids[:, axis : axis + 1].astype(np.float64) * omega[None])
    angle = np.concatenate(angles, axis=-1)
    return mx.array(np.cos(angle).astype(np.float32)), mx.array(np.sin(angle).astype(np.float32))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x0, x1) of x [B, H, L, D] in float32 (BFL `apply_rope`)."""
    shape, dtype = x.shape, x.dtype
    x = x.astype(mx.float32).reshape(*shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = mx.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(shape).astype(dtype)


@functools.cache
def _cpu_streams() -> tuple:
    """The CPU's default stream plus one more per extra core (at most four in all)."""
    n = max(1, min(4, os.cpu_count() or 1))
    return (mx.default_stream(mx.cpu), *(mx.new_stream(mx.cpu) for _ in range(n - 1)))


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Softmax attention over [B, H, L, D] -> [B, L, H*D].

    On the CPU backend MLX's fused kernel runs at ~18 GFLOP/s against ~150 for its BLAS
    matmuls (REFERENCE.md), so there we use two matmuls and a softmax, a few heads at a time
    so the [L, L] scores stay bounded. Metal and CUDA use the fused kernel.
    """
    b, h, n, d = q.shape
    scale = d**-0.5
    if mx.default_device().type != mx.cpu:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        # ~256 MiB of fp32 scores per chunk of heads; chunks alternate between CPU streams,
        # which run on their own threads: MLX's CPU softmax (its exp) is single-threaded and
        # takes ~80% of the time at 4096 tokens, so two streams nearly halve it
        per_head = b * n * n * 4
        step = max(1, min(h, (256 << 20) // max(per_head, 1)))
        streams = _cpu_streams()
        outs = []
        for j, i in enumerate(range(0, h, step)):
            s = streams[j % len(streams)]
            qi, ki, vi = q[:, i : i + step], k[:, i : i + step], v[:, i : i + step]
            scores = mx.matmul(mx.multiply(qi, scale, stream=s), ki.swapaxes(-1, -2), stream=s)
            probs = mx.softmax(scores, axis=-1, precise=True, stream=s)
            outs.append(mx.matmul(probs, vi, stream=s))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


class RMSNorm(nn.Module):
    """RMS norm in float32 with a learned `scale` (BFL QK-norm, eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x.astype(mx.float32), self.scale.astype(mx.float32), 1e-6)
        return y.astype(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters, eps 1e-6."""
    return mx.fast.layer_norm(x, None, None, 1e-6)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """(1 + scale) * x + shift, with shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]
