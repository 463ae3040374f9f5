"""FLUX.1 Redux's image encoder: SigLIP so400m-patch14-384's vision tower (a port of
transformers' `SiglipVisionModel`, whose `last_hidden_state` ComfyUI's CLIPVisionEncode and
diffusers' FluxPriorReduxPipeline both take) and Redux's projection (BFL's
`ReduxImageEncoder`: redux_down(silu(redux_up(x)))), 729 tokens at T5's width per image.

Names follow the files: `vision_model.*` as SigLIP's (ComfyUI's sigclip_vision_patch14_384,
the google/siglip-so400m-patch14-384 repo, Redux's image_encoder folder), `redux_up.*` and
`redux_down.*` as flux1-redux-dev.safetensors.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .clip import EncoderLayer
from .config import known_keys, strict_from_dict
from .layers import linear


@dataclass(frozen=True)
class ReduxConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    context_dim: int = 4096  # T5's width: what Redux's tokens join
    redux_dim: int = 12288  # redux_up's output (3 x context_dim in BFL's file)
    hidden_act = "gelu_pytorch_tanh"  # SigLIP's (not a field: the files all use it)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"SigLIP hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")  # fmt: skip

    @property
    def tokens(self) -> int:
        """Patches per image: 27 x 27 = 729 for so400m (384 px in patches of 14, the last 6
        pixels of each side unused, as its strided convolution leaves them)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "ReduxConfig":
        return strict_from_dict(cls, d, "Redux")

    @classmethod
    def from_hf(cls, d: dict) -> "ReduxConfig":
        """From a SigLIP vision config.json (transformers'): the fields mlxflux uses."""
        return cls(**known_keys(cls, d))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Embeddings(nn.Module):
    def __init__(self, cfg: ReduxConfig):
        super().__init__()
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, p, stride=p)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # [B, H/p, W/p, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight


class Encoder(nn.Module):
    def __init__(self, cfg: ReduxConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class VisionModel(nn.Module):
    def __init__(self, cfg: ReduxConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array, after_layer=None) -> mx.array:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
            if after_layer is not None:
                after_layer(x)
        return self.post_layernorm(x)


class ReduxEncoder(nn.Module):
    """pixels [B, 384, 384, 3] (SigLIP's normalization applied, `redux.preprocess`) ->
    Redux's tokens [B, 729, 4096], float32."""

    def __init__(self, cfg: ReduxConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)
        self.redux_up = nn.Linear(cfg.hidden_size, cfg.redux_dim)
        self.redux_down = nn.Linear(cfg.redux_dim, cfg.context_dim)

    def vision(self, pixels: mx.array, after_layer=None) -> mx.array:
        """SigLIP's last_hidden_state [B, 729, 1152] (after its post-layernorm)."""
        return self.vision_model(pixels.astype(mx.float32), after_layer)

    def __call__(self, pixels: mx.array, after_layer=None) -> mx.array:
        x = self.vision(pixels, after_layer)
        return linear(self.redux_down, nn.silu(linear(self.redux_up, x)))
