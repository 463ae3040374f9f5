"""What the tests check mlxflux against: the reference implementations (torch, diffusers,
transformers) with tiny random weights, and the files each layout writes from them.

Every test module that imports this one needs the reference implementations and is marked
`reference` (`pytestmark`); `pytest -m "not reference"` runs the rest, pure MLX, without them.

Widths are chosen so the converter's shape inference has what it needs (transformer head dim
128 for the known RoPE axes, CLIP head dim 64) and Linear inputs are multiples of 64 (so they
quantize), while everything stays small enough for the CPU.
"""

import copy
import inspect
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.loaders import single_file_utils
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

import mlxflux
from mlxflux.convert.infer import flux_config_from_diffusers
from mlxflux.convert.keymaps import assemble, diffusers_transformer
from mlxflux.models.latents import image_ids, pack_latents
from mlxflux.models.transformer import FluxTransformer
from mlxflux.quant import GROUP_SIZE, quantize

from .helpers import HEIGHT, WIDTH, load_strict, tokenizer_dir

# parity is checked in fp32 against torch on the CPU
torch.set_default_dtype(torch.float32)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Give every parameter a random value: matrices ~ N(0, 1/fan_in), vectors around 0 or 1.

    Reference models initialise some layers to zero; random values everywhere make a wrong key
    or a swapped half show up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5)
            elif name.endswith("bias") or name.endswith("shift"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def to_mx(t) -> mx.array:
    return mx.array(t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|"""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def tiny_clip(seed=0, hidden=64, intermediate=96, layers=3) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=hidden // 64 if hidden > 64 else 4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407,
        bos_token_id=49406, pad_token_id=49407,
    )  # fmt: skip
    return randomize_(CLIPTextModel(cfg), seed)


def tiny_t5(seed=0, d_model=64, layers=3) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=32128, d_model=d_model, d_kv=16, d_ff=128, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    model = randomize_(T5EncoderModel(cfg), seed)
    with torch.no_grad():  # T5 folds 1/sqrt(d_kv) into q's init (it never scales scores)
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(cfg.d_kv**-0.5)
    return model


def quantize_dequantize_(module: torch.nn.Module, bits: int = 8) -> torch.nn.Module:
    """Replace every quantizable Linear weight with its affine round trip, as the converter
    and `mlxflux.quant` quantize it (per row, groups of 64, in float32): quantizing diffusers'
    separate q/k/v rows gives exactly the rows of the converter's fused BFL layers."""
    with torch.no_grad():
        for layer in module.modules():
            w = getattr(layer, "weight", None)
            if isinstance(layer, torch.nn.Linear) and w.shape[-1] % GROUP_SIZE == 0:
                q = mx.quantize(to_mx(w), group_size=GROUP_SIZE, bits=bits)
                deq = mx.dequantize(*q, group_size=GROUP_SIZE, bits=bits)
                w.copy_(torch.from_numpy(np.array(deq)))
    return module


def make_inputs(ref, batch: int, height: int, width: int, n_txt: int, seed: int = 1):
    cfg = ref.config
    g = torch.Generator().manual_seed(seed)
    n_img = (height // 16) * (width // 16)
    ids = image_ids(height, width)
    return dict(
        hidden_states=torch.randn(batch, n_img, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.from_numpy(ids).float(),
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
    )


def run_reference(ref, inputs):
    with torch.no_grad():
        return ref(**inputs, return_dict=False)[0]


def load_from_diffusers(ref) -> FluxTransformer:
    weights = dict(
        assemble(((k, to_mx(v)) for k, v in ref.state_dict().items()), diffusers_transformer, "ref")
    )
    model = FluxTransformer(flux_config_from_diffusers(dict(ref.config)))
    return load_strict(model, weights, "ref")


def flux_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, for tests."""
    out = {}
    simple = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    for src, dst in simple.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[d + f"img_mod.lin.{p}"] = sd[s + f"norm1.linear.{p}"]
            out[d + f"txt_mod.lin.{p}"] = sd[s + f"norm1_context.linear.{p}"]
            out[d + f"img_attn.qkv.{p}"] = torch.cat([sd[s + f"attn.to_{x}.{p}"] for x in "qkv"])
            out[d + f"txt_attn.qkv.{p}"] = torch.cat(
                [sd[s + f"attn.add_{x}_proj.{p}"] for x in "qkv"]
            )
            out[d + f"img_attn.proj.{p}"] = sd[s + f"attn.to_out.0.{p}"]
            out[d + f"txt_attn.proj.{p}"] = sd[s + f"attn.to_add_out.{p}"]
            out[d + f"img_mlp.0.{p}"] = sd[s + f"ff.net.0.proj.{p}"]
            out[d + f"img_mlp.2.{p}"] = sd[s + f"ff.net.2.{p}"]
            out[d + f"txt_mlp.0.{p}"] = sd[s + f"ff_context.net.0.proj.{p}"]
            out[d + f"txt_mlp.2.{p}"] = sd[s + f"ff_context.net.2.{p}"]
        out[d + "img_attn.norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "img_attn.norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
        out[d + "txt_attn.norm.query_norm.scale"] = sd[s + "attn.norm_added_q.weight"]
        out[d + "txt_attn.norm.key_norm.scale"] = sd[s + "attn.norm_added_k.weight"]
    n_single = 1 + max(
        int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")
    )
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[d + f"modulation.lin.{p}"] = sd[s + f"norm.linear.{p}"]
            out[d + f"linear1.{p}"] = torch.cat(
                [sd[s + f"attn.to_{x}.{p}"] for x in "qkv"] + [sd[s + f"proj_mlp.{p}"]]
            )
            out[d + f"linear2.{p}"] = sd[s + f"proj_out.{p}"]
        out[d + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_single_file_convert(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converter with its hard-coded inner_dim = 3072 derived from img_in instead."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    src, n = re.subn(
        r"inner_dim = 3072",
        'inner_dim = checkpoint["img_in.weight"].shape[0]',
        src,
    )
    if n != 1:
        import diffusers

        pytest.fail(
            f"diffusers {diffusers.__version__}: convert_flux_transformer_checkpoint_to_diffusers "
            f"no longer holds the line 'inner_dim = 3072' this test patches (found {n}); update "
            "diffusers_single_file_convert for this version"
        )
    scope = dict(vars(single_file_utils))
    exec(src, scope)
    return scope["convert_flux_transformer_checkpoint_to_diffusers"](dict(bfl))


def vae_to_bfl(vae) -> dict[str, torch.Tensor]:
    """ae.safetensors layout from diffusers weights via diffusers' own single-file map, inverted.

    diffusers' `convert_ldm_vae_checkpoint` maps BFL -> diffusers; we check that it maps this
    file back onto the reference's exact state dict, so the file is what BFL would have shipped.
    """
    sd = vae.state_dict()
    n = len(vae.config.block_out_channels)
    out = {}
    for k, v in sd.items():
        t = k
        for side, word, blk in (("encoder", "down", "down_blocks"), ("decoder", "up", "up_blocks")):
            if t.startswith(f"{side}.{blk}."):
                i = int(t.split(".")[2])
                lvl = i if side == "encoder" else n - 1 - i
                rest = ".".join(t.split(".")[3:])
                rest = rest.replace("resnets.", "block.").replace("downsamplers.0", "downsample")
                rest = rest.replace("upsamplers.0", "upsample")
                t = f"{side}.{word}.{lvl}.{rest}"
        t = t.replace("mid_block.resnets.0", "mid.block_1").replace(
            "mid_block.resnets.1", "mid.block_2"
        )
        t = t.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        t = t.replace("conv_shortcut", "nin_shortcut").replace("attn_1.group_norm", "attn_1.norm")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            t = t.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        if ".attn_1." in t and t.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # BFL stores attention as 1x1 convs
        out[t] = v.contiguous()
    return out


PROMPT = (
    "A cinematic DVD cover for the movie Interstellar. A breathtaking close-up of a supermassive "
    "black hole 'Gargantua' with a glowing golden accretion disk."
)


# fp32 pipeline against FluxPipeline, levels of 255: measured mean 0.001, max 1 (a truncation
# to uint8 that lands either side of an integer); bounds with a margin for other BLAS builds
FP32_MEAN, FP32_MAX = 0.02, 2


# bf16 against the fp32 reference, levels of 255: measured 0.40 / 3; float16 must meet it too
BF16_MEAN, BF16_MAX = 0.75, 4


def reference_pipeline(models, scheduler) -> FluxPipeline:
    tok = tokenizer_dir()
    return FluxPipeline(
        scheduler=scheduler,
        vae=models["vae"],
        text_encoder=models["clip"],
        tokenizer=CLIPTokenizer.from_pretrained(tok / "tokenizer_1"),
        text_encoder_2=models["t5"],
        tokenizer_2=T5TokenizerFast.from_pretrained(tok / "tokenizer_2"),
        transformer=models["transformer"],
    )


def comfy_uint8(x: np.ndarray) -> np.ndarray:
    """ComfyUI's SaveImage conversion, applied to the reference's float image."""
    return np.clip(255.0 * x, 0, 255).astype(np.uint8)


def compare(ours: Image.Image, ref: np.ndarray) -> tuple[float, int]:
    a = np.asarray(ours).astype(np.int32)
    b = comfy_uint8(ref[0]).astype(np.int32)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    return float(d.mean()), int(d.max())


def comfy_reference(
    models, scheduler: str, steps: int, noise: np.ndarray, sigmas: list[float] | None = None
) -> np.ndarray:
    """FluxPipeline given ComfyUI's sigmas (shift 1.15) and T5 padded to 256, as ComfyUI runs,
    starting from `noise` (the packed latent) at the first sigma."""
    if sigmas is None:
        sigmas = mlxflux.sigmas(scheduler, steps, width=WIDTH, height=HEIGHT, shift=1.15)
    # no further shifting: the scheduler takes ComfyUI's sigmas as they are
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = reference_pipeline(models, sched)
    with torch.no_grad():
        return pipe(
            PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=len(sigmas) - 1,
            sigmas=sigmas[:-1], guidance_scale=3.5,
            latents=torch.from_numpy(np.array(pack_latents(mlxflux_array(noise)))),
            output_type="np", max_sequence_length=256,
        ).images  # fmt: skip


def mlxflux_array(x):
    import mlx.core as mx

    return mx.array(x)


# every Linear input width a multiple of 64, so every layer quantizes
QUANTIZABLE = dict(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),
)


# bf16 activations against the fp32 reference: measured 8.2e-3 (plain) / 9.1e-3 (8-bit)
BF16_BOUND = 2e-2


# MLX's *CPU* quantized matmul is imprecise with bf16 inputs: one 512-wide layer is 5.3% off
# its dense bf16 equivalent (0.3%); the transformer measured 4.1e-2. GPU kernels accumulate in
# float32, so on a GPU device BF16_BOUND applies.
CPU_QMM_BF16_BOUND = 8e-2


def with_bits(ref, bits):
    """(the MLX model of diffusers' `ref`, quantized to `bits`, and the reference holding the
    same dequantized weights)."""
    model = load_from_diffusers(ref)
    if bits:
        quantize(model, bits, model.kernels)
        ref = quantize_dequantize_(copy.deepcopy(ref), bits)
    return model, ref


def components(models):
    tok = tokenizer_dir()
    return dict(
        vae=models["vae"], text_encoder=models["clip"], text_encoder_2=models["t5"],
        tokenizer=CLIPTokenizer.from_pretrained(tok / "tokenizer_1"),
        tokenizer_2=T5TokenizerFast.from_pretrained(tok / "tokenizer_2"),
        transformer=models["transformer"],
        # ComfyUI's sigmas are given as they are: no further shifting
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0),
    )  # fmt: skip


# layers a LoRA touches: fused q/k/v, a single block's [q, k, v | MLP] input, modulation (its
# own stage), the final layer's (shift, scale) adaLN, an embedder
LAYERS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.0",
    "double_blocks.0.img_mod.lin",
    "single_blocks.1.linear1",
    "single_blocks.0.linear2",
    "final_layer.adaLN_modulation.1",
    "time_in.in_layer",
    "txt_in",
]


RANK = 4


def make_lora(models, seed: int, layers=LAYERS, alpha: float | None = 2.0) -> dict:
    """BFL layer -> (down [r, in], up [out, r], alpha) with a visible effect."""
    bfl = flux_to_bfl(models["transformer"].state_dict())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        rows, cols = bfl[layer + ".weight"].shape
        down = torch.randn(RANK, cols, generator=g) / cols**0.5
        up = torch.randn(rows, RANK, generator=g) * 0.6 / RANK**0.5
        out[layer] = (down, up, alpha)
    return out


def write_bfl(lora: dict, path, prefix="diffusion_model."):
    tensors = {}
    for layer, (down, up, alpha) in lora.items():
        tensors[f"{prefix}{layer}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}{layer}.lora_B.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{prefix}{layer}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def write_kohya(lora: dict, path, text_encoder: bool = False):
    tensors = {}
    for layer, (down, up, alpha) in lora.items():
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    if text_encoder:  # a CLIP layer this CLIP does not have (9 of 3): not applied, and said so
        tensors["lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_down.weight"] = torch.ones(2, 8)
        tensors["lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_up.weight"] = torch.ones(8, 2)
    save_file(tensors, str(path))
    return path


def reference_outputs(models, seed=0):
    g = torch.Generator().manual_seed(seed)
    flux = models["transformer"]
    inputs = dict(
        hidden_states=torch.randn(1, 12, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 5, T5_WIDTH, generator=g),
        pooled_projections=torch.randn(1, CLIP_WIDTH, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=torch.from_numpy(image_ids(48, 64)).float(),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5]),
    )
    ids = torch.randint(0, 32000, (1, 20), generator=g)
    clip_ids = torch.tensor([[49406, *range(300, 310), 49407] + [49407] * 65])
    z = torch.randn(1, 16, 4, 6, generator=g)
    with torch.no_grad():
        out = {
            "transformer": flux(**inputs, return_dict=False)[0],
            "t5": models["t5"](ids).last_hidden_state,
            "clip": models["clip"](clip_ids).pooler_output,
            "vae": models["vae"].decode(z).sample,
        }
    return inputs, ids, clip_ids, z, out


# ---- tiny component sets and the files each layout writes ----

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


def hf_cache(root: Path, models, repo: str = "FLUX.1-dev") -> Path:
    """A Hugging Face cache holding a tiny snapshot of black-forest-labs/<repo>, laid out as
    huggingface-hub lays it out."""
    repo = root / "hub" / f"models--black-forest-labs--{repo}"
    commit = "0" * 40
    write_diffusers(models, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root / "hub"


def comfy_img2img_reference(torch_models, image, scheduler, steps, denoise, seed) -> np.ndarray:
    """ComfyUI's img2img, computed independently: LoadImage (/255), VAEEncode (the posterior's
    mode), the Flux latent format (z - 0.1159) * 0.3611, KSampler.set_steps (the schedule of
    int(steps / denoise) steps, the last steps + 1 sigmas), CONST noise_scaling
    (sigma0 * noise + (1 - sigma0) * latent), then Euler: FluxPipeline from that latent."""
    vae = torch_models["vae"]
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = vae.encode(2 * pixels - 1).latent_dist.mode()
    latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
    full = mlxflux.sigmas(scheduler, int(steps / denoise), width=WIDTH, height=HEIGHT, shift=1.15)
    sigmas = full[-(steps + 1) :]
    noise = torch.from_numpy(mlxflux.comfy_noise(seed, (1, 16, HEIGHT // 8, WIDTH // 8)))
    sigma0 = torch.tensor(sigmas[0], dtype=torch.float32)
    start = sigma0 * noise + (1.0 - sigma0) * latent
    return comfy_reference(torch_models, scheduler, steps, start.numpy(), sigmas=sigmas)


# ---- LyCORIS / DoRA / full-difference files (tests/test_lora_formats.py, the fuzz suite) ----

# layers each synthetic file touches (BFL names), fused and plain, modulation and MLP
ADAPTER_LAYERS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0",
                  "single_blocks.1.linear1", "single_blocks.0.linear2",
                  "double_blocks.0.img_mod.lin", "txt_in"]  # fmt: skip


def _factor(n: int) -> int:
    return next(f for f in (4, 2, 1) if n % f == 0)


def make_adapter(kind: str, rows: int, cols: int, g: torch.Generator, dora: str | None = None):
    """The pieces of one layer's adapter, in LyCORIS / kohya names, with a visible effect."""
    r = 4
    if kind == "lora":
        p = {
            "lora_down.weight": torch.randn(r, cols, generator=g) / cols**0.5,
            "lora_up.weight": torch.randn(rows, r, generator=g) * 0.5,
            "alpha": torch.tensor(2.0),
        }
    elif kind == "loha":
        p = {
            "hada_w1_a": torch.randn(rows, r, generator=g) * 0.5,
            "hada_w1_b": torch.randn(r, cols, generator=g) / cols**0.5,
            "hada_w2_a": torch.randn(rows, r, generator=g) * 0.5,
            "hada_w2_b": torch.randn(r, cols, generator=g),
            "alpha": torch.tensor(2.0),
        }
    elif kind == "lokr":  # w1 whole, w2 factored: both of LyCORIS's shapes of a factor
        a_out, a_in = _factor(rows), _factor(cols)
        p = {
            "lokr_w1": torch.randn(a_out, a_in, generator=g),
            "lokr_w2_a": torch.randn(rows // a_out, r, generator=g) * 0.3,
            "lokr_w2_b": torch.randn(r, cols // a_in, generator=g) / (cols // a_in) ** 0.5,
            "alpha": torch.tensor(2.0),
        }
    else:  # a full difference, with its bias
        p = {
            "diff": torch.randn(rows, cols, generator=g) * 0.05 / cols**0.5,
            "diff_b": torch.randn(rows, generator=g) * 0.05,
        }
    if dora == "in":  # LyCORIS: one magnitude per input column
        p["dora_scale"] = torch.rand(1, cols, generator=g) + 0.5
    elif dora == "out":  # PEFT-style: one per output row
        p["dora_scale"] = torch.rand(rows, 1, generator=g) + 0.5
    return p


def build_adapters(models, kinds: dict[str, str], seed: int, dora=None) -> dict:
    """BFL layer -> adapter pieces."""
    bfl = flux_to_bfl(models["transformer"].state_dict())
    g = torch.Generator().manual_seed(seed)
    return {layer: make_adapter(kind, *bfl[layer + ".weight"].shape, g, dora)
            for layer, kind in kinds.items()}  # fmt: skip


def write_adapters(file: dict, path, prefix="lora_unet_", dots=False):
    tensors = {}
    for layer, p in file.items():
        name = prefix + (layer if dots else layer.replace(".", "_"))
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in p.items()})
    save_file(tensors, str(path))
    return path
