"""One native loop for the CPU backend: a quantized layer's weight, dequantized to float32.

On the CPU path (`mlxflux.kernels`, split mode) a quantized layer is turned into float32 for the
BLAS matmul at every use. In MLX ops that is a cast, a broadcast multiply and a broadcast add:
scalar loops that reach 1-3 G values/s, into a freshly allocated array whose pages the kernel
must map and zero first. This loop, compiled for this CPU (`-march=native`), does the same
arithmetic at ~10-15 G values/s in cache (~3.5 G/s, 14 GB/s, writing a layer to memory),
into one buffer the thread keeps, so an 8-bit step costs about what a float32 step does:
1.27x -> ~1.07x at 256x256 (README, bench/speed.py).

It is built on first use with the system's C++ compiler, as MLX builds its own `mx.compile`d
CPU kernels (`g++` on PATH), in a private temporary folder, then cached in the user's own
cache folder (`mlxflux.private`: ~/.cache/mlxflux/native on Linux, ~/Library/Caches/mlxflux
on macOS), and loaded only from a file no other user owns or can write. Without a compiler,
when the build fails, when the cached file is refused, off the CPU backend, or with
`MLXFLUX_NATIVE=0`, `available()` is False and the callers use MLX ops: the same values (the
loop rounds the product and the sum separately, as MLX's ops do), slower.

The loop writes into the memory of a float32 MLX array that this module owns and has
evaluated: MLX arrays are immutable to MLX, not to memory. The caller evaluates every op that
reads a buffer before asking for it again (`dequantized`); `release()` frees it at the end of
a stage (`mlxflux.report.Stage`). It holds the largest layer seen: 189 MB for FLUX.1's.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import private

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

// Rows of an MLX affine-quantized matrix to float32: code * scale + bias per group of
// `group_size` codes. Codes form a little-endian bit stream per row (element 0 in the low bits):
// 8 bits a byte, 4 bits two a byte, 6 bits four in three bytes.
extern "C" void mlxflux_dequantize(const uint8_t* packed, const float* scales,
                                   const float* biases, float* out, int64_t rows, int64_t cols,
                                   int64_t group_size, int64_t bits) {
  const int64_t groups = cols / group_size;
  const int64_t row_bytes = cols * bits / 8;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* q = packed + r * row_bytes;
    float* o = out + r * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scales[r * groups + g];
      const float b = biases[r * groups + g];
      float* og = o + g * group_size;
      if (bits == 8) {
        const uint8_t* qg = q + g * group_size;
        for (int64_t j = 0; j < group_size; ++j) og[j] = (float)qg[j] * s + b;
      } else if (bits == 4) {
        const uint8_t* qg = q + g * group_size / 2;
        for (int64_t j = 0; j < group_size / 2; ++j) {
          og[2 * j] = (float)(qg[j] & 15) * s + b;
          og[2 * j + 1] = (float)(qg[j] >> 4) * s + b;
        }
      } else {  // 6 bits
        const uint8_t* qg = q + g * group_size * 3 / 4;
        for (int64_t j = 0; j < group_size / 4; ++j) {
          const uint8_t b0 = qg[3 * j], b1 = qg[3 * j + 1], b2 = qg[3 * j + 2];
          og[4 * j] = (float)(b0 & 63) * s + b;
          og[4 * j + 1] = (float)((b0 >> 6) | ((b1 & 15) << 2)) * s + b;
          og[4 * j + 2] = (float)((b1 >> 4) | ((b2 & 3) << 4)) * s + b;
          og[4 * j + 3] = (float)(b2 >> 2) * s + b;
        }
      }
    }
  }
}
"""
BITS = (4, 6, 8)
# -ffp-contract=off: no fused multiply-add, so the values equal MLX's separate ops bit for bit
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
ARCH_FLAGS = (("-march=native",), ())  # the second when the compiler does not take the first

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_thread = threading.local()


