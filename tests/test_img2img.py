"""Image to image as ComfyUI's LoadImage -> VAEEncode -> KSampler(denoise) runs it, against a
reference built from ComfyUI's formulas with diffusers' AutoencoderKL and FluxPipeline."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlxflux

from .helpers import HEIGHT, WIDTH, cover_image, generate, run_cli
from .reference import FP32_MAX, FP32_MEAN, PROMPT, comfy_img2img_reference, compare

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("scheduler,denoise", [("simple", 0.5), ("simple", 0.8), ("beta", 0.6)])
def test_img2img_matches_comfyui(models, folder, scheduler, denoise):
    image, steps, seed = cover_image(1), 4, 9
    ref = comfy_img2img_reference(models, image, scheduler, steps, denoise, seed)
    pipe = mlxflux.load(folder)
    ours, report = generate(
        pipe, PROMPT, width=WIDTH, height=HEIGHT, steps=steps, seed=seed, scheduler=scheduler,
        init_image=image, denoise=denoise,
    )  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"img2img {scheduler} denoise {denoise}: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    assert set(report.stages) == {"text", "encode", "modulation", "denoise", "decode"}
    assert report.settings["denoise"] == denoise


def test_denoise_one_with_an_init_image_is_text_to_image(folder, tmp_path):
    path = tmp_path / "cover.png"
    cover_image(3).save(path)
    pipe = mlxflux.load(folder)
    kw = dict(width=WIDTH, height=HEIGHT, steps=3, seed=5)
    with_image, report = generate(pipe, PROMPT, init_image=path, denoise=1.0, **kw)
    settings = report.settings
    assert settings["init_image"] == "cover.png" and len(settings["init_image_sha256"]) == 64
    assert np.array_equal(np.asarray(with_image), np.asarray(pipe.generate(PROMPT, **kw)))


def test_init_image_is_scaled_to_cover_and_centre_cropped():
    from mlxflux.pixels import cover

    # a 200x100 image with a vertical stripe at its centre, to a 64x64 target: scaled to
    # 128x64 (covering), then the centre 64 columns cropped, so the stripe stays centred
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 95:105] = 255
    out = np.asarray(cover(Image.fromarray(arr), 64, 64))
    assert out.shape == (64, 64, 3)
    columns = out[..., 0].mean(0)
    assert columns[30:34].min() > 200 and columns[:20].max() < 10 and columns[-20:].max() < 10
    same = Image.fromarray(arr)
    assert cover(same, 200, 100) is same  # no scaling at the target size


def test_default_size_is_the_images_rounded_to_16(folder):
    pipe = mlxflux.load(folder)
    out = pipe.generate("x", steps=1, init_image=cover_image(4, 70, 41), denoise=0.5)
    assert out.size == (64, 48)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(init_image="/nonexistent/cover.png"), "init_image: .*no such file"),
        (dict(init_image=__file__), "init_image: .*not a readable image"),
        (dict(init_image=Image.new("RGB", (15, 40))), "init_image: .*at least 16x16"),
        (dict(init_image=Image.new("RGB", (64, 64)), denoise=0.0), "denoise: must be above 0"),
        (dict(init_image=Image.new("RGB", (64, 64)), denoise=1.5), "denoise: must be above 0"),
    ],
)
def test_bad_init_image_or_denoise_is_refused(folder, kw, match, no_stage):
    pipe = mlxflux.load(folder)
    with pytest.raises(mlxflux.SettingsError, match=match):
        pipe.generate("x", steps=1, **kw)


# ---- the CLI: gen --init-image, and the before/after sheet ---------------------------------


def test_cli_reimagines_a_cover_and_records_the_original(folder, tmp_path):
    original = tmp_path / "interstellar.jpg"
    cover_image(5, 300, 450).save(original, quality=95)
    r = run_cli("gen", "--preset", "dvd", "--init-image", original, "--steps", "1", "--seed", "4",
                "--model", folder, "--report", tmp_path / "r.json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    made = Path(r.stdout.strip())
    out = Image.open(made)
    assert out.size == (832, 1216)  # the preset's size; the original is scaled to cover it
    settings = json.loads(out.text["mlxflux"])
    assert settings["init_image"] == "interstellar.jpg" and settings["denoise"] == 0.6
    assert settings["init_image_sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    assert "Denoising strength: 0.6" in out.text["parameters"]
    stages = json.loads((tmp_path / "r.json").read_text())["stages"]
    assert list(stages) == ["text", "encode", "modulation", "denoise", "decode"]

    # the sheet: original and re-imagined side by side at one height, captioned
    r = run_cli("compare", original, made, "--output", tmp_path / "sheet.png",
                "--height", "256")  # fmt: skip
    assert r.returncode == 0, r.stderr
    sheet = Image.open(r.stdout.strip())
    widths = [round(300 * 256 / 450), round(832 * 256 / 1216)]
    pad = 8
    assert sheet.size[0] == sum(widths) + 3 * pad and sheet.size[1] > 256
    described = json.loads(sheet.text["mlxflux-sheet"])
    assert [d["file"] for d in described] == ["interstellar.jpg", made.name]
    assert described[0]["settings"] is None and described[1]["settings"]["seed"] == 4
    captions = np.asarray(sheet.convert("L"))[256 + pad :]
    x = pad
    for w in widths:  # dark caption text under each picture
        assert (captions[:, x : x + w] < 128).sum() > 20
        x += w + pad


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--init-image", "missing.png"], "--init-image: missing.png: no such file"),
        (["--init-image", "notes.txt"], "--init-image: notes.txt: not a readable image"),
        (["--init-image", "reference.png"], "--init-image: reference.png is 8x8: at least 16x16"),
        (["--init-image", "ok.png", "--denoise", "0"], "--denoise: must be above 0"),
        (["--init-image", "ok.png", "--denoise", "1.5"], "--denoise: must be above 0"),
        (["--denoise", "0.5"], "--denoise: needs an init image"),
    ],
)
def test_cli_refuses_bad_init_images_in_one_line(folder, tmp_path, flags, message):
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.new("RGB", (8, 8)).save(tmp_path / "reference.png")
    cover_image(6).save(tmp_path / "ok.png")
    before = set(tmp_path.iterdir())
    r = run_cli("gen", "--prompt", "x", "--steps", "1", "--model", folder, *flags, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlxflux: error: {message}"), r.stderr
    assert set(tmp_path.iterdir()) == before  # no PNG
