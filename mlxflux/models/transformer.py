"""The FLUX.1 rectified-flow transformer (port of black-forest-labs/flux `model.py` + `layers.py`).

Module names follow BFL's checkpoint keys, so a BFL file loads with no key map.

The adaLN modulation projections (3.2 B of FLUX.1-dev's 11.9 B parameters) act once per step on
one conditioning vector. `FluxTransformer.modulation(...)` computes them for any number of steps
at once, and `FluxTransformer.trunk(...)` runs from those precomputed vectors, so the pipeline
can evaluate every step's modulation first and then drop those weights (docs/design.md,
memory plan). What is modulation is named once, here: `MODULATION` (the layers),
`MOD_VECTORS` (how many hidden-wide vectors each block makes per step); the key test
(`is_modulation_key`), the layer list (`FluxTransformer.modulation_layers`) and the tables'
size (`FluxConfig.modulation_vectors`) are derived from them.
"""

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..blocks import BlockWeights
from ..kernels import Kernels, choose
from .config import strict_from_dict
from .layers import (
    Linear,
    MLPEmbedder,
    QKNorm,
    UsesKernels,
    apply_rope,
    gated_add,
    hand_kernels,
    map_tokens,
    norm_modulate,
    rope_tables,
    timestep_embedding,
)


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # 128 for Canny/Depth dev (+ control latents), 384 for Fill dev
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    out_channels: int = 64  # the velocity's: the packed latent's 16 x 2 x 2

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"sum(axes_dim) = {sum(self.axes_dim)} must equal the head dim "
                f"{self.hidden_size} / {self.num_heads} = {self.head_dim}"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every RoPE axis must be even, got axes_dim {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def modulation_vectors(self) -> int:
        """Hidden-wide modulation vectors per step: what `Conditioning` holds for one row."""
        return (
            2 * MOD_VECTORS["double"] * self.depth
            + MOD_VECTORS["single"] * self.depth_single_blocks
            + MOD_VECTORS["final"]
        )

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        return strict_from_dict(cls, d, "transformer")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["axes_dim"] = list(self.axes_dim)
        return d


FLUX_DEV = FluxConfig()

# The adaLN modulation: the layers that only feed the per-step conditioning (BFL names, `*` a
# block number), computed by the modulation stage and dropped before the trunk runs ...
MODULATION = (
    "time_in", "vector_in", "guidance_in",
    "double_blocks.*.img_mod", "double_blocks.*.txt_mod", "single_blocks.*.modulation",
    "final_layer.adaLN_modulation",
)  # fmt: skip
# ... and the hidden-wide vectors each makes per step: (shift, scale, gate) twice in a double
# block's stream, once in a single block; (shift, scale) for the final layer
MOD_VECTORS = {"double": 6, "single": 3, "final": 2}
_MODULATION_KEY = re.compile(
    "^(" + "|".join(re.escape(p).replace(r"\*", r"\d+") for p in MODULATION) + r")\."
)


def is_modulation_key(key: str) -> bool:
    """True for parameters that only feed the per-step conditioning (`MODULATION`)."""
    return _MODULATION_KEY.match(key) is not None


class Modulation(nn.Module):
    """adaLN projection: silu(vec) -> (shift, scale, gate) x (2 if double else 1)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = Linear(dim, MOD_VECTORS["double" if double else "single"] * dim)

    def __call__(self, vec: mx.array) -> mx.array:
        return self.lin(nn.silu(vec))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x [B, L, D] -> normed q, k and v, each [B, H, L, D/H]."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def mlp(dim: int, hidden: int) -> list[nn.Module]:
    """Linear -> GELU(tanh) -> Linear as a list, so keys are `.0` and `.2` like BFL's Sequential."""
    return [Linear(dim, hidden), nn.GELU(approx="tanh"), Linear(hidden, dim)]


def run_mlp(k: Kernels, layers: list[nn.Module], x: mx.array) -> mx.array:
    """The MLP over token chunks, each layer's weight prepared once for all chunks."""
    fc1, fc2 = k.linear_rows(layers[0]), k.linear_rows(layers[2])
    return map_tokens(lambda t: fc2(k.gelu(fc1(t))), x)


def _chunks(m: mx.array, n: int) -> list[mx.array]:
    return mx.split(m, n, axis=-1)


class DoubleStreamBlock(nn.Module, UsesKernels):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.img_mod = Modulation(d, double=True)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp = mlp(d, cfg.mlp_hidden)
        self.txt_mod = Modulation(d, double=True)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_mlp = mlp(d, cfg.mlp_hidden)

    def __call__(self, img, txt, img_mod, txt_mod, rope, dtype=None, bias=None):
        """`dtype`: the matmuls' dtype (default: the streams'); the residual streams keep theirs;
        `bias` is added to the attention scores over [txt, img] (Redux's attn_bias)."""
        dt, ke = dtype or img.dtype, self.kernels
        el = ke.elementwise
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = _chunks(
            img_mod, MOD_VECTORS["double"]
        )
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = _chunks(
            txt_mod, MOD_VECTORS["double"]
        )

        iq, ik, iv = self.img_attn.qkv_heads(el(norm_modulate, img, i_shift1, i_scale1, dt))
        tq, tk, tv = self.txt_attn.qkv_heads(el(norm_modulate, txt, t_shift1, t_scale1, dt))
        # joint attention over [txt, img] tokens
        q = el(apply_rope, mx.concatenate([tq, iq], axis=2), *rope)
        k = el(apply_rope, mx.concatenate([tk, ik], axis=2), *rope)
        v = mx.concatenate([tv, iv], axis=2)
        attn = ke.attention(q, k, v, bias)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = el(gated_add, img, i_gate1, self.img_attn.proj(img_attn))
        h = el(norm_modulate, img, i_shift2, i_scale2, dt)
        img = el(gated_add, img, i_gate2, run_mlp(ke, self.img_mlp, h))
        txt = el(gated_add, txt, t_gate1, self.txt_attn.proj(txt_attn))
        h = el(norm_modulate, txt, t_shift2, t_scale2, dt)
        txt = el(gated_add, txt, t_gate2, run_mlp(ke, self.txt_mlp, h))
        return img, txt


class SingleStreamBlock(nn.Module, UsesKernels):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size = d
        self.num_heads = cfg.num_heads
        self.linear1 = Linear(d, 3 * d + cfg.mlp_hidden)
        self.linear2 = Linear(d + cfg.mlp_hidden, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, double=False)

    def __call__(self, x, mod, rope, dtype=None, bias=None):
        ke = self.kernels
        shift, scale, gate = _chunks(mod, MOD_VECTORS["single"])
        b, n, d = x.shape
        h = ke.elementwise(norm_modulate, x, shift, scale, dtype or x.dtype)
        # linear1 is [q, k, v | MLP in]: attention needs every token's q/k/v; the MLP half
        # (4x wider) and linear2 run over token chunks
        qkv = ke.linear_rows(self.linear1, 0, 3 * d)(h)
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q = ke.elementwise(apply_rope, self.norm.query_norm(qkv[0]), *rope)
        k = ke.elementwise(apply_rope, self.norm.key_norm(qkv[1]), *rope)
        attn = ke.attention(q, k, qkv[2], bias)
        mlp_in, out = ke.linear_rows(self.linear1, 3 * d), ke.linear_rows(self.linear2)

        def tail(a: mx.array, t: mx.array) -> mx.array:
            return out(mx.concatenate([a, ke.gelu(mlp_in(t))], axis=-1))

        return ke.elementwise(gated_add, x, gate, map_tokens(tail, attn, h))


class LastLayer(nn.Module, UsesKernels):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        # BFL: nn.Sequential(SiLU, Linear) -> key `adaLN_modulation.1`
        self.adaLN_modulation = [nn.SiLU(), Linear(dim, MOD_VECTORS["final"] * dim)]

    def __call__(self, x, mod, dtype=None):
        shift, scale = _chunks(
            mod, MOD_VECTORS["final"]
        )  # BFL order (diffusers stores scale, shift)
        return self.linear(self.kernels.elementwise(norm_modulate, x, shift, scale,
                                                    dtype or x.dtype))  # fmt: skip


@dataclass
class Conditioning:
    """Every block's modulation vectors for N rows (steps x batch), in block order."""

    double: list[tuple[mx.array, mx.array]]  # (img, txt), each [N, MOD_VECTORS['double'] * hidden]
    single: list[mx.array]  # [N, MOD_VECTORS['single'] * hidden]
    final: mx.array  # [N, MOD_VECTORS['final'] * hidden], (shift, scale)

    def arrays(self) -> list[mx.array]:
        return [a for pair in self.double for a in pair] + self.single + [self.final]

    def rows(self, start: int, stop: int) -> "Conditioning":
        return Conditioning(
            double=[(i[start:stop], t[start:stop]) for i, t in self.double],
            single=[s[start:stop] for s in self.single],
            final=self.final[start:stop],
        )


class FluxTransformer(nn.Module):
    def __init__(self, cfg: FluxConfig, kernels: Kernels | None = None):
        """`kernels`: the backend's code path (default: `kernels.choose()`, MLXFLUX_KERNELS's)."""
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d)
        self.txt_in = Linear(cfg.context_in_dim, d)
        self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.depth)]
        self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks)]
        self.final_layer = LastLayer(d, cfg.out_channels)
        self.float32_blocks: set[str] = set()  # float16 runs: blocks that overflowed it
        # float16's float32 streams and per-block checks (`trunk`); bench/speed.py turns them
        # off to measure what they cost ("float16-unguarded"), nothing else should
        self.float16_guards = True
        self.kernels = kernels or choose()
        hand_kernels(self, self.kernels)

    def modulation(
        self,
        timesteps: mx.array,
        pooled: mx.array,
        guidance: mx.array | None = None,
        each: Callable[[mx.array], None] | None = None,
    ) -> Conditioning:
        """timesteps [N] (sigma in [0, 1]), pooled CLIP [N, 768], guidance [N] -> Conditioning.

        `each(table)` is called on every table as soon as it is made, in `Conditioning.arrays()`
        order: the pipeline evaluates it there and frees the layer that made it, so one layer's
        weights are alive at a time (`modulation_releases`)."""

        def made(table: mx.array) -> mx.array:
            if each is not None:
                each(table)
            return table

        vec = self.time_in(timestep_embedding(timesteps).astype(pooled.dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedding: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(pooled.dtype))
        vec = vec + self.vector_in(pooled)
        double = [(made(b.img_mod(vec)), made(b.txt_mod(vec))) for b in self.double_blocks]
        single = [made(b.modulation(vec)) for b in self.single_blocks]
        final = made(self.final_layer.adaLN_modulation[1](nn.silu(vec)))
        return Conditioning(double=double, single=single, final=final)

    def rope(self, img_ids: np.ndarray, txt_len: int) -> tuple[mx.array, mx.array]:
        """cos/sin for the joint sequence [txt (ids all zero), img (ids [0, row, col])]."""
        ids = np.concatenate([np.zeros((txt_len, 3), img_ids.dtype), img_ids], axis=0)
        return rope_tables(ids, self.config.axes_dim, self.config.theta)

    def trunk(self, img: mx.array, txt: mx.array, cond: Conditioning,
              rope: tuple[mx.array, mx.array], after_block: Callable[..., None] | None = None,
              dtype: mx.Dtype | None = None, block_weights=None, first_block=None, step: int = 0,
              bias: mx.array | None = None) -> mx.array:  # fmt: skip
        """img [B, L, in_channels], txt [B, T, context_in_dim] -> velocity [B, L, out_channels]
        in the residual streams' dtype.

        `dtype` (default: txt's) is the dtype of the matmuls and attention. In float16 the
        residual streams stay float32 and a block whose output is not finite runs again in
        float32, for the rest of this model's life (`float32_blocks`; docs/numerics.md).
        `after_block(*streams)` is called with the residual streams after every block (the
        pipeline evaluates them there, which bounds the memory a lazy graph holds).
        `block_weights` (a `blocks.BlockWeights`): each block runs inside
        `with block_weights("double_blocks.3")`, which may read its weights just before and
        release them after (the memory plan's streamed denoise).
        `first_block` (a `cache.FirstBlock`, diffusers' FirstBlockCache): after the first
        block, the other blocks run or their cached residual is added (step `step`).
        `bias` [L, L]: added to every attention's scores over [txt, img] (Redux's attn_bias).
        """
        weights = block_weights or BlockWeights()
        dt = dtype or txt.dtype
        stream = mx.float32 if dt == mx.float16 and self.float16_guards else dt

        def embed(d):
            return (self.img_in(img.astype(d)).astype(stream),
                    self.txt_in(txt.astype(d)).astype(stream))  # fmt: skip

        img, txt = self._checked("input", embed, dt)
        n_txt, names = txt.shape[1], self.block_names()
        for i, (block, (img_mod, txt_mod)) in enumerate(
            zip(self.double_blocks, cond.double, strict=True)
        ):
            run, before = functools.partial(block, img, txt, img_mod, txt_mod, rope, bias=bias), img
            with weights(names[i], read_ahead=first_block is None or i > 0):
                img, txt = self._checked(names[i], lambda d, run=run: run(dtype=d), dt)
                if after_block:
                    after_block(img, txt)
            if first_block is not None and i == 0:  # the first block decides for the rest
                go = first_block.keep_going(img - before)
                weights.read_ahead(names[1 % len(names)] if go else names[0])
                if not go:
                    first_block.skipped(step)
                    tail_img, tail_txt = first_block.tail
                    return self._final(img + tail_img, cond, dt, stream)
                first_block.computed(step, img - before, (img, txt))
        x = mx.concatenate([txt, img], axis=1)
        for i, (block, mod) in enumerate(zip(self.single_blocks, cond.single, strict=True)):
            run = functools.partial(block, x, mod, rope, bias=bias)
            with weights(f"single_blocks.{i}"):
                (x,) = self._checked(f"single_blocks.{i}", lambda d, run=run: (run(dtype=d),), dt)
                if after_block:
                    after_block(x)
        if first_block is not None:
            first_block.remember_tail(x[:, n_txt:], x[:, :n_txt])
        return self._final(x[:, n_txt:], cond, dt, stream)

    def _final(self, img: mx.array, cond: Conditioning, dt, stream) -> mx.array:
        final = functools.partial(self.final_layer, img, cond.final)
        (v,) = self._checked("final_layer", lambda d: (final(dtype=d).astype(stream),), dt)
        return v

    def _checked(self, name: str, run: Callable, dtype: mx.Dtype) -> tuple:
        """run(dtype) -> arrays; in float16, evaluated and re-run in float32 unless finite."""
        if dtype != mx.float16 or not self.float16_guards:
            return run(dtype)
        if name in self.float32_blocks:
            return run(mx.float32)
        out = run(dtype)
        finite = mx.stack([mx.isfinite(o).all() for o in out]).all()
        mx.eval(*out, finite)
        if finite.item():
            return out
        self.float32_blocks.add(name)
        return run(mx.float32)

    def __call__(
        self,
        img: mx.array,
        txt: mx.array,
        timesteps: mx.array,
        pooled: mx.array,
        img_ids: np.ndarray,
        guidance: mx.array | None = None,
    ) -> mx.array:
        if txt.dtype == mx.float16:  # as the pipeline runs float16: modulation in float32
            pooled = pooled.astype(mx.float32)
        cond = self.modulation(timesteps, pooled, guidance)
        return self.trunk(img, txt, cond, self.rope(img_ids, txt.shape[1]))

    def modulation_layers(self, tables_only: bool = False) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every `MODULATION` layer: first those that make a table, in
        `Conditioning.arrays()` order, then (unless `tables_only`) the embedders."""
        out = [(b, name) for b in self.double_blocks for name in ("img_mod", "txt_mod")]
        out += [(b, "modulation") for b in self.single_blocks]
        out.append((self.final_layer, "adaLN_modulation"))
        if not tables_only:
            embedders = ("time_in", "vector_in", "guidance_in")
            out += [(self, name) for name in embedders if name in self]
        return out

    def modulation_releases(self) -> list[Callable[[], None]]:
        """One callable per `Conditioning.arrays()` table, in that order, dropping the layer that
        computes it (the pipeline frees each layer as soon as its table is evaluated)."""

        def drop(parent, attr):
            return lambda: setattr(parent, attr, None)

        return [drop(p, a) for p, a in self.modulation_layers(tables_only=True)]

    def block_names(self) -> list[str]:
        """The trunk's blocks in the order they run."""
        return [f"double_blocks.{i}" for i in range(len(self.double_blocks))] + [
            f"single_blocks.{i}" for i in range(len(self.single_blocks))
        ]

    def drop_modulation(self) -> None:
        """Free the modulation weights once every step's Conditioning is computed."""
        for parent, attr in self.modulation_layers():
            setattr(parent, attr, None)
