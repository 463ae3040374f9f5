"""GGUF transformers (BFL names, mixed block types) and T5 encoders (llama.cpp names), built
with the `gguf` package: the converted model computes what the gguf-dequantized weights
compute in diffusers / transformers."""

import copy

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mlxflux.convert import convert
from mlxflux.model_folder import read_manifest
from mlxflux.models.registry import load_component

from . import reference
from .helpers import run_cli, tokenizer_dir, transformer_kinds, write_gguf
from .reference import (
    diffusers_single_file_convert,
    flux_to_bfl,
    reference_outputs,
    rel_err,
    to_mx,
)

pytestmark = pytest.mark.reference


# transformers' T5 names -> llama.cpp's (the names t5-v1_1-xxl-encoder-*.gguf files carry)
def llama_t5_name(name: str) -> str:
    simple = {"shared.weight": "token_embd.weight",
              "encoder.final_layer_norm.weight": "enc.output_norm.weight"}  # fmt: skip
    if name in simple:
        return simple[name]
    parts = name.split(".")
    block, rest = parts[2], ".".join(parts[3:])
    table = {
        "layer.0.SelfAttention.q.weight": "attn_q", "layer.0.SelfAttention.k.weight": "attn_k",
        "layer.0.SelfAttention.v.weight": "attn_v", "layer.0.SelfAttention.o.weight": "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight": "attn_rel_b",
        "layer.0.layer_norm.weight": "attn_norm", "layer.1.DenseReluDense.wi_0.weight": "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight": "ffn_up", "layer.1.DenseReluDense.wo.weight":
        "ffn_down", "layer.1.layer_norm.weight": "ffn_norm",
    }  # fmt: skip
    return f"enc.blk.{block}.{table[rest]}.weight"


@pytest.fixture(scope="module")
def models():
    return reference.make_models(seed=31)


@pytest.fixture(scope="module")
def sources(models, tmp_path_factory):
    """GGUF transformer and T5 beside safetensors CLIP/VAE, and the reference models that
    hold the weights gguf dequantizes."""
    tmp = tmp_path_factory.mktemp("gguf")
    files = reference.write_single_files(models, tmp / "st")
    bfl = {k: v.numpy() for k, v in flux_to_bfl(models["transformer"].state_dict()).items()}
    flux_values = write_gguf(tmp / "flux1-dev-Q8_0.gguf", bfl, transformer_kinds(bfl))
    t5_sd = {k: v.numpy() for k, v in models["t5"].state_dict().items()
             if k != "encoder.embed_tokens.weight"}  # fmt: skip
    t5_names = {llama_t5_name(k): v for k, v in t5_sd.items()}
    t5_kinds = {n: (Q.Q8_0 if v.ndim == 2 and v.shape[1] % 32 == 0 else Q.F16)
                for n, v in t5_names.items() if v.ndim == 2}  # fmt: skip
    t5_values = write_gguf(tmp / "t5-v1_1-xxl-encoder-Q8_0.gguf", t5_names, t5_kinds)

    ref = dict(models)
    ref["transformer"] = copy.deepcopy(models["transformer"])
    back = diffusers_single_file_convert({k: torch.tensor(v) for k, v in flux_values.items()})
    ref["transformer"].load_state_dict(back)
    ref["t5"] = copy.deepcopy(models["t5"])
    by_llama = {llama_t5_name(k): k for k in t5_sd}
    state = {by_llama[n]: torch.from_numpy(v.copy()) for n, v in t5_values.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    ref["t5"].load_state_dict(state)
    paths = {"flux": tmp / "flux1-dev-Q8_0.gguf", "t5": tmp / "t5-v1_1-xxl-encoder-Q8_0.gguf",
             "clip": files["clip"], "ae": files["vae"]}  # fmt: skip
    return paths, ref, flux_values, t5_values


def converted(paths, out, bits):
    return convert([], out, bits=bits, dtype="float32", tokenizers=tokenizer_dir(),
                   **{k: v for k, v in paths.items()})  # fmt: skip


def test_unquantized_conversion_holds_exactly_what_gguf_dequantizes(sources, tmp_path):
    paths, _, flux_values, t5_values = sources
    out = converted(paths, tmp_path / "model", None)
    flux = mx.load(str(next((out / "transformer").glob("trunk-*.safetensors"))))
    flux.update(mx.load(str(next((out / "transformer").glob("modulation-*.safetensors")))))
    assert set(flux) == set(flux_values)
    for key, want in flux_values.items():
        assert np.array_equal(np.array(flux[key]), want), key
    t5 = mx.load(str(next((out / "t5").glob("*.safetensors"))))
    assert np.array_equal(np.array(t5["shared.weight"]), t5_values["token_embd.weight"])
    notes = " ".join(read_manifest(out)["notes"])
    assert "transformer read from GGUF" in notes and "Q4_K" in notes and "Q8_0" in notes


@pytest.mark.parametrize("bits,bound", [(None, 1e-4), (8, 0.05)])
def test_converted_gguf_computes_what_the_dequantized_weights_compute(sources, tmp_path, bits,
                                                                      bound):  # fmt: skip
    paths, ref, _, _ = sources
    out = converted(paths, tmp_path / "model", bits)
    inputs, ids, _, _, want = reference_outputs(ref)
    from mlxflux.models.latents import image_ids

    manifest = read_manifest(out)
    m = load_component(out, "transformer", manifest)
    got = m(*(to_mx(inputs[k]) for k in ("hidden_states", "encoder_hidden_states", "timestep",
                                         "pooled_projections")),
            image_ids(48, 64), to_mx(inputs["guidance"]))  # fmt: skip
    errs = {"transformer": rel_err(np.array(got), want["transformer"])}
    t5 = load_component(out, "t5", manifest)
    errs["t5"] = rel_err(np.array(t5(to_mx(ids).astype(mx.int32))), want["t5"])
    print(f"bits {bits}: {errs}")
    assert max(errs.values()) <= bound


def test_bad_gguf_files_are_refused_in_one_line(sources, tmp_path):
    paths, _, _, _ = sources
    data = paths["flux"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + data[4:200])
    odd = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(odd), "flux")
    raw = np.zeros((4, 66), np.uint8)  # one IQ2_XXS block per row
    w.add_tensor("img_in.weight", raw, raw_shape=raw.shape, raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    others = ["--t5", paths["t5"], "--clip", paths["clip"], "--ae", paths["ae"],
              "--tokenizers", tokenizer_dir()]  # fmt: skip
    cases = [
        (["--flux", truncated, *others], "truncated.gguf: "),
        (["--flux", fake, *others], "fake.gguf: not a GGUF file"),
        (["--flux", odd, *others], "iq.gguf: tensor img_in.weight has GGUF type IQ2_XXS"),
        (["--flux", paths["t5"], *others[2:]], "a T5 text encoder, not a FLUX transformer"),
    ]
    for args, message in cases:
        r = run_cli("convert", *args, "--out", tmp_path / "out")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in lines[-1], lines
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
