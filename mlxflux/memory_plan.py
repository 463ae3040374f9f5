"""The memory plan: before any stage runs, which stages keep their weights resident and which
stream them from the model folder a block at a time (docs/design.md, "Memory plan").

A stage's resident need is its weights plus its activations at this size; its streamed need is
its largest two blocks (the one running and the one being read ahead) plus the weights it keeps
(embeddings, norms, the modulation tables) plus the activations. A stage streams when its
resident need does not fit the budget; below the largest streamed need the run is refused in
one line, before any stage. The stages never ask which it was: they take their blocks' weights
through `blocks.BlockWeights`, which the plan hands them.
"""

import os
from dataclasses import dataclass, field

from .blocks import block_of
from .cache import EasyCache, FirstBlock
from .errors import SettingsError
from .models.autoencoder import AutoencoderConfig, estimate_decode_bytes
from .models.transformer import FluxConfig, is_modulation_key
from .preview import decoder_activation_bytes as taef1_bytes

GIB = 1 << 30
# what `auto` leaves to everything else: a tenth of the machine's budget, at least 1 GiB
MARGIN_FRACTION, MARGIN_MIN = 0.10, 1 * GIB
# denoising activations at full width (3072), float32, measured by bench/denoise_memory.py:
# 0.63 GiB at 512 tokens, 1.24 GiB at 4208 (the DVD size): a line through both
ACT_BASE, ACT_PER_TOKEN = 0.545 * GIB, 0.61 * GIB / 3696
TEXT_ACTIVATIONS = int(0.25 * GIB)  # T5-XXL at 512 tokens, float32 (scaled by its width)
VISION_ACTIVATIONS = int(0.125 * GIB)  # SigLIP so400m on one 384x384 image, float32 (+ Redux's)
DECODE_BUDGET = 2 << 30  # the VAE decodes (and encodes) in row tiles above this estimate


def machine_budget(device_info: dict | None = None) -> int:
    """What `auto` may use: on Metal the GPU's recommended working set, elsewhere the memory
    the system reports available; minus a margin for everything else."""
    import mlx.core as mx

    if device_info is None and mx.metal.is_available():
        device_info = mx.metal.device_info()
    if device_info and device_info.get("max_recommended_working_set_size"):
        total = int(device_info["max_recommended_working_set_size"])
    else:
        total = available_memory()
    return max(0, total - max(MARGIN_MIN, int(total * MARGIN_FRACTION)))


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_budget(value) -> int | None:
    """None or 'auto' -> None (decided at plan time); a number of GiB -> bytes."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        gib = float(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"must be 'auto' or a number of GiB, got {value!r}", "memory_budget"
        ) from None
    if not gib > 0 or gib != gib or gib == float("inf"):
        raise SettingsError(f"must be a positive number of GiB, got {value!r}", "memory_budget")
    return int(gib * GIB)


@dataclass
class StageNeed:
    resident: int
    streamed: int  # equal to resident for stages that do not stream


@dataclass
class Plan:
    budget: int
    needs: dict[str, StageNeed]
    streamed: set[str] = field(default_factory=set)

    @property
    def kind(self) -> str:
        return "streamed" if self.streamed else "resident"

    def describe(self) -> str:
        if not self.streamed:
            return f"resident (budget {gib(self.budget)})"
        which = ", ".join(sorted(self.streamed))
        return f"streaming {which} from disk (they need more than the budget, {gib(self.budget)})"


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def tensor_bytes(entry: dict) -> dict[str, int]:
    """tensor key -> bytes, from a manifest component entry."""
    item = {"mlx.core.float32": 4, "mlx.core.bfloat16": 2, "mlx.core.float16": 2,
            "mlx.core.uint32": 4, "mlx.core.uint8": 1, "mlx.core.int32": 4}  # fmt: skip
    out = {}
    for key, t in entry["tensors"].items():
        n = 1
        for d in t["shape"]:
            n *= d
        out[key] = n * item.get(t["dtype"], 4)
    return out


def block_bytes(entry: dict, keys=None) -> tuple[dict[str, int], int]:
    """(bytes per block prefix, bytes outside blocks) of a component's tensors."""
    blocks: dict[str, int] = {}
    rest = 0
    for key, n in tensor_bytes(entry).items():
        if keys is not None and key not in keys:
            continue
        block = block_of(key)
        if block:
            blocks[block] = blocks.get(block, 0) + n
        else:
            rest += n
    return blocks, rest


