"""Many seeds in one run: each image equals its single-seed run, the text and every stage's
weights load once, and under `mlx.launch` every seed is made exactly once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlxflux
import mlxflux.pipeline as pipeline_module

from .helpers import interrupted_gen, run_cli

KW = dict(width=48, height=32, steps=2)


@pytest.fixture(scope="module")
def folder(small_folder):
    return small_folder


def test_many_seeds_equal_single_runs_and_load_each_stage_once(folder, monkeypatch):
    singles = {s: np.asarray(mlxflux.load(folder).generate("a red cube", seed=s, **KW))
               for s in (3, 17, 42)}  # fmt: skip
    loads = []
    real = pipeline_module.load_component

    def counting(folder, name, *a, **k):
        loads.append(name)
        return real(folder, name, *a, **k)

    monkeypatch.setattr(pipeline_module, "load_component", counting)
    pipe = mlxflux.load(folder)
    steps_seen = []
    on_step = lambda i, s, n: steps_seen.append((i, s))  # noqa: E731
    job = pipe.prepare(mlxflux.GenerationRequest("a red cube", seeds=(3, 17, 42), **KW))
    out = list(job.run(on_step=on_step))
    assert [s for s, _ in out] == [3, 17, 42]
    for seed, image in out:
        assert np.array_equal(np.asarray(image), singles[seed]), seed
    assert sorted(loads) == ["clip", "t5", "transformer", "vae"]  # once each, for 3 images
    rep = job.report
    assert list(rep.stages) == ["text", "modulation", "denoise", "decode"]
    assert [i["seed"] for i in rep.images] == [3, 17, 42]
    assert all(i["denoise_seconds"] > 0 and i["decode_seconds"] > 0 for i in rep.images)
    assert steps_seen == [(i, s) for i in range(3) for s in (1, 2)]
    assert rep.settings["seeds"] == [3, 17, 42]


def test_cli_seeds_and_count_write_one_png_per_seed(folder, tmp_path):
    r = run_cli("gen", "--prompt", "a red cube", "--width", "48", "--height", "32", "--steps", "2",
                "--seeds", "17,3", "--model", folder, "--output", "covers/cube-{index}-{seed}.png",
                "--report", "r.json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["cube-0-17.png", "cube-1-3.png"]
    single = np.asarray(mlxflux.load(folder).generate("a red cube", seed=3, **KW))
    assert np.array_equal(np.asarray(Image.open(paths[1])), single)
    assert json.loads(Image.open(paths[0]).text["mlxflux"])["seed"] == 17
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [i["output"] for i in rep["images"]] == [str(p) for p in paths]
    assert "per image" in r.stderr

    r = run_cli("gen", "--prompt", "a red cube", "--width", "32", "--height", "32", "--steps", "1",
                "--seed", "5", "--count", "2", "--model", folder, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [Path(p).name for p in r.stdout.split()] == ["a-red-cube-5.png", "a-red-cube-6.png"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seeds", "1,2", "--output", "same.png"], "--output: 'same.png' would name every"),
        (["--seeds", "1,x"], "--seeds: 'x' is not a whole number"),
        (["--seeds", "1,2", "--seed", "3"], "--seeds: give either --seeds or --seed"),
        (["--count", "0"], "--count: must be at least 1"),
        (["--output", "{name}.png"], "--output: '{name}.png': unknown field {name}"),
    ],
)
def test_cli_refuses_bad_seed_flags_in_one_line(folder, tmp_path, flags, message):
    r = run_cli("gen", "--prompt", "x", "--steps", "1", "--model", folder, *flags, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"mlxflux: error: {message}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_keeps_the_images_already_written(folder, tmp_path):
    args = ["--prompt", "x", "--width", "32", "--height", "32", "--steps", "1", "--seeds",
            "1,2,3", "--output", "{seed}.png", "--model", folder]  # fmt: skip
    r = interrupted_gen("denoise", 2, args, cwd=tmp_path)  # while denoising the second seed
    assert r.returncode == 2, r.stderr
    assert "interrupted: 1 of 3 images written" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.png"]


def test_mlx_launch_splits_the_seeds_across_two_processes(folder, tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable, "-m",
           "mlxflux.cli", "gen", "--prompt", "x", "--width", "32", "--height", "32", "--steps",
           "1", "--seeds", "4,5,6", "--output", "{seed}.png", "--model", str(folder)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.png", "5.png", "6.png"]
    assert sorted(Path(p).name for p in r.stdout.split() if p.endswith(".png")) == [
        "4.png", "5.png", "6.png"]  # fmt: skip
    assert "3 of 3 images written by 2 processes" in r.stdout + r.stderr
    single = np.asarray(mlxflux.load(folder).generate("x", width=32, height=32, steps=1, seed=5))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "5.png")), single)
