"""One native loop for the CPU backend: a quantized layer's weight, dequantized to float32.

On the CPU path (`mlxflux.kernels`, split mode) a quantized layer is turned into float32 for the
BLAS matmul at every use. In MLX ops that is a cast, a broadcast multiply and a broadcast add:
scalar loops that reach 1-3 G values/s, into a freshly allocated array whose pages the kernel
must map and zero first. This loop, compiled for this CPU (`-march=native`), does the same
arithmetic at ~10-15 G values/s a thread, on every core, into one buffer a thread keeps, so
an 8-bit step costs about what a float32 step does (README, bench/speed.py).

It is built on first use with the system's C++ compiler, as MLX builds its own `mx.compile`d
CPU kernels (`g++` on PATH), and cached under $TMPDIR/mlxflux. Without a compiler, when the
build fails, or with `MLXFLUX_NATIVE=0`, `available()` is False and the callers use MLX ops:
the same values (the loop rounds the product and the sum separately, as MLX's ops do), slower.

The loop writes into the memory of a float32 MLX array that this module owns and has
evaluated: MLX arrays are immutable to MLX, not to memory. The caller evaluates every op that
reads a buffer before asking for it again (`dequantized`); `release()` frees it at the end of
a stage (`mlxflux.report.Stage`). It holds the largest layer seen: 189 MB for FLUX.1's.
"""

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <thread>
#include <vector>

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

// mlxflux_dequantize over `threads` threads, each a contiguous share of the rows
extern "C" void mlxflux_dequantize_parallel(const uint8_t* packed, const float* scales,
                                            const float* biases, float* out, int64_t rows,
                                            int64_t cols, int64_t group_size, int64_t bits,
                                            int64_t threads) {
  const int64_t groups = cols / group_size, row_bytes = cols * bits / 8;
  const int64_t share = (rows + threads - 1) / threads;
  auto run = [&](int64_t t) {
    const int64_t i = t * share, n = std::min(share, rows - i);
    if (n > 0)
      mlxflux_dequantize(packed + i * row_bytes, scales + i * groups, biases + i * groups,
                         out + i * cols, n, cols, group_size, bits);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}


// cblas_sgemm, as the process's BLAS exports it (LP64: int sizes)
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);

