"""The staged text-to-image pipeline: each stage loads its weights, runs, and releases them.

    text        tokenize, T5 + CLIP                   -> txt [1, T, 4096], pooled [1, 768]
    modulation  every step's adaLN vectors at once    -> Conditioning (then drop 3.2 B weights)
    denoise     Euler over the transformer trunk      -> latent [1, 16, H/8, W/8]
    decode      VAE (row-tiled when it would not fit) -> image

so the peak is the largest stage, not the sum. Weights are read lazily from the model folder:
nothing is read before its stage. Every stage's output is checked for NaN/inf (an overflow
would otherwise save a black PNG): `NonFiniteError` names the stage and step.
"""

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import NonFiniteError, SettingsError
from .image_inputs import ImageInputs
from .kernels import precision_choice
from .lora import load_loras
from .memory_plan import Plan, make_plan, parse_budget, tensor_bytes
from .models.autoencoder import estimate_decode_bytes
from .models.transformer import (
    Conditioning,
    image_ids,
    is_modulation_key,
    pack_latents,
    unpack_latents,
)
from .noise import comfy_noise
from .report import Report, Stage
from .sampling import euler_step, img2img_sigmas, noise_scaling
from .settings import CHECKED, check_settings
from .tokenizers import CLIPTokenizer, T5Tokenizer
from .variants import ImageConditioning, variant_of
from .weights import (
    DTYPES,
    BlockWeights,
    StreamedBlocks,
    build_component,
    check_folder,
    load_component,
    load_group,
    read_manifest,
)

PRECISIONS = DTYPES  # compute dtypes: the same names as the folder's storage dtypes
DECODE_BUDGET = 2 << 30  # untiled VAE decode above this estimate runs row-tiled


def check_finite(x: mx.array, stage: str, precision: str, step=None, steps=None) -> None:
    """Raise NonFiniteError unless every value of x is finite (one reduction, one sync)."""
    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(stage, step, steps, precision)


def denoise_step(
    model,
    x,
    txt,
    cond: Conditioning,
    rope,
    sigma: float,
    sigma_next: float,
    dtype=None,
    block_weights=None,
    extra: ImageConditioning | None = None,
):
    """One evaluated Euler step of the trunk: x (packed, float32) -> x at sigma_next.

    The trunk runs in `dtype` (default: txt's) and is evaluated after every block, so only one
    block's activations are alive at a time, whatever a backend's command buffers would
    otherwise keep (CUDA held ~10 GiB of finished intermediates at the DVD size).
    `extra`: what the variant's images add to the input (`variants.ImageConditioning`); `rope`
    must cover its tokens too.
    """
    extra = extra or ImageConditioning()
    v = model.trunk(extra.inputs(x), txt, cond, rope, after_block=mx.eval,
                    dtype=dtype or txt.dtype, block_weights=block_weights)  # fmt: skip
    v = extra.velocity(v, x.shape[1])
    x = euler_step(x, v, sigma, sigma_next)
    mx.eval(x)
    return x


