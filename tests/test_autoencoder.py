"""The FLUX autoencoder against diffusers' AutoencoderKL, fp32 on the CPU."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from mlxflux.convert.keymaps import assemble, bfl_vae, diffusers_vae
from mlxflux.models.autoencoder import AutoEncoder, AutoencoderConfig

from .helpers import load_strict
from .reference import randomize_, rel_err, to_mx, vae_to_bfl

pytestmark = pytest.mark.reference

SCALE, SHIFT = 0.3611, 0.1159  # docs/numerics.md, the models


def make_reference(block_out=(32, 64), layers=2, seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out),
        up_block_types=["UpDecoderBlock2D"] * len(block_out),
        block_out_channels=list(block_out),
        layers_per_block=layers,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return randomize_(vae, seed)


def config_of(vae) -> AutoencoderConfig:
    ch = vae.config.block_out_channels[0]
    return AutoencoderConfig(
        ch=ch,
        ch_mult=tuple(c // ch for c in vae.config.block_out_channels),
        num_res_blocks=vae.config.layers_per_block,
    )


def from_diffusers(vae) -> AutoEncoder:
    cfg = config_of(vae)
    items = ((k, to_mx(v)) for k, v in vae.state_dict().items())
    weights = dict(assemble(items, diffusers_vae(len(cfg.ch_mult)), "vae"))
    return load_strict(AutoEncoder(cfg), weights, "vae")


def check_bfl_file_with_diffusers(vae, bfl: dict[str, torch.Tensor]) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    back = convert_ldm_vae_checkpoint(dict(bfl), dict(vae.config))
    sd = vae.state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k].reshape(sd[k].shape), sd[k]), k


def reference_decode(vae, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():  # FluxPipeline: latents / scaling_factor + shift_factor, then decode
        x = vae.decode(z / SCALE + SHIFT).sample
    return ((x / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()


def reference_encode(vae, img: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        mean = vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    return ((mean - SHIFT) * SCALE).numpy()


@pytest.mark.parametrize("block_out,layers", [((32, 64), 2), ((32, 32, 64), 1)])
def test_decode_and_encode_match_diffusers(block_out, layers):
    vae = make_reference(block_out, layers)
    ae = from_diffusers(vae)
    g = torch.Generator().manual_seed(1)
    down = 2 ** (len(block_out) - 1)
    z = torch.randn(2, 16, 48 // down // 2, 32 // down // 2, generator=g)  # non-square
    err = rel_err(np.array(ae.decode(to_mx(z))), reference_decode(vae, z))
    img = torch.rand(2, 40, 24, 3, generator=g)
    err_enc = rel_err(np.array(ae.encode(to_mx(img))), reference_encode(vae, img))
    print(f"decode rel err {err:.2e}, encode rel err {err_enc:.2e}")
    assert err <= 1e-4 and err_enc <= 1e-4


def test_ae_safetensors_layout_loads_and_matches(tmp_path):
    vae = make_reference((32, 64), 2, seed=4)
    bfl = vae_to_bfl(vae)
    check_bfl_file_with_diffusers(vae, bfl)
    path = tmp_path / "ae.safetensors"
    save_file(bfl, str(path))
    weights = dict(assemble(mx.load(str(path)).items(), bfl_vae, str(path)))
    ae = load_strict(AutoEncoder(config_of(vae)), weights, str(path))
    z = torch.randn(1, 16, 10, 6, generator=torch.Generator().manual_seed(2))
    assert rel_err(np.array(ae.decode(to_mx(z))), reference_decode(vae, z)) <= 1e-4
    img = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(3))
    assert rel_err(np.array(ae.encode(to_mx(img))), reference_encode(vae, img)) <= 1e-4


def test_tiled_decode_matches_untiled_without_seams():
    vae = make_reference((32, 32, 64), 1, seed=7)
    ae = from_diffusers(vae)
    g = torch.Generator().manual_seed(3)
    z = to_mx(torch.randn(1, 16, 40, 24, generator=g))
    full = np.array(ae.decode(z))
    # tiles of a few rows each, so there are many seams, some inside upsampled rows
    tiled = np.array(ae.decode(z, tiled=True, tile_bytes=200_000))
    diff = np.abs(full - tiled)
    print(f"tiled vs untiled: mean {diff.mean() * 255:.2e}/255, max {diff.max() * 255:.2e}/255")
    # measured: mean 3.8e-5/255, max 2.7e-4/255 (float rounding of the banded convolutions)
    assert diff.mean() <= 2e-4 / 255 and diff.max() <= 2e-3 / 255
    # no seam: the worst row and the worst column differ no more than the mean allows
    assert diff.mean(axis=(0, 2, 3)).max() <= 5e-4 / 255
    assert diff.mean(axis=(0, 1, 3)).max() <= 5e-4 / 255
    # and the tiled image against diffusers itself
    assert rel_err(tiled, reference_decode(vae, torch.from_numpy(np.array(z)))) <= 1e-4


@pytest.mark.parametrize("height,width", [(64, 48), (72, 40)])
def test_tiled_encode_matches_diffusers(height, width):
    """Row-tiled encode (stride-2 downsamples included) against diffusers' AutoencoderKL."""
    vae = make_reference((32, 32, 64), 1, seed=9)
    ae = from_diffusers(vae)
    img = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(4))
    full = np.array(ae.encode(to_mx(img)))
    tiled = np.array(ae.encode(to_mx(img), tiled=True, tile_bytes=100_000))  # many tiles
    print(f"tiled vs untiled encode: max {np.abs(full - tiled).max():.2e}")
    assert rel_err(tiled, reference_encode(vae, img)) <= 1e-4
    assert rel_err(tiled, full) <= 1e-5
