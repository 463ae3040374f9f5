"""Cover presets: one TOML file each, shipped as package data of mlxflux (read when asked for)."""

import tomllib
from importlib import resources

from mlxflux.errors import MlxfluxError

SETTINGS = ("prompt", "width", "height", "steps", "guidance", "scheduler")


class PresetError(MlxfluxError, ValueError):
    pass


def all_presets() -> dict[str, dict]:
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[data["name"]] = data
    return out


def get_preset(name: str) -> dict:
    presets = all_presets()
    for preset in presets.values():
        if name == preset["name"] or name in preset.get("aliases", []):
            return preset
    names = ", ".join(presets)
    raise PresetError(f"no preset {name!r}; presets are: {names} (see `mlxflux presets`)")
