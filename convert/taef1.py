"""The preview decoder (`mlxflux convert --taef1`): madebyollin's TAEF1 decoder, from any of the
files it ships as, into a model folder's optional `taef1` component.

    ComfyUI     models/vae_approx/taef1_decoder.pth or .safetensors: keys `<i>.*`, where
                `<i>` indexes ComfyUI's `Decoder` sequence (0 is the clamp)
    diffusers   the repo madebyollin/taef1 (`AutoencoderTiny`): `decoder.layers.<i - 1>.*`,
                the encoder's keys ignored
    full TAESD  `decoder.<i>.*` or `taesd_decoder.<i>.*` beside the encoder's

`.pth` files are read by `pth_io`, which never runs their pickle. Convolutions are turned from
PyTorch's [out, in, kh, kw] to MLX's [out, kh, kw, in]; the weights are checked against the
decoder's shapes and for finite values here, so a bad file is refused before anything is
written, never in the middle of a run. The decoder is tiny (1.2 M parameters) and kept in
float32, in which previews run.
"""

import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxflux.errors import MlxfluxError
from mlxflux.model_folder import file_sha256
from mlxflux.models.registry import build_model, check_weights
from mlxflux.models.taef1 import TAEF1Config

from . import hub
from .component import add_component
from .errors import ConvertError
from .pth_io import read_pth

DIFFUSERS_REPO = "madebyollin/taef1"
# what a folder may hold, in the order looked for (a ComfyUI models/ folder: under vae_approx/)
FILES = ("taef1_decoder.safetensors", "taef1_decoder.pth", "diffusion_pytorch_model.safetensors")
_LAYER = re.compile(r"^(?:taesd_decoder\.|decoder\.)?(layers\.)?(\d+)\.(.+)$")


def locate(source: str | os.PathLike, log=print) -> Path:
    """The decoder's file: `source` itself, the file in a folder (ComfyUI's models/ or
    vae_approx/, a diffusers download), or downloaded when `source` is a repo id."""
    names = (*FILES, *(f"vae_approx/{n}" for n in FILES))
    return hub.locate(source, names, "TAEF1 decoder", log)


def find_taef1(sources) -> Path | None:
    """ComfyUI's preview decoder among the `--from` folders (models/vae_approx/), if any."""
    for source in sources:
        folder = Path(source).expanduser()
        for where in (folder / "vae_approx", folder):
            for name in FILES[:2]:
                if folder.is_dir() and (where / name).is_file():
                    return where / name
    return None


def _tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".pth":
        return read_pth(path)
    try:
        return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}
    except (RuntimeError, ValueError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None


def read_taef1(path: Path) -> tuple[dict, dict[str, mx.array]]:
    """(config, weights named as `models.taef1.TAEF1Decoder`'s, float32 in MLX's layout) from
    one of the layouts above; ConvertError naming the file unless it is a TAEF1 decoder."""
    try:
        raw = _tensors(path)
    except MlxfluxError as e:
        raise ConvertError(str(e)) from None
    diffusers = any(k.startswith("decoder.layers.") for k in raw)
    weights = {}
    for key, value in raw.items():
        if key.startswith(("encoder.", "taesd_encoder.")) or key in ("vae_scale", "vae_shift"):
            continue
        m = _LAYER.match(key)
        if m is None:
            raise ConvertError(f"{path}: not a TAEF1 decoder (a key {key!r})")
        index = int(m.group(2)) + (1 if diffusers else 0)
        if value.ndim == 4:  # PyTorch's [out, in, kh, kw] -> MLX's [out, kh, kw, in]
            value = value.transpose(0, 2, 3, 1)
        weights[f"layers.{index}.{m.group(3)}"] = mx.array(value.astype(np.float32))
    first = weights.get("layers.1.weight")
    channels = first.shape[-1] if first is not None and first.ndim == 4 else None
    if channels is not None and channels != 16:
        raise ConvertError(
            f"{path}: a tiny decoder for {channels}-channel latents (TAESD for SD 1.x/SDXL/SD3); "
            "FLUX needs TAEF1's 16 (taef1_decoder from madebyollin/taesd, or madebyollin/taef1)"
        )
    config = TAEF1Config().to_dict()
    expected = dict(tree_flatten(build_model("taef1", config).parameters()))
    try:
        check_weights(expected, weights, str(path))
    except MlxfluxError as e:
        raise ConvertError(f"not a TAEF1 decoder: {e}") from None
    bad = sorted(k for k, v in weights.items() if not mx.isfinite(v).all().item())
    if bad:
        raise ConvertError(f"{path}: non-finite values in {', '.join(bad)}")
    return config, weights


def source_record(path: Path) -> dict:
    """What the manifest records of the file the decoder came from."""
    layout = "comfyui" if path.name.startswith("taef1_decoder") else "diffusers"
    return {"component": "taef1", "layout": layout, "name": path.name,
            "size": path.stat().st_size, "sha256": file_sha256(path)}  # fmt: skip


def add_taef1(folder: str | os.PathLike, source, log=print) -> Path:
    """Add (or replace) the preview decoder in an existing model folder (`add_component`)."""
    path = locate(source, log)
    config, weights = read_taef1(path)
    add_component(folder, "taef1", config, weights, [source_record(path)], log, quantize=False)
    log(f"added the preview decoder (taef1, {path.name}) to {folder}")
    return Path(folder).expanduser()
