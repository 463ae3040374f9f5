"""Model upscaling, as ComfyUI's UpscaleModelLoader -> ImageUpscaleWithModel does it: the model
file read and recognised as spandrel recognises it, the picture run through it in tiles of 512
with an overlap of 32, blended as `comfy.utils.tiled_scale` blends them, clamped to 0..1.

Two architectures, in MLX (NHWC):

    ESRGAN / RRDBNet   4x-UltraSharp and other "old arch" files (model.0, model.1.sub.N.RDB1...),
                       Real-ESRGAN x4plus / x2plus and BSRGAN "new arch" (conv_first, body.N.rdb1
                       or RRDB_trunk.N.RDB1, conv_body, conv_up1, conv_hr, conv_last); x2plus
                       runs its x4 network on the pixel-unshuffled picture
    SRVGGNetCompact    realesr-general-x4v3, realesr-animevideov3 (body.N, PReLU)

A `.pth` is read without running its pickle (`convert.pth_io`); `.safetensors` as they are. A
file of another architecture is refused in one line naming what its keys look like.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MlxfluxError
from .kernels import Kernels, choose

TILE, OVERLAP = 512, 32  # ComfyUI's ImageUpscaleWithModel


class UpscaleError(MlxfluxError, ValueError):
    """A model file that is not an upscaler mlxflux runs; the message names the file."""


def _lrelu(x: mx.array) -> mx.array:
    return nn.leaky_relu(x, 0.2)


class DenseBlock(nn.Module):
    """ESRGAN's ResidualDenseBlock_5C: five convolutions, each seeing all earlier outputs."""

    def __init__(self, nf: int, gc: int = 32):
        super().__init__()
        self.convs = [nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1) for i in range(5)]

    def __call__(self, x: mx.array, k: Kernels) -> mx.array:
        feats = [x]
        for i, conv in enumerate(self.convs):
            y = k.conv3x3(conv, mx.concatenate(feats, axis=-1))
            if i < 4:
                feats.append(_lrelu(y))
        return y * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int):
        super().__init__()
        self.rdbs = [DenseBlock(nf) for _ in range(3)]

    def __call__(self, x: mx.array, k: Kernels) -> mx.array:
        h = x
        for rdb in self.rdbs:
            h = rdb(h, k)
        return h * 0.2 + x


class RRDBNet(nn.Module):
    """spandrel's ESRGAN (the old-arch layout every RRDBNet file is read into)."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, nb: int, ups: int, shuffle: int):
        super().__init__()
        self.shuffle, self.scale = shuffle, 2**ups // max(shuffle, 1)
        self.conv_first = nn.Conv2d(in_nc, nf, 3, padding=1)
        self.body = [RRDB(nf) for _ in range(nb)]
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        self.ups = [nn.Conv2d(nf, nf, 3, padding=1) for _ in range(ups)]
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        h, w = x.shape[1], x.shape[2]
        if self.shuffle:
            x = _pixel_unshuffle(_pad_reflect(x, self.shuffle), self.shuffle)
        k = self.kernels
        fea = k.conv3x3(self.conv_first, x)
        trunk = fea
        for block in self.body:
            trunk = block(trunk, k)
            mx.eval(trunk)  # one block's activations at a time
        fea = fea + k.conv3x3(self.conv_body, trunk)
        for conv in self.ups:
            fea = _lrelu(k.conv3x3(conv, _nearest(fea, 2)))
        out = k.conv3x3(self.conv_last, _lrelu(k.conv3x3(self.conv_hr, fea)))
        return out[:, : h * self.scale, : w * self.scale] if self.shuffle else out


class Compact(nn.Module):
    """SRVGGNetCompact: convolutions with PReLU at the input size, pixel shuffle, plus the
    nearest-upscaled input."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, num_conv: int, scale: int):
        super().__init__()
        self.scale = scale
        self.convs = [nn.Conv2d(in_nc, nf, 3, padding=1)]
        self.convs += [nn.Conv2d(nf, nf, 3, padding=1) for _ in range(num_conv)]
        self.slopes = [mx.zeros((nf,)) for _ in range(num_conv + 1)]
        self.conv_last = nn.Conv2d(nf, out_nc * scale * scale, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        h, k = x, self.kernels
        for conv, slope in zip(self.convs, self.slopes, strict=True):
            h = k.conv3x3(conv, h)
            h = mx.where(h >= 0, h, h * slope)
        out = _pixel_shuffle(k.conv3x3(self.conv_last, h), self.scale)
        return out + _nearest(x, self.scale)


def _nearest(x: mx.array, f: int) -> mx.array:
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c))
    return x.reshape(b, h * f, w * f, c)


