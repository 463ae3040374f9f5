"""Component configs from what a checkpoint carries: a diffusers config.json, or tensor shapes."""

from mlxflux.errors import MlxfluxError
from mlxflux.models.autoencoder import AutoencoderConfig
from mlxflux.models.clip import CLIPConfig
from mlxflux.models.t5 import T5Config
from mlxflux.models.transformer import FluxConfig

# RoPE axes are not stored anywhere; FLUX.1 uses these for head dim 128 (docs/numerics.md).
KNOWN_AXES = {128: (16, 56, 56)}


class ConfigError(MlxfluxError, ValueError):
    pass


def flux_config_from_diffusers(d: dict) -> FluxConfig:
    """diffusers `FluxTransformer2DModel` config.json -> FluxConfig."""
    if d.get("patch_size", 1) != 1:
        raise ConfigError(f"patch_size {d['patch_size']} is not supported (FLUX uses 1)")
    heads, head_dim = d.get("num_attention_heads", 24), d.get("attention_head_dim", 128)
    return FluxConfig(
        in_channels=d.get("in_channels", 64),
        vec_in_dim=d.get("pooled_projection_dim", 768),
        context_in_dim=d.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=d.get("num_layers", 19),
        depth_single_blocks=d.get("num_single_layers", 38),
        axes_dim=tuple(d.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(d.get("guidance_embeds", False)),
        # Canny/Depth/Fill take wider inputs than they give back (diffusers writes null when equal)
        out_channels=d.get("out_channels") or d.get("in_channels", 64),
    )


def _count(shapes: dict, prefix: str) -> int:
    depth = prefix.count(".")  # the index follows the prefix
    idx = {int(k.split(".")[depth]) for k in shapes if k.startswith(prefix)}
    if idx != set(range(len(idx))):
        raise ConfigError(f"{prefix} block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def flux_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None
) -> FluxConfig:
    """Infer FluxConfig from BFL-named tensor shapes (hidden from img_in, heads from QK-norm)."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        out_channels = shapes["final_layer.linear.weight"][0]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        vec_in_dim = shapes["vector_in.in_layer.weight"][1]
        context_in_dim = shapes["txt_in.weight"][1]
    except KeyError as e:
        raise ConfigError(f"not a FLUX transformer: no tensor {e.args[0]}") from None
    if axes_dim is None:
        if head_dim not in KNOWN_AXES:
            raise ConfigError(
                f"cannot infer the RoPE axes for head dim {head_dim}: pass axes_dim explicitly"
            )
        axes_dim = KNOWN_AXES[head_dim]
    return FluxConfig(
        in_channels=in_channels,
        vec_in_dim=vec_in_dim,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=_count(shapes, "double_blocks."),
        depth_single_blocks=_count(shapes, "single_blocks."),
        axes_dim=tuple(axes_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
        out_channels=out_channels,
    )


def t5_config(shapes: dict, config: dict | None) -> T5Config:
    if config:
        return T5Config.from_hf(config)
    try:
        vocab, d_model = shapes["shared.weight"]
        buckets, heads = shapes[
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except KeyError as e:
        raise ConfigError(f"not a T5 v1.1 encoder: no tensor {e.args[0]}") from None
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=_count(shapes, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


CLIP_HEAD_DIM = 64


def clip_config(shapes: dict, config: dict | None) -> CLIPConfig:
    if config:
        return CLIPConfig.from_hf(config)
    try:
        vocab, hidden = shapes["embeddings.token_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        inter = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ConfigError(f"not a CLIP text encoder: no tensor {e.args[0]}") from None
    return CLIPConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=_count(shapes, "encoder.layers."),
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        max_position_embeddings=positions,
    )


def vae_config(shapes: dict, config: dict | None) -> tuple[AutoencoderConfig, bool]:
    """(config, scale_inferred): ae.safetensors carries no scale/shift; FLUX's are used."""
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        levels = _count(shapes, "encoder.down.")
        mult = tuple(
            shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)
        )
        blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
        z = shapes["decoder.conv_in.weight"][-1]
    except KeyError as e:
        raise ConfigError(f"not a FLUX autoencoder: no tensor {e.args[0]}") from None
    scale = (config or {}).get("scaling_factor")
    shift = (config or {}).get("shift_factor")
    cfg = AutoencoderConfig(
        ch=ch,
        ch_mult=mult,
        num_res_blocks=blocks,
        z_channels=z,
        scale_factor=0.3611 if scale is None else float(scale),
        shift_factor=0.1159 if shift is None else float(shift),
    )
    return cfg, scale is None
