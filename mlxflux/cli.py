"""The `mlxflux` command: parses flags and calls the library with the same parameter names."""

import json
import sys
from pathlib import Path

import click

from . import __version__, private
from .cli_gen import Failure, ensure_model, gen, path_option
from .cli_upscale import upscale
from .quant import BITS
from .variants import VARIANTS


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
    # compiled code (MLX's CPU kernels) is cached in a folder no other user can write
    try:
        private.use_private_tmpdir()
    except OSError as e:
        click.echo(f"warning: no private temporary folder ({e}); using the shared one", err=True)


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
    type=click.Choice([*map(str, BITS), "none"]),
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
    type=click.Choice(["auto", *VARIANTS]),
    default="auto",
    show_default=True,
    help="Which FLUX.1 model the transformer is. auto: schnell when it has no guidance "
    "embedding; Kontext dev has dev's shapes, so a file, folder or repo name containing "
    "'kontext' suggests it (said in the output), else dev. The manifest records it.",
)
@click.option(
    "--taef1",
    metavar="PATH_OR_REPO",
    help="Add the tiny preview decoder (gen --preview taef1): ComfyUI's taef1_decoder.pth or "
    ".safetensors, a folder holding it, or the repo madebyollin/taef1. With no other source, "
    "it is added to the existing --out folder. Found by itself in a ComfyUI models/vae_approx.",
)
@click.option(
    "--redux",
    metavar="PATH_OR_REPO",
    help="Add FLUX.1 Redux (gen --redux): ComfyUI's style_models/flux1-redux-dev.safetensors, a "
    "folder holding it, or the repo black-forest-labs/FLUX.1-Redux-dev; needs --siglip. With "
    "no other source, added to the existing --out folder. Found by itself in a ComfyUI models/.",
)
@click.option(
    "--siglip",
    metavar="PATH_OR_REPO",
    help="SigLIP's vision tower for --redux: ComfyUI's clip_vision/"
    "sigclip_vision_patch14_384.safetensors, or the repo google/siglip-so400m-patch14-384.",
)
def convert(sources, flux, t5, clip, ae, tokenizers, hf_repo, bits, dtype, out, force, variant,
            taef1, redux, siglip):  # fmt: skip
    """Convert checkpoints into an MLX model folder (streaming; the folder appears only when
    complete and verified).

    Every layout is detected from the file's header: Black Forest Labs single files, ComfyUI
    fp8 (also scaled fp8 and all-in-one checkpoints), diffusers folders, GGUF files (FLUX
    transformers, T5 encoders), FLUX.1 dev, schnell and Kontext dev.

    \b
    Add the preview decoder, or Redux, to a folder converted before:
      mlxflux convert --taef1 madebyollin/taef1 --out FOLDER
      mlxflux convert --redux flux1-redux-dev.safetensors
                      --siglip sigclip_vision_patch14_384.safetensors --out FOLDER
    """
    from .convert import ConvertError, default_model_dir
    from .convert import convert as run
    from .convert.redux import add_redux
    from .convert.taef1 import add_taef1

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if (taef1 or redux or siglip) and not (sources or flux or t5 or clip or ae or hf_repo):
            folder = out or default_model_dir(_bits(bits))
            if taef1:
                add_taef1(folder, taef1, log)
            if redux or siglip:
                add_redux(folder, redux, siglip, log)
            return
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
            taef1=taef1,
            redux=redux,
            siglip=siglip,
            progress=True,
            log=log,
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
    from .errors import ModelFolderError
    from .model_folder import read_manifest

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

    from .errors import ModelFolderError
    from .model_folder import check_folder, component_files, verify_checksums
    from .models.registry import components_of

    try:
        check_folder(folder, manifest)
    except ModelFolderError as e:
        raise Failure(str(e)) from None
    files = [folder / c / f for c in components_of(manifest) for f in component_files(manifest, c)]
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking") as bar:
        problems = verify_checksums(folder, manifest, progress=bar.update)
    if problems:
        raise Failure("\n".join(problems))
    click.echo(f"{folder}: ok ({len(files)} files, {total / 2**30:.2f} GiB, checksums match)")


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
    from .png import write_png
    from .sheet import contact_sheet

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
    help="Address to listen on. 127.0.0.1: this Mac only. Any other (0.0.0.0, a LAN address) "
    "requires a token: made now and printed once with the URL, or --token. Whoever holds it "
    "can use the page, queue jobs on your GPU and read every PNG in the output folder.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Another name this machine is reached by (e.g. studio.local); repeatable. The page "
    "answers only to the loopback names, --host and these, so no web site can re-point a name "
    "of its own at it (DNS rebinding).",
)
@click.option(
    "--token",
    help="The token the page and the API require (default: none on loopback; off loopback, "
    "a random one, printed once). Scripts send it as 'Authorization: Bearer TOKEN'.",
)
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
@path_option(
    "--lora-dir",
    help="A folder of LoRA .safetensors files the page may pick from (e.g. ComfyUI's "
    "models/loras). Without it, only LoRAs uploaded from the page; no other path is ever read.",
)
@path_option(
    "--upscale-dir",
    help="A folder of upscale models (.pth/.safetensors: 4x-UltraSharp, RealESRGAN, e.g. "
    "ComfyUI's models/upscale_models): the gallery's pictures get \"upscale for print\" "
    "with them, refined by FLUX or not. Named only; no other path is read.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Images one job may ask for: a job holds the queue until all are made.",
)
@click.option(
    "--max-steps",
    type=click.IntRange(1),
    default=150,
    show_default=True,
    help="Steps one job may ask for (FLUX.1 dev draws in 20-50).",
)
@click.option(
    "--max-megapixels",
    type=click.FloatRange(0.01),
    default=4.2,
    show_default=True,
    help="Picture size one job may ask for (4.2: 2048x2048, twice FLUX.1's ~2 MP).",
)
def serve(model, host, port, allow_hosts, token, output_dir, precision, memory_budget,
          lora_dir, upscale_dir, max_images, max_steps, max_megapixels):  # fmt: skip
    """A local web page over the library: presets, prompt, seeds, the original cover for
    image to image / Kontext / control / fill, live progress, the result beside the original,
    a gallery of earlier PNGs. Jobs run one at a time on one loaded model. Pages of other
    sites can neither use it nor read it (README, "Security"). Needs the serve extra:
    pip install ".[serve]" from a clone."""
    import secrets

    try:
        import uvicorn

        from .serve import Limits, Studio, create_app
    except ImportError as e:
        raise Failure(f'{e.name} is missing: pip install ".[serve]" (from a clone)') from None
    from .errors import MlxfluxError
    from .guard import is_loopback
    from .pipeline import load
    from .precision import blas_advice

    folder = ensure_model(model, (), None)
    try:
        pipe = load(folder, precision, memory_budget)
    except MlxfluxError as e:
        raise Failure(str(e)) from None
    for flag, path in (("--lora-dir", lora_dir), ("--upscale-dir", upscale_dir)):
        if path is not None and not path.is_dir():
            raise Failure(f"{flag}: {path} is not a folder")
    limits = Limits(max_images, max_steps, max_megapixels)
    studio = Studio(pipe, output_dir or Path("mlxflux-output"), lora_dir, limits, upscale_dir)
    advice = blas_advice()
    if advice:
        click.echo(f"warning: {advice}", err=True)
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if not is_loopback(host):
        click.echo(f"note: listening on {host}: whoever holds the token can use it", err=True)
    click.echo(f"mlxflux serve: {pipe.variant_info.title} from {folder}; PNGs in "
               f"{studio.output}; open {url}", err=True)  # fmt: skip
    app = create_app(studio, bind=host, hosts=allow_hosts, token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning")


main.add_command(gen)
main.add_command(upscale)


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
