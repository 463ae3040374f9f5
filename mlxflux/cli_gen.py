"""The `gen` command's parts: its settings (defaults, preset, flags), the first-run model
folder, the run with its progress bars and PNGs, and the summary. `mlxflux.cli` declares the
flags and calls these."""

import os
from pathlib import Path

import click

from ._version import __version__


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"mlxflux: error: {self.format_message()}", err=True)


# Generation defaults: one table for the CLI's help, its settings and the presets' overrides
# (steps and shift: the model's, Pipeline.defaults: dev 20 at 1.15, schnell 4 at 1.0)
GEN_DEFAULTS = {"width": 1024, "height": 1024, "guidance": 3.5, "scheduler": "simple",
                "t5_padding": "comfy"}  # fmt: skip
IMG2IMG_DENOISE = 0.75  # --init-image without --denoise and no preset value


GATED_NOTE = """\
No model folder at {model}, so mlxflux will make one.
It will download FLUX.1-dev from Hugging Face ({repo}): about 34 GB (transformer 23.8 GB,
T5-XXL 9.5 GB, CLIP-L 0.25 GB, VAE 0.17 GB) into the Hugging Face cache, then convert it.
The repository is gated: accept its license at https://huggingface.co/{repo} while logged in,
then log in here with `hf auth login` (or set HF_TOKEN).
Already have the files (ComfyUI's flux1-dev-fp8, t5xxl_fp8_e4m3fn, clip_l, ae)? Stop now and run
  mlxflux gen --from ~/ComfyUI/models ...     (or set MLXFLUX_SOURCE)"""


def ensure_model(model: Path | None, sources: tuple[Path, ...], hf_repo: str | None = None):
    """The model folder to use; on first run, convert from --from/MLXFLUX_SOURCE or download
    (FLUX.1-dev, or --hf-repo's: black-forest-labs/FLUX.1-schnell needs no account)."""
    from .convert import ConvertError, convert, default_model_dir
    from .convert.convert import FLUX_DEV_REPO

    if model is not None:
        if not model.exists():
            raise Failure(f"{model}: no such model folder (make one with `mlxflux convert`)")
        return model
    name = "flux1-dev"
    if hf_repo:
        name = hf_repo.rsplit("/", 1)[-1].lower().replace("flux.1-", "flux1-")
    target = default_model_dir(8, name)
    if target.exists():
        return target
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if hf_repo and hf_repo != FLUX_DEV_REPO:
        log(f"No model folder at {target}: downloading {hf_repo} and converting it")
        try:
            return convert([], target, hf_repo=hf_repo, progress=True, log=log)
        except ConvertError as e:
            raise Failure(str(e)) from None
    env = os.environ.get("MLXFLUX_SOURCE")
    sources = list(sources) or ([Path(p) for p in env.split(os.pathsep) if p] if env else [])
    try:
        if sources:
            log(f"No model folder at {target}: converting from {', '.join(map(str, sources))}")
            return convert(sources, target, progress=True, log=log)
        log(GATED_NOTE.format(model=target, repo=FLUX_DEV_REPO))
        return convert([], target, hf_repo=FLUX_DEV_REPO, progress=True, log=log)
    except ConvertError as e:
        raise Failure(str(e)) from None


