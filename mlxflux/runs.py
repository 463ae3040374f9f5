"""Many images in one run: what each file is called, and which process makes which seed when
the same command runs under MLX's launcher (`mlx.launch -n 2 -- mlxflux gen ...`)."""

import string
from pathlib import Path

import mlx.core as mx

from .errors import SettingsError
from .png import slug

FIELDS = ("seed", "index", "preset")


def check_template(template: str | None, many: bool) -> None:
    """--output may hold {seed}, {index} and {preset}; several images need {seed} or {index}."""
    if template is None:
        return
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise SettingsError(f"{template!r}: {e}", "output") from None
    unknown = names - set(FIELDS)
    if unknown:
        raise SettingsError(
            f"{template!r}: unknown field {{{sorted(unknown)[0]}}}; use {{seed}}, {{index}} or "
            "{preset}",
            "output",
        )
    if many and not names & {"seed", "index"}:
        raise SettingsError(
            f"{template!r} would name every image alike: add {{seed}} or {{index}}, e.g. "
            "covers/dvd-{seed}.png",
            "output",
        )


def output_path(template: str | None, *, seed: int, index: int, preset: str | None, prompt: str):
    """The PNG's path: the template filled in, or `<preset or prompt>-<seed>.png` here."""
    name = preset or slug(prompt)
    if template is None:
        return Path(f"{name}-{seed}.png")
    return Path(template.format(seed=seed, index=index, preset=name))


def share(seeds: list[int]) -> tuple[list[int], object]:
    """This process's share of the seeds (every size-th from its rank) and the group.

    Outside `mlx.launch` the group has one member and the share is every seed.
    """
    group = mx.distributed.init(strict=False)
    return seeds[group.rank() :: group.size()], group


def total(group, value: int) -> int:
    """The sum of `value` over every process of the group (a barrier, too)."""
    if group.size() == 1:
        return value
    return int(mx.distributed.all_sum(mx.array([value]), group=group, stream=mx.cpu).item())
