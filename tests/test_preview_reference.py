"""Previews against their references: Latent2RGB against ComfyUI's formula and factors
(`latent_preview.py` Latent2RGBPreviewer, `comfy/latent_formats.py` class Flux) in torch, and
the tiny decoder against diffusers' AutoencoderTiny, read from each file it ships as. With
COMFYUI_PATH set, ComfyUI's own classes are the reference too."""

import os

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlxflux.convert.taef1 import read_taef1
from mlxflux.models.taef1 import TAEF1Decoder
from mlxflux.preview import Previewer, latent2rgb

from .helpers import comfyui, load_strict

pytestmark = pytest.mark.reference

# comfy/latent_formats.py, class Flux, as ComfyUI has them: 16 rows (latent channels) of R, G, B
COMFY_FACTORS = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
]
COMFY_BIAS = [-0.0329, -0.0718, -0.0851]


def comfy_preview_to_image(values: torch.Tensor) -> np.ndarray:
    """latent_preview.py `preview_to_image`, without PIL."""
    return ((values + 1.0) / 2.0).clamp(0, 1).mul(0xFF).to(torch.uint8).numpy()


def comfy_latent2rgb(x0: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 picture, its 0..255 values before truncation) as Latent2RGBPreviewer makes it."""
    factors = torch.tensor(COMFY_FACTORS).transpose(0, 1)
    v = torch.nn.functional.linear(x0[0].movedim(0, -1), factors, bias=torch.tensor(COMFY_BIAS))
    return comfy_preview_to_image(v), (((v + 1.0) / 2.0).clamp(0, 1) * 255).numpy()


def assert_same_levels(ours: np.ndarray, ref: np.ndarray, levels: np.ndarray) -> None:
    """Equal, except where the reference value lies within float32 rounding of a level's
    boundary (two orders of summation may then truncate to neighbouring levels)."""
    differ = ours != ref
    near = np.abs(levels - np.round(levels)) < 1e-3
    assert np.all(near[differ]), levels[differ & ~near][:5]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert differ.mean() < 1e-4


def test_latent2rgb_is_comfyuis_previewer():
    g = torch.Generator().manual_seed(0)
    # model-space latents of a picture forming: about -3..3, the preview's range
    x0 = torch.randn(1, 16, 96, 160, generator=g) * 1.5
    ref, levels = comfy_latent2rgb(x0)
    ours = np.asarray(latent2rgb(x0.numpy()))
    assert ours.shape == (96, 160, 3) and ours.dtype == np.uint8
    assert_same_levels(ours, ref, levels)
    assert 0 < (ours == 0).mean() < 0.5 and 0 < (ours == 255).mean() < 0.5  # both clamps hit


def random_taesd(seed: int):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    m = AutoencoderTiny(latent_channels=16).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """A random AutoencoderTiny, written as each file taef1 ships as."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("taef1")
    m = random_taesd(3)
    m.save_pretrained(tmp / "diffusers")
    comfy = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v
             for k, v in m.state_dict().items() if k.startswith("decoder.layers.")}  # fmt: skip
    torch.save(comfy, tmp / "taef1_decoder.pth")
    save_file({k: v.contiguous() for k, v in comfy.items()}, tmp / "taef1_decoder.safetensors")
    full = {f"taesd_decoder.{k}": v.contiguous() for k, v in comfy.items()}
    full |= {f"taesd_encoder.{k[len('encoder.layers.') :]}": v.contiguous()
             for k, v in m.state_dict().items() if k.startswith("encoder.layers.")}  # fmt: skip
    save_file(full, tmp / "taef1_full.safetensors")
    files = {"diffusers": tmp / "diffusers" / "diffusion_pytorch_model.safetensors",
             "comfyui .pth": tmp / "taef1_decoder.pth",
             "comfyui .safetensors": tmp / "taef1_decoder.safetensors",
             "full taesd": tmp / "taef1_full.safetensors"}  # fmt: skip
    return m, files


LAYOUTS = ["diffusers", "comfyui .pth", "comfyui .safetensors", "full taesd"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_taef1_decodes_as_diffusers_autoencoder_tiny(taesd, layout):
    m, files = taesd
    _, weights = read_taef1(files[layout])
    ours = load_strict(TAEF1Decoder(), weights, layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 12, 20, generator=g) * 2
    with torch.no_grad():
        ref = m.decoder(x)  # -1..1
    out = np.array(ours(mx.array(x.numpy())) * 2 - 1).transpose(0, 3, 1, 2)
    assert out.shape == (1, 3, 96, 160)
    err = np.abs(out - ref.numpy()).max()
    print(f"{layout}: max |ours - diffusers| = {err:.2e}")
    assert err < 1e-4


def test_the_taef1_preview_is_comfyuis_taesd_previewer(taesd):
    """TAESDPreviewerImpl: preview_to_image(TAESD.decode(x0)) with decode's (x - 0.5) * 2."""
    m, files = taesd
    _, weights = read_taef1(files["diffusers"])
    decoder = load_strict(TAEF1Decoder(), weights, "taef1")
    x0 = torch.randn(1, 16, 10, 14, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        image = m.decoder(x0)[0].movedim(0, 2)  # AutoencoderTiny: already (x - 0.5) * 2
    ref = comfy_preview_to_image(image)
    ours = np.asarray(Previewer("taef1", decoder, size=1 << 20)(mx.array(x0.numpy())))
    levels = (((image + 1.0) / 2.0).clamp(0, 1) * 255).numpy()
    assert ours.shape == ref.shape == (80, 112, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert np.all(np.abs(levels - np.round(levels))[ours != ref] < 1e-2)


NO_COMFYUI = "COMFYUI_PATH (a ComfyUI checkout) is not set: CI cannot fetch it"


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason=NO_COMFYUI)
def test_comfyuis_own_previewers(taesd):
    """ComfyUI's Latent2RGBPreviewer with its Flux factors, and its TAESD with the .pth, on the
    same x0 as ours."""
    formats, taesd_module, previewers = comfyui("comfy.latent_formats", "comfy.taesd.taesd",
                                                "latent_preview")  # fmt: skip
    Flux, TAESD = formats.Flux, taesd_module.TAESD
    Latent2RGBPreviewer = previewers.Latent2RGBPreviewer
    TAESDPreviewerImpl = previewers.TAESDPreviewerImpl
    flux = Flux()
    assert flux.latent_rgb_factors == COMFY_FACTORS and flux.latent_rgb_factors_bias == COMFY_BIAS
    x0 = torch.randn(1, 16, 40, 56, generator=torch.Generator().manual_seed(4)) * 1.5
    theirs = Latent2RGBPreviewer(flux.latent_rgb_factors, flux.latent_rgb_factors_bias)
    ref = np.asarray(theirs.decode_latent_to_preview(x0))
    _, levels = comfy_latent2rgb(x0)
    assert_same_levels(np.asarray(latent2rgb(x0.numpy())), ref, levels)

    _, files = taesd
    model = TAESD(None, str(files["comfyui .pth"]), latent_channels=16)
    with torch.no_grad():
        ref = np.asarray(TAESDPreviewerImpl(model).decode_latent_to_preview(x0))
    _, weights = read_taef1(files["comfyui .pth"])
    decoder = load_strict(TAEF1Decoder(), weights, "taef1")
    ours = np.asarray(Previewer("taef1", decoder, size=1 << 20)(mx.array(x0.numpy())))
    assert ours.shape == ref.shape and np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours != ref).mean() < 1e-3
