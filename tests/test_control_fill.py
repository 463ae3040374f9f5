"""FLUX.1 Canny / Depth dev and Fill dev: converted from every layout (the variant from the input
projection's width and the names), run against diffusers' FluxControlPipeline and
FluxFillPipeline on the same tiny weights, the Canny map against ComfyUI's Canny node (kornia),
outpainting against ComfyUI's ImagePadForOutpaint, and the refusals."""

import copy
import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxControlPipeline, FluxFillPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import mlxflux
from mlxflux.convert import ConvertError, convert
from mlxflux.models.latents import pack_latents
from mlxflux.preprocess import CANNY_HIGH, CANNY_LOW, canny_edges, canny_image
from mlxflux.variants.fill import outpaint_canvas

from . import reference
from .helpers import generate, run_cli, tokenizer_dir, transformer_kinds, write_gguf
from .reference import (
    BF16_MAX,
    BF16_MEAN,
    FP32_MAX,
    FP32_MEAN,
    PROMPT,
    compare,
    components,
    flux_to_bfl,
    quantize_dequantize_,
)

pytestmark = pytest.mark.reference

GUIDANCE = {"canny": 30.0, "depth": 10.0, "fill": 30.0}  # BFL's and ComfyUI's examples


@pytest.fixture(autouse=True)
def vae_encode_takes_the_mode(monkeypatch):
    """ComfyUI's VAEEncode takes the posterior's mode; diffusers' control and fill pipelines
    sample it. The reference is given ComfyUI's encoding (the tiny VAE's variance is not
    small, so a sample would be another picture)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None:
                        self.mode())  # fmt: skip


def poster(seed: int, width: int, height: int) -> Image.Image:
    """A cover-like picture with hard edges (shapes, a title) and a little grain."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (
            x0,
            y0,
            x0 + int(rng.integers(5, width // 2)),
            y0 + int(rng.integers(5, height // 2)),
        )
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    draw.text((4, 4), "1984", fill=(255, 255, 255))
    a = np.asarray(image, np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_repo(models, folder, pipeline_class):
    reference.write_diffusers(models, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return folder


@pytest.fixture(scope="module")
def control_models():
    return reference.make_models(seed=61, in_channels=128)


@pytest.fixture(scope="module")
def fill_models():
    return reference.make_models(seed=62, in_channels=384)


def _convert(models, tmp, name, bits=None, cls="FluxPipeline", **kw):
    src = write_repo(models, tmp / f"src-{bits}" / name, cls)
    return convert([src], tmp / f"model-{name}-{bits}", bits=bits, dtype="float32",
                   log=lambda m: None, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def folders(control_models, fill_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control_fill")
    return {
        "canny": _convert(control_models, tmp, "FLUX.1-Canny-dev"),
        "depth": _convert(control_models, tmp, "FLUX.1-Depth-dev"),
        "fill": _convert(fill_models, tmp, "src", cls="FluxFillPipeline"),
        ("canny", 8): _convert(control_models, tmp, "FLUX.1-Canny-dev", bits=8),
        ("fill", 8): _convert(fill_models, tmp, "src", bits=8, cls="FluxFillPipeline"),
    }


def sigmas_for(steps, width, height):
    return mlxflux.sigmas("simple", steps, width=width, height=height, shift=1.15)


def noise_latents(seed, width, height):
    noise = mlxflux.comfy_noise(seed, (1, 16, height // 8, width // 8))
    return torch.from_numpy(np.array(pack_latents(mx.array(noise))))


def control_reference(models, control, width, height, steps, seed, guidance):
    """diffusers' FluxControlPipeline as ComfyUI samples (its sigmas, T5 at 256, its noise)."""
    with torch.no_grad():
        return FluxControlPipeline(**components(models))(
            PROMPT, control_image=control, height=height, width=width,
            num_inference_steps=steps, sigmas=sigmas_for(steps, width, height)[:-1],
            guidance_scale=guidance, latents=noise_latents(seed, width, height),
            output_type="np", max_sequence_length=256,
        ).images  # fmt: skip


def fill_reference(models, image, mask, width, height, steps, seed):
    with torch.no_grad():
        return FluxFillPipeline(**components(models))(
            PROMPT, image=image, mask_image=mask, height=height, width=width,
            num_inference_steps=steps, sigmas=sigmas_for(steps, width, height)[:-1],
            guidance_scale=GUIDANCE["fill"], latents=noise_latents(seed, width, height),
            output_type="np", max_sequence_length=256, strength=1.0,
        ).images  # fmt: skip


def box_mask(width, height, box) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


# ---- conversion --------------------------------------------------------------------------


def single_files(models, tmp, name, fp8=None):
    paths = reference.write_single_files(models, tmp, fp8=fp8,
                                    prefix="model.diffusion_model." if fp8 else "")  # fmt: skip
    paths["transformer"].rename(tmp / name)
    return {"sources": [tmp]}


def gguf_file(models, tmp, name):
    paths = reference.write_single_files(models, tmp)
    paths["transformer"].unlink()
    bfl = {k: v.numpy() for k, v in flux_to_bfl(models["transformer"].state_dict()).items()}
    write_gguf(tmp / name, bfl, transformer_kinds(bfl))
    return {"sources": [tmp], "flux": tmp / name}


LAYOUTS = [
    ("canny", "bfl", lambda m, t: single_files(m, t, "flux1-canny-dev.safetensors")),
    ("depth", "comfy fp8", lambda m, t: single_files(m, t, "flux1-depth-dev-fp8.safetensors",
                                                     torch.float8_e4m3fn)),
    ("fill", "diffusers", lambda m, t: {"sources": [write_repo(m, t / "x", "FluxFillPipeline")]}),
    ("fill", "gguf", lambda m, t: gguf_file(m, t, "flux1-fill-dev-Q8_0.gguf")),
    ("canny", "gguf", lambda m, t: gguf_file(m, t, "flux1-canny-dev-Q8_0.gguf")),
    ("depth", "diffusers", lambda m, t: {"sources": [write_repo(m, t / "FLUX.1-Depth-dev",
                                                                "FluxControlPipeline")]}),
]  # fmt: skip


@pytest.mark.parametrize("variant,layout,write", LAYOUTS, ids=[f"{v}-{a}" for v, a, _ in LAYOUTS])
def test_converts_from_each_layout(control_models, fill_models, tmp_path, variant, layout, write):
    models = fill_models if variant == "fill" else control_models
    kw = write(models, tmp_path / "src")
    notes = []
    out = convert(kw.pop("sources"), tmp_path / "model", bits=8, dtype="float32",
                  tokenizers=tokenizer_dir(), log=notes.append, **kw)  # fmt: skip
    manifest = json.loads((out / "mlxflux.json").read_text())
    assert manifest["variant"] == variant
    cfg = manifest["components"]["transformer"]["config"]
    assert (cfg["in_channels"], cfg["out_channels"]) == ({"fill": 384}.get(variant, 128), 64)
    pipe = mlxflux.load(out)
    assert (pipe.variant, pipe.defaults["guidance"]) == (variant, GUIDANCE[variant])
    if variant != "fill":  # 128 channels are Canny's or Depth's: the name said which
        assert any(f"variant {variant}: suggested by" in n for n in notes)


def test_an_unnamed_control_model_needs_the_variant_flag(control_models, tmp_path):
    # flux1-dev.safetensors, 128 inputs wide
    reference.write_single_files(control_models, tmp_path / "src")
    with pytest.raises(ConvertError, match="pass --variant canny or --variant depth"):
        convert([tmp_path / "src"], tmp_path / "m", tokenizers=tokenizer_dir())
    assert not (tmp_path / "m").exists()
    out = convert([tmp_path / "src"], tmp_path / "m", bits=None, variant="depth",
                  tokenizers=tokenizer_dir(), log=lambda m: None)  # fmt: skip
    assert mlxflux.load(out).variant == "depth"
    r = run_cli("convert", "--from", tmp_path / "src", "--tokenizers", tokenizer_dir(),
                "--variant", "fill", "--out", tmp_path / "f")  # fmt: skip
    assert r.returncode == 2 and "128 input channels, FLUX.1 Fill dev 384" in r.stderr


# ---- Canny / Depth against FluxControlPipeline ---------------------------------------------


@pytest.mark.parametrize(
    "variant,width,height,bits",
    [("canny", 64, 64, None), ("depth", 96, 64, None), ("canny", 96, 64, 8)],
)
def test_control_matches_flux_control_pipeline(control_models, folders, variant, width, height,
                                               bits):  # fmt: skip
    models = control_models
    if bits:
        models = dict(control_models)
        for name in ("transformer", "t5"):
            models[name] = quantize_dequantize_(copy.deepcopy(control_models[name]), bits)
    control, steps, seed = poster(3, width, height), 3, 13
    # the picture the model sees: the edges for Canny (preprocess auto), the map for Depth
    seen = canny_image(control) if variant == "canny" else control
    ref = control_reference(models, seen, width, height, steps, seed, GUIDANCE[variant])
    folder = folders[(variant, bits) if bits else variant]
    for precision in ("float32",) if not bits else ("float32", "bfloat16"):
        pipe = mlxflux.load(folder, precision=precision)
        ours, report = generate(pipe, PROMPT, width=width, height=height, steps=steps,
                                seed=seed, control_image=control)  # fmt: skip
        mean, worst = compare(ours, ref)
        print(f"{variant} {width}x{height} {bits or 'plain'} {precision}: mean {mean:.3f}, "
              f"max {worst} levels")  # fmt: skip
        bound = (FP32_MEAN, FP32_MAX) if precision == "float32" else (BF16_MEAN, BF16_MAX)
        assert mean <= bound[0] and worst <= bound[1]
    settings = report.settings
    assert settings["guidance"] == GUIDANCE[variant]
    assert settings["preprocess"] == ("canny" if variant == "canny" else "none")
    assert set(report.stages) == {"text", "encode", "modulation", "denoise", "decode"}


def test_cli_canny_matches_and_records_the_control_image(control_models, folders, tmp_path):
    path = tmp_path / "original.png"
    poster(5, 80, 112).save(path)
    r = run_cli("gen", "--model", folders["canny"], "--prompt", PROMPT, "--control-image", path,
                "--steps", 2, "--seed", 3, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "guidance 30" in r.stderr and "control" in r.stderr
    out = Image.open(r.stdout.strip())
    assert out.size == (80, 112)  # no size given: the control image's
    ref = control_reference(control_models, canny_image(Image.open(path).convert("RGB")), 80,
                            112, 2, 3, GUIDANCE["canny"])  # fmt: skip
    mean, worst = compare(out, ref)
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    meta = json.loads(out.text["mlxflux"])
    assert meta["control_image"] == {
        "file": "original.png",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert meta["preprocess"] == "canny"


@pytest.mark.parametrize("seed", range(4))
def test_canny_map_matches_comfyuis_canny_node(seed):
    """ComfyUI's Canny node is `kornia.filters.canny(image, 0.4, 0.8)[1]`; measured here: no
    pixel differs (kornia 0.9). Bound: 0.1% of the pixels (other kornia versions break ties of
    the non-maximum suppression differently)."""
    import kornia

    image = poster(seed, 240, 180)
    rgb = np.asarray(image, np.float32) / 255.0
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    want = kornia.filters.canny(t, CANNY_LOW, CANNY_HIGH)[1][0, 0].numpy() > 0.5
    ours = canny_edges(rgb)
    assert want.sum() > 20  # the picture has edges to find
    differ = int((ours != want).sum())
    print(f"canny seed {seed}: {int(want.sum())} edge pixels, {differ} differ")
    assert differ <= 0.001 * want.size
    assert np.array_equal(np.asarray(canny_image(image))[..., 0] > 0, ours)


# ---- Fill against FluxFillPipeline ---------------------------------------------------------


@pytest.mark.parametrize("width,height,bits", [(64, 64, None), (96, 64, None), (96, 64, 8)])
def test_fill_matches_flux_fill_pipeline(fill_models, folders, width, height, bits):
    models = fill_models
    if bits:
        models = dict(fill_models)
        for name in ("transformer", "t5"):
            models[name] = quantize_dequantize_(copy.deepcopy(fill_models[name]), bits)
    image, mask = poster(7, width, height), box_mask(width, height, (8, 16, 47, 55))
    steps, seed = 3, 19
    ref = fill_reference(models, image, mask, width, height, steps, seed)
    pipe = mlxflux.load(folders[("fill", bits) if bits else "fill"])
    ours, report = generate(pipe, PROMPT, width=width, height=height, steps=steps, seed=seed,
                            init_image=image, mask=mask)  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"fill {width}x{height} {bits or 'plain'}: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    assert report.settings["guidance"] == GUIDANCE["fill"]


def comfy_pad_for_outpaint(image: np.ndarray, left, top, right, bottom, feathering=40):
    """ComfyUI's ImagePadForOutpaint.expand_image, transcribed (loops and all)."""
    d2, d3 = image.shape[:2]
    new = np.ones((d2 + top + bottom, d3 + left + right, 3), np.float32) * 0.5
    new[top : top + d2, left : left + d3] = image
    mask = np.ones((d2 + top + bottom, d3 + left + right), np.float32)
    t = np.zeros((d2, d3), np.float32)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                dt = i if top != 0 else d2
                db = d2 - i if bottom != 0 else d2
                dl = j if left != 0 else d3
                dr = d3 - j if right != 0 else d3
                d = min(dt, db, dl, dr)
                if d >= feathering:
                    continue
                v = (feathering - d) / feathering
                t[i, j] = v * v
    mask[top : top + d2, left : left + d3] = t
    return new, mask


def test_outpaint_canvas_is_comfyuis_pad_for_outpaint():
    image = poster(8, 100, 100)  # a square cover onto a 2:3 canvas: padded above and below
    pixels, mask = outpaint_canvas(image, 100, 150)
    want_pixels, want_mask = comfy_pad_for_outpaint(np.asarray(image, np.float32) / 255, 0, 25,
                                                    0, 25)  # fmt: skip
    assert np.array_equal(pixels, want_pixels)
    assert np.allclose(mask, want_mask, atol=1e-6)
    assert mask[:25].min() == 1 and mask[75].max() == 0  # the new area masked, the centre kept
    assert 0 < mask[26, 50] < 1  # feathered near the padded side


def outpaint_reference(models, path, width, height, steps, seed, prompt):
    """ComfyUI's outpainting, from diffusers' parts: the canvas and mask of ImagePadForOutpaint
    (the picture scaled to fit and centred), InpaintModelConditioning's conditioning (pixels
    grey where round(mask) is 1, the mask itself, feathered, on the mask channels; packed by
    FluxFillPipeline.prepare_mask_latents, which does not binarize), then Euler over
    FluxTransformer2DModel. FluxFillPipeline itself binarizes every mask."""
    image = Image.open(path).convert("RGB")
    s = min(width / image.width, height / image.height)
    w, h = round(image.width * s), round(image.height * s)
    scaled = np.asarray(image.resize((w, h), Image.Resampling.LANCZOS), np.float32) / 255
    left, top = (width - w) // 2, (height - h) // 2
    canvas, mask = comfy_pad_for_outpaint(scaled, left, top, width - w - left, height - h - top)
    pipe = FluxFillPipeline(**components(models))
    sigmas = sigmas_for(steps, width, height)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, max_sequence_length=256)
        m = torch.from_numpy(mask)[None, None]
        keep = 1 - torch.round(m)
        masked = ((torch.from_numpy(canvas).permute(2, 0, 1)[None] - 0.5) * keep + 0.5) * 2 - 1
        packed_mask, masked_latents = pipe.prepare_mask_latents(
            m, masked, 1, 16, 1, height, width, torch.float32, "cpu", None
        )
        cond = torch.cat([masked_latents, packed_mask], dim=-1)
        x = noise_latents(seed, width, height)
        ids = pipe._prepare_latent_image_ids(1, height // 16, width // 16, "cpu", torch.float32)
        for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = pipe.transformer(
                hidden_states=torch.cat([x, cond], dim=2), timestep=torch.tensor([t]),
                guidance=torch.tensor([30.0]), pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
            ).sample  # fmt: skip
            x = x + (t_next - t) * v
        latent = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
        latent = latent / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        out = (pipe.vae.decode(latent).sample / 2 + 0.5).clamp(0, 1)
    return out.permute(0, 2, 3, 1).numpy()


# at the DVD size the random tiny VAE's float32 sums part MLX and torch by more than at 96x64
# (measured: mean 0.035, max 2 levels; 0.053 / 3 with the decode untiled); the logic is the
# same as at the small size, checked there within the usual bounds
@pytest.mark.parametrize(
    "args,size,bounds",
    [(("--width", 96, "--height", 64), (96, 64), (FP32_MEAN, FP32_MAX)),
     (("--preset", "dvd"), (832, 1216), (0.1, 3))],
    ids=["96x64", "dvd"],
)  # fmt: skip
def test_outpaint_a_square_cover(fill_models, folders, tmp_path, args, size, bounds):
    """End to end through the CLI: a square cover (the vinyl) onto a wider or a 2:3 canvas."""
    path = tmp_path / "vinyl.png"
    poster(9, 48, 48).save(path)
    r = run_cli("gen", "--model", folders["fill"], *args, "--init-image", path, "--outpaint",
                "--steps", 1, "--seed", 4, "--prompt", PROMPT, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = Image.open(r.stdout.strip())
    assert out.size == size
    meta = json.loads(out.text["mlxflux"])
    assert meta["outpaint"] is True and meta["denoise"] == 1.0 and meta["guidance"] == 30.0
    ref = outpaint_reference(fill_models, path, *size, 1, 4, PROMPT)
    mean, worst = compare(out, ref)
    print(f"outpaint to {size}: mean {mean:.3f}, max {worst} levels")
    assert mean <= bounds[0] and worst <= bounds[1]


# ---- refusals ------------------------------------------------------------------------------


def test_refusals_are_one_line_before_any_stage(control_models, folders, tmp_path, no_stage):
    dev = convert([reference.write_diffusers(reference.make_models(seed=63), tmp_path / "dev")],
                  tmp_path / "dev-model", bits=None, log=lambda m: None)  # fmt: skip
    img, square = tmp_path / "img.png", tmp_path / "square.png"
    poster(1, 96, 64).save(img)
    box_mask(64, 64, (0, 0, 10, 10)).save(square)
    wide_lora = tmp_path / "flux1-canny-dev-lora.safetensors"
    lora = {"transformer.x_embedder.lora_A.weight": torch.zeros(4, 128),
            "transformer.x_embedder.lora_B.weight": torch.zeros(256, 4)}  # fmt: skip
    save_file(lora, str(wide_lora))
    cases = [
        ((dev, "--control-image", img), "--control-image: FLUX.1 dev has no control input"),
        ((folders["canny"],), "--control-image: FLUX.1 Canny dev needs a control image"),
        ((folders["fill"], "--mask", img), "--mask: a mask needs an init image"),
        ((dev, "--init-image", img, "--mask", img), "--mask: FLUX.1 dev cannot fill"),
        ((folders["fill"], "--init-image", img), "--mask: FLUX.1 Fill dev repaints a masked"),
        ((folders["fill"], "--init-image", img, "--mask", square), "aspect ratio"),
        ((folders["fill"], "--init-image", img, "--mask", img, "--outpaint"), "not both"),
        ((folders["fill"], "--init-image", img, "--outpaint"), "the init image's own size"),
        ((dev, "--lora", wide_lora), "a FLUX.1 Canny/Depth LoRA widens it"),
    ]
    for args, said in cases:
        r = run_cli("gen", "--model", args[0], "--prompt", "x", "--steps", 1, "--seed", 1,
                    *args[1:], cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert said in r.stderr, (said, r.stderr)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["img.png", "square.png"]
    pipe = mlxflux.load(folders["canny"])
    with pytest.raises(mlxflux.SettingsError, match="preprocess"):
        pipe.generate("x", control_image=img, preprocess="hed")


def test_compare_gains_a_middle_column(tmp_path):
    original, result, depth = tmp_path / "o.png", tmp_path / "r.png", tmp_path / "d.png"
    poster(2, 64, 96).save(original)
    poster(3, 64, 96).save(result)
    Image.new("L", (64, 96), 128).save(depth)
    widths = {}
    for middle in (None, "canny", depth):
        args = ["--map", middle] if middle else []
        r = run_cli("compare", original, result, "--output", tmp_path / "s.png",
                    "--height", 96, *args)  # fmt: skip
        assert r.returncode == 0, r.stderr
        with Image.open(r.stdout.strip()) as sheet:
            widths[str(middle)] = sheet.width
            described = json.loads(sheet.text["mlxflux-sheet"])
        assert len(described) == (3 if middle else 2)
    assert widths["canny"] == widths[str(depth)] > widths["None"]
