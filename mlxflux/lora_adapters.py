"""The adapter kinds a LoRA file holds, read as ComfyUI's weight adapters read them
(`comfy/weight_adapter/`: lora, loha, lokr; `comfy/lora.py`: diff, diff_b), and how each runs
beside a layer's own (possibly 8-bit) weights, never merged into them:

    lora   up @ down * alpha / rank                a low-rank side path, y += up (down x)
    lokr   kron(w1, w2) * alpha / dim              a Kronecker side path on a whole layer,
           (w1 = w1_a @ w1_b, w2 = w2_a @ w2_b        y += vec(w1 X w2^T); on part of a fused
           when factored)                             layer, a dense side term
    loha   (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r  a dense side term, y += dW x
    diff   diff (and diff_b on the bias)           a dense side term (and a bias term)
    DoRA   any of the three with `dora_scale`      the touched rows made dense once, from
                                                   the layer's own weights: W' as ComfyUI's
                                                   `weight_decompose`, then y = W' x + b

Dense terms cost out x in float32 per touched layer; the memory plan counts them
(`LoraSet.dense_bytes`). OFT, BOFT and GLoRA are recognised and named, not applied.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

# key suffix -> the piece it holds; the longest suffix is tried first
SUFFIXES = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
    "lora_linear_layer.down.weight": "down", "lora_A.default.weight": "down",
    "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up",
    "lora_linear_layer.up.weight": "up", "lora_B.default.weight": "up",
    "lora_mid.weight": "mid", "alpha": "alpha", "dora_scale": "dora_scale",
    **{f"hada_{k}": f"hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{k}": f"lokr_{k}" for k in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    "diff": "diff", "diff_b": "diff_b",
    "oft_blocks": "oft", "oft_diag": "oft", "rescale": "oft",
    "a1.weight": "glora", "a2.weight": "glora", "b1.weight": "glora", "b2.weight": "glora",
}  # fmt: skip
_ORDER = sorted(SUFFIXES, key=len, reverse=True)
NOT_APPLIED = {"oft": "OFT/BOFT", "glora": "GLoRA"}


class AdapterError(ValueError):
    """A group of keys that cannot be applied; the message says why (the caller names the file)."""


def split_key(key: str) -> tuple[str, str] | None:
    """(base name, piece) of a LoRA key, or None."""
    for suffix in _ORDER:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


def kind_of(group: dict) -> str | None:
    """The adapter kind of a base name's pieces: lora, loha, lokr, diff, oft, glora (None: no
    weight change in them, e.g. an alpha alone)."""
    if "up" in group and "down" in group:
        return "lora"
    if any(k.startswith("hada_") for k in group):
        return "loha"
    if any(k.startswith("lokr_") for k in group):
        return "lokr"
    if "diff" in group or "diff_b" in group:
        return "diff"
    for k in ("oft", "glora"):
        if k in group:
            return k
    return None


@dataclass
class Term:
    """One file's change to rows [offset, offset + rows) of one layer, scaled by its strength:
    exactly one of low_rank, kron, dense (or only a bias); `dora`: (dora_scale, strength) when
    the change is a DoRA (its terms then hold the change at strength 1, alpha applied)."""

    rows: int
    low_rank: tuple[np.ndarray, np.ndarray] | None = None  # (down [r, in], up [rows, r])
    kron: tuple[np.ndarray, np.ndarray] | None = None  # (w1, w2): kron(w1, w2) is [rows, in]
    dense: np.ndarray | None = None  # [rows, in]
    bias: np.ndarray | None = None  # [rows]
    dora: tuple[np.ndarray, float] | None = None

    def delta(self) -> np.ndarray | None:
        """The weight change as a dense [rows, in] array."""
        if self.low_rank is not None:
            down, up = self.low_rank
            return up @ down
        if self.kron is not None:
            return np.kron(*self.kron)
        return self.dense


def _lokr_factor(g: dict, name: str) -> tuple[np.ndarray, int | None]:
    """A LoKr factor, whole or as `_a @ _b`; with the rank of its factoring (None: whole)."""
    if name in g:
        return g[name], None
    if f"{name}_a" not in g or f"{name}_b" not in g:
        raise AdapterError(f"LoKr needs {name} or {name}_a and {name}_b")
    return _mm(g[f"{name}_a"], g[f"{name}_b"]), g[f"{name}_b"].shape[0]


def _mm(a, b) -> np.ndarray:
    if a.shape[1] != b.shape[0]:
        raise AdapterError(f"factors {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    return a @ b


def read_term(kind: str, g: dict, strength: float, rows: int, cols: int) -> Term:
    """The change of one base name's pieces `g` (float32 arrays) to a [rows, cols] weight, as
    ComfyUI computes it, times `strength` (left out for a DoRA, which takes it at the end)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
        return _read_term(kind, g, strength, rows, cols)


