import mlx.core as mx
import numpy as np
import pytest
import torch

# parity is checked in fp32 on the CPU (REFERENCE.md: compare numerics in fp32)
torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def _cpu_fp32():
    mx.set_default_device(mx.cpu)
    yield


def randomize_(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Give every parameter a random value: matrices ~ N(0, 1/fan_in), vectors around 0 or 1.

    Reference models initialise some layers to zero; random values everywhere make a wrong key
    or a swapped half show up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5)
            elif name.endswith("bias") or name.endswith("shift"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def to_mx(t) -> mx.array:
    return mx.array(t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|"""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())
