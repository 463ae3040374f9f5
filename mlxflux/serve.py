"""`mlxflux serve`: a local web page and a JSON API over the same library.

One model is loaded once. A request's settings become a `GenerationRequest` as `mlxflux gen`'s
flags do (`request.resolve`), and the pipeline prepares its job on the thread that took the
request (inputs opened, LoRAs read, the memory plan made: refused there with 400); jobs run
one at a time, in the order they came, on a worker thread, so the same settings give the same
PNG. A cancelled job stops after the step it is on and writes nothing more.

    GET    /                         the page (plain HTML and JS, no build step)
    GET    /api/info                 the model, its variant, what images it takes, the presets
    POST   /api/jobs                 multipart: "settings" (JSON: the request's fields in their
                                     names, + "seed", "seeds", "count", "redux_strengths"),
                                     files "init_image", "reference" (repeatable),
                                     "control_image", "mask", "redux" (repeatable)
    GET    /api/jobs                 every job of this session, the queue in order
    GET    /api/jobs/{id}            one job
    GET    /api/jobs/{id}/events     server-sent events: progress and preview, then the end state
    GET    /api/jobs/{id}/preview    the latest preview of the picture forming (JPEG)
    DELETE /api/jobs/{id}            cancel
    GET    /api/loras                the LoRAs a job may name: serve --lora-dir's and uploaded ones
    POST   /api/loras                multipart: file "lora" (.safetensors), kept for the session
    GET    /api/upscalers            the upscale models a job may name: serve --upscale-dir's
    POST   /api/upscale              JSON {"image": a gallery PNG's name, "model": a name,
                                     "scale": number or null, "refine": a denoise or null}
    GET    /api/images               the output folder's PNGs, newest first, with their settings
    GET    /api/images/{name}        one PNG of the output folder (no other path is served)

The jobs themselves are `studio.Studio`'s. Every route is behind `guard.Guard`: only this
machine's names are served, requests that change something from another origin are refused,
and off loopback a token is required. Bad requests get 400 with {"error": "one line", "field":
the setting's name or null}, in the page's words (the field's label); uploads are limited in
size and must open as images; they are kept in a temporary folder, removed when the server
stops.
"""

import asyncio
import contextlib
import json
from importlib import resources

from ._version import __version__
from .errors import one_line
from .guard import Guard
from .studio import MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES, Entry, Studio
from .studio_inputs import MAX_LORA_BYTES, BadRequest, Limits

__all__ = ["Limits", "Studio", "create_app"]


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
        Response,
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
                        "control_image": "control_image" in takes, "mask": "mask" in takes,
                        "redux": "redux" in studio.pipe.manifest["components"]},
            "presets": all_presets(), "output_dir": str(studio.output),
            "limits": {"images": studio.limits.images, "steps": studio.limits.steps,
                       "megapixels": studio.limits.megapixels,
                       "upload_mib": MAX_UPLOAD_BYTES >> 20},
            "previews": ["auto", "latent2rgb",
                         *(["taef1"] if "taef1" in studio.pipe.manifest["components"] else []),
                         "none"],
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

    async def list_loras(request: Request):
        return JSONResponse({"loras": list(await asyncio.to_thread(studio.loras.names)),
                             "folder": studio.loras.folder is not None})  # fmt: skip

    async def post_lora(request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_LORA_BYTES + (1 << 20):
            return bad(f"LoRA: over the {MAX_LORA_BYTES >> 30} GiB limit", 413, "lora")
        try:
            form = await request.form(max_files=1, max_fields=1)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            return bad(f"not a multipart form ({e})")
        upload = form.get("lora")
        if not hasattr(upload, "read"):
            return bad("LoRA: send the file in the form field 'lora'", field="lora")

        def chunks():
            while chunk := upload.file.read(1 << 20):
                yield chunk

        try:
            name = await asyncio.to_thread(studio.loras.add, upload.filename, chunks())
        except BadRequest as e:
            return bad(str(e), field=e.field)
        return JSONResponse({"name": name}, status_code=201)

    async def list_upscalers(request: Request):
        return JSONResponse({"models": list(await asyncio.to_thread(studio.upscalers.names)),
                             "folder": studio.upscalers.folder is not None})  # fmt: skip

    async def post_upscale(request: Request):
        body = await request.body()
        if len(body) > 1 << 16:
            return bad("the request is over 64 KiB", 413)
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return bad(f"not JSON ({e})")
        try:
            job = await asyncio.to_thread(studio.submit_upscale, raw)
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
                events = job.history[sent:]
                sent += len(events)
                for kind, data in events:
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind == "end":
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def get_preview(request: Request):
        job = find(request)
        if job is None or job.preview is None:
            return bad("no preview", 404)
        return Response(job.preview, media_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})  # fmt: skip

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
        Route("/api/jobs/{job_id}/preview", get_preview),
        Route("/api/loras", list_loras, methods=["GET"]),
        Route("/api/loras", post_lora, methods=["POST"]),
        Route("/api/upscalers", list_upscalers, methods=["GET"]),
        Route("/api/upscale", post_upscale, methods=["POST"]),
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