def gen_settings(preset: str | None, given: dict, images: dict | None = None,
                 png: dict | None = None) -> dict:  # fmt: skip
    """Defaults, then the preset's values, then an earlier PNG's (`--from-png`), then the
    flags given; checked before any model loads. Every refusal is one line naming the flag."""
    from .errors import SettingsError
    from .presets import PresetError, get_preset
    from .settings import CHECKED, check_settings, open_init_image

    images = images or {}
    references = images.get("reference_images", [])
    settings = {**GEN_DEFAULTS, "prompt": None, "denoise": None, "init_image": None,
                "steps": None, "shift": None, "reference_images": [],
                "reference_scale": "kontext", "control_image": None, "preprocess": "auto",
                "mask": None, "outpaint": False, **images}  # fmt: skip
    size_given = given["width"] is not None or given["height"] is not None
    if preset:
        try:
            p = get_preset(preset)
        except PresetError as e:
            raise Failure(str(e)) from None
        settings.update({k: p[k] for k in settings if k in p})
        size_given = True
    if png:
        settings.update({k: v for k, v in png.items() if k in settings})
        size_given = size_given or "width" in png
    settings.update({k: v for k, v in given.items() if v is not None})
    if not settings["prompt"]:
        raise Failure("give --prompt TEXT or --preset NAME (see `mlxflux presets`)")
    try:
        if settings["shift"] not in (None, "auto"):
            settings["shift"] = float(settings["shift"])
    except ValueError:
        raise Failure(f"--shift: {settings['shift']!r} is not a number or 'auto'") from None
    try:
        # every input image opened now, so a bad file is refused before the model loads
        init = control = None
        if settings["init_image"] is None:
            if given["denoise"] is not None:
                raise Failure("--denoise: needs --init-image (it sets how much of it changes)")
            settings["denoise"] = 1.0
        else:
            init = open_init_image(settings["init_image"])[0]
            if given["denoise"] is None and (settings["mask"] or settings["outpaint"]):
                settings["denoise"] = 1.0  # Fill: diffusers' strength 1, ComfyUI's example
            if settings["denoise"] is None:
                settings["denoise"] = IMG2IMG_DENOISE
        if settings["control_image"] is not None:
            control = open_init_image(settings["control_image"], "control_image")[0]
        refs = [open_init_image(path, "reference")[0] for path in references]
        if not size_given:  # the pipeline's rule: the init image's, control's or reference's
            from .image_inputs import output_size

            size = output_size(init, control, refs, settings["reference_scale"])
            if size is not None:
                settings["width"], settings["height"] = size
        check_settings(**{k: settings[k] for k in CHECKED})
    except SettingsError as e:
        raise Failure(f"--{e.name.replace('_', '-')}: {e.reason}") from None
    return settings


def flag_message(e) -> str:
    """A SettingsError from the library, in the name of the flag that set it."""
    flag = {"reference_images": "reference"}.get(e.name, e.name).replace("_", "-")
    return f"--{flag}: {e.reason}"


def model_defaults(settings: dict, pipe, given: dict, png: dict) -> None:
    """Fill in what the loaded model decides: steps and shift unless given; on the variants
    with their own guidance (Kontext 2.5, Canny 30, Depth 10, Fill 30) that guidance unless
    --guidance or the PNG of --from-png gave one (the presets' 3.5 is dev's)."""
    for name, value in pipe.defaults.items():
        if settings.get(name) is None:
            settings[name] = value
    own = pipe.variant not in ("dev", "schnell")
    if own and given.get("guidance") is None and "guidance" not in png:
        settings["guidance"] = pipe.defaults["guidance"]


def generation_kwargs(settings: dict, tiled_decode=None) -> dict:
    """`Pipeline.generate_many`'s keywords from gen's settings: the CLI and the web page run
    the same call, so the same settings give the same pixels."""
    from .settings import CHECKED

    return dict(
        {k: settings[k] for k in CHECKED}, init_image=settings["init_image"],
        loras=settings["loras"], tiled_decode=tiled_decode,
        reference_images=settings["reference_images"], reference_scale=settings["reference_scale"],
        control_image=settings["control_image"], preprocess=settings["preprocess"],
        mask=settings["mask"], outpaint=settings["outpaint"],
    )  # fmt: skip


