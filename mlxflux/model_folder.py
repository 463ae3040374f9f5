"""The model folder's format (docs/design.md, "The model folder"), read and written here alone:
the manifest, the checks made at every load (headers and small files, milliseconds), the
checksums `mlxflux info --check` verifies, and the atomic writer `mlxflux.convert` uses."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx

from ._version import __version__
from .atomic import private_name, replace_folder, restore_folder
from .errors import ModelFolderError, listing
from .models.registry import CLASSES, COMPONENTS, OPTIONAL, components_of
from .models.transformer import is_modulation_key
from .quant import BITS, GROUP_SIZE, GROUP_SIZES
from .safetensors_io import ShardWriter

FORMAT_VERSION = 1
MANIFEST = "mlxflux.json"


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ModelFolderError(
            f"{folder}: not an mlxflux model folder (no {MANIFEST}); "
            "make one with `mlxflux convert`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: broken JSON ({e})") from None
    version = manifest.get("format")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: model folder format {version!r}, this mlxflux reads format "
            f"{FORMAT_VERSION}; convert the model again"
        )
    missing = [c for c in COMPONENTS if c not in manifest.get("components", {})]
    if missing:
        raise ModelFolderError(f"{path}: components missing: {', '.join(missing)}")
    return manifest


TOKENIZER_FILES = ("clip/vocab.json", "clip/merges.txt", "t5/spiece.model")  # under tokenizers/
REDO = "re-run `mlxflux convert` to rebuild the model folder"
# the manifest records the sha256 of every file besides the weight shards (which carry their
# own, per component) and of its own fields: small files, checked at every load
SMALL_FILES = "files_sha256"
SELF_SHA = "manifest_sha256"


def small_files(folder: Path) -> list[str]:
    """The folder's files other than weight shards and the manifest: the components' config
    files and every tokenizer file, as paths relative to the folder."""
    found = [f"{c}/config.json" for c in (*COMPONENTS, *OPTIONAL)
             if (folder / c / "config.json").is_file()]  # fmt: skip
    tok = folder / "tokenizers"
    found += sorted(p.relative_to(folder).as_posix() for p in tok.rglob("*") if p.is_file())
    return found


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's fields (all but this checksum itself), key order aside."""
    fields = {k: v for k, v in manifest.items() if k != SELF_SHA}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def component_files(manifest: dict, name: str) -> list[str]:
    return [f for files in manifest["components"][name]["files"].values() for f in files]


def check_folder(folder: str | os.PathLike, manifest: dict) -> None:
    """Check, without reading tensor data, that every file the manifest names is there and
    complete, with the recorded tensors, shapes and dtypes, that configs, tokenizers and the
    manifest are what conversion wrote, and that the tokenizers load. Reads only headers and
    the small files: milliseconds for a full model."""
    folder = Path(folder)
    try:
        _check_folder(folder, manifest)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a manifest edited by hand
        raise ModelFolderError(
            f"{folder / MANIFEST}: malformed ({type(e).__name__}: {e}); {REDO}"
        ) from None


