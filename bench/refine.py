"""What a FLUX refine of an upscaled cover costs: `mlxflux upscale --refine` (`mlxflux.refine`)
on the "wide" random model (FLUX.1-dev's widths, 1 + 1 transformer blocks, the whole VAE,
8-bit) in float32, per stage and per tile step, with the peak of each stage.

    python bench/refine.py --model /tmp/flux-wide --crop 1280x1024 --steps 2   # ~15 min here

A whole 2x or 4x DVD cover takes hours on this 2-core CPU (the VAE alone at 16 MP), so
`--crop WxH` refines a crop of the upscaled cover (1280x1024: two 1024x1024 tiles) and the
table gives what was measured (per tile step, the VAE per megapixel, the peaks) and, from
those, the whole cover's time at --full-steps per tile: tiles x steps x a tile step + the VAE
at the cover's megapixels. A real model has 19 + 38 blocks: its tile step is ~57/2 = 28x the
measured one on the same machine (one block pair's cost, scaled by block count).
Writes --out.json/.md (appends).

    python bench/make_random_model.py --wide --out /tmp/flux-wide     # ~1 min, ~1.5 GB
"""

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

import mlxflux
from mlxflux.refine import TILE, prepare_refine, tile_starts
from mlxflux.resolve import resolve

SIZES = {"book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}
PROMPT = "a DVD cover, a black hole with a golden accretion disk, film title at the top"


def cover(width: int, height: int) -> Image.Image:
    """A smooth picture, as an upscaled cover is (gradients and discs, not noise)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y),
                    ((x - 0.5) ** 2 + (y - 0.6) ** 2 < 0.05).astype(float)], -1)  # fmt: skip
    return Image.fromarray((rgb * 255).astype(np.uint8))


def tiles_of(width: int, height: int) -> int:
    th, tw = min(TILE, height) // 8, min(TILE, width) // 8
    return len(tile_starts(height // 8, th, th // 8)) * len(tile_starts(width // 8, tw, tw // 8))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bench/make_random_model.py --wide's folder")
    p.add_argument("--size", choices=SIZES, default="dvd")
    p.add_argument("--crop", default="1280x1024", help="WxH of the upscaled cover refined")
    p.add_argument("--steps", type=int, default=2, help="steps per tile in this run (at least "
                   "2 with one tile: a tile step is timed between two steps' ends)")  # fmt: skip
    p.add_argument("--full-steps", type=int, default=6, help="per tile in the estimate "
                   "(20 steps x denoise 0.3, the refine's default)")  # fmt: skip
    p.add_argument("--denoise", type=float, default=0.3)
    p.add_argument("--out", default="bench/results/refine")
    a = p.parse_args()
    w, h = (int(v) for v in a.crop.split("x"))
    pipe = mlxflux.load(a.model, "float32")
    request = resolve({"prompt": PROMPT, "seed": 42, "steps": a.steps, "denoise": a.denoise,
                       "init_image": Image.new("RGB", (64, 64))})  # fmt: skip
    refine = prepare_refine(pipe, cover(w, h), request, "cover-upscaled.png")
    ticks = []
    start = time.perf_counter()
    refine.run(lambda done, total: ticks.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    stages = refine.job.report.stages
    tile_step = float(np.median(np.diff(ticks)))  # between two tile steps' ends
    mp = w * h / 1e6
    vae_per_mp = (stages["encode"].seconds + stages["decode"].seconds) / mp
    cw, ch = SIZES[a.size]
    estimates = {}
    for factor in (2, 4):
        W, H = cw * factor, ch * factor
        n = tiles_of(W, H)
        estimates[f"{factor}x"] = {
            "size": f"{W}x{H}", "tiles": n, "tile_steps": n * a.full_steps,
            "minutes_1plus1": round((n * a.full_steps * tile_step + vae_per_mp * W * H / 1e6)
                                    / 60, 1),
        }  # fmt: skip
    row = {
        "crop": f"{w}x{h}", "tiles": len(refine.tiles), "steps": refine.steps,
        "seconds": round(seconds, 1), "tile_step_seconds": round(tile_step, 2),
        "vae_seconds_per_mp": round(vae_per_mp, 1),
        "stages": {k: {"seconds": round(v.seconds, 1), "peak_gib": round(v.peak_bytes / 2**30, 2)}
                   for k, v in stages.items()},
        "peak_gib": round(max(v.peak_bytes for v in stages.values()) / 2**30, 2),
        "estimates": estimates, "full_steps": a.full_steps, "size": a.size,
        "device": str(mx.default_device()), "machine": platform.machine(),
        "date": str(date.today()),
    }  # fmt: skip
    print(json.dumps(row, indent=1))
    out_json = Path(a.out + ".json")
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    rows.append(row)
    out_json.write_text(json.dumps(rows, indent=1))
    write_md(Path(a.out + ".md"), row)


def write_md(path: Path, r: dict) -> None:
    lines = [
        f"FLUX refine of an upscaled cover (`mlxflux upscale --refine {0.3}`), random 'wide' "
        f"model (FLUX.1-dev's widths, 1 + 1 blocks, whole VAE, 8-bit), float32, MLX on "
        f"{r['device']} ({r['machine']}); {r['date']}.",
        "",
        f"Measured: a {r['crop']} crop, {r['tiles']} tiles of 1024x1024 (overlap >= 128 px), "
        f"{r['steps']} steps each, {r['seconds']} s in all.",
        "",
        "| stage | seconds | peak GiB |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['seconds']} | {v['peak_gib']} |" for k, v in r["stages"].items()),
        "",
        f"A tile step: {r['tile_step_seconds']} s; the VAE (encode + decode): "
        f"{r['vae_seconds_per_mp']} s per megapixel.",
        "",
        f"Whole {r['size']} covers at {r['full_steps']} steps per tile (estimated from the "
        "above; the same 1+1-block model):",
        "",
        "| upscale | size | tiles | tile steps | minutes |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {k} | {v['size']} | {v['tiles']} | {v['tile_steps']} | {v['minutes_1plus1']} |"
          for k, v in r["estimates"].items()),
        "",
        "The peak stays that of one 1024x1024 generation whatever the cover's size: the tiles "
        "run one at a time and the VAE runs in row tiles.",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
