"""The front ends' layers, resolved in one place: defaults, then a preset, then an earlier PNG
(`--from-png`), then what was given (the CLI's flags, the page's fields), into one
`GenerationRequest`; the model's own defaults come last (`GenerationRequest.for_model`, in
`Pipeline.prepare`). Refusals are `SettingsError`s naming the parameter."""

import os

from .errors import SettingsError
from .request import IMG2IMG_DENOISE, MAX_SEED, NO_PROMPT, GenerationRequest

PRESET_KEYS = ("prompt", "width", "height", "steps", "guidance", "scheduler", "shift",
               "t5_padding", "prompt_syntax", "denoise", "cache", "cache_threshold",
               "cache_range", "redux_strength_type", "redux_crop")  # fmt: skip
IMAGE_KEYS = ("init_image", "reference_images", "control_image", "mask", "outpaint")


def resolve(given: dict, preset: str | None = None, png: dict | None = None) -> GenerationRequest:
    """The request of a front end: `given` (the flags or the page's fields, in the request's
    names; None where not given; "seed", "seeds" and "count" choose the seeds), over an earlier
    PNG's settings (`png_settings.read_png_settings`), over a preset's, over the defaults.

    The defaults that only a front end has: an init image changes 0.75 of the picture unless a
    denoise is given (Fill: all of it); a denoise without an init image is refused; the seed
    is random unless given (or the PNG's, when no seed is given at all)."""
    from .presets import PresetError, get_preset

    given = {k: v for k, v in given.items() if v is not None and v != () and v != []}
    png = dict(png or {})
    values, origins = {}, {}
    if preset:
        try:
            p = get_preset(preset)
        except PresetError as e:
            raise SettingsError(str(e), "preset") from None
        values.update({k: p[k] for k in PRESET_KEYS if k in p})
        origins.update(dict.fromkeys(values, "preset"))
    layer = {k: png[k] for k in PRESET_KEYS if k in png}
    values.update(layer)
    origins.update(dict.fromkeys(layer, "png"))
    seeds = seeds_of(given.pop("seeds", None), given.pop("count", None), given.pop("seed", None),
                     png.get("seed"))  # fmt: skip
    values.update(given)
    origins.update(dict.fromkeys(given, "given"))
    if "guidance" not in values:
        origins["guidance"] = "default"
    init = values.get("init_image")
    if init is None:
        if "denoise" in given:
            raise SettingsError("needs an init image (it sets how much of it changes)", "denoise")
        values["denoise"], origins["denoise"] = 1.0, "default"
    elif "denoise" not in given and (values.get("mask") or values.get("outpaint")):
        values["denoise"], origins["denoise"] = 1.0, "default"  # Fill: diffusers' strength 1
    elif "denoise" not in values:
        values["denoise"], origins["denoise"] = IMG2IMG_DENOISE, "default"
    if not values.get("prompt"):
        raise SettingsError(NO_PROMPT, "prompt")
    return GenerationRequest(**values, seeds=seeds, preset=preset, origins=origins)


def seeds_of(seeds=None, count=None, seed=None, fallback=None) -> tuple[int, ...]:
    """--seeds a,b,c (each once), or --count N from --seed (random when absent), or the one
    --seed; `fallback` (an earlier PNG's seed) when none of them is given."""
    if seeds is not None and (count is not None or seed is not None):
        other = "--count" if count is not None else "--seed"
        raise SettingsError(f"give either --seeds or {other}, not both", "seeds")
    if seeds is not None:
        parts = seeds.split(",") if isinstance(seeds, str) else list(seeds)
        out = []
        for part in parts:
            try:
                value = int(str(part).strip())
            except ValueError:
                raise SettingsError(f"{str(part).strip()!r} is not a whole number",
                                    "seeds") from None  # fmt: skip
            if not 0 <= value <= MAX_SEED:
                raise SettingsError(f"{value} is outside 0..2**64-1", "seeds")
            if value not in out:  # every seed is made once
                out.append(value)
        return tuple(out)
    if seed is None and count is None:
        seed = fallback
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise SettingsError(f"must be at least 1, got {count}", "count")
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(count or 1))
