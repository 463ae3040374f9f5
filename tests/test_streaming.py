"""The memory plan and streamed stages (issue 21): a run that does not fit its budget reads each
block's weights from the model folder just before the block runs and draws the same pixels,
bit for bit, as a resident run."""

import json

import numpy as np
import pytest
from PIL import Image

import mlxflux
from mlxflux import memory_plan
from mlxflux.memory_plan import GIB, make_plan, parse_budget
from mlxflux.model_folder import read_manifest
from mlxflux.models.transformer import is_modulation_key

from .helpers import generate, run_cli, small_model, write_lora

KW = dict(width=48, height=32, steps=2, seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {bits: small_model(tmp_path_factory.mktemp(f"stream{bits}") / "model", bits=bits,
                              seed=13) for bits in (None, 8)}  # fmt: skip


def needs(folder, width=48, height=32, steps=2):
    plan = make_plan(read_manifest(folder), width, height, 4, 1 << 50, steps=steps)
    return plan.needs


def streaming_budget(folder) -> float:
    """GiB that fits every stage's streamed need but not the denoise stage's resident one."""
    n = needs(folder)
    low = max(x.streamed for x in n.values())
    assert low < n["denoise"].resident, n  # the tiny model can be made to stream
    return (low + 1) / GIB


def test_plan_is_resident_when_the_model_fits_and_streams_when_not(folders):
    folder = folders[8]
    n = needs(folder)
    roomy = max(x.resident for x in n.values())
    plan = make_plan(read_manifest(folder), 48, 32, 4, roomy, steps=2)
    assert plan.kind == "resident" and not plan.streamed
    tight = int(streaming_budget(folder) * GIB)
    plan = make_plan(read_manifest(folder), 48, 32, 4, tight, steps=2)
    assert plan.kind == "streamed" and "denoise" in plan.streamed
    # auto reads the machine's budget: plenty here for a tiny model
    assert make_plan(read_manifest(folder), 48, 32, 4, None).kind == "resident"


def test_auto_budget_is_the_working_set_less_a_margin():
    info = {"max_recommended_working_set_size": 10_667_000_000}  # a 16 GB M1
    budget = memory_plan.machine_budget(info)
    assert budget == 10_667_000_000 - (1 << 30)  # the margin: 10%, at least 1 GiB
    assert memory_plan.machine_budget({"max_recommended_working_set_size": 0}) > 0  # fallback
    assert parse_budget("auto") is None and parse_budget(None) is None
    assert parse_budget("4") == 4 * GIB and parse_budget(0.5) == GIB // 2
    for bad in ("-1", "0", "lots", "nan", "inf"):
        with pytest.raises(mlxflux.SettingsError, match="^memory_budget: "):
            parse_budget(bad)


@pytest.mark.parametrize("case", ["txt2img", "8-bit", "img2img", "lora", "dora"])
def test_streamed_images_equal_resident_ones(folders, tmp_path, case):
    folder = folders[8 if case in ("8-bit", "dora") else None]
    kw = dict(KW)
    if case == "img2img":
        rng = np.random.default_rng(0)
        kw["init_image"] = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
        kw["denoise"] = 0.7
    if case == "lora":
        layers = {"double_blocks.0.img_attn.qkv": (768, 256),
                  "single_blocks.1.linear1": (1792, 256),
                  "double_blocks.1.img_mod.lin": (1536, 256)}  # fmt: skip
        kw["loras"] = [(write_lora(tmp_path / "l.safetensors", layers, 2), 0.8)]
    if case == "dora":  # DoRA's rows are made from the layer's own weights, read as it streams
        from safetensors.numpy import load_file, save_file

        layers = {
            "double_blocks.0.img_attn.qkv": (768, 256),
            "single_blocks.1.linear2": (256, 1280),
        }
        path = write_lora(tmp_path / "d.safetensors", layers, 3)
        tensors = load_file(str(path))
        for layer, (rows, cols) in layers.items():
            scale = np.random.default_rng(rows).uniform(0.5, 1.5, (1, cols)).astype(np.float32)
            tensors["lora_unet_" + layer.replace(".", "_") + ".dora_scale"] = scale
        save_file(tensors, str(path))
        kw["loras"] = [(path, 0.7)]
    resident = mlxflux.load(folder)
    want, resident_report = generate(resident, "a red cube", **kw)
    assert resident_report.plan == "resident"
    budget = streaming_budget(folder)
    if case in ("lora", "dora"):  # the plan counts the side paths: rank 4 x (in + out) float32
        budget += sum(4 * (rows + cols) * 4 for rows, cols in layers.values()) / GIB
    if case == "dora":  # and DoRA's dense rows
        budget += sum(rows * cols * 4 for rows, cols in layers.values()) / GIB
    streamed = mlxflux.load(folder, memory_budget=budget)
    got, rep = generate(streamed, "a red cube", **kw)
    want, got = np.asarray(want), np.asarray(got)
    assert rep.plan == "streamed" and "streaming denoise" in rep.settings["memory_plan"]
    assert np.array_equal(got, want)  # bit for bit
    # every step read every trunk block once
    manifest = read_manifest(folder)
    flux = manifest["components"]["transformer"]
    trunk = {k for k in flux["tensors"] if not is_modulation_key(k)}
    blocks, _ = memory_plan.block_bytes(flux, trunk)
    steps = len([1 for _ in range(kw["steps"])])
    denoise = rep.stages["denoise"]
    assert denoise.bytes_read >= steps * sum(blocks.values())
    assert denoise.bytes_read > resident_report.stages["denoise"].bytes_read
    assert denoise.read_wait_seconds >= 0


def test_streamed_t5_equals_resident(folders):
    pipe = mlxflux.load(folders[8])
    txt_a, pooled_a = pipe.encode_text("a red cube on a table", "comfy")
    txt_b, pooled_b = pipe.encode_text("a red cube on a table", "comfy", streamed=True)
    assert np.array_equal(np.array(txt_a), np.array(txt_b))
    assert np.array_equal(np.array(pooled_a), np.array(pooled_b))


def test_a_budget_below_streaming_is_refused_before_any_stage(folders, tmp_path, no_stage):
    folder = folders[8]
    pipe = mlxflux.load(folder, memory_budget=0.001)
    with pytest.raises(mlxflux.SettingsError, match="memory_budget: 1.0 MiB is below the"):
        pipe.generate("a red cube", **KW)
    r = run_cli("gen", "--prompt", "x", "--width", "48", "--height", "32", "--steps", "1",
                "--memory-budget", "0.001", "--model", folder, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mlxflux: error: --memory-budget: ")
    assert not list(tmp_path.iterdir())


def test_cli_says_it_streams_and_the_report_has_the_reads(folders, tmp_path):
    folder = folders[None]
    budget = f"{streaming_budget(folder):.9f}"
    r = run_cli("gen", "--prompt", "x", "--width", "48", "--height", "32", "--steps", "2",
                "--seed", "3", "--memory-budget", budget, "--model", folder,
                "--report", tmp_path / "r.json", "--output", tmp_path / "x.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "memory: streaming denoise from disk" in r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["plan"] == "streamed"
    assert all(rep["stages"][s]["bytes_read"] > 0 for s in ("text", "modulation", "denoise"))
