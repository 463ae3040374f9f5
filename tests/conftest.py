"""The suite's set-up: the device, the `reference` marker, and fixtures several modules share.

Tests that compare against a reference implementation (torch, diffusers, transformers) live in
modules marked `pytestmark = pytest.mark.reference`; `pytest -m "not reference"` runs the rest,
pure MLX (README: about a minute on a Mac). Without torch installed those modules are not even
collected."""

import importlib.util
import os
from pathlib import Path

# MLXFLUX_TEST_DEVICE=gpu runs every test on the default GPU (Metal or CUDA); CI uses the CPU.
# On a GPU, MLX runs float32 matmuls as TF32 by default (MLX_ENABLE_TF32=1 on CUDA and M5-class
# Macs: ~1e-3 relative error per product), which no 1e-4 parity bound survives. Parity is
# checked in true float32 on every device, so the suite turns TF32 off (bf16 is tested as bf16).
TEST_DEVICE = os.environ.get("MLXFLUX_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE == "gpu":
    os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

REFERENCE_MARK = "pytestmark = pytest.mark.reference"
HAVE_REFERENCES = all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "reference: compares against torch/diffusers/transformers (the test extra)"
    )
    if TEST_DEVICE not in ("cpu", "gpu"):
        raise pytest.UsageError(f"MLXFLUX_TEST_DEVICE must be cpu or gpu, got {TEST_DEVICE!r}")
    if TEST_DEVICE == "gpu" and not mx.is_available(mx.gpu):
        raise pytest.UsageError("MLXFLUX_TEST_DEVICE=gpu, but MLX sees no GPU on this machine")


def pytest_ignore_collect(collection_path: Path, config):
    """Without the reference implementations, the modules that need them are left out."""
    if HAVE_REFERENCES or collection_path.suffix != ".py":
        return None
    if collection_path.name == "reference.py" or REFERENCE_MARK in collection_path.read_text():
        return True
    return None


def pytest_report_header(config):
    tf32 = os.environ.get("MLX_ENABLE_TF32", "default")
    return f"mlxflux tests on MLX's {TEST_DEVICE} (MLX_ENABLE_TF32={tf32})"


@pytest.fixture(autouse=True)
def _test_device():
    mx.set_default_device(mx.gpu if TEST_DEVICE == "gpu" else mx.cpu)
    yield


@pytest.fixture
def no_stage(monkeypatch):
    """Fails the test if any stage starts: a refusal must come before the text stage."""
    import mlxflux.pipeline

    def refused(*args, **kwargs):
        raise AssertionError("a stage ran: the request should have been refused before it")

    monkeypatch.setattr(mlxflux.pipeline.Pipeline, "encode_text", refused)


# a small random model (pure MLX), made once per module


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from .helpers import small_model

    return small_model(tmp_path_factory.mktemp("small") / "model")


# the end-to-end modules' shared tiny model (reference weights, converted once per module)


@pytest.fixture(scope="module")
def models():
    from . import reference

    return reference.make_models(seed=21)


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    from . import reference

    return reference.converted(models, tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def folder_q8(models, tmp_path_factory):
    from . import reference

    return reference.converted(models, tmp_path_factory.mktemp("pipe_q8"), bits=8)


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's counts (tests/test_fuzz.py), when it ran."""
    import sys

    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.COUNTS:
        terminalreporter.section("fuzzing: cases per reader")
        for line in fuzz.summary_lines():
            terminalreporter.write_line(line)
