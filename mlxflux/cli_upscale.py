"""`mlxflux upscale`: pictures made print-sized by an upscale model, as ComfyUI's
UpscaleModelLoader -> ImageUpscaleWithModel draws them (`mlxflux.upscaling`), then, with
--refine, given real detail back by FLUX over tiles (`mlxflux.refine`). `gen --upscale` runs
the same after its own pictures (`Upscaling`, `Refining`)."""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import click

from ._version import __version__
from .cli_common import Failure, flag_message, path_option
from .errors import MlxfluxError, SettingsError

DEFAULT_STEPS = 20  # a refine's full schedule when no PNG says
REFINE_TILE = 1024


@dataclass
class Upscaling:
    """The upscale stage: the model (loaded once), its file's sha256 and the final factor."""

    model: object  # upscaling.Upscaler
    sha256: str
    scale: float | None  # as asked; None: the model's own

    @classmethod
    def open(cls, model_file: Path, scale: float | None) -> "Upscaling":
        """The model read and checked; UpscaleError in one line (a front end names its field)."""
        from .model_folder import file_sha256
        from .upscaling import UpscaleError, load_upscaler

        model = load_upscaler(model_file)
        if scale is not None and scale > model.scale:
            raise UpscaleError(f"scale {scale:g} is over {model.name}'s own {model.scale}x")
        return cls(model, file_sha256(Path(model_file).expanduser()), scale)

    @property
    def factor(self) -> float:
        return self.scale or self.model.scale

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The size a width x height picture comes out at."""
        from .upscaling import output_size

        return output_size(width, height, self.model, self.scale)

    def name(self, source: str) -> str:
        """The upscaled picture's file name: NAME-upscaled-Nx.png of a source's file name."""
        return f"{Path(source).stem}-upscaled-{self.factor:g}x.png"

    def record(self, picture) -> dict:
        m = self.model
        return {"upscale_model": m.name, "upscale_model_sha256": self.sha256,
                "upscale_architecture": m.architecture, "model_scale": m.scale,
                "scale": self.factor, "source": picture.name,
                "source_sha256": picture.sha256}  # fmt: skip

    def run(self, picture, tile: int, on_tile=None):
        """The upscaled PIL picture, with a bar of tiles (or `on_tile(done, total)`)."""
        from tqdm.auto import tqdm

        from .upscaling import upscale

        if on_tile is not None:
            return upscale(picture.image, self.model, self.scale, tile=tile, on_tile=on_tile)
        bar = tqdm(desc=f"upscale {picture.name}", unit="tile", dynamic_ncols=True)

        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            return upscale(picture.image, self.model, self.scale, tile=tile, on_tile=tick)
        finally:
            bar.close()


@dataclass
class Refining:
    """The refine stage: the pipeline and the request every picture is refined with."""

    pipe: object
    request: object  # GenerationRequest: prompt, seed, schedule, denoise

    def prepare(self, image, source: str, tile: int, seed: int | None = None):
        from .refine import prepare_refine

        request = self.request
        if seed is not None:
            request = replace(request, seeds=(seed,), origins=request.origins)
        try:
            return prepare_refine(self.pipe, image, request, source, tile)
        except SettingsError as e:
            raise Failure(flag_message(e)) from None
        except MlxfluxError as e:
            raise Failure(str(e)) from None

    def run(self, image, source: str, tile: int, seed: int | None = None):
        """(the refined picture, its generation settings), with a bar of tile steps; `seed`:
        another than the request's."""
        from tqdm.auto import tqdm

        job = self.prepare(image, source, tile, seed)
        n = len(job.tiles)
        bar = tqdm(total=job.steps * n, desc=f"refine {n} tile{'s' * (n > 1)}",
                   unit="step", dynamic_ncols=True)  # fmt: skip
        try:
            out = job.run(lambda done, total: bar.update(done - bar.n))
        except MlxfluxError as e:  # NonFiniteError, a tensor that does not load, ...
            raise Failure(str(e)) from None
        finally:
            bar.close()
        return out, job.job.report.settings


