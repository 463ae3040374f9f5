"""A generation request: every parameter named once with its check, the front ends' layers
(defaults, preset, earlier PNG, flags, the model) resolved in one place, refusals named by the
parameter (a flag on the CLI, a label on the page), and a job that reads each input once."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlxflux
from mlxflux.errors import SettingsError
from mlxflux.presets import get_preset
from mlxflux.request import IMG2IMG_DENOISE, GenerationRequest, flag_of, label_of, params
from mlxflux.resolve import resolve
from mlxflux.variants import VARIANTS

from .helpers import cover_image, small_model, write_lora


def test_every_generate_keyword_is_a_request_field_with_a_check():
    names = {f.name for f in params()}
    assert {"prompt", "width", "height", "steps", "guidance", "seeds", "scheduler", "shift",
            "t5_padding", "denoise", "loras", "init_image", "reference_images",
            "reference_scale", "control_image", "preprocess", "mask", "outpaint",
            "tiled_decode", "noise"} <= names  # fmt: skip
    assert all(callable(f.metadata["check"]) for f in params())
    assert "origins" in {f.name for f in fields(GenerationRequest)} - names


def test_the_layers_stack_defaults_preset_png_flags():
    book = get_preset("book")
    r = resolve({"prompt": None, "steps": 7, "seed": 5}, preset="book", png={"steps": 3,
                "guidance": 4.0, "scheduler": "beta", "seed": 99})  # fmt: skip
    assert r.prompt == book["prompt"] and (r.width, r.height) == (book["width"], book["height"])
    assert r.steps == 7  # the flag over the PNG over the preset
    assert (r.guidance, r.scheduler) == (4.0, "beta")  # the PNG over the preset
    assert r.seeds == (5,)  # the flag's seed; the PNG's only when no seed is given
    assert resolve({"prompt": "x"}, png={"seed": 99}).seeds == (99,)
    assert r.denoise == 1.0 and r.origins["denoise"] == "default"  # no init image
    assert r.origins["steps"] == "given" and r.origins["guidance"] == "png"


def test_the_models_layer_comes_last():
    r = resolve({"prompt": "x"}, preset="book")  # the preset's guidance is dev's 3.5
    assert r.origins["guidance"] == "preset"
    kontext, dev, schnell = (VARIANTS[n] for n in ("kontext", "dev", "schnell"))
    assert r.for_model(kontext).guidance == kontext.guidance == 2.5  # the model's own wins
    assert r.for_model(dev).guidance == 3.5 and r.for_model(dev).steps == 25
    given = resolve({"prompt": "x", "guidance": 4.0}, preset="book")
    assert given.for_model(kontext).guidance == 4.0  # a flag wins over the model
    plain = GenerationRequest("x")
    assert (plain.for_model(schnell).steps, plain.for_model(schnell).shift) == (4, 1.0)
    assert (plain.for_model(dev).steps, plain.for_model(dev).shift) == (20, 1.15)


def test_an_init_image_changes_by_the_front_ends_default(tmp_path):
    path = tmp_path / "cover.png"
    cover_image(1, 64, 48).save(path)
    assert resolve({"prompt": "x", "init_image": path}).denoise == IMG2IMG_DENOISE
    assert resolve({"prompt": "x", "init_image": path}, preset="dvd").denoise == 0.6
    outpaint = resolve({"prompt": "x", "init_image": path, "outpaint": True}, preset="dvd")
    assert outpaint.denoise == 1.0  # Fill: all of it, even with a preset
    with pytest.raises(SettingsError, match="needs an init image") as info:
        resolve({"prompt": "x", "denoise": 0.5})
    assert info.value.name == "denoise"


@pytest.mark.parametrize(
    "given,name,reason",
    [
        ({"width": 50}, "width", "positive multiples of 16"),
        ({"steps": 0}, "steps", "whole number of at least 1"),
        ({"guidance": 101}, "guidance", "from 0 to 100"),
        ({"shift": "lots"}, "shift", "'lots' is not a number or 'auto'"),
        ({"scheduler": "karras"}, "scheduler", "one of simple, beta, normal"),
        ({"reference_scale": "fit"}, "reference_scale", "one of kontext, none"),
        ({"preprocess": "hed"}, "preprocess", "one of auto, canny, none"),
        ({"prompt": ""}, "prompt", "give a prompt"),
        ({"seeds": "1,x"}, "seeds", "'x' is not a whole number"),
        ({"init_image": "/nonexistent.png"}, "init_image", "no such file"),
        ({"steps": 20000}, "steps", "20000 steps at denoise 1 need more than"),
    ],
)
def test_a_refusal_names_the_parameter_given(given, name, reason):
    with pytest.raises(SettingsError, match=reason) as info:
        resolve({"prompt": "x", **given})
    assert info.value.name == name


def test_a_too_small_denoise_is_named_when_it_was_given(tmp_path):
    path = tmp_path / "c.png"
    cover_image(2, 32, 32).save(path)
    with pytest.raises(SettingsError, match="too small for 9000 steps") as info:
        resolve({"prompt": "x", "init_image": path, "denoise": 0.5, "steps": 9000})
    assert info.value.name == "denoise"


def test_flags_and_labels_come_from_the_fields():
    assert flag_of("reference_images") == "--reference"
    assert flag_of("loras") == "--lora" and flag_of("t5_padding") == "--t5-padding"
    assert flag_of("memory_budget") == "--memory-budget"  # not a request field: its own name
    assert flag_of("tiled_decode") == "--tiled-decode"
    assert label_of("init_image") == "Original" and label_of("width") == "Width"


def test_the_cli_has_a_flag_for_every_field_with_help():
    from mlxflux.cli_gen import gen

    flags = {opt for p in gen.params for opt in p.opts}
    for f in params():
        if f.metadata["help"]:
            assert flag_of(f.name) in flags, f.name


def test_a_request_opens_each_picture_once(tmp_path):
    path = tmp_path / "c.png"
    cover_image(3, 48, 32).save(path)
    r = GenerationRequest("x", init_image=path, reference_images=[path, path])
    assert r.init_image.name == "c.png" and len(r.init_image.sha256) == 64
    assert r.init_image.image.size == (48, 32)
    again = GenerationRequest("x", init_image=r.init_image)  # a Picture passes through
    assert again.init_image is r.init_image


def test_gen_with_an_init_image_and_a_lora_opens_each_file_once(small_folder, tmp_path):
    """Counted with Python's audit hook on `open`, in a real `mlxflux gen` process."""
    image = tmp_path / "original.png"
    cover_image(4, 64, 48).save(image)
    lora = write_lora(tmp_path / "style.safetensors", {"double_blocks.0.img_attn.qkv":
                                                       (768, 256)}, 1)  # fmt: skip
    code = (
        "import sys\n"
        "from collections import Counter\n"
        "opened = Counter()\n"
        f"watched = {{{str(image)!r}, {str(lora)!r}}}\n"
        "def hook(event, args):\n"
        "    if event == 'open' and str(args[0]) in watched:\n"
        "        opened[str(args[0])] += 1\n"
        "sys.addaudithook(hook)\n"
        "from mlxflux.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(dict(opened), file=sys.stderr)\n"
    )
    args = [
        "gen",
        "--model",
        small_folder,
        "--prompt",
        "x",
        "--steps",
        2,
        "--seed",
        1,
        "--init-image",
        image,
        "--lora",
        f"{lora}:0.7",
        "--output",
        tmp_path / "o.png",
    ]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    opened = eval(r.stderr.strip().splitlines()[-1])  # noqa: S307 - our own dict's repr
    assert opened == {str(image): 1, str(lora): 1}
    meta = json.loads(Image.open(tmp_path / "o.png").text["mlxflux"])
    assert meta["init_image"] == "original.png" and meta["loras"][0]["scale"] == 0.7


