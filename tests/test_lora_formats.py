"""The LoRA formats people download besides plain LoRAs, against ComfyUI's merge: LyCORIS LoKr
and LoHa, DoRA (`dora_scale` on either axis), full differences (`.diff`, `.diff_b`), and the
names of OneTrainer, SimpleTuner's LyCORIS and AI-Toolkit files. The reference merges each
file into a copy of the transformer by ComfyUI's formulas (`comfy/weight_adapter/`: lora, loha,
lokr, `weight_decompose`; `comfy/lora.py`: diff), ported here, or by ComfyUI's own adapter
classes when COMFYUI_PATH is set; FluxPipeline then draws with ComfyUI's sigmas. mlxflux never
merges: low-rank and Kronecker side paths, dense side terms, DoRA's rows made dense."""

import copy
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlxflux
from mlxflux.lora import LoraError

from .helpers import HEIGHT, WIDTH, comfyui, generate
from .reference import (
    ADAPTER_LAYERS as LAYERS,
)
from .reference import (
    PROMPT,
    comfy_reference,
    compare,
    diffusers_single_file_convert,
    flux_to_bfl,
    make_adapter,
    quantize_dequantize_,
)
from .reference import (
    build_adapters as build,
)
from .reference import (
    write_adapters as write,
)

pytestmark = pytest.mark.reference

MEAN, MAX = 0.75, 4


def comfy_apply(weight, bias, p: dict, strength: float):
    """ComfyUI's change of one layer's weight (and bias) by adapter pieces `p`."""
    if os.environ.get("COMFYUI_PATH"):
        return _comfy_own(weight, bias, p, strength)
    alpha = p.get("alpha")
    dora = p.get("dora_scale")
    if "diff" in p:
        return weight + strength * p["diff"], bias + strength * p["diff_b"]
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        a, delta = (alpha / down.shape[0] if alpha is not None else 1.0), up @ down
    elif "hada_w1_a" in p:
        a = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1, w2, dim = p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        a, delta = (alpha / dim if alpha is not None else 1.0), torch.kron(w1, w2)
    if dora is None:
        return weight + strength * a * delta, bias
    # comfy/weight_adapter/base.py weight_decompose
    calc = weight + delta * a
    if dora.shape[0] == calc.shape[0]:
        norm = weight.norm(dim=1, keepdim=True)
    else:
        norm = calc.norm(dim=0, keepdim=True)
    calc = calc * (dora / (norm + torch.finfo(weight.dtype).eps))
    return (calc if strength == 1.0 else weight + strength * (calc - weight)), bias


def _comfy_own(weight, bias, p, strength):
    """ComfyUI's own adapter classes (`comfy.weight_adapter`: load, then calculate_weight); a
    full difference is `comfy.lora`'s two lines (that module needs all of ComfyUI's models)."""
    (adapters,) = comfyui("comfy.weight_adapter")
    if "diff" in p:
        return weight + strength * p["diff"], bias + strength * p["diff_b"]
    lora = {f"x.{k}": v for k, v in p.items()}
    alpha = p["alpha"].item() if "alpha" in p else None
    for cls in adapters.adapters:
        adapter = cls.load("x", lora, alpha, p.get("dora_scale"))
        if adapter is not None:
            w = adapter.calculate_weight(weight.clone(), "x.weight", strength, 1.0, None,
                                         lambda a: a)  # fmt: skip
            return w, bias
    raise AssertionError(f"ComfyUI read no adapter from {sorted(p)}")


def merged(models, files: list[tuple[dict, float]]) -> dict:
    ref = copy.deepcopy(models["transformer"])
    bfl = flux_to_bfl(ref.state_dict())
    for file, strength in files:
        for layer, p in file.items():
            w, b = bfl[layer + ".weight"], bfl.get(layer + ".bias")
            bfl[layer + ".weight"], new_b = comfy_apply(w, b, p, strength)
            if b is not None:
                bfl[layer + ".bias"] = new_b
    ref.load_state_dict(diffusers_single_file_convert(bfl))
    return {**models, "transformer": ref}