def open_upscaling(model_file: Path, scale: float | None, flag: str = "--model") -> Upscaling:
    """`Upscaling.open`, refused as a CLI refuses: one line naming `flag`, exit 2."""
    from .upscaling import UpscaleError

    try:
        return Upscaling.open(model_file, scale)
    except UpscaleError as e:
        raise Failure(f"{flag}: {e}") from None


def refine_steps(steps: int, denoise: float) -> int:
    """A refine's steps per tile when none are given: `steps` x `denoise`, rounded up (the
    part of a full schedule of `steps` that image to image at `denoise` redraws; 20 x 0.3 = 6)."""
    return max(1, math.ceil(steps * denoise - 1e-9))


def refine_request(settings: dict, denoise: float, steps: int | None = None):
    """The request every picture is refined with: `settings` (the request's names: prompt,
    seed, ...; an earlier PNG's under the flags given) at `denoise`; `steps` as given, else
    the settings' steps x denoise (the same part of the schedule as a full image-to-image's
    steps would run; 20 x 0.3 = 6). SettingsError in one line when it cannot run."""
    from .resolve import resolve

    if not settings.get("prompt"):
        raise SettingsError("needs the prompt: give --prompt, or --from-png with a PNG that "
                            "has one (mlxflux's own PNGs carry theirs)", "refine")  # fmt: skip
    settings = {k: v for k, v in settings.items() if not k.startswith("cache")}  # no step cache
    if steps is None:
        steps = refine_steps(settings.get("steps", DEFAULT_STEPS), denoise)
    settings.update(steps=steps, denoise=denoise, init_image=blank(64, 64))
    return resolve(settings)


def refining(pipe, settings: dict, denoise: float, steps: int | None = None) -> Refining:
    """`refine_request`'s refine on `pipe`, refused as a CLI refuses (one line, exit 2)."""
    try:
        return Refining(pipe, refine_request(settings, denoise, steps))
    except SettingsError as e:
        raise Failure(flag_message(e)) from None


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@path_option(
    "--model",
    "model_file",
    required=True,
    help="The upscale model: ESRGAN/RRDBNet (4x-UltraSharp, RealESRGAN_x4plus / x2plus, BSRGAN) "
    "or SRVGGNetCompact (realesr-general-x4v3), .pth or .safetensors, e.g. from ComfyUI's "
    "models/upscale_models. A .pth is read without running its pickle.",
)
@click.option(
    "--scale",
    type=click.FloatRange(0, min_open=True),
    help="Final factor, at most the model's; below it the result is resized with Lanczos, as "
    "ComfyUI's ImageScaleBy [default: the model's own, e.g. 4].",
)
@path_option(
    "--output",
    help="The PNG to write (one picture) or a folder (several) [default: NAME-upscaled-Nx.png "
    "in the current folder]. Existing files are never replaced.",
)
@click.option(
    "--tile",
    type=click.IntRange(128),
    default=512,
    show_default=True,
    help="Tile size in input pixels (ComfyUI's; it goes down to 128 when memory runs out); "
    "smaller tiles hold less memory.",
)
@click.option(
    "--refine",
    type=click.FloatRange(0, 1, min_open=True),
    help="Then refine with FLUX: image to image at this denoise (0.2-0.35 adds detail and "
    "keeps the picture) over overlapping tiles of --refine-tile, one seed's noise for the "
    "whole picture, the tiles blended every step. Needs a model folder and the prompt.",
)
@click.option(
    "--refine-tile",
    type=click.IntRange(128),
    default=1024,
    show_default=True,
    help="The refine's tile side in pixels (multiple of 16); the peak memory is that of one "
    "generation of this size.",
)
@path_option("--model-dir", help="--refine: the model folder [default: mlxflux gen's].")
@path_option(
    "--from-png",
    help="--refine: the prompt and settings of this PNG (mlxflux's, ComfyUI's or A1111's) "
    "[default: each picture's own, when it carries them]. Flags given override them.",
)
@click.option("--prompt", help="--refine: the prompt [default: the PNG's].")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="--refine: the noise seed "
              "[default: the PNG's, else random].")  # fmt: skip
