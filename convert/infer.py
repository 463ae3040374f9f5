"""Component configs from what a checkpoint carries: a diffusers config.json, or tensor shapes."""

from mlxflux.models.transformer import FluxConfig

# RoPE axes are not stored anywhere; FLUX.1 uses these for head dim 128 (REFERENCE.md).
KNOWN_AXES = {128: (16, 56, 56)}


class ConfigError(ValueError):
    pass


def flux_config_from_diffusers(d: dict) -> FluxConfig:
    """diffusers `FluxTransformer2DModel` config.json -> FluxConfig."""
    if d.get("patch_size", 1) != 1:
        raise ConfigError(f"patch_size {d['patch_size']} is not supported (FLUX uses 1)")
    if d.get("out_channels") not in (None, d.get("in_channels", 64)):
        raise ConfigError("out_channels must equal in_channels")
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
    )


def _count(shapes: dict, prefix: str) -> int:
    idx = {int(k.split(".")[1]) for k in shapes if k.startswith(prefix)}
    if idx != set(range(len(idx))):
        raise ConfigError(f"{prefix} block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def flux_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None
) -> FluxConfig:
    """Infer FluxConfig from BFL-named tensor shapes (hidden from img_in, heads from QK-norm)."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
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
    )
