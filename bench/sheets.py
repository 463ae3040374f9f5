"""The README's two sheets, drawn by the CLI on the small random-weight model (seconds): what
the files look like and how the commands chain, not what trained weights draw.

    python bench/sheets.py --out docs

redux-sheet.png   the original, then two Redux variations of it (`gen --redux`, multiply 1.0,
                  attn_bias 0.5), captioned from their PNGs (`mlxflux compare`)
print-crop.png    a crop of a cover at print size: enlarged as it is (Lanczos), the model
                  upscale (`mlxflux upscale`), then refined by FLUX over tiles (`--refine 0.3`)
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cli(*args, cwd):
    out = subprocess.run(["mlxflux", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout.strip().splitlines()[-1]


def original(width: int, height: int) -> Image.Image:
    """A cover-like picture: a gradient sky, a disc, a title band."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    sky = np.stack([0.1 + 0.5 * y, 0.15 + 0.3 * y, 0.35 + 0.2 * np.sin(4 * x)], -1)
    disc = ((x - 0.4) ** 2 + (y - 0.5) ** 2 < 0.03)[..., None] * np.array([0.95, 0.7, 0.2])
    img = Image.fromarray((np.clip(sky + disc, 0, 1) * 255).astype(np.uint8))
    ImageDraw.Draw(img).rectangle([0, 20, width, 60], fill=(230, 230, 220))
    return img


def row(pictures: list[Image.Image], captions: list[str], height: int) -> Image.Image:
    font = ImageFont.load_default(size=14)
    tiles = [p.resize((round(p.width * height / p.height), height), Image.NEAREST)
             for p in pictures]  # fmt: skip
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 10 * (len(tiles) + 1), height + 50),
                      "white")  # fmt: skip
    draw, x = ImageDraw.Draw(sheet), 10
    for tile, text in zip(tiles, captions, strict=True):
        sheet.paste(tile, (x, 10))
        draw.text((x, height + 18), text, fill="black", font=font)
        x += tile.width + 10
    return sheet


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs")
    a = p.parse_args()
    out = Path(a.out).resolve()
    from make_random_model import tokenizer_files
    from upscale import random_model

    from mlxflux.convert.random_model import make_random_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_random_model(tmp / "model", size="small", redux=True, bits=None,
                                  dtype="float32", tokenizers=tokenizer_files(None),
                                  log=lambda m: None)  # fmt: skip
        cover = tmp / "original.png"
        original(448, 576).save(cover)
        common = ["--model", model, "--prompt", "a book cover, a golden planet over a dark sea",
                  "--width", 448, "--height", 576, "--steps", 4, "--seed", 7]  # fmt: skip
        one = cli("gen", *common, "--redux", f"{cover}:1", "--output", tmp / "redux-1.png",
                  cwd=tmp)  # fmt: skip
        two = cli("gen", *common, "--redux", f"{cover}:0.5", "--redux-strength-type",
                  "attn_bias", "--output", tmp / "redux-2.png", cwd=tmp)  # fmt: skip
        cli("compare", cover, one, two, "--height", 320, "--output", out / "redux-sheet.png",
            cwd=tmp)  # fmt: skip
        upscaler = random_model("compact", tmp)
        plain = cli("upscale", one, "--model", upscaler, "--scale", 2, "--output",
                    tmp / "up.png", cwd=tmp)  # fmt: skip
        refined = cli("upscale", one, "--model", upscaler, "--scale", 2, "--refine", 0.3,
                      "--refine-tile", 512, "--model-dir", model, "--output", tmp / "ref.png",
                      cwd=tmp)  # fmt: skip
        box = (300, 420, 556, 676)  # a 256 px crop of the 896x1152 print
        small = Image.open(one).convert("RGB").resize((896, 1152), Image.LANCZOS)
        crops = [small.crop(box), Image.open(plain).convert("RGB").crop(box),
                 Image.open(refined).convert("RGB").crop(box)]  # fmt: skip
        row(crops, ["enlarged (Lanczos)", "model upscale 2x", "+ FLUX refine 0.3"],
            256).save(out / "print-crop.png")  # fmt: skip
    print(out / "redux-sheet.png", out / "print-crop.png")


if __name__ == "__main__":
    main()
