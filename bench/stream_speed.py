"""A denoising step streamed against resident, with the model's files out of the page cache.

    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8
    python bench/stream_speed.py --model /tmp/flux-random-q8 --size book --budget 4

Each run is a fresh process: the model folder's files are first dropped from the page cache
(`posix_fadvise(POSIX_FADV_DONTNEED)`, so reads really come from disk), then one image of
`--steps` steps is made resident and once with `--budget` GiB (streamed). Reports the denoise
stage's seconds per step, the bytes it read per step, the time blocks waited for their reads,
and the disk's cold sequential read speed measured on the largest weight file, so the figure
on a Mac SSD can be estimated from its bytes per step.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}

RUN = """
import json, resource, sys
import mlxflux
budget = None if sys.argv[4] == "none" else float(sys.argv[4])
pipe = mlxflux.load(sys.argv[1], memory_budget=budget if budget else 10**6)
job = pipe.prepare(mlxflux.GenerationRequest("A cinematic DVD cover", width=int(sys.argv[2]),
                                             height=int(sys.argv[3]), steps=int(sys.argv[5])))
list(job.run())
rep = job.report.to_dict()
rep["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(rep))
"""


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_read_speed(folder: Path) -> float:
    """Bytes per second reading the largest file of the folder from disk."""
    biggest = max((p for p in folder.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    drop_cache(biggest.parent)
    start = time.perf_counter()
    with open(biggest, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return biggest.stat().st_size / (time.perf_counter() - start)


def run(model: Path, w: int, h: int, budget: str, steps: int) -> dict:
    drop_cache(model)
    out = subprocess.run([sys.executable, "-c", RUN, str(model), str(w), str(h), budget,
                          str(steps)], capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--size", default="book", choices=sorted(SIZES))
    p.add_argument("--budget", default="4", help="GiB for the streamed run")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="bench/results/stream_speed")
    a = p.parse_args()
    w, h = SIZES[a.size]
    speed = cold_read_speed(a.model)
    rows = {}
    for name, budget in (("resident", "none"), ("streamed", a.budget)):
        rep = run(a.model, w, h, budget, a.steps)
        d = rep["stages"]["denoise"]
        rows[name] = {
            "plan": rep["plan"],
            "seconds_per_step": d["seconds"] / a.steps,
            "bytes_read_per_step": d["bytes_read"] / a.steps,
            "read_wait_seconds": d["read_wait_seconds"],
            "denoise_peak_bytes": d["peak_bytes"],
            "max_rss_bytes": rep["max_rss_bytes"],
        }
        print(name, json.dumps(rows[name]), flush=True)
    ratio = rows["streamed"]["seconds_per_step"] / rows["resident"]["seconds_per_step"]
    result = {"size": a.size, "budget_gib": a.budget, "disk_read_bytes_per_s": speed,
              "streamed_vs_resident": ratio, **rows}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    per_step = rows["streamed"]["bytes_read_per_step"]
    print(f"streamed / resident: {ratio:.3f}x; {per_step / 2**30:.2f} GiB read per step; disk "
          f"{speed / 2**30:.2f} GiB/s cold; at 3-7 GB/s (a Mac SSD) the reads take "
          f"{per_step / 7e9:.1f}-{per_step / 3e9:.1f} s per step")  # fmt: skip


if __name__ == "__main__":
    main()
