"""The staged text-to-image pipeline: each stage loads its weights, runs, and releases them.

    text        tokenize, T5 + CLIP                   -> txt [1, T, 4096], pooled [1, 768]
    encode      the VAE encoder (input images only)   -> init latent, the variant's conditioning
    modulation  every step's adaLN vectors at once    -> Conditioning (then drop 3.2 B weights)
    denoise     Euler over the transformer trunk      -> latent [1, 16, H/8, W/8]
    decode      VAE (row-tiled when it would not fit) -> image

so the peak is the largest stage, not the sum. Weights are read lazily from the model folder:
nothing is read before its stage. Every stage's output is checked for NaN/inf (an overflow
would otherwise save a black PNG): `NonFiniteError` names the stage and step.

A `Pipeline` is what was loaded once (the folder, its variant, the precision, the kernels);
each generation is a `job.Job` (`prepare`), which holds its own state and report.
"""

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from . import kernels as kernel_choice
from . import progress
from .blocks import BlockWeights, StreamedBlocks
from .cache import EasyCache, FirstBlock
from .errors import SettingsError, check_finite
from .lora import LoraSet
from .memory_plan import DECODE_BUDGET, parse_budget, tensor_bytes
from .model_folder import DTYPES, check_folder, read_manifest
from .models.autoencoder import estimate_decode_bytes
from .models.latents import image_ids, pack_latents, unpack_latents
from .models.registry import load_component
from .models.transformer import Conditioning as Modulation
from .precision import precision_choice
from .prompt_syntax import segments, weigh
from .request import GenerationRequest
from .sampling import euler_step
from .tokenizers import CLIPTokenizer, T5Tokenizer
from .variants import Conditioning, variant_of

PRECISIONS = DTYPES  # compute dtypes: the same names as the folder's storage dtypes


def denoise_step(model, x, txt, cond: Modulation, rope, sigma: float, sigma_next: float,
                 dtype=None, block_weights=None, extra: Conditioning | None = None,
                 cache=None, step: int = 0, with_velocity: bool = False,
                 bias: mx.array | None = None):  # fmt: skip
    """One evaluated Euler step of the trunk: x (packed, float32) -> x at sigma_next.

    The trunk runs in `dtype` (default: txt's) and is evaluated after every block, so only one
    block's activations are alive at a time, whatever a backend's command buffers would
    otherwise keep (CUDA held ~10 GiB of finished intermediates at the DVD size).
    `extra`: what the inputs add (`variants.Conditioning`); `txt` and `rope` must already
    include its text tokens, and `rope` its image tokens. `cache`: this seed's step cache
    (`cache.EasyCache` decides whether the trunk runs at all, `cache.FirstBlock` runs inside
    it), `step` the step's number (1-based) for its counts. `with_velocity`: return
    (x, velocity) (a preview's x0 is x - sigma * velocity). `bias`: `extra`'s attention bias
    (`Conditioning.attention_bias`), made once per image.
    """
    extra = extra or Conditioning()
    first_block = cache if isinstance(cache, FirstBlock) else None

    def velocity() -> mx.array:
        v = model.trunk(extra.inputs(x), txt, cond, rope, after_block=mx.eval,
                        dtype=dtype or txt.dtype, block_weights=block_weights,
                        first_block=first_block, step=step, bias=bias)  # fmt: skip
        return extra.velocity(v, x.shape[1])

    v = cache.velocity(step, sigma, x, velocity) if isinstance(cache, EasyCache) else velocity()
    x_next = euler_step(x, v, sigma, sigma_next)
    mx.eval(x_next)
    return (x_next, v) if with_velocity else x_next


