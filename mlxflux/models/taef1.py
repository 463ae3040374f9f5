"""TAEF1's decoder: madebyollin's tiny autoencoder for FLUX latents, the decoder ComfyUI previews
with (`comfy/taesd/taesd.py` `Decoder`, `models/vae_approx/taef1_decoder`), diffusers'
`AutoencoderTiny` decoder.

    tanh(x / 3) * 3 -> conv 16->64, ReLU -> 3 x (3 blocks, upsample x2, conv) -> block, conv 64->3

A block is conv, ReLU, conv, ReLU, conv plus its input, then ReLU. Module names are the
checkpoint's (`layers.<i>` = ComfyUI's `<i>`, diffusers' `decoder.layers.<i - 1>`); MLX
convolutions are NHWC: an image [B, H, W, 3] in about [0, 1] comes out, 8x the latent's size.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from ..kernels import Kernels, choose
from .config import strict_from_dict


@dataclass(frozen=True)
class TAEF1Config:
    latent_channels: int = 16
    channels: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> "TAEF1Config":
        return strict_from_dict(cls, d, "taef1")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


def _apply(layers: list, x: mx.array, kernels: Kernels) -> mx.array:
    for layer in layers:
        x = kernels.conv3x3(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
    return x


class Clamp(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = [_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n)]

    def __call__(self, x: mx.array, kernels: Kernels) -> mx.array:
        return nn.relu(_apply(self.conv, x, kernels) + x)


class TAEF1Decoder(nn.Module):
    def __init__(self, cfg: TAEF1Config | None = None, kernels: Kernels | None = None):
        super().__init__()
        cfg = cfg or TAEF1Config()
        self.config = cfg
        self.kernels = kernels or choose()  # its convolutions' code path
        n = cfg.channels
        layers = [Clamp(), _conv(cfg.latent_channels, n), nn.ReLU()]
        for _ in range(3):
            layers += [Block(n), Block(n), Block(n), nn.Upsample(2, mode="nearest"),
                       _conv(n, n, bias=False)]  # fmt: skip
        self.layers = [*layers, Block(n), _conv(n, 3)]

    def __call__(self, latent: mx.array) -> mx.array:
        """latent [B, 16, h, w] (the model's latent space, as ComfyUI previews it) ->
        image [B, 8h, 8w, 3], about [0, 1]."""
        x = latent.transpose(0, 2, 3, 1)
        for layer in self.layers:
            if isinstance(layer, Block):
                x = layer(x, self.kernels)
            else:
                x = _apply([layer], x, self.kernels)
            mx.eval(x)  # layer by layer: the activations at full size are the big ones
        return x
