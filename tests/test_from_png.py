"""`gen --from-png`: the settings of an earlier PNG (mlxflux's, A1111/Forge `parameters`,
ComfyUI's `prompt` graph), overridable by flags."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mlxflux.errors import SettingsError
from mlxflux.png_settings import read_png_settings

from .helpers import run_cli


@pytest.fixture(scope="module")
def folder(small_folder):
    return small_folder


def png_with(path, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def gen(folder, tmp_path, *args):
    report = tmp_path / "report.json"
    r = run_cli("gen", "--model", folder, "--report", report, *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return Image.open(r.stdout.strip()), json.loads(report.read_text())["settings"], r.stderr


def test_our_png_round_trips_and_flags_override(folder, tmp_path):
    first, s1, _ = gen(folder, tmp_path, "--prompt", "a lighthouse, oil", "--width", 48,
                       "--height", 32, "--steps", 2, "--seed", 5, "--scheduler", "beta",
                       "--guidance", 4.5, "--shift", "auto", "--t5-padding", "max",
                       "--output", "a.png")  # fmt: skip
    again, s2, said = gen(folder, tmp_path, "--from-png", tmp_path / "a.png", "--output", "b.png")
    assert "settings from" in said and "(mlxflux)" in said
    keys = ("prompt", "width", "height", "steps", "seed", "scheduler", "guidance", "shift",
            "t5_padding")  # fmt: skip
    assert {k: s2[k] for k in keys} == {k: s1[k] for k in keys}
    assert np.array_equal(np.asarray(again), np.asarray(first))  # the same settings, the same image
    _, s3, _ = gen(folder, tmp_path, "--from-png", tmp_path / "a.png", "--steps", 1,
                   "--seed", 6, "--output", "c.png")  # fmt: skip
    assert (s3["steps"], s3["seed"], s3["scheduler"], s3["prompt"]) == (1, 6, "beta", s1["prompt"])


# As Forge writes a FLUX.1 image (its parameters chunk: the prompt, then one line of pairs)
FORGE = (
    "A professional book cover for George Orwell's 1984, brutalist concrete\n"
    "Steps: 3, Sampler: Euler, Schedule type: Beta, CFG scale: 1, Distilled CFG Scale: 3, "
    'Seed: 1234, Size: 32x48, Model hash: 0123abcd, Model: flux1-dev-fp8, Lora hashes: "a: 1, '
    'b: 2", Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: ae, Module 2: clip_l'
)

# As ComfyUI saves the Flux dev workflow's API graph (its `prompt` chunk)
COMFY = {
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a DVD cover, black hole",
                                                     "clip": ["11", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp8_e4m3fn.safetensors",
                                                      "clip_name2": "clip_l.safetensors",
                                                      "type": "flux"}},
    "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev-fp8.safetensors",
                                                  "weight_dtype": "fp8_e4m3fn"}},
    "13": {"class_type": "KSampler", "inputs": {"seed": 987, "steps": 2, "cfg": 1.0,
           "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0, "model": ["30", 0],
           "positive": ["26", 0], "negative": ["33", 0], "latent_image": ["27", 0]}},
    "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 2.0, "conditioning": ["6", 0]}},
    "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 48, "height": 32,
                                                           "batch_size": 1}},
    "30": {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5,
           "width": 48, "height": 32, "model": ["12", 0]}},
    "33": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
}  # fmt: skip


def test_forge_parameters(folder, tmp_path):
    src = png_with(tmp_path / "forge.png", parameters=FORGE)
    settings, kind, notes = read_png_settings(src)
    assert kind == "A1111 parameters"
    assert settings == {"prompt": FORGE.split("\n")[0], "steps": 3, "seed": 1234, "width": 32,
                        "height": 48, "guidance": 3.0, "scheduler": "beta"}  # fmt: skip
    assert notes == []
    _, s, _ = gen(folder, tmp_path, "--from-png", src)
    assert (s["seed"], s["width"], s["height"], s["guidance"]) == (1234, 32, 48, 3.0)
    other = FORGE.replace("Sampler: Euler", "Sampler: DPM++ 2M").replace("Beta", "Karras")
    _, _, notes = read_png_settings(png_with(tmp_path / "f2.png", parameters=other))
    assert any("DPM++ 2M" in n for n in notes) and any("Karras" in n for n in notes)


def test_comfyui_prompt_graph(folder, tmp_path):
    src = png_with(tmp_path / "comfy.png", prompt=json.dumps(COMFY), workflow="{}")
    settings, kind, notes = read_png_settings(src)
    assert kind == "ComfyUI prompt graph" and notes == []
    assert settings == {"prompt": "a DVD cover, black hole", "seed": 987, "steps": 2,
                        "scheduler": "simple", "denoise": 1.0, "guidance": 2.0, "width": 48,
                        "height": 32, "shift": "auto"}  # fmt: skip
    _, s, _ = gen(folder, tmp_path, "--from-png", src, "--guidance", 3)
    assert (s["prompt"], s["seed"], s["shift"], s["guidance"]) == (
        "a DVD cover, black hole", 987, "auto", 3.0)  # fmt: skip
    fixed = json.loads(json.dumps(COMFY))
    fixed["30"]["inputs"].update(max_shift=1.15, base_shift=1.15)
    settings, _, _ = read_png_settings(png_with(tmp_path / "c2.png", prompt=json.dumps(fixed)))
    assert settings["shift"] == 1.15


def test_unreadable_sources_are_refused_in_one_line(folder, tmp_path):
    plain = png_with(tmp_path / "plain.png")
    broken = png_with(tmp_path / "broken.png", prompt="{not json")
    (tmp_path / "text.png").write_text("not an image")
    for path, said in ((plain, "holds no settings"), (broken, "cannot be read"),
                       (tmp_path / "text.png", "not a readable image"),
                       (tmp_path / "missing.png", "no such file")):  # fmt: skip
        with pytest.raises(SettingsError, match=said):
            read_png_settings(path)
        r = run_cli("gen", "--model", folder, "--from-png", path, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("mlxflux: error: --from-png: ")
