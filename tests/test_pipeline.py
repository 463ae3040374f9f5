"""End to end: convert -> load -> generate, against diffusers' FluxPipeline on the same weights."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import mlxflux
from mlxflux import kernels
from mlxflux.convert import convert
from mlxflux.models.latents import pack_latents
from mlxflux.precision import precision_choice

from . import reference
from .helpers import HEIGHT, WIDTH, generate, interrupted_gen, run_cli
from .reference import (
    BF16_MAX,
    BF16_MEAN,
    FP32_MAX,
    FP32_MEAN,
    PROMPT,
    comfy_reference,
    compare,
    mlxflux_array,
    quantize_dequantize_,
    reference_pipeline,
)

pytestmark = pytest.mark.reference


def test_auto_shift_max_padding_matches_default_flux_pipeline(models, folder):
    steps = 4
    noise = mlxflux.comfy_noise(7, (1, 16, HEIGHT // 8, WIDTH // 8))
    # FLUX.1-dev's scheduler config: dynamic shifting from 256 to 4096 tokens
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, shift=3.0,
    )  # fmt: skip
    pipe = reference_pipeline(models, sched)
    with torch.no_grad():
        ref = pipe(
            PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=3.5,
            latents=torch.from_numpy(np.array(pack_latents(mlxflux_array(noise)))),
            output_type="np", max_sequence_length=512,
        ).images  # fmt: skip
    ours = mlxflux.load(folder).generate(
        PROMPT, width=WIDTH, height=HEIGHT, steps=steps, guidance=3.5, scheduler="simple",
        shift="auto", t5_padding="max", noise=noise,
    )  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"auto/max vs FluxPipeline: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX


def comfy_mode(pipe, scheduler: str, steps: int, noise: np.ndarray):
    return pipe.generate(
        PROMPT, width=WIDTH, height=HEIGHT, steps=steps, guidance=3.5, scheduler=scheduler,
        shift=1.15, t5_padding="comfy", noise=noise,
    )  # fmt: skip


@pytest.mark.parametrize("scheduler", ["simple", "beta"])
def test_comfyui_mode_matches_flux_pipeline_given_comfy_sigmas(models, folder, scheduler):
    steps = 5
    noise = mlxflux.comfy_noise(3, (1, 16, HEIGHT // 8, WIDTH // 8))
    ref = comfy_reference(models, scheduler, steps, noise)
    mean, worst = compare(comfy_mode(mlxflux.load(folder), scheduler, steps, noise), ref)
    print(f"comfy/{scheduler} vs FluxPipeline: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX


@pytest.fixture(scope="module")
def kernel_references(models):
    """FluxPipeline images for the kernel-mode tests: plain weights, and 8-bit (the reference
    holds the dequantized weights of every layer the converter quantizes)."""
    noise = mlxflux.comfy_noise(11, (1, 16, HEIGHT // 8, WIDTH // 8))
    q8 = dict(models)
    for name in ("transformer", "t5"):
        q8[name] = quantize_dequantize_(copy.deepcopy(models[name]), 8)
    refs = {bits: comfy_reference(m, "simple", 4, noise) for bits, m in ((None, models), (8, q8))}
    return noise, refs


@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [None, 8])
def test_every_kernel_mode_matches_flux_pipeline(
    monkeypatch, folder, folder_q8, kernel_references, mode, precision, bits
):
    """What Metal/CUDA run (fused, bf16, 8-bit) checked here, on the CPU, end to end."""
    monkeypatch.setenv("MLXFLUX_KERNELS", mode)
    noise, refs = kernel_references
    pipe = mlxflux.load(folder_q8 if bits else folder, precision=precision)
    assert pipe.kernels.mode == mode  # chosen once, at load, from MLXFLUX_KERNELS
    mean, worst = compare(comfy_mode(pipe, "simple", 4, noise), refs[bits])
    print(f"{mode} {precision} {bits or 'plain'}: mean {mean:.3f}, max {worst} levels")
    calls = pipe.kernels.calls
    assert calls["fused_attention" if mode == "fused" else "split_attention"] > 0
    assert calls["split_attention" if mode == "fused" else "fused_attention"] == 0
    if bits and mode == "fused" and precision != "float32" and kernels.backend() == "cpu":
        # MLX's CPU quantized matmul loses precision with 16-bit inputs (test_kernels: 5% on
        # one layer); measured mean 2.46 / max 20 here. GPU kernels accumulate in float32.
        assert mean <= 4 and worst <= 32
    elif precision == "float32":
        assert mean <= FP32_MEAN and worst <= FP32_MAX
    else:
        assert mean <= BF16_MEAN and worst <= BF16_MAX


def test_each_stage_releases_the_previous_stages_weights(tmp_path, models):
    src = reference.write_diffusers(models, tmp_path / "src")
    folder = convert([src], tmp_path / "model", bits=None, dtype="float32")

    def size(comp, group=None):
        m = json.loads((folder / "mlxflux.json").read_text())["components"][comp]
        files = m["files"][group] if group else [f for fs in m["files"].values() for f in fs]
        return sum((folder / comp / f).stat().st_size for f in files)

    pipe = mlxflux.load(folder)
    _, report = generate(pipe, "a photo of a cat", width=64, height=64, steps=2, seed=1)
    st = report.stages
    print({k: (v.peak_bytes, v.active_bytes_after) for k, v in st.items()})
    # T5 then CLIP, one after the other: the text peak holds the larger, not both
    text_w = max(size("t5"), size("clip"))
    assert st["text"].peak_bytes >= text_w  # the encoders were really loaded...
    assert st["text"].active_bytes_after < text_w / 4  # ...and are gone after the stage
    # the modulation stage frees each adaLN layer once its table is made: it holds about one
    # layer (its weight, read), never the whole group
    manifest = json.loads((folder / "mlxflux.json").read_text())["components"]["transformer"]
    layer = max(4 * int(np.prod(t["shape"])) for k, t in manifest["tensors"].items()
                if k.endswith("_mod.lin.weight"))  # fmt: skip
    mod_w = size("transformer", "modulation")
    assert layer <= st["modulation"].peak_bytes < mod_w / 2
    assert st["modulation"].active_bytes_after < mod_w / 4
    trunk_w = size("transformer", "trunk")
    assert st["denoise"].peak_bytes >= trunk_w
    assert st["denoise"].active_bytes_after < trunk_w / 4
    assert st["decode"].active_bytes_after < size("vae") / 4


def test_gen_preset_dvd_writes_png_with_metadata(tmp_path, folder):
    report = tmp_path / "report.json"
    r = run_cli("gen", "--preset", "dvd", "--model", folder, "--seed", "42", "--steps", "2",
                "--report", report, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "dvd-42.png"
    assert r.stdout.strip() == str(out)
    img = Image.open(out)
    assert img.size == (832, 1216)
    params = img.text["parameters"]
    assert params.startswith("A cinematic DVD cover for the movie Interstellar.")
    assert "Seed: 42" in params and "Size: 832x1216" in params and "Schedule type: simple" in params
    settings = json.loads(img.text["mlxflux"])
    assert settings["steps"] == 2 and settings["guidance"] == 3.5 and settings["shift"] == 1.15
    assert settings["model_id"] == json.loads((folder / "mlxflux.json").read_text())["id"]
    rep = json.loads(report.read_text())
    assert set(rep["stages"]) == {"text", "modulation", "denoise", "decode"}
    assert rep["output"] == str(out) and rep["settings"]["seed"] == 42
    assert rep["peak_bytes"] == max(s["peak_bytes"] for s in rep["stages"].values())
    # a second run never overwrites
    r = run_cli("gen", "--preset", "dvd", "--model", folder, "--seed", "42", "--steps", "1",
                "--width", "64", "--height", "64", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "dvd-42-1.png")
    assert Image.open(out).size == (832, 1216)


def test_gen_refuses_sizes_that_are_not_multiples_of_16(tmp_path, folder):
    r = run_cli("gen", "--prompt", "x", "--width", "1000", "--model", folder, cwd=tmp_path)
    assert r.returncode == 2 and "multiples of 16" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_first_run_downloads_converts_and_generates(tmp_path, models):
    hub = reference.hf_cache(tmp_path, models)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "MLXFLUX_HOME": str(tmp_path / "home")}
    r = run_cli("gen", "--prompt", "a red cube", "--width", "64", "--height", "64", "--steps",
                "1", "--seed", "5", env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "gated" in r.stderr and "34 GB" in r.stderr  # said before downloading
    assert (tmp_path / "home/models/flux1-dev-q8/mlxflux.json").exists()
    assert Image.open(r.stdout.strip()).size == (64, 64)


def test_first_run_offline_without_the_files_explains(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
           "MLXFLUX_HOME": str(tmp_path / "home")}  # fmt: skip
    r = run_cli("gen", "--prompt", "x", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "gated" in r.stderr and "hf auth login" in r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "home/models/flux1-dev-q8").exists()


def test_first_run_converts_from_mlxflux_source(tmp_path, models):
    src = reference.write_diffusers(models, tmp_path / "FLUX.1-dev")
    env = {
        "MLXFLUX_SOURCE": str(src),
        "MLXFLUX_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    r = run_cli("gen", "--prompt", "x", "--width", "32", "--height", "32", "--steps", "1",
                "--seed", "1", env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "converting from" in r.stderr


# sigint_ignored: started as `pytest &` or `nohup pytest` starts its children (issue 26)
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "background"])
def test_ctrl_c_during_generation_writes_no_file(tmp_path, folder, sigint_ignored):
    args = ["--prompt", "x", "--width", "32", "--height", "32", "--steps", "1", "--seed", "1",
            "--model", folder]  # fmt: skip
    r = interrupted_gen("decode", 1, args, cwd=tmp_path, sigint_ignored=sigint_ignored)
    assert r.returncode == 2, r.stderr
    assert "interrupted: no image written" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no PNG, no temporary file


def scaled_folder(tmp_path_factory, factor: float):
    models = reference.make_models(seed=5)
    with torch.no_grad():
        models["transformer"].proj_out.weight.mul_(factor)
    return reference.converted(models, tmp_path_factory.mktemp("overflow"))


@pytest.fixture(scope="module")
def overflowing_folder(tmp_path_factory):
    """A checkpoint whose velocity overflows float16 (~6e4) but not float32: the output
    projection scaled up 1e5 times, as large activations do in FLUX at depth."""
    return scaled_folder(tmp_path_factory, 1e5)


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
    """A checkpoint whose velocity overflows float32 itself (the output projection x 1e38)."""
    return scaled_folder(tmp_path_factory, 1e38)


def test_float16_reruns_the_overflowing_layer_in_float32(overflowing_folder):
    """float16 never draws another picture where float32 draws a good one: the final layer
    overflows float16 and runs again in float32, then (the latent now ~1e4) the input
    embedding at step 2, then the VAE decode (docs/numerics.md, "float16")."""
    kw = dict(width=32, height=32, steps=2, seed=1)
    want = np.asarray(mlxflux.load(overflowing_folder, precision="float32").generate("a", **kw))
    pipe = mlxflux.load(overflowing_folder, precision="float16")
    image, report = generate(pipe, "a", **kw)
    got = np.asarray(image)
    diff = np.abs(got.astype(int) - want.astype(int))
    print(f"float16 vs float32: mean {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() <= BF16_MEAN and diff.max() <= BF16_MAX
    settings = report.settings
    assert settings["precision"] == "float16" and settings["precision_why"] == "asked for"
    assert settings["float32_fallbacks"] == ["final_layer", "input", "decode"]


def test_png_and_header_say_which_precision_ran_and_why(tmp_path, overflowing_folder):
    """The default on this backend, and float16 asked for, with the blocks that re-ran."""
    size = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "1"]
    for flags, want, why in [([], precision_choice()[0], "MLX's CPU backend"),
                             (["--precision", "float16"], "float16", "asked for")]:  # fmt: skip
        out = tmp_path / f"{want}.png"
        r = run_cli("gen", "--prompt", "a", *size, *flags, "--model", overflowing_folder,
                    "--output", out)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"{want} ({why}" in r.stderr  # the header line
        with Image.open(out) as img:
            meta = json.loads(img.info["mlxflux"])
            assert f"Precision: {want}" in img.info["parameters"]
        assert meta["precision"] == want and why in meta["precision_why"]
        if want == "float16":
            assert meta["float32_fallbacks"] == ["final_layer", "input", "decode"]


def test_overflow_raises_naming_the_stage_and_step(broken_folder, overflowing_folder):
    for precision in ("float32", "bfloat16"):
        pipe = mlxflux.load(broken_folder, precision=precision)
        with pytest.raises(
            mlxflux.NonFiniteError, match=f"denoise stage at step 1/2 in {precision}"
        ):
            pipe.generate("a red cube", width=32, height=32, steps=2, seed=1)
    # weights that only overflow float16 stay finite in float32: the guard does not fire
    image = mlxflux.load(overflowing_folder, precision="float32").generate(
        "a red cube", width=32, height=32, steps=2, seed=1
    )
    assert image.size == (32, 32)


def test_cli_overflow_is_one_line_exit_2_and_no_png(tmp_path, broken_folder):
    r = run_cli("gen", "--prompt", "a red cube", "--width", "32", "--height", "32", "--steps", "2",
                "--seed", "1", "--precision", "bfloat16", "--model", broken_folder,
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxflux: error: non-finite values (NaN/inf) in the denoise stage")
    assert "--precision float32" in last and "no image was written" in last
    assert not list(tmp_path.glob("*.png"))
