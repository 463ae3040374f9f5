"""Model upscaling (`mlxflux.upscaling`) against spandrel, the loader ComfyUI runs upscale models
with: ESRGAN old-arch (4x-UltraSharp's layout), Real-ESRGAN x4plus and x2plus (pixel unshuffle)
new-arch, BSRGAN names, SRVGGNetCompact; random weights, the same file read by both. Tiles
against `comfy.utils.tiled_scale`'s formula (ported here, or ComfyUI's own with COMFYUI_PATH).
Files: .pth (read without its pickle running) and .safetensors; others refused in one line.

spandrel imports every architecture it knows, and two of them import torchvision, which does
not install beside the pinned CPU torch: a stand-in module lets spandrel import; the two
architectures that would use it are never loaded here."""

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlxflux.upscaling import UpscaleError, load_upscaler, tiled, upscale

from .helpers import comfyui, torchvision_stand_in

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def spandrel():
    torchvision_stand_in()
    import spandrel

    return spandrel


def randomized(net: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan**0.5 * (0.5 if p.ndim > 1 else 0.1))
    return {k: v.clone() for k, v in net.state_dict().items()}


def esrgan_old(spandrel, seed, scale=4, nb=2, nf=16):
    from spandrel.architectures.ESRGAN import ESRGAN

    return randomized(ESRGAN(in_nc=3, out_nc=3, num_filters=nf, num_blocks=nb, scale=scale), seed)


def to_new(old: dict, nb: int, bsrgan=False) -> dict:
    """An old-arch state dict in Real-ESRGAN's (or BSRGAN's) names, as those files hold."""
    new = {}
    for k, v in old.items():
        parts = k.split(".")
        if k.startswith("model.1.sub.") and "RDB" in k:
            i, r, c = parts[3], parts[4][3], parts[5][4]
            name = f"RRDB_trunk.{i}.RDB{r}.conv{c}" if bsrgan else f"body.{i}.rdb{r}.conv{c}"
            new[f"{name}.{parts[-1]}"] = v
        elif k.startswith(f"model.1.sub.{nb}."):
            new[("trunk_conv." if bsrgan else "conv_body.") + parts[-1]] = v
        elif k.startswith("model.0."):
            new["conv_first." + parts[-1]] = v
    seq = sorted({int(k.split(".")[1]) for k in old})
    last = seq[-1]
    for k, v in old.items():
        i = int(k.split(".")[1])
        if i == last:
            new["conv_last." + k.split(".")[-1]] = v
        elif i == last - 2:
            new[("HRconv." if bsrgan else "conv_hr.") + k.split(".")[-1]] = v
        elif i >= 3 and i % 3 == 0:
            new[f"{'upconv' if bsrgan else 'conv_up'}{i // 3}.{k.split('.')[-1]}"] = v
    return new


def compact(spandrel, seed, scale=4):
    from spandrel.architectures.Compact import Compact

    return randomized(Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=scale),
                      seed)  # fmt: skip


def spandrel_run(spandrel, sd: dict, x: np.ndarray) -> np.ndarray:
    model = spandrel.ModelLoader().load_from_state_dict(sd).model.eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x).permute(2, 0, 1)[None])
    return y[0].permute(1, 2, 0).numpy()


