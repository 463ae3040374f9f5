"""The studio's "upscale for print" (`mlxflux serve --upscale-dir`): a picture of the gallery
upscaled by a model of the server's folder, named, never a path, and with a refine, given
detail back by FLUX with the picture's own prompt and seed, as `mlxflux upscale --refine`
does. Checked on arrival (the model read, the refine prepared for the final size), then a job
of the studio's queue like any other: progress, cancel, the PNG in the output folder."""

import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError
from .report import Report
from .studio_inputs import BadRequest, files_in

UPSCALE_SUFFIXES = (".pth", ".safetensors")
FIELDS = ("image", "model", "scale", "refine")


class UpscaleLibrary:
    """The upscale models by name: the files of `folder` (None: none)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder).expanduser().resolve() if folder else None

    def names(self) -> dict[str, Path]:
        return files_in(self.folder, UPSCALE_SUFFIXES)

    def find(self, name) -> Path:
        known = self.names()
        if not isinstance(name, str) or name not in known:
            how = ("GET /api/upscalers lists them" if known else
                   "it was started without upscale models: serve --upscale-dir")  # fmt: skip
            raise BadRequest(f"Upscale model: not one of this server's ({how})", "model")
        return known[name]


@dataclass
class UpscaleJob:
    """What a studio `Entry` runs: the upscale (and refine) of one picture; the attributes the
    queue's page reads are a generation job's (request, width, height, report, preview)."""

    pipe: object
    picture: object  # pixels.Picture: the gallery's PNG
    up: object  # cli_upscale.Upscaling
    refine: object | None  # the refine's GenerationRequest
    width: int
    height: int
    request: object  # the refine's request, or what the page shows of a plain upscale
    report: Report
    preview: str = "none"
    generation: dict | None = None  # the refine's settings, once it ran

    def run(self, on_step=None, on_preview=None) -> Iterator[tuple[int, object]]:
        """Yields (seed, picture) once: upscaled in tiles (stage "upscale", its progress in
        tiles), then refined (the refine's own stages, its steps as tile steps)."""
        from .refine import TILE, prepare_refine

        report = self.report
        if report.on_stage is not None:
            report.on_stage("upscale")

        def tiles(done: int, total: int) -> None:
            if report.on_progress is not None:
                report.on_progress("upscale", done, total)

        image = self.up.run(self.picture, 512, on_tile=tiles)
        if self.refine is not None:
            name = self.up.name(self.picture.name)
            refine = prepare_refine(self.pipe, image, self.refine, name, TILE)
            refine.job.report.on_stage = report.on_stage
            refine.job.report.on_progress = report.on_progress
            image = refine.run(on_step and (lambda done, total: on_step(0, done, total)))
            report.stages.update(refine.job.report.stages)
            self.generation = refine.job.report.settings
        yield self.request.seeds[0], image

    def save(self, image, folder: Path) -> Path:
        from .cli_upscale import write_upscaled

        name = self.up.name(self.picture.name)
        return write_upscaled(image, self.picture, self.up, self.generation, folder / name)


def prepare_upscale(studio, raw) -> UpscaleJob:
    """The job of a POST /api/upscale body: {"image": a gallery PNG's name, "model": an upscale
    model's name, "scale": at most the model's [its own], "refine": a denoise in (0, 1] or
    null}. BadRequest with one line, naming the field, when it cannot run."""
    from .cli_upscale import Upscaling, blank, refine_request
    from .pixels import MAX_PIXELS, Picture
    from .png_settings import read_png_settings
    from .refine import TILE, prepare_refine
    from .upscaling import UpscaleError

    if not isinstance(raw, dict):
        raise BadRequest("a JSON object: image, model, scale, refine")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown {', '.join(unknown)} (send {', '.join(FIELDS)})")
    image = raw.get("image")
    path = studio.image_path(image) if isinstance(image, str) else None
    if path is None:
        raise BadRequest("Picture: not one of the gallery's PNGs", "image")
    model = studio.upscalers.find(raw.get("model"))
    scale, denoise = (_number(raw.get(k), k) for k in ("scale", "refine"))
    if denoise is not None and not 0 < denoise <= 1:
        raise BadRequest(f"Refine: {denoise:g} is not a denoise in (0, 1]", "refine")
    try:
        up = Upscaling.open(model, scale)
    except UpscaleError as e:
        raise BadRequest(f"Upscale model: {e}".replace(str(model), model.name), "model") from None
    try:
        picture = Picture.of(path, "image")
    except SettingsError as e:
        raise BadRequest(f"Picture: {e.reason.replace(str(path), path.name)}", "image") from None
    width, height = up.size(*picture.image.size)
    if width * height > MAX_PIXELS:
        raise BadRequest(f"Scale: {width}x{height} is over the {MAX_PIXELS / 1e6:.0f} "
                         "megapixels a picture may have", "scale")  # fmt: skip
    request = types.SimpleNamespace(seeds=(0,), prompt=f"upscale of {path.name}", steps=0)
    refine = None
    if denoise is not None:
        try:
            settings = read_png_settings(path)[0]
            refine = refine_request(settings, denoise)
            studio.limits.check(refine, "seeds")
            check = prepare_refine(studio.pipe, blank(width, height), refine, path.name, TILE)
        except SettingsError as e:
            if e.name == "from_png":
                raise BadRequest("Refine: this picture carries no prompt to refine with",
                                 "refine") from None  # fmt: skip
            raise BadRequest(f"Refine: {e.reason}", "refine") from None
        request = refine
        width, height = check.width, check.height
    return UpscaleJob(studio.pipe, picture, up, refine, width, height, request, Report())


def _number(value, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name.capitalize()}: {value!r} is not a number", name)
    return float(value)
