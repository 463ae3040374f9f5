"""What step caching saves: a 20-step generation's denoising with each method at three
thresholds against none, side by side in one run (full width, 1 double + 1 single block, fp32,
random weights: the steps skipped are this model's, not FLUX.1-dev's).

    python bench/cache.py --size book                      # ~40 min here, OpenBLAS preloaded
    python bench/cache.py --size 256 --steps 20            # a quick look

Each run is the pipeline's own denoising (`pipeline.denoise_step` with a fresh cache per run,
ComfyUI's simple schedule at shift 1.15) from the same noise. For every step it records
whether the trunk ran and how long the step took, and gives the steps skipped, the wall time,
and what a computed and a skipped step cost. Writes --out.json and --out.md.
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux.cache import EasyCache, FirstBlock
from mlxflux.models.latents import image_ids, pack_latents
from mlxflux.models.transformer import FLUX_DEV, FluxTransformer
from mlxflux.noise import comfy_noise
from mlxflux.pipeline import denoise_step
from mlxflux.sampling import sigmas

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}
TXT = 256  # ComfyUI's T5 padding for a short prompt


def model(depth: int, single: int) -> FluxTransformer:
    """Full width, random weights (uniform, variance 1/fan_in), the modulation computed for
    every step and dropped, as the pipeline does."""
    m = FluxTransformer(replace(FLUX_DEV, depth=depth, depth_single_blocks=single))
    params = []
    for i, (k, p) in enumerate(tree_flatten(m.parameters())):
        if p.ndim >= 2:
            bound = (3 / p.shape[-1]) ** 0.5
            p = mx.random.uniform(-bound, bound, p.shape, key=mx.random.key(i))
        params.append((k, p))
    m.load_weights(params)
    mx.eval(m.parameters())
    return m


def run(m, cond, txt, rope, noise, sigma_list, cache) -> dict:
    x = pack_latents(mx.array(noise))
    times = []
    for i in range(len(sigma_list) - 1):
        start = time.perf_counter()
        x = denoise_step(m, x, txt, cond.rows(i, i + 1), rope, *sigma_list[i : i + 2],
                         cache=cache, step=i + 1)  # fmt: skip
        times.append(time.perf_counter() - start)
    skipped = set(cache.counts.skipped) if cache else set()
    computed = [t for i, t in enumerate(times, 1) if i not in skipped]
    skips = [t for i, t in enumerate(times, 1) if i in skipped]
    return {"skipped": sorted(skipped), "seconds": sum(times),
            "computed_step_s": statistics.median(computed) if computed else None,
            "skipped_step_s": statistics.median(skips) if skips else None}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="book", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--single", type=int, default=1)
    p.add_argument("--easycache", default="0.1,0.2,0.4", help="thresholds (ComfyUI's default 0.2)")
    p.add_argument(
        "--first-block",
        default="0.05,0.1,0.2",
        help="thresholds (diffusers' default 0.05; published figures 0.05-0.2)",
    )
    p.add_argument("--out", default="bench/results/cache")
    a = p.parse_args()
    w, h = SIZES[a.size]
    m = model(a.depth, a.single)
    sigma_list = sigmas("simple", a.steps, width=w, height=h, shift=1.15)
    pooled = mx.repeat(mx.random.normal((1, 768), key=mx.random.key(7)), a.steps, axis=0)
    cond = m.modulation(mx.array(sigma_list[:-1]), pooled, mx.full((a.steps,), 3.5))
    mx.eval(cond.arrays())
    m.drop_modulation()
    txt = mx.random.normal((1, TXT, 4096), key=mx.random.key(8))
    rope = m.rope(image_ids(h, w), TXT)
    noise = comfy_noise(42, (1, 16, h // 8, w // 8))
    runs = [("none", None)]
    runs += [("easycache", float(t)) for t in a.easycache.split(",")]
    runs += [("first-block", float(t)) for t in a.first_block.split(",")]
    rows = []
    for method, threshold in runs:
        if method == "easycache":
            cache = EasyCache(threshold, 0.15, 0.95, 1.15, h, w)
        elif method == "first-block":
            cache = FirstBlock(threshold)
        else:
            cache = None
        r = run(m, cond, txt, rope, noise, sigma_list, cache)
        rows.append({"method": method, "threshold": threshold, **r})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds"]
    lines = [
        f"Step caching, {a.steps} steps at {a.size} ({w}x{h}), full width, {a.depth} double + "
        f"{a.single} single blocks, fp32, random weights; {platform.machine()}, MLX on "
        f"{mx.default_device()}, {date.today().isoformat()}. A skipped step's cost relative to "
        "a computed one's in the last column.",
        "",
        "| method | threshold | skipped | denoise s | vs none | computed step s | skipped step s "
        "| skipped / computed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = (f"{r['skipped_step_s'] / r['computed_step_s']:.2%}"
                 if r["skipped_step_s"] is not None else "")  # fmt: skip
        skipped = f"{len(r['skipped'])}/{a.steps}"
        lines.append(
            f"| {r['method']} | {r['threshold'] if r['threshold'] is not None else ''} | "
            f"{skipped} | {r['seconds']:.1f} | {base / r['seconds']:.2f}x | "
            f"{r['computed_step_s']:.2f} | "
            + (f"{r['skipped_step_s']:.3f}" if r["skipped_step_s"] is not None else "")
            + f" | {ratio} |"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"size": a.size, "steps": a.steps,
                                                    "rows": rows}, indent=1))  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
