"""The `gen` command: its flags (one per `GenerationRequest` field, declared there, plus the run's
own), the first-run model folder, the run with its progress bars and PNGs, and the summary.
It only builds a request (`request.resolve`) and runs the job the pipeline prepares."""

import json
import os
from dataclasses import replace
from pathlib import Path

import click

from ._version import __version__
from .cli_common import Failure, flag_message, path_option, read_from_png
from .errors import MlxfluxError, SettingsError
from .request import flag_of, params
from .resolve import resolve

__all__ = ["Failure", "ensure_model", "flag_message", "gen", "path_option", "read_from_png"]


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


def request_options(command):
    """A click option for every `GenerationRequest` field that has help: its flag, type and
    help come from the field (mlxflux/request.py), so a new field is a new flag."""
    for f in reversed(params()):
        meta = f.metadata
        if not meta["help"]:
            continue
        cli = dict(meta["cli"] or {})
        kw = {"help": meta["help"], "default": cli.pop("default", None)}
        if "choices" in cli:
            kw["type"] = click.Choice(list(cli.pop("choices")))
        if cli.pop("path", False):
            kw["type"] = click.Path(path_type=Path)
        kw.update(cli)
        command = click.option(flag_of(f.name) if not meta["flag"] else meta["flag"], f.name,
                               **kw)(command)  # fmt: skip
    return command


