"""FLUX.1 Redux: SigLIP's vision tower against transformers' `SiglipVisionModel`, the image
preprocessing against ComfyUI's `clip_preprocess` (ported here; ComfyUI's own with
COMFYUI_PATH), and whole generations against diffusers' `FluxPriorReduxPipeline` +
`FluxPipeline`, with the strength types as ComfyUI's `StyleModelApply` writes them (its
formulas ported into `comfy_style_apply` below)."""

import copy
import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPriorReduxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

import mlxflux
from mlxflux.redux import preprocess

from .helpers import (
    HEIGHT,
    WIDTH,
    comfyui,
    cover_image,
    generate,
    run_cli,
    torchvision_stand_in,
)
from .reference import (
    FP32_MAX,
    FP32_MEAN,
    PROMPT,
    T5_WIDTH,
    compare,
    quantize_dequantize_,
    randomize_,
    reference_pipeline,
    tokenizer_dir,
)

pytestmark = pytest.mark.reference
NO_COMFYUI = "COMFYUI_PATH (a ComfyUI checkout) is not set: CI cannot fetch it"

# SigLIP so400m's shape, shrunk: heads of 72 (as so400m's), 4x4 patches of 14 at 56 px
SIGLIP = dict(hidden_size=144, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              image_size=56, patch_size=14)  # fmt: skip
TOKENS = (56 // 14) ** 2


def tiny_redux(seed: int = 5):
    torch.manual_seed(seed)
    siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    randomize_(siglip, seed)
    redux = ReduxImageEncoder(redux_dim=SIGLIP["hidden_size"], txt_in_features=T5_WIDTH).eval()
    randomize_(redux, seed + 1)
    return siglip, redux


def write_redux_files(siglip, redux, folder):
    """ComfyUI's two files: clip_vision/sigclip_vision_patch14_384.safetensors (`vision_model.`
    keys, the attention-pooling head included) and style_models/flux1-redux-dev.safetensors."""
    vision = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.contiguous()
              for k, v in siglip.state_dict().items()}  # fmt: skip
    (folder / "clip_vision").mkdir(parents=True, exist_ok=True)
    (folder / "style_models").mkdir(parents=True, exist_ok=True)
    sig = folder / "clip_vision" / "sigclip_vision_patch14_384.safetensors"
    red = folder / "style_models" / "flux1-redux-dev.safetensors"
    save_file(vision, str(sig))
    save_file({k: v.contiguous() for k, v in redux.state_dict().items()}, str(red))
    return red, sig


@pytest.fixture(scope="module")
def redux_models():
    return tiny_redux()


@pytest.fixture(scope="module")
def redux_folders(folder, folder_q8, redux_models, tmp_path_factory):
    """The module's model folders (plain and 8-bit) with Redux added (`convert --redux`)."""
    from mlxflux.convert.redux import add_redux

    tmp = tmp_path_factory.mktemp("redux")
    red, sig = write_redux_files(*redux_models, tmp / "models")
    out = {}
    for bits, src in ((None, folder), (8, folder_q8)):
        dest = tmp / f"model-{bits}"
        shutil.copytree(src, dest)
        add_redux(dest, red, sig, log=lambda m: None)
        out[bits] = dest
    return out


