import os

# MLXFLUX_TEST_DEVICE=gpu runs every test on the default GPU (Metal or CUDA); CI uses the CPU.
# On a GPU, MLX runs float32 matmuls as TF32 by default (MLX_ENABLE_TF32=1 on CUDA and M5-class
# Macs: ~1e-3 relative error per product), which no 1e-4 parity bound survives. Parity is
# checked in true float32 on every device, so the suite turns TF32 off (bf16 is tested as bf16).
TEST_DEVICE = os.environ.get("MLXFLUX_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE == "gpu":
    os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# parity is checked in fp32 against torch on the CPU
torch.set_default_dtype(torch.float32)


def pytest_configure(config):
    if TEST_DEVICE not in ("cpu", "gpu"):
        raise pytest.UsageError(f"MLXFLUX_TEST_DEVICE must be cpu or gpu, got {TEST_DEVICE!r}")
    if TEST_DEVICE == "gpu" and not mx.is_available(mx.gpu):
        raise pytest.UsageError("MLXFLUX_TEST_DEVICE=gpu, but MLX sees no GPU on this machine")


def pytest_report_header(config):
    tf32 = os.environ.get("MLX_ENABLE_TF32", "default")
    return f"mlxflux tests on MLX's {TEST_DEVICE} (MLX_ENABLE_TF32={tf32})"


@pytest.fixture(autouse=True)
def _test_device():
    mx.set_default_device(mx.gpu if TEST_DEVICE == "gpu" else mx.cpu)
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


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's counts (tests/test_fuzz.py), when it ran."""
    import sys

    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.COUNTS:
        terminalreporter.section("fuzzing: cases per reader")
        for line in fuzz.summary_lines():
            terminalreporter.write_line(line)
