"""`mlxflux serve`'s API: the same pixels as the CLI, jobs in order, cancel, the event stream,
bad requests, and file names that never leave the output folder."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import mlxflux
from mlxflux import studio as studio_module
from mlxflux.serve import Studio, create_app

from .helpers import cover_image, run_cli

END = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def folder(small_folder):
    return small_folder


@pytest.fixture
def studio(folder, tmp_path):
    s = Studio(mlxflux.load(folder), tmp_path / "out")
    yield s
    s.close()


@pytest.fixture
def client(studio):
    with TestClient(create_app(studio), base_url="http://127.0.0.1:7860") as c:
        yield c


def post(client, settings, files=None):
    data = {"settings": settings if isinstance(settings, str) else json.dumps(settings)}
    return client.post("/api/jobs", data=data, files=files or [])


def wait(client, job_id, until=END, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_job_draws_what_the_cli_draws(client, folder, tmp_path):
    original = tmp_path / "cover.png"
    cover_image(5, 48, 32).save(original)
    settings = {"prompt": "a lighthouse at dusk", "width": 48, "height": 32, "steps": 2,
                "seed": 3, "scheduler": "beta", "denoise": 0.7}  # fmt: skip
    r = post(client, settings, [("init_image", ("cover.png", original.read_bytes(), "image/png"))])
    assert r.status_code == 201, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    (url,) = job["images"]
    served = Image.open(io.BytesIO(client.get(url).content))
    cli = run_cli("gen", "--model", folder, "--prompt", settings["prompt"], "--width", 48,
                  "--height", 32, "--steps", 2, "--seed", 3, "--scheduler", "beta",
                  "--init-image", original, "--denoise", 0.7, cwd=tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    written = Image.open(cli.stdout.strip())
    assert np.array_equal(np.asarray(served), np.asarray(written))
    ours, theirs = json.loads(served.text["mlxflux"]), json.loads(written.text["mlxflux"])
    for key in ("prompt", "seed", "steps", "scheduler", "guidance", "shift", "denoise",
                "init_image_sha256"):  # fmt: skip
        assert ours[key] == theirs[key], key
    assert ours["init_image"] == "cover.png"


def test_jobs_run_one_at_a_time_in_order(client, studio):
    first = post(client, {"prompt": "one", "width": 64, "height": 64, "steps": 12, "seed": 1})
    second = post(client, {"prompt": "two", "width": 32, "height": 32, "steps": 1, "seed": 2})
    a, b = first.json()["id"], second.json()["id"]
    wait(client, a, until=("running", *END))
    queue = client.get("/api/jobs").json()["jobs"]
    assert [j["id"] for j in queue] == [a, b]
    assert queue[1]["status"] == "queued"  # waits while the first runs
    ja, jb = wait(client, a), wait(client, b)
    assert ja["status"] == jb["status"] == "done"
    times = [(studio.output / job["images"][0].rsplit("/", 1)[1]).stat().st_mtime
             for job in (ja, jb)]  # fmt: skip
    assert times[0] <= times[1]


def test_cancel_stops_after_the_step_and_writes_nothing(client, studio):
    running = post(client, {"prompt": "long", "width": 64, "height": 64, "steps": 400, "seed": 1})
    queued = post(client, {"prompt": "next", "width": 32, "height": 32, "steps": 1, "seed": 2})
    a, b = running.json()["id"], queued.json()["id"]
    start = time.time()
    while client.get(f"/api/jobs/{a}").json()["step"] < 1:
        assert time.time() - start < 120
        time.sleep(0.05)
    assert client.delete(f"/api/jobs/{b}").json()["status"] == "cancelled"  # never starts
    client.delete(f"/api/jobs/{a}")
    job = wait(client, a)
    assert job["status"] == "cancelled" and 1 <= job["step"] < 400 and job["images"] == []
    assert client.get(f"/api/jobs/{b}").json()["step"] == 0
    assert not list(studio.output.glob("*.png"))
    assert client.delete("/api/jobs/nope").status_code == 404


def test_events_stream_progress_with_stage_names_then_the_end(client):
    job = post(client, {"prompt": "x", "width": 32, "height": 32, "steps": 3, "seed": 1}).json()
    events = []
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "end":
                    break
    assert events[-1][0] == "end" and events[-1][1]["status"] == "done"
    states = [e for kind, e in events if kind != "preview"]
    stages = {e["stage"] for e in states}
    assert {"text", "modulation", "denoise", "decode"} <= stages
    assert {e["step"] for e in states if e["stage"] == "denoise"} >= {1, 2, 3}
    # a preview after every step, each one a picture at its URL while the job ran
    previews = [e for kind, e in events if kind == "preview"]
    assert [(e["step"], e["steps"]) for e in previews] == [(1, 3), (2, 3), (3, 3)]
    assert len({e["url"] for e in previews}) == 3
    assert events[-1][1]["preview"] is None  # the result replaces it
    last = client.get(previews[-1]["url"])
    assert last.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(last.content)).size == (4, 4)  # latent2rgb: 32 / 8


def test_a_job_without_previews_sends_none(client):
    job = post(client, {"prompt": "x", "width": 32, "height": 32, "steps": 2, "seed": 1,
                        "preview": "none"}).json()  # fmt: skip
    wait(client, job["id"])
    assert client.get(f"/api/jobs/{job['id']}/preview").status_code == 404
    r = post(client, {"prompt": "x", "width": 32, "height": 32, "preview": "taef1"})
    assert r.status_code == 400 and r.json()["field"] == "preview"
    assert r.json()["error"].startswith("Preview: taef1: this model folder has no tiny decoder")


def test_bad_requests_get_400_and_one_line(client, monkeypatch, tmp_path):
    ok = {"prompt": "x", "width": 32, "height": 32, "steps": 1}
    image = ("a.png", png_bytes(cover_image(1, 32, 32)), "image/png")
    # refused settings in the page's words (the field's label), with the field to mark
    cases = [
        ("{not json", [], "settings: not JSON", None),
        ({**ok, "colour": "red"}, [], "settings: unknown colour", None),
        ({**ok, "width": 50}, [], "Width: width and height must be positive multiples of 16",
         "width"),
        ({**ok, "steps": "many"}, [], "Steps: 'many' is not a number", "steps"),
        ({"width": 32}, [], "Prompt: give a prompt, or a preset", "prompt"),
        ({**ok, "preset": "poster"}, [], "poster", "preset"),
        (ok, [("init_image", ("a.png", b"not a png", "image/png"))],
         "Original: a.png: not a", "init_image"),
        (ok, [("reference", image)], "Reference: FLUX.1 dev takes no reference images",
         "reference_images"),
        (ok, [("photo", image)], "files: unknown photo", None),
        (["a list"], [], "settings: must be a JSON object", None),
    ]  # fmt: skip
    for settings, files, said, field in cases:
        r = post(client, settings, files)
        assert r.status_code == 400, (settings, r.text)
        error = r.json()["error"]
        assert said in error and "\n" not in error and not error.startswith("--"), error
        assert r.json()["field"] == field, (said, r.json())
    monkeypatch.setattr(studio_module, "MAX_UPLOAD_BYTES", 100)
    r = post(client, ok, [("init_image", image)])
    assert r.status_code == 400 and "over the" in r.json()["error"]
    r = client.post("/api/jobs", data={"other": "1"})
    assert r.status_code == 400
    assert client.get("/api/jobs").json()["jobs"] == []  # nothing was queued


def test_file_names_never_leave_the_output_folder(client, studio, tmp_path):
    secret = tmp_path / "secret.png"
    cover_image(1, 16, 16).save(secret)
    (studio.output / "mine.png").write_bytes(secret.read_bytes())
    assert client.get("/api/images/mine.png").status_code == 200
    for name in ("../secret.png", "..%2Fsecret.png", "%2E%2E/secret.png", str(secret),
                 "sub/../../secret.png", "mine.txt", "sub%2F..%2F..%2Fsecret.png"):  # fmt: skip
        r = client.get(f"/api/images/{name}")
        assert r.status_code == 404, name
        assert r.content != secret.read_bytes()
    assert client.get("/api/uploads/x/../../secret.png").status_code == 404


def test_gallery_lists_the_folders_pngs_newest_first_with_settings(client, studio):
    for seed in (1, 2):
        job = post(client, {"prompt": "g", "width": 32, "height": 32, "steps": 1, "seed": seed})
        wait(client, job.json()["id"])
        time.sleep(0.02)
    (studio.output / "foreign.png").write_bytes(png_bytes(cover_image(2, 16, 16)))
    images = client.get("/api/images").json()["images"]
    assert [i["name"] for i in images][0] == "foreign.png"
    assert [i["settings"]["seed"] for i in images[1:]] == [2, 1]
    assert images[0]["settings"] is None
    page = client.get("/")
    assert page.status_code == 200 and "mlxflux cover studio" in page.text
    info = client.get("/api/info").json()
    assert info["variant"] == "dev" and info["accepts"]["reference"] is False


def test_each_job_is_prepared_once_on_the_request_thread(client, studio, monkeypatch):
    """The request is checked and its job prepared when it arrives (inputs opened, LoRAs read,
    the memory plan made); the worker runs that job: nothing is prepared twice."""
    import threading

    calls = []
    real = type(studio.pipe).prepare

    def counting(self, request):
        calls.append((request.prompt, threading.current_thread().name))
        return real(self, request)

    monkeypatch.setattr(type(studio.pipe), "prepare", counting)
    r = post(client, {"prompt": "once", "width": 32, "height": 32, "steps": 1, "seed": 4})
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    assert len(calls) == 1 and calls[0][0] == "once"
    assert calls[0][1] != "mlxflux-jobs"  # not on the worker


def test_a_job_can_cache_steps(client, studio):
    r = post(client, {"prompt": "c", "width": 32, "height": 32, "steps": 20, "seed": 2,
                      "cache": "easycache", "cache_threshold": 1.0})  # fmt: skip
    assert r.status_code == 201, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    served = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    meta = json.loads(served.text["mlxflux"])
    assert (meta["cache"], meta["cache_threshold"], meta["cache_range"]) == (
        "easycache", 1.0, [0.15, 0.95])  # fmt: skip
    r = post(client, {"prompt": "c", "width": 32, "height": 32, "cache_threshold": 0.3})
    assert r.status_code == 400 and r.json()["field"] == "cache_threshold"
