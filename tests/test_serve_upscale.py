"""The studio's "upscale for print" (`serve --upscale-dir`, POST /api/upscale): a gallery
picture upscaled by a model named from the server's folder and refined with the picture's own
prompt and seed, the same PNG `mlxflux upscale --refine` writes; bad requests get one line and
name no path."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import mlxflux
from mlxflux.serve import Studio, create_app

from .helpers import cover_image, run_cli, tiny_upscaler

END = ("done", "failed", "cancelled")


@pytest.fixture
def upscale_dir(tmp_path):
    folder = tmp_path / "upscale_models"
    folder.mkdir()
    tiny_upscaler(folder)
    return folder


@pytest.fixture
def client(small_folder, tmp_path, upscale_dir):
    studio = Studio(mlxflux.load(small_folder), tmp_path / "out", upscale_dir=upscale_dir)
    with TestClient(create_app(studio), base_url="http://127.0.0.1:7860") as c:
        yield c
    studio.close()


def wait(client, job_id, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in END:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def a_cover(client) -> str:
    settings = {"prompt": "a lighthouse at dusk", "width": 48, "height": 32, "steps": 4,
                "seed": 3}  # fmt: skip
    r = client.post("/api/jobs", data={"settings": json.dumps(settings)})
    assert r.status_code == 201, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    return job["images"][0].rsplit("/", 1)[1]


def test_upscale_for_print_writes_what_the_cli_writes(client, small_folder, tmp_path):
    assert client.get("/api/upscalers").json() == {"models": ["tiny-x2.pth"], "folder": True}
    name = a_cover(client)
    r = client.post("/api/upscale", json={"image": name, "model": "tiny-x2.pth", "refine": 0.5})
    assert r.status_code == 201, r.text
    assert r.json()["width"] == 96 and r.json()["height"] == 64
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    (url,) = job["images"]
    served = Image.open(io.BytesIO(client.get(url).content))
    meta = json.loads(served.text["mlxflux"])
    assert meta["source"] == name and meta["seed"] == 3 and meta["steps"] == 2
    assert meta["upscale_model"] == "tiny-x2.pth" and meta["refine"]["denoise"] == 0.5
    # the CLI on the same PNG, with the same model: the same pixels
    cli = run_cli("upscale", tmp_path / "out" / name, "--model",
                  tmp_path / "upscale_models" / "tiny-x2.pth", "--refine", "0.5",
                  "--model-dir", small_folder, "--output", tmp_path / "cli.png",
                  cwd=tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    written = Image.open(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(served), np.asarray(written))
    # a plain upscale (no refine) is a job too
    r = client.post("/api/upscale", json={"image": name, "model": "tiny-x2.pth", "scale": 1.5})
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    plain = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    assert plain.size == (72, 48) and "refine" not in json.loads(plain.text["mlxflux"])


def test_bad_upscale_requests_get_one_line_and_no_path(client, tmp_path):
    name = a_cover(client)
    foreign = tmp_path / "out" / "plain.png"
    cover_image(1, 32, 32).save(foreign)  # a PNG without settings
    cases = [
        ({"image": name, "model": "../tiny-x2.pth"}, "model", "not one of this server's"),
        ({"image": name, "model": str(tmp_path / "upscale_models" / "tiny-x2.pth")}, "model",
         "not one of this server's"),
        ({"image": "../cover.png", "model": "tiny-x2.pth"}, "image", "not one of the gallery"),
        ({"image": "missing.png", "model": "tiny-x2.pth"}, "image", "not one of the gallery"),
        ({"image": name, "model": "tiny-x2.pth", "refine": 1.5}, "refine", "not a denoise"),
        ({"image": name, "model": "tiny-x2.pth", "scale": 3}, "model", "over tiny-x2.pth's own"),
        ({"image": name, "model": "tiny-x2.pth", "scale": "big"}, "scale", "not a number"),
        ({"image": "plain.png", "model": "tiny-x2.pth", "refine": 0.3}, "refine",
         "carries no prompt"),
        ({"image": name, "model": "tiny-x2.pth", "extra": 1}, None, "unknown extra"),
    ]  # fmt: skip
    for body, field, message in cases:
        r = client.post("/api/upscale", json=body)
        assert r.status_code == 400, (body, r.text)
        data = r.json()
        assert data["field"] == field and message in data["error"], (body, data)
        assert str(tmp_path) not in data["error"]
    assert client.post("/api/upscale", content=b"{nope").status_code == 400
    assert len(client.get("/api/jobs").json()["jobs"]) == 1  # only the cover's


def test_a_server_without_upscale_models_offers_none(small_folder, tmp_path):
    studio = Studio(mlxflux.load(small_folder), tmp_path / "out")
    with TestClient(create_app(studio), base_url="http://127.0.0.1:7860") as c:
        assert c.get("/api/upscalers").json() == {"models": [], "folder": False}
        r = c.post("/api/upscale", json={"image": "x.png", "model": "tiny-x2.pth"})
        assert r.status_code == 400
    studio.close()
