"""What a model upscale costs: time and peak memory of `mlxflux.upscale` on a cover, with
full-size random-weight models of the two architectures (RealESRGAN_x4plus's RRDBNet: 64
filters, 23 blocks; realesr-general-x4v3's SRVGGNetCompact: 64 filters, 32 convolutions), in
ComfyUI's tiles (512, overlap 32).

    python bench/upscale.py --size dvd --arch compact            # ~1 min here, OpenBLAS
    python bench/upscale.py --size dvd --arch rrdb --crop 256    # RRDBNet on a 256 px crop

`--scale 2` runs the x4 model and resizes with Lanczos, as ComfyUI's ImageScaleBy. `--crop N`
upscales an N x N crop of the cover (RRDBNet at the full DVD size takes ~13 min on this 2-core
CPU); the time per input megapixel is reported either way. Writes --out.json/.md (appends).
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from PIL import Image

import mlxflux
from mlxflux.upscaling import load_upscaler

SIZES = {"book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}


def random_model(arch: str, folder: Path) -> Path:
    """A full-size model file in the layout the released files use, random weights."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    if arch == "rrdb":  # Real-ESRGAN names

        def conv(name, cin, cout):
            sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.02
            sd[f"{name}.bias"] = torch.zeros(cout)

        conv("conv_first", 3, 64)
        for b in range(23):
            for r in range(1, 4):
                for c in range(1, 6):
                    conv(f"body.{b}.rdb{r}.conv{c}", 64 + 32 * (c - 1), 32 if c < 5 else 64)
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            conv(name, 64, 64)
        conv("conv_last", 64, 3)
    else:  # realesr-general-x4v3
        layers = [(3, 64)] + [(64, 64)] * 32
        for i, (cin, cout) in enumerate(layers):
            sd[f"body.{2 * i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.02
            sd[f"body.{2 * i}.bias"] = torch.zeros(cout)
            sd[f"body.{2 * i + 1}.weight"] = torch.full((cout,), 0.25)
        sd[f"body.{2 * len(layers)}.weight"] = torch.randn(48, 64, 3, 3, generator=g) * 0.02
        sd[f"body.{2 * len(layers)}.bias"] = torch.zeros(48)
    path = folder / f"{arch}-x4.pth"
    torch.save(sd, path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="dvd")
    p.add_argument("--arch", choices=["compact", "rrdb"], default="compact")
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--out", default="bench/results/upscale")
    a = p.parse_args()
    w, h = SIZES[a.size]
    if a.crop:
        w = h = a.crop
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        model = load_upscaler(random_model(a.arch, Path(tmp)))
        mx.eval(model.net.parameters())
        mx.reset_peak_memory()
        start = time.perf_counter()
        out = mlxflux.upscale(image, model, a.scale)
        seconds = time.perf_counter() - start
    row = {"size": a.size, "input": f"{w}x{h}", "output": f"{out.width}x{out.height}",
           "architecture": model.architecture, "scale": a.scale or model.scale,
           "seconds": round(seconds, 1), "seconds_per_input_mp": round(seconds / (w * h / 1e6), 1),
           "peak_gib": round(mx.get_peak_memory() / 2**30, 2),
           "device": str(mx.default_device()), "machine": platform.machine(),
           "date": str(date.today())}  # fmt: skip
    print(json.dumps(row))
    out_json = Path(a.out + ".json")
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    rows.append(row)
    out_json.write_text(json.dumps(rows, indent=1))
    lines = [
        "| model | input | output | seconds | s per input MP | peak GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['architecture']} {r['scale']:g}x | {r['input']} | {r['output']} | "
        f"{r['seconds']} | {r['seconds_per_input_mp']} | {r['peak_gib']} |"
        for r in rows
    ]
    Path(a.out + ".md").write_text(
        f"Model upscale, random full-size weights, MLX on {row['device']} ({row['machine']}), "
        f"ComfyUI's tiles (512, overlap 32); {row['date']}.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