def picture(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


CASES = {
    "esrgan-old-x4": lambda s: esrgan_old(s, 1),
    "esrgan-old-x2": lambda s: esrgan_old(s, 2, scale=2),
    "realesrgan-x4plus": lambda s: to_new(esrgan_old(s, 3), 2),
    "bsrgan": lambda s: to_new(esrgan_old(s, 4), 2, bsrgan=True),
    "compact-x4": lambda s: compact(s, 5),
    "compact-x2": lambda s: compact(s, 6, scale=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_each_architecture_matches_spandrel(spandrel, tmp_path, case, fmt):
    from safetensors.torch import save_file

    sd = CASES[case](spandrel)
    path = tmp_path / f"{case}.{fmt}"
    torch.save(sd, path) if fmt == "pth" else save_file(sd, str(path))
    ours = load_upscaler(path)
    x = picture(21, 34)
    want = spandrel_run(spandrel, sd, x)
    got = np.array(ours(mx.array(x)[None])[0])
    assert got.shape == want.shape and ours.scale == want.shape[0] // 21
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), case


def test_realesrgan_x2plus_unshuffles_its_input(spandrel, tmp_path):
    """x2plus: an x4 RRDBNet on the pixel-unshuffled picture (12 input channels), its odd edge
    padded by reflection first, as spandrel does; saved under params_ema as Real-ESRGAN does."""
    from spandrel.architectures.ESRGAN import ESRGAN

    net = ESRGAN(in_nc=12, out_nc=3, num_filters=16, num_blocks=2, scale=4, shuffle_factor=2)
    sd = to_new(randomized(net, 8), 2)
    torch.save({"params_ema": sd}, tmp_path / "RealESRGAN_x2plus.pth")
    ours = load_upscaler(tmp_path / "RealESRGAN_x2plus.pth")
    assert ours.scale == 2
    x = picture(21, 33)
    want = spandrel_run(spandrel, sd, x)
    got = np.array(ours(mx.array(x)[None])[0])
    assert got.shape == want.shape == (42, 66, 3)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def comfy_tiled_scale(x: np.ndarray, fn, scale, tile, overlap) -> np.ndarray:
    """`comfy.utils.tiled_scale` on one [H, W, C] picture: ComfyUI's own with COMFYUI_PATH,
    else its formula ported (positions, the narrowed tile, the feathered mask, out / out_div)."""
    t = torch.from_numpy(x).permute(2, 0, 1)[None]

    def torch_fn(a):
        return torch.from_numpy(fn(a[0].permute(1, 2, 0).numpy())).permute(2, 0, 1)[None]

    if os.environ.get("COMFYUI_PATH"):
        (utils,) = comfyui("comfy.utils")
        out = utils.tiled_scale(t, torch_fn, tile_x=tile, tile_y=tile, overlap=overlap,
                                upscale_amount=scale)  # fmt: skip
        return out[0].permute(1, 2, 0).numpy()
    _, _, h, w = t.shape
    out = torch.zeros(1, 3, h * scale, w * scale)
    div = torch.zeros_like(out)
    positions = [range(0, n - overlap, tile - overlap) if n > tile else [0] for n in (h, w)]
    for y0 in positions[0]:
        for x0 in positions[1]:
            y, xx = max(0, min(h - overlap, y0)), max(0, min(w - overlap, x0))
            part = t[:, :, y : y + min(tile, h - y), xx : xx + min(tile, w - xx)]
            ps = torch_fn(part)
            mask = torch.ones_like(ps)
            feather = round(overlap * scale)
            for d in (2, 3):
                if feather >= mask.shape[d]:
                    continue
                for i in range(feather):
                    a = (i + 1) / feather
                    mask.narrow(d, i, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - i, 1).mul_(a)
            o = out[
                :, :, y * scale : y * scale + ps.shape[2], xx * scale : xx * scale + ps.shape[3]
            ]
            o += ps * mask
            div[:, :, y * scale : y * scale + ps.shape[2],
                xx * scale : xx * scale + ps.shape[3]] += mask  # fmt: skip
    return (out / div)[0].permute(1, 2, 0).numpy()


def test_tiles_blend_as_comfyuis_tiled_scale(spandrel, tmp_path):
    sd = CASES["compact-x2"](spandrel)
    torch.save(sd, tmp_path / "c.pth")
    model = load_upscaler(tmp_path / "c.pth")

    def fn(a):
        return np.array(model(mx.array(a)[None])[0])

    x = picture(70, 95, seed=3)
    want = comfy_tiled_scale(x, fn, 2, tile=32, overlap=8)
    seen = []
    got = tiled(x, fn, 2, tile=32, overlap=8, on_tile=lambda d, n: seen.append((d, n)))
    assert np.abs(got - want).max() <= 1e-5
    assert seen[-1][0] == seen[-1][1] > 4  # many tiles, each reported
    whole = fn(x)  # a model that fits: the blend stays close to the untiled picture
    assert np.abs(got - whole).mean() <= 0.02


def test_upscale_a_picture_and_resize_below_the_models_factor(spandrel, tmp_path):
    sd = CASES["compact-x4"](spandrel)
    torch.save(sd, tmp_path / "4x.pth")
    image = Image.fromarray((picture(30, 20) * 255).astype(np.uint8))
    big = upscale(image, tmp_path / "4x.pth")
    assert big.size == (80, 120)
    want = np.clip(spandrel_run(spandrel, sd, np.asarray(image, np.float32) / 255), 0, 1)
    assert np.abs(np.asarray(big, np.int32) - (want * 255).astype(np.int32)).max() <= 1
    assert upscale(image, tmp_path / "4x.pth", scale=2.5).size == (50, 75)
    with pytest.raises(UpscaleError, match="upscales by 4; give at most 4"):
        upscale(image, tmp_path / "4x.pth", scale=8)


def test_other_files_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.ones(4, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UpscaleError, match="not an ESRGAN/RRDBNet or SRVGGNetCompact upscaler"):
        load_upscaler(tmp_path / "vae.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UpscaleError, match="evil.pth"):
        load_upscaler(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()  # the pickle never ran
    data = (tmp_path / "evil.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UpscaleError, match="cut.pth"):
        load_upscaler(tmp_path / "cut.pth")
    with pytest.raises(UpscaleError, match="no such file"):
        load_upscaler(tmp_path / "none.pth")


def test_the_cli_writes_a_recorded_png_with_comfyuis_graph(spandrel, tmp_path):
    import json

    from .helpers import run_cli

    sd = CASES["realesrgan-x4plus"](spandrel)
    torch.save({"params_ema": sd}, tmp_path / "RealESRGAN_x4plus.pth")
    cover = tmp_path / "dvd.png"
    Image.fromarray((picture(40, 28, seed=9) * 255).astype(np.uint8)).save(cover)
    r = run_cli("upscale", cover, "--model", tmp_path / "RealESRGAN_x4plus.pth", "--scale", 3,
                "--tile", 128, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert out.name == "dvd-upscaled-3x.png" and "dvd.png: 100%" in r.stderr
    png = Image.open(tmp_path / out)
    assert png.size == (84, 120)
    meta = json.loads(png.text["mlxflux"])
    assert meta["upscale_model"] == "RealESRGAN_x4plus.pth" and meta["scale"] == 3
    assert meta["model_scale"] == 4 and len(meta["upscale_model_sha256"]) == 64
    graph = json.loads(png.text["prompt"])
    kinds = {n["class_type"] for n in graph.values()}
    assert {"UpscaleModelLoader", "ImageUpscaleWithModel", "ImageScaleBy", "SaveImage"} <= kinds
    scale_by = next(n for n in graph.values() if n["class_type"] == "ImageScaleBy")
    assert scale_by["inputs"]["scale_by"] == 0.75
    again = run_cli("upscale", cover, "--model", tmp_path / "RealESRGAN_x4plus.pth", "--scale", 3,
                    cwd=tmp_path)  # fmt: skip
    assert Path(again.stdout.strip()).name == "dvd-upscaled-3x-1.png"  # never replaced
    bad = run_cli("upscale", cover, "--model", cover, cwd=tmp_path)
    assert bad.returncode != 0 and "--model: " in bad.stderr.strip().splitlines()[-1]
