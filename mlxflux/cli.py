"""The `mlxflux` command: parses flags and calls the library with the same parameter names."""

import json
import sys
from pathlib import Path

import click

from . import __version__
from .cli_gen import (
    GEN_DEFAULTS,
    IMG2IMG_DENOISE,
    Failure,
    ensure_model,
    gen_settings,
    model_defaults,
    parse_lora,
    run_generation,
    summarize,
)


def path_option(*names, **kw):
    """A click option taking a file or folder path."""
    return click.option(*names, type=click.Path(path_type=Path), **kw)


def _bits(value: str) -> int | None:
    return None if value == "none" else int(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxflux")
def main():
    """FLUX.1-dev text-to-image in pure MLX, staged to fit a 16 GB Mac.

    \b
    First convert the weights you have, then generate:
      mlxflux convert --from ~/ComfyUI/models
      mlxflux gen --preset dvd
    """


@main.command()
@click.option(
    "--from",
    "sources",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A file or folder to convert from (repeatable): a ComfyUI models/ folder, "
    "a downloaded FLUX.1-dev folder, or single .safetensors or .gguf files.",
)
@path_option(
    "--flux",
    help="The transformer file (.safetensors, fp8 too, or a .gguf such as flux1-dev-Q8_0.gguf).",
)
@path_option(
    "--t5",
    help="The T5-XXL encoder file (.safetensors, or a .gguf with llama.cpp's names).",
)
@path_option("--clip", help="The CLIP-L encoder file.")
@path_option("--ae", help="The autoencoder (ae.safetensors).")
@path_option(
    "--tokenizers",
    help="A folder holding CLIP's vocab.json + merges.txt and T5's spiece.model.",
)
@click.option(
    "--hf-repo",
    help="Download a diffusers-layout repo by id with huggingface-hub "
    "(e.g. black-forest-labs/FLUX.1-dev; honours HF_TOKEN and HF_HUB_OFFLINE).",
)
@click.option(
    "--bits",
    type=click.Choice(["4", "6", "8", "none"]),
    default="8",
    show_default=True,
    help="Quantize the transformer's and T5's Linear layers (none: keep --dtype).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="dtype of what is not quantized.",
)
@path_option(
    "--out",
    help="Output folder [default: ~/.cache/mlxflux/models/flux1-dev-q8, or under $MLXFLUX_HOME].",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--variant",
    type=click.Choice(["auto", "dev", "schnell", "kontext", "canny", "depth", "fill"]),
    default="auto",
    show_default=True,
    help="Which FLUX.1 model the transformer is. auto: schnell when it has no guidance "
    "embedding; Kontext dev has dev's shapes, so a file, folder or repo name containing "
    "'kontext' suggests it (said in the output), else dev. The manifest records it.",
)
def convert(sources, flux, t5, clip, ae, tokenizers, hf_repo, bits, dtype, out, force, variant):
    """Convert checkpoints into an MLX model folder (streaming; the folder appears only when
    complete and verified).

    Every layout is detected from the file's header: Black Forest Labs single files, ComfyUI
    fp8 (also scaled fp8 and all-in-one checkpoints), diffusers folders, GGUF files (FLUX
    transformers, T5 encoders), FLUX.1 dev, schnell and Kontext dev.
    """
    from .convert import ConvertError
    from .convert import convert as run

    try:
        run(
            list(sources),
            out,
            bits=_bits(bits),
            dtype=dtype,
            flux=flux,
            t5=t5,
            clip=clip,
            ae=ae,
            tokenizers=tokenizers,
            hf_repo=hf_repo,
            force=force,
            variant=variant,
            progress=True,
            log=lambda m: click.echo(m, err=True),
        )
    except ConvertError as e:
        raise Failure(str(e)) from None
    except KeyboardInterrupt:
        raise Failure("interrupted: nothing was written") from None
    except OSError as e:
        raise Failure(f"{e.filename or 'output'}: {e.strerror or e}") from None


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option(
    "--check",
    is_flag=True,
    help="Verify the folder: every file, tensor header and tokenizer, then every weight file's "
    "bytes against the checksum recorded when it was converted.",
)
def info(folder, as_json, check):
    """What a model folder holds: components, configs, quantization, sources."""
    from .weights import ModelFolderError, read_manifest

    try:
        m = read_manifest(folder)
    except ModelFolderError as e:
        raise Failure(str(e)) from None
    if check:
        check_model_folder(folder, m)
        return
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    q = m["quantization"]
    bits = f"{q['bits']}-bit affine, group {q['group_size']}" if q["bits"] else "none"
    click.echo(
        f"{folder}\n  format {m['format']}, made by mlxflux {m['mlxflux_version']} "
        f"on {m.get('created', '?')}, id {m.get('id', '?')}"
    )
    from .variants import variant_of

    click.echo(f"  variant: {variant_of(m).name} ({variant_of(m).title})")
    click.echo(f"  quantization: {bits}; other weights {m['dtype']}")
    for name, entry in m["components"].items():
        size = sum(
            (folder / name / f).stat().st_size
            for files in entry["files"].values()
            for f in files
            if (folder / name / f).exists()
        )
        click.echo(
            f"  {name:<12} {len(entry['tensors']):5d} tensors  {size / 2**30:6.2f} GiB  "
            f"files: {', '.join(f'{g}={len(fs)}' for g, fs in entry['files'].items())}"
        )
        cfg = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
        click.echo(f"               {cfg}")
    click.echo("  sources:")
    for s in m["sources"]:
        click.echo(
            f"    {s['component']:<12} {s['name']} ({s['layout']}, {s['size'] / 2**30:.2f} GiB)"
        )
    for note in m.get("notes", []):
        click.echo(f"  note: {note}")


def check_model_folder(folder: Path, manifest: dict) -> None:
    """`info --check`: headers first (instant), then the checksums (reads every byte)."""
    from tqdm.auto import tqdm

    from .weights import (
        COMPONENTS,
        ModelFolderError,
        check_folder,
        component_files,
        verify_checksums,
    )

    try:
        check_folder(folder, manifest)
    except ModelFolderError as e:
        raise Failure(str(e)) from None
    files = [folder / c / f for c in COMPONENTS for f in component_files(manifest, c)]
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking") as bar:
        problems = verify_checksums(folder, manifest, progress=bar.update)
    if problems:
        raise Failure("\n".join(problems))
    click.echo(f"{folder}: ok ({len(files)} files, {total / 2**30:.2f} GiB, checksums match)")


@main.command()
@click.option("--preset", help="A cover preset (book, vinyl/album, dvd): prompt and settings.")
@click.option("--prompt", help="The prompt (overrides the preset's).")
@click.option(
    "--width",
    type=int,
    help=f"Width in pixels, a multiple of 16 [default: the preset's, the init image's, or "
    f"{GEN_DEFAULTS['width']}].",
)
@click.option(
    "--height",
    type=int,
    help=f"Height in pixels, a multiple of 16 [default: the preset's, the init image's, or "
    f"{GEN_DEFAULTS['height']}].",
)
@click.option("--steps", type=int, help="Euler steps [default: the model's: dev 20, schnell 4].")
@click.option(
    "--guidance",
    type=float,
    help=f"FLUX distilled guidance, 0-100 [default: the preset's or {GEN_DEFAULTS['guidance']}; "
    "on Kontext models 2.5, as BFL and ComfyUI's template].",
)
@click.option(
    "--scheduler",
    type=click.Choice(["simple", "beta", "normal"]),
    help=f"ComfyUI scheduler [default: {GEN_DEFAULTS['scheduler']}].",
)
@click.option(
    "--shift",
    help="Fixed shift or 'auto' for the resolution-dependent shift of BFL/diffusers "
    "[default: the model's, as ComfyUI: dev 1.15, schnell 1.0].",
)
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
@click.option(
    "--t5-padding",
    type=click.Choice(["comfy", "max"]),
    help="comfy: pad T5 tokens to >=256; max: pad/truncate to 512 [default: comfy].",
)
@path_option(
    "--init-image",
    help="Image to image: start from this picture (e.g. the original cover), scaled to cover "
    "the size and centre-cropped, as ComfyUI's LoadImage -> VAEEncode -> KSampler.",
)
@click.option(
    "--denoise",
    type=float,
    help=f"With --init-image: how much to change, 0 < D <= 1 (1 ignores the image) "
    f"[default: the preset's, or {IMG2IMG_DENOISE}].",
)
@click.option(
    "--reference",
    "references",
    multiple=True,
    type=click.Path(path_type=Path),
    help="FLUX.1 Kontext: the picture to re-imagine by instruction (e.g. the original cover); "
    "repeat for several (placed side by side as ComfyUI's chained ReferenceLatent nodes). "
    "Without a preset or a size, the output takes the first one's size as encoded.",
)
@click.option(
    "--reference-scale",
    type=click.Choice(["kontext", "none"]),
    default="kontext",
    show_default=True,
    help="kontext: scale each reference to Kontext's preferred resolution of the nearest "
    "aspect ratio (ComfyUI's FluxKontextImageScale); none: its own size, floored to "
    "multiples of 16.",
)
@path_option(
    "--control-image",
    help="FLUX.1 Canny / Depth models: the picture whose composition is kept, scaled to cover "
    "the size. Canny models take its edges (see --preprocess); Depth models take a depth map "
    "made elsewhere (e.g. Depth Anything in ComfyUI), as it is.",
)
@click.option(
    "--preprocess",
    type=click.Choice(["auto", "canny", "none"]),
    default="auto",
    show_default=True,
    help="What becomes of --control-image: auto is canny on Canny models (ComfyUI's Canny "
    "node, thresholds 0.4/0.8) and none on Depth models.",
)
@path_option(
    "--mask",
    help="FLUX.1 Fill models: white repaints, black keeps, on --init-image (its size or "
    "aspect ratio). --denoise defaults to 1.0.",
)
@click.option(
    "--outpaint",
    is_flag=True,
    help="FLUX.1 Fill models: centre --init-image on the canvas (the preset's or --width x "
    "--height) and paint the rest, e.g. a square vinyl cover into a DVD box.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="A LoRA for the transformer (kohya/ComfyUI, diffusers/PEFT or BFL names), at SCALE "
    "(default 1.0, negative allowed); repeat to stack them. Works on 8-bit models too.",
)
@path_option(
    "--model",
    help="Model folder [default: ~/.cache/mlxflux/models/flux1-dev-q8].",
)
@click.option(
    "--output",
    help="PNG path, or a template with {seed}, {index} and {preset} (e.g. "
    "covers/dvd-{seed}.png) [default: <preset or prompt>-<seed>.png here]. Never overwrites: "
    "an existing name gets -1, -2, ...",
)
@path_option(
    "--report",
    help="Write per-stage time and memory as JSON to this file.",
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
    "--tiled-decode/--no-tiled-decode",
    default=None,
    help="Force the VAE's row-tiled decode (and encode) on or off [default: when it would "
    "not fit].",
)
def gen(
    preset,
    seed,
    seeds,
    count,
    loras,
    model,
    output,
    report,
    sources,
    hf_repo,
    precision,
    memory_budget,
    tiled_decode,
    references,
    reference_scale,
    control_image,
    preprocess,
    mask,
    outpaint,
    from_png,
    **given,
):
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
    Several Macs:    mlx.launch --hostfile hosts.json -- mlxflux gen --preset dvd --count 8
    """
    from .errors import MlxfluxError, SettingsError
    from .pipeline import load
    from .runs import check_template, parse_seeds, share

    images = dict(reference_images=list(references), reference_scale=reference_scale,
                  control_image=control_image, preprocess=preprocess, mask=mask,
                  outpaint=outpaint)  # fmt: skip
    png = {}
    if from_png:
        from .png_settings import read_png_settings

        try:
            png, kind, notes = read_png_settings(from_png)
        except SettingsError as e:
            raise Failure(f"--from-png: {e.reason}") from None
        click.echo(f"settings from {from_png} ({kind}): "
                   + ", ".join(f"{k} {v!r}" if k == "prompt" else f"{k} {v}"
                               for k, v in png.items() if k != "prompt"), err=True)  # fmt: skip
        for note in notes:
            click.echo(f"note: {note}", err=True)
        if seed is None and not seeds and count is None and "seed" in png:
            seed = png["seed"]
    settings = gen_settings(preset, given, images, png)
    settings["loras"] = [parse_lora(spec) for spec in loras]
    try:
        all_seeds = parse_seeds(seeds, count, seed)
        check_template(output, len(all_seeds) > 1)
    except SettingsError as e:
        raise Failure(f"--{e.name}: {e.reason}") from None
    mine, group = share(all_seeds)
    folder = ensure_model(model, sources, hf_repo)
    try:
        pipe = load(folder, precision, memory_budget)  # checks the folder before any stage
    except MlxfluxError as e:
        raise Failure(str(e)) from None
    model_defaults(settings, pipe, given, png)
    if pipe.model_name == "flux1-schnell" and given["guidance"] is not None:
        click.echo("note: FLUX.1 schnell has no guidance input; --guidance is ignored", err=True)
    size = f"{settings['width']}x{settings['height']}"
    inputs = ""
    if settings["init_image"]:
        inputs += f", from {settings['init_image']} at denoise {settings['denoise']}"
    if references:
        inputs += (
            f", reference{'s' if len(references) > 1 else ''} {', '.join(map(str, references))}"
        )
    if control_image:
        inputs += f", control {control_image}"
    if mask or outpaint:
        inputs += f", {'mask ' + str(mask) if mask else 'outpainted'}"
    where = f" (process {group.rank() + 1} of {group.size()})" if group.size() > 1 else ""
    header = (
        f"seed{'s' if len(mine) > 1 else ''} {', '.join(map(str, mine))}{where}, {size}, "
        f"{settings['steps']} steps ({settings['scheduler']}), guidance {settings['guidance']:g}"
        f"{inputs}, model {folder}, "
        f"{pipe.precision} ({pipe.precision_why})"
    )
    indexes = {s: all_seeds.index(s) for s in mine}
    written = run_generation(pipe, settings, mine, indexes, preset, output, tiled_decode, header)
    rep = pipe.last_report
    if report:
        data = rep.to_dict()
        data["outputs"] = [str(p) for p in written]
        if len(written) == 1:
            data["output"] = str(written[0])
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(data, indent=1))
    summarize(rep, written, all_seeds, group)


@main.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@path_option("--output", required=True, help="The sheet's PNG path.")
@click.option("--height", type=click.IntRange(64, 4096), default=512, show_default=True,
              help="Height of every picture on the sheet.")  # fmt: skip
@click.option(
    "--map",
    "middle",
    metavar="canny|IMAGE",
    help="A column after the original that explains the results: 'canny' draws the "
    "original's edges (what a Canny model followed), or a depth map or mask file.",
)
def compare(original, images, output, height, middle):
    """A before/after sheet: the original cover and its re-imagined versions side by side,
    each captioned with its preset or prompt, seed, steps, scheduler and denoise (read from
    the PNGs' metadata). Never overwrites: an existing OUTPUT gets a -1, -2, ... suffix."""
    from .errors import SettingsError
    from .image import contact_sheet, write_png

    try:
        sheet, described = contact_sheet([original, *images], height, middle)
    except SettingsError as e:
        raise Failure(e.reason) from None
    path = write_png(sheet, output, {"mlxflux-sheet": json.dumps(described)})
    click.echo(str(path))


@main.command()
@path_option("--model", help="Model folder [default: ~/.cache/mlxflux/models/flux1-dev-q8].")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. 127.0.0.1: this Mac only. 0.0.0.0 (or a LAN address) lets "
    "anyone who can reach this machine use the page, queue jobs on your GPU, upload images "
    "and read every PNG in the output folder: there is no login. Only on a network you trust.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@path_option(
    "--output-dir",
    help="Where the PNGs go and the gallery reads from [default: ./mlxflux-output].",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Compute dtype [default: by chip, as gen].",
)
@click.option("--memory-budget", default="auto", show_default=True, help="As gen's.")
def serve(model, host, port, output_dir, precision, memory_budget):
    """A local web page over the library: presets, prompt, seeds, the original cover for
    image to image / Kontext / control / fill, live progress, the result beside the original,
    a gallery of earlier PNGs. Jobs run one at a time on one loaded model. Needs the serve
    extra: pip install "mlxflux[serve]"."""
    try:
        import uvicorn

        from .serve import Studio, create_app
    except ImportError as e:
        raise Failure(f'{e.name} is missing: pip install "mlxflux[serve]"') from None
    from .errors import MlxfluxError
    from .pipeline import load

    folder = ensure_model(model, (), None)
    try:
        pipe = load(folder, precision, memory_budget)
    except MlxfluxError as e:
        raise Failure(str(e)) from None
    studio = Studio(pipe, output_dir or Path("mlxflux-output"))
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: anyone who can reach it can use it", err=True)
    click.echo(f"mlxflux serve: {pipe.variant_info.title} from {folder}; PNGs in "
               f"{studio.output}; open http://{host}:{port}/", err=True)  # fmt: skip
    uvicorn.run(create_app(studio), host=host, port=port, log_level="warning")


@main.command()
def presets():
    """List the cover presets and their settings."""
    from .presets import all_presets

    for name, p in all_presets().items():
        alias = f" (alias: {', '.join(p['aliases'])})" if p.get("aliases") else ""
        click.echo(f"{name}{alias}: {p['title']}")
        click.echo(
            f"  {p['width']}x{p['height']}, {p['steps']} steps, {p['sampler']}, "
            f"{p['scheduler']}, cfg {p['cfg']}, guidance {p['guidance']}"
            + (f"; image to image: denoise {p['denoise']}" if "denoise" in p else "")
        )
        click.echo(f"  prompt: {p['prompt']}")


if __name__ == "__main__":
    sys.exit(main())
