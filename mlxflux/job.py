"""A generation job: one request, prepared once, run once, with its own report.

`prepare` does everything that can be refused before a stage runs: the model's defaults, the
inputs opened and checked against the variant (they were opened once, by the request), each
LoRA read once and matched, the schedule and the memory plan. What it makes is host-side data
(PIL images, numpy arrays): a web server prepares a job on the thread that took the request and
runs it on its worker. `Job.run` is the stages, for every seed, on the pipeline's model.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from .cache import EasyCache, FirstBlock
from .errors import SettingsError, check_finite
from .lora import LoraSet, layer_shapes, read_loras
from .memory_plan import Plan, make_plan
from .models.transformer import is_modulation_key
from .noise import comfy_noise
from .pixels import cover, size_of, unit_pixels
from .preview import Previewer
from .report import Report, Stage
from .request import DEFAULT_SIZE, GenerationRequest
from .sampling import auto_shift, img2img_sigmas, noise_scaling
from .variants import Conditioning, Inputs, open_inputs


@dataclass
class Trunk:
    """What the denoise stage's steps use (`Job.transformer_stages`)."""

    model: object  # the transformer, every weight in place or its blocks streamed
    cond: object  # the modulation vectors of every step
    blocks: object = None  # the blocks' weights (`Pipeline.blocks`)


