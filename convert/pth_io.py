"""PyTorch `.pth` state dicts (ComfyUI's `taef1_decoder.pth`), read without running their pickle.

A `.pth` written by `torch.save` is a zip: `<name>/data.pkl`, a pickle of the state dict whose
tensors point at raw storages `<name>/data/<key>`. A pickle can name any Python callable, so
this reader resolves only the handful of names a state dict of plain tensors uses (an ordered
dict, `torch._utils._rebuild_tensor_v2`, the typed storages) to its own functions, and refuses
anything else with the name it asked for, as torch's `weights_only` loader does. Nothing of
torch is imported: tensors come back as numpy arrays.
"""

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mlxflux.errors import MlxfluxError

STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16",  # numpy has none: read as uint16 and widened
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "BoolStorage": np.bool_,
}


class PthError(MlxfluxError, ValueError):
    """A `.pth` file that is not a plain state dict of tensors; the message names the file."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`."""
    data = storage
    itemsize = data.dtype.itemsize
    if not size:
        return data[offset : offset + 1].reshape(())
    need = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if need > data.size:
        raise ValueError(f"a tensor of {tuple(size)} reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGES:
            return name
        raise PthError(f"{self.path}: its pickle asks for {module}.{name}; refused (only a "
                       "state dict of tensors is read; use the .safetensors version)")  # fmt: skip

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthError(f"{self.path}: an unknown kind of storage reference")
        _, kind, key, _, numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        dtype = STORAGES[kind]
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, np.uint16, count=numel).astype(np.uint32) << 16
            return bits.view(np.float32)
        return np.frombuffer(raw, dtype, count=numel)


def read_pth(path: str | Path, nested: bool = False) -> dict:
    """The state dict of a `torch.save`d `.pth` (zip format), tensors as numpy arrays.
    `nested`: also state dicts one level down (Real-ESRGAN's {"params_ema": {...}})."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PthError(f"{path}: not a torch.save zip file ({e}); the legacy pickle-only "
                       "format is not read: use the .safetensors version") from None  # fmt: skip
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise PthError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                state = _StateDictUnpickler(f, archive, prefix, path).load()
        except PthError:
            raise
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
            raise PthError(f"{path}: damaged ({type(e).__name__}: {e})") from None
    if not _named_tensors(state, nested):
        raise PthError(f"{path}: not a state dict of named tensors")
    return dict(state)


def _named_tensors(state, nested: bool) -> bool:
    return isinstance(state, dict) and all(
        isinstance(k, str) and (isinstance(v, np.ndarray) or (nested and _named_tensors(v, False)))
        for k, v in state.items()
    )
