"""A generation request: every parameter of a generation named once, with its default, its
check and how the front ends show it.

`GenerationRequest` is frozen and checked when it is made: its input images are opened (once)
and every value is refused, in one line naming the parameter (`SettingsError.name`), before
any model loads. `resolve.resolve` is the one place where a front end's layers meet; the
model's own defaults come last (`GenerationRequest.for_model`, in `Pipeline.prepare`).
The CLI shows a refused parameter by its flag (`flag_of`), the page by its label (`label_of`).
"""

from dataclasses import MISSING, dataclass, field, fields, replace

import numpy as np

from .cache import DEFAULTS, METHODS
from .checks import (  # noqa: F401 - parse_lora, is_number, split_number: the request's parsers
    MAX_SEED,
    NO_PROMPT,
    _choice,
    _flag,
    _keep,
    _loras,
    _maybe_flag,
    _noise,
    _number,
    _picture,
    _pictures,
    _range,
    _redux_images,
    _seeds,
    _shift,
    _text,
    _whole,
    is_number,
    parse_lora,
    split_number,
)
from .errors import SettingsError
from .pixels import Picture
from .preview import METHODS as PREVIEW_METHODS
from .prompt_syntax import SYNTAXES as PROMPT_SYNTAXES
from .redux import CROPS as REDUX_CROPS
from .redux import STRENGTH_TYPES as REDUX_STRENGTH_TYPES
from .sampling import SCHEDULERS, TABLE_SIZE
from .tokenizers import T5_PADDING
from .variants.control import PREPROCESS
from .variants.kontext import REFERENCE_SCALES

MAX_GUIDANCE = 100.0  # ComfyUI's FluxGuidance node allows 0-100
DEFAULT_SIZE = 1024  # without a size given and without input images
IMG2IMG_DENOISE = 0.75  # an init image without a denoise given (no preset value either)


