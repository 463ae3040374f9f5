"""Per-stage time and memory: what `--report` writes and each `job.Job` holds as `report`."""

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from . import native, progress


@dataclass
class StageStats:
    seconds: float = 0.0
    peak_bytes: int = 0
    active_bytes_after: int = 0
    bytes_read: int = 0  # weights read from the model folder during the stage
    read_wait_seconds: float = 0.0  # streamed: time blocks waited for their weights


@dataclass
class Report:
    stages: dict[str, StageStats] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)  # per seed: seconds to denoise, decode
    plan: str = "resident"  # the memory plan: "resident" or "streamed" (some stage streams)
    # called with each stage's name as it starts (the web page shows it); not reported
    on_stage: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # called as a stage that is not counted in steps goes on: on_progress(stage, done, total)
    # (T5's layers, the VAE's blocks; `mlxflux.progress`); not reported
    on_progress: Callable[[str, int, int], None] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages.values()), default=0)

    def record_cache(self, counts: dict) -> None:
        """The last image's step cache: which steps it computed and which it skipped."""
        self.images[-1]["cache"] = {k: list(v) for k, v in counts.items()}

    @property
    def cache(self) -> dict:
        """The step cache's method, settings and counts, summed over the images."""
        s = self.settings
        out = {"method": s.get("cache", "none"), "threshold": s.get("cache_threshold"),
               "range": s.get("cache_range")}  # fmt: skip
        per = [i["cache"] for i in self.images if "cache" in i]
        out["steps_computed"] = sum(len(c["computed"]) for c in per)
        out["steps_skipped"] = sum(len(c["skipped"]) for c in per)
        return out

    def to_dict(self) -> dict:
        return {
            "plan": self.plan,
            "stages": {k: vars(v) for k, v in self.stages.items()},
            "peak_bytes": self.peak_bytes,
            "settings": self.settings,
            "images": self.images,
            "cache": self.cache,
        }


class Stage:
    """Times a stage and records its peak; on exit, collects and clears MLX's cache."""

    def __init__(self, report: Report, name: str):
        self.report, self.name = report, name
        self.bytes_read, self.read_wait_seconds = 0, 0.0  # set by the stage as it reads

    def __enter__(self):
        if self.report.on_stage is not None:
            self.report.on_stage(self.name)
        on_progress, name = self.report.on_progress, self.name
        listener = on_progress and (lambda done, total: on_progress(name, done, total))
        self.listening = progress.listening(listener)
        self.listening.__enter__()
        mx.synchronize()
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.listening.__exit__(*exc)
        mx.synchronize()
        stats = StageStats(time.perf_counter() - self.start, mx.get_peak_memory())
        stats.bytes_read, stats.read_wait_seconds = self.bytes_read, self.read_wait_seconds
        native.release()  # the CPU path's float32 buffer for quantized layers
        gc.collect()
        mx.clear_cache()
        stats.active_bytes_after = mx.get_active_memory()
        self.report.stages[self.name] = stats
        return False
