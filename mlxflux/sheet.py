"""Before/after sheets (`mlxflux compare`): the original cover and its re-imagined versions side
by side, each captioned from its PNG's settings."""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .pixels import open_image
from .preprocess import canny_image


def caption(settings: dict | None, fallback: str) -> list[str]:
    """Two short lines for a sheet, from an mlxflux PNG's settings (None: not one of ours)."""
    if not settings:
        return [fallback, "original"]
    title = settings.get("preset") or settings["prompt"][:32].rstrip() + "..."
    line = f"seed {settings['seed']}, {settings['steps']} steps, {settings['scheduler']}"
    if settings.get("init_image"):
        line += f", denoise {settings['denoise']}"
    if settings.get("redux_images"):
        strengths = "/".join(f"{r['strength']:g}" for r in settings["redux_images"])
        line += f", Redux x{strengths}"
    if settings.get("upscale_model"):
        line += f", {settings['upscale_model']} {settings['scale']:g}x"
    return [title, line]


def contact_sheet(
    paths: list[Path], height: int = 512, middle=None
) -> tuple[Image.Image, list[dict]]:
    """The images side by side at the same height, each captioned below from its metadata.
    `middle`: a column after the original that explains the results: "canny" (the original's
    edges, as ComfyUI's Canny node draws them) or an image file (a depth map, a mask)."""
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
