"""Tiny random FLUX component sets (reference torch models) and writers for each file layout.

Widths are chosen so the converter's shape inference has what it needs (transformer head dim
128 for the known RoPE axes, CLIP head dim 64) and Linear inputs are multiples of 64 (so they
quantize), while everything stays small enough for the CPU.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from .conftest import randomize_
from .helpers import tiny_clip, tiny_t5, tokenizer_dir
from .test_autoencoder import diffusers_to_bfl as vae_to_bfl
from .test_transformer import diffusers_to_bfl as flux_to_bfl

T5_WIDTH, CLIP_WIDTH = 64, 128


def make_models(seed: int = 0, guidance: bool = True, in_channels: int = 64) -> dict:
    """in_channels: 64 (dev, schnell, Kontext), 128 (Canny/Depth), 384 (Fill); the output is
    always the packed latent's 64."""
    torch.manual_seed(seed)
    flux = FluxTransformer2DModel(
        in_channels=in_channels,
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56),
    )
    t5 = tiny_t5(seed + 1, d_model=T5_WIDTH, layers=2)
    clip = tiny_clip(seed + 2, hidden=CLIP_WIDTH, intermediate=256, layers=2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 32, 32],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    models = {"transformer": flux, "t5": t5, "clip": clip, "vae": vae}
    for i, m in enumerate(models.values()):
        randomize_(m, seed + i)
    with torch.no_grad():  # T5 folds 1/sqrt(d_kv) into q's init
        for block in t5.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(t5.config.d_kv**-0.5)
    return models


def copy_tokenizers(dest: Path) -> None:
    src = tokenizer_dir()
    shutil.copytree(src / "tokenizer_1", dest / "tokenizer")
    shutil.copytree(src / "tokenizer_2", dest / "tokenizer_2")


def write_diffusers(models, folder: Path, shard: str | None = None) -> Path:
    """The Hugging Face FLUX.1-dev repo layout (optionally sharded with index files)."""
    kw = {"max_shard_size": shard} if shard else {}
    models["transformer"].save_pretrained(folder / "transformer", **kw)
    models["vae"].save_pretrained(folder / "vae")
    models["clip"].save_pretrained(folder / "text_encoder")
    models["t5"].save_pretrained(folder / "text_encoder_2", **kw)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    copy_tokenizers(folder)
    return folder


def converted(models, tmp: Path, bits: int | None = None) -> Path:
    """`models` written as the diffusers repo under tmp/src and converted to tmp/model (float32
    storage, `bits` quantization)."""
    from mlxflux.convert import convert

    return convert([write_diffusers(models, tmp / "src")], tmp / "model", bits=bits,
                   dtype="float32")  # fmt: skip


def _fp8(t: torch.Tensor, kind) -> torch.Tensor:
    return t.to(kind) if t.ndim == 2 else t.to(torch.bfloat16)


def round_like_fp8(models, kind=torch.float8_e4m3fn, which=("transformer", "t5")) -> None:
    """Give the reference the weights an fp8 file holds: Linear weights fp8, the rest bf16."""
    with torch.no_grad():
        for name in which:
            for p in models[name].parameters():
                p.copy_(_fp8(p, kind).float())


def t5_state(models, kind=None) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in models["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    if kind is None:
        return {k: v.half().contiguous() for k, v in sd.items()}
    return {k: _fp8(v, kind).contiguous() for k, v in sd.items()}


def write_single_files(models, folder: Path, fp8=None, prefix: str = "") -> dict[str, Path]:
    """BFL / ComfyUI single files: flux, ae, clip_l (text_model. prefix), t5xxl."""
    folder.mkdir(parents=True, exist_ok=True)
    flux = flux_to_bfl(models["transformer"].state_dict())
    if fp8 is not None:
        flux = {k: _fp8(v, fp8) for k, v in flux.items()}
    paths = {
        k: folder / n
        for k, n in (
            ("transformer", "flux1-dev.safetensors"),
            ("vae", "ae.safetensors"),
            ("clip", "clip_l.safetensors"),
            ("t5", "t5xxl.safetensors"),
        )
    }
    save_file({prefix + k: v.contiguous() for k, v in flux.items()}, str(paths["transformer"]))
    save_file(vae_to_bfl(models["vae"]), str(paths["vae"]))
    clip = {"text_model." + k: v for k, v in models["clip"].state_dict().items()}
    save_file(clip, str(paths["clip"]))
    save_file(t5_state(models, fp8), str(paths["t5"]))
    return paths