def _check_folder(folder: Path, manifest: dict) -> None:
    from .safetensors_io import MLX_DTYPE, SafetensorsError, SafetensorsFile

    quantization = manifest["quantization"]
    if quantization["bits"] not in (None, *BITS) or quantization["group_size"] not in GROUP_SIZES:
        raise ModelFolderError(f"{folder / MANIFEST}: unknown quantization {quantization}; {REDO}")
    for rel in TOKENIZER_FILES:
        path = folder / "tokenizers" / rel
        if not path.is_file() or path.stat().st_size == 0:
            raise ModelFolderError(f"{path}: missing or empty tokenizer file; {REDO}")
    unknown = set(manifest["components"]) - set(COMPONENTS) - set(OPTIONAL)
    if unknown:
        raise ModelFolderError(f"{folder / MANIFEST}: unknown components {listing(unknown)}; a "
                               "newer mlxflux may read them")  # fmt: skip
    for name in components_of(manifest):
        entry = manifest["components"][name]
        try:
            CLASSES[name][0].from_dict(entry["config"])
        except (TypeError, ValueError) as e:
            raise ModelFolderError(f"{folder / MANIFEST}: {name} config: {e}; {REDO}") from None
        seen: dict[str, tuple] = {}
        for file in component_files(manifest, name):
            path = folder / name / file
            if not path.exists():
                raise ModelFolderError(f"{path}: missing (the model folder is incomplete); {REDO}")
            try:
                header = SafetensorsFile(path)
            except SafetensorsError as e:
                raise ModelFolderError(f"{e}; {REDO}") from None
            for key, t in header.tensors.items():
                seen[key] = (list(t.shape), MLX_DTYPE.get(t.dtype, t.dtype))
        for key, t in entry["tensors"].items():
            if key not in seen:
                raise ModelFolderError(f"{folder / name}: tensor {key} is missing; {REDO}")
            if seen[key] != (t["shape"], t["dtype"]):
                shape, dtype = seen[key]
                raise ModelFolderError(
                    f"{folder / name / t['file']}: tensor {key} is {tuple(shape)} {dtype}, the "
                    f"manifest says {tuple(t['shape'])} {t['dtype']}; {REDO}"
                )
        extra = set(seen) - set(entry["tensors"])
        if extra:
            raise ModelFolderError(
                f"{folder / name}: tensors not in the manifest: {listing(extra)}; {REDO}"
            )
        check_config_file(folder / name / "config.json", entry["config"])
    check_integrity(folder, manifest)
    check_tokenizers(folder, manifest)


def check_config_file(path: Path, config: dict) -> None:
    """A component's config.json must say what the manifest says (folders may lack one)."""
    if not path.exists():
        return
    try:
        text = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: broken JSON ({e}); {REDO}") from None
    if text != config:
        raise ModelFolderError(f"{path}: differs from the manifest's config; {REDO}")


def check_integrity(folder: Path, manifest: dict) -> None:
    """The small files and the manifest against the checksums recorded at conversion (folders
    converted before they were recorded are not checked here; `info --check` says so)."""
    for rel, want in manifest.get(SMALL_FILES, {}).items():
        path = folder / rel
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing (the model folder is incomplete); {REDO}")
        if file_sha256(path) != want:
            raise ModelFolderError(f"{path}: changed since conversion (checksum differs); {REDO}")
    if SELF_SHA in manifest and manifest_sha256(manifest) != manifest[SELF_SHA]:
        raise ModelFolderError(f"{folder / MANIFEST}: edited since conversion; {REDO}")


