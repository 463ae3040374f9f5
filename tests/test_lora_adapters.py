"""The adapter pieces one layer can get (`mlxflux.lora_adapters`): malformed pieces refused with
a reason, never a crash, and each side path equal to its change applied densely (numpy's kron
and matmul are the reference). The pictures against ComfyUI: tests/test_lora_formats.py."""

import mlx.core as mx
import numpy as np
import pytest

from mlxflux.lora_adapters import AdapterError, SidePath, read_term

F = np.float32
BAD = [
    ("loha", {"hada_w1_a": np.ones(()), "hada_w1_b": np.ones(()), "hada_w2_a": np.ones((2, 2)),
              "hada_w2_b": np.ones((2, 2))}, "not a matrix"),
    ("lokr", {"lokr_w1": np.ones((2,)), "lokr_w2": np.ones((2, 2))}, "not a matrix"),
    ("lokr", {"lokr_w1": np.ones((0, 0)), "lokr_w2": np.ones((2, 2))}, "not a matrix"),
    ("lokr", {"lokr_w1": np.ones((2, 2))}, "LoKr needs lokr_w2"),
    ("lora", {"down": np.ones((0, 4)), "up": np.ones((4, 0))}, "not a matrix"),
    ("lora", {"down": np.ones((2, 4)), "up": np.ones((4, 3))}, "no pair"),
    ("lora", {"down": np.ones((2, 4)), "up": np.ones((4, 2)), "alpha": np.ones(2)}, "alpha"),
    ("lora", {"down": np.ones((2, 4)), "up": np.ones((4, 2)), "dora_scale": np.ones(3)},
     "dora_scale"),
    ("diff", {"diff_b": np.ones(3)}, "3 values for 4 outputs"),
    ("diff", {"diff": np.ones((4, 5))}, "do not fit"),
    ("loha", {"hada_w1_a": np.ones((4, 2)), "hada_w1_b": np.ones((2, 4)),
              "hada_w2_a": np.ones((4, 2)), "hada_w2_b": np.ones((2, 4)),
              "hada_t1": np.ones((2, 2, 1, 1))}, "CP/Tucker"),
    ("oft", {"oft": np.ones((2, 2, 2))}, "OFT/BOFT adapters are not applied"),
    ("lora", {"down": np.ones((2, 4)), "up": np.full((4, 2), 3e38), "alpha": np.array(1e3)},
     "overflows"),
]  # fmt: skip


@pytest.mark.parametrize("kind, pieces, said", BAD)
def test_malformed_pieces_are_refused_with_a_reason(kind, pieces, said):
    with pytest.raises(AdapterError, match=said):
        read_term(kind, {k: v.astype(F) for k, v in pieces.items()}, 1.0, 4, 4)


def test_each_side_path_equals_its_change_applied_densely():
    rng = np.random.default_rng(0)
    rows, cols = 6, 8
    x = rng.standard_normal((2, 3, cols)).astype(F)
    lokr = read_term("lokr", {"lokr_w1": rng.standard_normal((2, 4)).astype(F),
                              "lokr_w2_a": rng.standard_normal((3, 2)).astype(F),
                              "lokr_w2_b": rng.standard_normal((2, 2)).astype(F),
                              "alpha": np.array(1.0, F)}, 0.7, rows, cols)  # fmt: skip
    w2 = lokr.kron[1] / F(0.7 * 1.0 / 2)  # alpha / dim = 1 / 2, strength 0.7
    assert np.allclose(lokr.delta(), 0.7 * 0.5 * np.kron(lokr.kron[0], w2), atol=1e-6)
    side = SidePath(rows, cols, krons=[tuple(mx.array(w) for w in lokr.kron)])
    got = side.apply({}, mx.array(x), mx.zeros((2, 3, rows)), 0, rows)
    assert np.allclose(np.array(got), x @ lokr.delta().T, atol=1e-5)
    part = side.apply({}, mx.array(x), mx.zeros((2, 3, 2)), 2, 4)  # rows 2..4 only
    assert np.allclose(np.array(part), (x @ lokr.delta().T)[..., 2:4], atol=1e-5)
    down, up = rng.standard_normal((2, cols)).astype(F), rng.standard_normal((rows, 2)).astype(F)
    lora = read_term("lora", {"down": down, "up": up, "alpha": np.array(4.0, F)}, 0.5, rows, cols)
    assert np.allclose(lora.delta(), 0.5 * (4.0 / 2) * up @ down, atol=1e-6)
