"""Affine group quantization of Linear layers.

The quantized layers run through their model's kernels (`mlxflux.kernels.Kernels.linear`),
which pick the fast path of the backend: `mx.quantized_matmul` on Metal, or on the CPU each
layer dequantized at use, one layer at a time (the dequantized copy lives only for that
layer's matmuls, never for the whole model).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .kernels import Kernels
from .models.layers import UsesKernels

GROUP_SIZE = 64
BITS = (4, 6, 8)  # what mlxflux writes and reads (the converter, the folder check, the loop)
GROUP_SIZES = (32, 64, 128)  # MLX's affine group sizes a folder may hold


class QuantizedLinear(nn.QuantizedLinear, UsesKernels):
    """MLX's QuantizedLinear, run through its model's kernels; `lora` as `layers.Linear`'s."""

    lora = None

    def __call__(self, x: mx.array) -> mx.array:
        return self.kernels.linear(self, x)


def quantizable(module: nn.Module, group_size: int = GROUP_SIZE) -> bool:
    """Linear layers whose input width is a multiple of the group size; the rest stay 16-bit."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize(model: nn.Module, bits: int, kernels: Kernels, group_size: int = GROUP_SIZE,
             predicate=None) -> None:  # fmt: skip
    """Replace quantizable Linear layers of `model` in place with `QuantizedLinear` layers that
    run through `kernels` (lazily: nothing is evaluated)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")

    def swap(path: str, module: nn.Module) -> nn.Module:
        if not quantizable(module, group_size) or (predicate and not predicate(path, module)):
            return module
        layer = QuantizedLinear.from_linear(module, group_size, bits)
        layer.kernels = kernels
        return layer

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
