"""The converter: source checkpoints -> a verified MLX model folder, streaming and atomic."""

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux.errors import MlxfluxError, ModelFolderError
from mlxflux.model_folder import DTYPES, write_model_folder
from mlxflux.models.registry import COMPONENTS, build_model, check_weights
from mlxflux.variants import VARIANTS, check_variant, infer_variant

from .detect import NAMES, Part, SourceError, check_component, detect_path
from .errors import ConvertError
from .gguf_io import GGUFFile
from .hub import snapshot
from .infer import (
    clip_config,
    flux_config_from_diffusers,
    flux_config_from_shapes,
    t5_config,
    vae_config,
)
from .redux import find_redux, read_redux
from .taef1 import find_taef1, locate, read_taef1, source_record
from .tokenizer_files import TokenizerFiles, find_tokenizers

FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"


def default_model_dir(bits: int | None = 8, model: str = "flux1-dev") -> Path:
    home = os.environ.get("MLXFLUX_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mlxflux"
    return base / "models" / f"{model}-{'q' + str(bits) if bits else 'full'}"


@dataclass
class ComponentPlan:
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


def plan_component(comp: str, part: Part, shapes: dict, axes_dim=None) -> ComponentPlan:
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
    gguf = [f for f in part.files if isinstance(f, GGUFFile)]
    if gguf:
        types = Counter(t.dtype for f in gguf for t in f.tensors.values())
        listed = ", ".join(f"{n} {kind}" for kind, n in types.most_common())
        notes.append(
            f"{comp} read from GGUF ({listed}): each tensor dequantized to float32 by the gguf "
            "package, then stored like any other source (quantized again with --bits)"
        )
    return ComponentPlan(part, cfg, notes)


def check_agreement(plans: dict[str, ComponentPlan]) -> None:
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
    if vae["z_channels"] * 4 != flux.get("out_channels", 64):
        raise ConvertError(
            f"VAE latent channels {vae['z_channels']} ({plans['vae'].part.name}) do not match "
            f"the transformer's output {flux.get('out_channels', 64)} (= 4 x 16 for FLUX)"
        )


@contextlib.contextmanager
def _verification_failures():
    """A folder that does not read back as written is the converter's failure, said so."""
    try:
        yield
    except ModelFolderError as e:
        raise ConvertError(f"verification failed: {e}") from None


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
    variant: str = "auto",
    taef1=None,
    redux=None,
    siglip=None,
    log=print,
) -> Path:
    """Convert checkpoints into an MLX model folder; returns the folder's path.

    sources: files or folders (a ComfyUI `models/` folder, a FLUX.1-dev download, single
    files); `flux`/`t5`/`clip`/`ae` name a component's file explicitly. `bits` 4/6/8 quantizes
    the transformer's and T5's Linear layers (None keeps `dtype`). Nothing is written unless
    every component is found, mapped and consistent; the folder appears only when complete.
    `variant`: "auto" (from the shapes: schnell has no guidance embedding; Kontext's shapes
    are dev's, so a source or repo name containing "kontext" suggests it) or a name of
    `mlxflux.variants.VARIANTS`, checked against the shapes; the manifest records it.
    `taef1`: the preview decoder's file, folder or repo id (`convert.taef1`), added as the
    folder's optional `taef1` component. `redux`, `siglip`: FLUX.1 Redux's and SigLIP's files,
    folders or repo ids (`convert.redux`), the optional `redux` component (found beside the
    sources too: ComfyUI's style_models/ and clip_vision/).
    """
    if bits not in (None, 4, 6, 8):
        raise ConvertError(f"bits must be 4, 6, 8 or none, got {bits!r}")
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if variant != "auto" and variant not in VARIANTS:
        raise ConvertError(f"variant must be auto or one of {', '.join(VARIANTS)}, got {variant!r}")
    if hf_repo:
        sources.append(download_repo(hf_repo, log))
    if out and Path(out).expanduser().exists() and not force:  # before reading any header
        raise ConvertError(f"{Path(out).expanduser()}: already exists (pass --force to replace it)")
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
        variant, note = choose_variant(variant, plans, sources, hf_repo)
        tok = find_tokenizers(tokenizers, sources, parts, log)
        taef1_path, preview = _preview_decoder(taef1, sources, log)
        image_encoder = _redux(redux, siglip, sources, log)
    except MlxfluxError as e:  # the sources' own errors, each naming its file
        raise ConvertError(str(e)) from None
    if note:
        log(f"note: {note}")
        plans["transformer"].notes.append(note)
    out = Path(out).expanduser() if out else default_model_dir(bits, VARIANTS[variant].model_name)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (pass --force to replace it)")

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
    if preview is not None:
        sources_info.append(source_record(taef1_path))
    if image_encoder is not None:
        sources_info.extend(image_encoder[2])
    with _progress(total, progress) as bar, _verification_failures():
        components = {c: (plans[c].config, _tracked(plans[c].part, bar)) for c in COMPONENTS}
        if preview is not None:
            components["taef1"] = (preview[0], preview[1].items())
        if image_encoder is not None:
            components["redux"] = (image_encoder[0], image_encoder[1].items())
        manifest = write_model_folder(
            out,
            components,
            bits=bits,
            dtype=dtype,
            tokenizers=tok,
            sources=sources_info,
            notes=[n for p in plans.values() for n in p.notes],
            variant=variant,
        )
    if progress:
        log(summary(out, manifest, total, time.perf_counter() - start))
    return out


