"""The converter's error."""

from mlxflux.errors import MlxfluxError


class ConvertError(MlxfluxError, ValueError):
    """A conversion that cannot go ahead; the message names the file and the problem."""