class Pipeline:
    def __init__(self, folder: str | Path, precision: str | None = None, memory_budget=None,
                 kernels: "kernel_choice.Kernels | None" = None):  # fmt: skip
        self.folder = Path(folder)
        self.memory_budget = parse_budget(memory_budget)  # bytes, or None for the machine's
        if precision:
            self.precision, self.precision_why = precision, "asked for"
        else:
            self.precision, self.precision_why = precision_choice()
        if self.precision not in PRECISIONS:
            raise SettingsError(f"must be one of {', '.join(PRECISIONS)}", "precision")
        self.manifest = read_manifest(self.folder)
        check_folder(self.folder, self.manifest)  # headers only: a damaged folder fails here
        self.variant_info = variant_of(self.manifest)
        self.model_name = self.variant_info.model_name
        self.defaults = self.variant_info.defaults  # steps, shift and guidance
        self.dtype = PRECISIONS[self.precision]
        # float16 keeps float32 where its range is not enough: the text the trunk reads, the
        # modulation vectors and the residual streams (docs/numerics.md, "float16")
        self.wide_dtype = mx.float32 if self.dtype == mx.float16 else self.dtype
        # the backend's code path, chosen once (MLXFLUX_KERNELS); every model built here runs it
        self.kernels = kernels or kernel_choice.choose()

    @property
    def variant(self) -> str:
        """A name of `variants.VARIANTS` (dev, schnell, kontext, canny, depth, fill), recorded
        at conversion (`mlxflux info` shows it)."""
        return self.variant_info.name

    @property
    def model_id(self) -> str:
        return self.manifest.get("id", "")

    # ---- jobs -----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest):
        """A `job.Job` for `request`: the model's defaults applied, every input opened and
        checked, each LoRA read once, the memory plan made; no stage runs (`Job.run`)."""
        from .job import prepare

        return prepare(self, request)

    def generate(self, prompt: str, *, seed: int = 0, noise=None, on_step: Callable | None = None,
                 on_preview: Callable | None = None, **settings) -> Image.Image:  # fmt: skip
        """Text to image (or image to image, Kontext, Canny/Depth, Fill), staged: one image.

        `settings`: any field of `GenerationRequest` (width, height, steps, guidance, scheduler,
        shift, t5_padding, init_image, denoise, loras, reference_images, reference_scale,
        control_image, preprocess, mask, outpaint, tiled_decode); their defaults and meaning
        are documented there. `noise` [1, 16, H/8, W/8] replaces the seeded ComfyUI noise.
        `on_step(step, steps)` is called after every denoising step, `on_preview(step, steps,
        picture)` with a PIL picture of the cover forming (`preview`). For the report, use
        `prepare`: `job = pipe.prepare(GenerationRequest(...)); ...job.run()...; job.report`.
        """
        request = GenerationRequest(prompt, seeds=(seed,), noise=noise, **settings)
        job = self.prepare(request)
        ((_, image),) = job.run(
            on_step=on_step and (lambda _, i, n: on_step(i, n)),
            on_preview=on_preview and (lambda _, i, n, p: on_preview(i, n, p)),
        )
        return image

    def generate_many(self, prompt: str, seeds, *, on_step: Callable | None = None,
                      on_preview: Callable | None = None, **settings):  # fmt: skip
        """An iterator of (seed, image), each image as `generate` makes it, yielded once decoded.

        The prompt is encoded once and each stage's weights load once (`job.Job.run`);
        `on_step(index, step, steps)` after every step, `on_preview(index, step, steps,
        picture)` with the picture forming. Checked here, at the call, before any stage: the
        iterator runs the stages."""
        job = self.prepare(GenerationRequest(prompt, seeds=tuple(seeds), **settings))
        return job.run(on_step, on_preview)

    # ---- stages ---------------------------------------------------------------------------

    def encode_text(self, prompt: str, t5_padding: str, streamed: bool = False, stage=None,
                    syntax: str = "comfy", loras: LoraSet | None = None):  # fmt: skip
        """(txt [1, T, 4096], pooled [1, 768]) of the prompt: T5, then CLIP. `syntax`: how the
        prompt is read (`prompt_syntax`): with weights, the empty prompt runs through T5 in
        the same batch and each weighted token moves from it by its weight. `loras`: the
        job's LoRAs, whose text-encoder parts ride on T5's and CLIP's layers."""
        tok = self.folder / "tokenizers"
        parts = segments(prompt, syntax)
        t5_tok = T5Tokenizer(tok / "t5" / "spiece.model")
        t5_ids, weights = t5_tok.weighted(parts, t5_padding)
        clip_tok = CLIPTokenizer(tok / "clip" / "vocab.json", tok / "clip" / "merges.txt")
        clip_ids = clip_tok.weighted(parts)
        has_weights = any(w != 1.0 for w in weights)
        batch = [t5_ids, t5_tok.empty(len(t5_ids))] if has_weights else [t5_ids]
        t5 = self.load("t5")
        if loras is not None and "t5" in loras.text:
            loras.text["t5"].attach(t5)
        blocks = self.blocks(t5, "t5", t5.block_names(), streamed)
        with progress.units(len(t5.block_names())):
            txt = t5(mx.array(batch), block_weights=blocks)
        if has_weights:
            txt = weigh(txt[:1], txt[1:], weights)
        mx.eval(txt)
        check_finite(txt, "text (T5)", self.precision)
        del t5
        clip = self.load("clip")
        if loras is not None and "clip" in loras.text:
            loras.text["clip"].attach(clip)
        _, pooled = clip(mx.array([clip_ids]))
        mx.eval(pooled)
        check_finite(pooled, "text (CLIP)", self.precision)
        del clip
        if stage is not None:
            stage.bytes_read = self.read_bytes(blocks, "t5") + self.group_bytes("clip")
            stage.read_wait_seconds = blocks.wait_seconds
        return txt, pooled

    def load(self, name: str, group: str | None = None):
        """A component of the folder (lazy: read when evaluated), built with these kernels."""
        return load_component(self.folder, name, self.manifest, group, self.kernels)

    def blocks(self, model, name: str, prefixes, streamed: bool, include=None) -> BlockWeights:
        """How a stage gets its blocks' weights: resident, or streamed (the memory plan)."""
        if not streamed:
            return BlockWeights()
        kw = {"include": include} if include else {}
        return StreamedBlocks(model, self.folder, name, self.manifest, prefixes, **kw)

    def group_bytes(self, name: str, group: str | None = None, include=None) -> int:
        """Bytes of a component's (or a file group's) tensors: what a resident stage reads."""
        entry = self.manifest["components"][name]
        files = set(entry["files"][group]) if group else None
        sizes = tensor_bytes(entry)
        return sum(n for k, n in sizes.items()
                   if (files is None or entry["tensors"][k]["file"] in files)
                   and (include is None or include(k)))  # fmt: skip

    def read_bytes(self, blocks: BlockWeights, name: str, group=None) -> int:
        if not blocks.streamed:
            return self.group_bytes(name, group)
        streamed = set(blocks.files)
        rest = self.group_bytes(name, group, lambda k: not any(
            k.startswith(p + ".") for p in streamed))  # fmt: skip
        return blocks.bytes_read + rest

    def modulation(self, pooled: mx.array, sigma_list: list[float], guidance: float,
                   loras: LoraSet | None = None) -> tuple[object, Modulation]:  # fmt: skip
        """Every step's adaLN vectors at once; returns the transformer without those weights
        (the LoRAs attached to its layers, the trunk's weights not yet loaded)."""
        steps = len(sigma_list) - 1
        model = self.load("transformer", group="modulation")
        if loras is not None:
            loras.attach(model)
        releases = iter(model.modulation_releases())

        def each(table: mx.array) -> None:  # one layer at a time, dropped once its table is made
            mx.eval(table)
            check_finite(table, "modulation", self.precision)
            next(releases)()

        cond = model.modulation(
            mx.array(sigma_list[:-1], dtype=mx.float32),
            mx.repeat(pooled.astype(self.wide_dtype), steps, axis=0),
            mx.full((steps,), guidance, dtype=mx.float32),
            each=each,
        )
        model.drop_modulation()
        return model, cond

    def denoise(self, model, cond: Modulation, txt: mx.array, noise: np.ndarray,
                sigma_list: list[float], on_step: Callable[[int, int], None] | None = None,
                block_weights: BlockWeights | None = None,
                extra: Conditioning | None = None, cache=None, on_x0=None) -> mx.array:  # fmt: skip
        """Euler over the transformer trunk; the latent [1, 16, H/8, W/8] stays float32.
        `extra`: what the inputs add (Kontext's reference tokens, the control or fill
        channels, text-side tokens); `cache`: this seed's step cache (`mlxflux.cache`);
        `on_x0(step, steps, x0)` after every step with the estimate of the clean latent,
        x0 = x - sigma * v [1, 16, H/8, W/8] (ComfyUI's `calculate_denoised`: what previews
        show); it reads x0 only."""
        extra = extra or Conditioning()
        height, width = noise.shape[2] * 8, noise.shape[3] * 8
        steps = len(sigma_list) - 1
        txt = extra.prompt(txt).astype(self.wide_dtype)
        rope = model.rope(extra.ids_for(image_ids(height, width)), txt.shape[1])
        x = pack_latents(mx.array(noise, dtype=mx.float32))
        n_img = x.shape[1] + extra.extra_tokens
        bias = extra.attention_bias(txt.shape[1], n_img)
        for i in range(steps):
            sigmas, before = sigma_list[i : i + 2], x
            x, v = denoise_step(model, x, txt, cond.rows(i, i + 1), rope, *sigmas,
                                dtype=self.dtype, block_weights=block_weights, extra=extra,
                                cache=cache, step=i + 1, with_velocity=True,
                                bias=bias)  # fmt: skip
            check_finite(x, "denoise", self.precision, i + 1, steps)
            if on_x0 is not None:
                x0 = before - v.astype(mx.float32) * sigmas[0]
                on_x0(i + 1, steps, unpack_latents(x0, height, width))
            del v
            if on_step:
                on_step(i + 1, steps)
        return unpack_latents(x, height, width)

    def _vae(self, run: Callable[[mx.Dtype], mx.array], stage: str, fallbacks: list) -> mx.array:
        """run(dtype), evaluated; in float16, run again in float32 if it overflowed (the stage's
        name appended to `fallbacks`)."""
        out = run(self.dtype)
        mx.eval(out)
        if self.dtype == mx.float16 and not mx.all(mx.isfinite(out)).item():
            fallbacks.append(stage)
            out = run(mx.float32)
            mx.eval(out)
        check_finite(out, stage, self.precision)
        return out

    def tiled(self, height: int, width: int, config, tiled: bool | None) -> bool:
        """Whether the VAE runs in row tiles: as asked, else when untiled would not fit."""
        if tiled is not None:
            return tiled
        return estimate_decode_bytes(height, width, config, self.dtype.size) > DECODE_BUDGET

    def decode(self, ae, latent: mx.array, tiled: bool | None, fallbacks: list) -> Image.Image:
        h, w = latent.shape[2] * 8, latent.shape[3] * 8
        tiled = self.tiled(h, w, ae.config, tiled)

        def run(dtype: mx.Dtype) -> mx.array:
            with progress.units(ae.decoder.units):
                return ae.decode(latent.astype(dtype), tiled=tiled)

        img = self._vae(run, "decode", fallbacks)
        # ComfyUI's SaveImage truncates: uint8(clip(255 * x))
        return Image.fromarray(np.array((img[0].astype(mx.float32) * 255).astype(mx.uint8)))

    def encode_image(self, pixels: np.ndarray, tiled: bool | None = None, ae=None,
                     fallbacks: list | None = None) -> np.ndarray:  # fmt: skip
        """Pixels [H, W, 3] in [0, 1] -> their latent [1, 16, H/8, W/8], float32: ComfyUI's
        VAEEncode (the posterior's mode), with the Flux latent format applied. `ae`: the
        autoencoder when the caller holds it (several images), else loaded for this one."""
        if ae is None:
            ae = self.load("vae")  # only the encoder is read
        x = mx.array(np.asarray(pixels, dtype=np.float32)[None])
        tiled = self.tiled(x.shape[1], x.shape[2], ae.config, tiled)

        def run(dtype: mx.Dtype) -> mx.array:
            with progress.units(ae.encoder.units):
                return ae.encode(x.astype(dtype), tiled=tiled)

        z = self._vae(run, "encode", [] if fallbacks is None else fallbacks)
        return np.array(z.astype(mx.float32))


def load(model_dir: str | Path, precision: str | None = None, memory_budget=None) -> Pipeline:
    """A pipeline over a converted model folder; lazy: no weights are read until used.

    memory_budget: None or "auto" (the machine's: Metal's recommended working set, elsewhere
    the available memory, less a margin) or GiB; stages whose weights and activations do not
    fit it stream their blocks from the folder (`mlxflux.memory_plan`)."""
    return Pipeline(model_dir, precision, memory_budget)