def run(folder, loras, seed=5):
    noise = mlxflux.comfy_noise(seed, (1, 16, HEIGHT // 8, WIDTH // 8))
    image, report = generate(mlxflux.load(folder), PROMPT, width=WIDTH, height=HEIGHT, steps=4,
                             noise=noise, loras=loras)  # fmt: skip
    return image, noise, report


CASES = {
    "lokr": ({layer: "lokr" for layer in LAYERS}, None),
    "loha": ({layer: "loha" for layer in LAYERS}, None),
    "diff": ({layer: "diff" for layer in LAYERS}, None),
    "dora-in": ({layer: "lora" for layer in LAYERS}, "in"),
    "dora-out": ({layer: "lora" for layer in LAYERS}, "out"),
    "lokr-dora": ({layer: "lokr" for layer in LAYERS[:3]}, "in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_adapter_kind_matches_comfyuis_merge(models, folder, tmp_path, case):
    kinds, dora = CASES[case]
    file = build(models, kinds, seed=len(case), dora=dora)
    path = write(file, tmp_path / f"{case}.safetensors")
    ours, noise, report = run(folder, [(path, 0.8)])
    ref = comfy_reference(merged(models, [(file, 0.8)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    without = compare(run(folder, [])[0], ref)
    print(f"{case}: mean {mean:.3f}, max {worst} levels; without it {without}")
    assert mean <= MEAN and worst <= MAX
    assert without[0] > 5 * max(mean, 0.1)  # the file changes the picture
    (entry,) = report.settings["loras"]
    kind = next(iter(kinds.values())) + ("+dora" if dora else "")
    assert entry["adapters"] == {kind: len(kinds)} and entry["unmatched"] == []


def test_stacked_kinds_on_8bit_weights(models, folder_q8, tmp_path):
    """LoHa and a DoRA over 8-bit weights: the dense terms and DoRA's rows from the dequantized
    layer, never requantized (the reference: the dequantized model, merged in full precision)."""
    a = build(models, {layer: "loha" for layer in LAYERS[::2]}, seed=31)
    b = build(models, {layer: "lora" for layer in LAYERS[1::2]}, seed=32, dora="in")
    files = [
        (write(a, tmp_path / "a.safetensors"), 0.9),
        (write(b, tmp_path / "b.safetensors"), 1.0),
    ]
    ours, noise, _ = run(folder_q8, files)
    q8 = dict(models)
    for name in ("transformer", "t5"):
        q8[name] = quantize_dequantize_(copy.deepcopy(models[name]), 8)
    ref = comfy_reference(merged(q8, [(a, 0.9), (b, 1.0)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    print(f"8-bit LoHa + DoRA: mean {mean:.3f}, max {worst} levels")
    assert mean <= MEAN and worst <= MAX


def _onetrainer(file: dict, hidden: int, prefix: str) -> dict:
    """A single block's fused linear1 as OneTrainer / SimpleTuner name it: diffusers' to_q,
    to_k, to_v and proj_mlp, underscored, each its rows of the BFL layer."""
    tensors = {}
    for layer, p in file.items():
        block = layer.split(".")[1]
        parts = [("attn_to_q", 0, hidden), ("attn_to_k", hidden, 2 * hidden),
                 ("attn_to_v", 2 * hidden, 3 * hidden), ("proj_mlp", 3 * hidden, None)]  # fmt: skip
        for name, lo, hi in parts:
            key = f"{prefix}single_transformer_blocks_{block}_{name}"
            tensors[f"{key}.lora_down.weight"] = p["lora_down.weight"].clone()
            tensors[f"{key}.lora_up.weight"] = p["lora_up.weight"][lo:hi].clone()
            tensors[f"{key}.alpha"] = p["alpha"].clone()
    return tensors


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names(models, folder, tmp_path, prefix):
    cfg = models["transformer"].config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    file = build(models, {"single_blocks.1.linear1": "lora", "single_blocks.0.linear1": "lora"},
                 seed=41)  # fmt: skip
    path = tmp_path / "onetrainer.safetensors"
    save_file(_onetrainer(file, hidden, prefix), str(path))
    ours, noise, report = run(folder, [(path, 1.0)])
    ref = comfy_reference(merged(models, [(file, 1.0)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    print(f"{prefix}: mean {mean:.3f}, max {worst} levels")
    assert mean <= MEAN and worst <= MAX
    (entry,) = report.settings["loras"]
    assert entry["unmatched"] == [] and entry["layers"] == 2 and entry["adapters"] == {"lora": 8}


def test_ai_toolkit_names(models, folder, tmp_path):
    """AI-Toolkit saves diffusers names behind `transformer.` with lora_A / lora_B (mflux's
    "0/224 keys matched"): q, k, v land in the fused layer."""
    cfg = models["transformer"].config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    file = build(models, {"single_blocks.1.linear1": "lora"}, seed=43)
    tensors = {k.replace("lycoris_single_transformer_blocks_1_", "transformer."
                         "single_transformer_blocks.1.").replace("attn_to_", "attn.to_")
               .replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
               for k, v in _onetrainer(file, hidden, "lycoris_").items()
               if not k.endswith(".alpha")}  # fmt: skip
    assert "transformer.single_transformer_blocks.1.attn.to_q.lora_A.weight" in tensors
    path = tmp_path / "ai-toolkit.safetensors"
    save_file(tensors, str(path))
    for p in file.values():
        p["alpha"] = torch.tensor(4.0)  # no alpha in the file: alpha / rank = 1
    ours, noise, report = run(folder, [(path, 1.0)])
    ref = comfy_reference(merged(models, [(file, 1.0)]), "simple", 4, noise)
    mean, worst = compare(ours, ref)
    assert mean <= MEAN and worst <= MAX, (mean, worst)
    assert report.settings["loras"][0]["unmatched"] == []


def test_adapters_mlxflux_does_not_apply_are_named(models, folder, tmp_path):
    oft = {"lora_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.ones(4, 8, 8),
           "lora_unet_double_blocks_0_img_attn_qkv.rescale": torch.ones(1)}  # fmt: skip
    only = tmp_path / "oft.safetensors"
    save_file(oft, str(only))
    with pytest.raises(LoraError, match="holds OFT/BOFT adapters, which mlxflux does not apply"):
        run(folder, [(only, 1.0)])
    file = build(models, {"txt_in": "lokr"}, seed=5)
    mixed = tmp_path / "mixed.safetensors"
    save_file({**oft, **{f"lora_unet_txt_in.{k}": v for k, v in file["txt_in"].items()}},
              str(mixed))  # fmt: skip
    _, _, report = run(folder, [(mixed, 1.0)])
    (entry,) = report.settings["loras"]
    assert entry["unsupported"] == {"OFT/BOFT": 1} and entry["adapters"] == {"lokr": 1}


def test_the_memory_plan_counts_the_side_paths(models, folder, tmp_path):
    """Dense terms (LoHa, full differences) and DoRA's rows are float32 copies of the touched
    layers: the denoise stage's need grows by exactly what they hold."""
    from mlxflux.request import GenerationRequest

    file = build(models, {"txt_in": "loha", "single_blocks.0.linear2": "diff"}, seed=7)
    path = write(file, tmp_path / "dense.safetensors")
    pipe = mlxflux.load(folder)
    bare = pipe.prepare(GenerationRequest(prompt="x", width=WIDTH, height=HEIGHT, steps=2))
    job = pipe.prepare(GenerationRequest(prompt="x", width=WIDTH, height=HEIGHT, steps=2,
                                         loras=((path, 1.0),)))  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in flux_to_bfl(models["transformer"].state_dict()).items()}
    dense = sum(4 * np.prod(shapes[f"{layer}.weight"]) for layer in file)
    assert job.loras.resident_bytes == dense
    grown = job.plan.needs["denoise"].resident - bare.plan.needs["denoise"].resident
    assert grown == dense


@pytest.mark.parametrize("variant, width", [("fill", 384), ("canny", 128)])
def test_a_lora_for_the_full_variant_touches_its_wider_input(tmp_path, variant, width):
    """LoRAs trained on FLUX.1 Fill or Canny dev carry the input projection at the variant's
    width (384 / 128 inputs): on that model they apply, as every other layer does."""
    from mlxflux.request import GenerationRequest

    from .helpers import cover_image, small_model, write_lora

    folder = small_model(tmp_path / variant, variant=variant, seed=3)
    path = write_lora(tmp_path / "wide.safetensors", {"img_in": (256, width),
                                                       "txt_in": (256, 64)}, seed=9)  # fmt: skip
    original = tmp_path / "cover.png"
    cover_image(3, 48, 32).save(original)
    kw = {"prompt": "x", "width": 48, "height": 32, "steps": 2, "seeds": (2,)}
    kw |= {"init_image": str(original)} if variant == "fill" else {"control_image": str(original)}
    if variant == "fill":
        kw["mask"] = str(original)
    pipe = mlxflux.load(folder)
    plain = next(pipe.prepare(GenerationRequest(**kw)).run())[1]
    job = pipe.prepare(GenerationRequest(**kw, loras=((path, 1.0),)))
    styled = next(job.run())[1]
    (entry,) = job.report.settings["loras"]
    assert entry["layers"] == 2 and entry["unmatched"] == [], entry
    assert np.abs(np.asarray(styled, np.int32) - np.asarray(plain, np.int32)).mean() > 1


TEXT = {  # ComfyUI's names for FLUX's text encoders -> (module, its parameter path, kind)
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("clip", "encoder.layers.0.self_attn.q_proj", "lora"),
    "lora_te1_text_model_encoder_layers_1_mlp_fc1":
        ("clip", "encoder.layers.1.mlp.fc1", "loha"),
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q":
        ("t5", "encoder.block.0.layer.0.SelfAttention.q", "lora"),
    "lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_0":
        ("t5", "encoder.block.1.layer.1.DenseReluDense.wi_0", "lokr"),
}  # fmt: skip


@pytest.mark.parametrize("bits", [None, 8])
def test_text_encoder_parts_apply_at_the_clip_scale(models, folder, folder_q8, tmp_path, bits):
    """A file with transformer and text-encoder parts (kohya names, as ComfyUI's LoraLoader
    reads them): the transformer's at SCALE, CLIP-L's and T5's at CLIP_SCALE."""
    g = torch.Generator().manual_seed(51)
    file = build(models, {"double_blocks.0.img_attn.qkv": "lora"}, seed=52)
    tensors = {f"lora_unet_{k.replace('.', '_')}.{n}": v.clone()
               for k, p in file.items() for n, v in p.items()}  # fmt: skip
    text = {}
    for key, (component, name, kind) in TEXT.items():
        w = dict(models[component].named_parameters())[name + ".weight"]
        p = make_adapter(kind, *w.shape, g)
        if component == "t5":  # T5's residual stream is wide: a strong change shows
            p = {k: v * 3 if k in ("lora_up.weight", "lokr_w1") else v for k, v in p.items()}
        text[key] = (component, name, p)
        tensors.update({f"{key}.{n}": v.clone() for n, v in p.items()})
    path = tmp_path / "with-text.safetensors"
    save_file(tensors, str(path))

    base = dict(models)
    if bits:  # the 8-bit folder's transformer and T5, dequantized
        for name in ("transformer", "t5"):
            base[name] = quantize_dequantize_(copy.deepcopy(models[name]), bits)
    ref = merged(base, [(file, 0.8)])
    for component in ("clip", "t5"):
        ref[component] = copy.deepcopy(base[component])
    for component, name, p in text.values():
        w = dict(ref[component].named_parameters())[name + ".weight"]
        with torch.no_grad():
            w.copy_(comfy_apply(w.detach().clone(), None, p, 0.6)[0])
    target = folder_q8 if bits else folder
    ours, noise, report = run(target, [(path, 0.8, 0.6)])
    want = comfy_reference(ref, "simple", 4, noise)
    mean, worst = compare(ours, want)
    transformer_only = compare(run(target, [(path, 0.8, 0.0)])[0], want)
    label = bits or "fp32"
    print(f"text encoders ({label}): mean {mean:.3f}, max {worst}; clip 0: {transformer_only}")
    assert mean <= MEAN and worst <= MAX
    assert transformer_only[0] > 5 * max(mean, 0.1)  # the text parts change the picture
    (entry,) = report.settings["loras"]
    assert entry["text_layers"] == 4 and entry["not_applied"] == [] and entry["clip_scale"] == 0.6
