"""The cover studio page in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright) against `mlxflux serve` on a tiny model. Fill the form, start a job, watch its
progress, see the image and its gallery entry, reuse its settings, cancel a long one.

MLXFLUX_SCREENSHOT=docs/serve.png keeps the page's screenshot (the README shows it)."""

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

import mlxflux
from mlxflux.serve import Studio, create_app

from .helpers import cover_image, small_model, tiny_upscaler

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def served(folder, tmp, upscale_dir=None):
    """`mlxflux serve`'s app over `folder` on a free port, in a thread: yields (url, studio);
    after, the server stops and the studio closes."""
    studio = Studio(mlxflux.load(folder), tmp / "out", upscale_dir=upscale_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(studio), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        start = time.time()
        while not srv.started:
            assert time.time() - start < 30, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", studio
    finally:
        srv.should_exit = True
        thread.join(10)
        studio.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    with served(small_model(tmp / "model", seed=91), tmp) as (url, studio):
        yield url, studio, tmp


def browser_page(p):
    """Headless Chromium: (browser, its page, the page's uncaught errors as they come)."""
    args = ["--no-sandbox", "--disable-gpu"]
    browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page, errors


def fill(page, **fields) -> None:
    """The form's fields by id: fill(page, width=96) types "96" into #width."""
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def test_the_page_in_headless_chromium(server, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    # the OpenBLAS preloaded for MLX (this process has it already) breaks Playwright's node
    # driver and Chromium's GPU process when they inherit it
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    url, studio, _ = server
    original = tmp_path / "interstellar-original.png"
    cover_image(4, 96, 64).save(original)
    with sync_playwright() as p:
        browser, page, errors = browser_page(p)
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("FLUX.1 dev")
        expect(page.locator("#preset option")).to_have_count(4)  # none + book, vinyl, dvd
        expect(page.locator("#cache option")).to_have_count(3)  # none, EasyCache, first block
        # a Kontext reference needs a Kontext model: the page does not offer it for dev
        expect(page.locator("#drop-reference")).to_be_hidden()

        fill(
            page,
            prompt="a DVD cover, a black hole with a golden disk",
            width=96,
            height=64,
            steps=3,
            seeds=7,
            denoise=0.8,
        )
        page.set_input_files("#init_image", str(original))
        page.click("#generate")
        job = page.locator(".job").first
        expect(job).to_have_class("job done", timeout=120_000)
        expect(job.locator(".state")).to_contain_text("done in ")
        # the result beside the original, both loaded
        images = page.locator("#result img")
        expect(images).to_have_count(2)
        for i in range(2):
            expect(images.nth(i)).to_have_js_property("complete", True)
            assert images.nth(i).evaluate("img => img.naturalWidth") == 96
        expect(page.locator("#result figcaption").nth(1)).to_have_text("seed 7")
        # the gallery reads the PNG from the output folder, with its settings
        thumb = page.locator(".thumb").first
        expect(thumb).to_contain_text("seed 7", timeout=10_000)
        (png,) = studio.output.glob("*.png")
        page.fill("#prompt", "")
        thumb.locator(".reuse").click()
        expect(page.locator("#prompt")).to_have_value(
            "a DVD cover, a black hole with a golden disk"
        )
        expect(page.locator("#steps")).to_have_value("3")

        # a long job: its progress shows, then cancel stops it and writes nothing
        fill(page, steps=150, width=512, height=512)
        page.set_input_files("#init_image", [])
        page.fill("#denoise", "")
        page.click("#generate")
        long_job = page.locator(".job").first
        expect(long_job.locator(".state")).to_contain_text("denoise · step", timeout=60_000)
        shot = Path(os.environ.get("MLXFLUX_SCREENSHOT") or tmp_path / "serve.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        long_job.locator(".cancel").click()
        expect(long_job).to_have_class("job cancelled", timeout=60_000)
        assert [p.name for p in studio.output.glob("*.png")] == [png.name]

        # a bad setting is said on the page in one line, and nothing is queued
        jobs = page.locator(".job").count()
        page.fill("#width", "50")
        page.fill("#height", "64")
        page.click("#generate")
        expect(page.locator("#error")).to_contain_text("Width: width and height must be")
        assert page.locator(".job").count() == jobs
        assert errors == []
        browser.close()
    assert shot.stat().st_size > 10_000


# in the page: each picture the job card's "forming" image loads, as (src, a sum of its pixels)
WATCH = """() => {
  window.seen = [];
  const canvas = document.createElement("canvas");
  new MutationObserver(() => {
    const img = document.querySelector(".job .forming img");
    if (img && !img.dataset.watched) {
      img.dataset.watched = "1";
      img.addEventListener("load", () => {
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0);
        const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let sum = 0;
        for (let i = 0; i < px.length; i++) sum = (sum * 31 + px[i]) % 1000000007;
        window.seen.push({ src: img.getAttribute("src"), sum, w: img.naturalWidth,
                           caption: img.nextSibling.textContent });
      });
    }
  }).observe(document.body, { childList: true, subtree: true });
}"""


def test_the_job_card_shows_the_cover_forming_then_the_result(tmp_path, monkeypatch):
    """With the tiny decoder in the folder (auto: taef1), the card of a running job shows a
    preview that changes from step to step, beside the original, and then the result."""
    from playwright.sync_api import expect, sync_playwright

    from mlxflux.convert.taef1 import add_taef1

    from .helpers import write_taef1

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    folder = small_model(tmp_path / "model", seed=94)
    add_taef1(folder, write_taef1(tmp_path / "taef1_decoder.safetensors", seed=5), log=print)
    with served(folder, tmp_path) as (url, studio):
        original = tmp_path / "original.png"
        cover_image(8, 192, 128).save(original)
        with sync_playwright() as p:
            browser, page, errors = browser_page(p)
            page.goto(url)
            expect(page.locator("#preview option")).to_have_count(
                4
            )  # auto, latent2rgb, taef1, none
            page.evaluate(WATCH)
            fill(
                page,
                prompt="an album cover forming",
                width=192,
                height=128,
                steps=12,
                seeds=11,
                denoise=0.9,
            )
            page.set_input_files("#init_image", str(original))
            page.click("#generate")
            job = page.locator(".job").first
            caption = job.locator(".forming figcaption")
            expect(caption).to_have_text("step 5/12", timeout=120_000)
            expect(job.locator(".original img")).to_have_js_property("naturalWidth", 192)
            shot = tmp_path / "forming.png"
            job.screenshot(path=str(shot))
            expect(job).to_have_class("job done", timeout=120_000)
            expect(caption).to_have_text("seed 11")
            page.wait_for_function("() => window.seen.some(s => s.src.startsWith('/api/images/'))")
            seen = page.evaluate("window.seen")
            browser.close()
    previews = [s for s in seen if "/preview?" in s["src"]]
    print(f"{len(previews)} previews seen, then {seen[-1]['src']}")
    assert len(previews) >= 3 and all(s["w"] == 192 for s in previews)  # taef1: full size
    assert len({s["sum"] for s in previews}) >= 3  # the picture changes between steps
    assert seen[-1]["src"].startswith("/api/images/") and seen[-1]["caption"] == "seed 11"
    assert seen[-1]["sum"] not in {s["sum"] for s in previews}
    assert errors == []
    keep = os.environ.get("MLXFLUX_PREVIEW_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_a_kontext_model_takes_a_reference_on_the_page(tmp_path, monkeypatch):
    import json

    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    folder = small_model(tmp_path / "model", variant="kontext", seed=92)
    with served(folder, tmp_path) as (url, studio):
        reference = tmp_path / "original.png"
        cover_image(6, 64, 48).save(reference)
        with sync_playwright() as p:
            browser, page, _ = browser_page(p)
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("FLUX.1 Kontext dev")
            expect(page.locator("#drop-reference")).to_be_visible()
            expect(page.locator("#drop-control_image")).to_be_hidden()
            fill(page, prompt="the same cover as a concrete poster", steps=2, seeds=3)
            page.set_input_files("#reference", str(reference))
            page.select_option("#reference_scale", "none")
            page.click("#generate")
            expect(page.locator(".job").first).to_have_class("job done", timeout=120_000)
            expect(page.locator("#result figcaption").first).to_have_text("reference")
            browser.close()
    (png,) = studio.output.glob("*.png")
    meta = json.loads(Image.open(png).text["mlxflux"])
    # no size given: the reference's own (64x48), as the CLI does; Kontext's guidance
    assert (meta["width"], meta["height"], meta["guidance"]) == (64, 48, 2.5)
    assert meta["reference_images"][0]["file"] == "original.png"
    assert meta["reference_scale"] == "none"


EVIL = """<!doctype html><title>another site</title>
<iframe name="sink" id="sink"></iframe>
<form id="csrf" method="post" enctype="multipart/form-data" target="sink"
      action="{studio}/api/jobs">
  <input name="settings" value='{{"prompt": "planted", "width": 32, "height": 32, "steps": 1}}'>
</form>
<pre id="read">pending</pre>
<script>
  document.getElementById("csrf").submit();
  fetch("{studio}/api/images").then(r => r.text())
    .then(t => document.getElementById("read").textContent = "read: " + t)
    .catch(e => document.getElementById("read").textContent = "blocked: " + e);
</script>
"""


def test_another_site_can_neither_use_nor_read_the_studio(tmp_path, monkeypatch):
    """A page of another origin (another port) posts a form to the studio and fetches its
    gallery: nothing is queued and nothing is read. A name re-pointed at 127.0.0.1 (DNS
    rebinding, Chromium's host resolver rules) gets 403. The studio's own page works."""
    import http.server
    import socketserver

    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with served(small_model(tmp_path / "model", seed=93), tmp_path) as (url, studio):
        port = url.rsplit(":", 1)[1]
        (studio.output / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.html").write_text(EVIL.format(studio=url))
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
        evil = socketserver.TCPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as p:
                args = ["--no-sandbox", "--disable-gpu",
                        "--host-resolver-rules=MAP rebind.test 127.0.0.1"]  # fmt: skip
                browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
                expect(page.locator("#read")).to_contain_text("blocked", timeout=30_000)
                page.wait_for_timeout(1000)  # the form's POST has landed by now
                assert studio.jobs == {}  # nothing was queued
                assert "secret.png" not in page.locator("#read").text_content()
                # DNS rebinding: the attacker's name, now 127.0.0.1, is not a name of the studio
                for path in ("/", "/api/jobs", "/api/images", "/api/images/secret.png"):
                    r = page.goto(f"http://rebind.test:{port}{path}")
                    assert r.status == 403, (path, r.status)
                    assert "secret.png" not in page.content()
                # the studio's own page keeps working
                page.goto(url)
                expect(page.locator("#model")).to_contain_text("FLUX.1 dev")
                fill(page, prompt="its own page", width=32, height=32, steps=1)
                page.click("#generate")
                expect(page.locator(".job").first).to_have_class("job done", timeout=120_000)
                browser.close()
        finally:
            evil.shutdown()
    assert [j.job.request.prompt for j in studio.jobs.values()] == ["its own page"]


# in the page: every text a job card's state line shows, in order
WATCH_STATES = """() => {
  window.states = [];
  new MutationObserver(() => {
    const el = document.querySelector(".job .state");
    if (el && window.states[window.states.length - 1] !== el.textContent) {
      window.states.push(el.textContent);
    }
  }).observe(document.body, { childList: true, subtree: true, characterData: true });
}"""


def test_the_studio_a_comfyui_designer_expects(server, tmp_path, monkeypatch):
    """Presets fill the form (still editable); the original shows when chosen; a refused
    seed and a refused size sit on their fields; a running job shows elapsed time, an ETA and
    the decode's progress; after a reload the running job and then the last result come
    back; a result opens large beside its original and downloads."""
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    url, studio, _ = server
    from mlxflux.presets import all_presets

    dvd = all_presets()["dvd"]
    original = tmp_path / "vinyl-original.png"
    cover_image(6, 320, 320).save(original)
    with sync_playwright() as p:
        browser, page, errors = browser_page(p)
        page.goto(url)
        expect(page.locator("#preset option")).to_have_count(4)
        page.select_option("#preset", "dvd")
        expect(page.locator("#prompt")).to_have_value(dvd["prompt"])
        for field in ("width", "height", "steps", "guidance"):
            expect(page.locator(f"#{field}")).to_have_value(str(dvd[field]))
        page.select_option("#preset", "")  # untouched values go with their preset
        expect(page.locator("#prompt")).to_have_value("")
        page.select_option("#preset", "dvd")
        page.fill("#width", "320")  # and stay editable
        page.fill("#height", "320")
        page.fill("#steps", "4")

        page.set_input_files("#init_image", str(original))
        thumb = page.locator("#thumbs-init_image img")
        expect(thumb).to_have_count(1)
        expect(thumb).to_have_js_property("naturalWidth", 320)

        jobs = page.locator(".job").count()
        page.fill("#seeds", "abc")
        page.click("#generate")
        expect(page.locator("#seeds")).to_have_class("invalid")
        expect(page.locator(".ferr")).to_have_text(
            'Seed(s): "abc" is not a whole number (or numbers, like 3,17,42)'
        )
        page.fill("#seeds", "8")
        page.fill("#height", "328")
        page.click("#generate")
        expect(page.locator("#height")).to_have_class("invalid")
        expect(page.locator(".ferr")).to_contain_text("Height: width and height must be")
        assert page.locator(".ferr").count() == 1  # the seed's note went with its fix
        assert page.locator(".job").count() == jobs  # nothing was queued

        page.fill("#height", "320")
        page.evaluate(WATCH_STATES)
        page.click("#generate")
        job = page.locator(".job").first
        expect(job.locator(".meta")).to_have_text("seed 8 · 320x320 · dvd")
        expect(job.locator(".state")).to_contain_text("denoise · step", timeout=60_000)
        page.reload()  # the running job comes back, and is followed to its end
        page.evaluate(WATCH_STATES)
        job = page.locator(".job").first
        expect(job.locator(".meta")).to_have_text("seed 8 · 320x320 · dvd")
        expect(job).to_have_class("job done", timeout=120_000)
        states = page.evaluate("window.states")
        shot = tmp_path / "studio.png"
        page.screenshot(path=str(shot), full_page=True)

        page.reload()  # the last result comes back
        result = page.locator("#result img")
        expect(result).to_have_count(2)
        expect(page.locator("#result figcaption").nth(1)).to_have_text("seed 8")
        result.nth(1).click()
        expect(page.locator("#lightbox")).to_be_visible()
        expect(page.locator("#lb-image")).to_have_js_property("naturalWidth", 320)
        expect(page.locator("#lb-original img")).to_have_js_property("naturalWidth", 320)
        href = page.locator("#lb-download").get_attribute("href")
        assert page.locator("#lb-download").get_attribute("download").endswith(".png")
        page.screenshot(path=str(tmp_path / "large.png"))
        page.keyboard.press("Escape")
        expect(page.locator("#lightbox")).to_be_hidden()
        data = page.evaluate(
            "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))"
            ".slice(0, 8)",
            href,
        )
        assert errors == []
        browser.close()
    print("\n".join(states))
    assert bytes(data) == b"\x89PNG\r\n\x1a\n"
    (png,) = [p for p in studio.output.glob("*.png") if p.name == href.split("/")[-1]]
    decoding = [s for s in states if s.startswith("decode · ")]
    assert decoding, states  # the decode's own progress, in blocks
    assert any(" elapsed · about " in s and s.endswith(" left") for s in states), states
    assert states[-1].startswith("done in "), states
    assert shot.stat().st_size > 10_000


def test_a_gallery_picture_is_upscaled_for_print(tmp_path, monkeypatch):
    """The large view of a gallery picture offers "upscale for print" with the server's
    models; the job shows the upscale's tiles, then the refine's steps, and its result (twice
    the size, refined) joins the gallery."""
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    models = tmp_path / "upscale_models"
    models.mkdir()
    tiny_upscaler(models)
    with served(small_model(tmp_path / "model", seed=92), tmp_path, models) as (url, studio):
        entry = studio.submit({"prompt": "a vinyl sleeve, a red moon", "width": 96,
                               "height": 64, "steps": 4, "seed": 5}, {})  # fmt: skip
        while entry.status not in ("done", "failed", "cancelled"):
            time.sleep(0.05)
        assert entry.status == "done", entry.error
        with sync_playwright() as p:
            browser, page, errors = browser_page(p)
            page.goto(url)
            page.evaluate(WATCH_STATES)
            page.locator("#gallery img").first.click()
            expect(page.locator("#lb-upscale")).to_be_visible()
            expect(page.locator("#up-model option")).to_have_text(["tiny-x2.pth"])
            page.fill("#up-refine", "1.5")  # refused on its field, nothing queued
            page.click("#up-go")
            expect(page.locator("#up-error")).to_contain_text("Refine: 1.5 is not a denoise")
            page.screenshot(path=str(tmp_path / "upscale-bar.png"))
            page.fill("#up-refine", "0.5")
            page.click("#up-go")
            expect(page.locator("#lightbox")).to_be_hidden()
            job = page.locator(".job").first
            expect(job).to_have_class("job done", timeout=120_000)
            result = page.locator("#result img").nth(1)
            expect(result).to_have_js_property("naturalWidth", 192)
            expect(page.locator("#gallery img")).to_have_count(2)
            page.screenshot(path=str(tmp_path / "upscaled.png"), full_page=True)
            states = page.evaluate("window.states")
            assert errors == []
            browser.close()
    print("\n".join(states))
    assert any(s.startswith("upscale · ") for s in states), states
    assert any(s.startswith("denoise · step ") for s in states), states
    (png,) = [p for p in studio.output.glob("*-upscaled-2x.png")]
    assert png.stat().st_size > 1000


def test_redux_images_go_from_the_page_with_their_strength(tmp_path, monkeypatch):
    """A model with Redux: the page offers Redux images (hidden for one without), and a job
    with one at strength 0.7, attn_bias, is drawn and recorded so."""
    import json

    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "apt-get install chromium (CI does): the page is tested in a real browser"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    look = tmp_path / "look.png"
    cover_image(8, 120, 90).save(look)
    folder = small_model(tmp_path / "model", seed=93, redux=True)
    with served(folder, tmp_path) as (url, studio), sync_playwright() as p:
        browser, page, errors = browser_page(p)
        page.goto(url)
        expect(page.locator("#drop-redux")).to_be_visible()
        fill(page, prompt="a vinyl sleeve like this one", width=96, height=64, steps=2, seeds=4)
        page.set_input_files("#redux", str(look))
        expect(page.locator("#thumbs-redux img")).to_have_count(1)
        page.fill("#redux_strength", "0.7")
        page.select_option("#redux_strength_type", "attn_bias")
        page.click("#generate")
        job = page.locator(".job").first
        expect(job).to_have_class("job done", timeout=120_000)
        page.screenshot(path=str(tmp_path / "redux.png"), full_page=True)
        assert errors == []
        browser.close()
    (png,) = list(studio.output.glob("*.png"))
    from PIL import Image

    meta = json.loads(Image.open(png).text["mlxflux"])
    assert [(r["file"], r["strength"]) for r in meta["redux_images"]] == [("look.png", 0.7)]
    assert meta["redux_strength_type"] == "attn_bias"