def make_plan(manifest: dict, width: int, height: int, dtype_bytes: int, budget: int | None,
              steps: int = 20, text_tokens: int = 512, extra_tokens: int = 0,
              cache: str = "none", preview: str = "none",
              lora_bytes: int = 0, redux_images: int = 0) -> Plan:  # fmt: skip
    """The plan for one generation at width x height; SettingsError when even streaming does
    not fit `budget` (bytes; None: the machine's). `extra_tokens`: what a variant appends to
    the image tokens (Kontext's references); `cache`: the step cache's method, whose state the
    denoise stage holds too, as it does the preview's tiny decoder (`preview` taef1) and the
    LoRAs' side paths (`lora_bytes`: low-rank factors, dense terms, DoRA's dense rows).
    `redux_images`: each adds Redux's 729 tokens to the text (attention and activations grow)
    and the vision stage, which runs SigLIP and Redux's projection, one image at a time."""
    budget = machine_budget() if budget is None else budget
    comps = manifest["components"]
    flux = comps["transformer"]
    hidden = flux["config"].get("hidden_size", 3072)
    if redux_images:
        redux_cfg = comps["redux"]["config"]
        text_tokens += redux_images * (redux_cfg["image_size"] // redux_cfg["patch_size"]) ** 2
    tokens = (width // 16) * (height // 16) + text_tokens + extra_tokens
    act = int((ACT_BASE + ACT_PER_TOKEN * tokens) * hidden / 3072 * dtype_bytes / 4)
    trunk_keys = {k for k in flux["tensors"] if not is_modulation_key(k)}
    blocks, rest = block_bytes(flux, trunk_keys)
    biggest = sorted(blocks.values())[-2:]
    rows = FluxConfig.from_dict(flux["config"]).modulation_vectors  # x hidden, per step
    tables = steps * rows * hidden * 4  # every step's modulation vectors, float32 at most
    image_tokens = (width // 16) * (height // 16) + extra_tokens
    held = {"none": 0, "easycache": EasyCache.bytes(image_tokens),
            "first-block": FirstBlock.bytes(image_tokens, text_tokens, hidden, 4),
            }[cache]  # fmt: skip
    held += lora_bytes
    if preview == "taef1":  # its weights, and its activations at the preview's size
        held += sum(tensor_bytes(comps["taef1"]).values()) + taef1_bytes(height, width)
    denoise = StageNeed(sum(blocks.values()) + rest + act + tables + held,
                        sum(biggest) + rest + act + tables + held)  # fmt: skip
    t5_blocks, t5_rest = block_bytes(comps["t5"])
    clip = sum(tensor_bytes(comps["clip"]).values())
    kept = t5_rest + clip + TEXT_ACTIVATIONS * comps["t5"]["config"].get("d_model", 4096) // 4096
    text = StageNeed(sum(t5_blocks.values()) + kept, sum(sorted(t5_blocks.values())[-2:]) + kept)
    mod_sizes = {k: n for k, n in tensor_bytes(flux).items() if is_modulation_key(k)}
    largest_table = max(mod_sizes.values(), default=0)
    # each modulation layer is dropped once its table is evaluated: never more than two alive
    modulation = StageNeed(2 * largest_table + tables, 2 * largest_table + tables)
    vae = sum(tensor_bytes(comps["vae"]).values())
    vae_cfg = AutoencoderConfig.from_dict(comps["vae"]["config"])
    decode_act = min(DECODE_BUDGET, estimate_decode_bytes(height, width, vae_cfg, dtype_bytes))
    decode = StageNeed(vae + decode_act, vae + decode_act)  # tiled above DECODE_BUDGET
    needs = {"text": text, "modulation": modulation, "denoise": denoise, "decode": decode}
    if redux_images:  # its weights, and one image's activations (729 tokens: ~0.1 GiB)
        vision = sum(tensor_bytes(comps["redux"]).values()) + VISION_ACTIVATIONS
        needs = {"vision": StageNeed(vision, vision), **needs}
    minimum = max(n.streamed for n in needs.values())
    if budget < minimum:
        raise SettingsError(
            f"{gib(budget)} is below the {gib(minimum)} this model needs at {width}x{height} "
            "even streaming its weights from disk",
            "memory_budget",
        )
    streamed = {
        name for name, n in needs.items() if n.resident > budget and n.streamed < n.resident
    }
    return Plan(budget, needs, streamed)
