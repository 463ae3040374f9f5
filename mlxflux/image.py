"""Writing PNGs: parameters in metadata, never overwriting, atomically."""

import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin


def parameters_text(s: dict) -> str:
    """The `parameters` chunk as A1111/Forge write it, which most image tools read."""
    lines = [
        s["prompt"],
        f"Steps: {s['steps']}, Sampler: {s['sampler']}, Schedule type: {s['scheduler']}, "
        f"CFG scale: {s['cfg']}, Distilled CFG Scale: {s['guidance']}, Seed: {s['seed']}, "
        f"Size: {s['width']}x{s['height']}, Shift: {s['shift']}, T5 padding: {s['t5_padding']}, "
        f"Model: {s.get('model', 'flux1-dev')} ({s.get('model_id', '')}), "
        f"Precision: {s.get('precision', '')}, "
        f"Version: mlxflux {s.get('version', '')}",
    ]
    if s.get("init_image"):  # A1111's name for img2img's denoise
        lines[1] += (
            f", Denoising strength: {s['denoise']}, Init image: {s['init_image']} "
            f"(sha256 {s['init_image_sha256'][:16]})"
        )
    for ref in s.get("reference_images", []):  # Kontext
        lines[1] += f", Reference image: {ref['file']} (sha256 {ref['sha256'][:16]})"
    if s.get("control_image"):  # Canny / Depth
        c = s["control_image"]
        lines[1] += (f", Control image: {c['file']} (sha256 {c['sha256'][:16]}), "
                     f"Preprocess: {s.get('preprocess', 'none')}")  # fmt: skip
    if s.get("mask"):  # Fill
        lines[1] += f", Mask: {s['mask']['file']} (sha256 {s['mask']['sha256'][:16]})"
    if s.get("outpaint"):
        lines[1] += ", Outpaint: centred"
    return "\n".join(lines)


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def save_png(
    image: Image.Image, path: str | os.PathLike, settings: dict, extra: dict | None = None
) -> Path:
    """Write `image` with its settings; if `path` exists, pick `name-1.png`, `name-2.png`, ...

    The file is written under a temporary name in the same folder and linked into place, so a
    crash or Ctrl-C never leaves a partial PNG and an existing file is never replaced.
    """
    chunks = {"parameters": parameters_text(settings), "mlxflux": json.dumps(settings)}
    chunks.update(extra or {})  # ComfyUI's `prompt` and `workflow` graphs
    return write_png(image, path, chunks)


def write_png(image: Image.Image, path: str | os.PathLike, chunks: dict[str, str]) -> Path:
    """`save_png`'s atomic, never-overwriting write, with these text chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    from .weights import remove_stale

    remove_stale(path.parent, f".{path.stem}.tmp-")  # left by a killed process
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=".png",
                               dir=path.parent)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        for i in range(10_000):
            target = path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")
            try:
                os.link(tmp, target)  # fails if target exists: never overwrite
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"{path}: too many files with this name")
    finally:
        os.unlink(tmp)


def open_image(source, setting: str = "init_image") -> tuple[Image.Image, str, str]:
    """(RGB image, name, sha256) from a PIL image or a path: the file's sha256, or for a PIL
    image its pixels'. SettingsError (named `setting`) names a file that is missing or no image."""
    import hashlib

    from .errors import SettingsError

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
        raise SettingsError(f"{path}: not a readable image ({first})", setting) from None
    return rgb, path.name, hashlib.sha256(data).hexdigest()


MAX_PIXELS = 64_000_000  # 8000 x 8000: an RGB copy is 192 MB; a cover scan is ~10-40 MP


def _to_rgb(img: Image.Image) -> Image.Image:
    """As ComfyUI's LoadImage: the EXIF orientation applied, 32-bit integer pixels scaled by
    1/255, then RGB (alpha dropped, CMYK and palettes converted)."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode == "I":
        img = img.point(lambda v: v * (1 / 255))
    return img.convert("RGB")


def unit_pixels(image: Image.Image):
    """ComfyUI's LoadImage: an image's uint8 values / 255, float32 [H, W, C]."""
    import numpy as np

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


def caption(settings: dict | None, fallback: str) -> list[str]:
    """Two short lines for a sheet, from an mlxflux PNG's settings (None: not one of ours)."""
    if not settings:
        return [fallback, "original"]
    title = settings.get("preset") or settings["prompt"][:32].rstrip() + "..."
    line = f"seed {settings['seed']}, {settings['steps']} steps, {settings['scheduler']}"
    if settings.get("init_image"):
        line += f", denoise {settings['denoise']}"
    return [title, line]


def contact_sheet(
    paths: list[Path], height: int = 512, middle=None
) -> tuple[Image.Image, list[dict]]:
    """The images side by side at the same height, each captioned below from its metadata.
    `middle`: a column after the original that explains the results: "canny" (the original's
    edges, as ComfyUI's Canny node draws them) or an image file (a depth map, a mask)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, height // 32))
    pad, line_h = max(8, height // 48), int(font.size * 1.3)
    pictures = []  # (rgb, caption lines, description)
    for path in paths:
        rgb, name, _ = open_image(path)
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get("mlxflux")
        try:
            settings = json.loads(text) if text else None
        except json.JSONDecodeError:  # not written by mlxflux after all: caption the file name
            settings = None
        pictures.append((rgb, caption(settings, name), {"file": name, "settings": settings}))
    if middle is not None:
        pictures.insert(1, _middle_column(middle, pictures[0][0]))
    tiles, described = [], []
    for rgb, lines, description in pictures:
        width = max(1, round(rgb.width * height / rgb.height))
        tiles.append((rgb.resize((width, height), Image.Resampling.LANCZOS), lines))
        described.append(description)
    wrapped = [wrap(lines, font, tile.width) for tile, lines in tiles]
    total_w = sum(t.width for t, _ in tiles) + pad * (len(tiles) + 1)
    text_h = max(len(w) for w in wrapped) * line_h
    sheet = Image.new("RGB", (total_w, height + 3 * pad + text_h), "white")
    draw, x = ImageDraw.Draw(sheet), pad
    for (tile, _), lines in zip(tiles, wrapped, strict=True):
        sheet.paste(tile, (x, pad))
        for i, text in enumerate(lines):
            draw.text((x, height + 2 * pad + i * line_h), text, fill="black", font=font)
        x += tile.width + pad
    return sheet, described


def _middle_column(middle, original: Image.Image) -> tuple[Image.Image, list[str], dict]:
    if str(middle) == "canny":
        from .preprocess import canny_image

        return (canny_image(original), ["Canny edges", "as ComfyUI's Canny node"],
                {"file": "canny(original)", "settings": None})  # fmt: skip
    rgb, name, _ = open_image(middle, "map")
    return rgb, [name, "control map / mask"], {"file": name, "settings": None}


def wrap(lines: list[str], font, width: int) -> list[str]:
    """Each caption line broken at spaces so that it fits `width` pixels."""
    out = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            trial = f"{current} {word}".strip()
            if current and font.getlength(trial) > width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    return out