def _preview_decoder(taef1, sources, log) -> tuple[Path | None, tuple | None]:
    """(file, (config, weights)) of the preview decoder asked for, or found beside the sources
    (ComfyUI's vae_approx/); one found and unreadable is skipped with a warning."""
    if taef1 is not None:
        path = locate(taef1, log)
        return path, read_taef1(path)
    path = find_taef1(sources)
    if path is None:
        return None, None
    try:
        read = read_taef1(path)
    except ConvertError as e:
        log(f"warning: the preview decoder found is skipped: {e}")
        return None, None
    log(f"adding the preview decoder found at {path} (mlxflux gen --preview taef1)")
    return path, read


def _redux(redux, siglip, sources, log) -> tuple | None:
    """(config, weights, source records) of Redux's encoder: asked for, or found beside the
    sources (ComfyUI's style_models/ and clip_vision/; one found unreadable is skipped with a
    warning)."""
    if redux is not None or siglip is not None:
        return read_redux(redux, siglip, log)
    found = find_redux(sources)
    if found is None:
        return None
    try:
        read = read_redux(*found, log)
    except ConvertError as e:
        log(f"warning: the Redux files found are skipped: {e}")
        return None
    log(f"adding Redux's image encoder found at {found[0].parent.parent} (mlxflux gen --redux)")
    return read


def choose_variant(asked: str, plans: dict, sources, hf_repo) -> tuple[str, str | None]:
    """(variant, a note when a name decided it) for `convert(variant=asked)`."""
    config = plans["transformer"].config
    part = plans["transformer"].part
    try:
        if asked != "auto":
            check_variant(asked, config)
            return asked, None
        # names, not whole paths: a folder above the files says nothing about them
        names = [hf_repo, *(Path(s).name for s in sources), *(f.path.name for f in part.files)]
        names += [f"{i.parent.name}/model_index.json ({_pipeline_class(i)})"
                  for i in {f.path.parent.parent / "model_index.json" for f in part.files}
                  if i.is_file()]  # fmt: skip
        return infer_variant(config, names)
    except ValueError as e:
        flag = f"--variant {asked}: " if asked != "auto" else ""
        raise ConvertError(f"{flag}{e} ({part.name})") from None


def _pipeline_class(index: Path) -> str:
    """The pipeline class a diffusers repo's model_index.json names ('' if unreadable)."""
    import json

    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


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
    folders = ("transformer", "vae", "text_encoder", "text_encoder_2")
    patterns = [
        "model_index.json",
        "tokenizer/*",
        "tokenizer_2/*",
        *(f"{d}/*.json" for d in folders),
        *(f"{d}/*.safetensors" for d in folders),
    ]
    return snapshot(repo, patterns)


__all__ = ["ConvertError", "TokenizerFiles", "convert", "default_model_dir"]