def check_tokenizers(folder: Path, manifest: dict) -> None:
    """Build both tokenizers from the folder's files, as a generation will: a damaged file is
    refused now, in one line naming it, instead of failing inside the text stage."""
    from .tokenizers import CLIPTokenizer, T5Tokenizer

    tok = folder / "tokenizers"
    vocab, merges, spiece = (
        tok / "clip" / "vocab.json",
        tok / "clip" / "merges.txt",
        tok / "t5" / "spiece.model",
    )
    clip_vocab = manifest["components"]["clip"]["config"].get("vocab_size", 49408)
    t5_vocab = manifest["components"]["t5"]["config"].get("vocab_size", 32128)
    try:
        ids = json.loads(vocab.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{vocab}: broken JSON ({e}); {REDO}") from None
    if not isinstance(ids, dict) or not all(
        isinstance(k, str) and type(v) is int and 0 <= v < clip_vocab for k, v in ids.items()
    ):
        raise ModelFolderError(
            f"{vocab}: not a CLIP vocabulary (token -> id below {clip_vocab}); {REDO}"
        )
    try:
        lines = merges.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{merges}: not UTF-8 text ({e}); {REDO}") from None
    merge_lines = ((i, line) for i, line in enumerate(lines, 1) if not line.startswith("#version"))
    bad = next((i for i, line in merge_lines if len(line.split(" ")) != 2), None)
    if bad is not None:
        raise ModelFolderError(f"{merges}: line {bad} is not a merge (two tokens); {REDO}")
    try:
        CLIPTokenizer(vocab, merges)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ModelFolderError(
            f"{vocab.parent}: CLIP tokenizer files do not load ({e}); {REDO}"
        ) from None
    try:
        pieces = T5Tokenizer(spiece).vocab_size
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{spiece}: not a SentencePiece model ({first}); {REDO}") from None
    if not 0 < pieces <= t5_vocab:
        raise ModelFolderError(f"{spiece}: {pieces} pieces, T5's embedding has {t5_vocab}; {REDO}")


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: str | os.PathLike, manifest: dict, progress=None) -> list[str]:
    """Hash every file of the folder against the checksums recorded at conversion (weights,
    configs, tokenizers, the manifest's own fields); returns the problems found (empty when all
    match), files that conversion did not write included. `progress(nbytes)` per weight file."""
    folder, problems = Path(folder), []
    small = manifest.get(SMALL_FILES)
    if small is None:
        problems.append(f"{folder}: no checksums of configs and tokenizers recorded (converted "
                        "by an older mlxflux)")  # fmt: skip
    else:
        for rel, want in small.items():
            path = folder / rel
            if not path.is_file():
                problems.append(f"{path}: missing; {REDO}")
            elif file_sha256(path) != want:
                problems.append(f"{path}: contents differ from what was converted; {REDO}")
    if SELF_SHA in manifest and manifest_sha256(manifest) != manifest[SELF_SHA]:
        problems.append(f"{folder / MANIFEST}: edited since conversion; {REDO}")
    known = {MANIFEST, *(small or {}), *small_files(folder)}
    known |= {f"{c}/{f}" for c in components_of(manifest) for f in component_files(manifest, c)}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.is_file() and not hidden and rel not in known:
            problems.append(f"{path}: not part of the model folder as converted")
    for name in components_of(manifest):
        sums = manifest["components"][name].get("sha256", {})
        for file in component_files(manifest, name):
            path = folder / name / file
            if file not in sums:
                problems.append(f"{path}: no checksum recorded (converted by an older mlxflux)")
            elif file_sha256(path) != sums[file]:
                problems.append(f"{path}: contents differ from what was converted; {REDO}")
            if progress:
                progress(path.stat().st_size)
    return problems


# ---- writing a model folder (mlxflux.convert and bench/make_random_model.py) ------------

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
QUANTIZED_COMPONENTS = ("transformer", "t5", "redux")
EMBEDDINGS = ("shared.weight", "relative_attention_bias.weight", "position_embedding.weight")


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
    tokenizers,
    sources: list[dict],
    notes: list[str],
    variant: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Write a model folder atomically: into a hidden sibling, verified, then renamed.

    components: name -> (config, iterable of (key, tensor)), iterated once, in COMPONENTS
    order; tokenizers: anything with `copy_to(folder)` (convert's TokenizerFiles); extra: more
    manifest fields (a random model's `random`). On any failure, Ctrl-C included, the sibling
    is removed and `out` is untouched.
    """
    restore_folder(out)  # what a killed conversion left: removed, or an old folder put back
    tmp = private_name(out.parent, f".{out.name}.partial-")
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
        if variant is not None:  # older folders have none: dev or schnell by their config
            manifest["variant"] = variant
        manifest.update(extra or {})
        for comp in [c for c in (*COMPONENTS, *OPTIONAL) if c in components]:
            config, items = components[comp]
            kept = DTYPES[dtype] if comp in COMPONENTS else mx.float32  # the tiny preview decoder
            manifest["components"][comp] = write_component(comp, config, items, tmp, bits, kept)
        tokenizers.copy_to(tmp / "tokenizers")
        manifest["id"] = _manifest_id(manifest)
        manifest[SMALL_FILES] = {rel: file_sha256(tmp / rel) for rel in small_files(tmp)}
        manifest[SELF_SHA] = manifest_sha256(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        check_folder(tmp, manifest)  # re-read every header: what was written is what we meant
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest_id(manifest: dict) -> str:
    """The pictures' identity: the sources of what draws them (not an optional preview
    decoder's), the quantization, the dtype, a variant the sources do not imply."""
    sources = [s for s in manifest["sources"] if s["component"] in COMPONENTS]
    fields = [sources, manifest["quantization"], manifest["dtype"]]
    if manifest.get("variant") not in (None, "dev", "schnell"):  # one the sources do not imply
        fields.append(manifest["variant"])
    if "random" in manifest:  # no sources: the random weights' size and seed tell them apart
        fields.append(manifest["random"])
    key = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
