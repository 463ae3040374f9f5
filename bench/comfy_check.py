"""Do our PNGs' ComfyUI graphs run in ComfyUI and draw the same pictures?

    python bench/comfy_check.py --comfyui ~/ComfyUI --comfy-python ~/ComfyUI/venv/bin/python

1. Writes random-weight sources in ComfyUI's layout (models/diffusion_models, text_encoders,
   vae): a FLUX.1 transformer at full width with 1 double + 1 single block (ComfyUI reads
   FLUX's widths as constants, the depth from the keys), CLIP-L and the FLUX autoencoder at full
   size, and a T5 encoder at T5-XXL's width (4096) with 2 layers and a narrow feed-forward.
2. Converts them with mlxflux (unquantized, float32) and draws each case with `mlxflux gen`
   (text to image, beta + auto shift, image to image, a LoRA), all float32 on the CPU.
3. Runs every PNG's `prompt` graph through ComfyUI's own executor (`execution.PromptExecutor`,
   `--cpu`) with the same files, and compares ComfyUI's image with ours, in levels of 255.

One change to ComfyUI is needed and made at run time: its T5-XXL model reads a fixed 24-layer
config; the runner hands it the 2-layer config of the file written here (same width, heads and
vocabulary). Everything else is ComfyUI's code as it is. Writes bench/results/comfy_check.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

T5_CONFIG = {"d_ff": 1024, "d_kv": 64, "d_model": 4096, "num_heads": 64, "num_layers": 2,
             "vocab_size": 32128, "relative_attention_num_buckets": 32,
             "layer_norm_epsilon": 1e-6, "dense_act_fn": "gelu_pytorch_tanh",
             "is_gated_act": True, "model_type": "t5"}  # fmt: skip
FILES = {"flux": "diffusion_models/flux1-dev.safetensors",
         "t5": "text_encoders/t5xxl_fp32.safetensors", "clip": "text_encoders/clip_l.safetensors",
         "ae": "vae/ae.safetensors"}  # fmt: skip
TRANSFORMERS = {"flux1-dev.safetensors": 64, "flux1-canny-dev.safetensors": 128,
                "flux1-fill-dev.safetensors": 384}  # fmt: skip
MODELS = {"dev": "flux1-dev.safetensors", "kontext": "flux1-kontext-dev.safetensors",
          "canny": "flux1-canny-dev.safetensors", "fill": "flux1-fill-dev.safetensors"}  # fmt: skip
# case -> (model, gen's flags)
CASES = {
    "txt2img": ("dev", ["--width", "128", "--height", "96", "--steps", "3", "--seed", "11"]),
    "beta-auto": ("dev", ["--width", "96", "--height", "128", "--steps", "3", "--seed", "12",
                          "--scheduler", "beta", "--shift", "auto", "--guidance", "4"]),
    "img2img": ("dev", ["--width", "128", "--height", "128", "--steps", "4", "--seed", "13",
                        "--init-image", "{input}/cover.png", "--denoise", "0.6"]),
    "lora": ("dev", ["--width", "128", "--height", "96", "--steps", "3", "--seed", "14",
                     "--lora", "{models}/loras/style.safetensors:0.8"]),
    "kontext": ("kontext", ["--width", "128", "--height", "96", "--steps", "3", "--seed", "15",
                            "--reference", "{input}/cover.png", "--reference-scale", "none"]),
    "canny": ("canny", ["--width", "128", "--height", "128", "--steps", "3", "--seed", "16",
                        "--control-image", "{input}/cover.png"]),
    "fill": ("fill", ["--width", "128", "--height", "128", "--steps", "3", "--seed", "17",
                      "--init-image", "{input}/cover128.png", "--mask", "{input}/mask128.png"]),
    "outpaint": ("fill", ["--width", "128", "--height", "160", "--steps", "3", "--seed", "18",
                          "--init-image", "{input}/square96.png", "--outpaint"]),
}  # fmt: skip
PROMPT = "A cinematic DVD cover for the movie Interstellar, a black hole with a golden disk"


def write_sources(models: Path, inputs: Path) -> None:
    """Random weights in ComfyUI's files (seeded)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx.utils import tree_flatten
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mlxflux.models.transformer import FLUX_DEV, FluxConfig, FluxTransformer

    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for name, in_channels in TRANSFORMERS.items():  # dev (Kontext has its shapes), Canny, Fill
        cfg = FluxConfig(**{**FLUX_DEV.to_dict(), "depth": 1, "depth_single_blocks": 1,
                            "in_channels": in_channels})  # fmt: skip
        flux = {}
        for i, (key, p) in enumerate(tree_flatten(FluxTransformer(cfg).parameters())):
            k = mx.random.key(1000 + i)
            if p.ndim >= 2:
                bound = (3 / p.shape[-1]) ** 0.5
                value = mx.random.uniform(-bound, bound, p.shape, key=k)
            elif "norm" in key or key.endswith("scale"):
                value = mx.ones(p.shape)
            else:
                value = 0.02 * mx.random.normal(p.shape, key=k)
            flux[key] = value.astype(mx.bfloat16)
        mx.save_safetensors(str(models / "diffusion_models" / name), flux)
    shutil.copy(models / FILES["flux"], models / "diffusion_models/flux1-kontext-dev.safetensors")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12,
                                        projection_dim=768, hidden_act="quick_gelu"))  # fmt: skip
    clip_sd = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
               for k, v in clip.state_dict().items()}  # fmt: skip
    save_file(clip_sd, str(models / FILES["clip"]))  # ComfyUI's clip_l names
    t5 = T5EncoderModel(T5Config(**T5_CONFIG, feed_forward_proj="gated-gelu"))
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items()
             if k != "encoder.embed_tokens.weight"}  # fmt: skip
    save_file(t5_sd, str(models / FILES["t5"]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers import AutoencoderKL

    from tests.test_autoencoder import diffusers_to_bfl

    ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                       down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                       scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)  # fmt: skip
    save_file(diffusers_to_bfl(ae), str(models / FILES["ae"]))
    # a LoRA in kohya's names on two of the double block's layers
    rng = np.random.default_rng(3)
    lora = {}
    layers = {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
              "lora_unet_single_blocks_0_linear2": (3072, 15360)}  # fmt: skip
    for name, (rows, cols) in layers.items():
        lora[f"{name}.lora_down.weight"] = torch.tensor(
            rng.normal(0, 0.02, (8, cols)), dtype=torch.float32
        )
        lora[f"{name}.lora_up.weight"] = torch.tensor(
            rng.normal(0, 0.02, (rows, 8)), dtype=torch.float32
        )
        lora[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(lora, str(models / "loras/style.safetensors"))
    inputs.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:160, 0:160] / 160
    img = np.stack([x, y, 1 - x * y], -1) * 255
    img[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05] = (240, 200, 40)
    Image.fromarray(img.astype(np.uint8)).save(inputs / "cover.png")
    Image.fromarray(img.astype(np.uint8)).resize((128, 128), Image.Resampling.LANCZOS).save(
        inputs / "cover128.png"
    )
    mask = np.zeros((128, 128), np.uint8)
    mask[40:100, 24:88] = 255  # repaint the middle, keep the rest
    Image.fromarray(mask).convert("RGB").save(inputs / "mask128.png")
    Image.fromarray(img.astype(np.uint8)).resize((96, 96), Image.Resampling.LANCZOS).save(
        inputs / "square96.png"
    )


RUNNER = r"""
import asyncio, json, sys, uuid
from pathlib import Path
work, comfy = Path(sys.argv[1]), Path(sys.argv[2])
T5_CONFIG = json.loads(sys.argv[3])
sys.argv = ["main.py", "--cpu", "--output-directory", str(work / "comfy_out"),
            "--input-directory", str(work / "input")]
sys.path.insert(0, str(comfy))
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
import torch
folder_paths.set_output_directory(str(work / "comfy_out"))
folder_paths.set_input_directory(str(work / "input"))
for name in ("diffusion_models", "text_encoders", "vae", "loras"):
    folder_paths.add_model_folder_path(name, str(work / "models" / name), is_default=True)
import comfy.sd1_clip, comfy.text_encoders.sd3_clip, comfy.text_encoders.t5


def t5_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False,
            model_options={}):
    # ComfyUI's own __init__ but for the config (its file says 24 layers of d_ff 10240)
    model_options = {**model_options, "model_name": "t5xxl"}
    comfy.sd1_clip.SDClipModel.__init__(self, device=device, layer=layer, layer_idx=layer_idx,
        textmodel_json_config=T5_CONFIG, dtype=dtype, special_tokens={"end": 1, "pad": 0},
        model_class=comfy.text_encoders.t5.T5, enable_attention_masks=attention_mask,
        return_attention_masks=attention_mask, model_options=model_options)

comfy.text_encoders.sd3_clip.T5XXLModel.__init__ = t5_init
import nodes, execution
r = nodes.init_extra_nodes(init_custom_nodes=False)
if asyncio.iscoroutine(r):
    asyncio.run(r)

class Server:  # what PromptExecutor reports progress to
    client_id = None
    last_node_id = None
    last_prompt_id = None
    def send_sync(self, event, data, sid=None):
        if event == "execution_error":
            print("ComfyUI error:", json.dumps(data)[:2000], file=sys.stderr)

results = {}
for png in sorted((work / "ours").glob("*.png")):
    from PIL import Image
    graph = json.loads(Image.open(png).text["prompt"])
    for node in graph.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = png.stem
    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), graph, None))
    if not valid[0]:
        results[png.name] = {"valid": False, "error": str(valid[1]), "nodes": str(valid[3])[:2000]}
        continue
    executor = execution.PromptExecutor(Server(), cache_type=False)
    executor.execute(graph, str(uuid.uuid4()), {}, valid[2])
    made = sorted((work / "comfy_out").glob(png.stem + "_*.png"))
    results[png.name] = {"valid": True, "success": executor.success,
                         "comfy_png": str(made[-1]) if made else None}
print(json.dumps(results))
"""


def compare(a: Path, b: Path) -> dict:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB")).astype(np.int32)
    y = np.asarray(Image.open(b).convert("RGB")).astype(np.int32)
    if x.shape != y.shape:
        return {"shape": [list(x.shape), list(y.shape)]}
    d = np.abs(x - y)
    return {"mean_levels": float(d.mean()), "max_levels": int(d.max()),
            "pixels_over_2_levels": float((d.max(axis=2) > 2).mean())}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    p.add_argument("--comfy-python", required=True, help="a Python with ComfyUI's requirements")
    p.add_argument("--comfy-pythonpath", default="",
                   help="extra import path for ComfyUI's Python (stand-in modules)")  # fmt: skip
    p.add_argument("--work", default="/tmp/mlxflux-comfy-check")
    p.add_argument("--out", default="bench/results/comfy_check.json")
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, tests.*
    work = Path(a.work)
    models, inputs, ours = work / "models", work / "input", work / "ours"
    if not (models / FILES["flux"]).exists():
        write_sources(models, inputs)
    from mlxflux.convert import convert

    for variant, file in MODELS.items():
        if not (work / "mlx" / variant).exists():
            from tests.helpers import tokenizer_dir

            convert([], work / "mlx" / variant, bits=None, dtype="float32",
                    flux=models / "diffusion_models" / file, t5=models / FILES["t5"],
                    clip=models / FILES["clip"], ae=models / FILES["ae"],
                    tokenizers=tokenizer_dir(), progress=True)  # fmt: skip
    shutil.rmtree(ours, ignore_errors=True)
    shutil.rmtree(work / "comfy_out", ignore_errors=True)
    ours.mkdir(parents=True)
    for name, (variant, args) in CASES.items():
        model = work / "mlx" / variant
        args = [s.format(input=inputs, models=models) for s in args]
        out = str(ours / f"{name}.png")
        cmd = [sys.executable, "-m", "mlxflux.cli", "gen", "--model", str(model), "--prompt",
               PROMPT, "--precision", "float32", "--output", out, *args]  # fmt: skip
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    run = subprocess.run(
        [a.comfy_python, "-c", RUNNER, str(work), str(Path(a.comfyui).resolve()),
         json.dumps(T5_CONFIG)], capture_output=True, text=True, cwd=a.comfyui,
        env={**os.environ, "PYTHONPATH": a.comfy_pythonpath, "LD_PRELOAD": ""},
    )  # fmt: skip
    if run.returncode:
        raise SystemExit(run.stderr[-5000:])
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        if r.get("comfy_png"):
            r.update(compare(ours / name, Path(r["comfy_png"])))
        print(name, json.dumps(r))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"comfyui": str(a.comfyui), "cases": CASES, "results": results},
                              indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
