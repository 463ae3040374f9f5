"""FLUX.1 schnell (Apache-2.0, no guidance embedding): converted from shapes alone, run with
its own defaults (4 steps, shift 1.0 as ComfyUI samples it), against diffusers' FluxPipeline."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import mlxflux
from mlxflux.convert import convert
from mlxflux.models.latents import pack_latents

from . import reference
from .helpers import HEIGHT, WIDTH, generate, run_cli, tokenizer_dir
from .reference import FP32_MAX, FP32_MEAN, PROMPT, compare, hf_cache, reference_pipeline

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def models():
    return reference.make_models(seed=41, guidance=False)


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    """From BFL single files: no config.json, so the config comes from the tensor shapes."""
    tmp = tmp_path_factory.mktemp("schnell")
    reference.write_single_files(models, tmp / "files")
    return convert([tmp / "files"], tmp / "model", bits=None, dtype="float32",
                   tokenizers=tokenizer_dir())  # fmt: skip


def test_schnell_converts_from_shapes_and_runs_with_its_defaults(models, folder):
    manifest = json.loads((folder / "mlxflux.json").read_text())
    assert manifest["components"]["transformer"]["config"]["guidance_embed"] is False
    assert "transformer config inferred" in " ".join(manifest["notes"])
    noise = mlxflux.comfy_noise(8, (1, 16, HEIGHT // 8, WIDTH // 8))
    pipe = mlxflux.load(folder)
    ours, report = generate(pipe, PROMPT, width=WIDTH, height=HEIGHT, noise=noise)
    settings = report.settings
    assert (settings["steps"], settings["shift"], settings["model"]) == (4, 1.0, "flux1-schnell")
    # the reference: ComfyUI's schnell sigmas (simple, shift 1.0, 4 steps), no guidance input
    sigmas = mlxflux.sigmas("simple", 4, width=WIDTH, height=HEIGHT, shift=1.0)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    with torch.no_grad():
        ref = reference_pipeline(models, sched)(
            PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=4, sigmas=sigmas[:-1],
            guidance_scale=0.0, latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
            output_type="np", max_sequence_length=256,
        ).images  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"schnell vs FluxPipeline: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    # guidance is not an input of schnell: any value draws the same picture
    again = pipe.generate(PROMPT, width=WIDTH, height=HEIGHT, noise=noise, guidance=9.0)
    assert np.array_equal(np.asarray(again), np.asarray(ours))


def test_cli_notes_the_ignored_guidance_and_names_the_model(folder, tmp_path):
    r = run_cli("gen", "--prompt", "x", "--width", "32", "--height", "32", "--seed", "1",
                "--guidance", "5", "--model", folder, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "FLUX.1 schnell has no guidance input" in r.stderr
    image = Image.open(r.stdout.strip())
    assert "Model: flux1-schnell" in image.text["parameters"]
    assert json.loads(image.text["mlxflux"])["steps"] == 4


def test_first_run_with_the_schnell_repo_needs_no_account(tmp_path, models):
    hub = hf_cache(tmp_path, models, "FLUX.1-schnell")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "MLXFLUX_HOME": str(tmp_path / "home")}  # fmt: skip
    r = run_cli("gen", "--prompt", "a red cube", "--width", "32", "--height", "32", "--seed", "3",
                "--hf-repo", "black-forest-labs/FLUX.1-schnell", env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "gated" not in r.stderr and "downloading black-forest-labs/FLUX.1-schnell" in r.stderr
    assert (tmp_path / "home/models/flux1-schnell-q8/mlxflux.json").exists()
    assert Image.open(r.stdout.strip()).size == (32, 32)
