"""The `mlxflux` command: parses flags and calls the library with the same parameter names."""

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxflux")
def main():
    """FLUX.1-dev text-to-image in pure MLX, staged to fit a 16 GB Mac."""


if __name__ == "__main__":
    main()