@click.option("--steps", type=click.IntRange(1, 150), help="--refine: steps per tile [default: "
              "the PNG's steps x DENOISE (20 x 0.3: 6), the part of its schedule a refine "
              "redraws].")  # fmt: skip
@click.option("--guidance", type=click.FloatRange(0, 100), help="--refine: FLUX guidance "
              "[default: the PNG's, else 3.5].")  # fmt: skip
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="--refine: compute dtype [default: as gen's].",
)
@click.option("--memory-budget", default="auto", show_default=True,
              help="--refine: memory the run may use, in GiB, or 'auto' (as gen's).")  # fmt: skip
def upscale(images, model_file, scale, output, tile, refine, refine_tile, model_dir, from_png,
            prompt, seed, steps, guidance, precision, memory_budget):  # fmt: skip
    """Upscale pictures with an ESRGAN-family model, in ComfyUI's tiles (512, overlap 32,
    feathered), e.g. a 832x1216 DVD cover to 3328x4864 for print at 300 dpi; with --refine,
    then FLUX image to image over ~1024 px tiles at a low denoise puts real detail back.
    Each PNG records the model (name, sha256), the factor, the source picture and the refine's
    settings, and carries ComfyUI's graph of the upscale.

    \b
    Upscale:          mlxflux upscale dvd-42.png --model 4x-UltraSharp.pth
    Upscale, refine:  mlxflux upscale dvd-42.png --model RealESRGAN_x4plus.pth --scale 2.6
                      --refine 0.3        (the prompt and seed from dvd-42.png itself)
    """
    from .pixels import Picture

    up = open_upscaling(model_file, scale)
    try:
        pictures = [Picture.of(path, "image") for path in images]  # all opened before any run
    except SettingsError as e:
        raise Failure(e.reason) from None
    refines = [None] * len(pictures)
    if refine is not None:
        given = {"prompt": prompt, "seed": seed, "guidance": guidance}
        given = {k: v for k, v in given.items() if v is not None}
        shared = _png_settings(from_png) if from_png else None
        pipe = _pipeline(model_dir, precision, memory_budget)
        for i, path in enumerate(images):
            png = shared if shared is not None else _png_settings(path, quiet=True)
            refines[i] = refining(pipe, {**png, **given}, refine, steps)
            w, h = up.size(*pictures[i].image.size)
            refines[i].prepare(blank(w, h), "check", refine_tile)  # refused now, not later
    click.echo(f"{up.model.name}: {up.model.architecture}, {up.model.scale}x; final "
               f"{up.factor:g}x", err=True)  # fmt: skip
    for picture, path, refiner in zip(pictures, images, refines, strict=True):
        target = _target(output, up.name(path.name), len(images))
        click.echo(str(upscale_one(picture, up, refiner, target, tile, refine_tile)))


def upscale_one(picture, up: Upscaling, refiner: Refining | None, target: Path, tile: int,
                refine_tile: int = 1024, seed: int | None = None) -> Path:  # fmt: skip
    """One picture upscaled (and refined, with `seed` if given) and written to `target` with
    its records; Ctrl-C writes nothing."""
    generation = None
    try:
        image = up.run(picture, tile)
        if refiner is not None:
            name = up.name(picture.name)
            image, generation = refiner.run(image, name, refine_tile, seed)
    except KeyboardInterrupt:
        raise Failure(f"interrupted: {picture.name} not written") from None
    return write_upscaled(image, picture, up, generation, target)


