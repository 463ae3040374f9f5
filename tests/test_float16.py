"""float16 done right (issue 20): the default precision by chip, and float16 that matches float32
where layer outputs leave float16's range, unquantized and 8-bit, on both kernel paths.

The overflow models are tiny diffusers transformers whose output projections and adaLN
modulation are scaled up until layer outputs reach ~16x float16's largest value (65504) and the
residual streams pass it too; the reference is diffusers in float32 on the same weights.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from mlxflux import kernels
from mlxflux.precision import precision_choice

from .reference import (
    BF16_BOUND,
    CPU_QMM_BF16_BOUND,
    QUANTIZABLE,
    load_from_diffusers,
    make_inputs,
    randomize_,
    rel_err,
    run_reference,
    to_mx,
    with_bits,
)

pytestmark = pytest.mark.reference

FP16_MAX = 65504.0


@pytest.mark.parametrize(
    "backend,arch,want",
    [
        ("cpu", None, "float32"),
        ("cuda", None, "bfloat16"),
        ("metal", "applegpu_g13g", "float16"),  # M1
        ("metal", "applegpu_g13s", "float16"),  # M1 Max
        ("metal", "applegpu_g14s", "float16"),  # M2 Pro/Max
        ("metal", "applegpu_g15p", "bfloat16"),  # M3 Pro
        ("metal", "applegpu_g16s", "bfloat16"),  # M4 Max
        ("metal", "applegpu_g17s", "bfloat16"),  # M5
        ("metal", "", "bfloat16"),  # unknown: bf16 is right on every newer chip
    ],
)
def test_default_precision_by_chip(monkeypatch, backend, arch, want):
    monkeypatch.setattr(kernels, "backend", lambda: backend)
    info = None if arch is None else {"architecture": arch, "device_name": "mocked"}
    if backend == "metal":  # the real call must not run here: the info is mocked
        monkeypatch.setattr(mx.metal, "device_info", lambda: info)
    precision, why = precision_choice()
    assert precision == want
    assert why and (arch is None or arch in why or not arch)


# output projections x 3e5: outputs up to ~15x float16's range, the residual streams past it;
# the second single block's adaLN x 3e4: its modulated input (a matmul input) past it too
OVERFLOW = (3e5, 3e4)


def overflowing_reference(seed: int, factors=(1.0, 1.0)) -> FluxTransformer2DModel:
    """A tiny diffusers transformer whose attention and MLP output projections (both streams
    of the double block, the first single block's output) are factors[0] times larger, and
    the second single block's adaLN modulation factors[1] times."""
    torch.manual_seed(seed)
    # a third single block, unscaled, reads the overflowing stream: it must run in float16
    ref = randomize_(FluxTransformer2DModel(**dict(QUANTIZABLE, num_single_layers=3)), seed)
    out, modulation = factors
    with torch.no_grad():
        block = ref.transformer_blocks[0]
        first = ref.single_transformer_blocks[0]
        for layer in (block.ff.net[2], block.ff_context.net[2], block.attn.to_out[0],
                      block.attn.to_add_out, first.proj_out):  # fmt: skip
            layer.weight.mul_(out)
        ref.single_transformer_blocks[1].norm.linear.weight.mul_(modulation)
    return ref


def largest_activation(ref, inputs) -> float:
    """The largest |value| any Linear of the reference outputs on these inputs."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.abs().max().item()))
             for m in ref.modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    run_reference(ref, inputs)
    for h in hooks:
        h.remove()
    return max(seen)


def run_float16(model, inputs) -> mx.array:
    dt = mx.float16
    return model(
        *(to_mx(inputs[k]).astype(dt) for k in ("hidden_states", "encoder_hidden_states")),
        to_mx(inputs["timestep"]),
        to_mx(inputs["pooled_projections"]).astype(dt),
        inputs["img_ids"].numpy().astype(np.int32),
        to_mx(inputs["guidance"]),
    )


def bound(mode: str, bits) -> float:
    # MLX's CPU quantized matmul is imprecise with 16-bit inputs (test_kernels.py)
    if bits and mode == "fused" and kernels.backend() == "cpu":
        return CPU_QMM_BF16_BOUND
    return BF16_BOUND


@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("overflow", [False, True], ids=["plain", "overflowing"])
def test_float16_matches_float32(monkeypatch, mode, bits, overflow):
    monkeypatch.setenv("MLXFLUX_KERNELS", mode)
    model, ref = with_bits(overflowing_reference(4, OVERFLOW if overflow else (1.0, 1.0)), bits)
    inputs = make_inputs(ref, 1, 64, 96, 7)
    peak = largest_activation(ref, inputs)
    if overflow:  # the test means something only if float16 really overflows
        assert 8 * FP16_MAX < peak < 17 * FP16_MAX, peak
    else:
        assert peak < FP16_MAX / 100, peak
    want = run_reference(ref, inputs)
    out = run_float16(model, inputs)
    mx.eval(out)
    assert out.dtype == mx.float32  # the velocity leaves the trunk in the streams' dtype
    assert mx.isfinite(out).all().item()
    err = rel_err(np.array(out), want)
    reruns = sorted(model.float32_blocks)
    print(f"{mode} {bits or 'plain'} overflow={overflow}: peak {peak / FP16_MAX:.1f}x "
          f"fp16's range, rel err {err:.2e}, float32 re-runs {reruns}")  # fmt: skip
    assert err <= bound(mode, bits)
    if not overflow:
        assert model.float32_blocks == set()  # nothing overflowed: all of it ran in float16
    else:  # the overflowing blocks ran again in float32; the rest stayed float16
        assert model.float32_blocks == {"double_blocks.0", "single_blocks.0", "single_blocks.1"}


def test_plain_float16_streams_are_float32_and_matmuls_float16(monkeypatch):
    """The residual streams stay float32 and the matmuls get float16 inputs."""
    monkeypatch.setenv("MLXFLUX_KERNELS", "split")
    ref = overflowing_reference(4)
    model = load_from_diffusers(ref)
    seen = []
    real = model.kernels._rows

    def spy(layer, start, stop):
        fn = real(layer, start, stop)
        return lambda x: (seen.append(x.dtype), fn(x))[1]

    streams = []
    inputs = make_inputs(ref, 1, 64, 96, 7)
    dt = mx.float16
    cond = model.modulation(  # float32, as the pipeline computes it for float16
        to_mx(inputs["timestep"]),
        to_mx(inputs["pooled_projections"]),
        to_mx(inputs["guidance"]),
    )
    monkeypatch.setattr(model.kernels, "_rows", spy)
    rope = model.rope(inputs["img_ids"].numpy().astype(np.int32), 7)
    model.trunk(
        to_mx(inputs["hidden_states"]),
        to_mx(inputs["encoder_hidden_states"]),
        cond,
        rope,
        after_block=lambda *s: streams.extend(x.dtype for x in s),
        dtype=dt,
    )
    assert set(streams) == {mx.float32}
    assert set(seen) == {mx.float16}