@dataclass
class Job:
    """A checked request and what its stages need for every seed."""

    pipe: object  # the `Pipeline` it runs on
    request: GenerationRequest  # with the model's defaults applied
    width: int
    height: int
    sigma_list: list[float]
    inputs: Inputs  # the variant family's inputs
    loras: LoraSet
    plan: Plan
    report: Report
    preview: str = "none"  # the previewer on_preview gets: latent2rgb, taef1 or none

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, 16, self.height // 8, self.width // 8)

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.request.seeds

    def run(self, on_step: Callable[[int, int, int], None] | None = None,
            on_preview: Callable | None = None) -> Iterator[tuple[int, Image.Image]]:  # fmt: skip
        """An iterator of (seed, image), each yielded once decoded.

        The prompt is encoded once and each stage's weights load once: every seed is denoised
        (latents are small), then the VAE decodes them in turn, so the peak stays the
        single-image peak. `on_step(index, step, steps)`; `on_preview(index, step, steps,
        picture)` with the picture forming (`mlxflux.preview`; the result is the same with or
        without it). Ctrl-C while denoising stops after the current step; the seeds already
        denoised are still decoded and yielded, then KeyboardInterrupt is raised again. The
        report gains `images`: per-seed seconds."""
        pipe, request, report = self.pipe, self.request, self.report
        # float16: the blocks and VAE stages that overflowed it and ran again in float32
        fallbacks = report.settings.setdefault("float32_fallbacks", [])
        redux = Conditioning()
        if request.redux_images:
            with Stage(report, "vision") as stage:
                redux = self._vision(stage)
        txt, pooled = self.text_stage()
        latent, extra = None, Conditioning()
        if request.init_image is not None or self.inputs.encodes:
            with Stage(report, "encode"):
                latent, extra = self._encode(fallbacks)
        extra = extra + redux  # the Redux tokens join the prompt's
        done, interrupted = [], None
        with self.transformer_stages(pooled, fallbacks) as trunk:
            del pooled
            previewer = self._previewer() if on_preview is not None else None
            for index, seed in enumerate(request.seeds):
                noise = request.noise
                if noise is None:
                    noise = comfy_noise(seed, self.shape)
                if latent is not None:
                    noise = noise_scaling(self.sigma_list[0], noise, latent)
                start = time.perf_counter()
                steps = on_step and (lambda i, n, index=index: on_step(index, i, n))
                cache = self.new_cache()  # its state is this seed's
                on_x0 = previewer and (lambda i, n, x0, index=index, p=previewer: on_preview(
                    index, i, n, p(x0)))  # fmt: skip
                try:
                    latent_out = pipe.denoise(trunk.model, trunk.cond, txt, noise,
                                              self.sigma_list, steps, trunk.blocks, extra,
                                              cache, on_x0)  # fmt: skip
                    done.append((seed, latent_out))
                except KeyboardInterrupt as e:  # between steps: keep what is finished
                    interrupted = e
                    break
                report.images.append({"seed": seed, "denoise_seconds": _since(start)})
                if cache is not None:
                    report.record_cache(vars(cache.counts))
            del txt, extra, previewer
        if done:
            with Stage(report, "decode") as stage:
                ae = pipe.load("vae")
                stage.bytes_read = pipe.group_bytes("vae")
                for (seed, x), entry in zip(done, report.images, strict=False):
                    start = time.perf_counter()
                    image = pipe.decode(ae, x, request.tiled_decode, fallbacks)
                    entry["decode_seconds"] = _since(start)
                    yield seed, image
                del ae, done
        if interrupted is not None:
            raise interrupted

    def text_stage(self) -> tuple[mx.array, mx.array]:
        """The text stage: the prompt's (T5 tokens, CLIP's pooled vector)."""
        pipe, request = self.pipe, self.request
        with Stage(self.report, "text") as stage:
            return pipe.encode_text(request.prompt, request.t5_padding,
                                    "text" in self.plan.streamed, stage,
                                    request.prompt_syntax, self.loras)  # fmt: skip

    @contextmanager
    def transformer_stages(self, pooled: mx.array, fallbacks: list) -> Iterator["Trunk"]:
        """The modulation stage, then the denoise stage around the caller's steps: yields a
        `Trunk` (the whole transformer, the schedule's modulation vectors, its blocks' weights,
        resident or streamed). After the steps it records what was read and which blocks fell
        back to float32, and lets go of all three before the stage's memory is measured (the
        caller keeps no reference of its own)."""
        pipe = self.pipe
        with Stage(self.report, "modulation") as stage:
            model, cond = pipe.modulation(pooled, self.sigma_list, self.request.guidance,
                                          self.loras)  # fmt: skip
            stage.bytes_read = pipe.group_bytes("transformer", "modulation")
        with Stage(self.report, "denoise") as stage:
            trunk = Trunk(_load_trunk(pipe, model), cond)
            del model, cond
            trunk.blocks = pipe.blocks(trunk.model, "transformer", trunk.model.block_names(),
                                       "denoise" in self.plan.streamed, _trunk_key)  # fmt: skip
            yield trunk
            trunk.blocks.done()
            stage.bytes_read = pipe.read_bytes(trunk.blocks, "transformer", "trunk")
            stage.read_wait_seconds = trunk.blocks.wait_seconds
            fallbacks.extend(sorted(trunk.model.float32_blocks))
            trunk.model = trunk.cond = trunk.blocks = None

    def _vision(self, stage) -> Conditioning:
        """The vision stage: each Redux image's tokens (SigLIP, then Redux's projection), as
        the text-side conditioning StyleModelApply makes; the encoder is released after."""
        from . import progress
        from .redux import conditioning, encode

        request, pipe = self.request, self.pipe
        encoder = pipe.load("redux")
        layers = encoder.config.num_hidden_layers
        pictures = [p for p, _ in request.redux_images]
        with progress.units(layers * len(pictures)):
            tokens = encode(encoder, pictures, request.redux_crop, progress.advance)
        for t in tokens:
            check_finite(t, "vision (Redux)", pipe.precision)
        stage.bytes_read = pipe.group_bytes("redux")
        del encoder
        strengths = [s for _, s in request.redux_images]
        return conditioning(tokens, strengths, request.redux_strength_type)

    def _previewer(self) -> Previewer | None:
        """The previewer of `preview` (its tiny decoder loaded now, in the denoise stage)."""
        if self.preview == "none":
            return None
        decoder = None
        if self.preview == "taef1":
            decoder = self.pipe.load("taef1")
            mx.eval(decoder.parameters())
        return Previewer(self.preview, decoder)

    def new_cache(self):
        """A fresh step cache for one seed (`mlxflux.cache`), or None."""
        method, threshold, span = self.request.caching
        if method == "easycache":
            shift = self.request.shift
            if shift == "auto":
                shift = auto_shift(self.width, self.height)
            return EasyCache(threshold, *span, shift, self.height, self.width)
        return FirstBlock(threshold) if method == "first-block" else None

    def _encode(self, fallbacks: list) -> tuple[np.ndarray | None, Conditioning]:
        """The encode stage: (the init latent or None, the inputs' conditioning)."""
        pipe, request = self.pipe, self.request
        ae = pipe.load("vae")  # only the encoder is read

        def encode(pixels: np.ndarray) -> np.ndarray:
            return pipe.encode_image(pixels, request.tiled_decode, ae, fallbacks)

        family, w, h = pipe.variant_info.family, self.width, self.height
        latent = None
        # the init latent: image to image; Fill's picture only below denoise 1 (above: noise)
        if request.init_image is not None and (not family.takes_init_image or request.denoise < 1):
            pixels = self.inputs.init_pixels(w, h)
            if pixels is None:
                pixels = unit_pixels(cover(request.init_image.image, w, h))
            latent = encode(pixels)
        return latent, self.inputs.encode(encode, w, h)


def _load_trunk(pipe, model):
    from .models.registry import load_group

    return load_group(model, pipe.folder, "transformer", pipe.manifest, "trunk")


