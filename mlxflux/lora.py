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
from .lora_adapters import NOT_APPLIED, AdapterError, Dora, SidePath, Term, kind_of, read_term
from .lora_adapters import split_key as _split
from .safetensors_io import SafetensorsError, SafetensorsFile


class LoraError(MlxfluxError, ValueError):
    """A LoRA file that cannot be applied; the message names the file and the problem."""


@dataclass
class LoraReport:
    """What one file did: the layers it changed, the keys it could not place."""

    file: str
    sha256: str
    scale: float
    clip_scale: float = 1.0
    layers: int = 0
    text_layers: int = 0  # CLIP-L and T5 layers changed, at clip_scale
    skipped: list[str] = field(default_factory=list)  # text-encoder LoRAs: not applied
    unmatched: list[str] = field(default_factory=list)  # keys that name no layer
    adapters: dict[str, int] = field(default_factory=dict)  # kind -> layers it changed
    unsupported: dict[str, int] = field(default_factory=dict)  # OFT/BOFT, GLoRA: named, not run

    def record(self) -> dict:
        """What the PNG and the report say of it."""
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale,
                "clip_scale": self.clip_scale, "layers": self.layers,
                "text_layers": self.text_layers, "adapters": self.adapters,
                "not_applied": self.skipped, "unsupported": self.unsupported,
                "unmatched": self.unmatched}  # fmt: skip


@dataclass
class LoraSet:
    """Every LoRA of a job, read and matched: per layer, its terms (`lora_adapters.Term`) and
    where they sit (row offset, halves swapped), in host memory."""

    reports: list[LoraReport] = field(default_factory=list)
    pieces: dict[str, list[tuple[int, Term]]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # the text encoders' parts ("clip", "t5"), each a set of its own, at the files' CLIP_SCALE
    text: dict[str, "LoraSet"] = field(default_factory=dict)

    def side_path(self, path: str) -> SidePath:
        out, inp = self.shapes[path]
        side = SidePath(out, inp)
        downs, ups, dense, bias = [], [], None, None
        for offset, term in self.pieces[path]:
            full = offset == 0 and term.rows == out
            if term.dora is not None:
                scale, strength = term.dora
                side.doras.append(Dora(offset, term.rows, term.delta(), scale, strength))
            elif term.low_rank is not None:
                down, up = term.low_rank
                downs.append(down)
                ups.append(np.pad(up, [(offset, out - offset - term.rows), (0, 0)]))
            elif term.kron is not None and full:
                side.krons.append(tuple(mx.array(w) for w in term.kron))
            elif _dense(offset, term, out):
                part = np.zeros((out, inp), np.float32) if dense is None else dense
                part[offset : offset + term.rows] += term.delta()
                dense = part
            if term.bias is not None:
                bias = np.zeros(out, np.float32) if bias is None else bias
                bias[offset : offset + term.rows] += term.bias
        if downs:
            side.down = mx.array(np.concatenate(downs, axis=0))  # [rank_total, in]
            side.up = mx.array(np.concatenate(ups, axis=1))  # [out, rank_total]
        side.dense = None if dense is None else mx.array(dense)
        side.bias = None if bias is None else mx.array(bias)
        return side

    @property
    def dense_bytes(self) -> int:
        """What the dense terms and DoRA rows hold (float32): the memory plan counts it."""
        total = 0
        for path, parts in self.pieces.items():
            out, inp = self.shapes[path]
            dense = any(_dense(o, t, out) for o, t in parts)
            total += out * inp * 4 * dense + sum(t.rows * inp * 4 for _, t in parts if t.dora)
        return total

    @property
    def resident_bytes(self) -> int:
        """All that the side paths hold while the trunk runs (float32)."""
        factors = sum(
            sum(a.size for a in (t.low_rank or t.kron or ())) * 4
            for parts in self.pieces.values() for _, t in parts
        )  # fmt: skip
        return factors + self.dense_bytes

    def attach(self, model: nn.Module) -> None:
        """Give `model`'s layers their side paths (`layer.lora`), the LoRAs summed."""
        layers = dict(model.named_modules())
        for path in self.pieces:
            side = self.side_path(path)
            mx.eval([a for a in (side.down, side.up, side.dense, side.bias) if a is not None])
            layers[path].lora = side


def _dense(offset: int, term: Term, out: int) -> bool:
    """Whether a term runs in its layer's dense side term: LoHa, a full difference, a LoKr on
    part of a fused layer (not a DoRA, which has dense rows of its own)."""
    if term.dora is not None or term.low_rank is not None or term.delta() is None:
        return False
    return term.kron is None or offset != 0 or term.rows != out


_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?[._]|lora_te_text_model|t5xxl\.)")


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


