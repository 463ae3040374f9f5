"""Do two versions of mlxflux draw the same pictures, bit for bit?

A refactoring must not change one pixel. This script makes tiny random-weight model folders
once (dev unquantized and 8-bit, Kontext, Canny, Fill) with its input images and a LoRA, then
draws every workflow at two seeds with the public Python API, and compares two such runs:

    python bench/same_pictures.py make  /tmp/same/models           # needs torch + diffusers
    python bench/same_pictures.py draw  /tmp/same/models /tmp/same/before   # old checkout
    python bench/same_pictures.py draw  /tmp/same/models /tmp/same/after    # new checkout
    python bench/same_pictures.py compare /tmp/same/before /tmp/same/after

`draw` writes one PNG per case and seed (pixels only) and `pixels.json` (sha256 of each
picture's RGB bytes); `compare` says, per picture, whether the pixels are equal.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SEEDS = (3, 11)
PROMPT = "A cinematic DVD cover: a black hole with a golden accretion disk, a tiny spaceship"
SIZE = {"width": 96, "height": 64}


def make(out: Path) -> None:
    """The model folders, input images and LoRA the cases use (reference models from the
    tests' tiny sets: diffusers and transformers with random weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from safetensors.numpy import save_file

    from mlxflux.convert import convert
    from tests import reference as tiny

    out.mkdir(parents=True, exist_ok=True)

    def folder(name, models, bits=None, cls="FluxPipeline", variant="auto"):
        src = tiny.write_diffusers(models, out / f"src-{name}")
        index = json.loads((src / "model_index.json").read_text())
        (src / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
        convert([src], out / name, bits=bits, dtype="float32", variant=variant)

    dev = tiny.make_models(seed=5)
    folder("dev", dev)
    folder("dev-q8", dev, bits=8)
    folder("kontext", tiny.make_models(seed=6), variant="kontext")
    folder("canny", tiny.make_models(seed=7, in_channels=128), variant="canny")
    folder("fill", tiny.make_models(seed=8, in_channels=384), cls="FluxFillPipeline")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"init": (120, 80), "reference": (80, 96), "control": (96, 64)}.items():
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        noise = rng.integers(0, 80, (h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(out / f"{name}.png")
    mask = np.zeros((80, 120), np.uint8)
    mask[20:60, 30:90] = 255
    Image.fromarray(mask).save(out / "mask.png")
    # a kohya LoRA on a fused qkv, a single block's input and a modulation layer
    g = np.random.default_rng(1)
    tensors = {}
    for layer, (rows, cols) in {"double_blocks_0_img_attn_qkv": (768, 256),
                                "single_blocks_1_linear1": (1792, 256),
                                "double_blocks_1_img_mod_lin": (1536, 256)}.items():  # fmt: skip
        tensors[f"lora_unet_{layer}.lora_down.weight"] = (
            g.standard_normal((4, cols)) / cols**0.5
        ).astype(np.float32)
        tensors[f"lora_unet_{layer}.lora_up.weight"] = (g.standard_normal((rows, 4)) * 0.3).astype(
            np.float32
        )
        tensors[f"lora_unet_{layer}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, str(out / "lora.safetensors"))
    print(f"models and inputs in {out}")


def cases(models: Path) -> dict[str, tuple[str, dict, dict]]:
    """name -> (model folder, load keywords, generate keywords)."""
    m = models
    return {
        "txt2img": ("dev", {}, {}),
        "img2img": ("dev", {}, {"init_image": m / "init.png", "denoise": 0.7}),
        "lora-8bit": ("dev-q8", {}, {"loras": [(m / "lora.safetensors", 0.8)]}),
        "kontext": (
            "kontext",
            {},
            {"reference_images": [m / "reference.png"], "reference_scale": "none"},
        ),  # fmt: skip
        "canny": ("canny", {}, {"control_image": m / "control.png"}),
        "fill-mask": ("fill", {}, {"init_image": m / "init.png", "mask": m / "mask.png"}),
        # a budget that fits the streamed need, not the resident denoise stage: streams
        "streamed": ("dev-q8", {"memory_budget": 0.0565}, {}),
        "float16": ("dev", {"precision": "float16"}, {}),
    }


def draw(models: Path, out: Path) -> None:
    import mlxflux

    out.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, (model, load_kw, gen_kw) in cases(models).items():
        pipe = mlxflux.load(models / model, **load_kw)
        for seed in SEEDS:
            if hasattr(pipe, "prepare"):  # the job API: its own report
                job = pipe.prepare(mlxflux.GenerationRequest(PROMPT, seeds=(seed,), **SIZE,
                                                             steps=3, **gen_kw))  # fmt: skip
                ((_, image),) = job.run()
                plan = job.report.plan
            else:  # before it: the pipeline's last report
                image = pipe.generate(PROMPT, **SIZE, steps=3, seed=seed, **gen_kw)
                plan = pipe.last_report.plan
            key = f"{name}-{seed}"
            image.save(out / f"{key}.png")
            sums[key] = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
            print(f"{key}: {sums[key][:16]} ({plan})", flush=True)
    (out / "pixels.json").write_text(json.dumps(sums, indent=1))


def compare(a: Path, b: Path) -> int:
    left, right = (json.loads((p / "pixels.json").read_text()) for p in (a, b))
    bad = 0
    for key in sorted(set(left) | set(right)):
        x, y = left.get(key), right.get(key)
        if x is None or y is None:
            print(f"{key}: only in {'right' if x is None else 'left'}")
            bad += 1
            continue
        pa, pb = (np.asarray(Image.open(p / f"{key}.png")) for p in (a, b))
        same = x == y and np.array_equal(pa, pb)
        diff = "" if same else f", max difference {np.abs(pa.astype(int) - pb).max()} levels"
        print(f"{key}: {'identical' if same else 'DIFFERENT'}{diff}")
        bad += not same
    print(f"{len(left)} pictures, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("models", type=Path)
    d = sub.add_parser("draw")
    d.add_argument("models", type=Path)
    d.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.models)
    elif args.cmd == "draw":
        draw(args.models, args.out)
    else:
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
