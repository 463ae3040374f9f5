"""Draw the benchmark results as PNG charts (matplotlib, a bench-only dependency).

    python bench/plot.py [--results bench/results]

Reads speed.json and memory.json where present and writes speed.png / memory.png beside them.
"""

import argparse
import json
from pathlib import Path


def plot_speed(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["rows"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r["median_s"] for r in rows if r["size"] == s and r["impl"] == impl), 0)
                for s in sizes]  # fmt: skip
        ax.bar([x + i * width for x in range(len(sizes))], vals, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(sizes))], sizes)
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"{data['meta']['config']}\n{data['meta']['machine']}, {data['meta']['date']}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_memory(rows: list, out: Path) -> None:
    import matplotlib.pyplot as plt

    stages = ["text", "modulation", "denoise", "decode"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(stages)
    for i, st in enumerate(stages):
        vals = [r["stages"][st]["peak_bytes"] / 2**30 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=st)
    ax.axhline(10, color="red", linestyle="--", label="10 GiB (16 GB Mac GPU working set)")
    ax.set_xticks([x + width * 1.5 for x in range(len(rows))], [r["size"] for r in rows])
    ax.set_ylabel("peak GiB per stage")
    ax.set_title(f"FLUX.1-dev shapes, {rows[0]['bits']}-bit")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="bench/results")
    a = p.parse_args()
    res = Path(a.results)
    if (res / "speed.json").exists():
        plot_speed(json.loads((res / "speed.json").read_text()), res / "speed.png")
        print(res / "speed.png")
    if (res / "memory.json").exists():
        plot_memory(json.loads((res / "memory.json").read_text()), res / "memory.png")
        print(res / "memory.png")


if __name__ == "__main__":
    main()
