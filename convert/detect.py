"""What a checkpoint holds, read from its header (safetensors or GGUF), never its name."""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxflux.errors import MlxfluxError
from mlxflux.safetensors_io import SafetensorsError, SafetensorsFile

from .gguf_io import GGUFFile, is_gguf
from .keymaps import (
    assemble,
    bfl_transformer,
    bfl_vae,
    clip_text,
    diffusers_transformer,
    diffusers_vae,
    t5_encoder,
)

NAMES = {
    "transformer": "a FLUX transformer",
    "t5": "a T5 text encoder",
    "clip": "a CLIP-L text encoder",
    "vae": "a FLUX autoencoder (VAE)",
}

# prefixes of ComfyUI's all-in-one checkpoints, one per component
ALL_IN_ONE = {
    "model.diffusion_model.": "transformer",
    "text_encoders.clip_l.transformer.": "clip",
    "text_encoders.t5xxl.transformer.": "t5",
    "vae.": "vae",
    "first_stage_model.": "vae",
}


class SourceError(MlxfluxError, ValueError):
    """A source that cannot be converted; the message names the file and says what to do."""


@dataclass
class Part:
    """One component's tensors: some keys of one or more files, in one layout."""

    component: str
    layout: str  # bfl | diffusers | comfy-aio | hf
    files: list  # SafetensorsFile or GGUFFile: the same interface
    keys: dict = field(default_factory=dict)  # source key -> its file
    config: dict | None = None  # a diffusers / transformers config.json, when there is one
    scaled_fp8: bool = False
    bytes_read: int = 0  # for progress bars

    @property
    def name(self) -> str:
        paths = sorted({str(f.path) for f in self.files})
        return paths[0] if len(paths) == 1 else f"{Path(paths[0]).parent}/ ({len(paths)} files)"

    def mapper(self):
        if self.component == "transformer":
            return diffusers_transformer if self.layout == "diffusers" else bfl_transformer
        if self.component == "vae":
            if self.layout == "diffusers":
                levels = 1 + max(
                    int(k.split(".")[2]) for k in self.keys if k.startswith("decoder.up_blocks.")
                )
                return diffusers_vae(levels)
            return bfl_vae
        return clip_text if self.component == "clip" else t5_encoder

    def source_items(self, shapes_only: bool = False) -> Iterator[tuple[str, mx.array]]:
        """(source key, tensor) with scaled-fp8 scales applied; `shapes_only` yields lazy zeros
        of the right shape and dtype (nothing is read), for checks before writing."""
        for key, f in sorted(
            self.keys.items(), key=lambda kv: (str(kv[1].path), kv[1].tensors[kv[0]].start)
        ):
            if (
                key.endswith((".scale_weight", ".scale_input"))
                or key.rsplit(".", 1)[-1] == "scaled_fp8"
            ):
                continue
            info = f.tensors[key]
            scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
            if shapes_only:
                value = mx.zeros(info.shape, mx.float32)
            else:
                value = f.read(key)
                self.bytes_read += info.nbytes
                if scale_key in self.keys:  # "scaled fp8": weight = fp8 value * per-layer scale
                    scale = self.keys[scale_key].read(scale_key).astype(mx.float32)
                    value = value.astype(mx.float32) * scale
            yield key, value

    def mapped(self, shapes_only: bool = False) -> Iterator[tuple[str, mx.array]]:
        return assemble(self.source_items(shapes_only), self.mapper(), self.name)

    @property
    def nbytes(self) -> int:
        return sum(f.tensors[k].nbytes for k, f in self.keys.items())


def _component_of(keys: list[str]) -> tuple[str, str] | None:
    """(component, layout) for unprefixed keys, or None."""
    ks = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in ks)

    if has("double_blocks.") or has("single_blocks."):
        return "transformer", "bfl"
    if has("transformer_blocks.") or has("single_transformer_blocks."):
        return "transformer", "diffusers"
    if has("decoder.up_blocks.") or has("encoder.down_blocks."):
        return "vae", "diffusers"
    if has("decoder.up.") or has("encoder.down."):
        return "vae", "bfl"
    if has("encoder.block.") and any("SelfAttention" in k for k in ks):
        return "t5", "hf"
    if has("text_model.encoder.layers.") or has("encoder.layers."):
        return "clip", "hf"
    return None


