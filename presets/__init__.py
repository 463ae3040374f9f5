"""Cover presets: one TOML file each, shipped as package data of mlxflux (read when asked for)."""

import tomllib
from importlib import resources

from mlxflux.errors import MlxfluxError

SETTINGS = ("prompt", "width", "height", "steps", "guidance", "scheduler")


class PresetError(MlxfluxError, ValueError):
    pass


# what a preset file must hold, and the types of what it may hold
REQUIRED = {"name": str, "title": str, "prompt": str, "width": int, "height": int, "steps": int,
            "guidance": (int, float), "scheduler": str}  # fmt: skip
OPTIONAL = {"aliases": list, "sampler": str, "cfg": (int, float), "denoise": (int, float),
            "shift": (int, float, str), "seed": int, "notes": str, "t5_padding": str,
            "cache": str, "cache_threshold": (int, float), "cache_range": list}  # fmt: skip


def parse_preset(text: str, source: str) -> dict:
    """A preset from TOML text; PresetError names `source` and what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{source}: not valid TOML ({e})") from None
    for key in REQUIRED:
        if key not in data:
            raise PresetError(f"{source}: no {key!r}")
    for key, value in data.items():
        kind = REQUIRED.get(key) or OPTIONAL.get(key)
        if kind is None:
            raise PresetError(f"{source}: unknown setting {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PresetError(f"{source}: {key!r} has the wrong type ({type(value).__name__})")
    if not all(isinstance(a, str) for a in data.get("aliases", [])):
        raise PresetError(f"{source}: 'aliases' must be a list of names")
    return data


def all_presets() -> dict[str, dict]:
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = parse_preset(entry.read_text(encoding="utf-8"), entry.name)
            out[data["name"]] = data
    return out


def get_preset(name: str) -> dict:
    presets = all_presets()
    for preset in presets.values():
        if name == preset["name"] or name in preset.get("aliases", []):
            return preset
    names = ", ".join(presets)
    raise PresetError(f"no preset {name!r}; presets are: {names} (see `mlxflux presets`)")
