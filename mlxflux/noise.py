"""ComfyUI's noise, `torch.randn(shape, generator=torch.manual_seed(seed))` on the CPU, in numpy.

Torch's CPU generator is MT19937 seeded with the low 32 bits of the seed (numpy's legacy
RandomState seeds it identically). `normal_` on 16 or more floats draws uniforms
`(u32 & 0xFFFFFF) * 2**-24`, then turns each block of 16 into normals by Box-Muller
(u1 = 1 - d[j], u2 = d[j + 8]; cos to the first half, sin to the second); a tail that is not a
multiple of 16 redraws the last 16 values. (ATen `normal_fill`, `normal_fill_16`.)
"""

import numpy as np


def _box_muller_16(d: np.ndarray) -> np.ndarray:
    """d [..., 16] uniforms -> normals, as normal_fill_16 in float32."""
    u1 = np.float32(1) - d[..., :8]
    u2 = d[..., 8:]
    radius = np.sqrt(np.float32(-2) * np.log(u1))
    theta = np.float32(2 * np.pi) * u2
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=-1)


def comfy_noise(seed: int, shape) -> np.ndarray:
    """float32 noise equal to ComfyUI's CPU `torch.randn(shape)` after `torch.manual_seed(seed)`."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    rng = np.random.RandomState(seed & 0xFFFFFFFF)

    def uniforms(count: int) -> np.ndarray:
        u32 = rng.randint(0, 2**32, size=count, dtype=np.uint32)
        return ((u32 & 0xFFFFFF).astype(np.float32) * np.float32(2**-24)).astype(np.float32)

    if n < 16:  # small tensors take torch's scalar path (Box-Muller on doubles), not FLUX's
        raise ValueError(f"comfy_noise needs at least 16 elements, got shape {shape}")
    data = uniforms(n)
    full = n - n % 16
    out = np.empty(n, np.float32)
    out[:full] = _box_muller_16(data[:full].reshape(-1, 16)).reshape(-1)
    if n % 16:
        out[n - 16 :] = _box_muller_16(uniforms(16))
    return out.reshape(shape)
