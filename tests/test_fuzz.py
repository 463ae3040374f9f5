"""Bad input by the thousand (issue 25): every reader, fed randomly damaged files, either succeeds
or refuses with the package's error in one line: no other exception, no hang, no allocation
beyond a bound, nothing written on refusal.

Seeded Hypothesis (derandomized, no example database), MLXFLUX_FUZZ_EXAMPLES examples per reader
(CI: the default below; `python bench/fuzz.py` runs a longer profile). The counts per reader
(tried / refused / clean) are printed at the end of the test session.
"""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import mlxflux
from mlxflux.convert import convert
from mlxflux.errors import MlxfluxError
from mlxflux.lora import layer_shapes, read_loras
from mlxflux.model_folder import MANIFEST, read_manifest
from mlxflux.pixels import open_init_image
from mlxflux.presets import parse_preset
from mlxflux.safetensors_io import SafetensorsFile

from . import reference
from .helpers import tokenizer_dir, write_gguf
from .reference import make_lora, write_bfl, write_kohya

pytestmark = pytest.mark.reference

EXAMPLES = int(os.environ.get("MLXFLUX_FUZZ_EXAMPLES", "40"))
CASE_SECONDS = 20  # one case longer than this is a hang
MEMORY_BOUND = 1 << 30  # what the fuzz cases may add to the process's peak resident set
COUNTS: dict[str, Counter] = defaultdict(Counter)

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],  # fmt: skip
)


class Hang(Exception):
    pass


def attempt(reader: str, fn) -> str:
    """Run fn(); 'clean' if it returns, 'refused' for the package's one-line error. Anything
    else (another exception, a case over CASE_SECONDS) fails the test."""
    COUNTS[reader]["tried"] += 1

    def alarm(*_):
        raise Hang(f"{reader}: a case ran over {CASE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    try:
        fn()
    except MlxfluxError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        COUNTS[reader]["refused"] += 1
        return "refused"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    COUNTS[reader]["clean"] += 1
    return "clean"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.fixture(autouse=True)
def _bounded_memory():
    before = peak_rss()
    yield
    grown = peak_rss() - before
    assert grown <= MEMORY_BOUND, f"the fuzz cases raised the peak RSS by {grown / 2**20:.0f} MiB"


# ---- byte-level damage, shared by every file format ----------------------------------------

damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8),
    ),  # fmt: skip
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("head"), st.binary(min_size=1, max_size=16)),
)


def damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "flip":
        out = bytearray(data)
        for where, bits in arg:
            i = min(len(out) - 1, int(len(out) * where))
            out[i] ^= bits
        return bytes(out)
    if kind == "insert":
        where, extra = arg
        i = int(len(data) * where)
        return data[:i] + extra + data[i:]
    return arg + data[len(arg) :]  # overwrite the first bytes (magic, header length)


# ---- safetensors: our reader, and the converter's detection of a source -----------------------


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "valid.safetensors"
    save_file({"a": torch.randn(4, 8), "b": torch.randn(3).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
               "d": torch.randn(5).to(torch.float8_e4m3fn)}, str(path))  # fmt: skip
    return path.read_bytes()


def read_all(path):
    f = SafetensorsFile(path)
    for key in f.tensors:
        f.read(key)


header_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "BF16", "F16", "F8_E4M3", "F8_E5M2", "I32", "U8"]),
                       st.text(max_size=6), st.integers()),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-3, 2**62), st.floats(), st.text(max_size=2),
                                          st.booleans()), max_size=5), st.integers(), st.none()),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-10, 2**63), st.floats()),
                                       min_size=0, max_size=3), st.text(max_size=4)),
})  # fmt: skip


@FUZZ
@given(how=damage)
def test_safetensors_reader_bytes(tmp_path, safetensors_bytes, how):
    path = tmp_path / "x.safetensors"
    path.write_bytes(damaged(safetensors_bytes, how))
    attempt("safetensors (bytes)", lambda: read_all(path))


@FUZZ
@given(entries=st.dictionaries(st.text(min_size=1, max_size=4), header_entry, max_size=4),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
                          st.integers(), st.lists(st.integers(), max_size=2)),
       payload=st.integers(0, 512))  # fmt: skip
def test_safetensors_reader_headers(tmp_path, entries, metadata, payload):
    """Headers written from scratch: dtypes, shapes and offsets of every kind, overlapping, past
    the file, huge (a shape of 2**62 elements must be refused, not allocated)."""
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(payload))
    attempt("safetensors (headers)", lambda: read_all(path))


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}  # fmt: skip
    raw = json.dumps(header).encode()
    path = tmp_path / "o.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))
    with pytest.raises(mlxflux.MlxfluxError, match="overlap"):
        SafetensorsFile(path)


@pytest.fixture(scope="module")
def models():
    return reference.make_models(seed=31)


@pytest.fixture(scope="module")
def source_bytes(models, tmp_path_factory) -> dict[str, bytes]:
    files = reference.write_single_files(models, tmp_path_factory.mktemp("src"))
    return {name: Path(p).read_bytes() for name, p in files.items()}


