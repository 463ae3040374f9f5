"""LoRAs for the transformer, as ComfyUI's LoraLoaderModelOnly applies them, on any weights.

Three layouts are read, told apart by their keys:

    kohya / ComfyUI  lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight, .lora_up..., .alpha
    diffusers / PEFT transformer.transformer_blocks.0.attn.to_q.lora_A.weight, .lora_B.weight
    BFL names        diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight, .lora_B.weight

A LoRA adds `scale * (alpha / rank) * up @ down` to a layer's weight (alpha / rank = 1 without
an `.alpha`); diffusers' separate q/k/v (and a single block's proj_mlp) land at their row
offsets in BFL's fused layers, as ComfyUI maps them. Instead of merging into the weights, each
layer keeps the LoRAs as one low-rank side path, `y = W x + B (A x)`, evaluated next to its
(possibly quantized) matmul (`kernels.Kernels.linear_rows`): exact for 8-bit weights too (a
merge would have to dequantize and requantize every layer, losing the LoRA in the rounding),
and cheap: a rank-r path costs r * (in + out) per token against in * out for the layer.

Each file is read once (`read_loras`, when a job is prepared: host memory only, matched
against the layer shapes the model folder records) and attached to the loaded transformer in
its modulation stage (`LoraSet.attach`).
"""

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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

    def record(self) -> dict:
        """What the PNG and the report say of it."""
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale,
                "layers": self.layers, "not_applied": self.skipped,
                "unmatched": self.unmatched}  # fmt: skip


@dataclass(frozen=True)
class LowRank:
    """A layer's LoRA side path: y += (x @ down.T) @ up.T (`kernels.Kernels.linear_rows`)."""

    down: mx.array  # [rank, in]
    up: mx.array  # [out, rank], scaled


@dataclass
class LoraSet:
    """Every LoRA of a job, read and matched: per layer, the pieces (down, up) in host memory."""

    reports: list[LoraReport] = field(default_factory=list)
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def attach(self, model: nn.Module) -> None:
        """Give `model`'s layers their side paths (`layer.lora`), the LoRAs summed."""
        layers = dict(model.named_modules())
        for path, parts in self.pieces.items():
            down = mx.concatenate([mx.array(d) for d, _ in parts], axis=0)  # [rank_total, in]
            up = mx.concatenate([mx.array(u) for _, u in parts], axis=1)  # [out, rank_total]
            mx.eval(down, up)
            layers[path].lora = LowRank(down, up)


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


def layer_shapes(entry: dict, bits: int | None) -> dict[str, tuple[int, int]]:
    """Linear layer path -> (outputs, inputs), from a model folder's component entry (every
    2-D `.weight` of the transformer is a Linear layer's; quantized ones hold `bits`-bit codes
    packed in uint32)."""
    tensors = entry["tensors"]
    out = {}
    for key, t in tensors.items():
        if key.endswith(".weight") and len(t["shape"]) == 2:
            path = key[: -len(".weight")]
            rows, cols = t["shape"]
            if f"{path}.scales" in tensors:
                cols = cols * 32 // bits
            out[path] = (rows, cols)
    return out


def _swap_halves(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=0)
    return np.concatenate([b, a], axis=0)


def _target(base: str, layers: dict, kohya: dict, hidden: int):
    """(BFL layer path, row offset, row transform) for a LoRA's base name, or None."""
    from .convert.keymaps import diffusers_transformer, swap_halves

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
                swap = _swap_halves if t.fn is swap_halves else None
                return t.key[:-7], t.part * hidden, swap
    return None


def read_loras(loras, layers: dict[str, tuple[int, int]], hidden: int) -> LoraSet:
    """Read every LoRA of `loras` [(path, scale), ...] once and match it to `layers` (path ->
    (outputs, inputs), `layer_shapes`); LoraError for a file that is unreadable, has wrong
    shapes, or matches no layer."""
    kohya = {p.replace(".", "_"): p for p in layers}
    out = LoraSet()
    for path, scale in loras:
        path = Path(path).expanduser()
        report, pieces = _read(path, float(scale), layers, kohya, hidden)
        for layer_path, down, up in pieces:
            out.pieces.setdefault(layer_path, []).append((down, up))
        out.reports.append(report)
    return out


def _read(path: Path, scale: float, layers: dict, kohya: dict, hidden: int):
    if not path.is_file():
        raise LoraError(f"{path}: no such file")
    try:  # read once: hashed, and every tensor taken from these bytes
        data = path.read_bytes()
        file = SafetensorsFile(path, data)
        tensors = {key: file.read_float32(key) for key in list(file.tensors)}
    except SafetensorsError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise LoraError(f"{path}: not a safetensors LoRA file ({reason})") from None
    except OSError as e:
        raise LoraError(f"{path}: cannot be read ({e.strerror or e})") from None
    bad = next((k for k, v in tensors.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise LoraError(f"{path}: {bad} holds NaN or infinite values")
    _refuse_widening(path, tensors, layers)
    report = LoraReport(path.name, hashlib.sha256(data).hexdigest(), scale)
    groups: dict[str, dict[str, np.ndarray]] = {}
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
        down, up = g["down"], g["up"]
        out_rows, in_cols = layers[layer_path]
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
        with np.errstate(over="ignore", invalid="ignore"):
            up = up * np.float32(scale * alpha / rank)
        if not np.isfinite(up).all():
            raise LoraError(f"{path}: {base}: scale {scale:g} x alpha {alpha:g} overflows")
        if swap is not None:
            up = swap(up)
        if up.shape[0] != out_rows:  # one part of a fused layer: zero rows elsewhere
            up = np.pad(up, [(offset, out_rows - offset - up.shape[0]), (0, 0)])
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
    if "img_in" not in layers:
        return
    width = layers["img_in"][1]
    for key, value in tensors.items():
        up = re.search(r"(lora_B|lora_up|lora\.up)\.weight$", key)
        if _INPUT_LAYER.search(key) and value.ndim == 2 and not up and value.shape[1] > width:
            raise LoraError(
                f"{path}: {key} takes {value.shape[1]} input channels and this model's input "
                f"projection {width}: a FLUX.1 Canny/Depth LoRA widens it, which mlxflux does not "
                "do; convert the full FLUX.1 Canny or Depth dev model (mlxflux convert "
                "--variant canny/depth) and use it instead"
            )
