"""The checks of a request's fields (`request.GenerationRequest`): each takes (value, name)
and returns the value as the request keeps it, or raises SettingsError naming the field."""

import math
import os
from pathlib import Path

import numpy as np

from .errors import SettingsError
from .pixels import Picture
from .redux import parse_strength

MAX_SEED = 2**64 - 1
NO_PROMPT = "give a prompt, or a preset that has one (see `mlxflux presets`)"


def _choice(options):
    def check(value, name):
        if value not in options:
            raise SettingsError(f"must be one of {', '.join(options)}, got {value!r}", name)
        return value

    return check


def _whole(low: int, high: int | None = None, optional: bool = True):
    def check(value, name):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SettingsError(f"must be a whole number of at least {low}, got {value!r}", name)
        if high is not None and value > high:
            raise SettingsError(f"must be at most {high}, got {value}", name)
        return value

    return check


def _number(low: float, high: float, low_open: bool = False, optional: bool = True):
    def check(value, name):
        if value is None and optional:
            return None
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        if fits and (value > low if low_open else value >= low) and value <= high:
            return float(value) if isinstance(value, float) else value
        if low_open:
            raise SettingsError(f"must be above {low:g} and at most {high:g}, got {value!r}", name)
        raise SettingsError(
            f"must be a finite number from {low:g} to {high:g}, got {value!r}", name
        )

    return check


def _text(value, name):
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(NO_PROMPT, name)
    return value


def _shift(value, name):
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SettingsError(f"{value!r} is not a number or 'auto'", name) from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise SettingsError(f"must be a finite number above 0 or 'auto', got {value!r}", name)
    return value


def _seeds(value, name):
    seeds = (value,) if isinstance(value, int) else tuple(value)
    if not seeds:
        raise SettingsError("give at least one seed", name)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise SettingsError(f"{s!r} is not a whole number in 0..2**64-1", name)
    return seeds


def parse_lora(spec) -> tuple[Path, float, float]:
    """FILE[:SCALE[:CLIP_SCALE]] -> (path, scale, clip_scale): a colon followed by a number is
    a scale; CLIP_SCALE (the text encoders' strength, ComfyUI's strength_clip) is SCALE unless
    given."""
    text, numbers = str(spec), []
    while len(numbers) < 2:
        text, number = split_number(text)
        if number is None:
            break  # a colon in the file name: the rest is the path
        numbers.insert(0, float(number))
    if not numbers:
        return Path(spec), 1.0, 1.0
    return Path(text), numbers[0], numbers[-1]


def split_number(text: str) -> tuple[str, str | None]:
    """NAME:NUMBER -> (NAME, NUMBER); any other text -> (text, None). A colon that is not
    followed by a number is the name's own (a:b.png, C:\\covers)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and is_number(tail):
        return head, tail
    return text, None


def is_number(value) -> bool:
    """Whether float(value) gives a number (a numeric string, an int, a float)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _loras(value, name):
    out = []
    for item in value:
        if isinstance(item, (str, os.PathLike)):
            out.append(parse_lora(item))
            continue
        try:
            path, scale, *clip = item
            if len(clip) > 1:
                raise ValueError
            out.append((Path(path), float(scale), float(clip[0]) if clip else float(scale)))
        except (TypeError, ValueError):
            raise SettingsError(f"{item!r} is not (path, scale[, clip_scale]) or "
                                "FILE[:SCALE[:CLIP_SCALE]]", name) from None  # fmt: skip
    return tuple(out)


def _picture(value, name):
    return None if value is None else Picture.of(value, name)


def _pictures(value, name):
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, Picture)) or hasattr(value, "convert"):
        value = [value]
    return tuple(Picture.of(v, name) for v in value)


def _redux_images(value, name):
    """IMAGE[:STRENGTH] strings, (image, strength) pairs or images (strength 1) -> a tuple of
    (Picture, strength)."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, Picture)) or hasattr(value, "convert"):
        value = [value]
    out = []
    for item in value:
        strength = 1.0
        if isinstance(item, str):
            item, number = split_number(item)
            strength = strength if number is None else number
        elif isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise SettingsError(f"{item!r} is not (image, strength)", name)
            item, strength = item
        out.append((Picture.of(item, name), parse_strength(strength, name)))
    return tuple(out)


def _range(value, name):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SettingsError(f"{value!r} is not START,END (two numbers from 0 to 1)", name) from None
    if not 0 <= start < end <= 1:
        raise SettingsError(f"must be START,END with 0 <= START < END <= 1, got {start:g},{end:g}",
                            name)  # fmt: skip
    return (start, end)


def _flag(value, name):
    return bool(value)


def _maybe_flag(value, name):
    return None if value is None else bool(value)


def _noise(value, name):
    return None if value is None else np.asarray(value, dtype=np.float32)


def _keep(value, name):
    return value