def test_siglip_matches_transformers(redux_models, redux_folders):
    siglip, _ = redux_models
    pipe = mlxflux.load(redux_folders[None])
    encoder = pipe.load("redux")
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = siglip(pixel_values=x).last_hidden_state.numpy()
    ours = np.array(encoder.vision(mx.array(x.permute(0, 2, 3, 1).numpy())))
    err = np.abs(ours - ref).max()
    print(f"SigLIP vs transformers: max {err:.2e} (of {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def comfy_clip_preprocess(image: Image.Image, size: int, crop: bool) -> np.ndarray:
    """ComfyUI's `comfy.clip_vision.clip_preprocess` (a125cd84), ported line by line, SigLIP's
    mean and std (0.5), on LoadImage's float image."""
    image = torch.from_numpy(np.asarray(image, np.float32) / 255.0)[None]
    mean = torch.tensor([0.5] * 3)
    std = torch.tensor([0.5] * 3)
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scale_size = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scale_size = (size, size)
        image = torch.nn.functional.interpolate(image, size=scale_size, mode="bicubic",
                                                antialias=True)  # fmt: skip
        h = (image.shape[2] - size) // 2
        w = (image.shape[3] - size) // 2
        image = image[:, :, h : h + size, w : w + size]
    image = torch.clip((255.0 * image), 0, 255).round() / 255.0
    return ((image - mean.view([3, 1, 1])) / std.view([3, 1, 1]))[0].permute(1, 2, 0).numpy()


LEVEL = 2 / 255  # one level of 255, normalized by SigLIP's std 0.5


@pytest.mark.parametrize("size", [(832, 1216), (300, 200), (384, 384), (100, 150), (500, 500)])
@pytest.mark.parametrize("crop", ["center", "none"])
def test_preprocess_matches_comfyuis_clip_preprocess(size, crop):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = preprocess(image, crop)
    ref = comfy_clip_preprocess(image, 384, crop == "center")
    assert ours.shape == ref.shape == (384, 384, 3)
    d = np.abs(ours - ref)
    # torch's float32 sums land a value on the other side of a rounding boundary now and then
    print(f"{size} {crop}: {(d > 1e-6).sum()} of {d.size} values a level apart")
    assert d.max() <= LEVEL + 1e-6 and (d > 1e-6).mean() < 1e-4


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason=NO_COMFYUI)
def test_preprocess_is_comfyuis_own_function():
    torchvision_stand_in()
    (clip_vision,) = comfyui("comfy.clip_vision")
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0)[None]
    for crop in ("center", "none"):
        ref = clip_vision.clip_preprocess(
            pixels, size=384, mean=[0.5] * 3, std=[0.5] * 3, crop=crop == "center"
        )[0].permute(1, 2, 0).numpy()  # fmt: skip
        d = np.abs(preprocess(image, crop) - ref)
        assert d.max() <= LEVEL + 1e-6 and (d > 1e-6).mean() < 1e-4


def prior_embeds(models, redux_models, images):
    """diffusers' FluxPriorReduxPipeline for each image: (T5 [1, 512, C] with the image's
    tokens, pooled); chained as ComfyUI chains StyleModelApply: T5's tokens, then each
    image's."""
    from transformers import CLIPTokenizer, SiglipImageProcessor, T5TokenizerFast

    siglip, redux = redux_models
    tok = tokenizer_dir()
    prior = FluxPriorReduxPipeline(
        image_encoder=siglip,
        feature_extractor=SiglipImageProcessor(size={"height": 56, "width": 56},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3),
        image_embedder=redux, text_encoder=models["clip"],
        tokenizer=CLIPTokenizer.from_pretrained(tok / "tokenizer_1"), text_encoder_2=models["t5"],
        tokenizer_2=T5TokenizerFast.from_pretrained(tok / "tokenizer_2"),
    )  # fmt: skip
    parts = []
    with torch.no_grad():
        for image in images:
            embeds, pooled = prior(image, prompt=PROMPT, return_dict=False)
            parts.append(embeds)
    joined = torch.cat([parts[0][:, :512]] + [p[:, 512:] for p in parts], dim=1)
    return joined, pooled


def comfy_style_apply(txt: torch.Tensor, conds: list, strengths: list, kind: str):
    """ComfyUI's StyleModelApply (nodes.py, a125cd84) chained over images: (txt, attention
    mask or None), each node's tokens appended; the mask's image part is ComfyUI's
    `attention_mask_img_shape` (1, 1), spread over the image's tokens later (a constant)."""
    keys = {}
    for cond, strength in zip(conds, strengths, strict=True):
        cond = cond.clone()
        if kind == "multiply":
            cond *= strength
        n = cond.shape[1]
        if "attention_mask" in keys or (kind == "attn_bias" and strength != 1.0):
            attn_bias = torch.log(torch.Tensor([strength if kind == "attn_bias" else 1.0]))
            mask_ref_size = keys.get("attention_mask_img_shape", (1, 1))
            n_ref = mask_ref_size[0] * mask_ref_size[1]
            n_txt = txt.shape[1]
            mask = keys.get("attention_mask")
            if mask is None:
                mask = torch.zeros((txt.shape[0], n_txt + n_ref, n_txt + n_ref),
                                   dtype=torch.float16)  # fmt: skip
            new_mask = torch.zeros((txt.shape[0], n_txt + n + n_ref, n_txt + n + n_ref),
                                   dtype=torch.float16)  # fmt: skip
            new_mask[:, :n_txt, :n_txt] = mask[:, :n_txt, :n_txt]
            new_mask[:, :n_txt, n_txt + n :] = mask[:, :n_txt, n_txt:]
            new_mask[:, n_txt + n :, :n_txt] = mask[:, n_txt:, :n_txt]
            new_mask[:, n_txt + n :, n_txt + n :] = mask[:, n_txt:, n_txt:]
            new_mask[:, :n_txt, n_txt : n_txt + n] = attn_bias
            new_mask[:, n_txt + n :, n_txt : n_txt + n] = attn_bias
            keys["attention_mask"] = new_mask
            keys["attention_mask_img_shape"] = mask_ref_size
        txt = torch.cat((txt, cond), dim=1)
    mask = keys.get("attention_mask")
    return txt, mask


