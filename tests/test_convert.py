"""mlxflux.convert: every layout -> model folder -> outputs equal the reference models'."""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlxflux.convert import ConvertError, convert
from mlxflux.model_folder import MANIFEST, read_manifest
from mlxflux.models.latents import image_ids
from mlxflux.models.registry import load_component
from mlxflux.safetensors_io import SafetensorsFile

from . import reference
from .helpers import CTRL_C_PREAMBLE, run_cli, run_python, tokenizer_dir
from .reference import reference_outputs, rel_err, to_mx

pytestmark = pytest.mark.reference


def check_folder(folder: Path, models) -> dict[str, float]:
    """Each component of a converted folder against the reference models: relative errors."""
    inputs, ids, clip_ids, z, want = reference_outputs(models)
    manifest = read_manifest(folder)
    errs = {}
    m = load_component(folder, "transformer", manifest)
    got = m(
        to_mx(inputs["hidden_states"]),
        to_mx(inputs["encoder_hidden_states"]),
        to_mx(inputs["timestep"]),
        to_mx(inputs["pooled_projections"]),
        image_ids(48, 64),
        to_mx(inputs["guidance"]),
    )
    errs["transformer"] = rel_err(np.array(got), want["transformer"])
    errs["t5"] = rel_err(
        np.array(load_component(folder, "t5", manifest)(to_mx(ids).astype(mx.int32))), want["t5"]
    )
    _, pooled = load_component(folder, "clip", manifest)(to_mx(clip_ids).astype(mx.int32))
    errs["clip"] = rel_err(np.array(pooled), want["clip"])
    ae = load_component(folder, "vae", manifest)
    # the folder's decode applies scale/shift; undo them for the raw diffusers decode
    img = ae.decode(
        to_mx(z) * ae.config.scale_factor - ae.config.shift_factor * ae.config.scale_factor
    )
    errs["vae"] = rel_err(np.array(img), ((want["vae"] / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1))
    print({k: f"{v:.1e}" for k, v in errs.items()})
    return errs


@pytest.fixture(scope="module")
def models():
    return reference.make_models(seed=11)


def fp32(sources, out, **kw):
    return convert(sources, out, bits=None, dtype="float32", **kw)


def test_diffusers_folder_sharded(tmp_path, models):
    src = reference.write_diffusers(models, tmp_path / "FLUX.1-dev", shard="300KB")
    assert list((src / "transformer").glob("*.index.json"))  # really sharded
    out = fp32([src], tmp_path / "model")
    errs = check_folder(out, models)
    assert max(errs.values()) <= 1e-4
    manifest = json.loads((out / MANIFEST).read_text())
    assert {s["layout"] for s in manifest["sources"]} >= {"diffusers"}
    assert (out / "tokenizers/clip/vocab.json").exists()
    assert (out / "tokenizers/t5/spiece.model").exists()
    # modulation weights live in their own file(s)
    files = manifest["components"]["transformer"]["files"]
    assert set(files) == {"modulation", "trunk"}


def test_bfl_single_files(tmp_path, models):
    paths = reference.write_single_files(models, tmp_path / "files")
    ref = dict(models, t5=models["t5"].half().float())  # t5xxl_fp16 holds fp16 weights
    out = fp32(
        [],
        tmp_path / "model",
        flux=paths["transformer"],
        ae=paths["vae"],
        clip=paths["clip"],
        t5=paths["t5"],
        tokenizers=tokenizer_dir(),
    )
    assert max(check_folder(out, ref).values()) <= 1e-4
    notes = " ".join(read_manifest(out)["notes"])
    assert "inferred" in notes


@pytest.mark.parametrize(
    "kind,prefix",
    [
        (torch.float8_e4m3fn, "model.diffusion_model."),
        (torch.float8_e4m3fn, ""),
        (torch.float8_e5m2, ""),
    ],
)
def test_comfyui_fp8_files_in_a_models_folder(tmp_path, kind, prefix):
    models = reference.make_models(seed=12)
    root = tmp_path / "ComfyUI" / "models"
    paths = reference.write_single_files(models, root / "diffusion_models", fp8=kind, prefix=prefix)
    # ComfyUI's layout: each file in its own folder
    for comp, sub in (("vae", "vae"), ("clip", "text_encoders"), ("t5", "text_encoders")):
        (root / sub).mkdir(exist_ok=True)
        paths[comp].rename(root / sub / paths[comp].name)
    assert SafetensorsFile(paths["transformer"]).dtypes >= {
        "F8_E4M3" if kind == torch.float8_e4m3fn else "F8_E5M2"
    }
    reference.round_like_fp8(models, kind)
    out = fp32([root], tmp_path / "model", tokenizers=tokenizer_dir())
    assert max(check_folder(out, models).values()) <= 1e-4


def test_scaled_fp8_transformer(tmp_path, models):
    models = reference.make_models(seed=13)
    sd = reference.flux_to_bfl(models["transformer"].state_dict())
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    with torch.no_grad():
        for k, v in sd.items():
            if v.ndim == 2:
                scale = v.abs().max() / 448.0
                q = (v / scale).to(torch.float8_e4m3fn)
                scaled[k] = q
                scaled[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
                sd[k] = q.float() * scale  # what the reference must hold
            else:
                scaled[k] = v
    models["transformer"].load_state_dict(
        tiny_diffusers_state(models["transformer"], sd), strict=True
    )
    paths = reference.write_single_files(models, tmp_path / "files")
    save_file(
        {"model.diffusion_model." + k: v for k, v in scaled.items()}, str(paths["transformer"])
    )
    ref = dict(models, t5=models["t5"].half().float())
    out = fp32([tmp_path / "files"], tmp_path / "model", tokenizers=tokenizer_dir())
    assert max(check_folder(out, ref).values()) <= 1e-4


def tiny_diffusers_state(model, bfl):
    from .reference import diffusers_single_file_convert

    return diffusers_single_file_convert(bfl)


def test_comfyui_all_in_one_checkpoint(tmp_path, models):
    paths = reference.write_single_files(models, tmp_path / "parts")
    merged = {}
    for comp, prefix in (
        ("transformer", "model.diffusion_model."),
        ("vae", "vae."),
        ("clip", "text_encoders.clip_l.transformer."),
        ("t5", "text_encoders.t5xxl.transformer."),
    ):
        with safe_open(paths[comp], "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                merged[prefix + k] = h.get_tensor(k)
    aio = tmp_path / "aio" / "flux1-dev-all-in-one.safetensors"
    aio.parent.mkdir()
    save_file(merged, str(aio))
    ref = dict(models, t5=models["t5"].half().float())
    out = fp32([aio], tmp_path / "model", tokenizers=tokenizer_dir())
    assert max(check_folder(out, ref).values()) <= 1e-4


@pytest.mark.parametrize("bits,bound", [(8, 0.05), (6, 0.2), (4, 0.8)])
def test_quantized_error_against_unquantized(tmp_path, models, bits, bound):
    src = reference.write_diffusers(models, tmp_path / "src")
    full = check_folder(fp32([src], tmp_path / "full"), models)
    out = convert([src], tmp_path / f"q{bits}", bits=bits, dtype="float32")
    q = check_folder(out, models)
    manifest = read_manifest(out)
    assert any(k.endswith(".scales") for k in manifest["components"]["transformer"]["tensors"])
    assert not any(k.endswith(".scales") for k in manifest["components"]["vae"]["tensors"])
    print(f"{bits}-bit relative error vs reference:", {k: f"{v:.2e}" for k, v in q.items()})
    # random tiny networks amplify weight error: ~1% per 8-bit layer, ~4x per two bits fewer
    for comp in ("transformer", "t5"):
        assert full[comp] < q[comp] <= bound
    assert q["clip"] <= 1e-4 and q["vae"] <= 1e-4  # never quantized


# ---- bad input ----------------------------------------------------------------------------


def convert_cli(*args, env=None):
    return run_cli("convert", *args, env=env)


def _bad_files(tmp: Path, models) -> dict[str, tuple[Path, str]]:
    paths = reference.write_single_files(models, tmp / "good")
    good = paths["transformer"].read_bytes()
    cases = {}

    def put(name, data):
        p = tmp / name
        p.write_bytes(data)
        return p

    cases["truncated"] = (put("trunc.safetensors", good[: len(good) // 2]), "truncated")
    cases["random"] = (put("random.safetensors", os.urandom(4096)), "not a safetensors file")
    cases["absurd"] = (
        put("absurd.safetensors", (2**62).to_bytes(8, "little") + b"{}"),
        "header length",
    )
    n = 20
    cases["json"] = (
        put("json.safetensors", n.to_bytes(8, "little") + b"{not json at all!!!}"),
        "broken safetensors header",
    )
    cases["empty"] = (put("empty.safetensors", b""), "empty")
    cases["missing"] = (tmp / "nope.safetensors", "no such file")
    cases["pickle"] = (put("model.ckpt", b"\x80\x02}q\x00."), "never unpickles")
    return cases, paths


def other_flags(paths) -> list:
    """Good --ae/--clip/--t5/--tokenizers, so a test varies --flux alone."""
    return ["--ae", paths["vae"], "--clip", paths["clip"], "--t5", paths["t5"],
            "--tokenizers", tokenizer_dir()]  # fmt: skip


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, models):
    cases, paths = _bad_files(tmp_path, models)
    others = other_flags(paths)
    for name, (path, message) in cases.items():
        out = tmp_path / f"out-{name}"
        r = convert_cli("--flux", path, *others, "--out", out)
        assert r.returncode == 2, (name, r.stderr)
        assert message in r.stderr and str(path) in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*"))


def test_wrong_component_in_a_flag(tmp_path, models):
    _, paths = _bad_files(tmp_path, models)
    tok = ["--tokenizers", tokenizer_dir()]
    r = convert_cli(
        "--flux",
        paths["vae"],
        "--ae",
        paths["vae"],
        "--clip",
        paths["clip"],
        "--t5",
        paths["t5"],
        *tok,
        "--out",
        tmp_path / "o1",
    )
    assert r.returncode == 2 and "autoencoder" in r.stderr and "--flux" in r.stderr
    r = convert_cli(
        "--flux",
        paths["transformer"],
        "--ae",
        paths["vae"],
        "--clip",
        paths["clip"],
        "--t5",
        paths["clip"],
        *tok,
        "--out",
        tmp_path / "o2",
    )
    assert r.returncode == 2 and "CLIP" in r.stderr and "--t5" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_missing_and_extra_tensors(tmp_path, models):
    _, paths = _bad_files(tmp_path, models)
    from safetensors.torch import load_file

    sd = load_file(paths["transformer"])
    rest = other_flags(paths)
    missing = dict(sd)
    del missing["single_blocks.1.linear2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    r = convert_cli("--flux", tmp_path / "missing.safetensors", *rest, "--out", tmp_path / "o")
    assert r.returncode == 2 and "single_blocks.1.linear2.bias" in r.stderr, r.stderr
    extra = dict(sd, **{"double_blocks.0.img_attn.extra.weight": sd["img_in.weight"].clone()})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    r = convert_cli("--flux", tmp_path / "extra.safetensors", *rest, "--out", tmp_path / "o")
    assert r.returncode == 2 and "double_blocks.0.img_attn.extra.weight" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ---- atomicity ----------------------------------------------------------------------------


def test_existing_folder_is_refused_without_force_and_kept_on_failure(
    tmp_path, models, monkeypatch
):
    src = reference.write_diffusers(models, tmp_path / "src")
    out = fp32([src], tmp_path / "model")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConvertError, match="already exists"):
        fp32([src], out)

    # a failure in the middle of writing (disk full): the old folder stays intact
    from mlxflux import safetensors_io

    calls = {"n": 0}
    real = safetensors_io.mx.save_safetensors

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(safetensors_io.mx, "save_safetensors", failing)
    with pytest.raises(OSError, match="No space"):
        fp32([src], out, force=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    # with --force it is replaced
    fp32([src], out, force=True)
    assert read_manifest(out)["components"]


def test_ctrl_c_leaves_no_half_written_folder(tmp_path, models):
    src = reference.write_diffusers(models, tmp_path / "src")
    out = tmp_path / "model"
    code = CTRL_C_PREAMBLE + (
        "from mlxflux import safetensors_io\n"
        "real = safetensors_io.mx.save_safetensors\n"
        "n = [0]\n"
        "def slow(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(*a, **k)\n"
        "safetensors_io.mx.save_safetensors = slow\n"
        "from mlxflux.cli import main\n"
        f"main(['convert', '--from', {str(src)!r}, '--out', {str(out)!r}, '--bits', 'none'])\n"
    )
    r = run_python(code)
    assert r.returncode != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert "Traceback" not in r.stderr


def test_info_prints_the_manifest(tmp_path, models):
    src = reference.write_diffusers(models, tmp_path / "src")
    out = convert([src], tmp_path / "model", bits=8, dtype="bfloat16")
    r = run_cli("info", out)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    assert "8-bit affine, group 64" in r.stdout and manifest["id"] in r.stdout
    for comp in ("transformer", "t5", "clip", "vae"):
        assert comp in r.stdout
    r = run_cli("info", tmp_path)
    assert r.returncode == 2 and "not an mlxflux model folder" in r.stderr


def test_loading_refuses_unknown_format_and_missing_files(tmp_path, models):
    from mlxflux.errors import ModelFolderError

    src = reference.write_diffusers(models, tmp_path / "src")
    out = fp32([src], tmp_path / "model")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(ModelFolderError, match="format 99"):
        read_manifest(out)
    (out / MANIFEST).write_text(json.dumps(manifest))
    shard = out / "vae" / manifest["components"]["vae"]["files"]["model"][0]
    shard.unlink()
    with pytest.raises(ModelFolderError, match=f"{shard.name}: missing"):
        load_component(out, "vae", read_manifest(out))
