"""Generation settings, checked before any stage runs: one line per refusal, naming the
setting (`SettingsError.name`), which the CLI turns into the flag's name."""

import math

from PIL import Image

from .errors import SettingsError
from .image import open_image
from .sampling import SCHEDULERS
from .tokenizers import T5_PADDING


def check_size(width: int, height: int) -> None:
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise SettingsError(
            f"width and height must be positive multiples of 16, got {width}x{height} "
            f"(nearest: {max(16, round(width / 16) * 16)}x{max(16, round(height / 16) * 16)})",
            "width" if width % 16 or width < 16 else "height",
        )


# what check_settings takes, in the names of Pipeline.generate and the CLI's flags
CHECKED = ("width", "height", "steps", "guidance", "shift", "scheduler", "t5_padding", "denoise")
MAX_GUIDANCE = 100.0  # ComfyUI's FluxGuidance node allows 0-100


def check_settings(
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    shift,
    scheduler: str,
    t5_padding: str,
    denoise: float = 1.0,
) -> None:
    """Refuse settings that cannot give a right picture, before any stage runs."""
    check_size(width, height)
    # steps and shift may be None: the model's defaults, filled in (and checked) by Pipeline
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise SettingsError(f"must be a whole number of at least 1, got {steps!r}", "steps")
    if not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise SettingsError(
            f"must be a finite number from 0 to {MAX_GUIDANCE:g}, got {guidance!r}", "guidance"
        )
    if shift not in (None, "auto") and (
        not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0
    ):
        raise SettingsError(f"must be a finite number above 0 or 'auto', got {shift!r}", "shift")
    if scheduler not in SCHEDULERS:
        raise SettingsError(
            f"must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}", "scheduler"
        )
    if t5_padding not in T5_PADDING:
        raise SettingsError(f"must be comfy or max, got {t5_padding!r}", "t5_padding")
    if not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
        raise SettingsError(f"must be above 0 and at most 1, got {denoise!r}", "denoise")
    if (
        steps is not None and steps / denoise > 10_000
    ):  # the schedule would have more steps than its sigma table
        raise SettingsError(f"{denoise!r} is too small for {steps} steps", "denoise")


def open_init_image(source, setting: str = "init_image") -> tuple[Image.Image, str, str]:
    """(RGB image, name, sha256) of an input image (init image, reference, ...), refused
    (SettingsError naming `setting`) when it cannot be read or is smaller than 16x16."""
    image, name, digest = open_image(source, setting)
    if min(image.size) < 16:
        raise SettingsError(
            f"{name} is {image.width}x{image.height}: at least 16x16 is needed", setting
        )
    return image, name, digest