def param(default, check=_keep, *, flag=None, label=None, help="", cli=None):
    """A request field: its default, its check, its CLI flag (`--name` by default; the help
    and click's options) and its label on the page."""
    meta = {"check": check, "flag": flag, "label": label, "help": help, "cli": cli}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One generation: what to draw and how, every value checked (`mlxflux.Pipeline.prepare`
    turns it into a job; `Pipeline.generate(prompt, **fields)` makes one)."""

    prompt: str = param(MISSING, _text, label="Prompt", help="The prompt (overrides the preset's).")
    width: int | None = param(None, label="Width", help="Width in pixels, a multiple of 16 "
                              "[default: the preset's, the init image's, or 1024].",
                              cli={"type": int})  # fmt: skip
    height: int | None = param(None, label="Height", help="Height in pixels, a multiple of 16 "
                               "[default: the preset's, the init image's, or 1024].",
                               cli={"type": int})  # fmt: skip
    steps: int | None = param(
        None,
        _whole(1),
        label="Steps",
        cli={"type": int},
        help="Euler steps [default: the model's: dev 20, schnell 4].",
    )
    guidance: float | None = param(
        None, _number(0, MAX_GUIDANCE), label="Guidance",
        help="FLUX distilled guidance, 0-100 [default: the preset's or 3.5; the model's own on "
        "Kontext (2.5), Canny (30), Depth (10) and Fill (30), as BFL and ComfyUI].",
        cli={"type": float},
    )  # fmt: skip
    seeds: tuple[int, ...] = param((0,), _seeds, flag="--seeds", label="Seed")  # cli_gen: --seed
    scheduler: str = param("simple", _choice(SCHEDULERS), label="Scheduler",
                           help="ComfyUI scheduler [default: simple].",
                           cli={"choices": SCHEDULERS})  # fmt: skip
    shift: float | str | None = param(
        None, _shift, label="Shift",
        help="Fixed shift or 'auto' for the resolution-dependent shift of BFL/diffusers "
        "[default: the model's, as ComfyUI: dev 1.15, schnell 1.0].",
    )  # fmt: skip
    t5_padding: str = param(
        "comfy", _choice(tuple(T5_PADDING)), label="T5 padding",
        help="comfy: pad T5 tokens to >=256; max: pad/truncate to 512 [default: comfy].",
        cli={"choices": tuple(T5_PADDING)},
    )  # fmt: skip
    prompt_syntax: str = param(
        "comfy", _choice(PROMPT_SYNTAXES), label="Prompt syntax",
        help="comfy: ComfyUI's weights, (words) x1.1, (words:1.3), \\( \\) for brackets; "
        "plain: the prompt as written, as diffusers reads it [default: comfy].",
        cli={"choices": PROMPT_SYNTAXES},
    )  # fmt: skip
    denoise: float = param(
        1.0, _number(0, 1, low_open=True, optional=False), label="Denoise",
        help=f"With --init-image: how much to change, 0 < D <= 1 (1 ignores the image) "
        f"[default: the preset's, or {IMG2IMG_DENOISE}].",
        cli={"type": float},
    )  # fmt: skip
    loras: tuple = param(
        (), _loras, flag="--lora", label="LoRAs",
        help="A LoRA (kohya/ComfyUI, diffusers/PEFT, AI-Toolkit, OneTrainer or BFL names; LoRA, "
        "LoKr, LoHa, DoRA or full differences) at SCALE on the transformer and CLIP_SCALE on its "
        "text-encoder parts (default 1.0, CLIP_SCALE: SCALE; negative allowed); repeat to stack "
        "them. Works on 8-bit models too.",
        cli={"multiple": True, "metavar": "FILE[:SCALE[:CLIP_SCALE]]"},
    )  # fmt: skip
    init_image: Picture | None = param(
        None, _picture, label="Original",
        help="Image to image: start from this picture (e.g. the original cover), scaled to "
        "cover the size and centre-cropped, as ComfyUI's LoadImage -> VAEEncode -> KSampler.",
        cli={"path": True},
    )  # fmt: skip
    reference_images: tuple = param(
        (), _pictures, flag="--reference", label="Reference",
        help="FLUX.1 Kontext: the picture to re-imagine by instruction (e.g. the original "
        "cover); repeat for several (placed side by side as ComfyUI's chained ReferenceLatent "
        "nodes). Without a preset or a size, the output takes the first one's size as encoded.",
        cli={"multiple": True, "path": True},
    )  # fmt: skip
    reference_scale: str = param(
        "kontext", _choice(REFERENCE_SCALES), label="Reference scale",
        help="kontext: scale each reference to Kontext's preferred resolution of the nearest "
        "aspect ratio (ComfyUI's FluxKontextImageScale); none: its own size, floored to "
        "multiples of 16.",
        cli={"choices": REFERENCE_SCALES, "default": "kontext", "show_default": True},
    )  # fmt: skip
    control_image: Picture | None = param(
        None, _picture, label="Control image",
        help="FLUX.1 Canny / Depth models: the picture whose composition is kept, scaled to "
        "cover the size. Canny models take its edges (see --preprocess); Depth models take a "
        "depth map made elsewhere (e.g. Depth Anything in ComfyUI), as it is.",
        cli={"path": True},
    )  # fmt: skip
    preprocess: str = param(
        "auto", _choice(PREPROCESS), label="Preprocess",
        help="What becomes of --control-image: auto is canny on Canny models (ComfyUI's Canny "
        "node, thresholds 0.4/0.8) and none on Depth models.",
        cli={"choices": PREPROCESS, "default": "auto", "show_default": True},
    )  # fmt: skip
    mask: Picture | None = param(
        None, _picture, label="Mask",
        help="FLUX.1 Fill models: white repaints, black keeps, on --init-image (its size or "
        "aspect ratio). --denoise defaults to 1.0.",
        cli={"path": True},
    )  # fmt: skip
    outpaint: bool = param(
        False, _flag, label="Outpaint",
        help="FLUX.1 Fill models: centre --init-image on the canvas (the preset's or --width x "
        "--height) and paint the rest, e.g. a square vinyl cover into a DVD box.",
        cli={"is_flag": True},
    )  # fmt: skip
    redux_images: tuple = param(
        (), _redux_images, flag="--redux", label="Redux image",
        help="FLUX.1 Redux: more covers like this picture (its style, palette and subject in "
        "new compositions; the prompt steers): IMAGE[:STRENGTH], strength 0-10 [1]. Repeat to "
        "mix several, as chained StyleModelApply nodes. Needs Redux in the model folder "
        "(mlxflux convert --redux ... --siglip ...); any dev-shaped model, Kontext and Fill too.",
        cli={"multiple": True, "metavar": "IMAGE[:STRENGTH]"},
    )  # fmt: skip
    redux_strength_type: str = param(
        "multiply", _choice(REDUX_STRENGTH_TYPES), label="Redux strength type",
        help="How STRENGTH acts (ComfyUI's StyleModelApply): multiply scales the image's "
        "tokens; attn_bias adds log(STRENGTH) to the attention paid to them.",
        cli={"choices": REDUX_STRENGTH_TYPES, "default": "multiply", "show_default": True},
    )  # fmt: skip
    redux_crop: str = param(
        "center", _choice(REDUX_CROPS), label="Redux crop",
        help="How each Redux image becomes SigLIP's 384x384 (ComfyUI's CLIPVisionEncode crop): "
        "center scales its short side to 384 and keeps the centre; none squashes it whole.",
        cli={"choices": REDUX_CROPS, "default": "center", "show_default": True},
    )  # fmt: skip
    cache: str = param(
        "none", _choice(METHODS), label="Step cache",
        help="Skip transformer passes whose result changes little: easycache (ComfyUI's "
        "EasyCache node), first-block (diffusers' FirstBlockCache); none draws the exact "
        "picture [default: none].",
        cli={"choices": METHODS},
    )  # fmt: skip
    cache_threshold: float | None = param(
        None, _number(0, 100), label="Cache threshold",
        help="How much change may be skipped: higher is faster and further from the uncached "
        "picture [default: the method's own: easycache 0.2, first-block 0.05].",
        cli={"type": float},
    )  # fmt: skip
    cache_range: tuple | None = param(
        None, _range, label="Cache range",
        help="easycache: START,END, the part of the schedule where steps may be skipped, as "
        "the node's start_percent and end_percent [default: 0.15,0.95].",
        cli={"metavar": "START,END"},
    )  # fmt: skip
    preview: str = param(
        "auto", _choice(PREVIEW_METHODS), label="Preview",
        help="How the picture forming is previewed (with --preview-file, on the studio's page): "
        "latent2rgb (ComfyUI's, nearly free), taef1 (the tiny decoder, when the model folder "
        "has it: convert --taef1), none [default: auto, taef1 when there, else latent2rgb].",
        cli={"choices": PREVIEW_METHODS},
    )  # fmt: skip
    tiled_decode: bool | None = param(
        None, _maybe_flag, flag="--tiled-decode/--no-tiled-decode", label="Tiled decode",
        help="Force the VAE's row-tiled decode (and encode) on or off [default: when it would "
        "not fit].",
        cli={"is_flag": True},
    )  # fmt: skip
    noise: np.ndarray | None = param(None, _noise)  # [1, 16, H/8, W/8]: replaces seeded noise
    preset: str | None = param(None, label="Preset")  # recorded in the PNG; resolve applies it
    # where each value came from ("default", "preset", "png", "given"; absent: an argument)
    origins: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for f in params():
            value = f.metadata["check"](getattr(self, f.name), f.name)
            object.__setattr__(self, f.name, value)
        if self.width is not None or self.height is not None:
            _check_size(self.width or DEFAULT_SIZE, self.height or DEFAULT_SIZE)
        if self.steps is not None:
            self._check_schedule()
        if self.cache == "none" and (self.cache_threshold is not None or self.cache_range):
            name = "cache_threshold" if self.cache_threshold is not None else "cache_range"
            raise SettingsError("needs --cache easycache or first-block", name)
        if self.cache == "first-block" and self.cache_range is not None:
            raise SettingsError("first-block runs at every step (diffusers' FirstBlockCache "
                                "has no range); it is easycache's", "cache_range")  # fmt: skip

    @property
    def caching(self) -> tuple[str, float | None, tuple | None]:
        """(method, threshold, range) with the method's defaults filled in."""
        if self.cache == "none":
            return "none", None, None
        threshold, span = DEFAULTS[self.cache]
        return (self.cache, threshold if self.cache_threshold is None else self.cache_threshold,
                span if self.cache_range is None else self.cache_range)  # fmt: skip

    def given(self, name: str) -> bool:
        """Whether `name` holds something other than its default."""
        value, default = getattr(self, name), _field(name).default
        if isinstance(value, np.ndarray):
            return True
        return value is not None and value != default and value != ()

    def for_model(self, variant) -> "GenerationRequest":
        """The model's layer (`variants.Variant`): its steps and shift unless set, and its
        guidance unless set, or set only by a preset or the defaults when the variant has its
        own (Kontext 2.5, Canny 30, Depth 10, Fill 30: the presets' 3.5 is dev's)."""
        fill = {k: v for k, v in variant.defaults.items() if getattr(self, k) is None}
        weak = self.origins.get("guidance") in ("default", "preset")
        if variant.own_guidance and weak:
            fill["guidance"] = variant.guidance
        if not fill:
            return self
        request = replace(self, **fill, origins=self.origins)
        return request

    def _check_schedule(self) -> None:
        # the img2img schedule has int(steps / denoise) sigmas, from a table of TABLE_SIZE
        if self.steps / self.denoise <= TABLE_SIZE:
            return
        if self.origins.get("denoise") == "default":
            raise SettingsError(
                f"{self.steps} steps at denoise {self.denoise:g} need more than the schedule's "
                f"{TABLE_SIZE} sigmas",
                "steps",
            )
        raise SettingsError(f"{self.denoise!r} is too small for {self.steps} steps", "denoise")


