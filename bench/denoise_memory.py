"""What the denoising activations add to the weights, per image size, at full width.

    python bench/denoise_memory.py --sizes 256,dvd --bits 8            # fp32 on this backend
    MLXFLUX_KERNELS=fused python bench/denoise_memory.py --precision bfloat16
    python bench/denoise_memory.py --sizes dvd --kontext   # + a Kontext reference's tokens

A FLUX.1-dev-wide transformer (3072, 24 heads) with --depth double and --single single blocks
and random weights runs the pipeline's own `denoise_step`. Because the pipeline evaluates after
every block, the activation peak of one block is the activation peak of the whole 57-block
model, so a few blocks measure what the full model adds on top of its weights. Each size runs in
a fresh process; the table gives the peak, the weights, and peak minus weights. --kontext
appends one reference's tokens, at the Kontext resolution of the size's aspect ratio (about
twice the image tokens), as FLUX.1 Kontext dev runs.
"""

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}
TXT = 256  # ComfyUI pads T5 to 256 tokens
GIB = 1 << 30

RUN = """
import json, sys, time
import mlx.core as mx
from mlx.utils import tree_flatten
from dataclasses import replace
from mlxflux.models.transformer import FLUX_DEV, FluxTransformer
from mlxflux.models.latents import image_ids, pack_latents
from mlxflux.pipeline import PRECISIONS, denoise_step
from mlxflux.quant import quantize

from mlxflux.variants.kontext import reference_size, reference_tokens

w, h, depth, single, bits, precision, kontext = sys.argv[1:8]
w, h, depth, single = int(w), int(h), int(depth), int(single)
dtype = PRECISIONS[precision]
model = FluxTransformer(replace(FLUX_DEV, depth=depth, depth_single_blocks=single))
params = []
for i, (k, p) in enumerate(tree_flatten(model.parameters())):  # uniform, variance 1/fan_in
    if p.ndim >= 2:
        bound = (3 / p.shape[-1]) ** 0.5
        p = mx.random.uniform(-bound, bound, p.shape, key=mx.random.key(i))
    params.append((k, p.astype(dtype)))
model.load_weights(params)
del params
if bits != "none":
    quantize(model, int(bits), model.kernels)
mx.eval(model.parameters())
cond = model.modulation(mx.array([0.7]), mx.random.normal((1, 768)).astype(dtype), mx.array([3.5]))
mx.eval(cond.arrays())
model.drop_modulation()
mx.eval(model.parameters())
mx.clear_cache()
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
txt = mx.random.normal((1, 256, 4096)).astype(dtype)
x = pack_latents(mx.random.normal((1, 16, h // 8, w // 8)))
extra = reference_tokens([])
if kontext == "1":
    rw, rh = reference_size(w, h, "kontext")
    extra = reference_tokens([mx.random.normal((1, 16, rh // 8, rw // 8))])
rope = model.rope(extra.ids_for(image_ids(h, w)), txt.shape[1])
mx.eval(txt, x, rope, extra.tokens if extra.tokens is not None else x)
base = mx.get_active_memory()
mx.reset_peak_memory()
t = time.perf_counter()
x = denoise_step(model, x, txt, cond, rope, 0.7, 0.5, extra=extra)
seconds = time.perf_counter() - t
print(json.dumps(dict(peak=mx.get_peak_memory(), base=base, weights=weights, seconds=seconds,
                      kernels=model.kernels.mode, device=str(mx.default_device()))))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,dvd", help=f"from {sorted(SIZES)}")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--single", type=int, default=1)
    p.add_argument("--bits", default="8", choices=["4", "6", "8", "none"])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kontext", action="store_true", help="with a Kontext reference's tokens")
    p.add_argument("--out", default="bench/results/denoise_memory")
    a = p.parse_args()
    rows = []
    for size in a.sizes.split(","):
        w, h = SIZES[size]
        args = [str(v) for v in (w, h, a.depth, a.single, a.bits, a.precision, int(a.kontext))]
        r = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        label = f"{size} + Kontext reference" if a.kontext else size
        row = {"size": label, **json.loads(r.stdout.strip().splitlines()[-1])}
        row["activations"] = row["peak"] - row["base"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]
    lines = [
        f"Denoise step at full width, {a.depth}+{a.single} blocks, {a.bits}-bit, {a.precision}, "
        f"kernels {first['kernels']} on {first['device']}; {platform.system()} "
        f"{platform.machine()}, {date.today().isoformat()}. GiB; activations = peak - what was "
        "resident before the step (weights, conditioning, inputs).",
        "",
        "| size | weights | peak | activations | over the first size | s/step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['weights'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
            f"{r['activations'] / GIB:.2f} | {(r['activations'] - first['activations']) / GIB:.2f}"
            f" | {r['seconds']:.1f} |"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
