"""Step caching: fewer transformer passes per picture, as the references users trust do it.

    easycache    ComfyUI's EasyCache node (comfy_extras/nodes_easycache.py): from how much the
                 model's input changed since the last computed step, and how the output
                 followed the input then, predict how much the output changes; while the sum
                 of those predictions stays under the threshold, skip the whole model call and
                 reuse the last output-minus-input difference. Only between two points of the
                 schedule (`cache_range`, percents as the node's start_percent / end_percent).
    first-block  diffusers' FirstBlockCache (hooks/first_block_cache.py, ParaAttention's):
                 run the first block every step; when its residual has barely changed since
                 the last full pass (relative absmean difference at most the threshold), skip
                 the other blocks and add their cached residual instead.

One cache object per seed and method holds the state across the steps of one denoising; the
pipeline asks it for the velocity (`EasyCache.velocity`) or hands it to the trunk
(`FirstBlock`, `FluxTransformer.trunk`). Both count the steps they computed and skipped.
"""

import math
from dataclasses import dataclass, field

import mlx.core as mx

from .models.latents import unpack_latents

METHODS = ("none", "easycache", "first-block")
# each method's defaults are its reference's: the EasyCache node's, FirstBlockCacheConfig's
DEFAULTS = {"easycache": (0.2, (0.15, 0.95)), "first-block": (0.05, None)}
SUBSAMPLE = 8  # EasyCache measures every 8th latent pixel in both directions


def percent_to_sigma(percent: float, shift: float) -> float:
    """ComfyUI's ModelSamplingFlux.percent_to_sigma: flux_time_shift(shift, 1, 1 - percent)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1))


@dataclass
class Counts:
    """Which steps (1-based) of one denoising were computed and which skipped."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _absmean(x: mx.array) -> float:
    return mx.abs(x.astype(mx.float32)).mean().item()


class EasyCache:
    """ComfyUI's EasyCacheHolder with one condition (CFG 1: FLUX's only one), for one seed.

    `shift` is the model sampling's (the fixed 1.15 of dev, or the resolution's mu for
    `shift="auto"`): ComfyUI turns the percents into sigmas with it."""

    def __init__(self, threshold: float, start: float, end: float, shift: float, height: int,
                 width: int):  # fmt: skip
        self.threshold = threshold
        self.start_t, self.end_t = percent_to_sigma(start, shift), percent_to_sigma(end, shift)
        self.height, self.width = height, width
        self.counts = Counts()
        self.rate = None  # relative_transformation_rate: output change / input change
        self.cumulative = 0.0
        self.x_prev = self.out_prev = self.out_prev_norm = self.diff = None
        self.started = False  # the first step inside the range has been seen

    def _sub(self, packed: mx.array) -> mx.array:
        """The latent's 16 channels at every 8th pixel (ComfyUI's `subsample`)."""
        latent = unpack_latents(packed.astype(mx.float32), self.height, self.width)
        return latent[..., ::SUBSAMPLE, ::SUBSAMPLE]

    def velocity(self, step: int, sigma: float, x: mx.array, compute) -> mx.array:
        """The model's output for x (packed, float32) at `sigma`: `compute()`, or the last
        computed step's output-minus-input added to x."""
        s = mx.array(sigma, mx.float32).item()  # compared in float32, as torch compares
        if not s > mx.array(self.end_t, mx.float32).item():  # past the range: no bookkeeping
            self.counts.computed.append(step)
            return compute()
        input_change = None
        if s <= mx.array(self.start_t, mx.float32).item():
            self.started = True
            if self.x_prev is not None:
                input_change = mx.abs(self._sub(x) - self.x_prev).mean()
            if self.out_prev_norm is not None and self.rate is not None:
                # float32 throughout, as ComfyUI's tensors add up (from a Python 0.0)
                self.cumulative = self.cumulative + self.rate * input_change / self.out_prev_norm
                if (self.cumulative < self.threshold).item() and self.diff is not None:
                    self.counts.skipped.append(step)
                    return x + self.diff
                self.cumulative = 0.0
        v = compute()
        self.counts.computed.append(step)
        out = v.astype(mx.float32)
        if self.started and self.out_prev_norm is not None:
            output_change = mx.abs(self._sub(out) - self.out_prev).mean()
            if input_change is not None:
                self.rate = output_change / input_change
        self.diff = out - x
        if self.started:
            self.x_prev, self.out_prev = self._sub(x), self._sub(out)
            self.out_prev_norm = mx.abs(out).mean()
        mx.eval(self.diff, *(a for a in (self.x_prev, self.out_prev, self.out_prev_norm,
                                          self.rate) if a is not None))  # fmt: skip
        return v

    @staticmethod
    def bytes(tokens: int) -> int:
        """What it holds: one latent-sized difference, float32 (the subsamples are tiny)."""
        return tokens * 64 * 4


class FirstBlock:
    """diffusers' FirstBlockCache state for one seed: the first block's residual and output
    from the last full pass, and the residual of the blocks after it."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.counts = Counts()
        self.head_residual = None
        self.head = self.tail = None  # (img, txt) after block 0; what the other blocks added

    def keep_going(self, residual: mx.array) -> bool:
        """After the first block: whether the other blocks run (diffusers'
        `_should_compute_remaining_blocks`)."""
        if self.head_residual is None or self.tail is None:
            return True
        prev = self.head_residual
        change = mx.abs(residual - prev).mean() / mx.abs(prev).mean()
        return bool(change.item() > self.threshold)

    def computed(self, step: int, residual: mx.array, head: tuple) -> None:
        self.counts.computed.append(step)
        self.head_residual, self.head = residual, head

    def skipped(self, step: int) -> None:
        self.counts.skipped.append(step)

    def remember_tail(self, img: mx.array, txt: mx.array) -> None:
        self.tail = (img - self.head[0], txt - self.head[1])
        mx.eval(*self.tail, self.head_residual)

    @staticmethod
    def bytes(tokens: int, text_tokens: int, hidden: int, item: int) -> int:
        """What it holds: the first block's output and the tail's residual (image and text
        streams), and the first block's residual (image), at the streams' width."""
        return (2 * (tokens + text_tokens) + tokens) * hidden * item
