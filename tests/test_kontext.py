"""FLUX.1 Kontext dev: converted from every layout (the variant from a name or --variant),
run with reference images against diffusers' FluxKontextPipeline on the same tiny weights, and
the references' position ids against ComfyUI's own placement rule."""

import copy
import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from PIL import Image

import mlxflux
from mlxflux.convert import ConvertError, convert
from mlxflux.models.latents import pack_latents
from mlxflux.variants.kontext import (
    KONTEXT_RESOLUTIONS,
    reference_ids,
    reference_size,
    scale_reference,
)

from . import reference
from .helpers import cover_image, generate, run_cli, tokenizer_dir, transformer_kinds, write_gguf
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

KONTEXT_GUIDANCE = 2.5  # BFL's cli_kontext and ComfyUI's Kontext template


@pytest.fixture(scope="module")
def models():
    return reference.make_models(seed=51)


def write_kontext_repo(models, folder):
    """The diffusers layout of black-forest-labs/FLUX.1-Kontext-dev: its model_index.json
    names FluxKontextPipeline; the folder name says nothing here."""
    reference.write_diffusers(models, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    return folder


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kontext")
    return convert([write_kontext_repo(models, tmp / "src")], tmp / "model", bits=None,
                   dtype="float32", log=lambda m: None)  # fmt: skip


@pytest.fixture(scope="module")
def folder_q8(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kontext_q8")
    return convert([write_kontext_repo(models, tmp / "src")], tmp / "model", bits=8,
                   dtype="float32", log=lambda m: None)  # fmt: skip


def kontext_reference(models, image, width, height, steps, seed, auto_resize, prompt=PROMPT):
    """diffusers' FluxKontextPipeline as ComfyUI samples: its sigmas (simple, shift 1.15), T5
    padded to 256, ComfyUI's CPU noise for the seed, guidance 2.5; max_area = the size, so the
    output is width x height."""
    sigmas = mlxflux.sigmas("simple", steps, width=width, height=height, shift=1.15)
    noise = mlxflux.comfy_noise(seed, (1, 16, height // 8, width // 8))
    with torch.no_grad():
        return FluxKontextPipeline(**components(models))(
            image=image, prompt=prompt, height=height, width=width, num_inference_steps=steps,
            sigmas=sigmas[:-1], guidance_scale=KONTEXT_GUIDANCE,
            latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
            output_type="np", max_sequence_length=256, max_area=width * height,
            _auto_resize=auto_resize,
        ).images  # fmt: skip


# ---- conversion --------------------------------------------------------------------------


def comfy_fp8_files(models, tmp):
    """ComfyUI's Kontext fp8 file (flux1-dev-kontext_fp8_scaled.safetensors: the name is
    what says Kontext) beside the usual encoders and ae."""
    paths = reference.write_single_files(models, tmp, fp8=torch.float8_e4m3fn,
                                    prefix="model.diffusion_model.")  # fmt: skip
    paths["transformer"].rename(tmp / "flux1-dev-kontext_fp8_scaled.safetensors")
    return {"sources": [tmp]}


def bfl_files(models, tmp):
    paths = reference.write_single_files(models, tmp)
    paths["transformer"].rename(tmp / "flux1-kontext-dev.safetensors")
    return {"sources": [tmp]}


def gguf_files(models, tmp):
    """city96's FLUX.1-Kontext-dev GGUF beside safetensors encoders and ae."""
    paths = reference.write_single_files(models, tmp)
    paths["transformer"].unlink()
    bfl = {k: v.numpy() for k, v in flux_to_bfl(models["transformer"].state_dict()).items()}
    write_gguf(tmp / "flux1-kontext-dev-Q8_0.gguf", bfl, transformer_kinds(bfl))
    return {"sources": [tmp], "flux": tmp / "flux1-kontext-dev-Q8_0.gguf"}


def diffusers_repo(models, tmp):
    return {"sources": [write_kontext_repo(models, tmp / "FLUX.1-Kontext-dev")]}


@pytest.mark.parametrize("layout", [bfl_files, comfy_fp8_files, gguf_files, diffusers_repo])
def test_kontext_converts_from_each_layout_and_says_why(models, tmp_path, layout):
    notes = []
    kw = layout(models, tmp_path / "src")
    out = convert(kw.pop("sources"), tmp_path / "model", bits=8, dtype="float32",
                  tokenizers=tokenizer_dir(), log=notes.append, **kw)  # fmt: skip
    manifest = json.loads((out / "mlxflux.json").read_text())
    assert manifest["variant"] == "kontext"
    said = " ".join(notes)
    assert (
        "variant kontext: suggested by" in said
        and "kontext" in said.split("suggested by")[1].lower()
    )
    assert any("variant kontext" in n for n in manifest["notes"])
    pipe = mlxflux.load(out)
    assert (pipe.variant, pipe.model_name) == ("kontext", "flux1-kontext-dev")
    assert pipe.defaults["guidance"] == KONTEXT_GUIDANCE
    info = run_cli("info", out)
    assert info.returncode == 0 and "variant: kontext (FLUX.1 Kontext dev)" in info.stdout


def test_variant_flag_decides_and_is_checked_against_the_shapes(models, tmp_path):
    files = reference.write_single_files(models, tmp_path / "plain")  # named flux1-dev.safetensors
    out = convert([tmp_path / "plain"], tmp_path / "auto", bits=None, tokenizers=tokenizer_dir(),
                  log=lambda m: None)  # fmt: skip
    assert mlxflux.load(out).variant == "dev"
    r = run_cli("convert", "--from", tmp_path / "plain", "--tokenizers", tokenizer_dir(),
                "--bits", "none", "--variant", "kontext", "--out", tmp_path / "k")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert mlxflux.load(tmp_path / "k").variant == "kontext"
    # a Kontext-named file that is not Kontext: --variant dev wins over the name
    files["transformer"].rename(tmp_path / "plain" / "flux1-kontext-dev.safetensors")
    out = convert([tmp_path / "plain"], tmp_path / "dev", bits=None, variant="dev",
                  tokenizers=tokenizer_dir(), log=lambda m: None)  # fmt: skip
    assert mlxflux.load(out).variant == "dev"
    # shapes that contradict the flag: one line, nothing written
    r = run_cli("convert", "--from", tmp_path / "plain", "--tokenizers", tokenizer_dir(),
                "--variant", "schnell", "--out", tmp_path / "s")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--variant schnell" in r.stderr and "guidance embedding" in r.stderr
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConvertError, match="variant must be"):
        convert([tmp_path / "plain"], tmp_path / "x", variant="turbo")


def test_older_folders_without_a_variant_load_as_dev(models, tmp_path):
    out = convert([reference.write_diffusers(models, tmp_path / "src")], tmp_path / "m", bits=None,
                  log=lambda m: None)  # fmt: skip
    manifest = json.loads((out / "mlxflux.json").read_text())
    assert manifest["variant"] == "dev"


# ---- generation against FluxKontextPipeline ------------------------------------------------


@pytest.mark.parametrize(
    "width,height,ref_size,scale",
    [
        # a square output; a small square reference that both scale to Kontext's 1024x1024
        (64, 64, (128, 128), "kontext"),
        # non-square; the reference at its own size, floored to multiples of 16 (90x50 -> 80x48)
        (96, 64, (90, 50), "none"),
    ],
)
def test_reference_matches_flux_kontext_pipeline(models, folder, width, height, ref_size, scale):
    image, steps, seed = cover_image(4, *ref_size), 3, 17
    ref = kontext_reference(models, image, width, height, steps, seed, scale == "kontext")
    pipe = mlxflux.load(folder)
    ours, report = generate(pipe, PROMPT, width=width, height=height, steps=steps, seed=seed,
                            reference_images=[image], reference_scale=scale)  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"kontext {width}x{height}, reference {ref_size} ({scale}): mean {mean:.3f}, "
          f"max {worst} levels")  # fmt: skip
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    settings = report.settings
    assert settings["guidance"] == KONTEXT_GUIDANCE and settings["model"] == "flux1-kontext-dev"
    encoded = reference_size(*ref_size, scale)
    assert settings["reference_images"][0]["size"] == list(encoded)
    assert set(report.stages) == {"text", "encode", "modulation", "denoise", "decode"}


def test_reference_matches_flux_kontext_pipeline_in_8_bit(models, folder_q8):
    q8 = dict(models)
    for name in ("transformer", "t5"):
        q8[name] = quantize_dequantize_(copy.deepcopy(models[name]), 8)
    image, steps, seed = cover_image(6, 80, 64), 3, 23
    ref = kontext_reference(q8, image, 96, 64, steps, seed, auto_resize=False)
    for precision, bounds in (
        ("float32", (FP32_MEAN, FP32_MAX)),
        ("bfloat16", (BF16_MEAN, BF16_MAX)),
    ):
        ours = mlxflux.load(folder_q8, precision=precision).generate(
            PROMPT, width=96, height=64, steps=steps, seed=seed, reference_images=[image],
            reference_scale="none",
        )  # fmt: skip
        mean, worst = compare(ours, ref)
        print(f"kontext 8-bit {precision}: mean {mean:.3f}, max {worst} levels")
        assert mean <= bounds[0] and worst <= bounds[1]


def test_cli_reference_matches_flux_kontext_pipeline(models, folder, tmp_path):
    path = tmp_path / "original cover.png"
    cover_image(8, 112, 80).save(path)
    seed, steps = 29, 3
    r = run_cli("gen", "--model", folder, "--prompt", PROMPT, "--reference", path, "--steps",
                steps, "--reference-scale", "none", "--seed", seed, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "guidance 2.5" in r.stderr and "reference" in r.stderr
    out = Image.open(r.stdout.strip())
    assert out.size == (112, 80)  # no size given: the reference's
    ref = kontext_reference(models, Image.open(path).convert("RGB"), 112, 80, steps, seed, False)
    mean, worst = compare(out, ref)
    print(f"kontext CLI: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX
    meta = json.loads(out.text["mlxflux"])
    (recorded,) = meta["reference_images"]
    assert recorded["file"] == "original cover.png"
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "Reference image: original cover.png" in out.text["parameters"]


def test_kontext_without_a_reference_is_text_to_image(models, folder):
    """As FluxPipeline draws it, at Kontext's default guidance."""
    w, h, steps, seed = 96, 64, 3, 31
    sigmas = mlxflux.sigmas("simple", steps, width=w, height=h, shift=1.15)
    noise = mlxflux.comfy_noise(seed, (1, 16, h // 8, w // 8))
    with torch.no_grad():
        ref = FluxPipeline(**components(models))(
            PROMPT, height=h, width=w, num_inference_steps=steps, sigmas=sigmas[:-1],
            guidance_scale=KONTEXT_GUIDANCE, output_type="np", max_sequence_length=256,
            latents=torch.from_numpy(np.array(pack_latents(mx.array(noise)))),
        ).images  # fmt: skip
    ours = mlxflux.load(folder).generate(PROMPT, width=w, height=h, steps=steps, seed=seed)
    mean, worst = compare(ours, ref)
    assert mean <= FP32_MEAN and worst <= FP32_MAX


def test_preset_keeps_its_size_and_settings_but_takes_kontexts_guidance(folder, tmp_path):
    path = tmp_path / "square.png"
    cover_image(9, 64, 64).save(path)
    report = tmp_path / "r.json"
    r = run_cli("gen", "--model", folder, "--preset", "vinyl", "--reference", path,
                "--steps", 1, "--seed", 1, "--report", report, "--width", 64, "--height", 64,
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    settings = json.loads(report.read_text())["settings"]
    assert settings["scheduler"] == "beta" and settings["guidance"] == KONTEXT_GUIDANCE
    # the reference was scaled to Kontext's square resolution, whatever the output's size
    assert settings["reference_images"][0]["size"] == [1024, 1024]
    r = run_cli("gen", "--model", folder, "--prompt", "x", "--reference", path, "--steps", 1,
                "--seed", 1, "--guidance", "4", "--report", report, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    settings = json.loads(report.read_text())["settings"]
    assert settings["guidance"] == 4.0 and (settings["width"], settings["height"]) == (1024, 1024)


def test_references_are_refused_in_one_line_before_any_stage(models, folder, tmp_path, no_stage):
    src = reference.write_diffusers(models, tmp_path / "src")
    dev = convert([src], tmp_path / "dev", bits=None, dtype="float32", log=lambda m: None)
    path = tmp_path / "cover.png"
    cover_image(2, 64, 64).save(path)
    pipe = mlxflux.load(dev)
    with pytest.raises(mlxflux.SettingsError, match="FLUX.1 dev takes no reference images"):
        pipe.generate_many("x", [1], reference_images=[path], width=64, height=64)
    cases = [
        ((dev, path), "--reference: FLUX.1 dev takes no reference images"),
        ((folder, tmp_path / "missing.png"), "--reference: "),
        ((folder, tmp_path), "is a folder, not an image"),
    ]
    for (model, ref), said in cases:
        r = run_cli("gen", "--model", model, "--prompt", "x", "--reference", ref,
                    "--width", 64, "--height", 64, "--steps", 1, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert said in r.stderr, r.stderr
    assert [p.name for p in tmp_path.glob("*.png")] == ["cover.png"]  # no image written
    with pytest.raises(mlxflux.SettingsError, match="reference_scale"):
        mlxflux.load(folder).generate("x", reference_images=[path], reference_scale="fit")


# ---- several references: ComfyUI's placement ----------------------------------------------


def comfy_offset_ids(latent_sizes):
    """ComfyUI's loop for FLUX.1 references (comfy/ldm/flux/model.py, ref_latents_method
    "offset", with process_img's ids), transcribed with torch as it is written there."""
    h = w = 0
    out = []
    for rh, rw in latent_sizes:
        index, h_offset, w_offset = 1, 0, 0
        if rh + h > rw + w:
            w_offset = w
        else:
            h_offset = h
        h = max(h, rh + h_offset)
        w = max(w, rw + w_offset)
        h_len, w_len = (rh + 1) // 2, (rw + 1) // 2
        ho, wo = (h_offset + 1) // 2, (w_offset + 1) // 2
        ids = torch.zeros((h_len, w_len, 3))
        ids[:, :, 0] = ids[:, :, 1] + index
        ids[:, :, 1] = ids[:, :, 1] + torch.linspace(ho, h_len - 1 + ho, steps=h_len).unsqueeze(1)
        ids[:, :, 2] = ids[:, :, 2] + torch.linspace(wo, w_len - 1 + wo, steps=w_len).unsqueeze(0)
        out.append(ids.reshape(-1, 3).numpy())
    return out


@pytest.mark.parametrize(
    "sizes",
    [
        [(128, 128)],
        [(128, 128), (128, 128)],
        [(104, 156), (128, 128), (84, 196)],
        [(8, 4), (6, 10), (4, 4)],
    ],
)
def test_reference_ids_follow_comfyui(sizes):  # fmt: skip
    ours, theirs = reference_ids(sizes), comfy_offset_ids(sizes)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b.astype(np.int32))
    every = np.concatenate(ours)
    assert len({tuple(r) for r in every}) == len(every)  # no two references overlap


def test_two_references_match_the_transformer_given_comfyuis_ids(models, folder):
    """Two references through the pipeline against diffusers' own components: each reference
    VAE-encoded by FluxKontextPipeline, packed, ids from ComfyUI's rule, and an Euler loop over
    FluxTransformer2DModel that drops the references' velocity (as ComfyUI's model does)."""
    w, h, steps, seed = 64, 64, 2, 37
    images = [cover_image(10, 64, 48), cover_image(11, 48, 64)]
    pipe = FluxKontextPipeline(**components(models))
    sigmas = mlxflux.sigmas("simple", steps, width=w, height=h, shift=1.15)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=256)
        lat, ids = [], []
        for image in images:
            pixels = pipe.image_processor.preprocess(image, image.height, image.width)
            z = pipe._encode_vae_image(pixels, generator=None)
            lat.append(pack_latents(mx.array(z.numpy())))
        sizes = [(image.height // 8, image.width // 8) for image in images]
        ids = np.concatenate(comfy_offset_ids(sizes))
        noise = mlxflux.comfy_noise(seed, (1, 16, h // 8, w // 8))
        x = torch.from_numpy(np.array(pack_latents(mx.array(noise))))
        refs = torch.from_numpy(np.array(mx.concatenate(lat, axis=1)))
        img_ids = pipe._prepare_latent_image_ids(1, h // 16, w // 16, "cpu", torch.float32)
        all_ids = torch.cat([img_ids, torch.from_numpy(ids)], dim=0)
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = pipe.transformer(
                hidden_states=torch.cat([x, refs], dim=1), timestep=torch.tensor([s]),
                guidance=torch.tensor([KONTEXT_GUIDANCE]), pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=all_ids,
            ).sample[:, : x.shape[1]]  # fmt: skip
            x = x + (s_next - s) * v
        latent = pipe._unpack_latents(x, h, w, pipe.vae_scale_factor)
        latent = latent / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref = (pipe.vae.decode(latent).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ours = mlxflux.load(folder).generate(
        PROMPT, width=w, height=h, steps=steps, seed=seed, reference_images=images,
        reference_scale="none",
    )  # fmt: skip
    mean, worst = compare(ours, ref)
    print(f"two references: mean {mean:.3f}, max {worst} levels")
    assert mean <= FP32_MEAN and worst <= FP32_MAX


def test_kontext_scale_is_comfyuis_image_scale():
    """FluxKontextImageScale: the nearest aspect among the preferred resolutions, then
    common_upscale(lanczos, center): crop to that aspect, then Lanczos (PIL)."""
    image = cover_image(12, 1000, 700)
    out = scale_reference(image, "kontext")
    aspect = 1000 / 700
    _, w, h = min((abs(aspect - a / b), a, b) for a, b in KONTEXT_RESOLUTIONS)
    assert out.size == (w, h) == (1248, 832)  # 1.43: nearer 1.5 than 1184/880 = 1.35
    # common_upscale's crop, as ComfyUI writes it
    old_aspect, new_aspect = aspect, w / h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((1000 - 1000 * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((700 - 700 * (old_aspect / new_aspect)) / 2)
    assert (x, y) == (0, 17)  # 700 rows -> 666 at 1.5
    want = image.crop((x, y, 1000 - x, 700 - y)).resize((w, h), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(want))
    assert reference_size(90, 50, "none") == (80, 48)
