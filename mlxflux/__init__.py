"""mlxflux: FLUX.1-dev text-to-image in pure MLX."""

from ._version import __version__
from .errors import MlxfluxError, ModelFolderError, NonFiniteError, SettingsError
from .noise import comfy_noise
from .pipeline import Pipeline, load
from .request import GenerationRequest
from .sampling import sigmas

__all__ = [
    "GenerationRequest",
    "MlxfluxError",
    "ModelFolderError",
    "NonFiniteError",
    "Pipeline",
    "SettingsError",
    "__version__",
    "comfy_noise",
    "load",
    "sigmas",
    "upscale",
]


def __getattr__(name):
    # `mlxflux.convert` is a subpackage; importing it on first use keeps `import mlxflux` light
    if name == "convert":
        import importlib

        return importlib.import_module("mlxflux.convert")
    if name == "upscale":  # mlxflux.upscale(image, model, scale=None): `mlxflux.upscaling`
        from .upscaling import upscale

        return upscale
    raise AttributeError(f"module 'mlxflux' has no attribute {name!r}")