def run_generation(
    pipe, settings, seeds, indexes, preset, output, tiled_decode, header: str
) -> list[Path]:
    """Pipeline.generate_many with a bar per image; each PNG written as soon as it is decoded.
    Expected failures and Ctrl-C become one line; the images already written stay."""
    from tqdm.auto import tqdm

    from .comfy_graph import comfy_chunks
    from .errors import MlxfluxError, SettingsError
    from .image import save_png
    from .runs import output_path

    written: list[Path] = []
    try:  # every setting, init image and LoRA file is checked here, before any stage runs
        images = pipe.generate_many(settings["prompt"], seeds, on_step=lambda *a: step_done(*a),
                                    **generation_kwargs(settings, tiled_decode))  # fmt: skip
    except SettingsError as e:
        raise Failure(flag_message(e)) from None
    except MlxfluxError as e:
        raise Failure(str(e)) from None
    click.echo(f"{header}, memory: {pipe.last_report.settings['memory_plan']}", err=True)
    for lora in pipe.last_report.settings.get("loras", []):
        click.echo(f"lora {lora['file']} x {lora['scale']:g}: {lora['layers']} layers", err=True)
        if lora["not_applied"]:
            n = len(lora["not_applied"])
            click.echo(f"  warning: {n} text-encoder LoRA layers not applied "
                       "(mlxflux applies LoRAs to the transformer only)", err=True)  # fmt: skip
        if lora["unmatched"]:
            listed = ", ".join(lora["unmatched"][:5])
            more = f" (+{len(lora['unmatched']) - 5} more)" if len(lora["unmatched"]) > 5 else ""
            click.echo(f"  warning: keys that match no layer: {listed}{more}", err=True)

    def new_bar(index: int):
        label = f"image {index + 1}/{len(seeds)}" if len(seeds) > 1 else "denoise"
        return tqdm(total=settings["steps"], desc=label, unit="step", dynamic_ncols=True)

    bars = {0: new_bar(0)}  # one per image, each opened as the previous one closes

    def step_done(index: int, i: int, n: int) -> None:
        bars[index].update(1)
        if i == n:  # close now, so the bar's time is the denoising alone
            bars[index].close()
            if index + 1 < len(seeds):
                bars[index + 1] = new_bar(index + 1)

    try:
        for seed, image in images:
            meta = dict(pipe.last_report.settings, seed=seed, version=__version__, preset=preset)
            path = output_path(output, seed=seed, index=indexes[seed], preset=preset,
                               prompt=settings["prompt"])  # fmt: skip
            graphs = comfy_chunks(meta, pipe.manifest)
            written.append(save_png(image, path.resolve(), meta, graphs))
            click.echo(str(written[-1]))
    except KeyboardInterrupt:
        kept = f"{len(written)} of {len(seeds)} images written" if written else "no image written"
        raise Failure(f"interrupted: {kept}") from None
    except MlxfluxError as e:  # NonFiniteError, a tensor that does not load, ...
        raise Failure(f"{e}; no image was written" if not written else str(e)) from None
    finally:
        for bar in bars.values():
            bar.close()
    for entry, path in zip(pipe.last_report.images, written, strict=False):
        entry["output"] = str(path)
    return written


def summarize(rep, written: list[Path], all_seeds: list[int], group) -> None:
    """Each stage's time and peak; with several images, the time per image; under mlx.launch,
    rank 0 says how many images all processes wrote."""
    from .runs import total

    for name, st in rep.stages.items():
        click.echo(
            f"  {name:<11} {st.seconds:7.1f} s   peak {st.peak_bytes / 2**30:6.2f} GiB", err=True
        )
    if len(rep.images) > 1:
        per = [i["denoise_seconds"] + i.get("decode_seconds", 0) for i in rep.images]
        click.echo(f"  per image   {sum(per) / len(per):7.1f} s   ({len(per)} images)", err=True)
    made = total(group, len(written))
    if group.size() > 1 and group.rank() == 0:
        click.echo(
            f"{made} of {len(all_seeds)} images written by {group.size()} processes", err=True
        )


def parse_lora(spec: str) -> tuple[Path, float]:
    """FILE[:SCALE] -> (path, scale): a colon followed by a number is the scale."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass  # a colon in the file name: the whole text is the path
    return Path(spec), 1.0
