"""The converter: source checkpoints -> a verified MLX model folder, streaming and atomic."""

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux._version import __version__
from mlxflux.errors import MlxfluxError
from mlxflux.models.transformer import is_modulation_key
from mlxflux.quant import GROUP_SIZE
from mlxflux.safetensors_io import ShardWriter
from mlxflux.weights import (
    FORMAT_VERSION,
    MANIFEST,
    ModelFolderError,
    build_model,
    check_folder,
    check_weights,
    file_sha256,
)

from .detect import COMPONENTS, NAMES, Part, SourceError, check_component, detect_path
from .infer import (
    clip_config,
    flux_config_from_diffusers,
    flux_config_from_shapes,
    t5_config,
    vae_config,
)
from .tokenizer_files import TokenizerFiles, find_tokenizers

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
QUANTIZED_COMPONENTS = ("transformer", "t5")
EMBEDDINGS = ("shared.weight", "relative_attention_bias.weight")
FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"


class ConvertError(MlxfluxError, ValueError):
    """A conversion that cannot go ahead; the message names the file and the problem."""


def default_model_dir(bits: int | None = 8) -> Path:
    home = os.environ.get("MLXFLUX_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mlxflux"
    return base / "models" / f"flux1-dev-{'q' + str(bits) if bits else 'full'}"


@dataclass
class Plan:
    part: Part
    config: dict
    notes: list[str]


def _pick(parts: list[Part], component: str) -> Part | None:
    found = [p for p in parts if p.component == component]
    if len(found) > 1:
        names = "\n  ".join(p.name for p in found)
        flag = {"transformer": "flux", "vae": "ae"}.get(component, component)
        raise ConvertError(
            f"more than one {NAMES[component]} found:\n  {names}\npass --{flag} FILE to choose"
        )
    return found[0] if found else None


def resolve_parts(sources=(), flux=None, t5=None, clip=None, ae=None) -> dict[str, Part]:
    explicit = {"transformer": flux, "t5": t5, "clip": clip, "vae": ae}
    flags = {"transformer": "flux", "t5": "t5", "clip": "clip", "vae": "ae"}
    chosen: dict[str, Part] = {}
    for comp, path in explicit.items():
        if path is None:
            continue
        parts = detect_path(Path(path))
        if not parts:
            raise SourceError(f"{path}: holds no FLUX component")
        match = [p for p in parts if p.component == comp]
        if not match:
            check_component(parts[0], comp, flags[comp])
        chosen[comp] = match[0]
    pool = [p for s in sources for p in detect_path(Path(s)) if p.component not in chosen]
    for comp in COMPONENTS:
        if comp not in chosen:
            part = _pick(pool, comp)
            if part is not None:
                chosen[comp] = part
    missing = [c for c in COMPONENTS if c not in chosen]
    if missing:
        what = ", ".join(NAMES[c] for c in missing)
        flags_ = " ".join(f"--{flags[c]} FILE" for c in missing)
        raise ConvertError(f"not found among the sources: {what}; pass {flags_} or --from PATH")
    return chosen


def _shapes(part: Part) -> dict[str, tuple[int, ...]]:
    """mlxflux-named shapes of a part, from its header alone (lazy zeros, nothing read)."""
    return {k: tuple(v.shape) for k, v in part.mapped(shapes_only=True)}


def plan_component(comp: str, part: Part, shapes: dict, axes_dim=None) -> Plan:
    notes = []
    if comp == "transformer":
        if part.config:
            cfg = flux_config_from_diffusers(part.config).to_dict()
        else:
            cfg = flux_config_from_shapes(shapes, axes_dim).to_dict()
            notes.append(
                f"transformer config inferred from tensor shapes (hidden {cfg['hidden_size']}, "
                f"heads {cfg['num_heads']}, depth {cfg['depth']}+{cfg['depth_single_blocks']}, "
                f"axes_dim {cfg['axes_dim']})"
            )
    elif comp == "t5":
        cfg = t5_config(shapes, part.config).to_dict()
        if not part.config:
            notes.append(f"T5 config inferred from shapes ({cfg['num_heads']} heads)")
    elif comp == "clip":
        cfg = clip_config(shapes, part.config).to_dict()
        if not part.config:
            notes.append("CLIP config inferred from shapes (head dim 64)")
    else:
        vae, default_scale = vae_config(shapes, part.config)
        cfg = vae.to_dict()
        if default_scale:
            notes.append("VAE scale 0.3611 / shift 0.1159 are FLUX's (the file carries none)")
    return Plan(part, cfg, notes)


def check_agreement(plans: dict[str, Plan]) -> None:
    flux, t5 = plans["transformer"].config, plans["t5"].config
    clip, vae = plans["clip"].config, plans["vae"].config
    if t5["d_model"] != flux["context_in_dim"]:
        raise ConvertError(
            f"T5 width {t5['d_model']} ({plans['t5'].part.name}) does not match the "
            f"transformer's context width {flux['context_in_dim']}"
        )
    if clip["hidden_size"] != flux["vec_in_dim"]:
        raise ConvertError(
            f"CLIP width {clip['hidden_size']} ({plans['clip'].part.name}) does not match the "
            f"transformer's vector width {flux['vec_in_dim']}"
        )
    if vae["z_channels"] * 4 != flux["in_channels"]:
        raise ConvertError(
            f"VAE latent channels {vae['z_channels']} ({plans['vae'].part.name}) do not match "
            f"the transformer's input {flux['in_channels']} (= 4 x 16 for FLUX)"
        )


def should_quantize(comp: str, key: str, shape: tuple, bits: int | None) -> bool:
    return (
        bits is not None
        and comp in QUANTIZED_COMPONENTS
        and key.endswith(".weight")
        and len(shape) == 2
        and not key.endswith(EMBEDDINGS)
        and shape[-1] % GROUP_SIZE == 0
    )


def _file_group(comp: str, key: str) -> str:
    if comp == "transformer":
        return "modulation" if is_modulation_key(key) else "trunk"
    return "model"


def write_component(comp: str, config: dict, items, folder: Path, bits: int | None, dtype) -> dict:
    """Stream (key, tensor) pairs of one component into `folder/comp`, casting to `dtype` and
    quantizing Linear weights; returns its manifest entry."""
    (folder / comp).mkdir(parents=True)
    (folder / comp / "config.json").write_text(json.dumps(config, indent=1))
    writers: dict[str, ShardWriter] = {}
    tensors: dict[str, dict] = {}
    for key, value in items:
        group = _file_group(comp, key)
        writer = writers.setdefault(group, ShardWriter(folder / comp, group))
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        if should_quantize(comp, key, value.shape, bits):
            w, scales, biases = mx.quantize(value, group_size=GROUP_SIZE, bits=bits)
            base = key[: -len(".weight")]
            out = {key: w, f"{base}.scales": scales, f"{base}.biases": biases}
        else:
            out = {key: value}
        for k, v in out.items():
            writer.add(k, v)
            tensors[k] = {"shape": list(v.shape), "dtype": str(v.dtype), "group": group}
        del value, out
    for writer in writers.values():
        writer.flush()
    files = {group: w.files for group, w in writers.items()}
    for k, t in tensors.items():
        t["file"] = writers[t.pop("group")].index[k]
    # per-file checksums for `mlxflux info --check` (hashed from the page cache just written)
    sha256 = {f: file_sha256(folder / comp / f) for fs in files.values() for f in fs}
    return {"config": config, "files": files, "tensors": tensors, "sha256": sha256}


def write_model_folder(
    out: Path,
    components: dict,
    *,
    bits: int | None,
    dtype: str,
    tokenizers: TokenizerFiles,
    sources: list[dict],
    notes: list[str],
) -> dict:
    """Write a model folder atomically: into a hidden sibling, verified, then renamed.

    components: name -> (config, iterable of (key, tensor)), iterated once, in COMPONENTS
    order. On any failure, Ctrl-C included, the sibling is removed and `out` is untouched.
    """
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        manifest = {
            "format": FORMAT_VERSION,
            "mlxflux_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quantization": {"bits": bits, "group_size": GROUP_SIZE, "mode": "affine"},
            "dtype": dtype,
            "sources": sources,
            "components": {},
            "notes": notes,
        }
        for comp in COMPONENTS:
            config, items = components[comp]
            manifest["components"][comp] = write_component(
                comp, config, items, tmp, bits, DTYPES[dtype]
            )
        tokenizers.copy_to(tmp / "tokenizers")
        manifest["id"] = _manifest_id(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            check_folder(tmp, manifest)
        except ModelFolderError as e:
            raise ConvertError(f"verification failed: {e}") from None
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tracked(part: Part, bar):
    """The part's mapped tensors, advancing `bar` by the bytes read for each."""
    done = 0
    for item in part.mapped():
        yield item
        bar.update(part.bytes_read - done)
        done = part.bytes_read


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="converting",
        disable=not enabled,
        dynamic_ncols=True,
    )


def convert(
    sources=(),
    out=None,
    *,
    bits: int | None = 8,
    dtype: str = "bfloat16",
    flux=None,
    t5=None,
    clip=None,
    ae=None,
    tokenizers=None,
    hf_repo: str | None = None,
    force: bool = False,
    progress: bool = False,
    axes_dim=None,
    log=print,
) -> Path:
    """Convert checkpoints into an MLX model folder; returns the folder's path.

    sources: files or folders (a ComfyUI `models/` folder, a FLUX.1-dev download, single
    files); `flux`/`t5`/`clip`/`ae` name a component's file explicitly. `bits` 4/6/8 quantizes
    the transformer's and T5's Linear layers (None keeps `dtype`). Nothing is written unless
    every component is found, mapped and consistent; the folder appears only when complete.
    """
    if bits not in (None, 4, 6, 8):
        raise ConvertError(f"bits must be 4, 6, 8 or none, got {bits!r}")
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if hf_repo:
        sources.append(download_repo(hf_repo, log))
    out = Path(out).expanduser() if out else default_model_dir(bits)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (pass --force to replace it)")
    start = time.perf_counter()

    try:
        parts = resolve_parts(sources, flux, t5, clip, ae)
        plans = {}
        for comp, part in parts.items():
            shapes = _shapes(part)
            plans[comp] = plan_component(comp, part, shapes, axes_dim)
            model = build_model(comp, plans[comp].config)
            expected = dict(tree_flatten(model.parameters()))
            check_weights(expected, {k: mx.zeros(s) for k, s in shapes.items()}, part.name)
        check_agreement(plans)
        tok = find_tokenizers(tokenizers, sources, parts, log)
    except MlxfluxError as e:  # the sources' own errors, each naming its file
        raise ConvertError(str(e)) from None

    total = sum(p.part.nbytes for p in plans.values())
    sources_info = [
        {
            "component": comp,
            "layout": plans[comp].part.layout,
            "name": f.path.name,
            "size": f.path.stat().st_size,
            "header_sha256": f.header_sha256,
        }
        for comp in COMPONENTS
        for f in plans[comp].part.files
    ]
    with _progress(total, progress) as bar:
        manifest = write_model_folder(
            out,
            {c: (plans[c].config, _tracked(plans[c].part, bar)) for c in COMPONENTS},
            bits=bits,
            dtype=dtype,
            tokenizers=tok,
            sources=sources_info,
            notes=[n for p in plans.values() for n in p.notes],
        )
    if progress:
        log(summary(out, manifest, total, time.perf_counter() - start))
    return out


def _manifest_id(manifest: dict) -> str:
    import hashlib

    key = json.dumps(
        [manifest["sources"], manifest["quantization"], manifest["dtype"]], sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old folder is kept until the new one is there."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def folder_bytes(folder: Path, comp: str) -> int:
    return sum(p.stat().st_size for p in (folder / comp).glob("*.safetensors"))


def summary(out: Path, manifest: dict, source_bytes: int, seconds: float) -> str:
    gib = 1 << 30
    q = manifest["quantization"]["bits"]
    precision = f"{q}-bit" if q else manifest["dtype"]
    lines = [f"wrote {out}  ({precision}, {seconds:.1f} s)"]
    for comp in COMPONENTS:
        before = sum(s["size"] for s in manifest["sources"] if s["component"] == comp)
        lines.append(
            f"  {comp:<12} {before / gib:7.2f} GiB -> {folder_bytes(out, comp) / gib:7.2f} GiB"
        )
    lines.append(f"  read {source_bytes / gib:.2f} GiB of tensors")
    return "\n".join(lines)


def download_repo(repo: str, log=print) -> Path:
    """Download a diffusers-layout repo (weights, configs, tokenizers) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "model_index.json",
        *(f"{d}/*.json" for d in ("transformer", "vae", "text_encoder", "text_encoder_2")),
        *(f"{d}/*.safetensors" for d in ("transformer", "vae", "text_encoder", "text_encoder_2")),
        "tokenizer/*",
        "tokenizer_2/*",
    ]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        raise ConvertError(gated_message(repo)) from None
    except LocalEntryNotFoundError:
        raise ConvertError(
            f"{repo}: not in the Hugging Face cache and the network is unavailable or "
            "HF_HUB_OFFLINE is set; connect, or pass local files with --from"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ConvertError(f"{repo}: download failed: {e}") from None


def gated_message(repo: str) -> str:
    return (
        f"{repo} is a gated repository: accept its license at https://huggingface.co/{repo} "
        "while logged in, then run `hf auth login` (or set HF_TOKEN) and try again"
    )


__all__ = ["ConvertError", "TokenizerFiles", "convert", "default_model_dir"]
