"""Progress inside a stage that is not counted in steps: T5's layers in the text stage, the
VAE's blocks in encode and decode. `report.Stage` listens (when its report has `on_progress`),
the pipeline says how many units a run has (`units`), and the model calls `advance(x)` after
each one: x is then evaluated, so the count follows the work. Nobody listening: `advance` does
nothing and the graph stays as lazy as without it (the values are the same either way)."""

import contextlib
import contextvars
from collections.abc import Callable

import mlx.core as mx

# the stage's listener: listener(done, total)
_listener: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "mlxflux_progress_listener", default=None
)
_count: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "mlxflux_progress_count", default=None
)


@contextlib.contextmanager
def listening(listener: Callable[[int, int], None] | None):
    """Within: every `units` run reports to `listener(done, total)` (None: to nobody)."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


@contextlib.contextmanager
def units(total: int):
    """A run of `total` units, each ended by `advance`; reported as 0 of total at the start."""
    listener = _listener.get()
    token = _count.set([0, total] if listener is not None else None)
    if listener is not None:
        listener(0, total)
    try:
        yield
    finally:
        _count.reset(token)


def advance(*arrays: mx.array) -> None:
    """One unit done (its outputs `arrays`, evaluated now when someone listens)."""
    count, listener = _count.get(), _listener.get()
    if count is None or listener is None:
        return
    mx.eval(*arrays)
    count[0] = min(count[0] + 1, count[1])
    listener(count[0], count[1])