def _diffusers_names(layers: dict) -> dict[str, str]:
    """diffusers' Linear names of this transformer, underscored -> dotted: what OneTrainer
    (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`) files spell with underscores."""
    double = {int(p.split(".")[1]) for p in layers if p.startswith("double_blocks.")}
    single = {int(p.split(".")[1]) for p in layers if p.startswith("single_blocks.")}
    names = ["x_embedder", "context_embedder", "norm_out.linear", "proj_out",
             *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder",
               "guidance_embedder", "text_embedder") for i in (1, 2))]  # fmt: skip
    for b in sorted(double):
        names += [f"transformer_blocks.{b}.{n}" for n in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "norm1.linear",
            "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2")]  # fmt: skip
    for b in sorted(single):
        names += [
            f"single_transformer_blocks.{b}.{n}"
            for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
        ]
    return {n.replace(".", "_"): n for n in names}


def _target(base: str, layers: dict, kohya: dict, hidden: int, dotted: dict):
    """(BFL layer path, row offset, rows, halves swapped) for a LoRA's base name, or None."""
    from .convert.keymaps import diffusers_transformer, swap_halves

    for prefix in ("lora_unet_", "lora_transformer_", "lycoris_"):
        if base.startswith(prefix):
            rest = base[len(prefix) :]
            if rest in kohya:
                return kohya[rest], 0, layers[kohya[rest]][0], False
            if rest not in dotted:
                return None
            base = dotted[rest]  # a diffusers name: mapped below
            break
    for prefix in ("diffusion_model.", "model.diffusion_model.", "base_model.model.", ""):
        if base.startswith(prefix) and base[len(prefix) :] in layers:
            return base[len(prefix) :], 0, layers[base[len(prefix) :]][0], False
    for prefix in ("transformer.", "base_model.model.", ""):
        if base.startswith(prefix):
            t = diffusers_transformer(base[len(prefix) :] + ".weight")
            if t is not None and t.key.endswith(".weight") and t.key[:-7] in layers:
                # fused parts: q, k, v (hidden rows each), then a single block's MLP input
                swap = t.fn is swap_halves
                out_rows = layers[t.key[:-7]][0]
                rows = out_rows if t.parts == 1 else hidden
                if t.parts == 4 and t.part == 3:
                    rows = out_rows - 3 * hidden
                return t.key[:-7], t.part * hidden, rows, swap
    return None


def read_loras(loras, layers: dict[str, tuple[int, int]], hidden: int,
               text_layers: dict | None = None) -> LoraSet:  # fmt: skip
    """Read every LoRA of `loras` [(path, scale[, clip_scale]), ...] once and match it to
    `layers` (path -> (outputs, inputs), `layer_shapes`) and to the text encoders' layers
    (`text_layers`: {"clip": ..., "t5": ...}; without them text-encoder parts are reported as
    not applied); LoraError for a file that is unreadable, has wrong shapes, or matches no
    layer."""
    kohya = {p.replace(".", "_"): p for p in layers}
    dotted = _diffusers_names(layers)
    text_layers = text_layers or {}
    out = LoraSet(shapes=layers, text={c: LoraSet(shapes=s) for c, s in text_layers.items()})
    text_names = {c: {p.replace(".", "_"): p for p in s} for c, s in text_layers.items()}
    for path, scale, *clip in loras:
        path = Path(path).expanduser()
        clip_scale = float(clip[0]) if clip else float(scale)
        report, pieces = _read(path, float(scale), layers, kohya, hidden, dotted,
                               (text_layers, text_names, clip_scale))  # fmt: skip
        for component, layer_path, offset, term in pieces:
            target = out if component is None else out.text[component]
            target.pieces.setdefault(layer_path, []).append((offset, term))
        out.reports.append(report)
    return out