@click.command()
@click.option("--preset", help="A cover preset (book, vinyl/album, dvd): prompt and settings.")
@request_options
@click.option(
    "--seed",
    type=click.IntRange(0, 2**64 - 1),
    help="Noise seed, as ComfyUI's (CPU) [default: random, printed].",
)
@click.option(
    "--seeds",
    help="Several seeds, comma-separated (e.g. 3,17,42): one PNG each, the prompt encoded and "
    "each stage's weights loaded once.",
)
@click.option(
    "--count",
    type=int,
    help="N images with seeds --seed, --seed+1, ... (random start without --seed).",
)
@path_option("--model", help="Model folder [default: ~/.cache/mlxflux/models/flux1-dev-q8].")
@click.option(
    "--output",
    help="PNG path, or a template with {seed}, {index} and {preset} (e.g. "
    "covers/dvd-{seed}.png) [default: <preset or prompt>-<seed>.png here]. Never overwrites: "
    "an existing name gets -1, -2, ...",
)
@path_option("--report", help="Write per-stage time and memory as JSON to this file.")
@click.option(
    "--preview-file",
    help="Rewrite this PNG with the cover forming after every step (macOS Preview and Quick "
    "Look show it as it changes); {seed} in the name: one file per seed. See --preview.",
)
@path_option(
    "--from-png",
    help="Start from the settings of an earlier PNG: mlxflux's own, an A1111/Forge "
    "'parameters' chunk or a ComfyUI 'prompt' graph (prompt, seed, size, steps, scheduler, "
    "guidance, shift, denoise). Flags given override them; a preset gives way to them.",
)
@click.option(
    "--from",
    "sources",
    multiple=True,
    type=click.Path(path_type=Path),
    help="First run only: convert these files/folders if there is no model folder.",
)
@click.option(
    "--hf-repo",
    help="First run only: download and convert this Hugging Face repo, e.g. "
    "black-forest-labs/FLUX.1-schnell (Apache-2.0, no account needed) [default: FLUX.1-dev].",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Compute dtype [default: float32 on the CPU backend; on Macs float16 on M1/M2 (no "
    "native bfloat16; float32 residual streams, and any block that overflows float16 runs "
    "again in float32), bfloat16 on M3 and later; bfloat16 on CUDA].",
)
@click.option(
    "--memory-budget",
    default="auto",
    show_default=True,
    help="Memory the run may use, in GiB, or 'auto' (on a Mac the GPU's recommended working "
    "set, elsewhere the available memory, less a margin). Stages whose weights do not fit "
    "read them from the model folder a block at a time (the same pixels, slower where the disk "
    "is slow); a budget below what even that needs is refused before anything runs.",
)
@click.option(
    "--upscale",
    "upscale_spec",
    metavar="MODEL[:SCALE]",
    help="Then upscale each picture for print with this ESRGAN-family model file (as `mlxflux "
    "upscale --model`; SCALE below its factor resizes with Lanczos), written beside it as "
    "NAME-upscaled-Nx.png; the model is read before the first stage.",
)
@click.option(
    "--refine",
    type=click.FloatRange(0, 1, min_open=True),
    help="With --upscale: then FLUX image to image at this denoise (0.2-0.35) over ~1024 px "
    "tiles of the upscaled picture, same prompt, seed and LoRAs, steps x DENOISE steps per "
    "tile (as `mlxflux upscale --refine`).",
)
def gen(preset, seed, seeds, count, model, output, report, preview_file, from_png, sources,
        hf_repo, precision, memory_budget, upscale_spec, refine, **given):  # fmt: skip
    """Generate images, staged: text encoders, then the transformer, then the VAE.

    \b
    Text to image:   mlxflux gen --preset dvd --seed 42
    Image to image:  mlxflux gen --preset dvd --init-image interstellar.jpg --denoise 0.6
    By instruction:  mlxflux gen --preset dvd --model ~/models/kontext --reference interstellar.jpg
                     --prompt "the same cover as a brutalist concrete poster, keep the title"
    Composition:     mlxflux gen --preset book --model ~/models/canny --control-image 1984.jpg
    Fill / outpaint: mlxflux gen --preset dvd --model ~/models/fill --init-image ram.jpg --outpaint
    Iterate:         mlxflux gen --from-png dvd-42.png --seed 43
    Many covers:     mlxflux gen --preset dvd --count 8 --output covers/dvd-{seed}.png
    For print:       mlxflux gen --preset dvd --upscale 4x-UltraSharp.pth:2.6 --refine 0.3
    Several Macs:    mlx.launch --hostfile hosts.json -- mlxflux gen --preset dvd --count 8
    """
    from .cli_upscale import gen_stages, upscale_written
    from .pipeline import load
    from .precision import blas_advice
    from .runs import check_template, share

    png = read_from_png(from_png) if from_png else {}
    try:  # every setting checked and every input image opened here, before any model loads
        request = resolve({**given, "seed": seed, "seeds": seeds, "count": count}, preset, png)
        check_template(output, len(request.seeds) > 1)
    except SettingsError as e:
        raise Failure(flag_message(e)) from None
    mine, group = share(list(request.seeds))
    folder = ensure_model(model, sources, hf_repo)
    try:
        pipe = load(folder, precision, memory_budget)  # checks the folder before any stage
        job = pipe.prepare(replace(request, seeds=tuple(mine), origins=request.origins))
    except SettingsError as e:
        raise Failure(flag_message(e)) from None
    except MlxfluxError as e:
        raise Failure(str(e)) from None
    up, refiner = gen_stages(pipe, job.request, upscale_spec, refine, None, job.width,
                             job.height)  # fmt: skip
    if not pipe.variant_info.guided and given.get("guidance") is not None:
        click.echo("note: FLUX.1 schnell has no guidance input; --guidance is ignored", err=True)
    advice = blas_advice()
    if advice:
        click.echo(f"warning: {advice}", err=True)
    where = f" (process {group.rank() + 1} of {group.size()})" if group.size() > 1 else ""
    click.echo(f"{header(job)}{where}, model {folder}, {pipe.precision} ({pipe.precision_why}), "
               f"memory: {job.report.settings['memory_plan']}", err=True)  # fmt: skip
    indexes = {s: list(request.seeds).index(s) for s in mine}
    written = run_job(job, indexes, preset, output, preview_file)
    if up is not None:
        done = [i["seed"] for i in job.report.images if "output" in i]
        upscale_written(written, done, up, refiner)
    if report:
        data = job.report.to_dict()
        data["outputs"] = [str(p) for p in written]
        if len(written) == 1:
            data["output"] = str(written[0])
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(data, indent=1))
    summarize(job.report, written, list(request.seeds), group)


def header(job) -> str:
    """One line saying what the job makes: seeds, size, steps, guidance, inputs."""
    r = job.request
    inputs = ""
    if r.init_image is not None:
        inputs += f", from {r.init_image.name} at denoise {r.denoise}"
    if r.reference_images:
        s = "s" if len(r.reference_images) > 1 else ""
        inputs += f", reference{s} {', '.join(p.name for p in r.reference_images)}"
    if r.control_image is not None:
        inputs += f", control {r.control_image.name}"
    if r.redux_images:
        inputs += ", Redux " + ", ".join(f"{p.name} x {s:g}" for p, s in r.redux_images)
    if r.mask is not None or r.outpaint:
        inputs += f", {'mask ' + r.mask.name if r.mask is not None else 'outpainted'}"
    seeds = ", ".join(map(str, r.seeds))
    return (f"seed{'s' if len(r.seeds) > 1 else ''} {seeds}, {job.width}x{job.height}, "
            f"{r.steps} steps ({r.scheduler}), guidance {r.guidance:g}{inputs}")  # fmt: skip


def run_job(job, indexes: dict, preset: str | None, output: str | None,
            preview_file: str | None = None) -> list[Path]:  # fmt: skip
    """The job with a bar per image; each PNG written as soon as it is decoded; with
    `preview_file`, the cover forming rewritten there after every step. Expected failures and
    Ctrl-C become one line; the images already written stay."""
    from tqdm.auto import tqdm

    from .comfy_graph import comfy_chunks
    from .png import replace_png, save_png
    from .runs import output_path

    seeds, settings = job.request.seeds, job.report.settings
    for lora in settings.get("loras", []):
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(lora.get("adapters", {}).items()))
        text = (f"; text encoders: {lora['text_layers']} layers x {lora['clip_scale']:g}"
                if lora.get("text_layers") else "")  # fmt: skip
        click.echo(f"lora {lora['file']} x {lora['scale']:g}: {lora['layers']} layers ({kinds})"
                   f"{text}", err=True)  # fmt: skip
        for kind, n in lora.get("unsupported", {}).items():
            click.echo(f"  warning: {n} {kind} adapters not applied (mlxflux applies LoRA, LoHa, "
                       "LoKr, DoRA and full differences)", err=True)  # fmt: skip
        if lora["not_applied"]:
            n = len(lora["not_applied"])
            click.echo(f"  warning: {n} text-encoder LoRA layers not applied "
                       "(their layers are not CLIP-L's or T5's)", err=True)  # fmt: skip
        if lora["unmatched"]:
            listed = ", ".join(lora["unmatched"][:5])
            more = f" (+{len(lora['unmatched']) - 5} more)" if len(lora["unmatched"]) > 5 else ""
            click.echo(f"  warning: keys that match no layer: {listed}{more}", err=True)

    def new_bar(index: int):
        label = f"image {index + 1}/{len(seeds)}" if len(seeds) > 1 else "denoise"
        return tqdm(total=job.request.steps, desc=label, unit="step", dynamic_ncols=True)

    bars: dict = {}  # one per image, each opened at its first step (after the text's bar)
    units = {"vision": "layer", "text": "layer", "encode": "block", "decode": "block"}
    stage_bars: dict = {}  # the text, encode and decode stages' bars, by stage

    def stage_progress(stage: str, done: int, total: int) -> None:
        bar = stage_bars.get(stage)
        if bar is None or (done == 0 and bar.n):  # a new run: the next image's decode
            if bar is not None:
                bar.close()
            bar = stage_bars[stage] = tqdm(total=total, desc=stage, dynamic_ncols=True,
                                           unit=units.get(stage, "unit"))  # fmt: skip
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    job.report.on_progress = stage_progress

    def step_done(index: int, i: int, n: int) -> None:
        if index not in bars:
            bars[index] = new_bar(index)
        bars[index].update(1)
        if i == n:  # close now, so the bar's time is the denoising alone
            bars[index].close()

    written: list[Path] = []
    try:

        def preview(index: int, step: int, steps: int, picture) -> None:
            replace_png(picture, preview_file.format(seed=seeds[index], index=index))

        on_preview = preview if preview_file and job.preview != "none" else None
        for seed, image in job.run(on_step=step_done, on_preview=on_preview):
            meta = dict(settings, seed=seed, version=__version__, preset=preset)
            path = output_path(output, seed=seed, index=indexes[seed], preset=preset,
                               prompt=job.request.prompt)  # fmt: skip
            graphs = comfy_chunks(meta, job.pipe.manifest)
            written.append(save_png(image, path.resolve(), meta, graphs))
            click.echo(str(written[-1]))
    except KeyboardInterrupt:
        kept = f"{len(written)} of {len(seeds)} images written" if written else "no image written"
        raise Failure(f"interrupted: {kept}") from None
    except MlxfluxError as e:  # NonFiniteError, a tensor that does not load, ...
        raise Failure(f"{e}; no image was written" if not written else str(e)) from None
    finally:
        for bar in [*bars.values(), *stage_bars.values()]:
            bar.close()
    for entry, path in zip(job.report.images, written, strict=False):
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
