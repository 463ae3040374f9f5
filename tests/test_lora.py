"""LoRAs in the three layouts people download, against ComfyUI's LoraLoaderModelOnly: the
LoRA merged into the weights (W += scale * alpha / rank * up @ down, in BFL's layout, turned
into diffusers' layout by diffusers' own converter), then FluxPipeline."""

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mlxflux
from mlxflux.lora import LoraError

from .helpers import HEIGHT, WIDTH, generate, run_cli
from .reference import (
    LAYERS,
    PROMPT,
    RANK,
    comfy_reference,
    compare,
    diffusers_single_file_convert,
    flux_to_bfl,
    make_lora,
    quantize_dequantize_,
    write_bfl,
    write_kohya,
)

pytestmark = pytest.mark.reference


def merged(models, loras: list[tuple[dict, float]]) -> dict:
    """The reference: every LoRA merged into a copy of the transformer, as ComfyUI does."""
    ref = copy.deepcopy(models["transformer"])
    bfl = flux_to_bfl(ref.state_dict())
    for lora, scale in loras:
        for layer, (down, up, alpha) in lora.items():
            a = (alpha if alpha is not None else RANK) / RANK
            bfl[layer + ".weight"] = bfl[layer + ".weight"] + scale * a * up @ down
    ref.load_state_dict(diffusers_single_file_convert(bfl))
    return {**models, "transformer": ref}


# diffusers / PEFT: separate q/k/v (+ proj_mlp) and (scale, shift) for the final adaLN; the
# alpha / rank factor folded into up (PEFT files often carry no alpha)
def _qkv(block: str) -> list:
    return [(f"{block}.attn.to_{x}", i) for i, x in enumerate("qkv")]