def _pixel_shuffle(x: mx.array, f: int) -> mx.array:
    """torch's pixel_shuffle in NHWC: channel c*f*f + i*f + j goes to (h*f + i, w*f + j, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (f * f), f, f).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * f, w * f, c // (f * f))


def _pixel_unshuffle(x: mx.array, f: int) -> mx.array:
    """torch's pixel_unshuffle in NHWC: the inverse of `_pixel_shuffle`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // f, w // f, c * f * f)


def _pad_reflect(x: mx.array, multiple: int) -> mx.array:
    """spandrel's pad_to_multiple (reflect) on the bottom and right."""
    ph, pw = -x.shape[1] % multiple, -x.shape[2] % multiple
    if ph:
        x = mx.concatenate([x, x[:, -2 : -2 - ph : -1]], axis=1)
    if pw:
        x = mx.concatenate([x, x[:, :, -2 : -2 - pw : -1]], axis=2)
    return x


# ---- reading a model file --------------------------------------------------------------------


@dataclass
class Upscaler:
    """A loaded upscale model: its network, native factor, file name and architecture."""

    net: nn.Module
    scale: int
    name: str
    architecture: str

    def __call__(self, x: mx.array) -> mx.array:
        return self.net(x)


def _conv(weights: dict, key: str) -> list[tuple[str, mx.array]]:
    w = weights[f"{key}.weight"]
    return [("weight", mx.array(np.ascontiguousarray(w.transpose(0, 2, 3, 1)), mx.float32)),
            ("bias", mx.array(weights[f"{key}.bias"], mx.float32))]  # fmt: skip


_NEW_BLOCK = re.compile(r"^(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d)\.(weight|bias)$")
_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")


def _rrdb_keys(sd: dict) -> dict:
    """Any RRDBNet layout as (name -> array) in this module's names."""
    out = {}
    if "conv_first.weight" in sd:  # new arch: Real-ESRGAN, BSRGAN
        for k, v in sd.items():
            m = _NEW_BLOCK.match(k)
            if m:
                out[f"body.{m[1]}.rdbs.{int(m[2]) - 1}.convs.{int(m[3]) - 1}.{m[4]}"] = v
        renames = {"conv_first": "conv_first", "conv_body": "conv_body", "trunk_conv": "conv_body",
                   "conv_hr": "conv_hr", "HRconv": "conv_hr", "conv_last": "conv_last"}  # fmt: skip
        for src, dst in renames.items():
            for kind in ("weight", "bias"):
                if f"{src}.{kind}" in sd:
                    out[f"{dst}.{kind}"] = sd[f"{src}.{kind}"]
        for k, v in sd.items():
            m = re.match(r"^(?:conv_up|upconv)(\d)\.(weight|bias)$", k)
            if m:
                out[f"ups.{int(m[1]) - 1}.{m[2]}"] = v
        return out
    nb = 1 + max(int(m[1]) for k in sd if (m := _OLD_BLOCK.match(k)))
    seq = sorted({int(k.split(".")[1]) for k in sd if re.match(r"^model\.\d+\.", k)})
    last = seq[-1]  # conv_last at model.(3n + 4), conv_hr at 3n + 2, the ups at 3, 6, ...
    for k, v in sd.items():
        m = _OLD_BLOCK.match(k)
        if m:
            out[f"body.{m[1]}.rdbs.{int(m[2]) - 1}.convs.{int(m[3]) - 1}.{m[4]}"] = v
            continue
        m = re.match(r"^model\.(\d+)\.(?:sub\.(\d+)\.)?(weight|bias)$", k)
        if not m:
            continue
        i = int(m[1])
        if i == 0:
            out[f"conv_first.{m[3]}"] = v
        elif i == 1 and m[2] is not None and int(m[2]) == nb:
            out[f"conv_body.{m[3]}"] = v
        elif i == last:
            out[f"conv_last.{m[3]}"] = v
        elif i == last - 2:
            out[f"conv_hr.{m[3]}"] = v
        elif i % 3 == 0:
            out[f"ups.{i // 3 - 1}.{m[3]}"] = v
    return out