def open_checkpoint(path: Path):
    """A safetensors or GGUF file, told apart by the first bytes, not the name."""
    if is_gguf(path):
        return GGUFFile(path)
    if path.suffix == ".gguf":
        raise SourceError(f"{path}: not a GGUF file (it does not start with GGUF's magic)")
    return SafetensorsFile(path)


def detect_file(path: Path) -> list[Part]:
    """The components one checkpoint file holds (several for an all-in-one checkpoint)."""
    f = open_checkpoint(path)
    if not f.tensors:
        raise SourceError(f"{path}: holds no tensors")
    keys = list(f.keys())
    scaled = any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in keys)
    groups: dict[str, list[str]] = {}
    for k in keys:
        prefix = next((p for p in ALL_IN_ONE if k.startswith(p)), "")
        groups.setdefault(prefix, []).append(k)
    parts = []
    for prefix, ks in groups.items():
        if prefix and len(groups) > 1:  # all-in-one: the prefix names the component
            comp, layout = ALL_IN_ONE[prefix], "bfl"
            if comp in ("t5", "clip"):
                layout = "hf"
        else:
            stripped = [k[len(prefix) :] for k in ks]
            found = _component_of(stripped)
            if found is None:
                if all(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in ks):
                    continue
                sample = ", ".join(sorted(keys)[:3])
                raise SourceError(
                    f"{path}: not a FLUX, T5, CLIP or VAE checkpoint (keys like {sample})"
                )
            comp, layout = found
        parts.append(Part(comp, layout, [f], dict.fromkeys(ks, f), scaled_fp8=scaled))
    return parts


def _index_files(folder: Path) -> list[Path]:
    """Safetensors files of a diffusers/transformers subfolder, checked against its index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SourceError(f"{indexes[0]}: broken index file ({e})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise SourceError(f"{indexes[0]}: shards listed but missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


DIFFUSERS_FOLDERS = {
    "transformer": "transformer",
    "vae": "vae",
    "text_encoder": "clip",
    "text_encoder_2": "t5",
}


def detect_folder_component(folder: Path) -> Part:
    """A diffusers/transformers component folder (config.json + safetensors shards)."""
    files = _index_files(folder)
    if not files:
        raise SourceError(f"{folder}: no .safetensors files (pickled .bin weights are refused)")
    shards = []
    for f in files:
        try:
            shards.append(SafetensorsFile(f))
        except SafetensorsError as e:
            raise SourceError(str(e)) from None
    keys: dict[str, SafetensorsFile] = {}
    for shard in shards:
        dup = keys.keys() & shard.tensors.keys()
        if dup:
            raise SourceError(f"{folder}: tensor {sorted(dup)[0]} is in more than one shard")
        keys.update(dict.fromkeys(shard.tensors, shard))
    found = _component_of(list(keys))
    if found is None:
        raise SourceError(f"{folder}: not a FLUX, T5, CLIP or VAE component folder")
    scaled = any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in keys)
    merged = Part(found[0], found[1], shards, keys, scaled_fp8=scaled)
    config = folder / "config.json"
    if config.exists():
        try:
            merged.config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{config}: broken JSON ({e})") from None
    return merged


def detect_path(path: Path) -> list[Part]:
    """Everything convertible under a file or folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
            raise SourceError(
                f"{path}: a pickled checkpoint; mlxflux never unpickles files "
                "(use the .safetensors version)"
            )
        try:
            return detect_file(path)
        except SafetensorsError as e:
            raise SourceError(str(e)) from None
    if (path / "config.json").exists() and _index_files(path):
        return [detect_folder_component(path)]
    parts: list[Part] = []
    # a diffusers repo: component subfolders with their config.json (ComfyUI's vae/ has none)
    diffusers = [path / sub for sub in DIFFUSERS_FOLDERS if (path / sub / "config.json").exists()]
    for sub in diffusers:
        if _index_files(sub):
            parts.append(detect_folder_component(sub))
    if diffusers:
        return parts
    # any other folder (a ComfyUI models/ folder, a download folder): every safetensors file
    for f in sorted(p for p in path.rglob("*.safetensors") if not p.name.startswith(".")):
        try:
            parts.extend(detect_file(f))
        except (SourceError, SafetensorsError) as e:
            raise SourceError(str(e)) from None
    return parts


def check_component(part: Part, want: str, flag: str) -> None:
    if part.component != want:
        raise SourceError(
            f"{part.name}: this is {NAMES[part.component]}, not {NAMES[want]} (given as --{flag})"
        )
