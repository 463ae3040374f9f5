"""A damaged model folder or a bad argument: one clear line, exit 2, no PNG, found before any
stage runs (the Python API raises the package's errors at `load` / `generate`)."""

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

import mlxflux
from mlxflux.model_folder import MANIFEST

from .helpers import run_cli, small_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return small_model(tmp_path_factory.mktemp("damaged") / "model", bits=8, seed=8)


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "model")


def manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def shard(folder, comp, group=None):
    files = manifest(folder)["components"][comp]["files"]
    return folder / comp / (files[group] if group else next(iter(files.values())))[0]


def gen(folder, *args, cwd):
    size = ["--width", "32", "--height", "32", "--steps", "1", "--seed", "1"]
    return run_cli("gen", "--prompt", "a red cube", *size, "--model", folder, *args, cwd=cwd)


def assert_one_line_failure(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxflux: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def delete_trunk_shard(folder):
    path = shard(folder, "transformer", "trunk")
    path.unlink()
    return path.name, "missing"


def remove_component(folder):
    shutil.rmtree(folder / "vae")
    return "vae", "missing"


def wrong_shape(folder):
    """A tensor rewritten with another shape (its header and data agree; the manifest not)."""
    path = shard(folder, "clip")
    tensors = dict(mx.load(str(path)))
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[key] = tensors[key][:-1]
    mx.save_safetensors(str(path), tensors)
    return key, "the manifest says"


def truncate_t5(folder):
    """An interrupted copy: the file ends before its last tensor does."""
    path = shard(folder, "t5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path.name, "truncated"


def delete_spiece(folder):
    (folder / "tokenizers" / "t5" / "spiece.model").unlink()
    return "spiece.model", "tokenizer file"


def empty_merges(folder):
    (folder / "tokenizers" / "clip" / "merges.txt").write_text("")
    return "merges.txt", "tokenizer file"


def broken_manifest(folder):
    (folder / MANIFEST).write_text('{"format": 1, "components": ')
    return MANIFEST, "broken JSON"


def unknown_config_key(folder):
    """A config key this mlxflux does not know (a typo, or a newer format): refused, for every
    component alike."""
    m = manifest(folder)
    m["components"]["clip"]["config"]["hiden_size"] = 128
    (folder / MANIFEST).write_text(json.dumps(m))
    return "hiden_size", "unknown CLIP config keys"


def garbage_shard(folder):
    shard(folder, "vae").write_bytes(b"\x00" * 64)
    return "vae", "not a safetensors file"


def truncate_vocab(folder):
    path = folder / "tokenizers" / "clip" / "vocab.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "vocab.json", "changed since conversion"


def edit_vocab(folder):
    """Still valid JSON, one id changed: only a checksum can tell."""
    path = folder / "tokenizers" / "clip" / "vocab.json"
    vocab = json.loads(path.read_text())
    vocab["cat</w>"] += 1
    path.write_text(json.dumps(vocab))
    return "vocab.json", "changed since conversion"


def garble_spiece(folder):
    path = folder / "tokenizers" / "t5" / "spiece.model"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return "spiece.model", "changed since conversion"


def edit_config_file(folder):
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, depth=config["depth"] + 1)))
    return "config.json", "differs from the manifest's config"


def edit_manifest_field(folder):
    """A field no other check reads (the quantization's group size is read only at load)."""
    m = manifest(folder)
    m["notes"] = [*m.get("notes", []), "edited"]
    (folder / MANIFEST).write_text(json.dumps(m))
    return MANIFEST, "edited since conversion"


DAMAGE = [delete_trunk_shard, remove_component, wrong_shape, truncate_t5, delete_spiece,
          empty_merges, broken_manifest, unknown_config_key, garbage_shard, truncate_vocab,
          edit_vocab, garble_spiece, edit_config_file, edit_manifest_field]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_folder_is_refused_at_load_in_one_line(folder, tmp_path, damage):
    name, why = damage(folder)
    # Python: load() itself refuses, before any stage could run
    with pytest.raises(mlxflux.ModelFolderError, match=why) as info:
        mlxflux.load(folder)
    assert name in str(info.value)
    # CLI: one line naming the file, exit 2, no PNG, and no stage started (the seed line and
    # the progress bar come after loading)
    out = tmp_path / "out"
    out.mkdir()
    line = assert_one_line_failure(gen(folder, cwd=out), name, why)
    assert not list(out.iterdir())
    if damage is not broken_manifest:
        assert "mlxflux convert" in line  # says what to do


def old_folder(folder):
    """A folder converted before configs and tokenizers had checksums: parsed at load."""
    m = manifest(folder)
    del m["files_sha256"], m["manifest_sha256"]
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def vocab_cut(folder):
    path = folder / "tokenizers" / "clip" / "vocab.json"
    path.write_bytes(path.read_bytes()[:1000])
    return "vocab.json", "broken JSON"


