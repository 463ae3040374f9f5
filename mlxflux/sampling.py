"""ComfyUI's Flux sampling schedules and Euler step (`comfy/model_sampling.py`, `samplers.py`).

All arithmetic is float32 where ComfyUI's is (its sigma table is a float32 tensor), so the
sigmas equal ComfyUI's bit for bit, not just approximately.
"""

import math

import mlx.core as mx
import numpy as np

SCHEDULERS = ("simple", "beta", "normal")
TABLE_SIZE = 10_000  # ModelSamplingFlux: timesteps=10000
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15  # BFL / diffusers / ComfyUI's ModelSamplingFlux node
DEFAULT_SHIFT = 1.15  # ComfyUI's Flux dev checkpoint workflow: fixed at every resolution


def auto_shift(width: int, height: int) -> float:
    """Resolution-dependent mu: linear in image tokens from (256, 0.5) to (4096, 1.15)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (4096 - 256)
    b = BASE_SHIFT - m * 256
    return (width * height / 256) * m + b


def flux_sigma(shift: float, t: np.ndarray) -> np.ndarray:
    """flux_time_shift(mu, 1.0, t) = e^mu / (e^mu + (1/t - 1)) in float32, as torch evaluates
    it: `scalar / tensor` is `reciprocal(tensor) * scalar`, with the scalar in float32."""
    one, e = np.float32(1), np.float32(math.exp(shift))
    t = np.asarray(t, np.float32)
    return (one / (e + (one / t - one))) * e


def sigma_table(shift: float) -> np.ndarray:
    t = np.arange(1, TABLE_SIZE + 1, dtype=np.float32) / np.float32(TABLE_SIZE)
    return flux_sigma(shift, t).astype(np.float32)


def _linspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
    """torch.linspace in float32: the symmetric two-sided formula of ATen's CPU kernel."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    # ATen's vectorized kernel uses fused multiply-adds: an exact product, one rounding
    f64 = np.float64
    lo = (f64(start) + f64(step) * i[:half]).astype(np.float32)
    hi = (f64(end) - f64(step) * (steps - 1 - i[half:])).astype(np.float32)
    return np.concatenate([lo, hi]).astype(np.float32)


def sigmas(
    scheduler: str,
    steps: int,
    *,
    width: int = 1024,
    height: int = 1024,
    shift: float | str = DEFAULT_SHIFT,
) -> list[float]:
    """ComfyUI's sigmas for `steps` Euler steps, ending with 0.0.

    shift: a float is ComfyUI's fixed mu (1.15 in its Flux dev checkpoint workflow); "auto" is
    the resolution-dependent mu of BFL / diffusers / ModelSamplingFlux.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift == "auto":
        shift = auto_shift(width, height)
    elif isinstance(shift, str):
        raise ValueError(f"shift must be a number or 'auto', got {shift!r}")
    table = sigma_table(float(shift))
    if scheduler == "simple":
        ss = len(table) / steps
        out = [float(table[-(1 + int(x * ss))]) for x in range(steps)]
    elif scheduler == "beta":
        from scipy.stats import beta

        total = len(table) - 1
        ts = 1 - np.linspace(0, 1, steps, endpoint=False)
        ts = np.rint(beta.ppf(ts, 0.6, 0.6) * total)
        out, last = [], None
        for t in ts:
            if t != last:
                out.append(float(table[int(t)]))
            last = t
    elif scheduler == "normal":
        # timestep(sigma) = sigma for Flux, so the shift is applied to shifted values: a
        # ComfyUI quirk, kept on purpose
        start, end = table[-1], table[0]
        if math.isclose(float(flux_sigma(float(shift), end)), 0, abs_tol=1e-5):
            ts, zero = _linspace_f32(start, end, steps + 1), False
        else:
            ts, zero = _linspace_f32(start, end, steps), True
        out = [float(flux_sigma(float(shift), np.float32(t)).astype(np.float32)) for t in ts]
        return out + [0.0] if zero else out
    else:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    return out + [0.0]


def euler_step(x: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """ComfyUI's Euler step for a velocity (CONST) model: x + (sigma_next - sigma) * v.

    ComfyUI keeps the latent in float32 whatever the model's dtype; so does this.
    """
    return x + (sigma_next - sigma) * velocity.astype(mx.float32)


def img2img_sigmas(scheduler: str, steps: int, denoise: float, **kw) -> list[float]:
    """ComfyUI's KSampler with denoise < 1 (`comfy/samplers.py`, `KSampler.set_steps`): the
    schedule of `int(steps / denoise)` steps, of which the last `steps + 1` sigmas are kept;
    denoise > 0.9999 is plain text-to-image."""
    if denoise > 0.9999:
        return sigmas(scheduler, steps, **kw)
    return sigmas(scheduler, int(steps / denoise), **kw)[-(steps + 1) :]


def noise_scaling(sigma: float, noise: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """The starting latent of a flow-matching (CONST) model, ComfyUI's `noise_scaling`:
    sigma * noise + (1 - sigma) * latent. Text-to-image starts at sigma 1: pure noise."""
    return (sigma * noise + (1.0 - sigma) * latent).astype(np.float32)
