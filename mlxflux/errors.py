"""The package's errors: every expected failure is an `MlxfluxError` whose message names the file
or the argument and what to do, so the CLI can print it as one line (exit 2); anything else is
a bug and keeps its traceback."""


class MlxfluxError(Exception):
    """Base of mlxflux's expected failures. Its message is always one line: control characters
    from file contents (a tensor named "a\\nb") or names are shown escaped."""

    def __str__(self) -> str:
        return one_line(super().__str__())


def one_line(text: str) -> str:
    """`text` with newlines and other control characters written as escapes."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def listing(keys, limit: int = 8) -> str:
    """Sorted keys for a message, the first `limit` and how many more."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class ModelFolderError(MlxfluxError, ValueError):
    """A model folder that cannot be used; the message names the file and the problem."""


class WeightError(MlxfluxError, ValueError):
    """Weights that do not fit the model: names the source and the offending keys."""


class SettingsError(MlxfluxError, ValueError):
    """A generation setting out of range; `name` is the parameter (steps, guidance, ...)."""

    def __init__(self, message: str, name: str):
        super().__init__(f"{name}: {message}")
        self.name, self.reason = name, message


class NonFiniteError(MlxfluxError, ArithmeticError):
    """A stage produced NaN or infinite values (an overflow, typically in 16-bit compute).

    `stage` is the stage's name, `step` the denoising step (1-based) or None; the message says
    what to try. No image is returned, so none is saved.
    """

    def __init__(self, stage: str, step: int | None, steps: int | None, precision: str):
        where = f"{stage} stage" + (f" at step {step}/{steps}" if step else "")
        hint = (
            "try --precision float32 (precision='float32')"
            if precision != "float32"
            else "the model's weights may be damaged: check them with `mlxflux info --check`"
        )
        super().__init__(f"non-finite values (NaN/inf) in the {where} in {precision}; {hint}")
        self.stage, self.step = stage, step


def check_finite(x, stage: str, precision: str, step=None, steps=None) -> None:
    """Raise NonFiniteError unless every value of the MLX array x is finite (one reduction,
    one sync): each stage's output is checked, so an overflow never becomes a black PNG."""
    import mlx.core as mx

    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(stage, step, steps, precision)
