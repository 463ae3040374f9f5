"""The FLUX refine of an upscaled picture: image to image at a low denoise over overlapping
tiles of about 1024x1024, so a print-size cover gets real detail back at the memory of one
1024x1024 generation.

    text        the prompt, once                        (as a generation's)
    encode      the whole picture, VAE row tiles        -> its latent [1, 16, H/8, W/8]
    modulation  the tile size's schedule, once
    denoise     every step: each tile's Euler step, the tiles' results blended with
                tiled_scale's feathered masks into the one latent
    decode      the whole latent, VAE row tiles         -> the refined picture

One seed's noise covers the whole latent and each step blends the tiles before the next, so
neighbouring tiles start from the same noise and agree where they overlap (MultiDiffusion's
rule, with ComfyUI's feather); each tile is an image-to-image of its own at the tile's size
(its positions start at 0, its schedule is the tile's: ComfyUI's img2img formulas per tile).
The transformer is the same for every tile: weights load once, and only one tile's
activations are alive at a time. ComfyUI core has no such node ("Ultimate SD Upscale" is a
custom node, tile by tile); PNGs say so.
"""

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import SettingsError, check_finite
from .job import Job
from .models.latents import image_ids, pack_latents, unpack_latents
from .noise import comfy_noise
from .pipeline import denoise_step
from .pixels import Picture, cover, size_of, unit_pixels
from .report import Stage
from .request import GenerationRequest
from .sampling import noise_scaling
from .upscaling import feather_mask

TILE = 1024  # pixels: a tile's side at most (FLUX's native megapixel)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles of `tile` covering 0..length, neighbours sharing at least
    `overlap`: the first at 0, the last at length - tile, the others evenly between."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass
class Refine:
    """A prepared refine: a job for one tile (its schedule, LoRAs and memory plan), the picture
    at the refined size (multiples of 16) and the tiles' latent origins."""

    job: Job
    image: Image.Image
    tiles: list[tuple[int, int]]  # (row, column) latent origins
    overlap: int  # latent pixels

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def steps(self) -> int:
        return len(self.job.sigma_list) - 1

    def run(self, on_step=None) -> Image.Image:
        """The refined picture; `on_step(done, total)` after every tile's step (total: steps x
        tiles). Ctrl-C raises KeyboardInterrupt between two tiles' steps."""
        job = self.job
        pipe, request, report = job.pipe, job.request, job.report
        fallbacks = report.settings.setdefault("float32_fallbacks", [])
        txt, pooled = job.text_stage()
        with Stage(report, "encode") as stage:
            latent = pipe.encode_image(unit_pixels(self.image), request.tiled_decode,
                                       fallbacks=fallbacks)  # fmt: skip
            stage.bytes_read = pipe.group_bytes("vae")
        with job.transformer_stages(pooled, fallbacks) as trunk:
            del pooled
            x = self._denoise(trunk.model, trunk.cond, txt, latent, trunk.blocks, on_step)
            del txt
        with Stage(report, "decode") as stage:
            ae = pipe.load("vae")
            stage.bytes_read = pipe.group_bytes("vae")
            return pipe.decode(ae, mx.array(x), request.tiled_decode, fallbacks)

    def _denoise(self, model, cond, txt, latent, blocks, on_step) -> np.ndarray:
        job, pipe = self.job, self.job.pipe
        th, tw = job.height // 8, job.width // 8  # a tile, in latent pixels
        sigmas = job.sigma_list
        x = noise_scaling(sigmas[0], comfy_noise(job.seeds[0], latent.shape), latent)
        txt = txt.astype(pipe.wide_dtype)
        rope = model.rope(image_ids(job.height, job.width), txt.shape[1])
        mask = feather_mask((th, tw), self.overlap)
        div = np.zeros(x.shape[2:], np.float32)
        for y, xx in self.tiles:
            div[y : y + th, xx : xx + tw] += mask
        # each tile's share of every latent pixel (1 where one tile covers it)
        weights = [mask / div[y : y + th, xx : xx + tw] for y, xx in self.tiles]
        steps, done, total = self.steps, 0, self.steps * len(self.tiles)
        for i in range(steps):
            out = np.zeros_like(x)
            for (y, xx), weight in zip(self.tiles, weights, strict=True):
                part = pack_latents(mx.array(x[:, :, y : y + th, xx : xx + tw]))
                part = denoise_step(model, part, txt, cond.rows(i, i + 1), rope, sigmas[i],
                                    sigmas[i + 1], dtype=pipe.dtype, block_weights=blocks,
                                    step=i + 1)  # fmt: skip
                check_finite(part, "refine", pipe.precision, i + 1, steps)
                tile = np.array(unpack_latents(part, job.height, job.width))
                out[:, :, y : y + th, xx : xx + tw] += tile * weight
                done += 1
                if on_step:
                    on_step(done, total)
            x = out
        return x


def prepare_refine(pipe, image: Image.Image, request: GenerationRequest, source: str,
                   tile: int = TILE, overlap: int | None = None) -> Refine:  # fmt: skip
    """A refine of `image` (an upscaled picture; cropped to multiples of 16, as image to image
    does) with `request`'s prompt, seed, schedule and denoise (its size and init image are set
    here); `source`: the name the PNG records; `overlap`: the least two neighbouring tiles
    share, feathered [default: an eighth of the tile, 128 px of 1024]. SettingsError in one
    line, before any stage."""
    if pipe.variant_info.family.name != "text":
        raise SettingsError(
            f"refines with a text-to-image model (dev, schnell or a fine-tune); "
            f"{pipe.variant_info.title} needs inputs of its own",
            "refine",
        )
    if tile % 16 or tile < 128:
        raise SettingsError(f"a tile of {tile} px: give a multiple of 16, at least 128",
                            "refine_tile")  # fmt: skip
    overlap = tile // 8 if overlap is None else overlap
    if not 0 <= overlap < tile // 2 or overlap % 8:
        raise ValueError(f"an overlap of {overlap} px: a multiple of 8 below {tile // 2}")
    if len(request.seeds) != 1:
        raise SettingsError("refines with one seed", "seed")
    width, height = size_of(image)
    image = cover(image.convert("RGB"), width, height)
    tw, th = min(tile, width), min(tile, height)
    rows = tile_starts(height // 8, th // 8, overlap // 8)
    cols = tile_starts(width // 8, tw // 8, overlap // 8)
    picture = Picture(image, source, Picture.of(image, "image").sha256)
    job = pipe.prepare(replace(request, width=tw, height=th, init_image=picture,
                               origins=request.origins))  # fmt: skip
    settings = job.report.settings
    settings.update(width=width, height=height)
    settings["refine"] = {"denoise": request.denoise, "tile": [tw, th], "overlap": overlap,
                          "tiles": len(rows) * len(cols)}  # fmt: skip
    tiles = [(y, x) for y in rows for x in cols]
    return Refine(job, image, tiles, overlap // 8)
