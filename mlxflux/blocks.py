"""A stage's blocks and their weights: resident, or streamed from the model folder a block at a
time (the memory plan, `mlxflux.memory_plan`). Imports no model: the models take a
`BlockWeights` and run each block inside `with block_weights(prefix)`."""

import contextlib
import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

BLOCK = re.compile(r"^((?:double_blocks|single_blocks|encoder\.block)\.\d+)\.")


def block_of(key: str) -> str | None:
    """The block a tensor belongs to ("double_blocks.3", "encoder.block.7"), or None."""
    m = BLOCK.match(key)
    return m.group(1) if m else None


class BlockWeights:
    """How a stage gets the weights of its blocks ("double_blocks.3", "encoder.block.7").

    Resident (this class): the weights were attached lazily by `load_group` and stay once read.
    `StreamedBlocks` reads them just before the block runs and releases them after. A stage
    runs each block inside `with weights(prefix):` and never asks which it has."""

    streamed = False
    bytes_read = 0
    wait_seconds = 0.0  # time a block waited for its weights (the reads the overlap missed)

    def __call__(self, prefix: str, read_ahead: bool = True):
        """`read_ahead`: start reading the next block's weights as this one begins (False:
        the caller decides which block comes next, `read_ahead`)."""
        return contextlib.nullcontext()

    def read_ahead(self, prefix: str) -> None:
        """Start reading `prefix`'s weights: the block that runs next."""

    def done(self) -> None:
        """The stage is over: drop whatever was read ahead."""


class StreamedBlocks(BlockWeights):
    """Each block's tensors read from the model folder just before the block runs (evaluated
    on their own CPU stream), released right after it; while a block computes, the next one's
    read runs (`mx.async_eval` on the reader stream), so a read that takes less time than a
    block's compute costs nothing. `prefixes` is the order the blocks run in, which wraps
    around (a denoising step's last block reads the next step's first)."""

    streamed = True

    def __init__(self, model: nn.Module, folder, name: str, manifest: dict, prefixes,
                 include=lambda key: True):  # fmt: skip
        self.model, self.folder = model, Path(folder) / name
        self.order = list(prefixes)
        tensors = manifest["components"][name]["tensors"]
        self.files: dict[str, dict[str, list[str]]] = {p: {} for p in self.order}
        for key, t in tensors.items():
            head = block_of(key)
            if head in self.files and include(key):
                self.files[head].setdefault(t["file"], []).append(key)
        self.stream = mx.new_stream(mx.cpu)
        self.pending: dict[str, dict[str, mx.array]] = {}
        self.bytes_read, self.wait_seconds = 0, 0.0

    def _lazy(self, prefix: str) -> dict[str, mx.array]:
        """The block's tensors as unevaluated arrays: nothing is read until they are."""
        out = {}
        for file, keys in self.files[prefix].items():
            every = mx.load(str(self.folder / file), stream=self.stream)
            out.update((k, every[k]) for k in keys)
        return out

    def read_ahead(self, prefix: str) -> None:
        if prefix in self.pending:
            return
        arrays = self._lazy(prefix)
        mx.async_eval(list(arrays.values()))
        self.pending[prefix] = arrays

    @contextlib.contextmanager
    def __call__(self, prefix: str, read_ahead: bool = True):
        arrays = self.pending.pop(prefix, None)
        if arrays is None:
            arrays = self._lazy(prefix)
        start = time.perf_counter()
        mx.eval(list(arrays.values()))
        self.wait_seconds += time.perf_counter() - start
        self.bytes_read += sum(a.nbytes for a in arrays.values())
        self.model.load_weights(list(arrays.items()), strict=False)
        del arrays
        if read_ahead:
            self.read_ahead(self.next(prefix))
        try:
            yield
        finally:  # back to unread placeholders: the block's weights are freed
            self.model.load_weights(list(self._lazy(prefix).items()), strict=False)

    def next(self, prefix: str) -> str:
        """The block after `prefix` in running order (the last one's is the first)."""
        return self.order[(self.order.index(prefix) + 1) % len(self.order)]

    def done(self) -> None:
        self.pending.clear()