def _read_term(kind: str, g: dict, strength: float, rows: int, cols: int) -> Term:
    alpha = g.get("alpha")
    if alpha is not None and alpha.size != 1:
        raise AdapterError(f"alpha has shape {tuple(alpha.shape)}, not 1")
    alpha = None if alpha is None else float(alpha.reshape(()))
    if any(k in g for k in ("hada_t1", "hada_t2", "lokr_t2", "mid")):
        raise AdapterError(
            "a convolution's CP/Tucker factors, which a FLUX linear layer has no use for"
        )
    if kind in NOT_APPLIED:
        raise AdapterError(f"{NOT_APPLIED[kind]} adapters are not applied by mlxflux")
    flat = [
        k
        for k, v in g.items()
        if k not in ("alpha", "dora_scale", "diff_b") and (v.ndim != 2 or 0 in v.shape)
    ]
    if flat:
        raise AdapterError(f"{flat[0]} has shape {tuple(g[flat[0]].shape)}, not a matrix")
    dora = g.get("dora_scale")
    s = np.float32(1.0 if dora is not None else strength)
    term = Term(rows)
    if kind == "lora":
        down, up = g["down"], g["up"]
        if up.shape[1] != down.shape[0]:  # both matrices, neither empty: checked above
            raise AdapterError(f"down {tuple(down.shape)} / up {tuple(up.shape)} are no pair")
        rank = down.shape[0]
        term.low_rank = (down, up * (s * np.float32((alpha if alpha is not None else rank) / rank)))
        shape = (up.shape[0], down.shape[1])
    elif kind == "loha":
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if any(k not in g for k in need):
            raise AdapterError(f"LoHa needs {', '.join(need)}")
        w1b = g["hada_w1_b"]
        a = alpha / w1b.shape[0] if alpha is not None else 1.0
        m1, m2 = _mm(g["hada_w1_a"], w1b), _mm(g["hada_w2_a"], g["hada_w2_b"])
        if m1.shape != m2.shape:
            raise AdapterError(f"LoHa halves {m1.shape} and {m2.shape} differ")
        term.dense = (m1 * m2) * (s * np.float32(a))
        shape = term.dense.shape
    elif kind == "lokr":
        (w1, dim1), (w2, dim2) = _lokr_factor(g, "lokr_w1"), _lokr_factor(g, "lokr_w2")
        dim = dim2 if dim2 is not None else dim1  # ComfyUI: the last factored one's rank
        a = alpha / dim if alpha is not None and dim is not None else 1.0
        term.kron = (w1, w2 * (s * np.float32(a)))
        shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
    elif kind == "diff":
        if "diff" in g:
            term.dense = g["diff"] * s
            shape = term.dense.shape
        else:
            shape = (rows, cols)
        if "diff_b" in g:
            term.bias = g["diff_b"].reshape(-1) * s
            if term.bias.shape != (rows,):
                raise AdapterError(f"diff_b has {term.bias.shape[0]} values for {rows} outputs")
        if dora is not None:
            raise AdapterError("dora_scale on a full difference")
    else:
        raise AdapterError(f"{NOT_APPLIED.get(kind, kind)} adapters are not applied by mlxflux")
    if tuple(shape) != (rows, cols):
        raise AdapterError(f"its change {tuple(shape)} and the {rows} x {cols} weight do not fit")
    if dora is not None:
        dora = dora.astype(np.float32)
        if dora.size not in (rows, cols):
            raise AdapterError(f"dora_scale has {dora.size} values for a {rows} x {cols} layer")
        term.dora = (dora, float(strength))
    for piece in (term.low_rank and term.low_rank[1], term.kron and term.kron[1], term.dense):
        if piece is not None and not np.isfinite(piece).all():
            raise AdapterError(f"strength {strength:g} x alpha overflows")
    return term


