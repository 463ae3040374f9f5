"""`mlxflux serve`: a local web page and a JSON API over the same library.

One model is loaded once. A request's settings become a `GenerationRequest` as `mlxflux gen`'s
flags do (`request.resolve`), and the pipeline prepares its job on the thread that took the
request (inputs opened, LoRAs read, the memory plan made: refused there with 400); jobs run
one at a time, in the order they came, on a worker thread, so the same settings give the same
PNG. A cancelled job stops after the step it is on and writes nothing more.

    GET    /                         the page (plain HTML and JS, no build step)
    GET    /api/info                 the model, its variant, what images it takes, the presets
    POST   /api/jobs                 multipart: "settings" (JSON: the request's fields in their
                                     names, + "seed", "seeds", "count"), files "init_image",
                                     "reference" (repeatable), "control_image", "mask"
    GET    /api/jobs                 every job of this session, the queue in order
    GET    /api/jobs/{id}            one job
    GET    /api/jobs/{id}/events     server-sent events: progress, then the end state
    DELETE /api/jobs/{id}            cancel
    GET    /api/images               the output folder's PNGs, newest first, with their settings
    GET    /api/images/{name}        one PNG of the output folder (no other path is served)

Every route is behind `guard.Guard`: only this machine's names are served, requests that change
something from another origin are refused, and off loopback a token is required.
Bad requests get 400 with {"error": "one line", "field": the setting's name or null}, in the
page's words (the field's label); uploads are limited in size and must open as
images; they are kept in a temporary folder, removed when the server stops.
"""

import asyncio
import contextlib
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
from importlib import resources
from pathlib import Path

from ._version import __version__
from .errors import MlxfluxError, SettingsError, one_line
from .guard import Guard
from .request import label_of, params
from .resolve import resolve

log = logging.getLogger("mlxflux.serve")

MAX_UPLOAD_BYTES = 64 << 20  # per file; a cover scan is a few MB
MAX_REQUEST_BYTES = 5 * MAX_UPLOAD_BYTES
UPLOADS = {"init_image": "init_image", "reference": "reference_images",
           "control_image": "control_image", "mask": "mask"}  # fmt: skip
# what "settings" may hold: the request's fields (but its pictures, which come as files, and
# the given noise), and how to choose seeds
SETTINGS = (*(f.name for f in params() if f.name not in (*UPLOADS.values(), "noise", "seeds")),
            "seed", "seeds", "count")  # fmt: skip
NUMBERS = {
    f.name: f.metadata["cli"]["type"]
    for f in params()
    if (f.metadata["cli"] or {}).get("type") in (int, float)
} | {"seed": int, "count": int}
END = ("done", "failed", "cancelled")
PNG_NAME = re.compile(r"^[^/\\\x00]+\.png$")


class BadRequest(Exception):
    """A request that cannot run: 400 with its one-line message and the field it is about."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @classmethod
    def of(cls, e: SettingsError) -> "BadRequest":
        """A refused setting in the page's words: its field's label."""
        return cls(f"{label_of(e.name)}: {e.reason}", e.name)


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
    # every state the job has been in, in order: the event stream sends each one (no step is
    # lost between two polls); appended by the worker thread, read by the server's
    history: list[dict] = field(default_factory=list)

    def changed(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        self.history.append(self.public())

    def public(self) -> dict:
        request = self.job.request
        return {
            "id": self.id, "status": self.status, "stage": self.stage, "step": self.step,
            "steps": self.steps, "image": self.image, "count": len(request.seeds),
            "seeds": list(request.seeds), "images": self.images, "error": self.error,
            "prompt": request.prompt, "inputs": self.inputs, "created": self.created,
        }  # fmt: skip


class Studio:
    """The jobs of one server: checked on arrival, run in order by one worker thread."""

    def __init__(self, pipe, output_dir: str | Path):
        self.pipe = pipe
        self.output = Path(output_dir).expanduser().resolve()
        self.output.mkdir(parents=True, exist_ok=True)
        self.uploads = Path(tempfile.mkdtemp(prefix="mlxflux-uploads-"))
        self.jobs: dict[str, Entry] = {}
        self.queue: queue.Queue[Entry] = queue.Queue()
        threading.Thread(target=self._work, name="mlxflux-jobs", daemon=True).start()

    def close(self) -> None:
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
        job_id = uuid.uuid4().hex[:12]
        images, inputs = self._save_uploads(job_id, files)
        try:
            job = self.pipe.prepare(resolve({**given, **images}, preset))
        except SettingsError as e:
            raise BadRequest.of(e) from None
        except MlxfluxError as e:
            raise BadRequest(str(e)) from None
        entry = Entry(job_id, job, preset, inputs)
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
            if field_name != "reference" and len(parts) > 1:
                raise BadRequest(f"{field_name}: one file, got {len(parts)}")
            for i, (filename, data) in enumerate(parts):
                if len(data) > MAX_UPLOAD_BYTES:
                    raise BadRequest(f"{field_name}: {len(data) >> 20} MiB is over the "
                                     f"{MAX_UPLOAD_BYTES >> 20} MiB limit")  # fmt: skip
                name = _safe_name(filename) or f"{field_name}.png"
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
                if key == "reference_images":
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
            entry.changed(image=index, step=step, steps=steps)
            if entry.cancel.is_set():
                raise Cancelled

        job = entry.job
        job.report.on_stage = lambda name: entry.changed(stage=name)
        entry.changed(status="running")
        try:
            for index, (seed, image) in enumerate(job.run(on_step=on_step)):
                if entry.cancel.is_set():
                    raise Cancelled
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


def _safe_name(filename: str | None) -> str:
    """An upload's own file name reduced to its last part and harmless characters."""
    name = Path((filename or "").replace("\\", "/")).name
    name = re.sub(r"[^\w.\- ]", "_", name).strip(" .")
    return name[:100]


