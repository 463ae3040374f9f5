"""The backend-specific kernels of the Flux trunk, in one place: attention and quantized matmul.

`MLXFLUX_KERNELS` picks the code path, read at each call:

    auto   (default) `fused` on Metal and CUDA, `split` on the CPU backend
    fused  MLX's fused attention and `mx.quantized_matmul`: what a GPU runs, on any device
    split  attention as two matmuls and a softmax in bounded chunks, quantized layers
           dequantized to float32 one layer at a time: what the CPU backend runs fastest

Why two paths: on the CPU backend the fused attention kernel reaches ~18 GFLOP/s against ~150
for its BLAS matmuls, and `mx.quantized_matmul` is ~50x slower than dequantizing and calling
the BLAS matmul (measured; docs/numerics.md); on a GPU the fused kernels are the fast ones.
On CUDA the quantized matmul falls back to a slower kernel when the group size is smaller than
the input width, so there, at many tokens, a layer is dequantized to the compute dtype and the
regular matmul runs (not measured on a GPU yet; Metal keeps `mx.quantized_matmul`).

The models call `attention` and `linear` and never ask which device they are on. `calls`
counts which kernel each call chose, so tests can show which path really ran.
"""

import functools
import os
from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxfluxError

MODES = ("auto", "fused", "split")
CUDA_DEQUANTIZE_TOKENS = 1024  # CUDA: dequantize + matmul from this many tokens up
SCORES_BYTES = 64 << 20  # split attention: float32 scores per chunk (heads x query rows)

calls: Counter = Counter()


class KernelModeError(MlxfluxError, ValueError):
    """MLXFLUX_KERNELS holds something other than auto, fused or split."""


