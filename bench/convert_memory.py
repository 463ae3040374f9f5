"""Process memory of `mlxflux convert` on a synthetic ~3 GB full-width bf16 transformer file.

    python bench/convert_memory.py [--blocks 3] [--work /tmp/convert-bench]
    python bench/convert_memory.py --gguf --blocks 6     # a ~3 GB Q8_0 GGUF transformer

Writes a BFL-layout bf16 transformer (width 3072, FLUX.1-dev's blocks, fewer of them) plus the
smallest T5 / CLIP / VAE files whose widths agree with it, then runs `mlxflux convert` in a
child process for --bits 8 and none and reports its maximum resident set size. The goal: peak
memory follows the largest tensor and the shard size, not the file (under 1.5 GiB here).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MAKE = r"""
import sys, mlx.core as mx
from mlx.utils import tree_flatten
from mlxflux.models.transformer import FluxConfig, FluxTransformer
from mlxflux.models.t5 import T5Config, T5Encoder
from mlxflux.models.clip import CLIPConfig, CLIPTextModel
from mlxflux.models.autoencoder import AutoencoderConfig, AutoEncoder
out, blocks = sys.argv[1], int(sys.argv[2])

def save(model, path, prefix="", conv=False):
    params = {}
    for i, (k, v) in enumerate(tree_flatten(model.parameters())):
        a = (mx.random.normal(v.shape, key=mx.random.key(i)) * 0.02).astype(mx.bfloat16)
        if conv and a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)  # back to torch's [O, I, kh, kw]
        if conv and a.ndim == 2 and ".attn_1." in k:
            a = a[:, :, None, None]
        params[prefix + k] = a
    mx.save_safetensors(path, params)

flux = FluxTransformer(FluxConfig(depth=blocks, depth_single_blocks=blocks))
save(flux, f"{out}/flux.safetensors")
save(T5Encoder(T5Config(num_layers=1, d_ff=256, num_heads=64, d_kv=64)), f"{out}/t5.safetensors")
save(CLIPTextModel(CLIPConfig(num_hidden_layers=1)), f"{out}/clip.safetensors", "text_model.")
save(AutoEncoder(AutoencoderConfig(ch=32, num_res_blocks=1)), f"{out}/ae.safetensors", conv=True)
"""


# a GGUF transformer (Q8_0 matrices, F32 vectors) with the same shapes, written with gguf
MAKE_GGUF = r"""
import sys, gguf, numpy as np, mlx.core as mx
from gguf import quants, GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlxflux.models.transformer import FluxConfig, FluxTransformer
out, blocks = sys.argv[1], int(sys.argv[2])
flux = FluxTransformer(FluxConfig(depth=blocks, depth_single_blocks=blocks))
w = gguf.GGUFWriter(f"{out}/flux-Q8_0.gguf", "flux")
rng = np.random.default_rng(0)
for k, v in tree_flatten(flux.parameters()):
    a = (rng.standard_normal(v.shape, dtype=np.float32) * 0.02)
    if a.ndim == 2 and a.shape[1] % 32 == 0:
        q = quants.quantize(a, Q.Q8_0)
        w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
    else:
        w.add_tensor(k, a)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


# the convert command in-process, then its own peak resident set size in bytes (Linux: KiB)
MEASURE = """
import resource, sys
from mlxflux.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=3, help="double and single blocks each")
    p.add_argument("--work", default="/tmp/convert-bench")
    p.add_argument("--tokenizers", help="folder with vocab.json, merges.txt, spiece.model")
    p.add_argument("--gguf", action="store_true", help="convert a Q8_0 GGUF transformer")
    p.add_argument("--out", default=None, help="[default: bench/results/convert_memory(_gguf)]")
    a = p.parse_args()
    out_name = a.out or f"bench/results/convert_memory{'_gguf' if a.gguf else ''}"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "flux.safetensors").exists():
        subprocess.run([sys.executable, "-c", MAKE, str(work), str(a.blocks)], check=True)
    flux = work / "flux.safetensors"
    if a.gguf:
        flux = work / "flux-Q8_0.gguf"
        if not flux.exists():
            subprocess.run([sys.executable, "-c", MAKE_GGUF, str(work), str(a.blocks)], check=True)
    size = flux.stat().st_size
    tok = a.tokenizers
    if tok is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from make_random_model import tokenizer_files

        t = tokenizer_files(None)
        tok = work / "tokenizers"
        tok.mkdir(exist_ok=True)
        for src in (t.vocab, t.merges, t.spiece):
            (tok / src.name).write_bytes(src.read_bytes())
    rows = []
    for bits in ("8", "none"):
        out = work / f"model-{bits}"
        args = ["convert", "--flux", flux, "--t5", work / "t5.safetensors",
                "--clip", work / "clip.safetensors", "--ae", work / "ae.safetensors",
                "--tokenizers", tok, "--bits", bits, "--out", out, "--force"]  # fmt: skip
        start = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True
        )
        if r.returncode:
            raise SystemExit(r.stderr)
        rss = int(r.stdout.strip().splitlines()[-1])
        rows.append({"bits": bits, "transformer_file_bytes": size, "max_rss_bytes": rss,
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    Path(out_name).parent.mkdir(parents=True, exist_ok=True)
    Path(out_name).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
