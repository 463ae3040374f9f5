"""Step caching (issue 34) against its references on the same tiny weights: EasyCache against
ComfyUI's node (its holder and forward wrapper ported below, line by line, around diffusers'
transformer in a FluxPipeline fed ComfyUI's sigmas), FirstBlockCache against diffusers' own
hook (`transformer.enable_cache(FirstBlockCacheConfig(...))`). Same steps skipped, pictures
within mean 0.75 / max 4 levels; txt2img and img2img, unquantized and 8-bit."""

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from diffusers.hooks import first_block_cache
from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

import mlxflux

from .helpers import HEIGHT, WIDTH, cover_image, generate
from .reference import (
    PROMPT,
    comfy_img2img_reference,
    comfy_reference,
    compare,
    quantize_dequantize_,
)

pytestmark = pytest.mark.reference

STEPS = 20
MEAN, WORST = 0.75, 4  # the bounds, levels of 255


# ---- ComfyUI's EasyCache, ported from comfy_extras/nodes_easycache.py (one cond, CFG 1) ----


def flux_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def percent_to_sigma(percent, shift=1.15):  # comfy/model_sampling.py ModelSamplingFlux
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return flux_time_shift(shift, 1.0, 1.0 - percent)


class ComfyEasyCache:
    """EasyCacheHolder + easycache_forward_wrapper with one uuid: `forward(x, sigma, run)`, x
    and run()'s output [1, 16, h, w] torch tensors (the diffusion model's input and output)."""

    def __init__(self, reuse_threshold, start_percent, end_percent, subsample_factor=8):
        self.reuse_threshold = reuse_threshold
        self.start_t = percent_to_sigma(start_percent)
        self.end_t = percent_to_sigma(end_percent)
        self.subsample_factor = subsample_factor
        self.relative_transformation_rate = None
        self.cumulative_change_rate = 0.0
        self.initial_step = True
        self.first_cond = False
        self.x_prev_subsampled = self.output_prev_subsampled = self.output_prev_norm = None
        self.cache_diff = None
        self.skipped = []

    def subsample(self, x):
        return x[..., :: self.subsample_factor, :: self.subsample_factor].clone()

    def forward(self, step, x, sigma, run):
        sigmas = torch.tensor([sigma], dtype=torch.float32)
        if not (sigmas[0] > self.end_t).item():  # is_past_end_timestep
            return run()
        has_first_cond_uuid = self.first_cond
        next_x_prev = x
        input_change = None
        if (sigmas[0] <= self.start_t).item():  # should_do_easycache
            can_apply_cache_diff = self.cache_diff is not None
            if self.initial_step:
                self.first_cond = has_first_cond_uuid = True
                self.initial_step = False
            if has_first_cond_uuid:
                if self.x_prev_subsampled is not None:
                    input_change = (
                        (self.subsample(x) - self.x_prev_subsampled).flatten().abs().mean()
                    )
                if (
                    self.output_prev_norm is not None
                    and self.relative_transformation_rate is not None
                ):
                    approx = (
                        self.relative_transformation_rate * input_change
                    ) / self.output_prev_norm
                    self.cumulative_change_rate += approx
                    if self.cumulative_change_rate < self.reuse_threshold and can_apply_cache_diff:
                        self.skipped.append(step)
                        return x + self.cache_diff
                    self.cumulative_change_rate = 0.0
        output = run()
        if has_first_cond_uuid and self.output_prev_norm is not None:
            output_change = (
                (self.subsample(output) - self.output_prev_subsampled).flatten().abs().mean()
            )
            if input_change is not None:
                self.relative_transformation_rate = output_change / input_change
        self.cache_diff = output - next_x_prev  # update_cache_diff
        if has_first_cond_uuid:
            self.x_prev_subsampled = self.subsample(next_x_prev)
            self.output_prev_subsampled = self.subsample(output)
            self.output_prev_norm = output.flatten().abs().mean()
        return output


@contextlib.contextmanager
def easycache_on(models, sigmas, **settings):
    """diffusers' transformer wrapped as ComfyUI's DIFFUSION_MODEL wrapper wraps the model:
    the packed latent unpacked to [1, 16, h, w], the step's sigma ComfyUI's."""
    flux = models["transformer"]
    real = flux.forward
    cache = ComfyEasyCache(**settings)
    h, w = HEIGHT // 8, WIDTH // 8
    calls = iter(range(len(sigmas) - 1))

    def unpack(p):  # [1, (h/2)(w/2), 64] -> [1, 16, h, w]
        return p.reshape(1, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, h, w)

    def pack(x):
        return x.reshape(1, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, 64)

    def forward(*args, **kwargs):
        step = next(calls)
        hidden = kwargs["hidden_states"]
        x = unpack(hidden[..., :64])

        def run():
            return unpack(real(*args, **kwargs)[0])

        return (pack(cache.forward(step + 1, x, sigmas[step], run)),)

    flux.forward = forward
    try:
        yield cache
    finally:
        flux.forward = real