def backend() -> str:
    """'cpu', 'metal' or 'cuda': where the default device's kernels run."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def mode() -> str:
    """'fused' or 'split', from MLXFLUX_KERNELS and the default device."""
    value = os.environ.get("MLXFLUX_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KernelModeError(f"MLXFLUX_KERNELS must be one of {', '.join(MODES)}, got {value!r}")
    if value == "auto":
        return "split" if backend() == "cpu" else "fused"
    return value


def default_precision() -> str:
    """float32 on the CPU backend (no fast 16-bit matmul there); bfloat16 on Metal/CUDA (fp16
    overflows in FLUX's activations without care; bf16 has fp32's range)."""
    return "float32" if backend() == "cpu" else "bfloat16"


# ---- attention ------------------------------------------------------------------------------


@functools.cache
def _cpu_streams() -> tuple:
    """The CPU's default stream plus one more per extra core (at most four in all)."""
    n = max(1, min(4, os.cpu_count() or 1))
    return (mx.default_stream(mx.cpu), *(mx.new_stream(mx.cpu) for _ in range(n - 1)))


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Softmax attention over [B, H, L, D] -> [B, L, H*D], scaled by 1/sqrt(D)."""
    b, h, n, d = q.shape
    scale = d**-0.5
    if mode() == "fused":
        calls["fused_attention"] += 1
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        calls["split_attention"] += 1
        out = _split_attention(q, k, v, scale)
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _split_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Two matmuls and a softmax, in chunks of heads and query rows with at most SCORES_BYTES
    of float32 scores each, so the [L, L] scores never exist whole. Chunks alternate between
    CPU streams, which run on their own threads: MLX's CPU softmax (its exp) is single-threaded
    and was ~80% of the time at 4096 tokens; two streams nearly halve it."""
    b, h, n, _ = q.shape
    m = k.shape[2]
    per_row = b * m * 4
    rows = max(1, min(n, SCORES_BYTES // per_row))
    rows = -(-n // -(-n // rows))  # equal chunks: 4464 rows -> 2 x 2232, not 3758 + 706
    heads = max(1, min(h, SCORES_BYTES // (per_row * rows)))
    streams = _cpu_streams()
    out_heads = []
    j = 0
    for i in range(0, h, heads):
        ki, vi = k[:, i : i + heads].swapaxes(-1, -2), v[:, i : i + heads]
        parts = []
        for r in range(0, n, rows):
            s = streams[j % len(streams)]
            j += 1
            qi = mx.multiply(q[:, i : i + heads, r : r + rows], scale, stream=s)
            probs = mx.softmax(mx.matmul(qi, ki, stream=s), axis=-1, precise=True, stream=s)
            parts.append(mx.matmul(probs, vi, stream=s))
        out_heads.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
    return out_heads[0] if len(out_heads) == 1 else mx.concatenate(out_heads, axis=1)


# ---- linear layers ---------------------------------------------------------------------------


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    """Affine dequantization to float32 with elementwise ops.

    On the CPU backend `mx.dequantize` runs ~4x slower than these vectorized ops, and rounds
    through the scales' 16-bit dtype; this computes q * scale + bias in float32.
    """
    q = w.view(mx.uint8)  # codes form a little-endian bit stream: element 0 in the low bits
    if bits == 4:
        q = mx.stack([q & 0xF, q >> 4], axis=-1)
    elif bits == 6:  # four codes in three bytes
        b = q.reshape(q.shape[0], -1, 3)
        b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
        q = mx.stack(
            [b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2], axis=-1
        )
    elif bits != 8:
        return mx.dequantize(w, scales, biases, group_size, bits, dtype=mx.float32)
    rows = q.shape[0]
    q = q.reshape(rows, -1, group_size).astype(mx.float32)
    s = scales[..., None].astype(mx.float32)
    return (q * s + biases[..., None].astype(mx.float32)).reshape(rows, -1)


def linear_rows(layer: nn.Module, start: int = 0, stop: int | None = None):
    """A function applying output rows [start, stop) of a Linear or QuantizedLinear layer.

    The weight is prepared once (dequantized once on the split path) and shared by every call
    of the returned function, so a layer applied to token chunks costs one dequantization.
    """
    stop = layer.weight.shape[0] if stop is None else stop
    base = _rows(layer, start, stop)
    side = getattr(layer, "lora", None)  # mlxflux.lora: (down [r, in], up [out, r]), summed
    if side is None:
        return base
    down, up = side[0], side[1][start:stop]

    def with_lora(x: mx.array) -> mx.array:
        return base(x) + (x @ down.astype(x.dtype).T) @ up.astype(x.dtype).T

    return with_lora


def _rows(layer: nn.Module, start: int, stop: int):
    bias = layer["bias"][start:stop] if "bias" in layer else None
    if not isinstance(layer, nn.QuantizedLinear):
        w = layer.weight[start:stop]

        def dense(x: mx.array) -> mx.array:
            y = x @ w.astype(x.dtype).T
            return y if bias is None else y + bias.astype(y.dtype)

        return dense
    gs, bits = layer.group_size, layer.bits
    w, scales, biases = (layer[n][start:stop] for n in ("weight", "scales", "biases"))
    path = mode()
    if path == "split":
        calls["dequantize_fp32"] += 1
        dense_w = dequantize(w, scales, biases, gs, bits)
    kind = backend()

    def quantized(x: mx.array) -> mx.array:
        if path == "split":
            y = x @ dense_w.astype(x.dtype).T
        elif kind == "cuda" and x.size // x.shape[-1] >= CUDA_DEQUANTIZE_TOKENS:
            calls["dequantize_matmul"] += 1
            y = x @ mx.dequantize(w, scales, biases, gs, bits, dtype=x.dtype).T
        else:
            # scales in another dtype than x would promote the whole matmul to float32
            calls["quantized_matmul"] += 1
            s, z = scales.astype(x.dtype), biases.astype(x.dtype)
            y = mx.quantized_matmul(
                x, w, scales=s, biases=z, transpose=True, group_size=gs, bits=bits
            )
        return y if bias is None else y + bias.astype(y.dtype)

    return quantized


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer(x)` through this backend's kernel."""
    return linear_rows(layer)(x)
