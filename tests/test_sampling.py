"""Schedules against ComfyUI's formulas (re-derived here with torch ops), noise against torch."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import mlxflux
from mlxflux.sampling import auto_shift


def comfy_table(shift: float) -> torch.Tensor:
    # ModelSamplingFlux.set_parameters: sigma((arange(1, 10001) / 10000)), float32 tensors
    t = torch.arange(1, 10000 + 1, 1) / 10000
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1) ** 1.0)


def comfy_sigma(shift: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1) ** 1.0)


def comfy_simple(shift, steps):
    s = comfy_table(shift)
    ss = len(s) / steps
    return [float(s[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_beta(shift, steps, alpha=0.6, beta=0.6):
    s = comfy_table(shift)
    total = len(s) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs += [float(s[int(t)])]
        last = t
    return sigs + [0.0]


def comfy_normal(shift, steps):
    s = comfy_table(shift)
    start, end = s[-1], s[0]  # timestep(sigma) = sigma for Flux
    append_zero = True
    if math.isclose(float(comfy_sigma(shift, end)), 0, abs_tol=0.00001):
        steps += 1
        append_zero = False
    timesteps = torch.linspace(start, end, steps)
    sigs = [float(comfy_sigma(shift, timesteps[x])) for x in range(len(timesteps))]
    return sigs + [0.0] if append_zero else sigs


CASES = [(1.15, 25), (1.15, 20), (1.15, 1), (1.15, 7), (0.5, 30), (auto_shift(832, 1216), 25)]


@pytest.mark.parametrize("shift,steps", CASES)
@pytest.mark.parametrize(
    "name,ref", [("simple", comfy_simple), ("beta", comfy_beta), ("normal", comfy_normal)]
)
def test_sigmas_equal_comfyui(name, ref, shift, steps):
    got = mlxflux.sigmas(name, steps, shift=shift)
    want = ref(shift, steps)
    assert len(got) == len(want) and got[-1] == 0.0
    assert got == want  # bit for bit: both are float32 arithmetic


def test_auto_shift_is_the_resolution_dependent_mu():
    # ModelSamplingFlux node / diffusers calculate_shift: 256 tokens -> 0.5, 4096 -> 1.15
    assert auto_shift(256, 256) == pytest.approx(0.5)
    assert auto_shift(1024, 1024) == pytest.approx(1.15)
    got = mlxflux.sigmas("simple", 10, width=512, height=768, shift="auto")
    assert got == mlxflux.sigmas("simple", 10, shift=auto_shift(512, 768))


def test_known_simple_values():
    # sigma(t) = e^1.15 / (e^1.15 + 1/t - 1): the first step is 1.0, the second t = 0.96
    s = mlxflux.sigmas("simple", 25)
    assert s[0] == 1.0
    assert s[1] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1 / 0.96 - 1), abs=1e-6)


@pytest.mark.parametrize(
    "seed,shape",
    [
        (0, (1, 16, 128, 128)),
        (42, (1, 16, 152, 104)),  # DVD cover latent
        (2**32 + 7, (1, 16, 144, 112)),  # only the low 32 bits matter
        (2**64 - 1, (1, 16, 5, 7)),  # not a multiple of 16 elements: tail redrawn
        (123456789, (2, 3, 11)),
    ],
)
def test_comfy_noise_equals_torch_randn(seed, shape):
    want = torch.randn(shape, dtype=torch.float32, generator=torch.manual_seed(seed)).numpy()
    got = mlxflux.comfy_noise(seed, shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.abs(got - want).max() <= 2e-6  # measured 5e-7 (log of floats differs in ulps)