# ---- running beside a layer -------------------------------------------------------------


@dataclass
class SidePath:
    """Everything the LoRAs of a job add to one layer of `out` x `inp` (`layer.lora`), run by
    `kernels.Kernels.linear_rows` beside the layer's own matmul (`apply`)."""

    out: int
    inp: int
    down: mx.array | None = None  # [rank_total, in]
    up: mx.array | None = None  # [out, rank_total]
    krons: list = field(default_factory=list)  # [(w1, w2)] over the whole layer
    dense: mx.array | None = None  # [out, in] float32
    bias: mx.array | None = None  # [out] float32
    doras: list = field(default_factory=list)  # [Dora]

    @property
    def dense_bytes(self) -> int:
        """Host-side bytes of its dense terms and DoRA rows (float32)."""
        n = self.out * self.inp * 4 if self.dense is not None else 0
        return n + sum(d.rows * self.inp * 4 for d in self.doras)

    def apply(self, layer, x: mx.array, y: mx.array, start: int, stop: int) -> mx.array:
        """y (the layer's own output rows [start, stop) for x) with every term added."""
        dt = x.dtype
        for d in self.doras:  # the touched rows, replaced by W' x + b
            y = d.replace(layer, x, y, start, stop)
        if self.down is not None:
            y = y + (x @ self.down.astype(dt).T) @ self.up[start:stop].astype(dt).T
        for w1, w2 in self.krons:
            a_in, b_in = w1.shape[1], w2.shape[1]
            xs = x.reshape(*x.shape[:-1], a_in, b_in)
            k = (w1.astype(dt) @ xs) @ w2.astype(dt).T  # [..., a_out, b_out]
            y = y + k.reshape(*x.shape[:-1], -1)[..., start:stop]
        if self.dense is not None:
            y = y + x @ self.dense[start:stop].astype(dt).T
        if self.bias is not None:
            y = y + self.bias[start:stop].astype(y.dtype)
        return y


@dataclass
class Dora:
    """A DoRA on rows [offset, offset + rows) of a layer: W' made once from the layer's own
    weights (ComfyUI's `weight_decompose`) and kept, dense float32."""

    offset: int
    rows: int
    delta: np.ndarray  # [rows, in], alpha applied
    scale: np.ndarray  # dora_scale: rows or in values
    strength: float
    merged: mx.array | None = None

    def weight(self, layer) -> mx.array:
        from .kernels import dequantize

        if self.merged is None:
            sl = slice(self.offset, self.offset + self.rows)
            if "scales" in layer:
                w = dequantize(layer.weight[sl], layer.scales[sl], layer.biases[sl],
                               layer.group_size, layer.bits)  # fmt: skip
            else:
                w = layer.weight[sl]
            w = np.array(w.astype(mx.float32))
            calc = w + self.delta
            eps = np.finfo(np.float32).eps
            if self.scale.size == self.rows and self.scale.shape[0] == self.rows:
                # on the output axis ComfyUI takes the norm of the weight before the change
                norm = np.linalg.norm(w, axis=1, keepdims=True) + eps
                merged = calc * (self.scale.reshape(-1, 1) / norm)
            else:
                norm = np.linalg.norm(calc, axis=0, keepdims=True) + eps
                merged = calc * (self.scale.reshape(1, -1) / norm)
            if self.strength != 1.0:
                merged = w + np.float32(self.strength) * (merged - w)
            self.merged = mx.array(merged.astype(np.float32))
        return self.merged

    def replace(self, layer, x: mx.array, y: mx.array, start: int, stop: int) -> mx.array:
        lo, hi = max(start, self.offset), min(stop, self.offset + self.rows)
        if lo >= hi:
            return y
        w = self.weight(layer)[lo - self.offset : hi - self.offset]
        rows = x @ w.astype(x.dtype).T
        if "bias" in layer:
            rows = rows + layer.bias[lo:hi].astype(rows.dtype)
        a, b = lo - start, hi - start
        return mx.concatenate([y[..., :a], rows.astype(y.dtype), y[..., b:]], axis=-1)
