"""The studio's jobs (`mlxflux serve`): each request checked on arrival as `mlxflux gen` checks
its flags (`request.resolve`), its uploads saved, its job prepared once on the thread that took
it (inputs opened, LoRAs read, the memory plan made; refused there as `BadRequest`), then run
one at a time, in the order they came, by one worker thread, so the same settings give the
same PNG. A cancelled job stops after the step it is on and writes nothing more.

Each job's `Entry` keeps every state it has been in (`history`: what the event stream sends)
and the latest preview of the picture forming, as a small JPEG (`mlxflux.preview`).
"""

import io
import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .errors import MlxfluxError, SettingsError, one_line
from .request import label_of, params
from .resolve import resolve
from .studio_inputs import BadRequest, Limits, LoraLibrary, safe_name
from .studio_upscale import UpscaleLibrary, prepare_upscale

log = logging.getLogger("mlxflux.serve")

MAX_UPLOAD_BYTES = 64 << 20  # per file; a cover scan is a few MB
MAX_REQUEST_BYTES = 5 * MAX_UPLOAD_BYTES


UPLOADS = {"init_image": "init_image", "reference": "reference_images",
           "control_image": "control_image", "mask": "mask", "redux": "redux_images"}  # fmt: skip
MULTIPLE = ("reference", "redux")  # the upload fields that take several files
# what "settings" may hold: the request's fields (but its pictures, which come as files, and
# the given noise), how to choose seeds, and the Redux uploads' strengths, in their order
SETTINGS = (*(f.name for f in params() if f.name not in (*UPLOADS.values(), "noise", "seeds")),
            "seed", "seeds", "count", "redux_strengths")  # fmt: skip
NUMBERS = {
    f.name: f.metadata["cli"]["type"]
    for f in params()
    if (f.metadata["cli"] or {}).get("type") in (int, float)
} | {"seed": int, "count": int}
END = ("done", "failed", "cancelled")
PNG_NAME = re.compile(r"^[^/\\\x00]+\.png$")


class Cancelled(Exception):
    pass


