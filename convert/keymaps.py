"""Key maps from foreign checkpoint layouts to mlxflux's (= BFL's) parameter names.

Each layout is one pure, table-driven function `key -> Target | None`; `assemble` runs it over a
stream of (key, tensor) pairs, joins fused tensors (diffusers keeps q, k, v apart; BFL fuses
them) as soon as their parts have arrived, and fails on any key it cannot place.
"""

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from mlxflux.errors import MlxfluxError


class KeyMapError(MlxfluxError, ValueError):
    pass


def _identity(x: mx.array) -> mx.array:
    return x


def swap_halves(x: mx.array) -> mx.array:
    """diffusers' AdaLayerNormContinuous is (scale, shift); BFL's final layer is (shift, scale)."""
    a, b = mx.split(x, 2, axis=0)
    return mx.concatenate([b, a], axis=0)


@dataclass(frozen=True)
class Target:
    key: str
    part: int = 0  # index of this tensor among the pieces concatenated along axis 0
    parts: int = 1
    fn: Callable[[mx.array], mx.array] = _identity
    alias: bool = False  # a tied copy of another tensor: the first one seen wins


SKIP = Target("")  # a known tensor mlxflux does not use (e.g. CLIP's text_projection)


def assemble(
    items: Iterable[tuple[str, mx.array]],
    mapper: Callable[[str], Target | None],
    source: str,
) -> Iterator[tuple[str, mx.array]]:
    """Map (key, tensor) pairs to mlxflux keys, concatenating multi-part targets in order."""
    pending: dict[str, dict[int, mx.array]] = {}
    seen: set[tuple[str, int]] = set()
    for key, value in items:
        target = mapper(key)
        if target is None:
            raise KeyMapError(f"{source}: tensor {key} has no place in this layout")
        if target is SKIP:
            continue
        slot = (target.key, target.part)
        if slot in seen:
            if target.alias:
                continue
            raise KeyMapError(f"{source}: tensor {key} maps to {target.key} twice")
        seen.add(slot)
        if target.parts == 1:
            yield target.key, target.fn(value)
            continue
        got = pending.setdefault(target.key, {})
        got[target.part] = value
        if len(got) == target.parts:
            del pending[target.key]
            yield target.key, target.fn(mx.concatenate([got[i] for i in range(target.parts)]))
    if pending:
        missing = ", ".join(sorted(pending))
        raise KeyMapError(f"{source}: incomplete fused tensors (some parts missing): {missing}")


def _rules(table: list[tuple[str, str | Callable]]) -> list[tuple[re.Pattern, object]]:
    return [(re.compile(pattern + r"$"), repl) for pattern, repl in table]


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _apply(rules, key: str) -> Target | None:
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return repl(m) if callable(repl) else Target(m.expand(repl))
    return None


# ---- transformer ---------------------------------------------------------------------------

BFL_PREFIXES = ("model.diffusion_model.",)


def bfl_transformer(key: str) -> Target:
    """BFL / ComfyUI transformer files already use mlxflux's names, maybe behind a prefix."""
    return Target(_strip(key, BFL_PREFIXES))


def _part(name: str, part: int, parts: int):
    return lambda m: Target(m.expand(name), part, parts)


