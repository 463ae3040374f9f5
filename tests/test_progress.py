"""Progress for the stages that are not counted in steps (T5's layers, the VAE's blocks), in the
CLI's bars and the report's `on_progress`; and the one-line advice when MLX's CPU backend runs
on its reference BLAS while OpenBLAS is installed."""

import os

import numpy as np
import pytest

import mlxflux
from mlxflux.precision import blas_advice
from mlxflux.request import GenerationRequest

from .helpers import cover_image, run_cli


@pytest.fixture(scope="module")
def pipe(small_folder):
    return mlxflux.load(small_folder)


def run(pipe, listen: bool, **kw):
    job = pipe.prepare(GenerationRequest(prompt="a vinyl cover", width=64, height=48, steps=2,
                                         seeds=(3,), **kw))  # fmt: skip
    events = []
    if listen:
        job.report.on_progress = lambda stage, done, total: events.append((stage, done, total))
    ((_, image),) = list(job.run())
    return np.asarray(image), events


@pytest.mark.parametrize("tiled", [False, True])
def test_each_stage_counts_its_units_and_the_picture_stays_the_same(pipe, tmp_path, tiled):
    original = tmp_path / "original.png"
    cover_image(2, 64, 48).save(original)
    kw = {"init_image": str(original), "denoise": 0.7, "tiled_decode": tiled}
    quiet, none = run(pipe, False, **kw)
    heard, events = run(pipe, True, **kw)
    assert np.array_equal(quiet, heard) and none == []
    ae = pipe.load("vae")
    t5_layers = pipe.manifest["components"]["t5"]["config"]["num_layers"]
    want = {"text": t5_layers, "encode": ae.encoder.units, "decode": ae.decoder.units}
    for stage, total in want.items():
        counts = [(d, t) for s, d, t in events if s == stage]
        # from nothing to all, one unit at a time
        assert counts == [(i, total) for i in range(total + 1)], (stage, counts)
    assert [s for s, _, _ in events if s not in want] == []


def test_gen_shows_a_bar_for_the_text_and_the_decode(small_folder, tmp_path):
    r = run_cli("gen", "--model", small_folder, "--prompt", "a book cover", "--width", 64,
                "--height", 48, "--steps", 2, "--seed", 1, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    layers = mlxflux.load(small_folder).manifest["components"]["t5"]["config"]["num_layers"]
    units = mlxflux.load(small_folder).load("vae").decoder.units
    assert "text: 100%" in r.stderr and f"{layers}/{layers}" in r.stderr, r.stderr
    assert "decode: 100%" in r.stderr and f"{units}/{units}" in r.stderr, r.stderr
    assert r.stderr.index("text:") < r.stderr.index("denoise:") < r.stderr.index("decode:")


def test_blas_advice_names_the_fix_only_when_it_applies(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    reference = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/python3/site-packages/mlx/lib/libmlx.so\n"
    said = blas_advice(maps=reference, paths=(str(tmp_path / "absent.so"), str(lib)))
    assert said == ("MLX's CPU backend is on its reference BLAS (~25x slower matmuls) while "
                    f"OpenBLAS is installed: run with LD_PRELOAD={lib}")  # fmt: skip
    preloaded = reference + f"7f02-7f03 r-xp 0 08:01 2 {lib}\n"
    assert blas_advice(maps=preloaded, paths=(str(lib),)) is None
    assert blas_advice(maps=reference, paths=(str(tmp_path / "absent.so"),)) is None


def test_gen_warns_once_without_the_preload(small_folder, tmp_path):
    from mlxflux.precision import OPENBLAS_PATHS

    installed = [p for p in OPENBLAS_PATHS if os.path.exists(p)]
    if not installed:
        pytest.skip("OpenBLAS is not installed here (apt-get install libopenblas0-pthread)")
    args = ("gen", "--model", small_folder, "--prompt", "x", "--width", 32, "--height", 32,
            "--steps", 1, "--seed", 1)  # fmt: skip
    bare = run_cli(*args, env={"LD_PRELOAD": ""}, cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert bare.stderr.count(f"LD_PRELOAD={installed[0]}") == 1, bare.stderr
    preloaded = run_cli(*args, env={"LD_PRELOAD": installed[0]}, cwd=tmp_path)
    assert preloaded.returncode == 0 and "reference BLAS" not in preloaded.stderr