def _build_rrdb(sd: dict) -> tuple[nn.Module, int]:
    keys = _rrdb_keys(sd)
    nb = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("body."))
    ups = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("ups.")), default=-1)
    in_nc, nf = keys["conv_first.weight"].shape[1], keys["conv_first.weight"].shape[0]
    out_nc = keys["conv_last.weight"].shape[0]
    shuffle = int(math.isqrt(in_nc // out_nc)) if in_nc in (out_nc * 4, out_nc * 16) else 0
    net = RRDBNet(in_nc, out_nc, nf, nb, ups, shuffle)
    params = []
    for name in {k.rsplit(".", 1)[0] for k in keys}:
        params += [(f"{name}.{kind}", a) for kind, a in _conv(keys, name)]
    net.load_weights(params, strict=True)
    return net, net.scale


def _build_compact(sd: dict) -> tuple[nn.Module, int]:
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    in_nc, nf = sd["body.0.weight"].shape[1], sd["body.0.weight"].shape[0]
    num_conv = (last - 2) // 2
    shuffled = sd[f"body.{last}.weight"].shape[0]
    scale = next(s for s in (1, 2, 3, 4, 8) if shuffled == in_nc * s * s)
    net = Compact(in_nc, shuffled // (scale * scale), nf, num_conv, scale)
    params = []
    for i in range(num_conv + 1):
        params += [(f"convs.{i}.{kind}", a) for kind, a in _conv(sd, f"body.{2 * i}")]
        params.append((f"slopes.{i}", mx.array(sd[f"body.{2 * i + 1}.weight"], mx.float32)))
    params += [(f"conv_last.{kind}", a) for kind, a in _conv(sd, f"body.{last}")]
    net.load_weights(params, strict=True)
    return net, scale


def load_upscaler(path: str | Path) -> Upscaler:
    """The upscale model in `path` (.pth or .safetensors); UpscaleError in one line."""
    path = Path(path).expanduser()
    sd = _read(path)
    if "params_ema" in sd and isinstance(sd["params_ema"], dict):
        sd = sd["params_ema"]
    elif "params" in sd and isinstance(sd["params"], dict):
        sd = sd["params"]
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, np.ndarray)}
    try:
        if "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd:
            net, scale = _build_rrdb(sd)
            arch = "ESRGAN (RRDBNet)"
        elif "conv_first.weight" in sd and ("body.0.rdb1.conv1.weight" in sd
                                            or "RRDB_trunk.0.RDB1.conv1.weight" in sd):  # fmt: skip
            net, scale = _build_rrdb(sd)
            arch = "Real-ESRGAN (RRDBNet)"
        elif "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].ndim == 1:
            net, scale = _build_compact(sd)
            arch = "SRVGGNetCompact"
        else:
            sample = ", ".join(sorted(sd)[:3]) or "none"
            raise UpscaleError(f"{path}: not an ESRGAN/RRDBNet or SRVGGNetCompact upscaler "
                               f"(keys like {sample})")  # fmt: skip
    except (KeyError, ValueError, IndexError, StopIteration) as e:
        if isinstance(e, UpscaleError):
            raise
        raise UpscaleError(f"{path}: an upscaler with missing or misshapen weights ({e})") from None
    net.kernels = choose()  # 3x3 convolutions as BLAS matmuls on the CPU (`Kernels.conv3x3`)
    return Upscaler(net, scale, path.name, arch)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UpscaleError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from .safetensors_io import SafetensorsError, SafetensorsFile

        try:
            file = SafetensorsFile(path)
            return {k: np.array(file.read_float32(k)) for k in file.tensors}
        except SafetensorsError as e:
            raise UpscaleError(str(e)) from None
    from .convert.pth_io import PthError, read_pth

    try:
        return read_pth(path, nested=True)
    except PthError as e:
        raise UpscaleError(str(e)) from None


# ---- ComfyUI's tiles -----------------------------------------------------------------------


def feather_mask(shape: tuple[int, int], feather: int) -> np.ndarray:
    """tiled_scale's blend weights for a tile of `shape`: 1, ramping down to 1/feather over
    `feather` pixels at each edge (an axis no longer than the ramp is left flat)."""
    mask = np.ones(shape, np.float32)
    for axis in (0, 1):
        if feather >= mask.shape[axis]:
            continue
        ramp = (np.arange(feather, dtype=np.float32) + 1) / feather
        view = np.moveaxis(mask, axis, 0)
        view[:feather] *= ramp[:, None]
        view[::-1][:feather] *= ramp[:, None]
    return mask


def tiled(x: np.ndarray, fn, scale: int, tile: int = TILE, overlap: int = OVERLAP,
          on_tile=None) -> np.ndarray:  # fmt: skip
    """`comfy.utils.tiled_scale` on one picture x [H, W, C] (float32): fn on overlapping tiles,
    each weighted by a mask that ramps over `overlap * scale` pixels at its edges, summed and
    divided by the summed masks. A picture within one tile runs whole. `on_tile(done, total)`."""
    if tile <= overlap:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
    h, w, c = x.shape
    if h <= tile and w <= tile:
        out = fn(x)
        if on_tile:
            on_tile(1, 1)
        return out
    out = np.zeros((round(h * scale), round(w * scale), c), np.float32)
    div = np.zeros_like(out)
    rows = range(0, h - overlap, tile - overlap) if h > tile else [0]
    cols = range(0, w - overlap, tile - overlap) if w > tile else [0]
    total, done = len(rows) * len(cols), 0
    for y0 in rows:
        for x0 in cols:
            y = max(0, min(h - overlap, y0))
            xx = max(0, min(w - overlap, x0))
            part = x[y : y + min(tile, h - y), xx : xx + min(tile, w - xx)]
            ps = fn(part)
            mask = feather_mask(ps.shape[:2], round(overlap * scale))
            oy, ox = round(y * scale), round(xx * scale)
            out[oy : oy + ps.shape[0], ox : ox + ps.shape[1]] += ps * mask[..., None]
            div[oy : oy + ps.shape[0], ox : ox + ps.shape[1]] += mask[..., None]
            done += 1
            if on_tile:
                on_tile(done, total)
    return out / div


def output_size(width: int, height: int, model: Upscaler, scale: float | None) -> tuple[int, int]:
    """The size `upscale` makes of a width x height picture: the model's factor, or `scale`
    (rounded, as ImageScaleBy's Lanczos resize)."""
    if scale is None or scale == model.scale:
        return width * model.scale, height * model.scale
    return round(width * scale), round(height * scale)


def upscale(image, model: str | Path | Upscaler, scale: float | None = None, tile: int = TILE,
            overlap: int = OVERLAP, on_tile=None):  # fmt: skip
    """The picture (PIL, or a path) upscaled by the model (a file or a loaded `Upscaler`), as
    ComfyUI's ImageUpscaleWithModel draws it; `scale` below the model's own factor resizes the
    result with Lanczos (ComfyUI's ImageScaleBy), above it is refused. A PIL image back."""
    from PIL import Image

    model = model if isinstance(model, Upscaler) else load_upscaler(model)
    if scale is not None and not 0 < scale <= model.scale:
        raise UpscaleError(f"scale {scale:g}: {model.name} upscales by {model.scale}; "
                           f"give at most {model.scale}")  # fmt: skip
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    x = np.asarray(image.convert("RGB"), np.float32) / 255.0

    def run(part: np.ndarray) -> np.ndarray:
        y = model(mx.array(part)[None])
        return np.array(y[0].astype(mx.float32))

    out = np.clip(tiled(x, run, model.scale, tile, overlap, on_tile), 0, 1)
    result = Image.fromarray((out * 255).astype(np.uint8))  # SaveImage truncates
    if scale is not None and scale != model.scale:
        result = result.resize(output_size(image.width, image.height, model, scale), Image.LANCZOS)
    return result
