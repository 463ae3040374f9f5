"""LoRAs for the transformer, as ComfyUI's LoraLoaderModelOnly applies them, on any weights.

Three layouts are read, told apart by their keys:

    kohya / ComfyUI  lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight, .lora_up..., .alpha
    diffusers / PEFT transformer.transformer_blocks.0.attn.to_q.lora_A.weight, .lora_B.weight
    BFL names        diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight, .lora_B.weight

A LoRA adds `scale * (alpha / rank) * up @ down` to a layer's weight (alpha / rank = 1 without
an `.alpha`); diffusers' separate q/k/v (and a single block's proj_mlp) land at their row
offsets in BFL's fused layers, as ComfyUI maps them. Instead of merging into the weights, each
layer keeps the LoRAs as one low-rank side path, `y = W x + B (A x)`, evaluated next to its
(possibly quantized) matmul (`kernels.linear_rows`): exact for 8-bit weights too (a merge would
have to dequantize and requantize every layer, losing the LoRA in the rounding), and cheap: a
rank-r path costs r * (in + out) per token against in * out for the layer.
"""

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxfluxError
from .safetensors_io import SafetensorsError, SafetensorsFile


class LoraError(MlxfluxError, ValueError):
    """A LoRA file that cannot be applied; the message names the file and the problem."""


@dataclass
class LoraReport:
    """What one file did: the layers it changed, the keys it could not place."""

    file: str
    sha256: str
    scale: float
    layers: int = 0
    skipped: list[str] = field(default_factory=list)  # text-encoder LoRAs: not applied
    unmatched: list[str] = field(default_factory=list)  # keys that name no layer


_SUFFIXES = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
}
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder|lora_te_text_model)")


def _split(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind
    return None


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and path
    }


def _target(base: str, layers: dict, kohya: dict, hidden: int):
    """(BFL layer path, row offset, row transform) for a LoRA's base name, or None."""
    from .convert.keymaps import diffusers_transformer

    if base.startswith("lora_unet_"):
        path = kohya.get(base[len("lora_unet_") :])
        return (path, 0, None) if path else None
    for prefix in ("diffusion_model.", "model.diffusion_model.", "base_model.model.", ""):
        if base.startswith(prefix) and base[len(prefix) :] in layers:
            return base[len(prefix) :], 0, None
    for prefix in ("transformer.", "base_model.model.", ""):
        if base.startswith(prefix):
            t = diffusers_transformer(base[len(prefix) :] + ".weight")
            if t is not None and t.key.endswith(".weight") and t.key[:-7] in layers:
                # fused parts: q, k, v (hidden rows each), then a single block's MLP input
                swap = t.fn if t.fn.__name__ == "swap_halves" else None
                return t.key[:-7], t.part * hidden, swap
    return None


def load_loras(model: nn.Module, loras, hidden: int) -> list[LoraReport]:
    """Attach every LoRA of `loras` [(path, scale), ...] to `model`'s Linear layers as side
    paths; LoraError for a file that is unreadable, has wrong shapes, or matches no layer."""
    layers = _layers(model)
    kohya = {p.replace(".", "_"): p for p in layers}
    sides: dict[str, list[tuple[mx.array, mx.array]]] = {}
    reports = []
    for path, scale in loras:
        path = Path(path).expanduser()
        report, pieces = _read(path, float(scale), layers, kohya, hidden)
        for layer_path, down, up in pieces:
            sides.setdefault(layer_path, []).append((down, up))
        reports.append(report)
    for layer_path, parts in sides.items():
        down = mx.concatenate([d for d, _ in parts], axis=0)  # [rank_total, in]
        up = mx.concatenate([u for _, u in parts], axis=1)  # [out, rank_total], scaled
        mx.eval(down, up)
        object.__setattr__(layers[layer_path], "lora", (down, up))  # not a parameter
    return reports


def _read(path: Path, scale: float, layers: dict, kohya: dict, hidden: int):
    if not path.is_file():
        raise LoraError(f"{path}: no such file")
    try:  # our reader validates the whole header and reads every tensor now, not lazily
        data = path.read_bytes()
        file = SafetensorsFile(path)
        tensors = {key: file.read(key) for key in list(file.tensors)}
    except SafetensorsError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise LoraError(f"{path}: not a safetensors LoRA file ({reason})") from None
    except OSError as e:
        raise LoraError(f"{path}: cannot be read ({e.strerror or e})") from None
    _refuse_widening(path, tensors, layers)
    report = LoraReport(path.name, hashlib.sha256(data).hexdigest(), scale)
    groups: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            report.unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    pieces = []
    for base, g in sorted(groups.items()):
        if _TEXT_ENCODER.match(base):
            report.skipped.append(base)
            continue
        target = _target(base, layers, kohya, hidden)
        if target is None or "down" not in g or "up" not in g:
            report.unmatched.append(base)
            continue
        layer_path, offset, swap = target
        down, up = g["down"].astype(mx.float32), g["up"].astype(mx.float32)
        layer = layers[layer_path]
        out_rows, in_cols = layer.weight.shape[0], _in_features(layer)
        rank = down.shape[0] if down.ndim == 2 else -1
        if (down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank or down.shape[1] != in_cols
                or rank == 0):  # fmt: skip
            raise LoraError(
                f"{path}: {base}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                f"{layer_path} ({in_cols} inputs, {out_rows} outputs)"
            )
        if offset + up.shape[0] > out_rows:
            raise LoraError(f"{path}: {base}: {up.shape[0]} rows do not fit in {layer_path}")
        if "alpha" in g and g["alpha"].size != 1:
            raise LoraError(f"{path}: {base}: alpha has shape {tuple(g['alpha'].shape)}, not 1")
        alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)
        up = up * (scale * alpha / rank)
        if swap is not None:
            up = swap(up)
        if up.shape[0] != out_rows:  # one part of a fused layer: zero rows elsewhere
            up = mx.pad(up, [(offset, out_rows - offset - up.shape[0]), (0, 0)])
        pieces.append((layer_path, down, up))
    report.layers = len({p for p, _, _ in pieces})
    if not pieces:
        raise LoraError(
            f"{path}: matches no layer of this FLUX transformer (keys like "
            f"{next(iter(groups), next(iter(tensors), '?'))!r}); applied to 0 layers"
        )
    return report, pieces


# BFL's flux1-canny-dev-lora / flux1-depth-dev-lora carry a wider input projection (128 inputs:
# the latent and the control image's latent) that diffusers' and ComfyUI's loaders swap in
_INPUT_LAYER = re.compile(r"(^|[._])(img_in|x_embedder)[._]")


def _refuse_widening(path: Path, tensors: dict, layers: dict) -> None:
    """A LoRA whose input-projection tensors take more inputs than the model's is refused in one
    line (it would need the layer widened, which mlxflux does not do), never ignored."""
    img_in = layers.get("img_in")
    if img_in is None:
        return
    width = _in_features(img_in)
    for key, value in tensors.items():
        up = re.search(r"(lora_B|lora_up|lora\.up)\.weight$", key)
        if _INPUT_LAYER.search(key) and value.ndim == 2 and not up and value.shape[1] > width:
            raise LoraError(
                f"{path}: {key} takes {value.shape[1]} input channels and this model's input "
                f"projection {width}: a FLUX.1 Canny/Depth LoRA widens it, which mlxflux does not "
                "do; convert the full FLUX.1 Canny or Depth dev model (mlxflux convert "
                "--variant canny/depth) and use it instead"
            )


def _in_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]