def _text_target(base: str, text_layers: dict, text_names: dict) -> tuple[str, str] | None:
    """(text encoder, layer path) of a text-encoder LoRA key, by ComfyUI's names for FLUX
    (`comfy/lora.py` model_lora_keys_clip): CLIP-L as lora_te_ / lora_te1_ / diffusers'
    text_encoder. / text_encoders.clip_l.transformer., T5 as lora_te2_ / lora_te3_ (OneTrainer)
    / text_encoders.t5xxl.transformer.; `text_names`: each encoder's paths, underscored."""
    for component, underscored, dotted in (
        ("clip", ("lora_te_text_model_", "lora_te1_text_model_"),
         ("text_encoder.text_model.", "text_encoders.clip_l.transformer.text_model.")),
        ("t5", ("lora_te2_", "lora_te3_"), ("text_encoders.t5xxl.transformer.",)),
    ):  # fmt: skip
        layers, names = text_layers.get(component, {}), text_names.get(component, {})
        for prefix in underscored:
            if base.startswith(prefix):
                path = names.get(base[len(prefix) :])
                if path:
                    return component, path
        for prefix in dotted:
            if base.startswith(prefix) and base[len(prefix) :] in layers:
                return component, base[len(prefix) :]
    return None


def _read(path: Path, scale: float, layers: dict, kohya: dict, hidden: int, dotted: dict,
          text: tuple[dict, dict, float]):  # fmt: skip
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
    text_layers, text_names, clip_scale = text
    report = LoraReport(path.name, hashlib.sha256(data).hexdigest(), scale, clip_scale)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            report.unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    pieces = []
    for base, g in sorted(groups.items()):
        kind = kind_of(g)
        if _TEXT_ENCODER.match(base):
            found = (
                _text_target(base, text_layers, text_names)
                if kind and kind not in NOT_APPLIED
                else None
            )
            if found is None:
                report.skipped.append(base)
                continue
            component, layer_path = found
            rows, cols = text_layers[component][layer_path]
            try:
                term = read_term(kind, g, clip_scale, rows, cols)
            except AdapterError as e:
                raise LoraError(f"{path}: {base}: {e} ({component} {layer_path})") from None
            pieces.append((component, layer_path, 0, term))
            continue
        if kind in NOT_APPLIED:
            name = NOT_APPLIED[kind]
            report.unsupported[name] = report.unsupported.get(name, 0) + 1
            continue
        target = _target(base, layers, kohya, hidden, dotted)
        if target is None or kind is None:
            report.unmatched.append(base)
            continue
        layer_path, offset, rows, swap = target
        out_rows, in_cols = layers[layer_path]
        try:
            term = read_term(kind, g, scale, rows, in_cols)
        except AdapterError as e:
            raise LoraError(
                f"{path}: {base}: {e} (layer {layer_path}, {out_rows} x {in_cols})"
            ) from None
        if offset + term.rows > out_rows:
            raise LoraError(f"{path}: {base}: {term.rows} rows do not fit in {layer_path}")
        if swap:
            term = _swapped(term)
        pieces.append((None, layer_path, offset, term))
        counted = kind + ("+dora" if term.dora else "")
        report.adapters[counted] = report.adapters.get(counted, 0) + 1
    report.layers = len({p for c, p, _, _ in pieces if c is None})
    report.text_layers = len({(c, p) for c, p, _, _ in pieces if c is not None})
    if not pieces:
        if report.unsupported:
            kinds = ", ".join(report.unsupported)
            raise LoraError(f"{path}: holds {kinds} adapters, which mlxflux does not apply; "
                            "applied to 0 layers")  # fmt: skip
        raise LoraError(
            f"{path}: matches no layer of this FLUX transformer (keys like "
            f"{next(iter(groups), next(iter(tensors), '?'))!r}); applied to 0 layers"
        )
    return report, pieces


def _swapped(term: Term) -> Term:
    """The term with its output halves swapped (diffusers' norm_out holds (scale, shift), BFL's
    final adaLN (shift, scale))."""
    delta = term.delta()
    bias = None if term.bias is None else _swap_halves(term.bias)
    if term.low_rank is not None and term.dora is None:
        down, up = term.low_rank
        return Term(term.rows, low_rank=(down, _swap_halves(up)), bias=bias)
    dora = term.dora
    if dora is not None and dora[0].size == term.rows:
        dora = (_swap_halves(dora[0].reshape(-1)), dora[1])
    return Term(term.rows, dense=None if delta is None else _swap_halves(delta), bias=bias,
                dora=dora)  # fmt: skip


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
