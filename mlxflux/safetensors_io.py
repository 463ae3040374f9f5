"""Reading and writing safetensors one tensor at a time.

Reading is ours, not `mx.load`'s: it validates the header before anything else (length, JSON,
dtypes, offsets inside the file), decodes fp8 e5m2 (which `mx.load` refuses for the whole file)
as well as e4m3, and reads each tensor from disk only when asked, so memory follows the largest
tensor, not the file. Writing fills shards of bounded size with `mx.save_safetensors`.
"""

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxflux.errors import MlxfluxError

MAX_HEADER = 100 << 20  # safetensors' own limit on the header size


class SafetensorsError(MlxfluxError, ValueError):
    """A file that is not a readable safetensors file; the message names it."""


def _is_count(x) -> bool:
    """A non-negative JSON integer (not a bool, float or string)."""
    return type(x) is int and x >= 0


_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _NUMPY.items()}, "BF16": 2}
_ITEMSIZE.update({"F8_E4M3": 1, "F8_E5M2": 1})


# safetensors dtype name -> str(mx.Dtype) as mx.save_safetensors writes it
MLX_DTYPE = {
    "F32": "mlx.core.float32",
    "F16": "mlx.core.float16",
    "BF16": "mlx.core.bfloat16",
    "U32": "mlx.core.uint32",
    "U8": "mlx.core.uint8",
    "I32": "mlx.core.int32",
    "I64": "mlx.core.int64",
    "BOOL": "mlx.core.bool",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _decode_fp8_e5m2(raw: np.ndarray) -> mx.array:
    # e5m2 is exactly the high byte of an IEEE fp16: shift it into place, reinterpret
    return mx.array((raw.astype(np.uint16) << 8).view(np.float16))


class TensorFile:
    """What the converter asks of a checkpoint file: `path`, `tensors` (key -> info with
    `dtype`, `shape`, `start`, `nbytes`), `header_sha256` and `read(key)`."""

    path: Path
    tensors: dict

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self):
        return self.tensors.keys()

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


class SafetensorsFile(TensorFile):
    """A validated safetensors header plus lazy, per-tensor reads."""

    def __init__(self, path: str | os.PathLike, data: bytes | None = None):
        """The header of the file at `path`, validated; `data`: the file's bytes, already read
        (a LoRA, read once and hashed), which `read` then reads from instead of the file."""
        self.path = Path(path)
        self.data = data
        if data is None:
            if not self.path.exists():
                raise SafetensorsError(f"{self.path}: no such file")
            if self.path.is_dir():
                raise SafetensorsError(f"{self.path}: is a folder, not a safetensors file")
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                raw = f.read(n) if 0 < n <= MAX_HEADER and n <= size - 8 else b""
        else:
            size = len(data)
            head = data[:8]
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            raw = data[8 : 8 + n] if 0 < n <= MAX_HEADER and n <= size - 8 else b""
        if len(head) < 8:
            raise SafetensorsError(f"{self.path}: empty or truncated file ({size} bytes)")
        if head[:2] == b"\x80\x02" or head[:2] == b"PK":
            raise SafetensorsError(
                f"{self.path}: a pickled PyTorch checkpoint; mlxflux reads only "
                "safetensors and never unpickles (convert it to safetensors first)"
            )
        if n == 0 or n > MAX_HEADER or n > size - 8:
            raise SafetensorsError(
                f"{self.path}: not a safetensors file (header length {n} for a {size}-byte file)"
            )
        self.header_sha256 = hashlib.sha256(head + raw).hexdigest()
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: broken safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{self.path}: safetensors metadata is not a JSON object")
        self.metadata = metadata
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, t in header.items():
            try:
                dtype, shape, (a, b) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: bad header entry for {key}") from None
            if dtype not in _ITEMSIZE:
                raise SafetensorsError(f"{self.path}: tensor {key} has unsupported dtype {dtype}")
            if not all(_is_count(d) for d in (*shape, a, b)) or len(shape) > 8:
                raise SafetensorsError(f"{self.path}: bad shape or offsets for tensor {key}")
            want = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow
            if b - a != want:
                raise SafetensorsError(
                    f"{self.path}: tensor {key} has {b - a} bytes for shape {shape} {dtype}"
                )
            if base + b > size:
                raise SafetensorsError(
                    f"{self.path}: truncated: tensor {key} ends at byte {base + b}, "
                    f"the file has {size}"
                )
            self.tensors[key] = TensorInfo(dtype, shape, base + a, base + b)
        spans = sorted((t.start, t.end, k) for k, t in self.tensors.items() if t.end > t.start)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise SafetensorsError(f"{self.path}: tensors {first} and {second} overlap")

    def raw(self, key: str) -> np.ndarray:
        """One tensor's stored values in numpy (bfloat16 as uint16 bits, fp8 as uint8)."""
        t = self.tensors[key]
        dtype = np.uint8 if t.dtype.startswith("F8") else _NUMPY.get(t.dtype, np.uint16)
        count = t.nbytes // _ITEMSIZE[t.dtype]
        try:
            if self.data is not None:
                raw = np.frombuffer(self.data, dtype=dtype, count=count, offset=t.start)
            else:
                raw = np.fromfile(self.path, dtype=dtype, count=count, offset=t.start)
        except (OSError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: tensor {key} cannot be read ({e})") from None
        if raw.size != count:  # the file shrank since its header was read
            raise SafetensorsError(f"{self.path}: truncated: tensor {key} is incomplete")
        return raw.reshape(t.shape)

    def read_float32(self, key: str) -> np.ndarray:
        """One floating-point tensor as float32 numpy (host memory, no MLX array made)."""
        t, raw = self.tensors[key], self.raw(key)
        if t.dtype == "BF16":  # bfloat16 is float32's high half: exact
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if t.dtype.startswith("F8"):
            return np.array(self.read(key).astype(mx.float32))
        return raw.astype(np.float32)

    def read(self, key: str) -> mx.array:
        """One tensor as an mx.array; fp8 is decoded exactly to bfloat16 (e4m3) / float16 (e5m2)."""
        t, raw = self.tensors[key], self.raw(key)
        if t.dtype == "BF16":
            return mx.array(raw).view(mx.bfloat16)
        if t.dtype == "F8_E4M3":
            return mx.from_fp8(mx.array(raw), dtype=mx.bfloat16)
        if t.dtype == "F8_E5M2":
            return _decode_fp8_e5m2(raw)
        return mx.array(raw)

    def items(self) -> Iterator[tuple[str, mx.array]]:
        """(key, tensor) in file order, each read when the iterator reaches it."""
        for key in sorted(self.tensors, key=lambda k: self.tensors[k].start):
            yield key, self.read(key)


class ShardWriter:
    """Writes (key, array) pairs into `<prefix>-NNNNN.safetensors` shards of bounded size."""

    def __init__(self, folder: Path, prefix: str, shard_bytes: int = 256 << 20):
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.index: dict[str, str] = {}

    def add(self, key: str, value: mx.array) -> None:
        mx.eval(value)
        self.pending[key] = value
        self.pending_bytes += value.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.folder / name), self.pending, metadata={"format": "mlx"})
        self.files.append(name)
        self.index.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()
