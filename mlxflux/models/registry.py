"""The four components of a FLUX model folder: their config and module classes, and how a
folder's component becomes a module: built, quantized where the folder holds `scales`, its
weights attached lazily (read from disk when evaluated) and strictly (every parameter given,
nothing extra, every shape matching; errors name the key and the file)."""

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelFolderError, WeightError, listing
from ..kernels import Kernels, choose
from ..quant import quantize
from .autoencoder import AutoEncoder, AutoencoderConfig
from .clip import CLIPConfig, CLIPTextModel
from .redux import ReduxConfig, ReduxEncoder
from .t5 import T5Config, T5Encoder
from .taef1 import TAEF1Config, TAEF1Decoder
from .transformer import FluxConfig, FluxTransformer, is_modulation_key

COMPONENTS = ("transformer", "t5", "clip", "vae")  # every model folder has them
# added when asked for: the preview decoder (`convert --taef1`), Redux's image encoder
# (`convert --redux --siglip`: SigLIP's vision tower and Redux's projection)
OPTIONAL = ("taef1", "redux")
# name -> (config class, module class); the transformer's module takes the kernels
CLASSES = {
    "transformer": (FluxConfig, FluxTransformer),
    "vae": (AutoencoderConfig, AutoEncoder),
    "t5": (T5Config, T5Encoder),
    "clip": (CLIPConfig, CLIPTextModel),
    "taef1": (TAEF1Config, TAEF1Decoder),
    "redux": (ReduxConfig, ReduxEncoder),
}


def components_of(manifest: dict) -> list[str]:
    """The components a folder holds: the four, then the optional ones it has."""
    return [*COMPONENTS, *(c for c in OPTIONAL if c in manifest["components"])]


def check_weights(expected: dict[str, mx.array], weights: dict[str, mx.array], source: str) -> None:
    """Raise WeightError unless `weights` holds exactly the `expected` keys, shape for shape."""
    missing = expected.keys() - weights.keys()
    extra = weights.keys() - expected.keys()
    if missing:
        raise WeightError(f"{source}: missing tensors: {listing(missing)}")
    if extra:
        raise WeightError(f"{source}: unexpected tensors: {listing(extra)}")
    for key, param in expected.items():
        if tuple(weights[key].shape) != tuple(param.shape):
            raise WeightError(
                f"{source}: tensor {key} has shape {tuple(weights[key].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )


def build_model(name: str, config: dict, kernels: Kernels | None = None) -> nn.Module:
    """An un-loaded module (lazy random parameters, nothing allocated) for a component."""
    config_class, module_class = CLASSES[name]
    if name in ("transformer", "taef1"):  # the modules whose layers run through the kernels
        return module_class(config_class.from_dict(config), kernels)
    return module_class(config_class.from_dict(config))


def quantize_like(model: nn.Module, tensors, quantization: dict, kernels: Kernels) -> None:
    """Give `model` quantized layers exactly where the folder holds `<layer>.scales`."""
    if not any(k.endswith(".scales") for k in tensors):
        return
    quantize(model, quantization["bits"], kernels, group_size=quantization["group_size"],
             predicate=lambda path, _: f"{path}.scales" in tensors)  # fmt: skip


def build_component(name: str, manifest: dict, kernels: Kernels | None = None) -> nn.Module:
    """A folder's component as built and quantized, with no weights attached (nothing read).
    `kernels`: the backend's code path its layers run (default: `kernels.choose()`)."""
    kernels = kernels or choose()
    entry = manifest["components"][name]
    model = build_model(name, entry["config"], kernels)
    quantize_like(model, entry["tensors"], manifest["quantization"], kernels)
    return model


def load_component(folder: str | os.PathLike, name: str, manifest: dict, group: str | None = None,
                   kernels: Kernels | None = None) -> nn.Module:  # fmt: skip
    """Build a component and attach its weights lazily (read from disk when evaluated).

    `group` limits loading to one file group of the component (the transformer's `modulation`
    or `trunk`); the other parameters stay unevaluated placeholders until `load_group`.
    """
    model = build_component(name, manifest, kernels)
    return load_group(model, folder, name, manifest, group)


def load_group(
    model: nn.Module, folder: str | os.PathLike, name: str, manifest: dict, group: str | None
) -> nn.Module:
    """Attach one file group's weights (all of them for None) to `model`, strictly."""
    folder = Path(folder)
    entry = manifest["components"][name]
    groups = entry["files"]
    names = groups[group] if group else [f for files in groups.values() for f in files]
    weights: dict[str, mx.array] = {}
    for file in names:
        path = folder / name / file
        if not path.exists():
            raise ModelFolderError(f"{path}: missing (the model folder is incomplete)")
        weights.update(mx.load(str(path)))
    source = f"{folder / name}" + (f" ({group})" if group else "")
    for key, value in weights.items():
        want = entry["tensors"].get(key)
        if want is None or list(value.shape) != want["shape"] or str(value.dtype) != want["dtype"]:
            raise ModelFolderError(f"{source}: tensor {key} does not match the manifest")
    # the transformer's groups: modulation (adaLN + embedders) and trunk (everything else)
    expected = {
        k: v
        for k, v in tree_flatten(model.parameters())
        if group is None or is_modulation_key(k) == (group == "modulation")
    }
    check_weights(expected, weights, source)
    model.load_weights(list(weights.items()), strict=False)
    return model
