"""Optional components added to an existing model folder (`mlxflux convert --taef1`,
`--redux`): the folder is rebuilt beside itself from hard links, the new component and
manifest written and checked, then renamed into place, so it is whole before and after."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from mlxflux.atomic import private_name, replace_folder, restore_folder
from mlxflux.errors import MlxfluxError
from mlxflux.model_folder import (
    DTYPES,
    MANIFEST,
    SELF_SHA,
    SMALL_FILES,
    check_folder,
    file_sha256,
    manifest_sha256,
    read_manifest,
    small_files,
    write_component,
)

from .errors import ConvertError


def add_component(folder: str | os.PathLike, name: str, config: dict, weights: dict,
                  records: list[dict], log=print, quantize: bool = True) -> None:  # fmt: skip
    """Add (or replace) an optional component in an existing model folder, atomically: the new
    folder is built beside it from hard links to the same files (no weights copied where the
    file system has them), the component and a new manifest written, checked, then renamed
    into place; on any failure the folder is as it was. `quantize`: at the folder's bits and
    dtype where its layers allow (else float32, as the preview decoder)."""
    folder = Path(folder).expanduser()
    try:
        manifest = read_manifest(folder)
        check_folder(folder, manifest)
    except MlxfluxError as e:
        raise ConvertError(str(e)) from None
    restore_folder(folder)
    bits, dtype = None, mx.float32
    if quantize:
        bits = manifest["quantization"]["bits"]
        dtype = DTYPES[manifest["dtype"]]
    tmp = private_name(folder.parent, f".{folder.name}.partial-")
    try:
        copied = _link_tree(folder, tmp, skip={name, MANIFEST})
        if copied:
            log(f"note: hard links are not supported there: {copied} files copied")
        manifest["components"][name] = write_component(name, config, weights.items(), tmp, bits,
                                                       dtype)  # fmt: skip
        manifest["sources"] = [s for s in manifest["sources"] if s["component"] != name]
        manifest["sources"].extend(records)
        manifest[SMALL_FILES] = {rel: file_sha256(tmp / rel) for rel in small_files(tmp)}
        manifest[SELF_SHA] = manifest_sha256(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        check_folder(tmp, manifest)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_tree(src: Path, dst: Path, skip) -> int:
    """Mirror `src` into a new `dst` with hard links (copies where links fail); top-level names
    in `skip` are left out. Returns how many files had to be copied."""
    copied = 0
    dst.mkdir()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip:
            continue
        if path.is_dir():
            (dst / rel).mkdir(exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dst / rel)
        except OSError:
            shutil.copy2(path, dst / rel)
            copied += 1
    return copied