def test_a_job_holds_its_own_report_and_the_pipeline_none(small_folder):
    pipe = mlxflux.load(small_folder)
    a = pipe.prepare(GenerationRequest("x", width=32, height=32, steps=1, seeds=(1,)))
    b = pipe.prepare(GenerationRequest("y", width=48, height=32, steps=2, seeds=(2, 3)))
    list(b.run())
    list(a.run())
    assert a.report.settings["prompt"] == "x" and a.report.settings["seed"] == 1
    assert b.report.settings["seeds"] == [2, 3] and len(b.report.images) == 2
    assert not hasattr(pipe, "last_report") and not hasattr(pipe, "float32_fallbacks")


def test_encode_image_alone_falls_back_to_float32_in_float16(tmp_path, monkeypatch):
    """The VAE stages' float32 re-run needs no run state: encode_image on its own, in float16,
    when float16 overflows (here: the encoder forced to inf in float16)."""
    from mlxflux.models.autoencoder import AutoEncoder

    folder = small_model(tmp_path / "m")
    pipe = mlxflux.load(folder, precision="float16")
    real = AutoEncoder.encode

    def overflowing(self, x, tiled=False):
        out = real(self, x, tiled=tiled)
        return out * mx.inf if x.dtype == mx.float16 else out

    monkeypatch.setattr(AutoEncoder, "encode", overflowing)
    fallbacks = []
    z = pipe.encode_image(np.full((32, 32, 3), 0.5, np.float32), fallbacks=fallbacks)
    assert np.isfinite(z).all() and fallbacks == ["encode"]
    assert np.isfinite(pipe.encode_image(np.full((32, 32, 3), 0.5, np.float32))).all()


def test_a_lora_takes_a_scale_and_a_clip_scale():
    from mlxflux.request import parse_lora

    assert parse_lora("style.safetensors") == (Path("style.safetensors"), 1.0, 1.0)
    assert parse_lora("style.safetensors:0.8") == (Path("style.safetensors"), 0.8, 0.8)
    assert parse_lora("style.safetensors:0.8:0.5") == (Path("style.safetensors"), 0.8, 0.5)
    assert parse_lora("C:/loras/a:b.safetensors:-1") == (Path("C:/loras/a:b.safetensors"), -1, -1)
    request = GenerationRequest(prompt="x", loras=[("a.safetensors", 0.7), ("b", 1, 0.2)])
    assert request.loras == ((Path("a.safetensors"), 0.7, 0.7), (Path("b"), 1.0, 0.2))
    with pytest.raises(SettingsError, match="clip_scale"):
        GenerationRequest(prompt="x", loras=[("a", 1, 2, 3)])
