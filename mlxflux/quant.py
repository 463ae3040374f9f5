"""Affine group quantization of Linear layers, with a fast path per backend.

On Metal (and CUDA) `mx.quantized_matmul` is the fast path. On the CPU backend it runs ~50x
slower than dequantizing the layer's weight and using the BLAS matmul (REFERENCE.md), so there
each layer is dequantized at use, one layer at a time: the dequantized copy lives only for that
matmul, never for the whole model.
"""

import mlx.core as mx
import mlx.nn as nn

GROUP_SIZE = 64
BITS = (4, 6, 8)


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


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device().type != mx.cpu:
            return super().__call__(x)
        w = dequantize(self.weight, self.scales, self["biases"], self.group_size, self.bits)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


def quantizable(module: nn.Module, group_size: int = GROUP_SIZE) -> bool:
    """Linear layers whose input width is a multiple of the group size; the rest stay 16-bit."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize(model: nn.Module, bits: int, group_size: int = GROUP_SIZE, predicate=None) -> None:
    """Replace quantizable Linear layers of `model` in place (lazily: nothing is evaluated)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")

    def pick(path: str, module: nn.Module) -> bool:
        return quantizable(module, group_size) and (predicate is None or predicate(path, module))

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pick)
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
