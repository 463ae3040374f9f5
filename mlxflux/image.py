"""Writing PNGs: parameters in metadata, never overwriting, atomically."""

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin


def parameters_text(s: dict) -> str:
    """The `parameters` chunk as A1111/Forge write it, which most image tools read."""
    lines = [
        s["prompt"],
        f"Steps: {s['steps']}, Sampler: {s['sampler']}, Schedule type: {s['scheduler']}, "
        f"CFG scale: {s['cfg']}, Distilled CFG Scale: {s['guidance']}, Seed: {s['seed']}, "
        f"Size: {s['width']}x{s['height']}, Shift: {s['shift']}, T5 padding: {s['t5_padding']}, "
        f"Model: flux1-dev ({s.get('model_id', '')}), Version: mlxflux {s.get('version', '')}",
    ]
    return "\n".join(lines)


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def default_name(settings: dict, preset: str | None) -> str:
    return f"{preset or slug(settings['prompt'])}-{settings['seed']}.png"


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict) -> Path:
    """Write `image` with its settings; if `path` exists, pick `name-1.png`, `name-2.png`, ...

    The file is written under a temporary name in the same folder and linked into place, so a
    crash or Ctrl-C never leaves a partial PNG and an existing file is never replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(settings))
    info.add_text("mlxflux", json.dumps(settings))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
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
