"""The FLUX refine of an upscaled picture (`mlxflux.refine`): image to image over overlapping
tiles, one seed's noise for the whole latent, the tiles' Euler steps blended every step with
ComfyUI's tiled_scale feather. Checked against a reference built here from diffusers'
AutoencoderKL, FluxTransformer2DModel and FluxPipeline's text encoding, with ComfyUI's
img2img formulas (VAEEncode's mode and latent format, set_steps, noise_scaling)."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image

import mlxflux
from mlxflux.refine import prepare_refine, tile_starts
from mlxflux.resolve import resolve

from .helpers import cover_image, run_cli, tiny_upscaler
from .reference import (
    FP32_MAX,
    FP32_MEAN,
    PROMPT,
    compare,
    quantize_dequantize_,
    reference_pipeline,
)

pytestmark = pytest.mark.reference


def comfy_feather(h: int, w: int, feather: int) -> np.ndarray:
    """`comfy.utils.tiled_scale`'s mask, as its loop writes it: for t in range(feather),
    mask[:, :, t, :] *= (1 / feather) * (t + 1), the same from the far edge, both axes."""
    mask = np.ones((h, w), np.float32)
    for t in range(feather):
        a = np.float32(1.0 / feather) * np.float32(t + 1)
        mask[t, :] *= a
        mask[h - 1 - t, :] *= a
        mask[:, t] *= a
        mask[:, w - 1 - t] *= a
    return mask


def reference_refine(models, image: Image.Image, tiles, tile_hw, feather, steps, denoise, seed,
                     scheduler="simple") -> np.ndarray:  # fmt: skip
    """The refine, computed independently: the whole picture encoded (ComfyUI's VAEEncode:
    mode, then (z - shift) * scale), the tile's img2img schedule (set_steps), ComfyUI's noise
    over the whole latent, noise_scaling; then every step each tile through diffusers'
    transformer at its own positions (FluxPipeline's packing, ids and timestep), Euler, the
    tiles summed with the feather masks and divided by their sum; then VAEDecode."""
    vae, transformer = models["vae"], models["transformer"]
    th, tw = tile_hw  # latent pixels
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = vae.encode(2 * pixels - 1).latent_dist.mode()
    latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
    full = mlxflux.sigmas(scheduler, int(steps / denoise), width=tw * 8, height=th * 8,
                          shift=1.15)  # fmt: skip
    sigmas = full[-(steps + 1) :]
    noise = torch.from_numpy(mlxflux.comfy_noise(seed, tuple(latent.shape)))
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
    pipe = reference_pipeline(models, FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=256)
    ids = FluxPipeline._prepare_latent_image_ids(1, th // 2, tw // 2, "cpu", torch.float32)
    mask = torch.from_numpy(comfy_feather(th, tw, feather))
    div = torch.zeros(latent.shape[2:])
    for y, xx in tiles:
        div[y : y + th, xx : xx + tw] += mask
    for i in range(steps):
        out = torch.zeros_like(x)
        for y, xx in tiles:
            part = FluxPipeline._pack_latents(x[:, :, y : y + th, xx : xx + tw], 1, 16, th, tw)
            with torch.no_grad():
                v = transformer(hidden_states=part, timestep=torch.tensor([sigmas[i]]),
                                guidance=torch.full([1], 3.5), pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                return_dict=False)[0]  # fmt: skip
            part = part + (sigmas[i + 1] - sigmas[i]) * v
            part = FluxPipeline._unpack_latents(part, th * 8, tw * 8, 8)
            out[:, :, y : y + th, xx : xx + tw] += part * mask
        x = out / div
    with torch.no_grad():
        img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def refine_request(steps=3, denoise=0.4, seed=7, **kw):
    return resolve({"prompt": PROMPT, "seed": seed, "steps": steps, "denoise": denoise,
                    "init_image": Image.new("RGB", (64, 64)), **kw})  # fmt: skip


@pytest.mark.parametrize("bits", [None, 8])
def test_tiled_refine_matches_a_reference_built_from_diffusers(models, folder, folder_q8, bits):
    image = cover_image(5, 320, 192)  # 6 tiles of 128x128: 2 rows x 3 columns
    pipe = mlxflux.load(folder_q8 if bits else folder)
    refine = prepare_refine(pipe, image, refine_request(), "cover.png", tile=128)
    assert len(refine.tiles) == 6 and refine.overlap == 2
    ref_models = dict(models)
    if bits:  # the reference holds the dequantized weights of every layer the converter quantizes
        for name in ("transformer", "t5"):
            ref_models[name] = quantize_dequantize_(copy.deepcopy(models[name]), bits)
    ref = reference_refine(ref_models, image, refine.tiles, (16, 16), refine.overlap, 3, 0.4, 7)
    ours = refine.run()
    mean, worst = compare(ours, ref)
    print(f"refine, 6 tiles, {bits or 'fp32'}: mean {mean:.4f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    # and the refine changed the picture: it is no identity
    moved = np.abs(np.asarray(ours, np.int32) - np.asarray(image, np.int32)).mean()
    assert moved > 1.0


def test_one_tile_is_image_to_image(folder):
    """A picture within one tile refines exactly as a plain image to image of it."""
    image = cover_image(6, 160, 96)
    pipe = mlxflux.load(folder)
    refine = prepare_refine(pipe, image, refine_request(), "cover.png", tile=1024)
    assert refine.tiles == [(0, 0)]
    plain = pipe.generate(PROMPT, seed=7, steps=3, init_image=image, denoise=0.4)
    assert np.array_equal(np.asarray(refine.run()), np.asarray(plain))


@pytest.mark.parametrize("length", [16, 17, 100, 128, 129, 200, 416, 608, 1000])
@pytest.mark.parametrize("tile,overlap", [(128, 16), (64, 8), (32, 30)])
def test_tiles_cover_the_latent_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + size] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + size - b >= overlap  # neighbours share at least the overlap
    # no more tiles than needed
    assert len(starts) == (
        1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))
    )


def test_refine_refuses_what_it_cannot_run(folder, no_stage):
    pipe = mlxflux.load(folder)
    image = cover_image(1, 320, 192)
    with pytest.raises(mlxflux.SettingsError, match="refine_tile: .*multiple of 16"):
        prepare_refine(pipe, image, refine_request(), "x.png", tile=200)
    with pytest.raises(mlxflux.SettingsError, match="one seed"):
        prepare_refine(pipe, image, refine_request(seeds="1,2", seed=None), "x.png")


def test_cli_refines_from_the_pictures_own_settings(folder, tmp_path):
    """gen writes a cover; `upscale --refine` takes its prompt and seed from it, upscales,
    refines in tiles and records both; the result equals the same steps through the API."""
    model = tiny_upscaler(tmp_path)
    out = run_cli("gen", "--model", str(folder), "--prompt", PROMPT, "--width", "160",
                  "--height", "96", "--steps", "5", "--seed", "11", "--output",
                  str(tmp_path / "c.png"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = run_cli("upscale", str(tmp_path / "c.png"), "--model", str(model), "--refine", "0.4",
                  "--refine-tile", "128", "--model-dir", str(folder), "--output",
                  str(tmp_path / "big.png"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    png = Image.open(tmp_path / "big.png")
    meta = json.loads(png.text["mlxflux"])
    assert png.size == (320, 192)
    assert meta["prompt"] == PROMPT and meta["seed"] == 11 and meta["denoise"] == 0.4
    assert meta["steps"] == 2  # 5 x 0.4: the part of the original's schedule a refine redraws
    assert meta["refine"] == {"denoise": 0.4, "tile": [128, 128], "overlap": 16, "tiles": 6}
    assert meta["upscale_model"] == "tiny-x2.pth" and meta["source"] == "c.png"
    assert "Upscaler: tiny-x2.pth" in png.text["parameters"]
    assert "Ultimate SD Upscale" in json.loads(png.text["workflow"])["extra"]["mlxflux_note"]
    graph = json.loads(png.text["prompt"])
    assert {n["class_type"] for n in graph.values()} >= {"UpscaleModelLoader",
                                                         "ImageUpscaleWithModel"}  # fmt: skip
    # the same through the API: the model upscale, then the refine
    pipe = mlxflux.load(folder)
    big = mlxflux.upscale(Image.open(tmp_path / "c.png"), model)
    want = prepare_refine(pipe, big, refine_request(steps=2, seed=11), "c", tile=128).run()
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(want))


def test_gen_upscales_and_refines_each_seed(folder, tmp_path):
    model = tiny_upscaler(tmp_path)
    out = run_cli("gen", "--model", str(folder), "--prompt", PROMPT, "--width", "160",
                  "--height", "96", "--steps", "4", "--seeds", "3,4", "--output",
                  str(tmp_path / "c-{seed}.png"), "--upscale", f"{model}:1.5", "--refine",
                  "0.5", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for seed in (3, 4):
        png = Image.open(tmp_path / f"c-{seed}-upscaled-1.5x.png")
        meta = json.loads(png.text["mlxflux"])
        assert png.size == (240, 144)
        assert meta["seed"] == seed and meta["steps"] == 2 and meta["scale"] == 1.5
        assert meta["source"] == f"c-{seed}.png"
        assert (tmp_path / f"c-{seed}.png").exists()  # the cover itself stays


@pytest.mark.parametrize(
    "args,message",
    [
        (["--refine", "0.3"], "--refine: give --upscale MODEL too"),
        (["--upscale", "missing.pth"], "--upscale: .*missing.pth"),
        (["--upscale", "MODEL:3"], "--upscale: scale 3 is over"),
        (["--upscale", "MODEL", "--refine", "1.5"], "--refine"),
    ],
)
def test_gen_refuses_a_bad_upscale_before_any_stage(folder, tmp_path, args, message):
    import re

    model = tiny_upscaler(tmp_path)
    args = [a.replace("MODEL", str(model)) for a in args]
    out = run_cli("gen", "--model", str(folder), "--prompt", "x", "--steps", "1", *args,
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("*.png"))


def test_upscale_refine_needs_a_prompt_and_a_model_folder(folder, tmp_path):
    model = tiny_upscaler(tmp_path)
    plain = tmp_path / "plain.png"
    cover_image(2, 64, 64).save(plain)  # no settings in it
    out = run_cli("upscale", str(plain), "--model", str(model), "--refine", "0.3",
                  "--model-dir", str(folder), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "--refine: needs the prompt" in out.stderr
    out = run_cli("upscale", str(plain), "--model", str(model), "--refine", "0.3", "--prompt",
                  "x", "--model-dir", str(tmp_path / "none"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "no such model folder" in out.stderr
    assert not list(tmp_path.glob("*upscaled*"))


def test_ctrl_c_while_refining_writes_nothing(folder, tmp_path, monkeypatch):
    from mlxflux import refine as refine_module
    from mlxflux.cli_gen import Failure
    from mlxflux.cli_upscale import Refining, Upscaling, upscale_one
    from mlxflux.pixels import Picture

    def interrupted(self, on_step=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_module.Refine, "run", interrupted)
    up = Upscaling.open(tiny_upscaler(tmp_path), None)
    refiner = Refining(mlxflux.load(folder), refine_request())
    picture = Picture.of(cover_image(3, 64, 64), "image")
    with pytest.raises(Failure, match="interrupted: .* not written"):
        upscale_one(picture, up, refiner, tmp_path / "out.png", 512, 128)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny-x2.pth"]
