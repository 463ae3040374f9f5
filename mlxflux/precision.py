"""Which precision a pipeline computes in when none is asked for: by the device it runs on."""

import re

import mlx.core as mx

from . import kernels


def apple_gpu_generation(architecture: str) -> int | None:
    """13 for M1 (`applegpu_g13g`, `g13s`, ...), 14 for M2, 15 for M3, 16 for M4; None when
    the string is not an Apple GPU architecture."""
    match = re.fullmatch(r"applegpu_g(\d+)[a-z]*", architecture.strip().lower())
    return int(match.group(1)) if match else None


def precision_choice(device_info: dict | None = None) -> tuple[str, str]:
    """(precision, why) for `precision=None`.

    float32 on the CPU backend (no fast 16-bit matmul there). On Metal, float16 where the GPU
    has no bfloat16 (M1 and M2: MLX emulates it, ~50% slower), with float32 residual streams
    and a float32 re-run of any block that overflows (docs/numerics.md); bfloat16 on M3 and
    later, and on CUDA. `device_info`: `mx.metal.device_info()`'s dict (tests pass a mock).
    """
    kind = kernels.backend()
    if kind == "cpu":
        return "float32", "MLX's CPU backend has no fast 16-bit matmul"
    if kind == "cuda":
        return "bfloat16", "CUDA GPU: native bfloat16"
    info = device_info if device_info is not None else mx.metal.device_info()
    arch = str(info.get("architecture", ""))
    gen = apple_gpu_generation(arch)
    if gen is not None and gen < 15:
        return "float16", f"{arch} (M1/M2 class): no native bfloat16, float16 with guards"
    return "bfloat16", f"{arch or 'Apple GPU'}: native bfloat16"


# where Debian and Ubuntu put the threaded OpenBLAS (apt-get install libopenblas0-pthread)
OPENBLAS_PATHS = tuple(
    f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0" for arch in ("x86_64", "aarch64")
)


def blas_advice(maps: str | None = None, paths=OPENBLAS_PATHS) -> str | None:
    """One line when MLX's CPU backend runs on the reference BLAS its Linux wheel ships (fp32
    matmuls ~25x slower) while OpenBLAS is installed: how to use it. None otherwise, and on
    Metal and CUDA. `maps`: /proc/self/maps's text (tests pass their own)."""
    import os

    if kernels.backend() != "cpu":
        return None
    installed = next((p for p in paths if os.path.exists(p)), None)
    if installed is None:
        return None
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return None
    if "libopenblas" in maps:
        return None
    return (f"MLX's CPU backend is on its reference BLAS (~25x slower matmuls) while OpenBLAS "
            f"is installed: run with LD_PRELOAD={installed}")  # fmt: skip
