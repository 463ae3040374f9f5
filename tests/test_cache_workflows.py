"""Step caching in every workflow (issue 34), on small random models (pure MLX): each method
skips steps in txt2img, img2img, Kontext, Canny, Fill, 8-bit and float16, and at threshold 0
draws the uncached picture exactly; every seed has its own state; a skipped step reads no
block from disk and a first-block step only the first; the memory plan counts what the cache
holds; the CLI, the report, the PNG and --from-png carry the settings; bad ones are refused."""

import json

import numpy as np
import pytest
from PIL import Image

import mlxflux
from mlxflux import memory_plan
from mlxflux.cache import EasyCache, FirstBlock
from mlxflux.model_folder import read_manifest

from .helpers import cover_image, generate, run_cli, small_model

THRESHOLDS = {"easycache": 1.0, "first-block": 0.5}  # where these random models skip
KW = dict(width=64, height=64, steps=20, seed=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cached")
    return {name: small_model(tmp / name, variant=variant, bits=bits, seed=3)
            for name, variant, bits in (("dev", "dev", None), ("dev-q8", "dev", 8),
                                        ("kontext", "kontext", None), ("canny", "canny", None),
                                        ("fill", "fill", None))}  # fmt: skip


WORKFLOWS = {
    "txt2img": ("dev", {}, {}),
    "img2img": ("dev", {}, {"init_image": cover_image(1, 64, 64), "denoise": 0.8}),
    "8-bit": ("dev-q8", {}, {}),
    "float16": ("dev", {"precision": "float16"}, {}),
    "kontext": (
        "kontext",
        {},
        {"reference_images": [cover_image(2, 64, 48)], "reference_scale": "none"},
    ),
    "canny": ("canny", {}, {"control_image": cover_image(3, 64, 64)}),
    "fill": ("fill", {}, {"init_image": cover_image(4, 48, 64), "outpaint": True}),
}


@pytest.mark.parametrize("method", list(THRESHOLDS))
@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_each_workflow_skips_steps_and_threshold_0_is_exact(folders, workflow, method):
    name, load_kw, kw = WORKFLOWS[workflow]
    pipe = mlxflux.load(folders[name], **load_kw)
    plain, _ = generate(pipe, "a cover", **KW, **kw)
    exact, report = generate(pipe, "a cover", **KW, cache=method, cache_threshold=0.0, **kw)
    assert report.cache["steps_skipped"] == 0
    assert np.array_equal(np.asarray(exact), np.asarray(plain))
    cached, report = generate(pipe, "a cover", **KW, cache=method,
                              cache_threshold=THRESHOLDS[method], **kw)  # fmt: skip
    counts = report.images[0]["cache"]
    print(f"{workflow} {method}: skipped {counts['skipped']}")
    assert len(counts["skipped"]) >= 3 and len(counts["skipped"]) + len(counts["computed"]) == 20
    assert not np.array_equal(np.asarray(cached), np.asarray(plain))  # really skipped: not exact
    diff = np.abs(np.asarray(cached).astype(int) - np.asarray(plain).astype(int))
    assert diff.mean() < 64  # and still the same picture, roughly (random weights)


@pytest.mark.parametrize("method", list(THRESHOLDS))
def test_every_seed_has_its_own_cache_state(folders, method):
    pipe = mlxflux.load(folders["dev"])
    settings = dict(width=64, height=64, steps=20, cache=method, cache_threshold=THRESHOLDS[method])
    job = pipe.prepare(mlxflux.GenerationRequest("a cover", seeds=(5, 6, 7), **settings))
    images = dict(job.run())
    for i, seed in enumerate((5, 6, 7)):
        single, report = generate(pipe, "a cover", seed=seed, **settings)
        assert np.array_equal(np.asarray(images[seed]), np.asarray(single)), seed
        assert job.report.images[i]["cache"] == report.images[0]["cache"]
    assert job.report.cache["steps_skipped"] == sum(
        len(i["cache"]["skipped"]) for i in job.report.images
    )


def trunk_bytes(folder):
    flux = read_manifest(folder)["components"]["transformer"]
    from mlxflux.models.transformer import is_modulation_key

    trunk = {k for k in flux["tensors"] if not is_modulation_key(k)}
    return memory_plan.block_bytes(flux, trunk)  # (per block, outside the blocks: read once)


@pytest.mark.parametrize("method", list(THRESHOLDS))
def test_streamed_skips_read_nothing_and_first_block_steps_only_the_first(folders, method):
    folder = folders["dev"]
    needs = memory_plan.make_plan(read_manifest(folder), 64, 64, 4, 1 << 50, steps=20,
                                  cache=method).needs  # fmt: skip
    budget = (max(n.streamed for n in needs.values()) + 1) / memory_plan.GIB
    settings = dict(KW, cache=method, cache_threshold=THRESHOLDS[method])
    resident, want = generate(mlxflux.load(folder), "a cover", **settings)
    streamed, report = generate(mlxflux.load(folder, memory_budget=budget), "a cover", **settings)
    assert report.plan == "streamed"
    assert np.array_equal(np.asarray(streamed), np.asarray(resident))
    counts = report.images[0]["cache"]
    assert counts == want.images[0]["cache"] and counts["skipped"]
    blocks, once = trunk_bytes(folder)
    read = report.stages["denoise"].bytes_read - once
    rest = read - len(counts["computed"]) * sum(blocks.values())
    if method == "easycache":  # a skipped step reads no block at all
        assert rest == 0
    else:  # a first-block step reads the first block, nothing after it
        assert rest == len(counts["skipped"]) * blocks["double_blocks.0"]


def test_the_memory_plan_counts_what_the_cache_holds(folders):
    manifest = read_manifest(folders["dev"])
    plans = {m: memory_plan.make_plan(manifest, 256, 256, 4, 1 << 50, cache=m).needs["denoise"]
             for m in ("none", "easycache", "first-block")}  # fmt: skip
    tokens, hidden = 16 * 16, manifest["components"]["transformer"]["config"]["hidden_size"]
    assert plans["easycache"].resident - plans["none"].resident == EasyCache.bytes(tokens)
    assert plans["first-block"].streamed - plans["none"].streamed == FirstBlock.bytes(
        tokens, 512, hidden, 4
    )


def test_the_cli_records_the_cache_and_refuses_what_cannot_be(folders, tmp_path):
    folder = folders["dev"]
    args = ["gen", "--model", folder, "--prompt", "a cover", "--width", 64, "--height", 64,
            "--steps", 20, "--seed", 5]  # fmt: skip
    cache = ["--cache", "easycache", "--cache-threshold", 1.0, "--cache-range", "0.1,0.9"]
    r = run_cli(*args, *cache, "--report", tmp_path / "r.json", "--output", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())["cache"]
    assert (rep["method"], rep["threshold"], rep["range"]) == ("easycache", 1.0, [0.1, 0.9])
    assert isinstance(rep["steps_skipped"], int) and rep["steps_skipped"] > 0
    assert rep["steps_skipped"] + rep["steps_computed"] == 20
    with Image.open(tmp_path / "a.png") as img:
        meta = json.loads(img.text["mlxflux"])
        assert "Step cache: easycache 1 (0.1-0.9)" in img.text["parameters"]
        graph = json.loads(img.text["prompt"])
    assert (meta["cache"], meta["cache_threshold"], meta["cache_range"]) == (
        "easycache", 1.0, [0.1, 0.9])  # fmt: skip
    assert any(n["class_type"] == "EasyCache" for n in graph.values())
    # --from-png carries the cache settings over
    r = run_cli("gen", "--model", folder, "--from-png", tmp_path / "a.png", "--steps", 20,
                "--report", tmp_path / "b.json", "--output", tmp_path / "b.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    back = json.loads((tmp_path / "b.json").read_text())["cache"]
    assert (back["method"], back["threshold"], back["range"]) == ("easycache", 1.0, [0.1, 0.9])
    cases = [
        (["--cache-threshold", "0.3"], "--cache-threshold: needs --cache easycache or first-block"),
        (["--cache", "first-block", "--cache-range", "0.1,0.9"], "--cache-range: first-block"),
        (["--cache", "easycache", "--cache-range", "0.9,0.1"], "--cache-range: must be START,END"),
        (["--cache", "teacache"], "--cache"),
    ]
    for extra, said in cases:
        r = run_cli(*args, *extra, cwd=tmp_path)
        assert r.returncode == 2 and said in r.stderr, (extra, r.stderr)