@settings(FUZZ, max_examples=max(4, EXAMPLES // 8))
@given(how=damage, which=st.sampled_from(["transformer", "t5", "clip", "vae"]))
def test_convert_refuses_damaged_sources_and_writes_nothing(tmp_path_factory, source_bytes,
                                                            how, which):  # fmt: skip
    tmp = tmp_path_factory.mktemp("conv")
    paths = {}
    for name, data in source_bytes.items():
        paths[name] = tmp / f"{name}.safetensors"
        paths[name].write_bytes(damaged(data, how) if name == which else data)
    out = tmp / "model"
    result = attempt("convert (source files)", lambda: convert(
        [], out, bits=8, dtype="float32", flux=paths["transformer"], t5=paths["t5"],
        clip=paths["clip"], ae=paths["vae"], tokenizers=tokenizer_dir()))  # fmt: skip
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # never a hidden partial folder
    if result == "refused":
        assert not out.exists()
    else:
        mlxflux.load(out)  # what converted also loads


# ---- GGUF ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    rng = np.random.default_rng(0)
    tensors = {"img_in.weight": rng.standard_normal((64, 64)).astype(np.float32),
               "txt_in.weight": rng.standard_normal((32, 64)).astype(np.float32),
               "img_in.bias": rng.standard_normal(64).astype(np.float32)}  # fmt: skip
    write_gguf(path, tensors, {"img_in.weight": Q.Q8_0, "txt_in.weight": Q.F16})
    return path.read_bytes()


@FUZZ
@given(how=damage)
def test_gguf_reader(tmp_path, gguf_bytes, how):
    from mlxflux.convert.gguf_io import GGUFFile

    path = tmp_path / "x.gguf"
    path.write_bytes(damaged(gguf_bytes, how))

    def read():
        f = GGUFFile(path)
        for key in f.tensors:
            f.read(key)

    attempt("GGUF", read)


@FUZZ
@given(count=st.integers(0, 2**64 - 1), field=st.sampled_from([8, 16]))
def test_gguf_header_counts(tmp_path, gguf_bytes, count, field):
    """The tensor count (offset 8) and key-value count (offset 16) set to anything."""
    from mlxflux.convert.gguf_io import GGUFFile

    data = bytearray(gguf_bytes)
    data[field : field + 8] = struct.pack("<Q", count)
    path = tmp_path / "c.gguf"
    path.write_bytes(bytes(data))
    attempt("GGUF (header counts)", lambda: GGUFFile(path))


# ---- LoRA files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_setup(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    folder = reference.converted(models, tmp)
    lora = make_lora(models, 3)
    files = {"bfl": write_bfl(lora, tmp / "bfl.safetensors").read_bytes(),
             "kohya": write_kohya(lora, tmp / "kohya.safetensors").read_bytes()}  # fmt: skip
    for kind, dora in (("lokr", None), ("loha", None), ("diff", None), ("lora", "in")):
        file = reference.build_adapters(models, dict.fromkeys(reference.ADAPTER_LAYERS[:3], kind),
                                        seed=4, dora=dora)  # fmt: skip
        name = kind + ("-dora" if dora else "")
        files[name] = reference.write_adapters(file, tmp / f"{name}.safetensors").read_bytes()
    return read_manifest(folder), files, models["transformer"].config


@FUZZ
@given(how=damage, layout=st.sampled_from(["bfl", "kohya", "lokr", "loha", "diff", "lora-dora"]))
def test_lora_reader(tmp_path, lora_setup, how, layout):
    manifest, files, cfg = lora_setup
    path = tmp_path / "l.safetensors"
    path.write_bytes(damaged(files[layout], how))
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    shapes = layer_shapes(manifest["components"]["transformer"], manifest["quantization"]["bits"])
    attempt("LoRA", lambda: read_loras([(path, 0.8)], shapes, hidden))


# ---- model folders: manifests, configs, tokenizer files ----------------------------------


@pytest.fixture(scope="module")
def pristine(models, tmp_path_factory):
    return reference.converted(models, tmp_path_factory.mktemp("folder"), bits=8)


@pytest.fixture(scope="module")
def folder(pristine, tmp_path_factory):
    return shutil.copytree(pristine, tmp_path_factory.mktemp("work") / "model")


def json_paths(value, prefix=()):
    """Every path into a JSON value: (keys...)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*prefix, i))


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2**40),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers()),
)


@FUZZ
@given(data=st.data())
def test_manifest_and_configs(pristine, folder, data):
    """One value anywhere in the manifest replaced or deleted (checksums left as they were,
    and also recomputed, so the structural checks are reached too)."""
    manifest = json.loads((pristine / MANIFEST).read_text())
    paths = [p for p in json_paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    if data.draw(st.booleans()) and isinstance(manifest, dict):
        from mlxflux.model_folder import SELF_SHA, manifest_sha256

        with contextlib.suppress(TypeError, ValueError):  # unhashable edits: the old checksum
            manifest[SELF_SHA] = manifest_sha256(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        attempt("model folder manifest", lambda: mlxflux.load(folder))
    finally:
        shutil.copyfile(pristine / MANIFEST, folder / MANIFEST)


TOKENIZER_FILES = ["tokenizers/clip/vocab.json", "tokenizers/clip/merges.txt",
                   "tokenizers/t5/spiece.model", "transformer/config.json"]  # fmt: skip


@FUZZ
@given(how=damage, rel=st.sampled_from(TOKENIZER_FILES), checksums=st.booleans())
def test_tokenizer_and_config_files(pristine, folder, how, rel, checksums):
    """Damaged tokenizer and config files, in folders with checksums (caught by them) and in
    folders converted before they were recorded (caught by parsing, or harmless)."""
    original = (pristine / rel).read_bytes()
    (folder / rel).write_bytes(damaged(original, how))
    if not checksums:
        manifest = json.loads((pristine / MANIFEST).read_text())
        del manifest["files_sha256"], manifest["manifest_sha256"]
        (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        result = attempt("tokenizer / config files", lambda: mlxflux.load(folder))
        if checksums and damaged(original, how) != original:
            assert result == "refused"
    finally:
        shutil.copyfile(pristine / rel, folder / rel)
        shutil.copyfile(pristine / MANIFEST, folder / MANIFEST)


# ---- presets ---------------------------------------------------------------------------


@FUZZ
@given(how=damage)
def test_preset_toml(how):
    from importlib import resources

    text = (resources.files("mlxflux.presets") / "dvd.toml").read_bytes()
    broken = damaged(text, how).decode("utf-8", errors="replace")
    attempt("preset TOML", lambda: parse_preset(broken, "dvd.toml"))


# ---- images: init, reference and mask images all go through open_image -----------------------


def image_bytes(mode: str, fmt: str, size=(40, 24), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, **kw).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"):
        buf = io.BytesIO()
        pixels.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


@FUZZ
@given(how=damage, fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]))
def test_image_reader(tmp_path, images, how, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(damaged(images[fmt], how))
    attempt("images", lambda: open_init_image(path))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with no real data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")  # fmt: skip


def test_special_images(tmp_path):
    """The cases a cover scan can be: each read as ComfyUI's LoadImage reads it, or refused."""
    cases = {
        "bomb.png": (png_header_only(60000, 60000), "megapixels|decompression bomb"),
        "large.png": (png_header_only(10000, 10000), "megapixels"),  # Pillow only warns
        "reference.png": (image_bytes("RGB", "PNG", (1, 1)), "at least 16x16"),
        "cmyk.jpg": (image_bytes("CMYK", "JPEG", color=(0, 255, 255, 0)), None),
        "sixteen.png": (image_bytes("I;16", "PNG", color=40000), None),
        "alpha.png": (image_bytes("RGBA", "PNG", color=(10, 20, 30, 0)), None),
        "palette.gif": (image_bytes("P", "GIF"), None),
    }
    for name, (data, refusal) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        if refusal:
            with pytest.raises(mlxflux.SettingsError, match=refusal):
                open_init_image(path)
        else:
            image, _, _ = open_init_image(path)
            assert image.mode == "RGB" and image.size == (40, 24), name
    # CMYK (0, 255, 255, 0) is red; the alpha channel is dropped, not composited
    cmyk = open_init_image(tmp_path / "cmyk.jpg")[0].getpixel((5, 5))
    assert cmyk[0] > 200 and cmyk[1] < 40 and cmyk[2] < 40, cmyk
    assert open_init_image(tmp_path / "alpha.png")[0].getpixel((0, 0)) == (10, 20, 30)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90' in EXIF reads as portrait, as ComfyUI's
    LoadImage (ImageOps.exif_transpose) reads it."""
    img = Image.new("RGB", (48, 32), (200, 0, 0))
    img.paste((0, 0, 200), (0, 0, 8, 8))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    path = tmp_path / "phone.jpg"
    img.save(path, format="JPEG", exif=exif, quality=95)
    image, _, _ = open_init_image(path)
    assert image.size == (32, 48)
    assert image.getpixel((28, 3))[2] > 150  # the stored top-left corner is now top right


def test_fuzzing_reached_every_reader():
    """The counts CI prints; every reader was tried and both outcomes occurred overall."""
    assert sum(c["tried"] for c in COUNTS.values()) >= 8 * max(4, EXAMPLES // 8)
    assert sum(c["refused"] for c in COUNTS.values()) > 0
    assert sum(c["clean"] for c in COUNTS.values()) > 0


def summary_lines() -> list[str]:
    lines = [f"{'reader':<28} {'tried':>6} {'refused':>8} {'clean':>6}"]
    for reader, c in sorted(COUNTS.items()):
        lines.append(f"{reader:<28} {c['tried']:>6} {c['refused']:>8} {c['clean']:>6}")
    total = Counter()
    for c in COUNTS.values():
        total.update(c)
    lines.append(f"{'all':<28} {total['tried']:>6} {total['refused']:>8} {total['clean']:>6}")
    return lines
