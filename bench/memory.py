"""Peak memory of each pipeline stage at full size, next to what diffusers' FluxPipeline needs.

    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8
    python bench/memory.py --model /tmp/flux-random-q8 --sizes 256,dvd
    python bench/make_random_model.py --out /tmp/kontext-random-q8 --bits 8 --variant kontext
    python bench/memory.py --model /tmp/kontext-random-q8 --sizes dvd --reference
    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8 --redux --force
    python bench/memory.py --model /tmp/flux-random-q8 --sizes dvd --redux 1 \
        --out bench/results/memory_redux

Each run is a fresh process running one job, `Pipeline.prepare` then `Job.run` (one step:
memory does not depend on the step count; --reference adds a Kontext reference, a picture at
the size's aspect ratio, scaled as ComfyUI's FluxKontextImageScale) and reading its per-stage
report: `peak_bytes`
is mx.get_peak_memory() after mx.reset_peak_memory() at the stage's start. diffusers' needs
are computed from its bf16 weights (FluxPipeline as documented: everything resident, or
enable_model_cpu_offload(), which moves one model at a time to the GPU); not measured here.
"""

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}
GIB = 1 << 30

# FLUX.1-dev parameter counts (bf16 = 2 bytes each): transformer, T5-XXL encoder, CLIP-L, VAE
DIFFUSERS_BF16 = {"transformer": 11.90e9, "t5": 4.76e9, "clip": 0.123e9, "vae": 0.084e9}

RUN = """
import json, resource, sys, mlx.core as mx
import numpy as np
from PIL import Image
import mlxflux
w, h = int(sys.argv[2]), int(sys.argv[3])
refs = []
if sys.argv[5] == "1" or sys.argv[6] != "0":  # a picture, not noise, at the output's aspect
    y, x = np.mgrid[0:h, 0:w]
    refs = [Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1)
                            .astype(np.uint8))]
pipe = mlxflux.load(sys.argv[1], memory_budget=None if sys.argv[4] == "auto" else sys.argv[4])
redux = refs[:1] * int(sys.argv[6])
if sys.argv[6] != "0":
    refs = []
job = pipe.prepare(mlxflux.GenerationRequest(
    "A cinematic DVD cover for the movie Interstellar.", width=w, height=h, steps=1,
    reference_images=refs, redux_images=redux))
list(job.run())
rep = job.report.to_dict()
rep["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(rep))
"""


def run(model: str, w: int, h: int, budget: str = "auto", reference: bool = False,
        redux: int = 0) -> dict:  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", RUN, model, str(w), str(h), budget, str(int(reference)),
         str(redux)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a make_random_model.py (or real) folder")
    p.add_argument("--sizes", default="256,book,vinyl,dvd")
    p.add_argument(
        "--memory-budget", default="auto", help="GiB or auto: stages that do not fit stream"
    )
    p.add_argument("--reference", action="store_true", help="Kontext models: with a reference")
    p.add_argument("--redux", type=int, default=0, help="this many Redux images (a folder with "
                   "Redux: make_random_model.py --redux)")  # fmt: skip
    p.add_argument("--out", default="bench/results/memory")
    a = p.parse_args()
    manifest = json.loads((Path(a.model) / "mlxflux.json").read_text())
    bits = manifest["quantization"]["bits"]
    rows = []
    for size in a.sizes.split(","):
        w, h = SIZES[size]
        rep = run(a.model, w, h, a.memory_budget, a.reference, a.redux)
        label = f"{size} + reference" if a.reference else size
        if a.redux:
            label += f" + {a.redux} Redux image{'s' * (a.redux > 1)}"
        rows.append({"size": label, "bits": bits, **rep})
        print(json.dumps(rows[-1]["stages"]), flush=True)
    weights = {k: v * 2 / GIB for k, v in DIFFUSERS_BF16.items()}
    resident = sum(weights.values())
    offload = max(weights.values())
    lines = [
        f"Peak memory per stage (GiB), FLUX.1-dev shapes ({manifest.get('variant', 'dev')}), "
        f"{bits or 'no'}-bit, budget {a.memory_budget}, "
        f"{platform.system()} {platform.machine()}, {date.today().isoformat()}.",
        "",
        "| size | vision | text | encode | modulation | denoise | decode | whole run | max RSS "
        "| plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        s = {k: v["peak_bytes"] / GIB for k, v in r["stages"].items()}
        enc = f"{s['encode']:.2f}" if "encode" in s else "-"
        vis = f"{s['vision']:.2f}" if "vision" in s else "-"
        lines.append(
            f"| {r['size']} | {vis} | {s['text']:.2f} | {enc} | {s['modulation']:.2f} | "
            f"{s['denoise']:.2f} | {s['decode']:.2f} | {r['peak_bytes'] / GIB:.2f} | "
            f"{r['max_rss_bytes'] / GIB:.2f} | {r.get('plan', '?')} |"
        )
    lines += [
        "",
        f"diffusers FluxPipeline, bf16 weights alone (computed): {resident:.1f} GiB resident; "
        f"with enable_model_cpu_offload() the GPU holds the largest model, the transformer, "
        f"{offload:.1f} GiB, plus activations.",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
