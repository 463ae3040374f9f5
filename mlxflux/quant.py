"""Affine group quantization of Linear layers.

The quantized layers run through `mlxflux.kernels.linear`, which picks the fast path of the
backend: `mx.quantized_matmul` on Metal, or on the CPU each layer dequantized at use, one layer
at a time (the dequantized copy lives only for that layer's matmuls, never for the whole model).
"""

import mlx.core as mx
import mlx.nn as nn

from . import kernels

GROUP_SIZE = 64
BITS = (4, 6, 8)


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's QuantizedLinear, run through this backend's kernel (`mlxflux.kernels.linear`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(self, x)


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