def spread_mask(mask: torch.Tensor, n_img: int) -> torch.Tensor:
    """`comfy.utils.upscale_dit_mask` from a 1x1 image to n_img tokens: the image row and
    column repeated (bilinear over a constant)."""
    t = mask.shape[1] - 1
    out = torch.zeros((1, t + n_img, t + n_img), dtype=torch.float32)
    out[:, :t, :t] = mask[:, :t, :t].float()
    out[:, :t, t:] = mask[:, :t, t:].float()
    out[:, t:, :t] = mask[:, t:, :t].float()
    out[:, t:, t:] = mask[:, t:, t:].float()
    return out


def reference_redux(models, redux_models, images, strengths, kind, noise):
    """FluxPipeline given Redux's prompt embeddings (diffusers' prior pipeline per image,
    StyleModelApply's strengths) and ComfyUI's sigmas from `noise`."""
    embeds, pooled = prior_embeds(models, redux_models, images)
    txt = embeds[:, :512]
    conds = [embeds[:, 512 + i * TOKENS : 512 + (i + 1) * TOKENS] for i in range(len(images))]
    txt, mask = comfy_style_apply(txt, conds, strengths, kind)
    kwargs = {}
    if mask is not None:
        n_img = (HEIGHT // 16) * (WIDTH // 16)
        kwargs["joint_attention_kwargs"] = {"attention_mask": spread_mask(mask, n_img)[:, None]}
    sigmas = mlxflux.sigmas("simple", 4, width=WIDTH, height=HEIGHT, shift=1.15)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = reference_pipeline(models, sched)
    from mlxflux.models.latents import pack_latents

    with torch.no_grad():
        return pipe(prompt_embeds=txt, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH,
                    num_inference_steps=4, sigmas=sigmas[:-1], guidance_scale=3.5,
                    latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
                    output_type="np", **kwargs).images  # fmt: skip


def with_bits(models, redux_models, bits):
    if not bits:
        return models, redux_models
    q = dict(models)
    for name in ("transformer", "t5"):
        q[name] = quantize_dequantize_(copy.deepcopy(models[name]), bits)
    return q, tuple(quantize_dequantize_(copy.deepcopy(m), bits) for m in redux_models)


CASES = [  # (images, strengths, type, bits)
    (1, [1.0], "multiply", None),
    (2, [1.0, 0.6], "multiply", None),
    (1, [0.7], "multiply", 8),
    (2, [1.0, 1.0], "multiply", 8),
    (1, [0.4], "attn_bias", None),
    (2, [2.5, 0.5], "attn_bias", None),
    (2, [0.5, 1.0], "attn_bias", 8),
]


@pytest.mark.parametrize("count,strengths,kind,bits", CASES)
def test_redux_matches_diffusers_with_comfyuis_strengths(models, redux_models, redux_folders,
                                                         count, strengths, kind, bits):  # fmt: skip
    images = [cover_image(10 + i, 56, 56) for i in range(count)]  # SigLIP's size: no resize
    noise = mlxflux.comfy_noise(4, (1, 16, HEIGHT // 8, WIDTH // 8))
    ref = reference_redux(*with_bits(models, redux_models, bits), images, strengths, kind, noise)
    pipe = mlxflux.load(redux_folders[bits])
    redux = list(zip(images, strengths, strict=True))
    ours, report = generate(pipe, PROMPT, width=WIDTH, height=HEIGHT, steps=4, seed=4,
                            t5_padding="max", redux_images=redux, redux_strength_type=kind,
                            redux_crop="none")  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"Redux {count} x {kind} {strengths} {bits or 'fp32'}: mean {mean:.4f}, max {worst}")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    assert list(report.stages)[0] == "vision"
    assert [r["strength"] for r in report.settings["redux_images"]] == strengths
    # and Redux changed the picture: it is not the prompt alone
    plain = pipe.generate(PROMPT, width=WIDTH, height=HEIGHT, steps=4, seed=4, t5_padding="max")
    assert np.abs(np.asarray(ours, np.int32) - np.asarray(plain, np.int32)).mean() > 0.5


def test_attention_bias_is_comfyuis_mask():
    """`Conditioning.attention_bias` against StyleModelApply's mask, spread to the image."""
    from mlxflux.redux import conditioning

    txt = torch.zeros(1, 5, 8)
    tokens = [mx.ones((1, 3, 8)), mx.ones((1, 2, 8)), mx.ones((1, 4, 8))]
    strengths = [0.5, 1.0, 3.0]
    _, mask = comfy_style_apply(txt, [torch.ones(1, t.shape[1], 8) for t in tokens], strengths,
                                "attn_bias")  # fmt: skip
    want = spread_mask(mask, 6)[0].numpy()
    ours = conditioning(tokens, strengths, "attn_bias").attention_bias(5 + 9, 6)
    assert np.array_equal(np.array(ours), want)
    # multiply adds no mask, as ComfyUI adds none
    assert conditioning(tokens, strengths, "multiply").attention_bias(14, 6) is None


def test_cli_records_redux_and_comfyuis_graph(redux_folders, tmp_path):
    image = tmp_path / "original.png"
    cover_image(3, 80, 60).save(image)
    out = run_cli("gen", "--model", redux_folders[None], "--prompt", "x", "--width", WIDTH,
                  "--height", HEIGHT, "--steps", 2, "--seed", 1, "--redux", f"{image}:0.8",
                  "--redux", image, "--redux-strength-type", "attn_bias",
                  "--output", tmp_path / "r.png", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    png = Image.open(tmp_path / "r.png")
    meta = json.loads(png.text["mlxflux"])
    assert [(r["file"], r["strength"]) for r in meta["redux_images"]] == [
        ("original.png", 0.8), ("original.png", 1.0)]  # fmt: skip
    assert meta["redux_strength_type"] == "attn_bias" and meta["redux_crop"] == "center"
    assert "Redux: original.png x 0.8" in png.text["parameters"]
    graph = json.loads(png.text["prompt"])
    kinds = [n["class_type"] for n in graph.values()]
    for node in ("CLIPVisionLoader", "CLIPVisionEncode", "StyleModelLoader", "StyleModelApply"):
        assert node in kinds, kinds
    assert kinds.count("StyleModelApply") == 2
    loader = next(n for n in graph.values() if n["class_type"] == "CLIPVisionLoader")
    assert loader["inputs"]["clip_name"] == "sigclip_vision_patch14_384.safetensors"
    style = next(n for n in graph.values() if n["class_type"] == "StyleModelLoader")
    assert style["inputs"]["style_model_name"] == "flux1-redux-dev.safetensors"
    apply = [n for n in graph.values() if n["class_type"] == "StyleModelApply"]
    assert [a["inputs"]["strength"] for a in apply] == [0.8, 1.0]
    assert {a["inputs"]["strength_type"] for a in apply} == {"attn_bias"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--redux", "HERE/notes.txt"], "--redux: .*notes.txt.*not a readable image"),
        (["--redux", "HERE/missing.png"], "--redux: .*no such file"),
        (["--redux", "HERE/o.png:11"], "--redux: strength 11 is outside ComfyUI's 0-10"),
        (["--redux", "HERE/o.png:-1"], "--redux: strength -1 is outside"),
        (["--redux", "HERE/huge.png"], "--redux: .*megapixels"),
        (["--redux-strength-type", "add"], "Invalid value for '--redux-strength-type'"),
    ],
)
def test_bad_redux_input_is_refused_in_one_line(redux_folders, tmp_path, args, message):
    import re

    (tmp_path / "notes.txt").write_text("not an image")
    cover_image(3, 64, 64).save(tmp_path / "o.png")
    Image.new("L", (9000, 8000)).save(tmp_path / "huge.png")
    args = [a.replace("HERE", str(tmp_path)) for a in args]
    out = run_cli("gen", "--model", redux_folders[None], "--prompt", "x", "--steps", 1, *args,
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("x*.png"))


def test_a_folder_without_redux_is_refused_before_any_stage(folder, tmp_path, no_stage):
    pipe = mlxflux.load(folder)
    with pytest.raises(mlxflux.SettingsError, match="redux_images: this model folder has no "
                       "Redux: add it with `mlxflux convert --redux"):  # fmt: skip
        pipe.prepare(mlxflux.GenerationRequest("x", redux_images=[cover_image(1, 64, 64)]))


def test_convert_refuses_redux_without_siglip_and_foreign_files(redux_models, folder, tmp_path):
    red, sig = write_redux_files(*redux_models, tmp_path / "models")
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    before = sorted(p.name for p in target.rglob("*"))
    out = run_cli("convert", "--redux", red, "--out", target)
    assert out.returncode == 2 and "--redux: Redux needs SigLIP's vision tower" in out.stderr
    out = run_cli("convert", "--redux", sig, "--siglip", sig, "--out", target)
    assert out.returncode == 2 and "not a FLUX.1 Redux file" in out.stderr
    out = run_cli("convert", "--redux", red, "--siglip", red, "--out", target)
    assert out.returncode == 2 and "not a SigLIP vision tower" in out.stderr
    assert sorted(p.name for p in target.rglob("*")) == before  # nothing half-written
    out = run_cli("convert", "--redux", red, "--siglip", sig, "--out", target)
    assert out.returncode == 0, out.stderr
    info = run_cli("info", target, "--check")
    assert info.returncode == 0 and "redux" in info.stdout, info.stdout


def test_the_studio_takes_redux_uploads_and_no_paths(redux_folders, tmp_path):
    """POST /api/jobs with "redux" files and their strengths draws what `gen --redux` draws;
    a path given as a setting is refused (uploads only)."""
    import io
    import time

    from starlette.testclient import TestClient

    from mlxflux.serve import Studio, create_app

    image = tmp_path / "original.png"
    cover_image(7, 64, 64).save(image)
    studio = Studio(mlxflux.load(redux_folders[None]), tmp_path / "out")
    settings = {"prompt": "x", "width": WIDTH, "height": HEIGHT, "steps": 2, "seed": 3,
                "redux_strengths": [0.8], "redux_strength_type": "attn_bias"}  # fmt: skip
    with TestClient(create_app(studio), base_url="http://127.0.0.1:7860") as c:
        assert c.get("/api/info").json()["accepts"]["redux"] is True
        bad = c.post("/api/jobs", data={"settings": json.dumps(
            {"prompt": "x", "redux_images": [str(image)]})})  # fmt: skip
        assert bad.status_code == 400 and "unknown redux_images" in bad.json()["error"]
        upload = [("redux", ("original.png", image.read_bytes(), "image/png"))]
        two = json.dumps({**settings, "redux_strengths": [1, 2]})
        bad = c.post("/api/jobs", data={"settings": two}, files=upload)
        assert bad.status_code == 400 and "one strength per Redux image" in bad.json()["error"]
        r = c.post(
            "/api/jobs",
            data={"settings": json.dumps(settings)},
            files=[("redux", ("original.png", image.read_bytes(), "image/png"))],
        )
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        for _ in range(600):
            job = c.get(f"/api/jobs/{job_id}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert job["status"] == "done", job
        served = Image.open(io.BytesIO(c.get(job["images"][0]).content))
    studio.close()
    cli = run_cli("gen", "--model", redux_folders[None], "--prompt", "x", "--width", WIDTH,
                  "--height", HEIGHT, "--steps", 2, "--seed", 3, "--redux", f"{image}:0.8",
                  "--redux-strength-type", "attn_bias", "--output", tmp_path / "cli.png",
                  cwd=tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(np.asarray(served), np.asarray(Image.open(tmp_path / "cli.png")))


# ---- Redux with the other variants: a text-side conditioning beside theirs ----------------


def redux_model_folder(models, redux_models, tmp, cls: str):
    """`models` as the diffusers repo whose model_index.json names `cls`, converted (float32),
    with Redux added."""
    from mlxflux.convert import convert
    from mlxflux.convert.redux import add_redux

    from . import reference

    src = reference.write_diffusers(models, tmp / "src")
    (src / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    folder = convert([src], tmp / "model", bits=None, dtype="float32", log=lambda m: None)
    add_redux(folder, *write_redux_files(*redux_models, tmp / "files"), log=lambda m: None)
    return folder


def test_redux_with_kontext_matches_diffusers(redux_models, tmp_path):
    """Redux (multiply 0.7) on a Kontext model with a reference: FluxKontextPipeline given the
    prior's embeddings, the image's tokens scaled as StyleModelApply scales them."""
    from diffusers import FluxKontextPipeline

    from . import reference
    from .reference import components

    models = reference.make_models(seed=51)
    pipe = mlxflux.load(redux_model_folder(models, redux_models, tmp_path, "FluxKontextPipeline"))
    original, look = cover_image(4, WIDTH, HEIGHT), cover_image(12, 56, 56)
    embeds, pooled = prior_embeds(models, redux_models, [look])
    txt, _ = comfy_style_apply(embeds[:, :512], [embeds[:, 512:]], [0.7], "multiply")
    sigmas = mlxflux.sigmas("simple", 3, width=WIDTH, height=HEIGHT, shift=1.15)
    noise = mlxflux.comfy_noise(17, (1, 16, HEIGHT // 8, WIDTH // 8))
    from mlxflux.models.latents import pack_latents

    with torch.no_grad():
        ref = FluxKontextPipeline(**components(models))(
            image=original, prompt_embeds=txt, pooled_prompt_embeds=pooled, height=HEIGHT,
            width=WIDTH, num_inference_steps=3, sigmas=sigmas[:-1], guidance_scale=2.5,
            latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
            output_type="np", max_area=WIDTH * HEIGHT, _auto_resize=False,
        ).images  # fmt: skip
    ours, report = generate(pipe, PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=17,
                            t5_padding="max", reference_images=[original],
                            reference_scale="none", redux_images=[(look, 0.7)],
                            redux_crop="none")  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"Redux + Kontext: mean {mean:.4f}, max {worst}")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    assert report.settings["reference_images"] and report.settings["redux_images"]


def test_redux_with_fill_matches_diffusers(redux_models, tmp_path, monkeypatch):
    """Redux (attn_bias 0.5) on a Fill model with a mask: FluxFillPipeline given the prior's
    embeddings and StyleModelApply's attention mask."""
    from diffusers import FluxFillPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import ImageDraw

    from . import reference
    from .reference import components

    # ComfyUI's VAEEncode takes the posterior's mode; diffusers' fill pipeline samples it
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mode())  # fmt: skip
    models = reference.make_models(seed=62, in_channels=384)
    pipe = mlxflux.load(redux_model_folder(models, redux_models, tmp_path, "FluxFillPipeline"))
    original, look = cover_image(5, WIDTH, HEIGHT), cover_image(13, 56, 56)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle((8, 16, 47, 55), fill=255)
    embeds, pooled = prior_embeds(models, redux_models, [look])
    txt, attn = comfy_style_apply(embeds[:, :512], [embeds[:, 512:]], [0.5], "attn_bias")
    n_img = (HEIGHT // 16) * (WIDTH // 16)
    sigmas = mlxflux.sigmas("simple", 3, width=WIDTH, height=HEIGHT, shift=1.15)
    noise = mlxflux.comfy_noise(19, (1, 16, HEIGHT // 8, WIDTH // 8))
    from mlxflux.models.latents import pack_latents

    with torch.no_grad():
        ref = FluxFillPipeline(**components(models))(
            prompt_embeds=txt, pooled_prompt_embeds=pooled, image=original, mask_image=mask,
            height=HEIGHT, width=WIDTH, num_inference_steps=3, sigmas=sigmas[:-1],
            guidance_scale=30.0, strength=1.0, output_type="np",
            latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
            joint_attention_kwargs={"attention_mask": spread_mask(attn, n_img)[:, None]},
        ).images  # fmt: skip
    ours, _ = generate(pipe, PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=19,
                       t5_padding="max", init_image=original, mask=mask,
                       redux_images=[(look, 0.5)], redux_strength_type="attn_bias",
                       redux_crop="none")  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"Redux + Fill: mean {mean:.4f}, max {worst}")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