def write_upscaled(image, picture, up: Upscaling, generation: dict | None, target: Path) -> Path:
    """The PNG of an upscaled picture (refined with `generation`'s settings, if given) with
    its records: the model (name, sha256), the factor, the source, the refine, and ComfyUI's
    graph of the upscale. Never replaces a file (`png.write_png`)."""
    from .comfy_graph import upscale_chunks
    from .png import save_png, write_png

    settings = dict(up.record(picture), width=image.width, height=image.height)
    if generation is not None:
        settings = {**generation, **settings}
    settings["version"] = __version__
    graphs = upscale_chunks(picture.name, up.model.name, up.model.scale, up.factor,
                            refine=settings.get("refine"))  # fmt: skip
    if generation is not None:
        return save_png(image, target, settings, graphs)
    line = (
        f"Upscaled {picture.name} (sha256 {picture.sha256[:16]}) with {up.model.name} "
        f"({up.model.architecture}, {up.model.scale}x, sha256 {up.sha256[:16]}) to "
        f"{up.factor:g}x, Size: {image.width}x{image.height}, Version: mlxflux {__version__}"
    )
    return write_png(image, target, {"parameters": line, "mlxflux": json.dumps(settings),
                                     **graphs})  # fmt: skip


def parse_upscale(spec: str) -> tuple[Path, float | None]:
    """`gen --upscale MODEL[:SCALE]`: the model file and the scale, if given."""
    from .request import split_number

    path, tail = split_number(spec)
    if tail is None:
        return Path(spec), None
    scale = float(tail)
    if not 0 < scale <= 16:
        raise Failure(f"--upscale: scale {tail} must be above 0 and at most 16")
    return Path(path), scale


def gen_stages(pipe, request, spec: str | None, denoise: float | None, steps: int | None,
               width: int, height: int) -> tuple[Upscaling | None, Refining | None]:  # fmt: skip
    """`gen --upscale MODEL[:SCALE] [--refine D]`: the stages after gen's own, checked (the
    model read, the refine prepared for the final size) before gen's first stage."""
    if spec is None:
        if denoise is not None:
            raise Failure("--refine: give --upscale MODEL too (it refines the upscaled picture)")
        return None, None
    up = open_upscaling(*parse_upscale(spec), flag="--upscale")
    if denoise is None:
        return up, None
    if steps is None:
        steps = refine_steps(request.steps, denoise)
    refine = replace(request, seeds=request.seeds[:1], steps=steps, denoise=denoise,
                     init_image=blank(64, 64),
                     noise=None, cache="none", cache_threshold=None, cache_range=None,
                     origins={})  # fmt: skip
    refiner = Refining(pipe, refine)
    refiner.prepare(blank(*up.size(width, height)), "check", REFINE_TILE)
    return up, refiner


def upscale_written(written: list[Path], seeds: list[int], up: Upscaling,
                    refiner: Refining | None) -> list[Path]:  # fmt: skip
    """gen's pictures upscaled (and refined with each one's seed), written beside them."""
    from .pixels import Picture

    out = []
    for path, seed in zip(written, seeds, strict=True):
        picture = Picture.of(path, "image")
        target = path.with_name(up.name(path.name))
        out.append(upscale_one(picture, up, refiner, target, 512, REFINE_TILE, seed))
        click.echo(str(out[-1]))
    return out


def _png_settings(path: Path, quiet: bool = False) -> dict:
    """An earlier PNG's settings (`--from-png`); `quiet`: {} when it carries none."""
    from .cli_common import read_from_png
    from .png_settings import read_png_settings

    if not quiet:
        return read_from_png(path)
    try:
        return read_png_settings(path)[0]
    except SettingsError:
        return {}


def _pipeline(model_dir: Path | None, precision, memory_budget):
    from .convert import default_model_dir
    from .pipeline import load

    folder = model_dir or default_model_dir(8, "flux1-dev")
    if not folder.exists():
        raise Failure(f"--model-dir: {folder}: no such model folder (--refine runs FLUX; make "
                      "one with `mlxflux convert` or give --model-dir)")  # fmt: skip
    try:
        return load(folder, precision, memory_budget)
    except SettingsError as e:
        raise Failure(flag_message(e)) from None
    except MlxfluxError as e:
        raise Failure(str(e)) from None


def blank(width: int, height: int):
    """A black picture: what a refine is checked on before the upscaled one exists."""
    from PIL import Image

    return Image.new("RGB", (width, height))


def _target(output: Path | None, name: str, count: int) -> Path:
    if output is None:
        return Path(name)
    if count > 1 or output.is_dir() or output.suffix.lower() != ".png":
        return output / name
    return output
