"""mlxflux.convert: checkpoint files in every layout users have -> an MLX model folder."""

from .convert import ConvertError, convert, default_model_dir

__all__ = ["ConvertError", "convert", "default_model_dir"]
