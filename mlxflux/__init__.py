"""mlxflux: FLUX.1-dev text-to-image in pure MLX."""

from ._version import __version__

__all__ = ["__version__"]
