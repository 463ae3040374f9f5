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
    running = post(client, {"prompt": "long", "width": 256, "height": 256, "steps": 150, "seed": 1})
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


@pytest.fixture
def limited(folder, tmp_path):
    from mlxflux.serve import Limits

    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    s = Studio(
        mlxflux.load(folder), tmp_path / "out", loras, Limits(images=3, steps=4, megapixels=0.01)
    )
    with TestClient(create_app(s), base_url="http://127.0.0.1:7860") as c:
        yield c, s, loras
    s.close()


def test_each_bound_is_stated_with_its_flag(limited):
    client, studio, _ = limited
    ok = {"prompt": "x", "width": 32, "height": 32, "steps": 1}
    cases = [
        ({**ok, "count": 4}, "Count: 4 images is over this server's 3 per job (serve --max-images)",
         "count"),
        ({**ok, "count": 100000}, "over this server's 3 per job", "count"),
        ({**ok, "seeds": "1,2,3,4"}, "Seed: 4 images is over this server's 3", "seeds"),
        ({**ok, "steps": 5}, "Steps: 5 is over this server's 4 (serve --max-steps)", "steps"),
        ({**ok, "width": 128, "height": 96},
         "Width: 128x96 is 0.0 megapixels, over this server's 0.01 (serve --max-megapixels)",
         "width"),
    ]  # fmt: skip
    for settings, said, field in cases:
        r = post(client, settings)
        assert r.status_code == 400, (settings, r.text)
        assert said in r.json()["error"] and r.json()["field"] == field, r.json()
    assert client.get("/api/info").json()["limits"] == {
        "images": 3,
        "steps": 4,
        "megapixels": 0.01,
        "upload_mib": 64,
    }
    r = post(client, {**ok, "count": 3, "steps": 4})  # at the bounds: taken
    assert r.status_code == 201, r.text
    client.delete(f"/api/jobs/{r.json()['id']}")


def test_the_default_bounds(client):
    ok = {"prompt": "x", "width": 32, "height": 32}
    assert "per job (serve --max-images)" in post(client, {**ok, "count": 65}).json()["error"]
    assert "(serve --max-steps)" in post(client, {**ok, "steps": 151}).json()["error"]
    r = post(client, {**ok, "width": 2064, "height": 2048})
    assert "over this server's 4.2 (serve --max-megapixels)" in r.json()["error"]
    r = post(client, {**ok, "width": 16400})  # ComfyUI's largest side, for the CLI as well
    assert r.json() == {"error": "Width: 16400 is over 16384 pixels (ComfyUI's MAX_RESOLUTION)",
                        "field": "width"}  # fmt: skip


def test_loras_come_from_the_lora_dir_or_an_upload_and_nowhere_else(limited, folder, tmp_path):
    from .helpers import write_lora

    client, studio, loras = limited
    layers = {"double_blocks.0.img_attn.qkv": (768, 256)}
    write_lora(loras / "styles" / "chrome.safetensors", layers, seed=1)
    outside = write_lora(tmp_path / "outside.safetensors", layers, seed=2)
    (loras / "link.safetensors").symlink_to(outside)  # a link out of the folder: not listed
    (tmp_path / "secret.txt").write_text("x" * 1294)
    assert client.get("/api/loras").json() == {"loras": ["styles/chrome.safetensors"],
                                               "folder": True}  # fmt: skip
    settings = {"prompt": "chrome", "width": 32, "height": 32, "steps": 2, "seed": 4}
    r = post(client, {**settings, "loras": ["styles/chrome.safetensors:0.8"]})
    assert r.status_code == 201, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    served = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content)))
    want = mlxflux.load(folder).generate(
        "chrome",
        seed=4,
        width=32,
        height=32,
        steps=2,
        loras=[(loras / "styles/chrome.safetensors", 0.8)],
    )
    assert np.array_equal(served, np.asarray(want))  # the same LoRA, read from the folder

    # any other name gets the same one line, whether or not such a file exists
    said = {}
    for name in (str(outside), "../outside.safetensors", "link.safetensors", "../secret.txt",
                 "/etc/passwd", "/no/such.safetensors", "styles/../../secret.txt"):  # fmt: skip
        r = post(client, {**settings, "loras": [[name, 1.0]]})
        assert r.status_code == 400 and r.json()["field"] == "loras", r.text
        head, sep, said[name] = r.json()["error"].partition(" is not one of this server's")
        assert head.startswith("LoRAs: '") and sep, r.json()  # the name as sent, then:
        for leak in ("bytes", "no such file", "header", "1294", str(tmp_path)):
            assert leak not in said[name], r.json()
    assert len(set(said.values())) == 1, said

    # an upload: read as safetensors, kept for the session, named "uploaded/..."
    data = (tmp_path / "outside.safetensors").read_bytes()
    r = client.post("/api/loras", files=[("lora", ("mine.safetensors", data, "x/y"))])
    assert r.status_code == 201 and r.json() == {"name": "uploaded/mine.safetensors"}, r.text
    assert "uploaded/mine.safetensors" in client.get("/api/loras").json()["loras"]
    r = post(client, {**settings, "loras": [["uploaded/mine.safetensors", 0.5]]})
    assert r.status_code == 201, r.text
    assert wait(client, r.json()["id"])["status"] == "done"
    for body, said_ in (
        (b"not a lora", "LoRA: bad.safetensors is not a safetensors file"),
        (data[:100], "LoRA: bad.safetensors is not a safetensors file"),
    ):
        r = client.post("/api/loras", files=[("lora", ("bad.safetensors", body, "x/y"))])
        assert r.status_code == 400 and r.json()["field"] == "lora", r.text
        assert said_ in r.json()["error"] and str(studio.uploads) not in r.json()["error"]
    r = client.post("/api/loras", files=[("lora", ("notes.txt", data, "x/y"))])
    assert r.json()["error"] == "LoRA: a .safetensors file"
    assert "uploaded/bad.safetensors" not in client.get("/api/loras").json()["loras"]


def test_a_server_without_a_lora_dir_reads_no_path(client, tmp_path):
    from .helpers import write_lora

    lora = write_lora(tmp_path / "style.safetensors", {"double_blocks.0.img_attn.qkv":
                                                       (768, 256)}, seed=1)  # fmt: skip
    r = post(client, {"prompt": "x", "width": 32, "height": 32, "loras": [[str(lora), 1]]})
    assert r.status_code == 400, r.text
    assert "serve --lora-dir" in r.json()["error"] and "bytes" not in r.json()["error"]


def test_messages_hold_no_object_reprs_and_true_limits(client, monkeypatch):
    ok = {"prompt": "x", "width": 32, "height": 32}
    r = post(client, ok, [("init_image", ("a.png", b"hello", "image/png"))])
    error = r.json()["error"]
    assert error == "Original: a.png: not a readable image (not a format Pillow knows)", error
    monkeypatch.setattr(studio_module, "MAX_UPLOAD_BYTES", 1 << 20)
    big = ("big.png", b"x" * (3 << 19), "image/png")  # 1.5 MiB
    r = post(client, ok, [("init_image", big)])
    assert r.json() == {"error": "Original: big.png is over the 1 MiB limit",
                        "field": "init_image"}  # fmt: skip