def _cpu_name() -> str:
    """The CPU model, so a library built with -march=native is not reused on another CPU that
    shares the temp folder."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    """A real C++ compiler: g++ (or c++, clang++) on PATH; on macOS only when the Command Line
    Tools are installed (without them /usr/bin/g++ is a stub that opens an install dialog)."""
    if sys.platform == "darwin":
        try:
            r = subprocess.run(["xcode-select", "-p"], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode != 0:
            return None
    return next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)


def _key() -> str:
    return hashlib.sha256("\n".join([SOURCE, *FLAGS, _cpu_name()]).encode()).hexdigest()[:16]


def library_path() -> Path:
    """Where the built loop is cached: this user's own cache folder (`private.private_folder`),
    never a shared temporary folder."""
    return private.private_folder("native") / f"native-{_key()}.so"


def _build() -> ctypes.CDLL | None:
    """The loop, built on first use (in a private temporary folder, then moved into the cache)
    and loaded only from a file no other user could have written (`private.trusted`)."""
    lib = library_path()
    if not lib.exists() and not lib.is_symlink():
        cxx = compiler()
        if cxx is None:
            return None
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=lib.parent))  # 0700
        try:
            (build / "loop.cpp").write_text(SOURCE)
            errors = []
            for arch in ARCH_FLAGS:
                cmd = [cxx, *FLAGS, *arch, str(build / "loop.cpp"), "-o", str(build / "loop.so")]
                r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if r.returncode == 0:
                    os.replace(build / "loop.so", lib)  # whole or not at all
                    break
                errors.append(r.stderr.strip().splitlines()[-1:] or ["(no output)"])
            else:
                warnings.warn(
                    f"mlxflux: could not build its CPU dequantization loop with {cxx} "
                    f"({errors[-1][0]}); using MLX ops (slower quantized layers on the CPU)",
                    stacklevel=3,
                )
                return None
        finally:
            shutil.rmtree(build, ignore_errors=True)
    library = ctypes.CDLL(str(private.trusted(lib)))
    fn = library.mlxflux_dequantize
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    fn.restype = None
    return library


def available() -> bool:
    """Whether the native loop can run here: the CPU backend, and a loop that builds and loads
    (built on the first call; any failure or refusal is one warning, then MLX ops)."""
    global _library, _tried
    if os.environ.get("MLXFLUX_NATIVE", "1").strip() == "0":
        return False
    if mx.default_device().type != mx.cpu:
        return False
    with _lock:
        if not _tried:
            _tried = True
            try:
                _library = _build()
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"mlxflux: no native CPU loop ({e}); using MLX ops", stacklevel=2)
                _library = None
    return _library is not None


def host(a: mx.array) -> np.ndarray:
    """A C-contiguous numpy view of an MLX array's memory (evaluated first; copied only when
    the array is not contiguous)."""
    return np.ascontiguousarray(np.asarray(a))


def fresh(rows: int, cols: int) -> tuple[mx.array, np.ndarray]:
    """A new float32 [rows, cols] MLX array and a writable view of its memory."""
    out = mx.zeros((rows, cols), dtype=mx.float32)
    mx.eval(out)
    view = np.asarray(out)
    if not (view.flags.writeable and view.flags.c_contiguous and view.shape == (rows, cols)):
        raise RuntimeError("mlxflux: an MLX array's memory is not a writable row-major buffer")
    return out, view


def supports(bits: int, group_size: int) -> bool:
    """Whether the loop handles this quantization (MLX's 4, 6 and 8 bits, whole bytes a group)."""
    return bits in BITS and group_size % 4 == 0


def dequantize_into(
    view: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    group_size: int,
    bits: int,
) -> None:
    """Write the float32 rows of quantized `packed` (uint32 or uint8 rows, `host` views) with
    float32 `scales` and `biases` [rows, groups] into `view` [rows, cols]."""
    rows, cols = view.shape
    if not supports(bits, group_size) or cols % group_size:
        raise ValueError(f"no native loop for {bits}-bit codes in groups of {group_size}")
    if packed.shape[0] != rows or packed.nbytes != rows * cols * bits // 8:
        raise ValueError(f"packed rows {packed.shape} do not hold {rows} x {cols} codes")
    if scales.shape != (rows, cols // group_size) or biases.shape != scales.shape:
        raise ValueError(f"scales {scales.shape} do not match {rows} x {cols} // {group_size}")
    if not all(a.flags.c_contiguous for a in (view, packed, scales, biases)):
        raise ValueError("the native loop takes C-contiguous arrays")
    if {scales.dtype, biases.dtype, view.dtype} != {np.dtype(np.float32)}:
        raise ValueError("the native loop takes float32 scales and biases, writes float32")
    _library.mlxflux_dequantize(
        packed.ctypes.data, scales.ctypes.data, biases.ctypes.data, view.ctypes.data,
        rows, cols, group_size, bits,
    )  # fmt: skip


def dequantized(packed, scales, biases, rows: int, cols: int, group_size: int, bits: int):
    """The float32 [rows, cols] weight of a quantized layer (`host` views) in this thread's
    reusable buffer: valid until the next call in this thread (the caller evaluates what reads
    it first) or `release()`."""
    flat = getattr(_thread, "flat", None)
    if flat is None or flat[0].size < rows * cols:
        _thread.flat = None  # the old buffer goes before the new one is made
        flat = _thread.flat = fresh(1, rows * cols)
    dequantize_into(flat[1][0, : rows * cols].reshape(rows, cols), packed, scales, biases,
                    group_size, bits)  # fmt: skip
    return flat[0].reshape(-1)[: rows * cols].reshape(rows, cols)


def release() -> None:
    """Drop this thread's buffers (the end of a stage)."""
    _thread.__dict__.pop("flat", None)