@contextlib.contextmanager
def first_block_on(models, threshold):
    """diffusers' own FirstBlockCache on the transformer, its decisions recorded."""
    flux = models["transformer"]
    decisions = []
    real = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def recording(self, residual):
        decisions.append(real(self, residual))
        return decisions[-1]

    first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = recording
    flux.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield decisions
    finally:
        flux.disable_cache()
        first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = real


def skipped_of(decisions) -> list[int]:
    return [i + 1 for i, compute in enumerate(decisions) if not compute]


@pytest.fixture(scope="module")
def models_q8(models):
    q8 = dict(models)
    for name in ("transformer", "t5"):
        q8[name] = quantize_dequantize_(copy.deepcopy(models[name]), 8)
    return q8


def ours(folder, seed, **kw):
    pipe = mlxflux.load(folder)
    return generate(pipe, PROMPT, seed=seed, width=WIDTH, height=HEIGHT, steps=STEPS, **kw)


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_easycache_skips_what_comfyuis_node_skips(models, models_q8, folder, folder_q8, bits,
                                                  img2img):  # fmt: skip
    torch_models, mlx_folder = (models_q8, folder_q8) if bits else (models, folder)
    # the node's range; a threshold at which this tiny random model skips (at 0.2 it skips none)
    seed, settings = 5, dict(reuse_threshold=0.5, start_percent=0.15, end_percent=0.95)
    if img2img:
        image, denoise = cover_image(3), 0.8
        full = mlxflux.sigmas("simple", int(STEPS / denoise), width=WIDTH, height=HEIGHT)
        sigmas = full[-(STEPS + 1) :]
        with easycache_on(torch_models, sigmas, **settings) as cache:
            ref = comfy_img2img_reference(torch_models, image, "simple", STEPS, denoise, seed)
        kw = dict(init_image=image, denoise=denoise)
    else:
        sigmas = mlxflux.sigmas("simple", STEPS, width=WIDTH, height=HEIGHT)
        noise = mlxflux.comfy_noise(seed, (1, 16, HEIGHT // 8, WIDTH // 8))
        with easycache_on(torch_models, sigmas, **settings) as cache:
            ref = comfy_reference(torch_models, "simple", STEPS, noise)
        kw = {}
    image, report = ours(mlx_folder, seed, cache="easycache", cache_threshold=0.5, **kw)
    mean, worst = compare(image, ref)
    got = report.cache
    print(f"easycache {bits or 'plain'} {'img2img' if img2img else 'txt2img'}: ComfyUI skipped "
          f"{cache.skipped}, we skipped {report.images[0]['cache']['skipped']}; mean {mean:.3f}, "
          f"max {worst}")  # fmt: skip
    assert len(cache.skipped) >= 3  # the test means something: the node really skips
    assert report.images[0]["cache"]["skipped"] == cache.skipped
    assert got["steps_skipped"] == len(cache.skipped)
    assert got["steps_computed"] == STEPS - len(cache.skipped)
    assert (got["method"], got["threshold"], got["range"]) == ("easycache", 0.5, [0.15, 0.95])
    assert mean <= MEAN and worst <= WORST


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_first_block_cache_skips_what_diffusers_skips(models, models_q8, folder, folder_q8, bits,
                                                      img2img):  # fmt: skip
    torch_models, mlx_folder = (models_q8, folder_q8) if bits else (models, folder)
    seed, threshold = 6, 0.5  # this tiny random model skips from about 0.5
    with first_block_on(torch_models, threshold) as decisions:
        if img2img:
            image, denoise = cover_image(4), 0.7
            ref = comfy_img2img_reference(torch_models, image, "simple", STEPS, denoise, seed)
            kw = dict(init_image=image, denoise=denoise)
        else:
            noise = mlxflux.comfy_noise(seed, (1, 16, HEIGHT // 8, WIDTH // 8))
            ref = comfy_reference(torch_models, "simple", STEPS, noise)
            kw = {}
    image, report = ours(mlx_folder, seed, cache="first-block", cache_threshold=threshold, **kw)
    mean, worst = compare(image, ref)
    skipped = skipped_of(decisions)
    print(f"first-block {bits or 'plain'}: diffusers skipped {skipped}, we skipped "
          f"{report.images[0]['cache']['skipped']}; mean {mean:.3f}, max {worst}")  # fmt: skip
    assert len(decisions) == STEPS and len(skipped) >= 3
    assert report.images[0]["cache"]["skipped"] == skipped
    assert report.cache["steps_skipped"] == len(skipped)
    assert mean <= MEAN and worst <= WORST


def test_no_cache_draws_the_exact_picture(folder):
    plain, _ = ours(folder, 7)
    for method, threshold in (("easycache", 0.0), ("first-block", 0.0)):
        cached, report = ours(folder, 7, cache=method, cache_threshold=threshold)
        assert report.cache["steps_skipped"] == 0  # threshold 0: nothing skipped
        assert np.array_equal(np.asarray(cached), np.asarray(plain))
