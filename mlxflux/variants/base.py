"""What every FLUX.1 variant shares: the `Variant` record, the `Family` of inputs a variant takes,
and the `Conditioning` those inputs become.

A family (one module of this package each) says which of a request's fields are its inputs,
how it opens and checks them against the model, how the encode stage turns them into
conditioning, and what the PNG and the ComfyUI graph record of them. The stages ask a
`Conditioning` for the transformer's inputs and never ask which variant made it.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import SettingsError
from ..models.latents import pack_latents


@dataclass
class Conditioning:
    """What a generation's inputs add to the transformer's, besides the noisy latent (empty for
    text to image). Conditionings combine with `+`:

    tokens [1, N, C] with ids [N, 3]: appended after the image tokens (Kontext's references);
        the trunk's velocity for them is dropped.
    channels [1, L, C]: concatenated to the packed latent's 64 channels, token by token (a
        control image's latents for Canny/Depth; the masked image and its mask for Fill).
    text [1, M, context] : appended after the prompt's T5 tokens, with text position ids
        (zero): the slot for image embeddings that condition like text (Redux).
    text_bias ((count, bias), ...): for each group of `text` tokens in order, what attention
        to them gets added (Redux's attn_bias: log(strength); 0: nothing), from every token
        but its own group's and later groups' (ComfyUI's StyleModelApply mask)."""

    tokens: mx.array | None = None
    ids: np.ndarray | None = None
    channels: mx.array | None = None
    text: mx.array | None = None
    text_bias: tuple = ()

    def __add__(self, other: "Conditioning") -> "Conditioning":
        def join(a, b, axis, lib=mx):
            return b if a is None else a if b is None else lib.concatenate([a, b], axis=axis)

        return Conditioning(
            tokens=join(self.tokens, other.tokens, 1),
            ids=join(self.ids, other.ids, 0, np),
            channels=join(self.channels, other.channels, 2),
            text=join(self.text, other.text, 1),
            text_bias=self.text_bias + other.text_bias,
        )

    @property
    def extra_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def ids_for(self, img_ids: np.ndarray) -> np.ndarray:
        return img_ids if self.ids is None else np.concatenate([img_ids, self.ids], axis=0)

    def inputs(self, x: mx.array) -> mx.array:
        """The packed latent [B, L, 64] -> the trunk's image input."""
        if self.channels is not None:
            extra = mx.broadcast_to(self.channels, (*x.shape[:2], self.channels.shape[2]))
            x = mx.concatenate([x, extra.astype(x.dtype)], axis=2)
        if self.tokens is None:
            return x
        tokens = mx.broadcast_to(self.tokens, (x.shape[0], *self.tokens.shape[1:]))
        return mx.concatenate([x, tokens.astype(x.dtype)], axis=1)

    def prompt(self, txt: mx.array) -> mx.array:
        """The prompt's T5 tokens [B, T, C] -> the trunk's text input."""
        if self.text is None:
            return txt
        text = mx.broadcast_to(self.text, (txt.shape[0], *self.text.shape[1:]))
        return mx.concatenate([txt, text.astype(txt.dtype)], axis=1)

    def attention_bias(self, n_txt: int, n_img: int) -> mx.array | None:
        """[L, L] float32 added to the trunk's attention over [prompt, text groups | image
        tokens] (`n_txt` with the groups, `n_img` with Kontext's), or None when no group has a
        bias. ComfyUI builds this mask in float16: the biases are rounded through it."""
        if not any(b for _, b in self.text_bias):
            return None
        groups = sum(n for n, _ in self.text_bias)
        length, start = n_txt + n_img, n_txt - groups
        bias = np.zeros((length, length), np.float32)
        for n, b in self.text_bias:
            value = np.float32(np.float16(b))
            bias[:start, start : start + n] = value  # from the prompt and earlier groups
            bias[n_txt:, start : start + n] = value  # from the image's tokens
            start += n
        return mx.array(bias)

    def velocity(self, v: mx.array, image_tokens: int) -> mx.array:
        """The trunk's output -> the velocity of the image tokens alone."""
        return v if self.tokens is None else v[:, :image_tokens]


def packed(latent: mx.array) -> mx.array:
    """A latent [1, 16, h, w] (Flux latent format) as tokens [1, (h/2)(w/2), 64], float32."""
    return pack_latents(latent.astype(mx.float32))


class Inputs:
    """A family's inputs for one generation, opened and checked (`Family.open`); empty here."""

    extra_tokens = 0  # image tokens appended (the memory plan counts them)
    encodes = False  # has pictures for the encode stage

    def default_size(self) -> tuple[int, int] | None:
        """The output size when none is given, from these inputs."""
        return None

    def check_size(self, width: int, height: int) -> None:
        """Refuse an output size these inputs cannot take (SettingsError)."""

    def init_pixels(self, width: int, height: int) -> np.ndarray | None:
        """The pixels [H, W, 3] in [0, 1] image to image starts from, when this family takes
        the init image as its own input (Fill); None: the init image, covered, as always."""
        return None

    def encode(self, encode, width: int, height: int) -> Conditioning:
        """The encode stage: `encode(pixels [H, W, 3] in [0, 1]) -> latent [1, 16, H/8, W/8]`."""
        return Conditioning()

    def record(self) -> dict:
        """What the PNG and the report record of these inputs (file names, sha256, ...)."""
        return {}


class Family:
    """A family of FLUX.1 variants and the inputs it takes (`inputs`: the request's fields that
    only its models take; a request giving any of them to another model is refused)."""

    name = "text"
    inputs: tuple[str, ...] = ()
    takes_init_image = False  # the init image is this family's own input, not image to image's
    needs = ""  # what a request giving its inputs to another model is told it needs

    def given(self, request) -> bool:
        return any(request.given(name) for name in self.inputs)

    def refuse(self, variant: "Variant", request) -> SettingsError:
        name = next(n for n in self.inputs if request.given(n))
        return SettingsError(f"{variant.title} {self.needs}", name)

    def open(self, variant: "Variant", request, init) -> Inputs:
        """Check and keep this family's inputs of `request` (the init image `init` is opened:
        a `pixels.Picture` or None); SettingsError names the field."""
        return Inputs()

    # ---- what a PNG records (from the settings it was made with) ------------------------

    def parameters(self, settings: dict) -> str:
        """Text for the A1111 `parameters` line (`, Name: value, ...`)."""
        return ""

    def graph_text(self, graph, settings: dict, positive: list, vae: str) -> list:
        """ComfyUI nodes on the prompt's conditioning, before FluxGuidance."""
        return positive

    def graph_model_input(self, graph, settings, positive, negative, vae, scaled):
        """ComfyUI nodes after FluxGuidance: (positive, negative, latent or None)."""
        return positive, negative, None


TEXT = Family()  # dev and schnell: text, and image to image from any init image


@dataclass(frozen=True)
class Variant:
    name: str
    model_name: str  # what PNGs and reports call it
    title: str
    steps: int
    shift: float
    guidance: float
    in_channels: int = 64  # the transformer's input: the packed latent, + what the inputs add
    guided: bool = True  # has a guidance embedding (schnell has none)
    family: Family = field(default=TEXT, compare=False)
    # its guidance is its own: a preset's (dev's 3.5) yields to it (a flag or a PNG's does not)
    own_guidance: bool = False

    @property
    def defaults(self) -> dict:
        """A request's settings that default to the model's."""
        return {"steps": self.steps, "shift": self.shift, "guidance": self.guidance}
