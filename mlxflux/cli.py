"""The `mlxflux` command: parses flags and calls the library with the same parameter names."""

import json
import sys
from pathlib import Path

import click

from . import __version__


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"mlxflux: error: {self.format_message()}", err=True)


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
    "a downloaded FLUX.1-dev folder, or single .safetensors files.",
)
@click.option("--flux", type=click.Path(path_type=Path), help="The transformer file.")
@click.option("--t5", type=click.Path(path_type=Path), help="The T5-XXL encoder file.")
@click.option("--clip", type=click.Path(path_type=Path), help="The CLIP-L encoder file.")
@click.option("--ae", type=click.Path(path_type=Path), help="The autoencoder (ae.safetensors).")
@click.option(
    "--tokenizers",
    type=click.Path(path_type=Path),
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
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output folder [default: ~/.cache/mlxflux/models/flux1-dev-q8, or under $MLXFLUX_HOME].",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def convert(sources, flux, t5, clip, ae, tokenizers, hf_repo, bits, dtype, out, force):
    """Convert checkpoints into an MLX model folder (streaming; the folder appears only when
    complete and verified).

    Every layout is detected from the file's header: Black Forest Labs single files, ComfyUI
    fp8 (also scaled fp8 and all-in-one checkpoints), diffusers folders.
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
def info(folder, as_json):
    """What a model folder holds: components, configs, quantization, sources."""
    from .weights import ModelFolderError, read_manifest

    try:
        m = read_manifest(folder)
    except ModelFolderError as e:
        raise Failure(str(e)) from None
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    q = m["quantization"]
    bits = f"{q['bits']}-bit affine, group {q['group_size']}" if q["bits"] else "none"
    click.echo(
        f"{folder}\n  format {m['format']}, made by mlxflux {m['mlxflux_version']} "
        f"on {m.get('created', '?')}, id {m.get('id', '?')}"
    )
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


if __name__ == "__main__":
    sys.exit(main())
