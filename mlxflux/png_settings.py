"""The settings of an earlier PNG, for `gen --from-png`: mlxflux's own (the `mlxflux` JSON
chunk), an A1111/Forge `parameters` chunk, or a ComfyUI `prompt` chunk (its API graph).

Returns what `gen` takes, in its flags' names (prompt, width, height, steps, guidance,
scheduler, shift, seed, t5_padding, denoise), and notes on what could not be carried over
(another sampler, a scheduler mlxflux does not run, input images named by file only).
"""

import json
import re
from pathlib import Path

from PIL import Image

from .errors import SettingsError
from .resolve import PRESET_KEYS
from .sampling import SCHEDULERS

KEYS = (*PRESET_KEYS, "seed")  # what a PNG carries over: a preset's settings and the seed


def read_png_settings(path) -> tuple[dict, str, list[str]]:
    """(settings, what they came from, notes); SettingsError (`from_png`) when the file is
    no PNG with settings mlxflux can read."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as img:
            text = dict(getattr(img, "text", {}) or {})
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file", "from_png") from None
    except Exception as e:  # Pillow raises many kinds for a damaged file
        raise SettingsError(f"{path}: not a readable image ({e})", "from_png") from None
    try:
        if "mlxflux" in text:
            meta = json.loads(text["mlxflux"])
            settings = {k: meta[k] for k in KEYS if meta.get(k) is not None}
            settings.setdefault("prompt_syntax", "plain")  # mlxflux read no weights before 0.2
            return settings, "mlxflux", _ours_notes(meta)
        if "prompt" in text:
            settings, notes = comfy_prompt_settings(json.loads(text["prompt"]))
            return settings, "ComfyUI prompt graph", notes
        if "parameters" in text:
            settings, notes = a1111_settings(text["parameters"])
            return settings, "A1111 parameters", notes
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise SettingsError(f"{path}: its settings cannot be read ({e})", "from_png") from None
    raise SettingsError(
        f"{path}: holds no settings (no mlxflux, ComfyUI `prompt` or A1111 `parameters` chunk)",
        "from_png",
    )


def _ours_notes(meta: dict) -> list[str]:
    notes = []
    for key, what in (("init_image", "init image"), ("reference_images", "reference images"),
                      ("control_image", "control image"), ("mask", "mask"),
                      ("loras", "LoRAs")):  # fmt: skip
        if meta.get(key):
            notes.append(f"the {what} ({_names(meta[key])}) is not carried over: give it again")
    if meta.get("redux_images"):
        flags = " ".join(f"--redux {r['file']}:{r['strength']:g}" for r in meta["redux_images"])
        notes.append(f"the Redux images are not carried over: give them again ({flags})")
    return notes


def _names(value) -> str:
    items = value if isinstance(value, list) else [value]
    return ", ".join(str(i.get("file", i)) if isinstance(i, dict) else str(i) for i in items)


# ---- A1111 / Forge -------------------------------------------------------------------------

_PAIR = re.compile(r'\s*([\w][\w \-/()]*?):\s*("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)')


def a1111_settings(text: str) -> tuple[dict, list[str]]:
    """The `parameters` chunk A1111 and Forge write: the prompt, maybe a 'Negative prompt:'
    line, then one line of `Key: value` pairs."""
    lines = text.strip().split("\n")
    last = max(i for i, line in enumerate(lines) if re.match(r"\s*Steps:\s*\d", line))
    prompt_lines = [ln for ln in lines[:last] if not ln.startswith("Negative prompt:")]
    pairs = {k.strip(): v.strip().strip('"') for k, v in _PAIR.findall(lines[last])}
    out, notes = {"prompt": "\n".join(prompt_lines).strip()}, []
    if "Steps" in pairs:
        out["steps"] = int(pairs["Steps"])
    if "Seed" in pairs:
        out["seed"] = int(pairs["Seed"])
    if "Size" in pairs:
        out["width"], out["height"] = (int(v) for v in pairs["Size"].lower().split("x"))
    guidance = pairs.get("Distilled CFG Scale") or pairs.get("Guidance")
    if guidance:
        out["guidance"] = float(guidance)
    if "Denoising strength" in pairs:
        out["denoise"] = float(pairs["Denoising strength"])
    if "Shift" in pairs:
        out["shift"] = pairs["Shift"] if pairs["Shift"] == "auto" else float(pairs["Shift"])
    if "T5 padding" in pairs:
        out["t5_padding"] = pairs["T5 padding"]
    if pairs.get("Prompt syntax") in ("comfy", "plain"):
        out["prompt_syntax"] = pairs["Prompt syntax"]
    schedule = pairs.get("Schedule type", "").lower()
    if schedule in SCHEDULERS:
        out["scheduler"] = schedule
    elif schedule:
        notes.append(f"schedule type {pairs['Schedule type']} is not one mlxflux runs: "
                     f"{', '.join(SCHEDULERS)}")  # fmt: skip
    sampler = pairs.get("Sampler", "")
    if sampler and sampler.lower() != "euler":
        notes.append(f"sampler {sampler}: mlxflux samples with Euler")
    return out, notes


# ---- ComfyUI's API graph -------------------------------------------------------------------

SAMPLERS = ("KSampler", "KSamplerAdvanced")


def comfy_prompt_settings(graph: dict) -> tuple[dict, list[str]]:
    """The settings of a ComfyUI API graph ({id: {class_type, inputs}}): its KSampler's seed,
    steps, scheduler and denoise; the prompt and guidance its positive conditioning comes
    from; the size of its latent; a ModelSamplingFlux node's shift."""
    samplers = [n for n in graph.values() if n.get("class_type") in SAMPLERS]
    if not samplers:
        raise ValueError("no KSampler node")
    ks = samplers[0]["inputs"]
    out, notes = {}, []

    def node(link):
        return graph[str(link[0])] if isinstance(link, list) else None

    def value(v):  # a widget value, or a link to a primitive node's
        n = node(v)
        if n is None:
            return v
        inputs = n.get("inputs", {})
        return value(next(iter(inputs.values()))) if inputs else None

    out["seed"] = int(value(ks.get("seed", ks.get("noise_seed"))))
    out["steps"] = int(value(ks["steps"]))
    scheduler = value(ks.get("scheduler"))
    if scheduler in SCHEDULERS:
        out["scheduler"] = scheduler
    elif scheduler:
        notes.append(f"scheduler {scheduler} is not one mlxflux runs: {', '.join(SCHEDULERS)}")
    sampler = value(ks.get("sampler_name"))
    if sampler and sampler != "euler":
        notes.append(f"sampler {sampler}: mlxflux samples with Euler")
    if "denoise" in ks:
        out["denoise"] = float(value(ks["denoise"]))
    cond = node(ks.get("positive"))
    seen = set()
    while cond is not None and id(cond) not in seen:
        seen.add(id(cond))
        kind, inputs = cond.get("class_type"), cond.get("inputs", {})
        if kind == "FluxGuidance":
            out.setdefault("guidance", float(value(inputs["guidance"])))
        elif kind == "CLIPTextEncodeFlux":
            out.setdefault("guidance", float(value(inputs["guidance"])))
            out["prompt"] = value(inputs.get("t5xxl")) or value(inputs.get("clip_l"))
            break
        elif kind == "CLIPTextEncode":
            out["prompt"] = value(inputs["text"])
            break
        nxt = inputs.get("conditioning", inputs.get("positive"))
        cond = node(nxt)
    latent = node(ks.get("latent_image"))
    if latent is not None and "width" in latent.get("inputs", {}):
        out["width"] = int(value(latent["inputs"]["width"]))
        out["height"] = int(value(latent["inputs"]["height"]))
    for n in graph.values():
        if n.get("class_type") == "EasyCache":
            inputs = n["inputs"]
            out["cache"] = "easycache"
            out["cache_threshold"] = float(value(inputs["reuse_threshold"]))
            out["cache_range"] = (float(value(inputs["start_percent"])),
                                  float(value(inputs["end_percent"])))  # fmt: skip
        if n.get("class_type") == "ModelSamplingFlux":
            base = float(value(n["inputs"]["base_shift"]))
            top = float(value(n["inputs"]["max_shift"]))
            out["shift"] = top if base == top else "auto"  # equal: a fixed shift
            if base != top and (base, top) != (0.5, 1.15):
                notes.append(f"ModelSamplingFlux {base}/{top}: mlxflux's auto shift is 0.5/1.15")
    if "prompt" not in out:
        raise ValueError("no text encoder node feeds the sampler's positive input")
    return out, notes
