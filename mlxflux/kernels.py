"""The backend-specific kernels of the Flux trunk, in one place: attention, GELU and the matmuls
of (quantized) linear layers; and the 3x3 convolutions of the preview's tiny decoder.

A `Kernels` object is chosen once, when a model is loaded (`choose`, which reads
`MLXFLUX_KERNELS` once), and the model holds it; its layers call it and never ask which
device they are on:

    auto   (default) `fused` on Metal and CUDA, `split` on the CPU backend
    fused  MLX's fused attention and `mx.quantized_matmul`: what a GPU runs, on any device
    split  attention as two matmuls and a softmax in bounded chunks, quantized layers
           dequantized to float32 one layer at a time (by `mlxflux.native`'s loop where it
           builds): what the CPU backend runs fastest

Why two paths: on the CPU backend the fused attention kernel reaches ~18 GFLOP/s against ~150
for its BLAS matmuls, and `mx.quantized_matmul` is ~50x slower than dequantizing and calling
the BLAS matmul (measured; docs/numerics.md); on a GPU the fused kernels are the fast ones.
On CUDA the quantized matmul falls back to a slower kernel when the group size is smaller than
the input width, so there, at many tokens, a layer is dequantized to the compute dtype and the
regular matmul runs (not measured on a GPU yet; Metal keeps `mx.quantized_matmul`).

`Kernels.calls` counts which kernel each call chose, so tests can show which path really ran,
and `Kernels.profiling()` times each kind of kernel for `bench/speed.py --breakdown`.
"""

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from . import native
from .errors import MlxfluxError

MODES = ("auto", "fused", "split")
CUDA_DEQUANTIZE_TOKENS = 1024  # CUDA: dequantize + matmul from this many tokens up
DEQUANTIZE_BLOCK_TOKENS = 1024  # split path: up to this many tokens, dequantize in row blocks
DEQUANTIZE_BLOCK = 256  # rows per block: 256 x 3072 float32 is 3 MiB
SCORES_BYTES = 8 << 20  # split attention: float32 scores per chunk (heads x query rows): 8 MiB
# measured fastest at the book size (64 MiB: 5.5 s per attention, 16: 2.84, 8: 2.80, 1: 3.84)


class KernelModeError(MlxfluxError, ValueError):
    """MLXFLUX_KERNELS holds something other than auto, fused or split."""


def backend() -> str:
    """'cpu', 'metal' or 'cuda': where the default device's kernels run."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def choose(value: str | None = None) -> "Kernels":
    """The kernels for this device: `value` (auto, fused or split), or MLXFLUX_KERNELS's."""
    if value is None:
        value = os.environ.get("MLXFLUX_KERNELS", "auto")
    value = value.strip().lower() or "auto"
    if value not in MODES:
        raise KernelModeError(f"MLXFLUX_KERNELS must be one of {', '.join(MODES)}, got {value!r}")
    kind = backend()
    if value == "auto":
        value = "split" if kind == "cpu" else "fused"
    return Kernels(value, kind)


