"""Both kernel paths (MLXFLUX_KERNELS=fused|split) on this device, fp32 and bf16, plain and
8-bit, against diffusers: the fused path is what Metal and CUDA run, so it must be right here.

8-bit references are diffusers models holding the dequantized weights: quantization is per row
in groups of 64 inputs, so quantizing diffusers' separate q/k/v rows gives exactly the rows of
the converter's fused BFL layers.
"""

import copy
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from mlxflux import kernels, native
from mlxflux.models.layers import Linear
from mlxflux.quant import quantize

from .reference import (
    BF16_BOUND,
    CPU_QMM_BF16_BOUND,
    QUANTIZABLE,
    make_inputs,
    quantize_dequantize_,
    randomize_,
    rel_err,
    run_reference,
    to_mx,
    with_bits,
)

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("value,want", [("", "split"), ("auto", "split"), ("fused", "fused"),
                                        ("split", "split"), (" Fused ", "fused")])  # fmt: skip
def test_mode_comes_from_the_environment_once(monkeypatch, value, want):
    monkeypatch.setenv("MLXFLUX_KERNELS", value)
    if value.strip() in ("", "auto") and kernels.backend() != "cpu":
        want = "fused"  # auto picks the fused kernels on Metal and CUDA
    chosen = kernels.choose()
    assert chosen.mode == want
    monkeypatch.setenv("MLXFLUX_KERNELS", "split" if want == "fused" else "fused")
    assert chosen.mode == want  # read once, when chosen: a model keeps its kernels


def test_unknown_mode_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("MLXFLUX_KERNELS", "metal")
    with pytest.raises(kernels.KernelModeError, match="auto, fused, split.*'metal'"):
        kernels.choose()


@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [None, 8])
def test_transformer_matches_diffusers_in_each_mode(monkeypatch, mode, precision, bits):
    monkeypatch.setenv("MLXFLUX_KERNELS", mode)
    torch.manual_seed(4)
    model, ref = with_bits(randomize_(FluxTransformer2DModel(**QUANTIZABLE), 4), bits)
    inputs = make_inputs(ref, 1, 64, 96, 7)
    want = run_reference(ref, inputs)
    dtype = getattr(mx, precision)
    calls = model.kernels.calls
    assert model.kernels.mode == mode
    # as the pipeline runs it: the weights as stored (float32 here), activations in `dtype`
    out = model(
        *(to_mx(inputs[k]).astype(dtype) for k in ("hidden_states", "encoder_hidden_states")),
        to_mx(inputs["timestep"]),
        to_mx(inputs["pooled_projections"]).astype(dtype),
        inputs["img_ids"].numpy().astype(np.int32),
        to_mx(inputs["guidance"]),
    )
    assert out.dtype == dtype
    err = rel_err(np.array(out.astype(mx.float32)), want)
    print(f"{mode} {precision} {bits or 'plain'}: rel err {err:.2e}, calls {dict(calls)}")
    bound = 1e-4 if precision == "float32" else BF16_BOUND
    if bits and mode == "fused" and precision == "bfloat16" and kernels.backend() == "cpu":
        bound = CPU_QMM_BF16_BOUND
    assert err <= bound
    blocks = QUANTIZABLE["num_layers"] + QUANTIZABLE["num_single_layers"]
    fused = mode == "fused"
    assert calls["fused_attention"] == (blocks if fused else 0)
    assert calls["split_attention"] == (0 if fused else blocks)
    if bits:  # every Linear of the trunk and the embedders is quantized
        assert calls["quantized_matmul" if fused else "dequantize_fp32"] >= 10
        assert calls["dequantize_fp32" if fused else "quantized_matmul"] == 0


def quantized_layer(seed: int, bits: int = 8, rows: int = 192):
    """A 128 -> rows Linear as a quantized MLX layer running MLXFLUX_KERNELS's kernels, and the
    torch layer holding its dequantized weights (the reference)."""
    layer = torch.nn.Linear(128, rows)
    randomize_(layer, seed)
    ref = quantize_dequantize_(copy.deepcopy(layer), bits)
    holder = nn.Module()
    holder.layer = Linear(128, rows)
    holder.layer.load_weights([("weight", to_mx(layer.weight)), ("bias", to_mx(layer.bias))])
    quantize(holder, bits, kernels.choose())
    return holder.layer, ref


def test_cuda_dequantizes_layers_at_many_tokens(monkeypatch):
    """On CUDA, 8-bit layers at >= CUDA_DEQUANTIZE_TOKENS tokens dequantize to the compute
    dtype and use the regular matmul (MLX's quantized kernel is ~2x slower there)."""
    monkeypatch.setenv("MLXFLUX_KERNELS", "fused")
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    mlx_layer, ref = quantized_layer(2)
    for tokens, kernel in [(kernels.CUDA_DEQUANTIZE_TOKENS - 1, "quantized_matmul"),
                           (kernels.CUDA_DEQUANTIZE_TOKENS, "dequantize_matmul")]:  # fmt: skip
        x = torch.randn(1, tokens, 128)
        mlx_layer.kernels.calls.clear()
        got = np.array(mlx_layer(to_mx(x)))
        assert dict(mlx_layer.kernels.calls) == {kernel: 1}
        with torch.no_grad():
            assert rel_err(got, ref(x)) <= 1e-5


