"""Model folders with random weights, written as `convert` writes them: for trying mlxflux, for
the tests that need no reference implementation, and for memory and speed runs.

    small   tiny shapes (hidden 256, 2 + 2 blocks, T5 64 wide, CLIP 128 wide, VAE 32 channels):
            a few MB, written in about a second, a 256x256 cover in seconds on a laptop
    full    FLUX.1-dev's shapes (~18 GB at 8 bits), one tensor at a time
    wide    FLUX.1-dev's widths, 1 + 1 transformer blocks, 2-layer T5 and CLIP, the whole VAE

The pictures are noise-like patterns: the weights are random. The manifest's notes and the
`random` field say so, and `mlxflux info` shows them.
"""

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux.model_folder import write_model_folder
from mlxflux.models.autoencoder import AutoencoderConfig
from mlxflux.models.clip import CLIPConfig
from mlxflux.models.redux import ReduxConfig
from mlxflux.models.registry import COMPONENTS, build_model
from mlxflux.models.t5 import T5Config
from mlxflux.models.transformer import FLUX_DEV, FluxConfig
from mlxflux.variants import VARIANTS

from .tokenizer_files import TokenizerFiles, find_tokenizers

SIZES = {
    "small": {
        "transformer": FluxConfig(vec_in_dim=128, context_in_dim=64, hidden_size=256,
                                  num_heads=2, depth=2, depth_single_blocks=2),
        "t5": T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
        "clip": CLIPConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2),
        "vae": AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    },
    "full": {"transformer": FLUX_DEV, "t5": T5Config(), "clip": CLIPConfig(),
             "vae": AutoencoderConfig()},
    # FLUX.1-dev's widths with 1 + 1 blocks, 2-layer T5 and CLIP, the whole VAE: a step's cost
    # per block and the VAE's at real sizes, in ~1.5 GB (the benchmarks' "1+1 blocks" model)
    "wide": {"transformer": replace(FLUX_DEV, depth=1, depth_single_blocks=1),
             "t5": T5Config(num_layers=2), "clip": CLIPConfig(num_hidden_layers=2),
             "vae": AutoencoderConfig()},
}  # fmt: skip


def random_items(comp: str, config: dict, seed: int):
    """(key, tensor) for every parameter, drawn lazily one at a time: matrices uniform with
    variance 1/fan_in (uniform draws are ~3x cheaper than normal ones), norm scales of one,
    small biases."""
    model = build_model(comp, config)
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


# Redux's encoder per size: SigLIP so400m (full), or shrunk to the size's T5 width
REDUX = {"small": ReduxConfig(hidden_size=144, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, context_dim=64, redux_dim=192),
         "wide": ReduxConfig(num_hidden_layers=2), "full": ReduxConfig()}  # fmt: skip


def make_random_model(out, *, size: str = "small", variant: str = "dev", bits: int | None = 8,
                      dtype: str = "bfloat16", seed: int = 0, tokenizers=None,
                      redux: bool = False, log=print) -> Path:  # fmt: skip
    """Write a random-weight model folder at `out` (atomically, as `convert` does); `variant`
    sets the transformer's input width and guidance embedding as that variant has them.
    `tokenizers`: a folder with CLIP's vocab.json + merges.txt and T5's spiece.model (found
    as `convert` finds them when None). `redux`: with Redux's image encoder (the optional
    `redux` component), random too."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    v = VARIANTS[variant]
    configs = {c: cfg.to_dict() for c, cfg in SIZES[size].items()}
    configs["transformer"].update(in_channels=v.in_channels, guidance_embed=v.guided)
    if isinstance(tokenizers, TokenizerFiles):
        files = tokenizers
    else:
        files = find_tokenizers(tokenizers, [], {}, log=log)
    flux = configs["transformer"]
    note = (
        f"random weights, not a trained model: {size} shapes (transformer hidden "
        f"{flux['hidden_size']}, {flux['depth']}+{flux['depth_single_blocks']} blocks), "
        f"{v.title}'s inputs; made by mlxflux.convert.random_model, seed {seed}"
    )
    out = Path(out)
    components = {c: (configs[c], random_items(c, configs[c], seed + i))
                  for i, c in enumerate(COMPONENTS)}  # fmt: skip
    if redux:
        config = REDUX[size].to_dict()
        components["redux"] = (config, random_items("redux", config, seed + len(COMPONENTS)))
    write_model_folder(
        out,
        components,
        bits=bits, dtype=dtype, tokenizers=files, variant=variant, sources=[], notes=[note],
        extra={"random": {"size": size, "seed": seed}},
    )  # fmt: skip
    return out
