"""The FLUX.1 rectified-flow transformer (port of black-forest-labs/flux `model.py` + `layers.py`).

Module names follow BFL's checkpoint keys, so a BFL file loads with no key map.

The adaLN modulation projections (3.2 B of FLUX.1-dev's 11.9 B parameters) act once per step on
one conditioning vector. `FluxTransformer.modulation(...)` computes them for any number of steps
at once, and `FluxTransformer.trunk(...)` runs from those precomputed vectors, so the pipeline
can evaluate every step's modulation first and then drop those weights (docs/design.md,
memory plan).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..kernels import attention, gelu, linear_rows
from ..weights import BlockWeights
from .config import strict_from_dict
from .layers import (
    Linear,
    MLPEmbedder,
    QKNorm,
    apply_rope,
    gated_add,
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

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        return strict_from_dict(cls, d, "transformer")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["axes_dim"] = list(self.axes_dim)
        return d


FLUX_DEV = FluxConfig()
# float16's float32 streams and per-block checks (`FluxTransformer.trunk`); bench/speed.py turns
# them off to measure what they cost ("float16-unguarded"), nothing else should
FLOAT16_GUARDS = True
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


def is_modulation_key(key: str) -> bool:
    """True for parameters that only feed the per-step conditioning (dropped after stage 2)."""
    top = key.split(".", 1)[0]
    return (
        top in ("time_in", "vector_in", "guidance_in")
        or ".img_mod." in key
        or ".txt_mod." in key
        or (top == "single_blocks" and ".modulation." in key)
        or key.startswith("final_layer.adaLN_modulation.")
    )


class Modulation(nn.Module):
    """adaLN projection: silu(vec) -> (shift, scale, gate) x (2 if double else 1)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = Linear(dim, (6 if double else 3) * dim)

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


def run_mlp(layers: list[nn.Module], x: mx.array) -> mx.array:
    """The MLP over token chunks, each layer's weight prepared once for all chunks."""
    fc1, fc2 = linear_rows(layers[0]), linear_rows(layers[2])
    return map_tokens(lambda t: fc2(gelu(fc1(t))), x)