def params():
    """The request's parameter fields, in order (not `origins`)."""
    return [f for f in fields(GenerationRequest) if "check" in f.metadata]


def _field(name: str):
    return next(f for f in fields(GenerationRequest) if f.name == name)


MAX_SIDE = 16384  # ComfyUI's nodes.MAX_RESOLUTION: no node takes a larger side


def _check_size(width, height) -> None:
    for value, name in ((width, "width"), (height, "height")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"must be a whole number of pixels, got {value!r}", name)
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise SettingsError(
            f"width and height must be positive multiples of 16, got {width}x{height} "
            f"(nearest: {max(16, round(width / 16) * 16)}x{max(16, round(height / 16) * 16)})",
            "width" if width % 16 or width < 16 else "height",
        )
    if max(width, height) > MAX_SIDE:
        name = "width" if width > MAX_SIDE else "height"
        raise SettingsError(f"{max(width, height)} is over {MAX_SIDE} pixels (ComfyUI's "
                            "MAX_RESOLUTION)", name)  # fmt: skip


def flag_of(name: str) -> str:
    """The CLI flag that sets parameter `name` (`--reference` for reference_images)."""
    names = {f.name: f for f in fields(GenerationRequest)}
    flag = names[name].metadata.get("flag") if name in names else None
    return (flag or f"--{name.replace('_', '-')}").split("/")[0]


def label_of(name: str) -> str:
    """The page's label for parameter `name`."""
    names = {f.name: f for f in fields(GenerationRequest)}
    label = names[name].metadata.get("label") if name in names else None
    return label or name.replace("_", " ").capitalize()
