"""Long runs hold steady, and convert / gen killed at random moments leave nothing half-written
(issue 25). The kill moments come from a seeded generator, spread over each command's measured
duration; the signal is Ctrl-C (SIGINT) or kill -9 (SIGKILL), also seeded."""

import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlxflux
from mlxflux.model_folder import check_folder, read_manifest

from . import reference
from .helpers import CTRL_C_PREAMBLE

pytestmark = pytest.mark.reference

TRIALS = 5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "src"
    return reference.write_diffusers(reference.make_models(seed=41), src)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    return reference.converted(reference.make_models(seed=41), tmp, bits=8)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fifty_generations_hold_steady(folder):
    """50 generations in one process: MLX's active memory after each within 1% of the first's,
    and the resident set flat after a warm-up (allocator caches and JIT libraries settle in
    the first few)."""
    pipe = mlxflux.load(folder)
    active, rss = [], []
    for i in range(50):
        pipe.generate("a red cube", width=32, height=32, steps=2, seed=i)
        gc.collect()
        active.append(mx.get_active_memory())
        rss.append(rss_bytes())
    print(f"active bytes: first {active[0]}, max {max(active)}; RSS MiB: after 10 "
          f"{rss[9] / 2**20:.1f}, after 50 {rss[-1] / 2**20:.1f}")  # fmt: skip
    assert max(abs(a - active[0]) for a in active) <= 0.01 * max(active[0], 1 << 20)
    # flat: the last 40 runs add less than 16 MiB (a leak of one 32x32 run's arrays per
    # generation would add more than that)
    assert rss[-1] - rss[9] < 16 << 20, [r >> 20 for r in rss]


def run_and_kill(cmd: list[str], delay: float, sig: int, cwd: Path) -> int:
    """Start `cmd` (Python's SIGINT handler in place even if ours is ignored), send `sig`
    after `delay` seconds if it still runs; its exit code."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_PREAMBLE + cmd[0], *cmd[1:]], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    proc.communicate(timeout=120)  # (a Ctrl-C during Python's own start-up may print a trace)
    return proc.returncode


MAIN = "import sys\nfrom mlxflux.cli import main\nmain(sys.argv[1:])\n"


def timed_run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MAIN, *args], cwd=cwd, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - start


def test_convert_killed_at_random_moments(source, tmp_path):
    rng = random.Random(25)
    out = tmp_path / "model"
    args = ["convert", "--from", str(source), "--out", str(out), "--bits", "8", "--force"]
    full = timed_run(args, tmp_path)  # a complete folder, for the runs to replace
    before = read_manifest(out)["id"]
    for trial in range(TRIALS):
        sig = rng.choice([signal.SIGINT, signal.SIGKILL])
        delay = rng.uniform(0.2, 1.0) * full
        code = run_and_kill([MAIN, *args], delay, sig, tmp_path)
        # the folder is the old one or the new one, whole: it loads and checks out
        manifest = read_manifest(out)
        check_folder(out, manifest)
        assert manifest["id"] == before, trial
        print(f"trial {trial}: signal {sig.name} after {delay:.1f} s, exit {code}")
    timed_run(args, tmp_path)  # the next run removes what the killed ones left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    mlxflux.load(out)


def test_gen_killed_at_random_moments(folder, tmp_path):
    rng = random.Random(26)
    args = ["gen", "--prompt", "x", "--width", "32", "--height", "32", "--steps", "3",
            "--seeds", "1,2", "--output", "{seed}.png", "--model", str(folder)]  # fmt: skip
    full = timed_run(args, tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()
    for trial in range(TRIALS):
        sig = rng.choice([signal.SIGINT, signal.SIGKILL])
        delay = rng.uniform(0.3, 1.0) * full
        run_and_kill([MAIN, *args], delay, sig, tmp_path)
        for png in tmp_path.glob("*.png"):  # every PNG there is whole
            with Image.open(png) as img:
                img.load()
                assert img.size == (32, 32) and "mlxflux" in img.info, (trial, png)
        for p in tmp_path.iterdir():
            if not p.name.startswith("."):
                p.unlink()
    timed_run(args, tmp_path)  # the next run removes the temporary files killed runs left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.png", "2.png"]
    assert np.asarray(Image.open(tmp_path / "1.png")).std() > 0
