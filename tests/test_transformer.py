"""The Flux transformer against diffusers' FluxTransformer2DModel, fp32 on the CPU."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from mlxflux.convert.infer import flux_config_from_diffusers, flux_config_from_shapes
from mlxflux.convert.keymaps import assemble, bfl_transformer, diffusers_transformer
from mlxflux.errors import WeightError
from mlxflux.models.latents import image_ids, pack_latents, unpack_latents
from mlxflux.models.transformer import FLUX_DEV, FluxTransformer, is_modulation_key

from .helpers import load_strict
from .reference import (
    diffusers_single_file_convert,
    flux_to_bfl,
    load_from_diffusers,
    make_inputs,
    randomize_,
    rel_err,
    run_reference,
    to_mx,
)

pytestmark = pytest.mark.reference

TINY = {
    "guided": dict(
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "unguided": dict(
        num_layers=3,
        num_single_layers=2,
        attention_head_dim=24,
        num_attention_heads=3,
        joint_attention_dim=40,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(4, 10, 10),
    ),
}


def make_reference(name: str, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return randomize_(FluxTransformer2DModel(**TINY[name]), seed)


def run_mlx(model: FluxTransformer, inputs):
    out = model(
        to_mx(inputs["hidden_states"]),
        to_mx(inputs["encoder_hidden_states"]),
        to_mx(inputs["timestep"]),
        to_mx(inputs["pooled_projections"]),
        inputs["img_ids"].numpy().astype(np.int32),
        None if inputs["guidance"] is None else to_mx(inputs["guidance"]),
    )
    return np.array(out)


# ---- BFL layout, built here and validated by diffusers' own single-file converter ----------


@pytest.mark.parametrize("name", list(TINY))
def test_bfl_file_built_here_is_what_diffusers_reads(name):
    ref = make_reference(name)
    sd = ref.state_dict()
    back = diffusers_single_file_convert(flux_to_bfl(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


# ---- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,batch,height,width,n_txt",
    [
        ("guided", 1, 96, 64, 7),
        ("guided", 2, 48, 80, 5),
        ("unguided", 2, 64, 112, 9),
        ("unguided", 1, 32, 32, 3),
    ],
)
def test_matches_diffusers_from_diffusers_layout(name, batch, height, width, n_txt):
    ref = make_reference(name)
    inputs = make_inputs(ref, batch, height, width, n_txt)
    err = rel_err(run_mlx(load_from_diffusers(ref), inputs), run_reference(ref, inputs))
    print(f"{name} b{batch} {height}x{width}: rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name,prefix", [("guided", ""), ("unguided", "model.diffusion_model.")])
def test_matches_diffusers_from_bfl_file(tmp_path, name, prefix):
    ref = make_reference(name, seed=3)
    path = tmp_path / "flux.safetensors"
    save_file({prefix + k: v for k, v in flux_to_bfl(ref.state_dict()).items()}, str(path))

    weights = dict(assemble(mx.load(str(path)).items(), bfl_transformer, str(path)))
    cfg = flux_config_from_shapes(
        {k: v.shape for k, v in weights.items()}, axes_dim=TINY[name]["axes_dims_rope"]
    )
    assert cfg == flux_config_from_diffusers(dict(ref.config))
    model = load_strict(FluxTransformer(cfg), weights, str(path))

    inputs = make_inputs(ref, 2, 80, 48, 6)
    err = rel_err(run_mlx(model, inputs), run_reference(ref, inputs))
    print(f"{name} from BFL file: rel err {err:.2e}")
    assert err <= 1e-4


def test_precomputed_modulation_matches_plain_forward():
    ref = make_reference("guided", seed=5)
    model = load_from_diffusers(ref)
    batch, steps, height, width = 2, 3, 64, 96
    inputs = make_inputs(ref, batch, height, width, 4)
    img, txt = to_mx(inputs["hidden_states"]), to_mx(inputs["encoder_hidden_states"])
    pooled, ids = to_mx(inputs["pooled_projections"]), image_ids(height, width)
    sigmas = mx.array([1.0, 0.61, 0.2])

    # every step's conditioning at once: rows are (step, batch)
    cond = model.modulation(
        mx.repeat(sigmas, batch), mx.tile(pooled, (steps, 1)), mx.full((steps * batch,), 3.5)
    )
    mx.eval(cond.arrays())
    plain = [
        np.array(model(img, txt, mx.full((batch,), s), pooled, ids, mx.full((batch,), 3.5)))
        for s in sigmas.tolist()
    ]
    n_before = len(tree_flatten(model.parameters()))
    model.drop_modulation()
    assert len(tree_flatten(model.parameters())) < n_before
    assert not any(is_modulation_key(k) for k, _ in tree_flatten(model.parameters()))
    rope = model.rope(ids, txt.shape[1])
    for i, want in enumerate(plain):
        got = np.array(model.trunk(img, txt, cond.rows(i * batch, (i + 1) * batch), rope))
        assert rel_err(got, want) <= 1e-6


def test_full_flux_dev_is_built_lazily_with_its_parameter_counts():
    before = mx.get_active_memory()
    model = FluxTransformer(FLUX_DEV)
    params = tree_flatten(model.parameters())
    total = sum(v.size for _, v in params)
    modulation = sum(v.size for k, v in params if is_modulation_key(k))
    adaln = sum(v.size for k, v in params if is_modulation_key(k) and "_in." not in k)
    assert round(total / 1e9, 1) == 11.9  # FLUX.1-dev, 11,901,408,320 parameters
    assert round(adaln / 1e9, 1) == 3.2  # docs/design.md, memory plan
    assert adaln < modulation < 3.3e9  # plus the small time/guidance/vector embedders
    assert mx.get_active_memory() - before < 64 << 20  # nothing was allocated


def test_strict_loading_names_the_key():
    ref = make_reference("guided")
    good = dict(
        assemble(((k, to_mx(v)) for k, v in ref.state_dict().items()), diffusers_transformer, "x")
    )
    cfg = flux_config_from_diffusers(dict(ref.config))
    missing = {k: v for k, v in good.items() if k != "single_blocks.1.linear2.bias"}
    with pytest.raises(WeightError, match=r"src\.safetensors: missing.*single_blocks\.1\.linear2"):
        load_strict(FluxTransformer(cfg), missing, "src.safetensors")
    extra = {**good, "single_blocks.9.linear2.bias": good["single_blocks.1.linear2.bias"]}
    with pytest.raises(WeightError, match=r"unexpected.*single_blocks\.9\.linear2\.bias"):
        load_strict(FluxTransformer(cfg), extra, "src.safetensors")
    bad = {**good, "txt_in.weight": good["txt_in.weight"][:, :-1]}
    with pytest.raises(WeightError, match=r"txt_in\.weight has shape \(32, 23\)"):
        load_strict(FluxTransformer(cfg), bad, "src.safetensors")


def test_pack_and_image_ids_follow_bfl_layout():
    # `b c (h ph) (w pw) -> b (h w) (c ph pw)`, written with torch ops as the reference does
    lat = torch.randn(2, 16, 6, 10)
    ref = lat.reshape(2, 16, 3, 2, 5, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 15, 64)
    packed = pack_latents(to_mx(lat))
    assert np.array_equal(np.array(packed), ref.numpy())
    assert np.array_equal(np.array(unpack_latents(packed, 48, 80)), lat.numpy())
    ids = image_ids(48, 80)
    assert ids.shape == (15, 3) and ids[7].tolist() == [0, 1, 2]  # row 1, col 2 of a 3x5 grid