def _trunk_key(key: str) -> bool:
    """The transformer's keys the denoise stage reads (the modulation stage read the rest)."""
    return not is_modulation_key(key)


def _since(start: float) -> float:
    return time.perf_counter() - start


def prepare(pipe, request: GenerationRequest) -> Job:
    """A job for `request` on `pipe` (see the module's docstring); SettingsError (or LoraError)
    in one line when it cannot run, before any stage."""
    variant = pipe.variant_info
    request = request.for_model(variant)
    inputs = open_inputs(variant, request)
    width, height = request.width, request.height
    if width is None and height is None:
        width, height = _default_size(request, inputs) or (None, None)
    width, height = width or DEFAULT_SIZE, height or DEFAULT_SIZE
    inputs.check_size(width, height)
    shape = (1, 16, height // 8, width // 8)
    if request.noise is not None and request.noise.shape != shape:
        raise SettingsError(f"must have shape {shape}, got {request.noise.shape}", "noise")
    sigma_list = img2img_sigmas(request.scheduler, request.steps, request.denoise, width=width,
                                height=height, shift=request.shift)  # fmt: skip
    settings = dict(
        prompt=request.prompt, width=width, height=height, steps=request.steps,
        guidance=request.guidance, shift=request.shift, scheduler=request.scheduler,
        t5_padding=request.t5_padding, prompt_syntax=request.prompt_syntax, sampler="euler",
        cfg=1.0, precision=pipe.precision, precision_why=pipe.precision_why,
        model=pipe.model_name, model_id=pipe.model_id,
        noise="given" if request.noise is not None else "comfy",
    )  # fmt: skip
    if len(request.seeds) == 1:
        settings["seed"] = request.seeds[0]
    else:
        settings["seeds"] = list(request.seeds)
    init = request.init_image
    if init is not None:
        settings.update(init_image=init.name, init_image_sha256=init.sha256,
                        denoise=request.denoise)  # fmt: skip
    settings.update(inputs.record())
    if request.redux_images:
        if "redux" not in pipe.manifest["components"]:
            raise SettingsError(
                "this model folder has no Redux: add it with `mlxflux convert --redux "
                "flux1-redux-dev.safetensors --siglip sigclip_vision_patch14_384.safetensors "
                "--out FOLDER`", "redux_images")  # fmt: skip
        settings.update(redux_images=[dict(p.record(), strength=s) for p, s in
                                      request.redux_images],
                        redux_strength_type=request.redux_strength_type,
                        redux_crop=request.redux_crop)  # fmt: skip
    loras = LoraSet()
    if request.loras:  # read once and matched now, so a bad file fails before any stage
        flux = pipe.manifest["components"]["transformer"]
        shapes = layer_shapes(flux, pipe.manifest["quantization"]["bits"])
        bits = pipe.manifest["quantization"]["bits"]
        text = {c: layer_shapes(pipe.manifest["components"][c], bits) for c in ("clip", "t5")}
        loras = read_loras(request.loras, shapes, flux["config"]["hidden_size"], text)
        settings["loras"] = [r.record() for r in loras.reports]
    # the memory plan: which stages stream; refused here when even streaming cannot fit
    preview = request.preview
    has_taef1 = "taef1" in pipe.manifest["components"]
    if preview == "auto":
        preview = "taef1" if has_taef1 else "latent2rgb"
    if preview == "taef1" and not has_taef1:
        raise SettingsError(
            "taef1: this model folder has no tiny decoder; add it with `mlxflux convert "
            "--taef1 madebyollin/taef1 --out FOLDER` (or ComfyUI's taef1_decoder file)",
            "preview",
        )
    method, threshold, span = request.caching
    if method != "none":
        settings.update(cache=method, cache_threshold=threshold,
                        cache_range=list(span) if span else None)  # fmt: skip
    plan = make_plan(pipe.manifest, width, height, pipe.dtype.size, pipe.memory_budget,
                     steps=len(sigma_list) - 1, extra_tokens=inputs.extra_tokens,
                     cache=method, preview=preview, lora_bytes=loras.resident_bytes,
                     redux_images=len(request.redux_images))  # fmt: skip
    settings["memory_plan"] = plan.describe()
    report = Report(settings=settings, plan=plan.kind)
    return Job(pipe, request, width, height, sigma_list, inputs, loras, plan, report, preview)


def _default_size(request: GenerationRequest, inputs: Inputs) -> tuple[int, int] | None:
    """The output size when none is given: the init image's (rounded to multiples of 16),
    else what the variant's inputs say (the control image's, the first reference's)."""
    if request.init_image is not None:
        return size_of(request.init_image.image)
    return inputs.default_size()