_P = r"(weight|bias)"
_DIFFUSERS_TRANSFORMER = _rules(
    [
        (rf"x_embedder\.{_P}", r"img_in.\1"),
        (rf"context_embedder\.{_P}", r"txt_in.\1"),
        (rf"time_text_embed\.timestep_embedder\.linear_1\.{_P}", r"time_in.in_layer.\1"),
        (rf"time_text_embed\.timestep_embedder\.linear_2\.{_P}", r"time_in.out_layer.\1"),
        (rf"time_text_embed\.guidance_embedder\.linear_1\.{_P}", r"guidance_in.in_layer.\1"),
        (rf"time_text_embed\.guidance_embedder\.linear_2\.{_P}", r"guidance_in.out_layer.\1"),
        (rf"time_text_embed\.text_embedder\.linear_1\.{_P}", r"vector_in.in_layer.\1"),
        (rf"time_text_embed\.text_embedder\.linear_2\.{_P}", r"vector_in.out_layer.\1"),
        (
            rf"norm_out\.linear\.{_P}",
            lambda m: Target(f"final_layer.adaLN_modulation.1.{m[1]}", fn=swap_halves),
        ),
        (rf"proj_out\.{_P}", r"final_layer.linear.\1"),
        # double-stream blocks
        (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{_P}", r"double_blocks.\1.img_mod.lin.\2"),
        (
            rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{_P}",
            r"double_blocks.\1.txt_mod.lin.\2",
        ),
        *[
            (
                rf"transformer_blocks\.(\d+)\.attn\.{src}\.{_P}",
                _part(rf"double_blocks.\1.{dst}.qkv.\2", i, 3),
            )
            for dst, names in (
                ("img_attn", ("to_q", "to_k", "to_v")),
                ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
            )
            for i, src in enumerate(names)
        ],
        (
            r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
            r"double_blocks.\1.img_attn.norm.query_norm.scale",
        ),
        (
            r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
            r"double_blocks.\1.img_attn.norm.key_norm.scale",
        ),
        (
            r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
            r"double_blocks.\1.txt_attn.norm.query_norm.scale",
        ),
        (
            r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight",
            r"double_blocks.\1.txt_attn.norm.key_norm.scale",
        ),
        (
            rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{_P}",
            r"double_blocks.\1.img_attn.proj.\2",
        ),
        (
            rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{_P}",
            r"double_blocks.\1.txt_attn.proj.\2",
        ),
        (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{_P}", r"double_blocks.\1.img_mlp.0.\2"),
        (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{_P}", r"double_blocks.\1.img_mlp.2.\2"),
        (
            rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{_P}",
            r"double_blocks.\1.txt_mlp.0.\2",
        ),
        (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{_P}", r"double_blocks.\1.txt_mlp.2.\2"),
        # single-stream blocks: linear1 = [to_q; to_k; to_v; proj_mlp]
        (
            rf"single_transformer_blocks\.(\d+)\.norm\.linear\.{_P}",
            r"single_blocks.\1.modulation.lin.\2",
        ),
        *[
            (
                rf"single_transformer_blocks\.(\d+)\.{src}\.{_P}",
                _part(r"single_blocks.\1.linear1.\2", i, 4),
            )
            for i, src in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
        ],
        (
            r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
            r"single_blocks.\1.norm.query_norm.scale",
        ),
        (
            r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
            r"single_blocks.\1.norm.key_norm.scale",
        ),
        (rf"single_transformer_blocks\.(\d+)\.proj_out\.{_P}", r"single_blocks.\1.linear2.\2"),
    ]
)


def diffusers_transformer(key: str) -> Target | None:
    """diffusers `FluxTransformer2DModel` keys -> mlxflux keys (the inverse of diffusers' own
    single-file converter, which the tests check it against)."""
    return _apply(_DIFFUSERS_TRANSFORMER, key)


# ---- autoencoder ---------------------------------------------------------------------------


def conv_to_mlx(x: mx.array) -> mx.array:
    """torch conv weight [O, I, kh, kw] -> MLX [O, kh, kw, I]; 1x1 attention convs -> Linear."""
    if x.ndim != 4:
        return x
    if x.shape[2:] == (1, 1) and x.shape[0] == x.shape[1]:
        return x.reshape(x.shape[0], x.shape[1])
    return x.transpose(0, 2, 3, 1)


def _vae_fn(key: str):
    """nin_shortcut is a 1x1 conv in both layouts and stays one (O != I, or O == I in theory)."""
    if ".nin_shortcut." in key or ".conv_shortcut." in key:
        return lambda x: x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    return conv_to_mlx


BFL_VAE_PREFIXES = ("first_stage_model.", "vae.")


def bfl_vae(key: str) -> Target | None:
    """`ae.safetensors` keys are mlxflux's; only conv layouts change."""
    key = _strip(key, BFL_VAE_PREFIXES)
    if not key.startswith(("encoder.", "decoder.")):
        return None
    return Target(key, fn=_vae_fn(key))


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_RESNET["conv_shortcut"] = "nin_shortcut"
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_vae(num_levels: int) -> Callable[[str], Target | None]:
    """diffusers `AutoencoderKL` keys -> mlxflux keys; decoder.up_blocks run in reverse order."""
    res = "|".join(re.escape(k) for k in _RESNET)
    att = "|".join(re.escape(k) for k in _ATTN)

    def level(side: str, i: str) -> int:
        return int(i) if side == "encoder" else num_levels - 1 - int(i)

    rules = _rules(
        [
            (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_P}", r"\1.\2.\3"),
            (rf"(encoder|decoder)\.conv_norm_out\.{_P}", r"\1.norm_out.\2"),
            (
                rf"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.({res})\.{_P}",
                lambda m: Target(
                    f"{m[1]}.{'down' if m[1] == 'encoder' else 'up'}.{level(m[1], m[2])}"
                    f".block.{m[3]}.{_RESNET[m[4]]}.{m[5]}"
                ),
            ),
            (
                rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}",
                r"encoder.down.\1.downsample.conv.\2",
            ),
            (
                rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}",
                lambda m: Target(f"decoder.up.{level('decoder', m[1])}.upsample.conv.{m[2]}"),
            ),
            (
                rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.({res})\.{_P}",
                lambda m: Target(f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET[m[3]]}.{m[4]}"),
            ),
            (
                rf"(encoder|decoder)\.mid_block\.attentions\.0\.({att})\.{_P}",
                lambda m: Target(f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"),
            ),
        ]
    )

    def mapper(key: str) -> Target | None:
        t = _apply(rules, key)
        return None if t is None else Target(t.key, fn=_vae_fn(t.key))

    return mapper


# ---- text encoders -------------------------------------------------------------------------

CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.")
_CLIP_UNUSED = ("embeddings.position_ids", "text_projection.weight", "logit_scale")


def clip_text(key: str) -> Target | None:
    """clip_l.safetensors / diffusers text_encoder: `text_model.` prefix optional."""
    key = _strip(_strip(key, CLIP_PREFIXES), ("text_model.",))
    if key in _CLIP_UNUSED:
        return SKIP
    if key.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
        return Target(key)
    return None


T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)


def t5_encoder(key: str) -> Target | None:
    """t5xxl_*.safetensors / diffusers text_encoder_2: `shared` or `encoder.embed_tokens`."""
    key = _strip(key, T5_PREFIXES)
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return Target("shared.weight", alias=True)
    if key.startswith(("encoder.block.", "encoder.final_layer_norm.")):
        return Target(key)
    return None