@dataclass
class Entry:
    """A job in the studio's queue: the prepared job and what the page sees of it."""

    id: str
    job: object  # the prepared `job.Job`
    preset: str | None
    inputs: dict  # the uploaded files' URLs, for the page's before/after view
    status: str = "queued"
    stage: str = ""
    step: int = 0
    steps: int = 0
    image: int = 0  # which of the seeds is being made
    images: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)
    # every event of the job, in order, as (kind, data): "progress" and "end" with the state it
    # is in, "preview" when a new preview is ready; the event stream sends each one (no step is
    # lost between two polls); appended by the worker thread, read by the server's
    history: list[tuple[str, dict]] = field(default_factory=list)
    preview: bytes | None = None  # the latest preview, JPEG
    previews: int = 0  # how many there have been: the preview URL's version
    stage_done: int = 0  # the text, encode and decode stages' progress (`mlxflux.progress`)
    stage_total: int = 0
    started: float | None = None  # when it began to run, and when it ended
    ended: float | None = None
    step_seconds: list[float] = field(default_factory=list)  # each step's, as measured
    decode_seconds: list[float] = field(default_factory=list)
    _tick: float = 0.0  # when the last step (or the denoise stage) ended

    def changed(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        if self.status in END and self.ended is None:
            self.ended = time.time()
        self.history.append(("end" if self.status in END else "progress", self.public()))

    def staged(self, name: str) -> None:
        """A stage begins: its own progress starts at nothing."""
        if name in ("denoise", "decode"):
            self._tick = time.perf_counter()
        self.changed(stage=name, stage_done=0, stage_total=0)

    def stepped(self, index: int, step: int, steps: int) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._tick)
        self._tick = now
        self.changed(image=index, step=step, steps=steps)

    def stage_progress(self, stage: str, done: int, total: int) -> None:
        if stage == "decode" and done == total:  # one image decoded
            now = time.perf_counter()
            self.decode_seconds.append(now - self._tick)
            self._tick = now
        self.changed(stage_done=done, stage_total=total)

    def eta(self) -> float | None:
        """Seconds left, from the steps (and decodes) measured so far; None before the first
        step. The first step is left out once there are others: it carries one-off work."""
        if self.status != "running" or not self.step_seconds:
            return None
        times = self.step_seconds[1:] or self.step_seconds
        per_step = sorted(times)[len(times) // 2]
        count, steps = len(self.job.request.seeds), self.steps or self.job.request.steps or 0
        if self.stage in ("denoise", "modulation", "text", "encode", ""):
            left = steps - self.step + steps * (count - 1 - self.image)
            decodes = count
        else:  # decoding: every step is done
            left, decodes = 0, count - len(self.decode_seconds)
        decode = sum(self.decode_seconds) / len(self.decode_seconds) if self.decode_seconds else 0
        if self.stage == "decode" and self.stage_done and self.stage_total:
            # this image's decode, from its blocks so far (the first decode has no other measure)
            per_block = (time.perf_counter() - self._tick) / self.stage_done
            this = per_block * (self.stage_total - self.stage_done)
            return this + (decodes - 1) * (decode or per_block * self.stage_total)
        return left * per_step + decodes * decode

    def previewed(self, index: int, step: int, steps: int, picture) -> None:
        """A new preview of seed `index` after `step` of `steps` (a PIL picture)."""
        buf = io.BytesIO()
        picture.convert("RGB").save(buf, format="JPEG", quality=85)
        self.preview, self.previews = buf.getvalue(), self.previews + 1
        self.history.append(("preview", {"id": self.id, "image": index, "step": step,
                                         "steps": steps, "url": self.preview_url()}))  # fmt: skip

    def preview_url(self) -> str | None:
        """The latest preview's URL while the job runs (versioned: a browser fetches each)."""
        if self.preview is None or self.status != "running":
            return None
        return f"/api/jobs/{self.id}/preview?v={self.previews}"

    def public(self) -> dict:
        request = self.job.request
        return {
            "id": self.id, "status": self.status, "stage": self.stage, "step": self.step,
            "steps": self.steps, "image": self.image, "count": len(request.seeds),
            "seeds": list(request.seeds), "images": self.images, "error": self.error,
            "prompt": request.prompt, "inputs": self.inputs, "created": self.created,
            "preview": self.preview_url(), "width": self.job.width, "height": self.job.height,
            "preset": self.preset, "stage_done": self.stage_done, "stage_total": self.stage_total,
            "elapsed": None if self.started is None else (self.ended or time.time()) - self.started,
            "eta": self.eta(),
        }  # fmt: skip


class Studio:
    """The jobs of one server: checked on arrival, run in order by one worker thread."""

    def __init__(self, pipe, output_dir: str | Path, lora_dir: str | Path | None = None,
                 limits: Limits | None = None, upscale_dir: str | Path | None = None):  # fmt: skip
        self.pipe = pipe
        self.output = Path(output_dir).expanduser().resolve()
        self.output.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.uploads = Path(tempfile.mkdtemp(prefix="mlxflux-uploads-"))
        self.loras = LoraLibrary(lora_dir, self.uploads / "loras")
        self.upscalers = UpscaleLibrary(upscale_dir)
        self.jobs: dict[str, Entry] = {}
        self.queue: queue.Queue[Entry] = queue.Queue()
        threading.Thread(target=self._work, name="mlxflux-jobs", daemon=True).start()

    def close(self) -> None:
        """The server stops: every job still to end is cancelled, the uploads removed."""
        for entry in list(self.jobs.values()):
            if entry.status not in END:
                self.cancel(entry.id)
        shutil.rmtree(self.uploads, ignore_errors=True)

    # ---- arrival -------------------------------------------------------------------------

    def submit(self, raw: dict, files: dict[str, list[tuple[str, bytes]]]) -> Entry:
        """Check a request as `mlxflux gen` checks its flags, save its uploads, prepare its job
        (once, here), queue it. BadRequest with one line when it cannot run."""
        if not isinstance(raw, dict):
            raise BadRequest("settings: must be a JSON object")
        unknown = sorted(set(raw) - set(SETTINGS))
        if unknown:
            raise BadRequest(f"settings: unknown {', '.join(unknown)}")
        given = {k: _number(v, NUMBERS[k], k) if k in NUMBERS else v for k, v in raw.items()}
        given = {k: v for k, v in given.items() if v is not None and v != ""}
        preset = given.pop("preset", None) or None
        if "loras" in given:
            given["loras"] = self.loras.find(given["loras"])
        if "count" in given and given["count"] > self.limits.images:  # before any seed is made
            raise BadRequest(f"{label_of('count')}: {given['count']} images is over this "
                             f"server's {self.limits.images} per job (serve --max-images)",
                             "count")  # fmt: skip
        if isinstance(given.get("width"), int) and isinstance(given.get("height"), int):
            self.limits.check_size(given["width"], given["height"])
        strengths = given.pop("redux_strengths", None)
        job_id = uuid.uuid4().hex[:12]
        images, inputs = self._save_uploads(job_id, files)
        if strengths is not None or "redux_images" in images:
            images["redux_images"] = _with_strengths(images.get("redux_images", []), strengths)
        try:
            request = resolve({**given, **images}, preset)
            self.limits.check(request, "seeds" if "seeds" in given else "count")
            job = self.pipe.prepare(request)
            self.limits.check_size(job.width, job.height)
        except SettingsError as e:
            raise BadRequest.of(e) from None
        except MlxfluxError as e:
            raise BadRequest(str(e).replace(str(self.uploads), "uploads")) from None
        entry = Entry(job_id, job, preset, inputs)
        self.jobs[entry.id] = entry
        self.queue.put(entry)
        return entry

    def submit_upscale(self, raw: dict) -> Entry:
        """ "Upscale for print": a gallery picture by a model of --upscale-dir, refined or not
        (`studio_upscale`); checked now, queued like a generation."""
        job = prepare_upscale(self, raw)
        original = {"init_image": [f"/api/images/{raw['image']}"]}  # the card shows it beside
        entry = Entry(uuid.uuid4().hex[:12], job, None, original)
        self.jobs[entry.id] = entry
        self.queue.put(entry)
        return entry

    def _save_uploads(self, job_id: str, files) -> tuple[dict, dict]:
        from .pixels import Picture

        images, inputs = {}, {}
        unknown = sorted(set(files) - set(UPLOADS))
        if unknown:
            raise BadRequest(f"files: unknown {', '.join(unknown)} (one of {', '.join(UPLOADS)})")
        for field_name, parts in files.items():
            if field_name not in MULTIPLE and len(parts) > 1:
                raise BadRequest(f"{field_name}: one file, got {len(parts)}")
            for i, (filename, data) in enumerate(parts):
                name = safe_name(filename) or f"{field_name}.png"
                if len(data) > MAX_UPLOAD_BYTES:  # read only to one byte past the limit
                    raise BadRequest(f"{label_of(UPLOADS[field_name])}: {name} is over the "
                                     f"{MAX_UPLOAD_BYTES >> 20} MiB limit",
                                     UPLOADS[field_name])  # fmt: skip
                folder = self.uploads / job_id / f"{field_name}-{i}"
                folder.mkdir(parents=True)
                path = folder / name
                path.write_bytes(data)
                try:
                    picture = Picture.of(path, field_name)  # opened once, kept by the request
                except SettingsError as e:
                    reason = e.reason.replace(str(path), name)
                    raise BadRequest(f"{label_of(UPLOADS[field_name])}: {reason}",
                                     UPLOADS[field_name]) from None  # fmt: skip
                key = UPLOADS[field_name]
                if field_name in MULTIPLE:
                    images.setdefault(key, []).append(picture)
                else:
                    images[key] = picture
                inputs.setdefault(field_name, []).append(
                    f"/api/uploads/{job_id}/{field_name}-{i}/{name}"
                )
        return images, inputs

    def upload_path(self, job_id: str, part: str, name: str) -> Path | None:
        path = (self.uploads / job_id / part / name).resolve()
        return path if path.is_file() and path.is_relative_to(self.uploads) else None

    def cancel(self, job_id: str) -> Entry:
        job = self.jobs[job_id]
        if job.status not in END:
            job.cancel.set()
            if job.status == "queued":
                job.changed(status="cancelled")
        return job

    # ---- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job.cancel.is_set():
                job.changed(status="cancelled")
                continue
            self._run(job)

    def _run(self, entry: Entry) -> None:
        from .comfy_graph import comfy_chunks
        from .png import save_png
        from .runs import output_path

        def on_step(index: int, step: int, steps: int) -> None:
            entry.stepped(index, step, steps)
            if entry.cancel.is_set():
                raise Cancelled

        job = entry.job
        job.report.on_stage = entry.staged
        job.report.on_progress = entry.stage_progress
        entry.changed(status="running", started=time.time())
        try:
            on_preview = entry.previewed if job.preview != "none" else None
            for index, (seed, image) in enumerate(job.run(on_step, on_preview)):
                if entry.cancel.is_set():
                    raise Cancelled
                if hasattr(job, "save"):  # an upscale: its own records
                    path = job.save(image, self.output)
                else:
                    meta = dict(job.report.settings, seed=seed, version=__version__,
                                preset=entry.preset)  # fmt: skip
                    name = output_path(None, seed=seed, index=index, preset=entry.preset,
                                       prompt=job.request.prompt)  # fmt: skip
                    graphs = comfy_chunks(meta, self.pipe.manifest)
                    path = save_png(image, self.output / name, meta, graphs)
                entry.changed(images=[*entry.images, f"/api/images/{path.name}"])
            entry.changed(status="done", stage="")
        except Cancelled:
            entry.changed(status="cancelled")
        except MlxfluxError as e:
            entry.changed(status="failed", error=str(e))
        except Exception as e:  # a bug: keep the server, say what happened
            log.exception("job %s failed", entry.id)
            entry.changed(status="failed", error=one_line(f"{type(e).__name__}: {e}"))

    # ---- the output folder ---------------------------------------------------------------

    def image_path(self, name: str) -> Path | None:
        if not PNG_NAME.match(name):
            return None
        path = (self.output / name).resolve()
        return path if path.parent == self.output and path.is_file() else None

    def gallery(self, limit: int = 200) -> list[dict]:
        from PIL import Image

        out = []
        pngs = sorted(self.output.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in pngs[:limit]:
            try:
                with Image.open(path) as img:
                    text = getattr(img, "text", {}).get("mlxflux")
                settings = json.loads(text) if text else None
            except Exception:  # noqa: BLE001 - a damaged or foreign PNG is listed without settings
                settings = None
            out.append({"name": path.name, "url": f"/api/images/{path.name}",
                        "settings": settings, "mtime": path.stat().st_mtime})  # fmt: skip
        return out


def _with_strengths(pictures: list, strengths) -> list:
    """The Redux uploads with "redux_strengths" (numbers, one per file, in order; absent: 1)."""
    if strengths is None:
        return [(p, 1.0) for p in pictures]
    if not isinstance(strengths, list) or len(strengths) != len(pictures):
        raise BadRequest(f"{label_of('redux_images')}: give one strength per Redux image "
                         f"({len(pictures)})", "redux_images")  # fmt: skip
    for value in strengths:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"{label_of('redux_images')}: strength {value!r} is not a number",
                             "redux_images")  # fmt: skip
    return list(zip(pictures, strengths, strict=True))


def _number(value, kind, name):
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{label_of(name)}: {value!r} is not a number", name)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{label_of(name)}: {value!r} is not a number", name) from None
    if kind is int and isinstance(value, float) and value != number:
        raise BadRequest(f"{label_of(name)}: {value!r} is not a whole number", name)
    return number