def _chunks(m: mx.array, n: int) -> list[mx.array]:
    return mx.split(m, n, axis=-1)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.img_mod = Modulation(d, double=True)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp = mlp(d, cfg.mlp_hidden)
        self.txt_mod = Modulation(d, double=True)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_mlp = mlp(d, cfg.mlp_hidden)

    def __call__(self, img, txt, img_mod, txt_mod, rope, dtype=None):
        """`dtype`: the matmuls' dtype (default: the streams'); the residual streams keep theirs."""
        dt = dtype or img.dtype
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = _chunks(img_mod, 6)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = _chunks(txt_mod, 6)

        iq, ik, iv = self.img_attn.qkv_heads(norm_modulate(img, i_shift1, i_scale1, dt))
        tq, tk, tv = self.txt_attn.qkv_heads(norm_modulate(txt, t_shift1, t_scale1, dt))
        # joint attention over [txt, img] tokens
        q = apply_rope(mx.concatenate([tq, iq], axis=2), *rope)
        k = apply_rope(mx.concatenate([tk, ik], axis=2), *rope)
        v = mx.concatenate([tv, iv], axis=2)
        attn = attention(q, k, v)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = gated_add(img, i_gate1, self.img_attn.proj(img_attn))
        img = gated_add(
            img, i_gate2, run_mlp(self.img_mlp, norm_modulate(img, i_shift2, i_scale2, dt))
        )
        txt = gated_add(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = gated_add(
            txt, t_gate2, run_mlp(self.txt_mlp, norm_modulate(txt, t_shift2, t_scale2, dt))
        )
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size = d
        self.num_heads = cfg.num_heads
        self.linear1 = Linear(d, 3 * d + cfg.mlp_hidden)
        self.linear2 = Linear(d + cfg.mlp_hidden, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, double=False)

    def __call__(self, x, mod, rope, dtype=None):
        shift, scale, gate = _chunks(mod, 3)
        b, n, d = x.shape
        h = norm_modulate(x, shift, scale, dtype or x.dtype)
        # linear1 is [q, k, v | MLP in]: attention needs every token's q/k/v; the MLP half
        # (4x wider) and linear2 run over token chunks
        qkv = linear_rows(self.linear1, 0, 3 * d)(h)
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q = apply_rope(self.norm.query_norm(qkv[0]), *rope)
        k = apply_rope(self.norm.key_norm(qkv[1]), *rope)
        attn = attention(q, k, qkv[2])
        mlp_in, out = linear_rows(self.linear1, 3 * d), linear_rows(self.linear2)

        def tail(a: mx.array, t: mx.array) -> mx.array:
            return out(mx.concatenate([a, gelu(mlp_in(t))], axis=-1))

        return gated_add(x, gate, map_tokens(tail, attn, h))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        # BFL: nn.Sequential(SiLU, Linear) -> key `adaLN_modulation.1`
        self.adaLN_modulation = [nn.SiLU(), Linear(dim, 2 * dim)]

    def __call__(self, x, mod, dtype=None):
        shift, scale = _chunks(mod, 2)  # BFL order (diffusers stores scale, shift)
        return self.linear(norm_modulate(x, shift, scale, dtype or x.dtype))


@dataclass
class Conditioning:
    """Every block's modulation vectors for N rows (steps x batch), in block order."""

    double: list[tuple[mx.array, mx.array]]  # (img, txt), each [N, 6 * hidden]
    single: list[mx.array]  # [N, 3 * hidden]
    final: mx.array  # [N, 2 * hidden], (shift, scale)

    def arrays(self) -> list[mx.array]:
        return [a for pair in self.double for a in pair] + self.single + [self.final]

    def rows(self, start: int, stop: int) -> "Conditioning":
        return Conditioning(
            double=[(i[start:stop], t[start:stop]) for i, t in self.double],
            single=[s[start:stop] for s in self.single],
            final=self.final[start:stop],
        )


class FluxTransformer(nn.Module):
    def __init__(self, cfg: FluxConfig):
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

    def trunk(
        self,
        img: mx.array,
        txt: mx.array,
        cond: Conditioning,
        rope: tuple[mx.array, mx.array],
        after_block: Callable[..., None] | None = None,
        dtype: mx.Dtype | None = None,
        block_weights=None,
    ) -> mx.array:
        """img [B, L, in_channels], txt [B, T, context_in_dim] -> velocity [B, L, out_channels]
        in the residual streams' dtype.

        `dtype` (default: txt's) is the dtype of the matmuls and attention. In float16 the
        residual streams stay float32 (every add into them is a float32 add) and each block
        is checked: a block whose output is not finite (a matmul, attention or modulated input
        left float16's range) runs again in float32, and so does that block for the rest of
        this model's life (`float32_blocks`). docs/numerics.md, "float16".
        `after_block(*streams)` is called with the residual streams after every block (the
        pipeline evaluates them there, which bounds the memory a lazy graph holds).
        `block_weights` (a `weights.BlockWeights`): each block runs inside
        `with block_weights("double_blocks.3")`, which may read its weights just before and
        release them after (the memory plan's streamed denoise).
        """
        weights = block_weights or BlockWeights()
        dt = dtype or txt.dtype
        stream = mx.float32 if dt == mx.float16 and FLOAT16_GUARDS else dt

        def embed(d):
            return self.img_in(img.astype(d)).astype(stream), self.txt_in(txt.astype(d)).astype(
                stream
            )

        img, txt = self._checked("input", embed, dt)
        for i, (block, (img_mod, txt_mod)) in enumerate(
            zip(self.double_blocks, cond.double, strict=True)
        ):
            run = functools.partial(block, img, txt, img_mod, txt_mod, rope)
            with weights(f"double_blocks.{i}"):
                img, txt = self._checked(f"double_blocks.{i}", lambda d, run=run: run(dtype=d), dt)
                if after_block:
                    after_block(img, txt)
        x = mx.concatenate([txt, img], axis=1)
        for i, (block, mod) in enumerate(zip(self.single_blocks, cond.single, strict=True)):
            run = functools.partial(block, x, mod, rope)
            with weights(f"single_blocks.{i}"):
                (x,) = self._checked(f"single_blocks.{i}", lambda d, run=run: (run(dtype=d),), dt)
                if after_block:
                    after_block(x)
        n_txt = txt.shape[1]
        final = functools.partial(self.final_layer, x[:, n_txt:], cond.final)
        (v,) = self._checked("final_layer", lambda d: (final(dtype=d).astype(stream),), dt)
        return v

    def _checked(self, name: str, run: Callable, dtype: mx.Dtype) -> tuple:
        """run(dtype) -> arrays; in float16, evaluated and re-run in float32 unless finite."""
        if dtype != mx.float16 or not FLOAT16_GUARDS:
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

    def modulation_releases(self) -> list[Callable[[], None]]:
        """One callable per `Conditioning.arrays()` table, in that order, dropping the layer that
        computes it (the pipeline frees each layer as soon as its table is evaluated)."""

        def drop(parent, attr):
            return lambda: setattr(parent, attr, None)

        out = []
        for b in self.double_blocks:
            out += [drop(b, "img_mod"), drop(b, "txt_mod")]
        out += [drop(b, "modulation") for b in self.single_blocks]
        return [*out, drop(self.final_layer, "adaLN_modulation")]

    def block_names(self) -> list[str]:
        """The trunk's blocks in the order they run."""
        return [f"double_blocks.{i}" for i in range(len(self.double_blocks))] + [
            f"single_blocks.{i}" for i in range(len(self.single_blocks))
        ]

    def drop_modulation(self) -> None:
        """Free the modulation weights once every step's Conditioning is computed."""
        for b in self.double_blocks:
            b.img_mod = b.txt_mod = None
        for b in self.single_blocks:
            b.modulation = None
        self.final_layer.adaLN_modulation = None
        self.time_in = self.vector_in = None
        if self.config.guidance_embed:
            self.guidance_in = None


def image_ids(height: int, width: int) -> np.ndarray:
    """Position ids [(H/16)(W/16), 3] = [0, row, col] for an image of height x width pixels."""
    h, w = height // 16, width // 16
    ids = np.zeros((h, w, 3), np.int32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def pack_latents(latents: mx.array) -> mx.array:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: `b c (h ph) (w pw) -> b (h w) (c ph pw)`."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: mx.array, height: int, width: int) -> mx.array:
    """Inverse of `pack_latents` for an image of height x width pixels."""
    b, _, d = x.shape
    h, w, c = height // 16, width // 16, d // 4
    x = x.reshape(b, h, w, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h * 2, w * 2)
