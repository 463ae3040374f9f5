"""CLIP-L text encoder (port of transformers' `CLIPTextModel`), pooled output for FLUX.

Names follow `clip_l.safetensors` without its `text_model.` prefix (transformers 5 layout).
"""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .config import known_keys, strict_from_dict
from .layers import linear


def gelu_tanh(x: mx.array) -> mx.array:
    """transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


# transformers' names; SigLIP (`models.redux`) shares these layers with gelu_pytorch_tanh
ACTIVATIONS = {"quick_gelu": lambda h: h * mx.sigmoid(1.702 * h), "gelu": nn.gelu,
               "gelu_pytorch_tanh": gelu_tanh}  # fmt: skip


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP activation {self.hidden_act!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        return strict_from_dict(cls, d, "CLIP")

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPConfig":
        """From transformers' config.json: the fields mlxflux uses."""
        return cls(**known_keys(cls, d))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        b, n, d = x.shape

        def heads(t):
            return t.reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(p, x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        scale = (d // self.num_heads) ** -0.5
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return linear(self.out_proj, out.transpose(0, 2, 1, 3).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = cfg.hidden_act

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.fc2, ACTIVATIONS[self.act](linear(self.fc1, x)))


class EncoderLayer(nn.Module):
    """Pre-norm attention and MLP, as CLIP's and SigLIP's (`cfg`: any config with CLIP's
    field names)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        """input_ids [B, 77] -> (last_hidden_state [B, 77, D], pooled [B, D])."""
        n = input_ids.shape[1]
        x = self.embeddings.token_embedding(input_ids)
        x = x + self.embeddings.position_embedding.weight[:n]
        x = x.astype(mx.float32)  # text encoders run fp32 activations, as ComfyUI does
        mask = nn.MultiHeadAttention.create_additive_causal_mask(n).astype(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        # pooled: the first EOS token; EOS 49407 is the highest id, so argmax finds it
        eos = mx.argmax(input_ids, axis=-1)
        pooled = mx.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return x, pooled
