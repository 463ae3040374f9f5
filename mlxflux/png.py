"""Writing PNGs: the generation's settings in text chunks, never overwriting, atomically."""

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from .atomic import remove_stale
from .variants import FAMILIES


def parameters_text(s: dict) -> str:
    """The `parameters` chunk as A1111/Forge write it, which most image tools read."""
    lines = [
        s["prompt"],
        f"Steps: {s['steps']}, Sampler: {s['sampler']}, Schedule type: {s['scheduler']}, "
        f"CFG scale: {s['cfg']}, Distilled CFG Scale: {s['guidance']}, Seed: {s['seed']}, "
        f"Size: {s['width']}x{s['height']}, Shift: {s['shift']}, T5 padding: {s['t5_padding']}, "
        f"Prompt syntax: {s.get('prompt_syntax', 'comfy')}, "
        f"Model: {s.get('model', 'flux1-dev')} ({s.get('model_id', '')}), "
        f"Precision: {s.get('precision', '')}, "
        f"Version: mlxflux {s.get('version', '')}",
    ]
    if s.get("init_image"):  # A1111's name for img2img's denoise
        lines[1] += (
            f", Denoising strength: {s['denoise']}, Init image: {s['init_image']} "
            f"(sha256 {s['init_image_sha256'][:16]})"
        )
    for family in FAMILIES:  # what each variant's inputs were (Kontext, Canny/Depth, Fill)
        lines[1] += family.parameters(s)
    if s.get("redux_images"):  # ComfyUI's StyleModelApply per image
        parts = ", ".join(f"{r['file']} x {r['strength']:g}" for r in s["redux_images"])
        lines[1] += (f", Redux: {parts} ({s.get('redux_strength_type', 'multiply')}, crop "
                     f"{s.get('redux_crop', 'center')})")  # fmt: skip
    if s.get("upscale_model"):  # a model upscale (then the refine, as image to image above)
        lines[1] += (f", Upscaler: {s['upscale_model']} (sha256 {s['upscale_model_sha256'][:16]})"
                     f", Upscale by: {s['scale']:g}, Source: {s['source']}")  # fmt: skip
    if s.get("refine"):
        r = s["refine"]
        lines[1] += f", Refine: {r['tiles']} tiles of {r['tile'][0]}x{r['tile'][1]}"
    if s.get("cache"):
        span = s.get("cache_range")
        lines[1] += f", Step cache: {s['cache']} {s['cache_threshold']:g}" + (
            f" ({span[0]:g}-{span[1]:g})" if span else ""
        )
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


def replace_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` at `path`, replacing what is there in one step (a viewer watching the
    file never sees half of it): a preview rewritten after every step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=".png",
                               dir=path.parent)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_png(image: Image.Image, path: str | os.PathLike, chunks: dict[str, str]) -> Path:
    """`save_png`'s atomic, never-overwriting write, with these text chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
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
