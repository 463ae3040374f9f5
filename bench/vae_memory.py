"""Peak memory of the FLUX VAE decoder at full size with random weights, tiled and untiled.

    python bench/vae_memory.py [--size 1024] [--dtype float32]

Prints mx.get_peak_memory() for the decode alone (weights included) and writes JSON.
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

from mlxflux.models.autoencoder import AutoEncoder, AutoencoderConfig, estimate_decode_bytes


def measure(size: int, dtype, tiled: bool) -> dict:
    ae = AutoEncoder(AutoencoderConfig())
    ae.encoder = nn.Module()  # decode only
    ae.set_dtype(dtype)
    mx.eval(ae.parameters())
    z = mx.random.normal((1, 16, size // 8, size // 8)).astype(dtype)
    mx.eval(z)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    img = ae.decode(z, tiled=tiled)
    mx.eval(img)
    seconds = time.perf_counter() - t
    peak = mx.get_peak_memory()
    return {
        "size": size,
        "dtype": str(dtype),
        "tiled": tiled,
        "peak_bytes": peak,
        "activations_peak_bytes": peak - base,
        "weights_bytes": base,
        "seconds": round(seconds, 2),
        "estimate_untiled_bytes": estimate_decode_bytes(size, size, ae.config, dtype.size),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", default="bench/results/vae_memory.json")
    a = p.parse_args()
    dtype = getattr(mx, a.dtype)
    rows = [measure(a.size, dtype, tiled) for tiled in (False, True)]
    print(f"| decode {a.size}x{a.size} {a.dtype} | peak GiB | activations GiB | seconds |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        gib = 1 << 30
        name = "tiled" if r["tiled"] else "untiled"
        print(
            f"| {name} | {r['peak_bytes'] / gib:.2f} | {r['activations_peak_bytes'] / gib:.2f} "
            f"| {r['seconds']} |"
        )
    import pathlib

    pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