class Kernels:
    """One model's kernels: the code path (`mode`, fused or split) for its device (`backend`),
    and the counts of what ran (`calls`)."""

    def __init__(self, mode: str, backend: str):
        if mode not in ("fused", "split"):
            raise KernelModeError(f"kernels must be fused or split, got {mode!r}")
        self.mode, self.backend = mode, backend
        self.calls: Counter = Counter()
        self._profile: Counter | None = None  # seconds per kind while `profiling()` is on

    def __repr__(self) -> str:
        return f"Kernels({self.mode!r}, {self.backend!r})"

    @contextlib.contextmanager
    def profiling(self):
        """Time every kernel call (seconds per kind: matmul, attention, elementwise).

        Each kernel evaluates its inputs first and its output after, so the times add up to
        the kernels' own work; what the step spends elsewhere (concatenations, layout copies,
        the Euler update) is the step's time less their sum. On a GPU, evaluation that
        synchronous loses the lazy graph's batching, so a profiled GPU step is slower.
        """
        self._profile, outer = Counter(), self._profile
        try:
            yield self._profile
        finally:
            self._profile = outer

    def run(self, kind: str, fn: Callable, *args, **kwargs):
        """fn(*args): on the split path (the CPU backend) evaluated on its own, its inputs first
        and its output after; while `profiling()` is on, on any path, and its wall time is
        counted under `kind` (matmul, attention, elementwise).

        Why evaluate each kernel on the CPU: a block evaluated as one lazy graph let the
        attention chunks of the second CPU stream start beside the default stream's BLAS calls,
        and the two fought over the cores: a book-size step took 17.0-18.3 s lazily, 15.4 s
        kernel by kernel (full width, 1+1 blocks). A GPU keeps its lazy graph.
        """
        if self._profile is None and self.mode != "split":
            return fn(*args, **kwargs)
        mx.eval(*(a for a in args if isinstance(a, mx.array)))
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        mx.eval(out)
        if self._profile is not None:
            self._profile[kind] += time.perf_counter() - start
        return out

    def elementwise(self, fn: Callable, *args, **kwargs):
        return self.run("elementwise", fn, *args, **kwargs)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, bias=None) -> mx.array:
        """Softmax attention over [B, H, L, D] -> [B, L, H*D], scaled by 1/sqrt(D); `bias`
        [L, L] is added to the scores (Redux's attn_bias)."""
        return self.run("attention", self._attention, q, k, v, bias)

    def _attention(self, q: mx.array, k: mx.array, v: mx.array, bias=None) -> mx.array:
        b, h, n, d = q.shape
        scale = d**-0.5
        if self.mode == "fused":
            self.calls["fused_attention"] += 1
            mask = None if bias is None else bias.astype(q.dtype)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        else:
            self.calls["split_attention"] += 1
            out = _split_attention(q, k, v, scale, bias)
        return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)

    def gelu(self, x: mx.array) -> mx.array:
        """GELU with the tanh approximation (FLUX's MLPs): MLX's own on the fused path; on the
        split path the vectorizable rational form, its rows shared between the CPU streams (one
        thread each: a [1024, 12288] chunk took 98 ms on one, 77 ms on two with the
        concatenation)."""
        return self.run("elementwise", self._gelu, x)

    def _gelu(self, x: mx.array) -> mx.array:
        if self.mode == "fused":
            return nn.gelu_approx(x)
        self.calls["rational_gelu"] += 1
        streams = _cpu_streams()
        rows = x.shape[-2]
        if rows < 2 * len(streams):
            return _gelu_rational(x.astype(mx.float32)).astype(x.dtype)
        step = -(-rows // len(streams))
        parts = []
        for s, start in zip(streams, range(0, rows, step), strict=False):
            with mx.stream(s):
                parts.append(_gelu_rational(x[..., start : start + step, :].astype(mx.float32)))
        return mx.concatenate(parts, axis=-2).astype(x.dtype)

    def conv3x3(self, conv: nn.Conv2d, x: mx.array) -> mx.array:
        """`conv(x)` for a 3x3 convolution of stride 1 and padding 1, NHWC: MLX's on the fused
        path; on the split path nine BLAS matmuls accumulated in place (`_shifted_conv`), 2.6-2.8x
        faster than MLX's CPU convolution (64 channels at 400x272: 0.10 s against 0.27)."""
        if self.mode == "fused":
            return conv(x)
        self.calls["shifted_conv"] += 1
        return _shifted_conv(x, conv.weight, conv.get("bias"))

    def linear_rows(self, layer: nn.Module, start: int = 0, stop: int | None = None):
        """A function applying output rows [start, stop) of a Linear or QuantizedLinear layer.

        The weight is prepared once (dequantized once on the split path) and shared by every
        call of the returned function, so a layer applied to token chunks costs one
        dequantization. The LoRAs on the layer (`layer.lora`, `mlxflux.lora_adapters.SidePath`)
        run as its side path.
        """
        stop = layer.weight.shape[0] if stop is None else stop
        base = self._rows(layer, start, stop)
        side = getattr(layer, "lora", None)
        if side is None:
            return lambda x: self.run("matmul", base, x)

        def with_lora(x: mx.array) -> mx.array:
            return side.apply(layer, x, base(x), start, stop)

        return lambda x: self.run("matmul", with_lora, x)

    def linear(self, layer: nn.Module, x: mx.array) -> mx.array:
        """`layer(x)` through these kernels."""
        return self.linear_rows(layer)(x)

    def _rows(self, layer: nn.Module, start: int, stop: int):
        bias = layer["bias"][start:stop] if "bias" in layer else None
        if not isinstance(layer, nn.QuantizedLinear):
            w = layer.weight[start:stop]

            def dense(x: mx.array) -> mx.array:
                y = x @ w.astype(x.dtype).T
                return y if bias is None else y + bias.astype(y.dtype)

            return dense
        gs, bits = layer.group_size, layer.bits
        w, scales, biases = (layer[n][start:stop] for n in ("weight", "scales", "biases"))
        if self.mode == "split":
            return self._split_quantized(w, scales, biases, gs, bits, bias)
        kind, calls = self.backend, self.calls

        def quantized(x: mx.array) -> mx.array:
            if kind == "cuda" and x.size // x.shape[-1] >= CUDA_DEQUANTIZE_TOKENS:
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

    def _split_quantized(self, w, scales, biases, gs: int, bits: int, bias):
        """A quantized layer on the split path (the CPU backend): its weight made float32 for the
        BLAS matmul at each call.

        With `mlxflux.native`'s loop: the whole layer, into this thread's reused buffer, then one
        BLAS matmul (docs/numerics.md: tried and dropped, blocks of rows in cache multiplied by
        one-thread BLAS calls on every core, and filling the buffer on every core: both slower in
        a real step, where OpenBLAS's threads wait spinning between calls). Without it, MLX ops: up
        to DEQUANTIZE_BLOCK_TOKENS tokens a block of rows at a time, each block still in the cache
        when the matmul reads it (one 12288 x 3072 layer, 512 tokens: 237 ms whole, 188 blocked,
        float32 162); with more, whole, once per returned function.
        """
        calls = self.calls
        calls["dequantize_fp32"] += 1
        rows, cols = w.shape[0], w.shape[1] * 32 // bits
        if self.backend == "cpu" and native.available() and native.supports(bits, gs):
            s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
            mx.eval(w, s32, b32)
            packed, s32, b32 = native.host(w), native.host(s32), native.host(b32)

            def native_quantized(x: mx.array) -> mx.array:
                calls["dequantize_native"] += 1
                w32 = native.dequantized(packed, s32, b32, rows, cols, gs, bits)
                y = x @ w32.astype(x.dtype).T
                mx.eval(y)  # the buffer is written again at the next call
                return y if bias is None else y + bias.astype(y.dtype)

            return native_quantized
        dense_w = dequantize(w, scales, biases, gs, bits)

        def quantized(x: mx.array) -> mx.array:
            if x.size // x.shape[-1] <= DEQUANTIZE_BLOCK_TOKENS:
                calls["dequantize_blocks"] += 1
                y = mx.concatenate(
                    [x @ dequantize(w[i : i + DEQUANTIZE_BLOCK], scales[i : i + DEQUANTIZE_BLOCK],
                                    biases[i : i + DEQUANTIZE_BLOCK], gs, bits).astype(x.dtype).T
                     for i in range(0, rows, DEQUANTIZE_BLOCK)],
                    axis=-1,
                )  # fmt: skip
            else:
                y = x @ dense_w.astype(x.dtype).T
            return y if bias is None else y + bias.astype(y.dtype)

        return quantized


# ---- convolution on the CPU ------------------------------------------------------------------


def _shifted_conv(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 3x3 convolution (padding 1) as nine matmuls, without im2col's copies: with the picture
    padded and flattened to rows of W + 2 pixels, the tap (i, j) of every output is the
    contiguous run of rows starting at i * (W + 2) + j, so each tap is one BLAS call on a view,
    accumulated by `mx.addmm`. Each output row carries two pixels of padding, cut at the end.
    x [B, H, W, C], weight [O, 3, 3, C] -> [B, H, W, O]."""
    b, h, w, c = x.shape
    out_c, wide = weight.shape[0], w + 2
    outs = []
    for image in x:
        # one padding row more at the bottom: the last taps read two pixels past the picture
        flat = mx.pad(image, [(1, 2), (1, 1), (0, 0)]).reshape(-1, c)
        n = h * wide
        acc = mx.broadcast_to(bias if bias is not None else mx.zeros((out_c,), x.dtype), (n, out_c))
        for i in range(3):
            for j in range(3):
                start = i * wide + j
                acc = mx.addmm(acc, flat[start : start + n], weight[:, i, j, :].T)
        outs.append(acc.reshape(h, wide, out_c)[:, :w])
    return mx.stack(outs)


# ---- attention on the CPU --------------------------------------------------------------------


_THREAD = threading.local()


def _cpu_streams() -> tuple:
    """The CPU's default stream plus one more per extra core (at most four in all). MLX's
    streams belong to the thread that made them: each thread makes its own (the web page
    runs its jobs on a worker thread)."""
    streams = getattr(_THREAD, "cpu_streams", None)
    if streams is None:
        n = max(1, min(4, os.cpu_count() or 1))
        streams = (mx.default_stream(mx.cpu), *(mx.new_stream(mx.cpu) for _ in range(n - 1)))
        _THREAD.cpu_streams = streams
    return streams


LOG2E = 1.4426950408889634


def _split_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                     bias: mx.array | None = None) -> mx.array:  # fmt: skip
    """Attention as BLAS matmuls and a softmax written for the CPU, in chunks of heads and
    query rows with at most SCORES_BYTES of float32 scores each (the [L, L] scores never
    exist whole, and a chunk stays in the last-level cache between the passes over it).

    The softmax runs in base 2: q is scaled by log2(e)/sqrt(D) once, so the scores come out
    of the matmul as s * log2(e), and 2**(s - max) is `exp2_nonpositive`, a polynomial the
    compiler vectorizes (MLX's CPU exp is scalar, ~90 M/s: it was 80% of attention). The
    normalizer comes out of the second matmul: v gets a column of ones, so probs @ [v, 1]
    holds the row sums in its last column and the probabilities are never divided.

    Chunks go in groups, one per CPU stream, in three phases evaluated in turn: the score
    matmuls (BLAS, every core), the softmaxes (one single-threaded loop per stream, side by
    side), the value matmuls. Overlapping BLAS with the softmaxes instead oversubscribed the
    cores: a book-size attention took 2.83 s that way, 2.43 s phased. `bias` [L, L] is added
    to each chunk's scores (in base 2: times log2(e))."""
    b, h, n, d = q.shape
    m = k.shape[2]
    per_row = b * m * 4
    rows = max(1, min(n, SCORES_BYTES // per_row))
    rows = -(-n // -(-n // rows))  # equal chunks: 4464 rows -> 2 x 2232, not 3758 + 706
    heads = max(1, min(h, SCORES_BYTES // (per_row * rows)))
    streams = _cpu_streams()
    q = q * (scale * LOG2E)
    v1 = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    chunks = [(i, r) for i in range(0, h, heads) for r in range(0, n, rows)]
    out: dict[tuple[int, int], mx.array] = {}
    for g in range(0, len(chunks), len(streams)):
        group = chunks[g : g + len(streams)]
        scores = [q[:, i : i + heads, r : r + rows] @ k[:, i : i + heads].swapaxes(-1, -2)
                  for i, r in group]  # fmt: skip
        if bias is not None:
            scores = [s + bias[r : r + rows] * LOG2E
                      for s, (_, r) in zip(scores, group, strict=True)]  # fmt: skip
        mx.eval(scores)
        probs = []
        for stream, s in zip(streams, scores, strict=False):
            with mx.stream(stream):
                s = s.astype(mx.float32)
                probs.append(exp2_nonpositive(s - s.max(axis=-1, keepdims=True)))
        mx.eval(probs)
        del scores
        for (i, r), p in zip(group, probs, strict=True):
            o = p.astype(v.dtype) @ v1[:, i : i + heads]
            out[i, r] = (o[..., :d] / o[..., d:]).astype(v.dtype)
        mx.eval([out[c] for c in group])
    rows_of = [mx.concatenate([out[i, r] for r in range(0, n, rows)], axis=2)
               for i in range(0, h, heads)]  # fmt: skip
    return rows_of[0] if len(rows_of) == 1 else mx.concatenate(rows_of, axis=1)


# ---- elementwise math written for the CPU backend -------------------------------------------
# MLX's CPU transcendentals are scalar and single-threaded (exp ~90 M elements/s, tanh ~60 M;
# docs/numerics.md). Polynomials in plain arithmetic, `mx.compile`d, become one loop of C++ that
# the system compiler vectorizes (~10x faster). Without a C++ compiler MLX silently runs them
# uncompiled: the same values, slower (tests/test_kernels.py checks that the JIT really ran).


@mx.compile
def _exp2_fraction(y: mx.array) -> mx.array:
    """2**(y - n) for n = y rounded to the nearest integer (y <= 0, so truncating y - 0.5
    rounds), by Cephes' polynomial for 2**f on [-0.5, 0.5] (relative error ~2e-7)."""
    f = y - (y - 0.5).astype(mx.int32).astype(mx.float32)
    p = f * 1.535336188319500e-4 + 1.339887440266574e-3
    p = p * f + 9.618437357674640e-3
    p = p * f + 5.550332471162809e-2
    p = p * f + 2.402264791363012e-1
    p = p * f + 6.931472028550421e-1
    return p * f + 1.0


@mx.compile
def _exp2_scale(fraction_bits: mx.array, y: mx.array) -> mx.array:
    """Multiply by 2**n by adding n to the float32 exponent field (results below 2**-125,
    and -inf, become 0)."""
    n = mx.maximum((y - 0.5).astype(mx.int32), -126)
    return (fraction_bits + n * (1 << 23)) * (n > -126).astype(mx.int32)


def exp2_nonpositive(y: mx.array) -> mx.array:
    """2**y for float32 y <= 0 (softmax after the max is subtracted), vectorizable on the CPU.
    Two compiled loops, as `mx.compile` does not fuse across the bit reinterpretation."""
    fraction = _exp2_fraction(y)
    return _exp2_scale(fraction.view(mx.int32), y).view(mx.float32)


# tanh(x) = p(x) / q(x) on |x| <= 7.905 (Eigen's `ptanh_float` coefficients; float32 tanh is
# +-1 beyond): max error 1.4e-6 in GELU against nn.gelu_approx
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)  # fmt: skip
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)  # fmt: skip


@mx.compile
def _gelu_rational(x: mx.array) -> mx.array:
    u = mx.clip(
        0.7978845608028654 * (x + 0.044715 * x * x * x), -7.90531110763549805, 7.90531110763549805
    )
    u2 = u * u
    p = u2 * _TANH_P[0] + _TANH_P[1]
    for c in _TANH_P[2:]:
        p = p * u2 + c
    q = u2 * _TANH_Q[0] + _TANH_Q[1]
    for c in _TANH_Q[2:]:
        q = q * u2 + c
    return 0.5 * x * (1.0 + u * p / q)


# ---- dequantization --------------------------------------------------------------------------


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
