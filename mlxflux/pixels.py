"""Input pictures: opened as ComfyUI's LoadImage opens them (EXIF orientation, RGB), checked,
hashed, and scaled or cropped to a generation's size."""

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import SettingsError


def open_image(source, setting: str = "init_image") -> tuple[Image.Image, str, str]:
    """(RGB image, name, sha256) from a PIL image or a path: the file's sha256, or for a PIL
    image its pixels'. SettingsError (named `setting`) names a file that is missing or no image."""
    if isinstance(source, Image.Image):
        rgb = _to_rgb(source)
        return rgb, "<PIL image>", hashlib.sha256(rgb.tobytes()).hexdigest()
    path = Path(source).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file", setting) from None
    except IsADirectoryError:
        raise SettingsError(f"{path}: is a folder, not an image", setting) from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot be read ({e.strerror or e})", setting) from None
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: refused below by our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:  # refused before a pixel is decoded
                raise SettingsError(
                    f"{path}: {w}x{h} is {w * h / 1e6:.0f} megapixels; mlxflux reads images up "
                    f"to {MAX_PIXELS / 1e6:.0f}", setting,
                )  # fmt: skip
            img.load()
            rgb = _to_rgb(img)
    except SettingsError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "UnidentifiedImageError" in type(e).__name__:  # its message holds the file's repr
            first = "not a format Pillow knows"
        first = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the file", first)  # no object reprs
        raise SettingsError(f"{path}: not a readable image ({first})", setting) from None
    return rgb, path.name, hashlib.sha256(data).hexdigest()


MAX_PIXELS = 64_000_000  # 8000 x 8000: an RGB copy is 192 MB; a cover scan is ~10-40 MP


def _to_rgb(img: Image.Image) -> Image.Image:
    """As ComfyUI's LoadImage: the EXIF orientation applied, 32-bit integer pixels scaled by
    1/255, then RGB (alpha dropped, CMYK and palettes converted)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "I":
        img = img.point(lambda v: v * (1 / 255))
    return img.convert("RGB")


def unit_pixels(image: Image.Image):
    """ComfyUI's LoadImage: an image's uint8 values / 255, float32 [H, W, C]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def size_of(image: Image.Image) -> tuple[int, int]:
    """An image's size rounded to the nearest multiples of 16 (at least 16)."""
    return tuple(max(16, round(v / 16) * 16) for v in image.size)


def cover(image: Image.Image, width: int, height: int,
          resample=Image.Resampling.LANCZOS) -> Image.Image:  # fmt: skip
    """Scale (Lanczos, or `resample`) to cover width x height, then crop the centre; no
    scaling when the image already has that size."""
    if image.size == (width, height):
        return image
    w, h = image.size
    s = max(width / w, height / h)
    sw, sh = max(width, round(w * s)), max(height, round(h * s))
    if (sw, sh) != (w, h):
        image = image.resize((sw, sh), resample)
    left, top = (sw - width) // 2, (sh - height) // 2
    return image.crop((left, top, left + width, top + height))


def open_init_image(source, setting: str = "init_image") -> tuple[Image.Image, str, str]:
    """(RGB image, name, sha256) of an input image (init image, reference, ...), refused
    (SettingsError naming `setting`) when it cannot be read or is smaller than 16x16."""
    image, name, digest = open_image(source, setting)
    if min(image.size) < 16:
        raise SettingsError(
            f"{name} is {image.width}x{image.height}: at least 16x16 is needed", setting
        )
    return image, name, digest


@dataclass(frozen=True)
class Picture:
    """An input image as given, opened once: the RGB image, its file name and sha256."""

    image: Image.Image
    name: str
    sha256: str

    @classmethod
    def of(cls, source, setting: str) -> "Picture":
        """`source` (a path, a PIL image, or a Picture) opened and checked (`open_init_image`);
        SettingsError names `setting`."""
        if isinstance(source, Picture):
            return source
        return cls(*open_init_image(source, setting))

    def record(self) -> dict:
        return {"file": self.name, "sha256": self.sha256}
