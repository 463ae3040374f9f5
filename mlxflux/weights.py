"""Strict weight loading shared by the runtime and the converter.

Every parameter of the module must be given, nothing extra may be, and every shape must match;
errors name the key and where the weights came from.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class WeightError(ValueError):
    """Weights that do not fit the model: names the source and the offending keys."""


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights(module: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Raise WeightError unless `weights` holds exactly the module's parameters, shape for shape."""
    expected = dict(tree_flatten(module.parameters()))
    missing = expected.keys() - weights.keys()
    extra = weights.keys() - expected.keys()
    if missing:
        raise WeightError(f"{source}: missing tensors: {_listing(missing)}")
    if extra:
        raise WeightError(f"{source}: unexpected tensors: {_listing(extra)}")
    for key, param in expected.items():
        if tuple(weights[key].shape) != tuple(param.shape):
            raise WeightError(
                f"{source}: tensor {key} has shape {tuple(weights[key].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )


def load_strict(module: nn.Module, weights: dict[str, mx.array], source: str) -> nn.Module:
    """Check `weights` against `module` and load them (lazily: arrays stay unevaluated)."""
    check_weights(module, weights, source)
    module.load_weights(list(weights.items()), strict=True)
    return module
