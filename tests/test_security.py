"""The studio and the CPU loop let no one in (issue 32): a foreign Host, a foreign or null
Origin on a request that changes state, a missing token off loopback; a library planted by
another user where the loop is cached, or one that does not load."""

import os
import pwd
import subprocess
import sys
import textwrap
import time

import pytest
from starlette.testclient import TestClient

import mlxflux
from mlxflux.serve import Studio, create_app

PORT = 7860
OWN = f"http://127.0.0.1:{PORT}"
SETTINGS = {"settings": '{"prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 1}'}


@pytest.fixture(scope="module")
def pipe(small_folder):
    return mlxflux.load(small_folder)


@pytest.fixture
def studio(pipe, tmp_path):
    s = Studio(pipe, tmp_path / "out")
    (s.output / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a gallery file to ask for
    yield s
    s.close()


def client(studio, **guard):
    return TestClient(create_app(studio, **guard), base_url=OWN)


def routes(job_id: str) -> list[tuple[str, str]]:
    """Every route of the studio, with a job id and names that exist."""
    return [("GET", "/"), ("GET", "/api/info"), ("GET", "/api/jobs"), ("POST", "/api/jobs"),
            ("GET", f"/api/jobs/{job_id}"), ("DELETE", f"/api/jobs/{job_id}"),
            ("GET", f"/api/jobs/{job_id}/events"), ("GET", "/api/images"),
            ("GET", "/api/images/cover.png"),
            ("GET", f"/api/uploads/{job_id}/x-0/a.png")]  # fmt: skip


def call(c, method, path, **headers):
    data = SETTINGS if method == "POST" else None
    return c.request(method, path, headers=headers, data=data)


def queued_job(c) -> str:
    r = c.post("/api/jobs", data={"settings": '{"prompt": "x", "width": 256, "height": 256, '
                                               '"steps": 150, "seed": 1}'})  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_foreign_host_gets_403_on_every_route(studio):
    with client(studio) as c:
        job = queued_job(c)
        for method, path in routes(job):
            for host in ("rebind.evil.example:7860", "evil.example", "127.0.0.1.nip.io:7860"):
                r = call(c, method, path, host=host)
                assert r.status_code == 403, (method, path, host, r.status_code)
                assert "not a name of this studio" in r.json()["error"]
        c.delete(f"/api/jobs/{job}")
    assert len(studio.jobs) == 1  # only the one this test queued


FOREIGN = ["http://evil.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:7860",
           "http://localhost.evil:7860"]  # fmt: skip


@pytest.mark.parametrize("origin", FOREIGN)
def test_a_foreign_or_null_origin_cannot_queue_or_cancel(studio, origin):
    with client(studio) as c:
        job = queued_job(c)
        r = c.post("/api/jobs", data=SETTINGS, headers={"origin": origin})
        assert r.status_code == 403 and "another site" in r.json()["error"]
        r = c.delete(f"/api/jobs/{job}", headers={"origin": origin})
        assert r.status_code == 403
        assert list(studio.jobs) == [job]  # nothing queued
        assert studio.jobs[job].status in ("queued", "running")  # nothing cancelled
        assert c.get(f"/api/jobs/{job}", headers={"origin": origin}).status_code == 200  # reads:
        c.delete(f"/api/jobs/{job}")  # a read is no change; CORS keeps other sites from it


def test_the_own_origin_loopback_names_and_curl_keep_working(studio):
    with client(studio) as c:
        for host, origin in [(f"127.0.0.1:{PORT}", OWN), (f"localhost:{PORT}",
                             f"http://localhost:{PORT}"), (f"[::1]:{PORT}", f"http://[::1]:{PORT}"),
                             (f"127.0.0.1:{PORT}", None)]:  # fmt: skip
            headers = {"host": host, **({"origin": origin} if origin else {})}
            assert c.get("/", headers=headers).status_code == 200
            r = c.post("/api/jobs", data=SETTINGS, headers=headers)
            assert r.status_code == 201, (host, origin, r.text)
            r = c.delete(f"/api/jobs/{r.json()['id']}", headers=headers)
            assert r.status_code == 200


def test_allow_host_and_the_host_value_are_served(studio):
    with client(studio, bind="192.168.1.20", hosts=["studio.lan"], token="t0k") as c:
        for host in ("studio.lan:7860", "192.168.1.20:7860", "localhost"):
            r = c.get("/api/info", headers={"host": host, "authorization": "Bearer t0k"})
            assert r.status_code == 200, host
        r = c.get("/api/info", headers={"host": "192.168.1.21", "authorization": "Bearer t0k"})
        assert r.status_code == 403  # not this machine's given address


def test_the_token_is_required_off_loopback(studio):
    with client(studio, bind="0.0.0.0", token="s3cret") as c:
        job = None
        for method, path in routes("nojob"):
            r = call(c, method, path)
            assert r.status_code == 401, (method, path)
            assert "needs its token" in r.json()["error"]
            assert call(c, method, path, authorization="Bearer wrong").status_code == 401
        r = c.get("/?token=s3cret")  # the URL `serve` prints
        assert r.status_code == 200 and "mlxflux cover studio" in r.text
        assert (
            "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        )
        # the page keeps working with its cookie (the client keeps it), a script with a bearer
        r = c.post("/api/jobs", data=SETTINGS, headers={"origin": OWN})
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        c.cookies.clear()
        assert c.get(f"/api/jobs/{job}").status_code == 401
        r = c.delete(f"/api/jobs/{job}", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
        # on a wildcard address this machine's own IP addresses are served
        r = c.get("/api/info", headers={"host": "10.1.2.3:7860", "authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_serve_off_loopback_prints_a_token_once_and_requires_it(small_folder, tmp_path):
    """`mlxflux serve --host 0.0.0.0` makes a token and prints the URL with it."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxflux.cli", "serve", "--model", str(small_folder), "--host",
         "0.0.0.0", "--port", str(port), "--output-dir", str(tmp_path / "out")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        start = time.time()
        while "token=" not in line:
            assert time.time() - start < 60 and proc.poll() is None, proc.stderr.read()
            line = proc.stderr.readline()
        token = line.split("token=", 1)[1].split()[0]
        assert len(token) >= 20
        url = f"http://127.0.0.1:{port}/api/info"
        for _ in range(100):  # the server starts after it printed the URL
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not answer")
        ok = urllib.request.urlopen(f"{url}?token={token}", timeout=5)
        assert ok.status == 200
    finally:
        proc.terminate()
        proc.wait(10)


# ---- the CPU loop's cache ------------------------------------------------------------------

LAYER = textwrap.dedent("""
    import os, sys, warnings
    import mlx.core as mx, mlx.nn as nn, numpy as np
    from mlxflux import kernels, native
    from mlxflux.quant import quantize
    mx.random.seed(0)  # the same layer in every process
    holder = nn.Module()
    holder.layer = nn.Linear(128, 64)
    quantize(holder, 8, kernels.Kernels("split", "cpu"))
    x = mx.random.normal((1, 5, 128), key=mx.random.key(1))
    y = np.array(holder.layer(x))
    np.save(sys.argv[1], y)
    print(native.available(), holder.layer.kernels.calls["dequantize_native"])
""")

PLANTED = r"""
#include <stdio.h>
#include <stdint.h>
__attribute__((constructor)) static void planted(void) {
  FILE* f = fopen("MARKER", "w");
  if (f) { fputs("the planted library ran", f); fclose(f); }
}
void mlxflux_dequantize(const uint8_t* p, const float* s, const float* b, float* o,
                        int64_t r, int64_t c, int64_t g, int64_t bits) {}
"""


def run_layer(tmp_path, name, env):
    out = tmp_path / f"{name}.npy"
    r = subprocess.run([sys.executable, "-c", LAYER, str(out)], capture_output=True, text=True,
                       env={**os.environ, **env}, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    import numpy as np

    return r.stdout.split(), np.load(out), r.stderr


def library_path(env) -> str:
    code = "from mlxflux import native; print(native.library_path())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env})  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root (CI is)")
def test_a_library_planted_by_another_user_never_runs(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    lib = library_path(env)  # the place mlxflux would use (its folders now exist)
    folder = os.path.dirname(lib)
    os.chmod(folder, 0o777)  # world-writable, as a shared /tmp folder is
    marker = tmp_path / "ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED.replace("MARKER", str(marker)))
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", lib], check=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(lib, nobody.pw_uid, nobody.pw_gid)
    (built, native_calls), planted_y, stderr = run_layer(tmp_path, "planted", env)
    assert not marker.exists()  # its constructor never ran
    assert (built, native_calls) == ("False", "0")
    assert stderr.count("no native CPU loop") == 1 and "using MLX ops" in stderr
    _, ops_y, _ = run_layer(tmp_path, "ops", {**env, "MLXFLUX_NATIVE": "0"})
    assert (planted_y == ops_y).all()  # the same picture as the MLX ops draw
    # each reason alone is enough: another user's file in a private folder ...
    os.chmod(folder, 0o700)
    (built, _), _, stderr = run_layer(tmp_path, "planted2", env)
    assert built == "False" and "owned by another user" in stderr and not marker.exists()
    # ... and our own file in a folder others can write
    os.chown(lib, os.getuid(), os.getgid())
    os.chmod(folder, 0o777)
    (built, _), _, stderr = run_layer(tmp_path, "planted3", env)
    assert built == "False" and "group or others can write" in stderr and not marker.exists()


def test_a_library_that_does_not_load_falls_back_with_one_warning(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    lib = library_path(env)
    with open(lib, "wb") as f:
        f.write(b"\x7fELF not really a library")
    os.chmod(lib, 0o600)
    (built, native_calls), y, stderr = run_layer(tmp_path, "broken", env)
    assert (built, native_calls) == ("False", "0")
    assert stderr.count("no native CPU loop") == 1
    _, ops_y, _ = run_layer(tmp_path, "ops", {**env, "MLXFLUX_NATIVE": "0"})
    assert (y == ops_y).all()


def test_the_loop_is_built_in_the_users_cache_and_used(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    (built, native_calls), y, _ = run_layer(tmp_path, "built", env)
    assert (built, native_calls) == ("True", "1")
    files = sorted(p.name for p in (tmp_path / "cache" / "mlxflux" / "native").iterdir())
    assert len(files) == 1 and files[0].startswith("native-") and files[0].endswith(".so")
    mode = os.stat(tmp_path / "cache" / "mlxflux" / "native").st_mode & 0o777
    assert mode == 0o700
    _, ops_y, _ = run_layer(tmp_path, "ops", {**env, "MLXFLUX_NATIVE": "0"})
    assert (y == ops_y).all()


def test_mlx_compiles_its_kernels_into_a_private_folder(tmp_path):
    """On a shared temporary folder, the CLI points TMPDIR (where MLX caches its compiled CPU
    kernels) at the user's own cache first."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp is
    code = (
        "import mlx.core as mx\n"
        "from mlxflux import kernels, private\n"
        "print(private.use_private_tmpdir())\n"
        "mx.set_default_device(mx.cpu)\n"
        "mx.eval(kernels.Kernels('split', 'cpu').gelu(mx.random.normal((64, 256))))\n"
    )
    env = {**os.environ, "TMPDIR": str(shared), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    private = tmp_path / "cache" / "mlxflux" / "tmp"
    assert r.stdout.strip() == str(private)
    assert list(private.glob("mlx/*/cpu/*.so")) and not list(shared.glob("mlx"))


def test_no_compiler_on_a_mac_without_the_command_line_tools(monkeypatch):
    """There /usr/bin/g++ is a stub that opens an install dialog: never called."""
    from types import SimpleNamespace

    from mlxflux import native

    ran = []

    def fake_run(cmd, **kw):
        ran.append(cmd)
        return SimpleNamespace(returncode=2 if cmd[0] == "xcode-select" else 0)

    monkeypatch.setattr(native.sys, "platform", "darwin")
    monkeypatch.setattr(native.subprocess, "run", fake_run)
    assert native.compiler() is None and ran == [["xcode-select", "-p"]]
    monkeypatch.setattr(native.sys, "platform", "linux")
    assert native.compiler() is not None  # g++ here (CI installs it)
