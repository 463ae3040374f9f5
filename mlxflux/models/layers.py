"""Building blocks shared by the Flux transformer: embeddings, RoPE, linear layers, norms.

Layers that run through a model's kernels (`mlxflux.kernels.Kernels`: the backend's code
path, chosen once at load) inherit `UsesKernels`; the model hands them its kernels once it is
built (`hand_kernels`)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..kernels import Kernels


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


class UsesKernels:
    """A layer that runs through its model's kernels (None until `hand_kernels`)."""

    kernels: Kernels | None = None


def hand_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Give every layer of `model` that uses kernels these ones."""
    for _, module in model.named_modules():
        if isinstance(module, UsesKernels):
            module.kernels = kernels


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x0, x1) of x [B, H, L, D] in float32 (BFL `apply_rope`)."""
    shape, dtype = x.shape, x.dtype
    x = x.astype(mx.float32).reshape(*shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = mx.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(shape).astype(dtype)


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x) for a text encoder's nn.Linear or (kernel-run, `mlxflux.quant`) QuantizedLinear,
    with the side path of the LoRAs attached to it (`layer.lora`,
    `mlxflux.lora_adapters.SidePath`) when there is one."""
    y = layer(x)
    side = getattr(layer, "lora", None)
    if side is None or isinstance(layer, UsesKernels):  # the kernels add it themselves
        return y
    return side.apply(layer, x, y, 0, y.shape[-1])


class Linear(nn.Linear, UsesKernels):
    """nn.Linear run through its model's kernels, in the input's dtype. `lora`: a LoRA's
    side path (`mlxflux.lora_adapters.SidePath`) that the kernels add, or None."""

    lora = None

    def __call__(self, x: mx.array) -> mx.array:
        return self.kernels.linear(self, x)


TOKEN_CHUNK = 1024  # tokens per chunk for the MLPs: [1024, 12288] fp32 is 48 MiB


def map_tokens(fn, *xs: mx.array, chunk: int = TOKEN_CHUNK) -> mx.array:
    """fn(*xs) computed on chunks of `chunk` tokens (axis 1) and concatenated.

    The MLPs' hidden activations are 4x (single blocks: 5x) wider than the residual stream: at
    the DVD size, 4464 tokens, computing them whole adds ~1 GiB in float32.
    """
    n = xs[0].shape[1]
    if n <= chunk:
        return fn(*xs)
    return mx.concatenate([fn(*(x[:, i : i + chunk] for x in xs)) for i in range(0, n, chunk)], 1)


class RMSNorm(nn.Module, UsesKernels):
    """RMS norm in float32 with a learned `scale` (BFL QK-norm, eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.kernels.elementwise(rms_norm, x, self.scale)


def rms_norm(x: mx.array, scale: mx.array) -> mx.array:
    y = mx.fast.rms_norm(x.astype(mx.float32), scale.astype(mx.float32), 1e-6)
    return y.astype(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters, eps 1e-6."""
    return mx.fast.layer_norm(x, None, None, 1e-6)


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array, dtype=None) -> mx.array:
    """adaLN: (1 + scale) * layer_norm(x) + shift, in x's dtype, cast to `dtype` (the next
    matmul's input)."""
    y = modulate(layer_norm(x), shift, scale)
    return y if dtype is None else y.astype(dtype)


def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The residual update x + gate * y, with gate [B, D] broadcast over tokens."""
    return x + gate[:, None] * y


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """(1 + scale) * x + shift, with shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]
