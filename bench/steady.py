"""Many generations in one process: does memory hold steady? (issue 25)

    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8
    python bench/steady.py --model /tmp/flux-random-q8 --count 50 --size 256

After each generation (one step each: memory does not depend on the step count) it records
MLX's active memory (should return to where the first generation left it) and the process's
resident set (should stay flat once allocator caches and compiled kernels settle), and prints
each and the largest drift. tests/test_reliability.py runs the same check on a tiny model.
"""

import argparse
import gc
import json
import os

import mlx.core as mx

import mlxflux

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--size", default="256", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", help="write the per-generation figures as JSON here")
    a = p.parse_args()
    w, h = SIZES[a.size]
    pipe = mlxflux.load(a.model)
    rows = []
    for i in range(a.count):
        pipe.generate("A cinematic DVD cover", width=w, height=h, steps=a.steps, seed=i)
        gc.collect()
        rows.append({"active": mx.get_active_memory(), "rss": rss_bytes()})
        print(f"{i + 1:3d}: active {rows[-1]['active'] / 2**20:9.2f} MiB, "
              f"RSS {rows[-1]['rss'] / 2**20:9.1f} MiB", flush=True)  # fmt: skip
    first = rows[0]["active"]
    drift = max(abs(r["active"] - first) for r in rows)
    settle = min(9, len(rows) - 1)
    grown = rows[-1]["rss"] - rows[settle]["rss"]
    print(f"active memory: largest drift from the first {drift / 2**20:.2f} MiB "
          f"({drift / max(first, 1):.2%}); RSS from generation {settle + 1} to {len(rows)}: "
          f"{grown / 2**20:+.1f} MiB")  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"size": a.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