def create_app(studio: Studio, bind: str = "127.0.0.1", hosts=(), token: str | None = None):
    """The Starlette application over `studio`, behind `guard.Guard` (the Host names it serves
    besides the loopback ones and `bind`, the token it requires)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        StreamingResponse,
    )
    from starlette.routing import Route

    def bad(message: str, status: int = 400, field: str | None = None) -> JSONResponse:
        return JSONResponse({"error": one_line(message), "field": field}, status_code=status)

    async def page(request: Request):
        return HTMLResponse(resources.files("mlxflux").joinpath("web/index.html").read_text())

    async def info(request: Request):
        from .presets import all_presets

        v = studio.pipe.variant_info
        takes = set(v.family.inputs)
        return JSONResponse({
            "version": __version__, "model": str(studio.pipe.folder), "variant": v.name,
            "title": v.title, "defaults": v.defaults, "precision": studio.pipe.precision,
            "accepts": {"init_image": True, "reference": "reference_images" in takes,
                        "control_image": "control_image" in takes, "mask": "mask" in takes},
            "presets": all_presets(), "output_dir": str(studio.output),
        })  # fmt: skip

    async def post_job(request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_REQUEST_BYTES:
            return bad(f"the request is {size >> 20} MiB, over the {MAX_REQUEST_BYTES >> 20} "
                       "MiB limit", 413)  # fmt: skip
        try:
            form = await request.form(max_files=16, max_fields=16)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            return bad(f"not a multipart form ({e})")
        files: dict[str, list] = {}
        raw = None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                data = await value.read(MAX_UPLOAD_BYTES + 1)
                files.setdefault(key, []).append((value.filename, data))
            elif key == "settings":
                raw = value
            else:
                return bad(f"unknown form field {key!r}: send 'settings' and image files")
        if raw is None:
            return bad("settings: missing (a JSON object in the form field 'settings')")
        try:
            settings = json.loads(raw)
        except json.JSONDecodeError as e:
            return bad(f"settings: not JSON ({e})")
        try:
            job = await asyncio.to_thread(studio.submit, settings, files)
        except BadRequest as e:
            return bad(str(e), field=e.field)
        return JSONResponse({"id": job.id, **job.public()}, status_code=201)

    async def list_jobs(request: Request):
        jobs = sorted(studio.jobs.values(), key=lambda j: j.created)
        return JSONResponse({"jobs": [j.public() for j in jobs]})

    def find(request: Request) -> Entry | None:
        return studio.jobs.get(request.path_params["job_id"])

    async def get_job(request: Request):
        job = find(request)
        return JSONResponse(job.public()) if job else bad("no such job", 404)

    async def delete_job(request: Request):
        job = find(request)
        return JSONResponse(studio.cancel(job.id).public()) if job else bad("no such job", 404)

    async def events(request: Request):
        job = find(request)
        if job is None:
            return bad("no such job", 404)

        async def stream():
            sent = 0
            if not job.history:  # queued: say so at once
                yield f"event: progress\ndata: {json.dumps(job.public())}\n\n"
            while True:
                states = job.history[sent:]
                sent += len(states)
                for state in states:
                    kind = "end" if state["status"] in END else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(state)}\n\n"
                    if kind == "end":
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def list_images(request: Request):
        return JSONResponse({"images": await asyncio.to_thread(studio.gallery)})

    async def get_image(request: Request):
        path = studio.image_path(request.path_params["name"])
        return FileResponse(path, media_type="image/png") if path else bad("no such image", 404)

    async def get_upload(request: Request):
        p = request.path_params
        path = studio.upload_path(p["job_id"], p["part"], p["name"])
        return FileResponse(path) if path else bad("no such upload", 404)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/jobs", post_job, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/images", list_images),
        Route("/api/images/{name:path}", get_image),
        Route("/api/uploads/{job_id}/{part}/{name}", get_upload),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        studio.close()  # the uploads go with the server

    guard = Middleware(Guard, bind=bind, hosts=list(hosts), token=token)
    return Starlette(routes=routes, lifespan=lifespan, middleware=[guard])
