"""T5 v1.1 encoder (port of transformers' `T5EncoderModel`), as FLUX uses T5-XXL.

Names follow `t5xxl_fp16.safetensors`: `shared`, `encoder.block.N.layer.M...`.
Activations stay float32 whatever the weights are (16-bit, 8-bit): T5's feed-forward output
overflows fp16 (transformers clamps it; ComfyUI runs text encoders with fp32 activations), and
the encoder is a small part of a generation's time.
"""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import progress
from ..blocks import BlockWeights
from .config import known_keys, strict_from_dict
from .layers import linear


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return strict_from_dict(cls, d, "T5")

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """From transformers' config.json: the fields mlxflux uses (gated-GELU T5 only)."""
        if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"only gated-gelu T5 is supported, got {d['feed_forward_proj']!r}")
        return cls(**known_keys(cls, d))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def relative_position_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets [n, n] for key - query offsets (transformers'
    `_relative_position_bucket`, with its float32 log, computed on the host)."""
    pos = np.arange(n)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    # offsets below max_exact take the exact branch; clip them so the log stays finite
    ratio = np.maximum(rel, max_exact).astype(np.float32) / np.float32(max_exact)
    large = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (large * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(rel < max_exact, rel, large)


class RMSNorm(nn.Module):
    """T5LayerNorm: no mean subtraction, no bias, in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(mx.float32), self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads
            )

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, _ = x.shape

        def heads(t):
            return t.reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(layer, x)) for layer in (self.q, self.k, self.v))
        # T5 does not scale the scores by 1/sqrt(d)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return linear(self.o, out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class DenseGatedGelu(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.gelu_approx(linear(self.wi_0, x)) * linear(self.wi_1, x)  # gelu_new = tanh approx
        return linear(self.wo, h)


class LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = DenseGatedGelu(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = [LayerSelfAttention(cfg, has_bias), LayerFF(cfg)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = [Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers)]
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    def position_bias(self, n: int) -> mx.array:
        cfg = self.config
        buckets = relative_position_buckets(
            n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(mx.array(buckets.astype(np.int32)))  # [n, n, heads]
        return bias.transpose(2, 0, 1)[None].astype(mx.float32)

    def __call__(self, input_ids: mx.array, block_weights=None) -> mx.array:
        """input_ids [B, N] -> last_hidden_state [B, N, d_model] (float32).

        `block_weights` (a `blocks.BlockWeights`): each block runs inside
        `with block_weights("encoder.block.7")`; when it streams, each block is evaluated
        before its weights are released."""
        weights = block_weights or BlockWeights()
        x = self.shared(input_ids).astype(mx.float32)
        bias = None
        for i, block in enumerate(self.encoder.block):
            with weights(f"encoder.block.{i}"):
                if bias is None:  # its table lives in block 0
                    bias = self.position_bias(input_ids.shape[1])
                x = block(x, bias)
                if weights.streamed:
                    mx.eval(x, bias)
                progress.advance(x, bias)
        return self.encoder.final_layer_norm(x)

    def block_names(self) -> list[str]:
        return [f"encoder.block.{i}" for i in range(len(self.encoder.block))]
