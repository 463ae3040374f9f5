"""GGUF files (city96's FLUX transformers and T5-XXL encoders), read a tensor at a time.

The `gguf` package (llama.cpp's reference reader and dequantizer) memory-maps the file; each
tensor is dequantized to float32 when it is read, so converting holds one tensor at a time, as
for safetensors. `GGUFFile` offers `SafetensorsFile`'s interface (`tensors`, `read`, `path`,
`header_sha256`) so the converter treats both alike. T5 encoders come with llama.cpp's names,
which are renamed here to transformers' (the converter's T5 key map takes it from there).
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxflux.safetensors_io import SafetensorsError, TensorFile

MAGIC = b"GGUF"
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # fmt: skip

# llama.cpp T5 encoder names -> transformers' T5EncoderModel names
_T5 = [
    (r"token_embd\.weight", "shared.weight"),
    (r"enc\.output_norm\.weight", "encoder.final_layer_norm.weight"),
    (r"enc\.blk\.(\d+)\.attn_q\.weight", r"encoder.block.\1.layer.0.SelfAttention.q.weight"),
    (r"enc\.blk\.(\d+)\.attn_k\.weight", r"encoder.block.\1.layer.0.SelfAttention.k.weight"),
    (r"enc\.blk\.(\d+)\.attn_v\.weight", r"encoder.block.\1.layer.0.SelfAttention.v.weight"),
    (r"enc\.blk\.(\d+)\.attn_o\.weight", r"encoder.block.\1.layer.0.SelfAttention.o.weight"),
    (
        r"enc\.blk\.(\d+)\.attn_rel_b\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"enc\.blk\.(\d+)\.attn_norm\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"enc\.blk\.(\d+)\.ffn_gate\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"enc\.blk\.(\d+)\.ffn_up\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"enc\.blk\.(\d+)\.ffn_down\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"enc\.blk\.(\d+)\.ffn_norm\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
]
_T5_RULES = [(re.compile(p + "$"), r) for p, r in _T5]


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _t5_name(name: str) -> str:
    for pattern, repl in _T5_RULES:
        m = pattern.match(name)
        if m:
            return m.expand(repl)
    return name


@dataclass(frozen=True)
class GGUFTensor:
    dtype: str  # GGML type name: Q8_0, F16, ...
    shape: tuple[int, ...]  # numpy order (GGUF stores the innermost dimension first)
    start: int
    nbytes: int
    kind: object  # gguf.GGMLQuantizationType
    raw_shape: tuple[int, ...]  # the stored array's shape (rows x bytes for block types)
    raw_dtype: object  # its numpy dtype


class GGUFFile(TensorFile):
    """A validated GGUF file with per-tensor, dequantizing reads."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, KeyError, struct errors...
            raise SafetensorsError(f"{self.path}: not a readable GGUF file ({e})") from None
        with open(self.path, "rb") as f:
            head = f.read(1 << 20)
        self.header_sha256 = hashlib.sha256(head).hexdigest()
        llama_t5 = any(t.name.startswith("enc.blk.") for t in self._reader.tensors)
        size = self.path.stat().st_size
        self.tensors: dict[str, GGUFTensor] = {}
        for t in self._reader.tensors:
            kind = t.tensor_type.name
            if kind not in SUPPORTED:
                raise SafetensorsError(
                    f"{self.path}: tensor {t.name} has GGUF type {kind}, which mlxflux does not "
                    f"read (it reads {', '.join(SUPPORTED)})"
                )
            if t.data_offset + t.n_bytes > size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {t.name} ends past the end")
            name = _t5_name(t.name) if llama_t5 else t.name
            shape = tuple(int(n) for n in reversed(t.shape))
            self.tensors[name] = GGUFTensor(
                kind, shape, int(t.data_offset), int(t.n_bytes), t.tensor_type,
                tuple(t.data.shape), t.data.dtype,
            )  # fmt: skip
        del self._reader  # its memory map: tensors are read with plain file reads

    def read(self, key: str) -> mx.array:
        """One tensor, dequantized by the gguf package, as float32 (exactly its values).

        Read with a plain file read rather than through the memory map, so the process holds
        one tensor at a time and not the pages of every tensor read so far."""
        from gguf import quants

        info = self.tensors[key]
        count = info.nbytes // np.dtype(info.raw_dtype).itemsize
        try:
            raw = np.fromfile(self.path, dtype=info.raw_dtype, count=count, offset=info.start)
            raw = raw.reshape(info.raw_shape)
        except (OSError, ValueError) as e:  # the file changed or its header lied
            raise SafetensorsError(f"{self.path}: tensor {key} cannot be read ({e})") from None
        try:
            if raw.ndim < 2:
                return mx.array(quants.dequantize(raw, info.kind).astype(np.float32))
            # rows in chunks: the dequantizer's float32 temporaries stay ~32 MiB, not the tensor
            out = np.empty((raw.shape[0], int(np.prod(info.shape)) // raw.shape[0]), np.float32)
            step = max(1, (32 << 20) // (4 * out.shape[1]))
            for r in range(0, raw.shape[0], step):
                out[r : r + step] = quants.dequantize(raw[r : r + step], info.kind)
            return mx.array(out.reshape(info.shape))
        except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            raise SafetensorsError(f"{self.path}: tensor {key} does not decode ({e})") from None
