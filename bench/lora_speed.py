"""What a LoRA's side path costs per denoising step, against the same step without it.

    python bench/lora_speed.py --size book --ranks 16,64

A FLUX.1-dev-wide transformer (1 double + 1 single block, 8-bit, the compute dtype of this
backend) runs the pipeline's `denoise_step`; a LoRA of each rank is attached to every Linear
layer of the trunk (the most a LoRA file can touch) as `mlxflux.lora` attaches it.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxflux.models.latents import image_ids, pack_latents
from mlxflux.models.transformer import FLUX_DEV, FluxTransformer
from mlxflux.pipeline import PRECISIONS, denoise_step
from mlxflux.precision import precision_choice
from mlxflux.quant import quantize

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="book", choices=sorted(SIZES))
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", default="bench/results/lora_speed")
    a = p.parse_args()
    dtype = PRECISIONS[precision_choice()[0]]
    model = FluxTransformer(replace(FLUX_DEV, depth=1, depth_single_blocks=1))
    model.load_weights(
        [
            (k, (mx.random.normal(v.shape) * 0.02).astype(dtype))
            for k, v in tree_flatten(model.parameters())
        ]  # fmt: skip
    )
    quantize(model, 8, model.kernels)
    cond = model.modulation(mx.array([0.7]), mx.random.normal((1, 768)).astype(dtype),
                            mx.array([3.5]))  # fmt: skip
    mx.eval(model.parameters(), cond.arrays())
    w, h = SIZES[a.size]
    txt = mx.random.normal((1, 256, 4096)).astype(dtype)
    x = pack_latents(mx.random.normal((1, 16, h // 8, w // 8)))
    rope = model.rope(image_ids(h, w), 256)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    rows = []
    for rank in [0, *map(int, a.ranks.split(","))]:
        extra = 0
        for layer in layers:
            if rank:
                out_rows = layer.weight.shape[0]
                in_cols = layer.weight.shape[1] * 32 // layer.bits
                side = (mx.random.normal((rank, in_cols)) * 0.01,
                        mx.random.normal((out_rows, rank)) * 0.01)  # fmt: skip
                mx.eval(side)
                extra += sum(s.nbytes for s in side)
                object.__setattr__(layer, "lora", side)
            elif hasattr(layer, "lora"):
                object.__delattr__(layer, "lora")
        denoise_step(model, x, txt, cond, rope, 0.7, 0.6)  # warm-up
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            denoise_step(model, x, txt, cond, rope, 0.7, 0.6)
            times.append(time.perf_counter() - t)
        rows.append({"rank": rank, "seconds": statistics.median(times), "lora_bytes": extra})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_no_lora"] = r["seconds"] / base
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).with_suffix(".json").write_text(
        json.dumps({"size": a.size, "device": str(mx.default_device()), "rows": rows}, indent=1)
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
