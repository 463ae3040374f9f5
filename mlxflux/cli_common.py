"""What every command shares: the one-line failure (exit 2), path options, a refused setting
in its flag's words, and `--from-png`'s reading of an earlier PNG."""

from pathlib import Path

import click

from .errors import SettingsError
from .request import flag_of


class Failure(click.ClickException):
    """A one-line error on stderr and exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"mlxflux: error: {self.format_message()}", err=True)


def path_option(*names, **kw):
    """A click option taking a file or folder path."""
    return click.option(*names, type=click.Path(path_type=Path), **kw)


def flag_message(e: SettingsError) -> str:
    """A refused setting in the name of the flag that sets it."""
    return f"{flag_of(e.name)}: {e.reason}"


def read_from_png(path: Path) -> dict:
    """--from-png: the earlier PNG's settings, said on stderr with what cannot carry over."""
    from .png_settings import read_png_settings

    try:
        png, kind, notes = read_png_settings(path)
    except SettingsError as e:
        raise Failure(f"--from-png: {e.reason}") from None
    click.echo(f"settings from {path} ({kind}): "
               + ", ".join(f"{k} {v!r}" if k == "prompt" else f"{k} {v}"
                           for k, v in png.items() if k != "prompt"), err=True)  # fmt: skip
    for note in notes:
        click.echo(f"note: {note}", err=True)
    return png
