"""Redux's image encoder (`mlxflux convert --redux FILE --siglip FILE`): SigLIP so400m's vision
tower and FLUX.1 Redux's projection, into a model folder's optional `redux` component.

    Redux     ComfyUI's models/style_models/flux1-redux-dev.safetensors, or the repo
              black-forest-labs/FLUX.1-Redux-dev (image_embedder/): redux_up.*, redux_down.*
    SigLIP    ComfyUI's models/clip_vision/sigclip_vision_patch14_384.safetensors, the repo
              google/siglip-so400m-patch14-384 (its text tower is left out), or the Redux
              repo's image_encoder/: vision_model.* (its attention-pooling head is unused)

The two are checked against each other (Redux reads SigLIP's width) and against the encoder's
shapes before anything is written. SigLIP's and Redux's Linear layers are quantized like the
transformer's where their width allows (`model_folder.should_quantize`).
"""

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxflux.errors import MlxfluxError
from mlxflux.model_folder import file_sha256
from mlxflux.models.redux import ReduxConfig
from mlxflux.models.registry import build_model, check_weights

from .component import add_component
from .errors import ConvertError
from .hub import locate

REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"
SIGLIP_REPO = "google/siglip-so400m-patch14-384"
REDUX_FILES = ("flux1-redux-dev.safetensors", "image_embedder/diffusion_pytorch_model.safetensors",
               "style_models/flux1-redux-dev.safetensors")  # fmt: skip
SIGLIP_FILES = ("sigclip_vision_patch14_384.safetensors", "image_encoder/model.safetensors",
                "clip_vision/sigclip_vision_patch14_384.safetensors",
                "model.safetensors")  # fmt: skip
HEAD_DIM = 72  # so400m's: 1152 wide, 16 heads (ComfyUI's clip_vision_siglip_384.json)


def find_redux(sources) -> tuple[Path, Path] | None:
    """Redux and SigLIP's files among the `--from` folders (ComfyUI's models/ layout), if
    both are there."""
    for source in sources:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            continue
        redux = folder / "style_models" / "flux1-redux-dev.safetensors"
        siglip = folder / "clip_vision" / "sigclip_vision_patch14_384.safetensors"
        if redux.is_file() and siglip.is_file():
            return redux, siglip
    return None


def _load(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None


def read_redux(redux_source, siglip_source, log=print) -> tuple[dict, dict, list[dict]]:
    """(config, weights named as `models.redux.ReduxEncoder`'s, float32 in MLX's layout, the
    two files' source records); ConvertError in one line naming the file at fault."""
    if siglip_source is None:
        raise ConvertError("--redux: Redux needs SigLIP's vision tower too: give --siglip "
                           "(ComfyUI's clip_vision/sigclip_vision_patch14_384.safetensors, or "
                           f"{SIGLIP_REPO})")  # fmt: skip
    if redux_source is None:
        raise ConvertError("--siglip: give --redux too (flux1-redux-dev.safetensors, or "
                           f"{REDUX_REPO}): SigLIP alone conditions nothing")  # fmt: skip
    redux_path = locate(redux_source, REDUX_FILES, "Redux", log)
    siglip_path = locate(siglip_source, SIGLIP_FILES, "SigLIP", log)
    raw = _load(redux_path)
    if set(raw) != {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}:
        listed = ", ".join(sorted(raw)[:4])
        raise ConvertError(f"{redux_path}: not a FLUX.1 Redux file (its keys: {listed}...)")
    weights = {k: v.astype(mx.float32) for k, v in raw.items()}
    vision = {k: v for k, v in _load(siglip_path).items()
              if k.startswith("vision_model.")
              and not k.startswith("vision_model.head.")}  # fmt: skip
    if "vision_model.embeddings.patch_embedding.weight" not in vision:
        raise ConvertError(f"{siglip_path}: not a SigLIP vision tower (no "
                           "vision_model.embeddings.patch_embedding.weight)")  # fmt: skip
    for key, value in vision.items():
        value = value.astype(mx.float32)
        if value.ndim == 4:  # PyTorch's [out, in, kh, kw] -> MLX's [out, kh, kw, in]
            value = value.transpose(0, 2, 3, 1)
        weights[key] = value
    config = _config(weights, siglip_path)
    width = weights["redux_up.weight"].shape[1]
    if width != config.hidden_size:
        raise ConvertError(f"{redux_path}: Redux reads {width}-wide SigLIP features; "
                           f"{siglip_path.name} gives {config.hidden_size}")  # fmt: skip
    expected = dict(tree_flatten(build_model("redux", config.to_dict()).parameters()))
    try:
        check_weights(expected, weights, f"{redux_path.name} + {siglip_path.name}")
    except MlxfluxError as e:
        raise ConvertError(f"not FLUX.1 Redux with SigLIP: {e}") from None
    bad = sorted(k for k, v in weights.items() if not mx.isfinite(v).all().item())
    if bad:
        raise ConvertError(f"non-finite values in {', '.join(bad[:3])}")
    records = [_record(redux_path, "style_model"), _record(siglip_path, "clip_vision")]
    return config.to_dict(), weights, records


def _config(weights: dict, siglip_path: Path) -> ReduxConfig:
    """SigLIP's config from its config.json beside the file (diffusers, the google repo) or
    from the shapes (ComfyUI's single file: heads of 72, as so400m's)."""
    patch = weights["vision_model.embeddings.patch_embedding.weight"]
    hidden, size = patch.shape[0], patch.shape[1]
    layers = len({k.split(".")[3] for k in weights if k.startswith("vision_model.encoder.layers.")})
    tokens = weights["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(tokens)
    found = {}
    config_file = siglip_path.parent / "config.json"
    if config_file.is_file():
        try:
            data = json.loads(config_file.read_text())
            found = data.get("vision_config", data)
        except (ValueError, AttributeError):
            found = {}
    heads = found.get("num_attention_heads") or max(1, hidden // HEAD_DIM)
    try:
        return ReduxConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_channels=np.shape(patch)[-1], patch_size=size, image_size=side * size,
            layer_norm_eps=found.get("layer_norm_eps", 1e-6),
            context_dim=weights["redux_down.weight"].shape[0],
            redux_dim=weights["redux_up.weight"].shape[0],
        )  # fmt: skip
    except (KeyError, ValueError) as e:
        raise ConvertError(f"{siglip_path}: not a SigLIP vision tower ({e})") from None


def _record(path: Path, loader: str) -> dict:
    """What the manifest records of a file (`layout` says which ComfyUI loader takes it)."""
    return {"component": "redux", "layout": loader, "name": path.name,
            "size": path.stat().st_size, "sha256": file_sha256(path)}  # fmt: skip


def add_redux(folder: str | os.PathLike, redux, siglip, log=print) -> Path:
    """Add (or replace) the Redux encoder in an existing model folder, atomically
    (`convert.component.add_component`)."""
    config, weights, records = read_redux(redux, siglip, log)
    add_component(folder, "redux", config, weights, records, log)
    log(f"added Redux's image encoder ({records[0]['name']} + {records[1]['name']}) to {folder}")
    return Path(folder).expanduser()
