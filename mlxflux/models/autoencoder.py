"""The FLUX autoencoder (port of black-forest-labs/flux `modules/autoencoder.py`).

NHWC inside, as MLX convolutions want; `decode` takes the pipeline's latent [B, 16, H/8, W/8]
and returns images [B, H, W, 3] in [0, 1]; `encode` is the inverse direction.
Module names follow BFL's `ae.safetensors` (`decoder.up.N` indexed by resolution level, so
`up.3` is the first one run); attention q/k/v/proj_out are Linear here (1x1 convs in BFL).
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .. import progress
from .config import strict_from_dict


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"GroupNorm(32) needs channels divisible by 32, got {bad}")

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return strict_from_dict(cls, d, "autoencoder")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ch_mult"] = list(self.ch_mult)
        return d


def group_norm(dims: int) -> nn.GroupNorm:
    # pytorch_compatible groups channels contiguously, as torch does
    return nn.GroupNorm(32, dims, eps=1e-6, affine=True, pytorch_compatible=True)


def norm_fp32(norm: nn.GroupNorm, x: mx.array) -> mx.array:
    return norm(x.astype(mx.float32)).astype(x.dtype)


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = norm_fp32(self.norm, x).reshape(b, 1, h * w, c)
        out = mx.fast.scaled_dot_product_attention(self.q(y), self.k(y), self.v(y), scale=c**-0.5)
        return x + self.proj_out(out).reshape(b, h, w, c)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(norm_fp32(self.norm1, x)))
        h = self.conv2(nn.silu(norm_fp32(self.norm2, h)))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        # BFL pads right and bottom by one, then a stride-2 3x3 conv without padding
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape  # nearest-neighbour 2x
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class Level(nn.Module):
    """One resolution level: `block.N` and, but for the last, a `downsample` (encoder) or
    `upsample` (decoder); FLUX has no attention at these levels."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = blocks


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = []
        block_in = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
            level = Level(blocks)
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = Mid(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
                progress.advance(h)
            if "downsample" in level:
                h = level.downsample(h)
                progress.advance(h)
        h = self.mid(h)
        out = self.conv_out(nn.silu(norm_fp32(self.norm_out, h)))
        progress.advance(out)
        return out

    @property
    def units(self) -> int:
        """What `progress.advance` counts in a pass: each block and downsample, then the rest."""
        return sum(len(level.block) + ("downsample" in level) for level in self.down) + 1


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        up = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            level = Level(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = up
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def head(self, z: mx.array) -> mx.array:
        """conv_in and the mid block, at latent resolution (global attention)."""
        h = self.mid(self.conv_in(z))
        progress.advance(h)
        return h

    def tail(self, h: mx.array) -> mx.array:
        """The up path: convolutions only, so it can run tile by tile."""
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
                progress.advance(h)
            if "upsample" in level:
                h = level.upsample(h)
                progress.advance(h)
        out = self.conv_out(nn.silu(norm_fp32(self.norm_out, h)))
        progress.advance(out)
        return out

    @property
    def units(self) -> int:
        """What `progress.advance` counts in a pass: the head, each block and upsample, the
        output."""
        return sum(len(level.block) + ("upsample" in level) for level in self.up) + 2

    def __call__(self, z: mx.array) -> mx.array:
        return self.tail(self.head(z))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: mx.array, tiled: bool = False, tile_bytes: int = 256 << 20):
        """images [B, H, W, 3] in [0, 1] -> latent [B, 16, H/8, W/8] (the mean, scaled).

        The mean, not a sample: ComfyUI's VAE encode takes the posterior's mode. `tiled` runs
        the full-resolution convolutions in row tiles, like `decode`; the result is the same.
        """
        x = images * 2 - 1
        moments = TiledConvs(tile_bytes).encoder(self.encoder, x) if tiled else self.encoder(x)
        mean = moments[..., : self.config.z_channels]
        z = self.config.scale_factor * (mean - self.config.shift_factor)
        return z.transpose(0, 3, 1, 2)

    def decode(self, latents: mx.array, tiled: bool = False, tile_bytes: int = 256 << 20):
        """latent [B, 16, H/8, W/8] -> images [B, H, W, 3] in [0, 1].

        `tiled` runs the up path's convolutions in row tiles of about `tile_bytes` of working
        memory each (see `TiledConvs`): the result equals the untiled decode.
        """
        z = latents.transpose(0, 2, 3, 1)
        z = z / self.config.scale_factor + self.config.shift_factor  # BFL `decode`
        h = self.decoder.head(z)
        x = TiledConvs(tile_bytes).decoder_tail(self.decoder, h) if tiled else self.decoder.tail(h)
        return mx.clip((x + 1) / 2, 0, 1)


class TiledConvs:
    """The VAE's full-resolution paths (the decoder's up path, the encoder's down path), each
    3x3 convolution computed in row tiles with a one-row halo.

    Deliberate deviation from the usual tiled VAE decode (independent overlapping tiles whose
    seams are blended): those tiles each compute their own GroupNorm statistics, which shifts
    tones between tiles. Here every GroupNorm uses the whole activation's statistics and every
    convolution sees its true neighbours through the halo, so the output equals the untiled
    decode and there is no seam to blend. The peak holds two whole activations (a layer's input
    and output) plus one tile's working set, instead of every convolution's full working set
    (im2col on the CPU backend is 9x a full-resolution activation).
    """

    def __init__(self, tile_bytes: int):
        self.tile_bytes = tile_bytes

    def _rows(self, b: int, out_w: int, c: int, k: int, out_h: int, multiple: int = 1) -> int:
        """Output rows per tile: ~tile_bytes for the k*k-times-wider patch matrix."""
        row_bytes = b * out_w * c * k * k * 4
        return max(multiple, min(out_h, self.tile_bytes // row_bytes) // multiple * multiple)

    @staticmethod
    def _store(out, y: mx.array, shape: tuple, r0: int, r1: int) -> mx.array:
        if out is None:
            out = mx.zeros((*shape, y.shape[-1]), y.dtype)
        out[:, r0:r1] = y
        mx.eval(out)
        return out

    def conv(
        self, conv: nn.Conv2d, x: mx.array, prologue=None, upsample=False, residual=None
    ) -> mx.array:
        """conv(prologue(upsample(x))) [+ residual(rows)], evaluated one row tile at a time."""
        b, h, w, c = x.shape
        f = 2 if upsample else 1
        k = conv.weight.shape[1]
        pad = k // 2
        out_h, out_w = h * f, w * f
        rows = self._rows(b, out_w, c, k, out_h, f)
        out = None
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            # input rows (in upsampled coordinates) r0 - pad .. r1 + pad, clipped to the image
            lo, hi = max(0, r0 - pad), min(out_h, r1 + pad)
            band = x[:, lo // f : (hi + f - 1) // f]
            if prologue is not None:
                band = prologue(band)
            if upsample:
                bh = band.shape[1]
                band = mx.broadcast_to(band[:, :, None, :, None], (b, bh, 2, w, 2, c))
                band = band.reshape(b, 2 * bh, 2 * w, c)[:, lo - (lo // f) * f :][:, : hi - lo]
            band = mx.pad(band, [(0, 0), (pad - (r0 - lo), pad - (hi - r1)), (pad, pad), (0, 0)])
            y = mx.conv2d(band, conv.weight) + conv.bias
            if residual is not None:
                y = y + residual(r0, r1)
            out = self._store(out, y, (b, out_h, out_w), r0, r1)
        return out

    def downsample(self, conv: nn.Conv2d, x: mx.array) -> mx.array:
        """`Downsample` in row tiles: pad right/bottom by one, 3x3 conv with stride 2."""
        b, h, w, c = x.shape
        out_h, out_w = (h - 2) // 2 + 1, (w - 2) // 2 + 1  # of the (h+1) x (w+1) padded input
        rows = self._rows(b, out_w, c, 3, out_h)
        out = None
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            # output row r reads padded input rows 2r .. 2r + 2; row h is the zero padding
            band = x[:, 2 * r0 : min(h, 2 * r1 + 1)]
            bottom = 2 * r1 + 1 - (2 * r0 + band.shape[1])
            band = mx.pad(band, [(0, 0), (0, bottom), (0, 1), (0, 0)])
            y = mx.conv2d(band, conv.weight, stride=2) + conv.bias
            out = self._store(out, y, (b, out_h, out_w), r0, r1)
        return out

    @staticmethod
    def norm_silu(norm: nn.GroupNorm, x: mx.array):
        """GroupNorm with the whole activation's statistics, then SiLU, as a per-tile function."""
        b, h, w, c = x.shape
        rows = max(1, (64 << 20) // (b * w * c * 4))  # statistics over bands of ~64 MiB

        def groups(t):
            return t.astype(mx.float32).reshape(b, -1, 32, c // 32)

        def total(fn):
            parts = [fn(groups(x[:, r : r + rows])) for r in range(0, h, rows)]
            acc = parts[0]
            for p in parts[1:]:
                acc = acc + p
                mx.eval(acc)
            return acc / (h * w * (c // 32))

        mean = total(lambda g: mx.sum(g, axis=(1, 3), keepdims=True))
        var = total(lambda g: mx.sum(mx.square(g - mean), axis=(1, 3), keepdims=True))
        mx.eval(mean, var)

        def apply(t: mx.array) -> mx.array:
            y = ((groups(t) - mean) * mx.rsqrt(var + norm.eps)).reshape(t.shape)
            return nn.silu(y * norm.weight + norm.bias).astype(t.dtype)

        return apply

    def resnet(self, block: ResnetBlock, x: mx.array) -> mx.array:
        h = self.conv(block.conv1, x, self.norm_silu(block.norm1, x))

        def skip(r0: int, r1: int) -> mx.array:  # the shortcut, added tile by tile
            rows = x[:, r0:r1]
            return block.nin_shortcut(rows) if "nin_shortcut" in block else rows

        return self.conv(block.conv2, h, self.norm_silu(block.norm2, h), residual=skip)

    def decoder_tail(self, decoder: Decoder, h: mx.array) -> mx.array:
        """`Decoder.tail`, tile by tile."""
        for level in reversed(decoder.up):
            for block in level.block:
                h = self.resnet(block, h)
                progress.advance(h)
            if "upsample" in level:
                h = self.conv(level.upsample.conv, h, upsample=True)
                progress.advance(h)
        out = self.conv(decoder.conv_out, h, self.norm_silu(decoder.norm_out, h))
        progress.advance(out)
        return out

    def encoder(self, encoder: Encoder, x: mx.array) -> mx.array:
        """`Encoder.__call__`, tile by tile but for the mid block (1/8 resolution, attention)."""
        h = self.conv(encoder.conv_in, x)
        for level in encoder.down:
            for block in level.block:
                h = self.resnet(block, h)
                progress.advance(h)
            if "downsample" in level:
                h = self.downsample(level.downsample.conv, h)
                progress.advance(h)
        h = encoder.mid(h)
        out = self.conv(encoder.conv_out, h, self.norm_silu(encoder.norm_out, h))
        progress.advance(out)
        return out


def estimate_decode_bytes(height: int, width: int, cfg: AutoencoderConfig, itemsize: int) -> int:
    """A rough peak for untiled decoding of a height x width image.

    Measured with bench/vae_memory.py on the CPU backend: ~27.5 GiB of activations at
    1024x1024 in fp32, about 52 full-resolution activations of `ch` channels (the convolutions'
    working copies dominate).
    """
    return 52 * height * width * cfg.ch * itemsize