class Pipeline:
    def __init__(self, folder: str | Path, precision: str | None = None, memory_budget=None):
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
        self.last_report: Report | None = None

    @property
    def variant(self) -> str:
        """A name of `variants.VARIANTS` (dev, schnell, kontext, canny, depth, fill), recorded
        at conversion (`mlxflux info` shows it)."""
        return self.variant_info.name

    @property
    def model_id(self) -> str:
        return self.manifest.get("id", "")

    # ---- stages ---------------------------------------------------------------------------

    def encode_text(
        self, prompt: str, t5_padding: str, streamed: bool = False, stage: Stage | None = None
    ) -> tuple[mx.array, mx.array]:
        tok = self.folder / "tokenizers"
        t5_ids = T5Tokenizer(tok / "t5" / "spiece.model")(prompt, t5_padding)
        clip_ids = CLIPTokenizer(tok / "clip" / "vocab.json", tok / "clip" / "merges.txt")(prompt)
        t5 = load_component(self.folder, "t5", self.manifest)
        blocks = self._blocks(t5, "t5", t5.block_names(), streamed)
        txt = t5(mx.array([t5_ids]), block_weights=blocks)
        mx.eval(txt)
        check_finite(txt, "text (T5)", self.precision)
        del t5
        clip = load_component(self.folder, "clip", self.manifest)
        _, pooled = clip(mx.array([clip_ids]))
        mx.eval(pooled)
        check_finite(pooled, "text (CLIP)", self.precision)
        del clip
        if stage is not None:
            stage.bytes_read = self._read_bytes(blocks, "t5") + self._group_bytes("clip")
            stage.read_wait_seconds = blocks.wait_seconds
        return txt, pooled

    def _blocks(self, model, name: str, prefixes, streamed: bool, include=None) -> BlockWeights:
        """How a stage gets its blocks' weights: resident, or streamed (the memory plan)."""
        if not streamed:
            return BlockWeights()
        kw = {"include": include} if include else {}
        return StreamedBlocks(model, self.folder, name, self.manifest, prefixes, **kw)

    def _group_bytes(self, name: str, group: str | None = None, include=None) -> int:
        """Bytes of a component's (or a file group's) tensors: what a resident stage reads."""
        entry = self.manifest["components"][name]
        files = set(entry["files"][group]) if group else None
        sizes = tensor_bytes(entry)
        return sum(n for k, n in sizes.items()
                   if (files is None or entry["tensors"][k]["file"] in files)
                   and (include is None or include(k)))  # fmt: skip

    def _read_bytes(self, blocks: BlockWeights, name: str, group=None) -> int:
        if not blocks.streamed:
            return self._group_bytes(name, group)
        streamed = set(blocks.files)
        rest = self._group_bytes(name, group, lambda k: not any(
            k.startswith(p + ".") for p in streamed))  # fmt: skip
        return blocks.bytes_read + rest

    def transformer_with_loras(self, loras, group: str | None = None):
        """The transformer (lazy: nothing read yet) with the LoRAs attached, and their reports.
        Cheap without `group`: the files are read and matched, no weight is loaded."""
        if group is None:
            model = build_component("transformer", self.manifest)
        else:
            model = load_component(self.folder, "transformer", self.manifest, group=group)
        reports = load_loras(model, loras, model.config.hidden_size) if loras else []
        return model, reports

    def modulation(
        self, pooled: mx.array, sigma_list: list[float], guidance: float, loras=()
    ) -> tuple[object, Conditioning]:
        """Every step's adaLN vectors at once; returns the transformer without those weights
        (the LoRAs stay attached to its trunk layers)."""
        steps = len(sigma_list) - 1
        model, _ = self.transformer_with_loras(loras, group="modulation")
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

    def denoise(
        self,
        model,
        cond: Conditioning,
        txt: mx.array,
        noise: np.ndarray,
        sigma_list: list[float],
        on_step: Callable[[int, int], None] | None = None,
        block_weights: BlockWeights | None = None,
        extra: ImageConditioning | None = None,
    ) -> mx.array:
        """Euler over the transformer trunk; the latent [1, 16, H/8, W/8] stays float32.
        `extra`: the variant's image conditioning (Kontext's reference tokens, the control
        or fill channels)."""
        extra = extra or ImageConditioning()
        height, width = noise.shape[2] * 8, noise.shape[3] * 8
        steps = len(sigma_list) - 1
        rope = model.rope(extra.ids_for(image_ids(height, width)), txt.shape[1])
        txt = txt.astype(self.wide_dtype)
        x = pack_latents(mx.array(noise, dtype=mx.float32))
        for i in range(steps):
            sigmas = sigma_list[i : i + 2]
            x = denoise_step(model, x, txt, cond.rows(i, i + 1), rope, *sigmas, dtype=self.dtype,
                             block_weights=block_weights, extra=extra)  # fmt: skip
            check_finite(x, "denoise", self.precision, i + 1, steps)
            if on_step:
                on_step(i + 1, steps)
        return unpack_latents(x, height, width)

    def _vae(self, run: Callable[[mx.Dtype], mx.array], stage: str) -> mx.array:
        """run(dtype), evaluated; in float16, run again in float32 if it overflowed."""
        out = run(self.dtype)
        mx.eval(out)
        if self.dtype == mx.float16 and not mx.all(mx.isfinite(out)).item():
            self.float32_fallbacks.append(stage)
            out = run(mx.float32)
            mx.eval(out)
        check_finite(out, stage, self.precision)
        return out

    def decode(self, ae, latent: mx.array, tiled: bool | None) -> Image.Image:
        h, w = latent.shape[2] * 8, latent.shape[3] * 8
        if tiled is None:
            tiled = estimate_decode_bytes(h, w, ae.config, self.dtype.size) > DECODE_BUDGET
        img = self._vae(lambda d: ae.decode(latent.astype(d), tiled=tiled), "decode")
        # ComfyUI's SaveImage truncates: uint8(clip(255 * x))
        return Image.fromarray(np.array((img[0].astype(mx.float32) * 255).astype(mx.uint8)))

    def encode_image(self, pixels: np.ndarray, tiled: bool | None, ae=None) -> np.ndarray:
        """Pixels [H, W, 3] in [0, 1] -> their latent [1, 16, H/8, W/8], float32: ComfyUI's
        VAEEncode (the posterior's mode), with the Flux latent format applied. `ae`: the
        autoencoder when the caller holds it (several images), else loaded for this one."""
        if ae is None:
            ae = load_component(self.folder, "vae", self.manifest)  # only the encoder is read
        x = mx.array(np.asarray(pixels, dtype=np.float32)[None])
        if tiled is None:
            h, w = x.shape[1], x.shape[2]
            tiled = estimate_decode_bytes(h, w, ae.config, self.dtype.size) > DECODE_BUDGET
        z = self._vae(functools.partial(_encode, ae, x, tiled), "encode")
        return np.array(z.astype(mx.float32))

    # ---- the whole job --------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        scheduler: str = "simple",
        shift: float | str | None = None,
        t5_padding: str = "comfy",
        noise=None,
        init_image=None,
        denoise: float = 1.0,
        loras=(),
        reference_images=(),
        reference_scale: str = "kontext",
        control_image=None,
        preprocess: str = "auto",
        mask=None,
        outpaint: bool = False,
        tiled_decode: bool | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """Text to image, or image to image from `init_image`, staged.

        width/height: 1024, or with an init image its size rounded to multiples of 16, or with
            reference images the first one's size as it is encoded.
        steps/shift/guidance: the model's defaults (`variants.VARIANTS`): FLUX.1-dev 20 steps
            at ComfyUI's fixed shift 1.15, guidance 3.5; FLUX.1 schnell 4 steps at 1.0
            (ComfyUI's schnell sampling; it has no guidance input: `guidance` is ignored);
            FLUX.1 Kontext dev as dev with guidance 2.5 (BFL, ComfyUI's template).
        noise: [1, 16, H/8, W/8], replaces the seeded ComfyUI noise.
        init_image: a PIL image or a path; scaled (Lanczos) to cover width x height and
            centre-cropped. As ComfyUI's LoadImage -> VAEEncode -> KSampler(denoise): the
            schedule of int(steps / denoise) steps, its last steps + 1 sigmas kept, starting
            from sigma0 * noise + (1 - sigma0) * latent (`sampling.img2img_sigmas`,
            `sampling.noise_scaling`). denoise 1 gives the text-to-image picture.
        loras: [(path, scale), ...]: LoRA files for the transformer, stacked (`mlxflux.lora`);
            `last_report.settings["loras"]` says what each one matched.
        reference_images: PIL images or paths, for FLUX.1 Kontext models: VAE-encoded and
            appended to the image tokens (`variants.reference_tokens`), scaled by
            `reference_scale`: "kontext", ComfyUI's FluxKontextImageScale (the preferred
            Kontext resolution of the nearest aspect ratio); "none", their own size floored
            to multiples of 16 (diffusers with `_auto_resize=False`).
        control_image: FLUX.1 Canny/Depth models: the picture whose composition is kept,
            scaled to cover the size; `preprocess` "auto" draws its edges for Canny models
            (ComfyUI's Canny node, `mlxflux.preprocess`) and takes it as it is for Depth
            models (a depth map made elsewhere); "canny" or "none" say which.
        mask: FLUX.1 Fill models: white repaints, black keeps, on `init_image` (its size or
            its aspect ratio). `outpaint`: instead, `init_image` centred on the width x height
            canvas and the rest repainted (ComfyUI's ImagePadForOutpaint, feathering 40).
            As diffusers' FluxFillPipeline, the whole picture comes from the model.
        """
        kw = dict(width=width, height=height, steps=steps, guidance=guidance,
                  scheduler=scheduler, shift=shift, t5_padding=t5_padding, init_image=init_image,
                  denoise=denoise, loras=loras, reference_images=reference_images,
                  reference_scale=reference_scale, control_image=control_image,
                  preprocess=preprocess, mask=mask, outpaint=outpaint,
                  tiled_decode=tiled_decode)  # fmt: skip
        job = self._prepare(prompt, [seed], noise=noise, **kw)
        ((_, image),) = self._run(job, on_step=on_step and (lambda _, i, n: on_step(i, n)))
        return image

    def generate_many(
        self,
        prompt: str,
        seeds,
        *,
        on_step: Callable[[int, int, int], None] | None = None,
        **kw,
    ) -> Iterator[tuple[int, Image.Image]]:
        """An iterator of (seed, image), each image as `generate` makes it, yielded once decoded.

        The prompt is encoded once and each stage's weights load once: every seed is denoised
        (latents are small), then the VAE decodes them in turn, so the peak stays the
        single-image peak. `on_step(index, step, steps)`. Ctrl-C while denoising stops after
        the current step; the seeds already denoised are still decoded and yielded, then
        KeyboardInterrupt is raised again. `last_report` gains `images`: per-seed seconds.
        """
        kw = {**GENERATE_DEFAULTS, **kw}
        unknown = set(kw) - set(GENERATE_DEFAULTS)
        if unknown:
            raise TypeError(f"generate_many() got unexpected arguments: {sorted(unknown)}")
        # checked here, at the call, before any stage: the iterator runs the stages
        return self._run(self._prepare(prompt, list(seeds), **kw), on_step=on_step)

    def _prepare(self, prompt: str, seeds: list[int], *, noise=None, **kw) -> "Job":
        for name, value in self.defaults.items():
            if kw[name] is None:
                kw[name] = value
        inputs = ImageInputs.open(self.variant_info, kw)
        width, height = kw["width"], kw["height"]
        if width is None and height is None:
            width, height = inputs.default_size() or (None, None)
        kw["width"], kw["height"] = width or 1024, height or 1024
        check_settings(**{k: kw[k] for k in CHECKED})
        inputs.check_size(kw["width"], kw["height"])
        if not seeds:
            raise SettingsError("give at least one seed", "seeds")
        shape = (1, 16, kw["height"] // 8, kw["width"] // 8)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != shape:
                raise SettingsError(f"must have shape {shape}, got {noise.shape}", "noise")
        sigma_list = img2img_sigmas(
            kw["scheduler"], kw["steps"], kw["denoise"], width=kw["width"],
            height=kw["height"], shift=kw["shift"],
        )  # fmt: skip
        settings = dict(
            prompt=prompt, **{k: kw[k] for k in CHECKED if k != "denoise"}, sampler="euler",
            cfg=1.0, precision=self.precision, precision_why=self.precision_why,
            model=self.model_name, model_id=self.model_id,
            noise="given" if noise is not None else "comfy",
        )  # fmt: skip
        if len(seeds) == 1:
            settings["seed"] = seeds[0]
        else:
            settings["seeds"] = seeds
        if inputs.init is not None:
            settings.update(init_image=inputs.init.name, init_image_sha256=inputs.init.sha256,
                            denoise=kw["denoise"])  # fmt: skip
        settings.update(inputs.settings())
        if kw["loras"]:  # read and matched now, so a bad file fails before any stage
            _, lora_reports = self.transformer_with_loras(kw["loras"])
            settings["loras"] = [
                {"file": r.file, "sha256": r.sha256, "scale": r.scale, "layers": r.layers,
                 "not_applied": r.skipped, "unmatched": r.unmatched}
                for r in lora_reports
            ]  # fmt: skip
        # the memory plan: which stages stream; refused here when even streaming cannot fit
        plan = make_plan(self.manifest, kw["width"], kw["height"], self.dtype.size,
                         self.memory_budget, steps=len(sigma_list) - 1,
                         extra_tokens=inputs.extra_tokens)  # fmt: skip
        settings["memory_plan"] = plan.describe()
        report = Report(settings=settings, plan=plan.kind)
        self.last_report = report  # checked: what will run, before anything runs
        return Job(prompt, seeds, noise, shape, sigma_list, inputs, kw, report, plan)

    def _run(self, job: "Job", on_step=None) -> Iterator[tuple[int, Image.Image]]:
        report, kw, sigma_list = job.report, job.kw, job.sigma_list
        self.last_report = report
        # float16: the blocks and VAE stages that overflowed it and ran again in float32
        self.float32_fallbacks = report.settings.setdefault("float32_fallbacks", [])
        plan = job.plan
        report.plan = plan.kind
        with Stage(report, "text") as stage:
            txt, pooled = self.encode_text(
                job.prompt, kw["t5_padding"], "text" in plan.streamed, stage
            )
        latent, extra = None, ImageConditioning()
        if job.inputs.encodes:
            with Stage(report, "encode"):
                ae = load_component(self.folder, "vae", self.manifest)  # the encoder is read
                encode = functools.partial(self.encode_image, tiled=kw["tiled_decode"], ae=ae)
                # the init latent: image to image, and Fill below denoise 1 (from noise above)
                init_latent = not job.inputs.variant.fill or kw["denoise"] < 1
                latent, extra = job.inputs.encode(encode, kw["width"], kw["height"], init_latent)
                del ae, encode
        with Stage(report, "modulation") as stage:
            model, cond = self.modulation(pooled, sigma_list, kw["guidance"], kw["loras"])
            stage.bytes_read = self._group_bytes("transformer", "modulation")
            del pooled
        done, interrupted = [], None
        with Stage(report, "denoise") as stage:
            load_group(model, self.folder, "transformer", self.manifest, "trunk")
            blocks = self._blocks(model, "transformer", model.block_names(),
                                  "denoise" in plan.streamed, trunk_key)  # fmt: skip
            for index, seed in enumerate(job.seeds):
                noise = job.noise if job.noise is not None else comfy_noise(seed, job.shape)
                if latent is not None:
                    noise = noise_scaling(sigma_list[0], noise, latent)
                start = time.perf_counter()
                steps = on_step and (lambda i, n, index=index: on_step(index, i, n))
                try:
                    done.append((seed, self.denoise(model, cond, txt, noise, sigma_list, steps,
                                                    blocks, extra)))  # fmt: skip
                except KeyboardInterrupt as e:  # between steps: keep what is finished
                    interrupted = e
                    break
                report.images.append({"seed": seed, "denoise_seconds": _since(start)})
            blocks.done()
            stage.bytes_read = self._read_bytes(blocks, "transformer", "trunk")
            stage.read_wait_seconds = blocks.wait_seconds
            self.float32_fallbacks.extend(sorted(model.float32_blocks))
            del model, cond, txt, blocks, extra
        if done:
            with Stage(report, "decode") as stage:
                ae = load_component(self.folder, "vae", self.manifest)
                stage.bytes_read = self._group_bytes("vae")
                for (seed, x), entry in zip(done, report.images, strict=False):
                    start = time.perf_counter()
                    image = self.decode(ae, x, kw["tiled_decode"])
                    entry["decode_seconds"] = _since(start)
                    yield seed, image
                del ae, done
        if interrupted is not None:
            raise interrupted


# generate()'s keyword defaults but seed, noise and on_step: what generate_many accepts too
GENERATE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(Pipeline.generate).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in ("seed", "noise", "on_step")
}


@dataclass
class Job:
    """One generation request, checked: what `_run` needs for every seed."""

    prompt: str
    seeds: list[int]
    noise: np.ndarray | None
    shape: tuple[int, ...]
    sigma_list: list[float]
    inputs: ImageInputs
    kw: dict
    report: Report
    plan: Plan


def _encode(ae, x: mx.array, tiled: bool, dtype: mx.Dtype) -> mx.array:
    return ae.encode(x.astype(dtype), tiled=tiled)


def trunk_key(key: str) -> bool:
    """The transformer's keys the denoise stage reads (the modulation stage read the rest)."""
    return not is_modulation_key(key)


def _since(start: float) -> float:
    return time.perf_counter() - start


def load(model_dir: str | Path, precision: str | None = None, memory_budget=None) -> Pipeline:
    """A pipeline over a converted model folder; lazy: no weights are read until used.

    memory_budget: None or "auto" (the machine's: Metal's recommended working set, elsewhere
    the available memory, less a margin) or GiB; stages whose weights and activations do not
    fit it stream their blocks from the folder (`mlxflux.memory_plan`)."""
    return Pipeline(model_dir, precision, memory_budget)