def test_split_path_dequantizes_in_row_blocks_at_few_tokens(monkeypatch):
    """Without the native loop (MLXFLUX_NATIVE=0), the CPU path dequantizes a layer with MLX
    ops, whole, or a block of rows at a time for few tokens: both equal the reference."""
    monkeypatch.setenv("MLXFLUX_KERNELS", "split")
    monkeypatch.setenv("MLXFLUX_NATIVE", "0")
    monkeypatch.setattr(kernels, "DEQUANTIZE_BLOCK", 64)  # 192 rows: three blocks
    mlx_layer, ref = quantized_layer(3)
    limit = kernels.DEQUANTIZE_BLOCK_TOKENS
    for tokens, blocked in [(limit, 1), (limit + 1, 0)]:
        x = torch.randn(1, tokens, 128)
        calls = mlx_layer.kernels.calls
        calls.clear()
        got = np.array(mlx_layer(to_mx(x)))
        assert calls["dequantize_blocks"] == blocked
        assert calls["dequantize_native"] == 0
        with torch.no_grad():
            assert rel_err(got, ref(x)) <= 1e-5


# ---- the native CPU loop (mlxflux.native) ----------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_native_dequantization_equals_mlx(bits):
    """The native loop against MLX's own `mx.dequantize` (the format's definition) and the
    MLX-ops fallback, on rows sliced out of the middle of a layer (pointer offsets)."""
    assert native.available(), "the native loop needs g++ on PATH (CI installs it)"
    w = mx.random.normal((300, 256), key=mx.random.key(bits)) * 3
    packed, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    mx.eval(packed, scales, biases)
    want = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    out, view = native.fresh(300, 256)
    native.dequantize_into(view, native.host(packed), native.host(scales),
                           native.host(biases), 64, bits)  # fmt: skip
    np.testing.assert_allclose(np.array(out), want, rtol=1e-6, atol=1e-6)
    rows = slice(37, 201)
    part, part_view = native.fresh(164, 256)
    native.dequantize_into(part_view, native.host(packed[rows]), native.host(scales[rows]),
                           native.host(biases[rows]), 64, bits)  # fmt: skip
    ops = kernels.dequantize(packed[rows], scales[rows], biases[rows], 64, bits)
    assert np.array_equal(np.array(part), np.array(ops))  # same roundings as the MLX ops


@pytest.mark.parametrize("bits,rows", [(8, 192), (4, 200), (6, 136)])
def test_native_quantized_layers_match_torch(monkeypatch, bits, rows):
    """With the native loop a quantized layer is dequantized whole into this thread's reused
    buffer at any token count: equal to the dequantized torch layer, also after a larger layer
    grew the buffer and for rows of a layer (the single blocks' fused linear1). The buffer is
    dropped when a pipeline stage ends."""
    from mlxflux.report import Report, Stage

    monkeypatch.setenv("MLXFLUX_KERNELS", "split")
    assert native.available(), "the native loop needs g++ on PATH (CI installs it)"
    mlx_layer, ref = quantized_layer(4, bits, rows)
    big_layer, big_ref = quantized_layer(5, bits, 2 * rows)
    native.release()  # from earlier tests in this thread
    with Stage(Report(), "denoise"):
        for layer, reference, tokens in [(mlx_layer, ref, 1), (big_layer, big_ref, 7),
                                         (mlx_layer, ref, 300), (big_layer, big_ref, 1025),
                                         (mlx_layer, ref, 1025)]:  # fmt: skip
            x = torch.randn(2 if tokens == 7 else 1, tokens, 128)
            calls = layer.kernels.calls
            calls.clear()
            got = np.array(layer(to_mx(x)))
            assert calls["dequantize_native"] == 1, dict(calls)
            assert calls["dequantize_blocks"] == 0
            with torch.no_grad():
                assert rel_err(got, reference(x)) <= 1e-5
        x = torch.randn(1, 9, 128)
        part = mlx_layer.kernels.linear_rows(mlx_layer, 40, 130)(to_mx(x))
        with torch.no_grad():
            assert rel_err(np.array(part), ref(x)[..., 40:130]) <= 1e-5
        assert native._thread.flat[0].size == 2 * rows * 128  # the largest layer's size
    assert getattr(native._thread, "flat", None) is None


