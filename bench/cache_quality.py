"""What step caching does to the pictures, measured on your own model: each method at a few
thresholds against the uncached picture, same seed and settings.

    python bench/cache_quality.py --model ~/.cache/mlxflux/models/flux1-dev-q8 --preset dvd \
        --seeds 1,2,3 --out cache-quality

For every seed the uncached picture is made once, then each cached one. Reports, per method and
threshold: steps skipped, seconds, the mean difference in levels of 255 and the SSIM (grey,
Gaussian window 11, sigma 1.5, as Wang et al. 2004) against the uncached picture, averaged over
the seeds; keeps every PNG (with its settings) under --out for a look. Random weights give
meaningless numbers here: this needs a real FLUX.1 model.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import mlxflux
from mlxflux.png import save_png
from mlxflux.resolve import resolve


def _gauss(sigma: float = 1.5, size: int = 11) -> np.ndarray:
    t = np.arange(size) - size // 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    r = len(k) // 2
    x = np.pad(x, r, mode="reflect")
    x = sum(k[i] * x[:, i : i + x.shape[1] - 2 * r] for i in range(len(k)))
    return sum(k[i] * x[i : i + x.shape[0] - 2 * r] for i in range(len(k)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two RGB uint8 pictures, on their grey levels."""
    grey = np.array([0.299, 0.587, 0.114])
    x, y = (np.asarray(p, np.float64) @ grey for p in (a, b))
    k, c1, c2 = _gauss(), (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _blur(x, k), _blur(y, k)
    sxx, syy, sxy = _blur(x * x, k) - mx**2, _blur(y * y, k) - my**2, _blur(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--preset", default="dvd")
    p.add_argument("--prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--easycache", default="0.1,0.2,0.3")
    p.add_argument("--first-block", default="0.05,0.1,0.2")
    p.add_argument("--out", default="cache-quality")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = mlxflux.load(a.model)
    runs = [("easycache", float(t)) for t in a.easycache.split(",")]
    runs += [("first-block", float(t)) for t in a.first_block.split(",")]
    results = {run: [] for run in runs}
    base_seconds = []
    for seed in (int(s) for s in a.seeds.split(",")):
        given = {"prompt": a.prompt, "steps": a.steps, "seed": seed}

        def draw(name: str, given=given, seed=seed, **cache):
            request = resolve({**given, **cache}, preset=a.preset)
            job = pipe.prepare(request)
            start = time.perf_counter()
            ((_, image),) = job.run()
            seconds = time.perf_counter() - start
            save_png(image, out / f"{name}-{seed}.png", dict(job.report.settings, seed=seed))
            return np.asarray(image), seconds, job.report.cache["steps_skipped"]

        base, seconds, _ = draw("none")
        base_seconds.append(seconds)
        for method, threshold in runs:
            image, seconds, skipped = draw(f"{method}-{threshold:g}", cache=method,
                                           cache_threshold=threshold)  # fmt: skip
            diff = float(np.abs(image.astype(int) - base.astype(int)).mean())
            results[(method, threshold)].append((skipped, seconds, diff, ssim(image, base)))
            print(f"seed {seed} {method} {threshold:g}: skipped {skipped}, {seconds:.0f} s, "
                  f"mean {diff:.2f} levels, SSIM {ssim(image, base):.4f}", flush=True)  # fmt: skip
    lines = [f"Step caching against the uncached picture ({a.model}, preset {a.preset}, seeds "
             f"{a.seeds}; uncached {statistics.mean(base_seconds):.0f} s a picture)", "",
             "| method | threshold | skipped | seconds | mean levels | SSIM |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    rows = []
    for (method, threshold), r in results.items():
        skipped, seconds, diff, s = (statistics.mean(v) for v in zip(*r, strict=True))
        rows.append({"method": method, "threshold": threshold, "skipped": skipped,
                     "seconds": seconds, "mean_levels": diff, "ssim": s})  # fmt: skip
        lines.append(f"| {method} | {threshold:g} | {skipped:.1f} | {seconds:.0f} | {diff:.2f} "
                     f"| {s:.4f} |")  # fmt: skip
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
