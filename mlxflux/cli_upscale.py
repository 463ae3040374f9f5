"""`mlxflux upscale`: pictures made print-sized by an upscale model, as ComfyUI's
UpscaleModelLoader -> ImageUpscaleWithModel draws them (`mlxflux.upscaling`)."""

import hashlib
import json
from pathlib import Path

import click

from ._version import __version__
from .cli_gen import Failure, path_option


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
def upscale(images, model_file, scale, output, tile):
    """Upscale pictures with an ESRGAN-family model, in ComfyUI's tiles (512, overlap 32,
    feathered), e.g. a 832x1216 DVD cover to 3328x4864 for print at 300 dpi. Each PNG records
    the model (name, sha256), the factor and the source picture, and carries ComfyUI's graph."""
    from tqdm.auto import tqdm

    from .comfy_graph import upscale_chunks
    from .errors import SettingsError
    from .pixels import Picture
    from .png import write_png
    from .upscaling import UpscaleError, load_upscaler
    from .upscaling import upscale as run

    try:
        model = load_upscaler(model_file)
        if scale is not None and scale > model.scale:
            raise Failure(f"--scale: {scale:g} is over {model.name}'s own {model.scale}x")
        pictures = [Picture.of(path, "image") for path in images]  # all opened before any run
    except UpscaleError as e:
        raise Failure(f"--model: {e}") from None
    except SettingsError as e:
        raise Failure(e.reason) from None
    model_sha = hashlib.sha256(Path(model_file).expanduser().read_bytes()).hexdigest()
    factor = scale or model.scale
    click.echo(f"{model.name}: {model.architecture}, {model.scale}x; final {factor:g}x", err=True)
    for picture, path in zip(pictures, images, strict=True):
        image = picture.image
        target = _target(output, path, factor, len(images))
        bar = tqdm(desc=path.name, unit="tile", dynamic_ncols=True)

        def tick(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = run(image, model, scale, tile=tile, on_tile=tick)
        except KeyboardInterrupt:
            raise Failure(f"interrupted: {path.name} not written") from None
        finally:
            bar.close()
        settings = {"upscale_model": model.name, "upscale_model_sha256": model_sha,
                    "upscale_architecture": model.architecture, "model_scale": model.scale,
                    "scale": factor, "source": path.name, "source_sha256": picture.sha256,
                    "width": result.width, "height": result.height,
                    "version": __version__}  # fmt: skip
        line = (
            f"Upscaled {path.name} (sha256 {picture.sha256[:16]}) with {model.name} "
            f"({model.architecture}, {model.scale}x, sha256 {model_sha[:16]}) to {factor:g}x, "
            f"Size: {result.width}x{result.height}, Version: mlxflux {__version__}"
        )
        chunks = {"parameters": line, "mlxflux": json.dumps(settings),
                  **upscale_chunks(path.name, model.name, model.scale, factor)}  # fmt: skip
        click.echo(str(write_png(result, target, chunks)))


def _target(output: Path | None, source: Path, factor: float, count: int) -> Path:
    name = f"{source.stem}-upscaled-{factor:g}x.png"
    if output is None:
        return Path(name)
    if count > 1 or output.is_dir() or output.suffix.lower() != ".png":
        return output / name
    return output
