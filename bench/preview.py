"""What a live preview costs: a denoising step at a cover's size (full width, 1 double + 1
single block, fp32, random weights) side by side with each previewer on that step's x0.

    python bench/preview.py --size dvd                 # ~3 min here, OpenBLAS preloaded
    python bench/preview.py --size dvd --size-px 512   # taef1 at a GPU's preview size

Every step is the pipeline's own (`pipeline.denoise_step`, ComfyUI's simple schedule at shift
1.15); after it, x0 = x - sigma * v is previewed with latent2rgb and with taef1 (`Previewer`,
as `gen --preview` runs them), each also written as the PNG `--preview-file` rewrites. The
fraction is the preview's median time over the step's median time. Writes --out.json/.md.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import mlx.core as mx
from cache import SIZES, TXT, model  # bench/cache.py: the same full-width random model

from mlxflux.models.latents import image_ids, pack_latents, unpack_latents
from mlxflux.models.taef1 import TAEF1Decoder
from mlxflux.noise import comfy_noise
from mlxflux.pipeline import denoise_step
from mlxflux.png import replace_png
from mlxflux.preview import Previewer, preview_size
from mlxflux.sampling import sigmas


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="dvd", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size-px", type=int, default=None,
                   help="taef1's preview long side [default: this backend's]")  # fmt: skip
    p.add_argument("--out", default="bench/results/preview")
    args = p.parse_args()
    width, height = SIZES[args.size]
    m = model(1, 1)
    decoder = TAEF1Decoder()
    mx.eval(decoder.parameters())
    size = args.size_px or preview_size()
    previewers = {"latent2rgb": Previewer("latent2rgb"),
                  "taef1": Previewer("taef1", decoder, size=size)}  # fmt: skip
    sigma_list = sigmas("simple", args.steps, width=width, height=height, shift=1.15)
    noise = comfy_noise(42, (1, 16, height // 8, width // 8))
    pooled = mx.repeat(mx.random.normal((1, 768), key=mx.random.key(7)), args.steps, axis=0)
    cond = m.modulation(mx.array(sigma_list[:-1]), pooled, mx.full((args.steps,), 3.5))
    mx.eval(cond.arrays())
    m.drop_modulation()
    txt = mx.random.normal((1, TXT, 4096), key=mx.random.key(8))
    rope = m.rope(image_ids(height, width), TXT)
    x = pack_latents(mx.array(noise))
    steps, costs = [], {name: {"preview": [], "png": []} for name in previewers}
    shape = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.steps):
            sigma, row = sigma_list[i], cond.rows(i, i + 1)
            step_s, (x_next, v) = timed(lambda x=x, row=row, i=i: denoise_step(
                m, x, txt, row, rope, sigma_list[i], sigma_list[i + 1],
                with_velocity=True))  # fmt: skip
            steps.append(step_s)
            for name, previewer in previewers.items():

                def preview(previewer=previewer, x=x, v=v, sigma=sigma):
                    x0 = unpack_latents(x - v.astype(mx.float32) * sigma, height, width)
                    return previewer(x0)

                seconds, picture = timed(preview)
                shape = shape or {}
                shape[name] = picture.size
                png_s, _ = timed(lambda picture=picture: replace_png(picture, f"{tmp}/p.png"))
                costs[name]["preview"].append(seconds)
                costs[name]["png"].append(png_s)
                print(f"step {i + 1}: {step_s:.2f} s; {name} {seconds:.3f} s + png {png_s:.3f} s")
            x = x_next
    # the first step warms every path up (MLX's kernels, BLAS threads): left out of the medians
    step = statistics.median(steps[1:])
    rows = []
    for name, c in costs.items():
        preview = statistics.median(c["preview"][1:])
        png = statistics.median(c["png"][1:])
        rows.append({"method": name, "preview_size": list(shape[name]), "preview_s": preview,
                     "png_s": png, "fraction": preview / step,
                     "fraction_with_png": (preview + png) / step})  # fmt: skip
    result = {"size": args.size, "width": width, "height": height, "steps": args.steps,
              "step_s": step, "taef1_size_px": size, "device": str(mx.default_device()),
              "machine": platform.machine(), "date": str(date.today()), "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Preview cost at the {args.size} size ({width}x{height}), full width, 1 double + 1 "
        f"single block, fp32, random weights; {platform.machine()}, MLX on "
        f"{mx.default_device()}, {date.today()}. Medians over steps 2-{args.steps}; a step "
        f"without a preview takes {step:.2f} s. taef1 decodes at a long side of {size} px.",
        "",
        "| preview | picture | preview s | + PNG write s | of a step | with the PNG |",
        "| --- | --- | --- | --- | --- | --- |",
        "| none | | 0 | 0 | 0% | 0% |",
    ]
    for r in rows:
        w, h = r["preview_size"]
        share = f"{100 * r['fraction']:.2f}% | {100 * r['fraction_with_png']:.2f}%"
        lines.append(f"| {r['method']} | {w}x{h} | {r['preview_s']:.3f} | {r['png_s']:.3f} | "
                     f"{share} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