// y[tokens, rows] = x[tokens, cols] @ W^T for a quantized W[rows, cols]: `threads` threads each
// take every threads-th block of `block` rows, dequantize it into their own part of `work`
// [threads, block, cols] (small enough to stay in the cache) and multiply it with the BLAS into
// the block's columns of y (ldc = rows: no concatenation). The caller makes the BLAS run one
// thread per call meanwhile.
extern "C" void mlxflux_quantized_matmul(const float* x, int64_t tokens, const uint8_t* packed,
                                         const float* scales, const float* biases, float* y,
                                         int64_t rows, int64_t cols, int64_t group_size,
                                         int64_t bits, int64_t block, int64_t threads,
                                         void* sgemm, float* work) {
  const sgemm_fn gemm = (sgemm_fn)sgemm;
  const int64_t groups = cols / group_size, row_bytes = cols * bits / 8;
  auto run = [&](int64_t t) {
    float* w = work + t * block * cols;
    for (int64_t i = t * block; i < rows; i += threads * block) {
      const int64_t n = std::min(block, rows - i);
      mlxflux_dequantize(packed + i * row_bytes, scales + i * groups, biases + i * groups, w, n,
                         cols, group_size, bits);
      gemm(101, 111, 112, (int)tokens, (int)n, (int)cols, 1.0f, x, (int)cols, w, (int)cols, 0.0f,
           y + i, (int)rows);  // row-major, x as is, W transposed
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}
"""
BITS = (4, 6, 8)
# -ffp-contract=off: no fused multiply-add, so the values equal MLX's separate ops bit for bit
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
ARCH_FLAGS = (("-march=native",), ())  # the second when the compiler does not take the first
THREADS = max(1, min(8, os.cpu_count() or 1))  # threads per dequantization
# quantized_matmul: rows per block. Each BLAS call packs all of x again, so a block needs enough
# rows to amortize that (1+1 blocks' layers at 256/512 tokens, best of 9, float32 885 ms: 256
# rows 910 ms, 512 rows 920, 768 rows 906; 16 rows 1463)
BLOCK_ROWS = 512

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


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, _cpu_name()]).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "mlxflux"
    lib = folder / f"native-{key}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / f"native-{key}.cpp"
        partial = folder / f"native-{key}.{os.getpid()}.{threading.get_ident()}.so"
        source.write_text(SOURCE)
        errors = []
        for arch in ARCH_FLAGS:
            cmd = [compiler, *FLAGS, *arch, str(source), "-o", str(partial)]
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode == 0:
                os.replace(partial, lib)  # whole or not at all, also for a parallel process
                break
            errors.append(r.stderr.strip().splitlines()[-1:] or ["(no output)"])
        else:
            warnings.warn(
                f"mlxflux: could not build its CPU dequantization loop with {compiler} "
                f"({errors[-1][0]}); using MLX ops (slower 8-bit layers on the CPU)",
                stacklevel=3,
            )
            return None
    library = ctypes.CDLL(str(lib))
    fn = library.mlxflux_dequantize
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    fn.restype = None
    fn = library.mlxflux_dequantize_parallel
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    fn.restype = None
    fn = library.mlxflux_quantized_matmul
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 4,
                   *[ctypes.c_int64] * 6, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    fn.restype = None
    return library


def available() -> bool:
    """Whether the native loop can run here (built on the first call)."""
    global _library, _tried
    if os.environ.get("MLXFLUX_NATIVE", "1").strip() == "0":
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


def _check(rows, cols, packed, scales, biases, group_size: int, bits: int) -> None:
    if bits not in BITS or cols % group_size or group_size % 4:
        raise ValueError(f"no native loop for {bits}-bit codes in groups of {group_size}")
    if packed.shape[0] != rows or packed.nbytes != rows * cols * bits // 8:
        raise ValueError(f"packed rows {packed.shape} do not hold {rows} x {cols} codes")
    if scales.shape != (rows, cols // group_size) or biases.shape != scales.shape:
        raise ValueError(f"scales {scales.shape} do not match {rows} x {cols} // {group_size}")
    for a in (packed, scales, biases):
        if not a.flags.c_contiguous:
            raise ValueError("the native loop takes C-contiguous arrays")
    if scales.dtype != np.float32 or biases.dtype != np.float32:
        raise ValueError("the native loop takes float32 scales and biases")


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
    _check(rows, cols, packed, scales, biases, group_size, bits)
    if not view.flags.c_contiguous or view.dtype != np.float32:
        raise ValueError("the native loop writes a C-contiguous float32 array")
    _library.mlxflux_dequantize(
        packed.ctypes.data, scales.ctypes.data, biases.ctypes.data, view.ctypes.data,
        rows, cols, group_size, bits,
    )  # fmt: skip


def dequantized(packed, scales, biases, rows: int, cols: int, group_size: int, bits: int):
    """The float32 [rows, cols] weight of a quantized layer (`host` views), made by THREADS
    threads in this thread's reusable buffer: valid until the next call in this thread (the
    caller evaluates what reads it first) or `release()`."""
    _check(rows, cols, packed, scales, biases, group_size, bits)
    flat = getattr(_thread, "flat", None)
    if flat is None or flat[0].size < rows * cols:
        _thread.flat = None  # the old buffer goes before the new one is made
        flat = _thread.flat = fresh(1, rows * cols)
    out = flat[0].reshape(-1)[: rows * cols].reshape(rows, cols)
    threads = max(1, min(THREADS, rows // 64))
    _library.mlxflux_dequantize_parallel(
        packed.ctypes.data, scales.ctypes.data, biases.ctypes.data, flat[1].ctypes.data,
        rows, cols, group_size, bits, threads,
    )  # fmt: skip
    return out


def release() -> None:
    """Drop this thread's buffers (the end of a stage)."""
    _thread.__dict__.pop("flat", None)
    _thread.__dict__.pop("work", None)


class _Blas:
    """The process's cblas_sgemm (the BLAS MLX calls: OpenBLAS when preloaded, as the README
    says) and OpenBLAS's thread setting; `sgemm` None where they are not visible."""

    def __init__(self):
        process = ctypes.CDLL(None)
        self.sgemm = self.get_threads = self.set_threads = None
        try:
            self.sgemm = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
            self.get_threads = process.openblas_get_num_threads
            self.set_threads = process.openblas_set_num_threads
            self.get_threads.restype, self.set_threads.argtypes = ctypes.c_int, [ctypes.c_int]
        except AttributeError:
            self.get_threads = self.set_threads = None

    @contextlib.contextmanager
    def one_thread(self):
        """One BLAS thread per call (OpenBLAS), restored after."""
        if self.set_threads is None:
            yield
            return
        saved = self.get_threads()
        self.set_threads(1)
        try:
            yield
        finally:
            self.set_threads(saved)


_blas: _Blas | None = None


def blas() -> _Blas | None:
    """The BLAS `quantized_matmul` calls: None without the native loop, without a visible
    cblas_sgemm, or without OpenBLAS's thread setting (each thread's call must run alone)."""
    global _blas
    if not available():
        return None
    if _blas is None:
        _blas = _Blas()
    return _blas if _blas.sgemm is not None and _blas.set_threads is not None else None


def quantized_matmul(x: np.ndarray, packed, scales, biases, group_size: int, bits: int):
    """x [tokens, cols] (float32, C-contiguous) @ W^T for a quantized W (`host` views as for
    `dequantize_into`), as a new float32 MLX array [tokens, rows]: THREADS threads each
    dequantize blocks of BLOCK_ROWS rows into a buffer that stays in the cache and multiply them
    with the one-thread BLAS straight into their columns of the output (`blas()` first)."""
    lib = blas()
    tokens, cols = x.shape
    rows = packed.shape[0]
    _check(rows, cols, packed, scales, biases, group_size, bits)
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("the native matmul takes a C-contiguous float32 input")
    block = min(rows, BLOCK_ROWS)
    threads = max(1, min(THREADS, -(-rows // block)))
    work = getattr(_thread, "work", None)
    if work is None or work.size < threads * block * cols:
        work = _thread.work = np.empty(threads * block * cols, np.float32)
    out, view = fresh(tokens, rows)
    with lib.one_thread():
        _library.mlxflux_quantized_matmul(
            x.ctypes.data, tokens, packed.ctypes.data, scales.ctypes.data, biases.ctypes.data,
            view.ctypes.data, rows, cols, group_size, bits, block, threads, lib.sgemm,
            work.ctypes.data,
        )  # fmt: skip
    return out