def vocab_ids_out_of_range(folder):
    path = folder / "tokenizers" / "clip" / "vocab.json"
    vocab = json.loads(path.read_text())
    vocab["cat</w>"] = 10**6
    path.write_text(json.dumps(vocab))
    return "vocab.json", "not a CLIP vocabulary"


def merges_cut_mid_line(folder):
    path = folder / "tokenizers" / "clip" / "merges.txt"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2].rsplit(" ", 1)[0] + "\n" + "x")
    return "merges.txt", "is not a merge"


def spiece_garbage(folder):
    path = folder / "tokenizers" / "t5" / "spiece.model"
    path.write_bytes(b"\x0a\xff\xff\xff" + path.read_bytes()[4:200])
    return "spiece.model", "not a SentencePiece model"


@pytest.mark.parametrize("damage", [vocab_cut, vocab_ids_out_of_range, merges_cut_mid_line,
                                    spiece_garbage], ids=lambda f: f.__name__)  # fmt: skip
def test_damaged_tokenizers_of_old_folders_are_refused_at_load(folder, tmp_path, damage):
    name, why = damage(old_folder(folder))
    with pytest.raises(mlxflux.ModelFolderError, match=why) as info:
        mlxflux.load(folder)
    assert name in str(info.value)
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_failure(gen(folder, cwd=out), name, why)
    assert not list(out.iterdir())


def test_info_check_catches_a_change_to_any_file(pristine, tmp_path):
    """Every file of the folder, one at a time: one byte added at its end (the manifest: a
    field changed) makes `info --check` fail naming that file; an added file is named too."""
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    assert len(files) >= 10 and Path(MANIFEST) in files
    for rel in files:
        folder = shutil.copytree(pristine, tmp_path / f"copy-{len(list(tmp_path.iterdir()))}")
        if rel == Path(MANIFEST):
            edit_manifest_field(folder)
        else:
            with open(folder / rel, "ab") as f:
                f.write(b"\n")
        r = run_cli("info", folder, "--check")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (rel, r.stderr)
        assert str(folder / rel) in r.stderr, (rel, r.stderr)
        shutil.rmtree(folder)
    folder = shutil.copytree(pristine, tmp_path / "extra")
    (folder / "clip" / "notes.txt").write_text("mine")
    r = run_cli("info", folder, "--check")
    assert r.returncode == 2 and "notes.txt: not part of the model folder" in r.stderr


def test_a_healthy_copy_of_the_folder_generates(folder, tmp_path):
    r = gen(folder, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_info_check_finds_a_flipped_bit_that_load_cannot_see(folder):
    r = run_cli("info", folder, "--check")
    assert r.returncode == 0 and "checksums match" in r.stdout, r.stderr
    path = shard(folder, "transformer", "trunk")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: headers and sizes are unchanged
    path.write_bytes(bytes(data))
    mlxflux.load(folder)  # the cheap header check at load passes...
    r = run_cli("info", folder, "--check")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # ...the checksums do not
    assert f"{path}: contents differ from what was converted" in r.stderr


BAD_SETTINGS = [
    ("steps", 0, ["--steps", "0"]),
    ("steps", -3, ["--steps", "-3"]),
    ("guidance", math.nan, ["--guidance", "nan"]),
    ("guidance", math.inf, ["--guidance", "inf"]),
    ("guidance", 101.0, ["--guidance", "101"]),
    ("guidance", -1.0, ["--guidance", "-1"]),
    ("shift", 0.0, ["--shift", "0"]),
    ("shift", math.nan, ["--shift", "nan"]),
    ("width", 40, ["--width", "40"]),
]


@pytest.mark.parametrize("name,value,flags", BAD_SETTINGS)
def test_bad_settings_are_refused_by_the_api_before_any_stage(pristine, name, value, flags,
                                                            no_stage):  # fmt: skip
    pipe = mlxflux.load(pristine)
    kw = dict(width=32, height=32, steps=1, guidance=3.5, shift=1.15, seed=1)
    kw[name] = value
    with pytest.raises(mlxflux.SettingsError, match=f"^{name}: ") as info:
        pipe.generate("a red cube", **kw)
    assert info.value.name == name


@pytest.mark.parametrize("name,value,flags", BAD_SETTINGS)
def test_bad_settings_are_refused_by_the_cli_in_one_line(pristine, tmp_path, name, value, flags):
    line = assert_one_line_failure(gen(pristine, *flags, cwd=tmp_path), f"--{name}:")
    assert "seed 1" not in line
    assert not list(tmp_path.iterdir())


def test_guidance_range_ends_are_allowed(pristine):
    pipe = mlxflux.load(pristine)
    for g in (0.0, 100.0):  # ComfyUI's FluxGuidance allows 0-100
        assert pipe.generate("x", width=16, height=16, steps=1, guidance=g).size == (16, 16)