def test_native_loop_builds_with_a_compiler_only(tmp_path):
    """The loop is compiled on first use into the user's cache (XDG_CACHE_HOME/mlxflux/native:
    only the library is left); without a compiler on PATH, or with one that fails (said in a
    warning), nothing is built and the MLX ops give the same values."""
    code = (
        "import os; os.environ['MLXFLUX_KERNELS'] = 'split'\n"
        "import mlx.core as mx, mlx.nn as nn, numpy as np\n"
        "from mlxflux import kernels, native\n"
        "layer = nn.QuantizedLinear(128, 64, bits=8)\n"
        "x = mx.random.normal((1, 5, 128), key=mx.random.key(1))\n"
        "print(native.available(), np.abs(np.array(layer(x) - x @ mx.dequantize("
        "layer.weight, layer.scales, layer.biases, 64, 8).T - layer.bias)).max())\n"
    )

    def run(tmp, path):
        tmp.mkdir()
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp), "PATH": path}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 0, r.stderr
        built, err = r.stdout.split()
        assert float(err) <= 1e-4
        return built, sorted(p.suffix for p in tmp.glob("mlxflux/native/*")), r.stderr

    assert run(tmp_path / "with", os.environ["PATH"])[:2] == ("True", [".so"])
    assert run(tmp_path / "without", str(tmp_path))[:2] == ("False", [])
    broken = tmp_path / "bin"  # a compiler that fails: warned about, MLX ops, nothing left
    broken.mkdir()
    (broken / "g++").write_text("#!/bin/sh\necho 'error: no such thing' >&2\nexit 1\n")
    (broken / "g++").chmod(0o755)
    built, files, stderr = run(tmp_path / "broken", f"{broken}:{os.environ['PATH']}")
    assert (built, files) == ("False", [])
    assert "could not build its CPU dequantization loop" in stderr


# ---- the CPU's own elementwise kernels --------------------------------------------------------


def test_exp2_nonpositive_matches_numpy():
    y = np.concatenate([
        -np.linspace(0, 130, 200_001, dtype=np.float32),  # the normal range and past it
        np.array([0.0, -0.0, -1e-8, -0.5, -125.9, -126.0, -126.1, -149.0, -1e30, -np.inf],
                 dtype=np.float32),
    ])  # fmt: skip
    got = np.array(kernels.exp2_nonpositive(mx.array(y)))
    want = np.exp2(y.astype(np.float64))
    normal = want >= 2.0**-125  # below that the kernel flushes to zero
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    assert rel.max() <= 3e-7, rel.max()
    assert np.all(got[~normal] <= 2.0**-125) and np.all(got >= 0)
    assert got[-1] == 0 and got[-2] == 0  # -inf and far below the range: exactly zero


def test_rational_gelu_matches_torch(monkeypatch):
    monkeypatch.setenv("MLXFLUX_KERNELS", "split")
    x = np.concatenate([np.linspace(-20, 20, 100_001), [0.0, 1e-30, -1e30, 1e30]])
    x = x.astype(np.float32).reshape(5, -1)  # rows: shared between the CPU streams
    split = kernels.choose()
    got = np.array(split.gelu(mx.array(x)))
    assert split.calls["rational_gelu"] == 1
    want = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    finite = np.abs(x) < 1e29
    assert np.abs(got[finite] - want[finite]).max() <= 2e-6 * np.maximum(1, np.abs(x[finite])).max()
    assert np.all(np.abs(got[finite] - want[finite]) <= 2e-6 * np.maximum(1, np.abs(x[finite])))


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("shape, bias", [((2, 7, 5, 3), True), ((1, 4, 9, 16), False)])
def test_conv3x3_matches_torch(monkeypatch, mode, shape, bias):
    monkeypatch.setenv("MLXFLUX_KERNELS", mode)
    b, h, w, c = shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    conv = nn.Conv2d(c, 6, 3, padding=1, bias=bias)
    chosen = kernels.choose()
    got = np.array(chosen.conv3x3(conv, mx.array(x)))
    assert chosen.calls["shifted_conv"] == (mode == "split")
    weight = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)  # OHWI -> OIHW
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        weight,
        torch.from_numpy(np.array(conv.bias)) if bias else None,
        padding=1,
    )
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (b, h, w, 6)
    assert np.abs(got - want).max() < 1e-5


def test_the_cpu_kernels_are_really_compiled(tmp_path):
    """MLX compiles `mx.compile`d functions on the CPU with the system's C++ compiler, caches the
    library under $TMPDIR/mlx, and silently runs them uncompiled without a compiler. The CPU
    path relies on the compiled loops (10x faster): a library must appear for each of GELU and
    exp2's two loops, and none without a compiler on PATH (so this check can tell)."""
    code = (
        "import os; os.environ['MLXFLUX_KERNELS'] = 'split'\n"
        "import mlx.core as mx\n"
        "from mlxflux import kernels\n"
        "mx.set_default_device(mx.cpu)\n"
        "x = mx.random.normal((64, 256))\n"
        "mx.eval(kernels.choose().gelu(x), kernels.exp2_nonpositive(-mx.abs(x)))\n"
    )

    def libraries(tmp, path):
        env = {**os.environ, "TMPDIR": str(tmp), "PATH": path}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return sorted(p.name for p in tmp.glob("mlx/*/cpu/*.so"))

    (tmp_path / "with").mkdir(), (tmp_path / "without").mkdir()
    assert len(libraries(tmp_path / "with", os.environ["PATH"])) >= 3
    assert libraries(tmp_path / "without", str(tmp_path)) == []  # no g++: silently uncompiled