DIFFUSERS = {
    "double_blocks.0.img_attn.qkv": _qkv("transformer_blocks.0"),
    "double_blocks.1.txt_mlp.0": [("transformer_blocks.1.ff_context.net.0.proj", None)],
    "double_blocks.0.img_mod.lin": [("transformer_blocks.0.norm1.linear", None)],
    "single_blocks.1.linear1": _qkv("single_transformer_blocks.1")
    + [("single_transformer_blocks.1.proj_mlp", 3)],
    "single_blocks.0.linear2": [("single_transformer_blocks.0.proj_out", None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", "swap")],
    "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
    "txt_in": [("context_embedder", None)],
}


def write_diffusers(lora: dict, path, hidden: int):
    tensors = {}
    for layer, (down, up, alpha) in lora.items():
        up = up * (alpha if alpha is not None else RANK) / RANK
        for name, part in DIFFUSERS[layer]:
            if part == "swap":
                half = up.shape[0] // 2
                rows = torch.cat([up[half:], up[:half]])
            elif part is None:
                rows = up
            else:
                rows = up[part * hidden : (part + 1) * hidden] if part < 3 else up[3 * hidden :]
            tensors[f"transformer.{name}.lora_A.weight"] = down.clone()
            tensors[f"transformer.{name}.lora_B.weight"] = rows.contiguous()
    save_file(tensors, str(path))
    return path


def hidden_of(models) -> int:
    cfg = models["transformer"].config
    return cfg.num_attention_heads * cfg.attention_head_dim


def run(folder, loras, seed=5):
    noise = mlxflux.comfy_noise(seed, (1, 16, HEIGHT // 8, WIDTH // 8))
    pipe = mlxflux.load(folder)
    image, report = generate(pipe, PROMPT, width=WIDTH, height=HEIGHT, steps=4, noise=noise,
                             loras=loras)  # fmt: skip
    return image, noise, report


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "bfl"])
def test_each_layout_matches_comfyui_merge(models, folder, tmp_path, layout):
    lora = make_lora(models, 1, alpha=None if layout == "diffusers" else 2.0)
    path = tmp_path / f"{layout}.safetensors"
    if layout == "kohya":
        write_kohya(lora, path)
    elif layout == "diffusers":
        write_diffusers(lora, path, hidden_of(models))
    else:
        write_bfl(lora, path)
    ours, noise, report = run(folder, [(path, 0.8)])
    ref = comfy_reference(merged(models, [(lora, 0.8)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    without = compare(run(folder, [])[0], ref)
    print(f"{layout}: mean {mean:.3f}, max {worst} levels; without the LoRA {without}")
    assert mean <= 0.75 and worst <= 4
    assert without[0] > 10 * max(mean, 0.1)  # the LoRA changes the picture a lot
    (entry,) = report.settings["loras"]
    assert entry["layers"] == len(LAYERS) and entry["unmatched"] == [] and entry["scale"] == 0.8


def test_two_stacked_loras_with_their_scales(models, folder, tmp_path):
    a, b = make_lora(models, 2), make_lora(models, 3, LAYERS[::2])
    files = [(write_bfl(a, tmp_path / "a.safetensors"), 0.7),
             (write_kohya(b, tmp_path / "b.safetensors"), -0.5)]  # fmt: skip
    ours, noise, _ = run(folder, files)
    ref = comfy_reference(merged(models, [(a, 0.7), (b, -0.5)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    print(f"stacked: mean {mean:.3f}, max {worst} levels")
    assert mean <= 0.75 and worst <= 4


def test_lora_on_8bit_weights_is_fully_there(models, folder_q8, tmp_path):
    """The side path adds the LoRA exactly to 8-bit weights: the reference is the dequantized
    8-bit model with the LoRA merged in full precision."""
    lora = make_lora(models, 4)
    path = write_bfl(lora, tmp_path / "style.safetensors")
    ours, noise, _ = run(folder_q8, [(path, 1.0)])
    q8 = dict(models)
    for name in ("transformer", "t5"):
        q8[name] = quantize_dequantize_(copy.deepcopy(models[name]), 8)
    ref = comfy_reference(merged(q8, [(lora, 1.0)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    print(f"8-bit + LoRA: mean {mean:.3f}, max {worst} levels")
    assert mean <= 0.75 and worst <= 4


def test_text_encoder_and_unknown_keys_are_reported_not_dropped(models, folder, tmp_path):
    path = write_kohya(make_lora(models, 5), tmp_path / "k.safetensors", text_encoder=True)
    _, _, report = run(folder, [(path, 1.0)])
    (entry,) = report.settings["loras"]
    assert entry["not_applied"] == ["lora_te1_text_model_encoder_layers_9_mlp_fc1"]
    # the CLI says so, and names keys that match no layer
    lora = make_lora(models, 5, LAYERS[:2])
    # a layer this model does not have (block 7): listed, not silently dropped
    lora["double_blocks.7.img_mlp.0"] = tuple(t.clone() for t in lora[LAYERS[0]][:2]) + (2.0,)
    odd = write_kohya(lora, tmp_path / "odd.safetensors", text_encoder=True)
    size = ["--width", "32", "--height", "32", "--steps", "1", "--seed", "2"]
    r = run_cli("gen", "--prompt", "x", *size, "--model", folder, "--lora", odd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lora odd.safetensors x 1: 2 layers" in r.stderr
    assert "1 text-encoder LoRA layers not applied" in r.stderr
    assert "keys that match no layer: lora_unet_double_blocks_7_img_mlp_0" in r.stderr


def test_bad_lora_files_are_refused_before_any_stage(models, folder, tmp_path, no_stage):
    pipe = mlxflux.load(folder)
    other = tmp_path / "other.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.ones(2, 8),
               "unet.down_blocks.0.lora_B.weight": torch.ones(8, 2)}, str(other))  # fmt: skip
    lora = make_lora(models, 6, LAYERS[:1])
    down, up, alpha = lora[LAYERS[0]]
    wrong = write_bfl({LAYERS[0]: (down[:, :-1], up, alpha)}, tmp_path / "wrong.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a LoRA")
    missing = tmp_path / "no.safetensors"
    cases = [(other, "applied to 0 layers"), (wrong, "do not fit"),
             (text, "not a safetensors LoRA"), (missing, "no such")]  # fmt: skip
    for path, match in cases:
        with pytest.raises(LoraError, match=f"{path.name}: .*{match}"):
            pipe.generate("x", width=32, height=32, steps=1, loras=[(path, 1.0)])


def test_cli_lora_flag_records_file_hash_and_scale(models, folder, tmp_path):
    path = write_kohya(make_lora(models, 7), tmp_path / "ink.safetensors")
    size = ["--width", "32", "--height", "32", "--steps", "1", "--seed", "2"]
    r = run_cli("gen", "--prompt", "x", *size, "--model", folder, "--lora", f"{path}:0.6",
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    settings = json.loads(Image.open(r.stdout.strip()).text["mlxflux"])
    (entry,) = settings["loras"]
    assert entry["file"] == "ink.safetensors" and entry["scale"] == 0.6
    assert len(entry["sha256"]) == 64
    r = run_cli("gen", "--prompt", "x", "--steps", "1", "--model", folder, "--lora",
                tmp_path / "missing.safetensors", cwd=tmp_path)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "missing.safetensors: no such file" in lines[0]
