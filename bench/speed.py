"""Per denoising step: mlxflux against diffusers (torch) on the same random weights.

    python bench/speed.py                      # full width, 1+1 blocks, all preset sizes
    python bench/speed.py --depth 19 --single 38 --torch-device mps   # the full model, on a Mac
    python bench/speed.py --sizes book --breakdown --bits none,8      # where a step's time goes
    python bench/speed.py --sizes dvd --kontext   # FLUX.1 Kontext: + one reference's tokens

Measures the first step (kernel compilation included) and the steady state (warm-up, then
--iters rounds in which each implementation runs one step, in rotated order; median and spread)
at each resolution, for mlxflux in each --precision and --bits (kernels as MLXFLUX_KERNELS picks
them), diffusers' FluxTransformer2DModel on --torch-device in --torch-dtype, and mflux's
transformer when `import mflux` works. Reports each as a ratio to torch and each quantized model
as a ratio to the same precision unquantized (medians of the ratios within a round: a shared
host's drift cancels), and achieved TFLOP/s against this backend's measured matmul ceiling.
On Linux preload OpenBLAS first (README). Writes JSON and a Markdown table.
"""

import argparse
import functools
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxflux import kernels

SIZES = {"256": (256, 256), "book": (896, 1152), "vinyl": (1024, 1024), "dvd": (832, 1216)}
TXT = 256  # ComfyUI pads T5 to 256 tokens


def flops_per_step(cfg, n_img: int, n_txt: int = TXT) -> float:
    """Matmul FLOPs of one trunk step (docs/numerics.md's formula, any depth)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    n = n_img + n_txt
    double = 2 * (3 * d * d + d * d + 2 * d * m)  # img + txt streams, per token
    single = 3 * d * d + d * m + (d + m) * d
    weights = 2 * n * (cfg.depth * double / 2 + cfg.depth_single_blocks * single)
    attention = 4 * n * n * d * (cfg.depth + cfg.depth_single_blocks)
    return weights + attention


def matmul_ceiling(torch_device: str) -> dict:
    """GFLOP/s of a 4096x3072 @ 3072x12288 fp32 matmul in MLX and in torch."""
    a, b = mx.random.normal((4096, 3072)), mx.random.normal((3072, 12288))
    mx.eval(a, b)
    out = {}
    for _ in range(2):
        t = time.perf_counter()
        mx.eval(a @ b)
        out["mlx_gflops"] = 2 * 4096 * 3072 * 12288 / (time.perf_counter() - t) / 1e9
    import torch

    ta, tb = (
        torch.randn(4096, 3072, device=torch_device),
        torch.randn(3072, 12288, device=torch_device),
    )
    for _ in range(2):
        t = time.perf_counter()
        (ta @ tb).sum().item()
        out["torch_gflops"] = 2 * 4096 * 3072 * 12288 / (time.perf_counter() - t) / 1e9
    return out


def timed(steps: dict, warmup: int, rounds: int) -> dict:
    """Each implementation's first call alone (it includes kernel compilation: ~95 s for MLX's
    quantized kernels on CUDA the first time), its warm-up, then `rounds` rounds in which every
    implementation runs one step, in an order rotated each round. The machine's drift (other
    tenants of a shared host, clocks) then falls on all of them alike: each ratio is the median
    of the ratios within a round (`paired`), not a ratio of medians taken minutes apart."""
    first = {}
    for name, fn in steps.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
        for _ in range(warmup - 1):
            fn()
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    return {
        n: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "runs": len(ts),
            "first_s": first[n],
            "times_s": ts,
        }
        for n, ts in times.items()
    }


def paired(a: dict, b: dict) -> float:
    """The median over rounds of a's step time over b's in the same round."""
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"], strict=True))


# torch ops by kind, by their own (self) time: what the profiler does not name here is
# elementwise work (gelu, layer_norm, mul, add, ...)
TORCH_MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"}
TORCH_MOVES = {"aten::cat", "aten::copy_", "aten::clone", "aten::contiguous", "aten::stack",
               "aten::index", "aten::empty_like", "aten::empty", "aten::zeros", "aten::to",
               "aten::_to_copy", "aten::unbind", "aten::split", "aten::chunk"}  # fmt: skip
KINDS = ("matmul", "attention", "elementwise", "data movement + other")


def torch_kind(name: str) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in TORCH_MATMUL:
        return "matmul"
    return "data movement + other" if name in TORCH_MOVES else "elementwise"


def breakdown_torch(ref, h: int, w: int, args) -> dict:
    """One profiled diffusers step: seconds per kind (torch.profiler's self CPU times)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    inputs = torch_inputs(ref, h, w, args)
    with torch.no_grad():
        ref(**inputs, return_dict=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            ref(**inputs, return_dict=False)[0].sum().item()
            total = time.perf_counter() - start
    kinds = dict.fromkeys(KINDS, 0.0)
    for e in prof.key_averages():
        kinds[torch_kind(e.key)] += e.self_cpu_time_total / 1e6
    return {"total_s": total, **kinds}


def breakdown_mlx(model, dtype, h: int, w: int, args) -> dict:
    """One profiled mlxflux step: seconds per kind (Kernels.profiling), the rest is data
    movement (concatenations, layout copies) and the Euler update."""
    step = mlx_step(model, dtype, h, w, args.kontext)
    step()  # warm-up (and the JIT's first compilation)
    with model.kernels.profiling() as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    kinds = {k: prof.get(k, 0.0) for k in KINDS[:3]}
    kinds[KINDS[3]] = total - sum(kinds.values())
    return {"total_s": total, **kinds}


def build_reference(args):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    heads = args.width // 128
    return FluxTransformer2DModel(
        num_layers=args.depth,
        num_single_layers=args.single,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
    ).eval()


def mlx_from_reference(ref, precision: str, bits: int | None):
    from mlxflux.convert.infer import flux_config_from_diffusers
    from mlxflux.convert.keymaps import assemble, diffusers_transformer
    from mlxflux.models.registry import check_weights
    from mlxflux.models.transformer import FluxTransformer
    from mlxflux.quant import quantize

    guards = precision != "float16-unguarded"
    precision = precision.removesuffix("-unguarded")
    items = ((k, mx.array(v.detach().float().numpy())) for k, v in ref.state_dict().items())
    weights = dict(assemble(items, diffusers_transformer, "reference"))
    model = FluxTransformer(flux_config_from_diffusers(dict(ref.config)))
    check_weights(dict(tree_flatten(model.parameters())), weights, "reference")
    model.load_weights(list(weights.items()), strict=True)
    model.float16_guards = guards
    dtype = getattr(mx, precision)
    if precision != "float32":
        model.set_dtype(dtype)
    if bits:
        quantize(model, bits, model.kernels)
    mx.eval(model.parameters())
    return model, dtype


def kontext_reference(h: int, w: int):
    """A Kontext reference's tokens and ids for an h x w output: one picture at the Kontext
    resolution of the same aspect ratio (ComfyUI's FluxKontextImageScale), random latents."""
    from mlxflux.variants.kontext import reference_size, reference_tokens

    rw, rh = reference_size(w, h, "kontext")
    return reference_tokens([mx.random.normal((1, 16, rh // 8, rw // 8))])


def mlx_step(model, dtype, h: int, w: int, kontext: bool = False):
    """The pipeline's own step on random inputs: the trunk evaluated block by block, then the
    Euler update (with a Kontext reference's tokens appended when `kontext`)."""
    from mlxflux.models.latents import image_ids
    from mlxflux.pipeline import denoise_step
    from mlxflux.variants.kontext import reference_tokens

    n_img = (h // 16) * (w // 16)
    guarded = dtype == mx.float16 and model.float16_guards
    wide = mx.float32 if guarded else dtype  # as Pipeline.wide_dtype
    img = mx.random.normal((1, n_img, 64))  # the pipeline's float32 latent
    txt = mx.random.normal((1, TXT, 4096)).astype(wide)
    cond = model.modulation(
        mx.array([0.7]), mx.random.normal((1, 768)).astype(wide), mx.array([3.5])
    )
    extra = kontext_reference(h, w) if kontext else reference_tokens([])
    rope = model.rope(extra.ids_for(image_ids(h, w)), TXT)
    mx.eval(img, txt, cond.arrays(), rope, *([extra.tokens] if kontext else []))
    return lambda: denoise_step(model, img, txt, cond, rope, 0.7, 0.6, dtype=dtype, extra=extra)


def torch_inputs(ref, h: int, w: int, args) -> dict:
    """Random inputs for diffusers' transformer (moved to --torch-device and --torch-dtype)."""
    import torch

    from mlxflux.models.latents import image_ids

    dev, dtype = args.torch_device, getattr(torch, args.torch_dtype)
    ref.to(dev, dtype)
    n_img = (h // 16) * (w // 16)
    ids = image_ids(h, w)
    if args.kontext:  # the reference's tokens appended, as FluxKontextPipeline runs
        extra = kontext_reference(h, w)
        n_img, ids = n_img + extra.extra_tokens, extra.ids_for(ids)
    return dict(
        hidden_states=torch.randn(1, n_img, 64, device=dev, dtype=dtype),
        encoder_hidden_states=torch.randn(1, TXT, 4096, device=dev, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device=dev, dtype=dtype),
        timestep=torch.tensor([0.7], device=dev, dtype=dtype),
        img_ids=torch.from_numpy(ids).float().to(dev),
        txt_ids=torch.zeros(TXT, 3, device=dev),
        guidance=torch.tensor([3.5], device=dev, dtype=dtype),
    )


def torch_step(ref, h: int, w: int, args):
    import torch

    inputs = torch_inputs(ref, h, w, args)

    def step():
        with torch.no_grad():
            out = ref(**inputs, return_dict=False)[0]
        out.sum().item()  # synchronize

    return step


def build_mflux(ref):
    """mflux's FLUX.1 transformer holding the reference's weights (diffusers names, except its
    feed-forward layers), or a string saying why not."""
    try:
        from mflux.models.common.config.model_config import ModelConfig
        from mflux.models.flux.model.flux_transformer.transformer import Transformer
    except ImportError as e:
        return f"mflux not importable ({e.name})"
    if ref.config.num_attention_heads * 128 != 3072:
        return "mflux's transformer is hard-wired to width 3072"
    model = Transformer(
        ModelConfig.dev(),
        num_transformer_blocks=ref.config.num_layers,
        num_single_transformer_blocks=ref.config.num_single_layers,
    )
    rename = (("ff.net.0.proj.", "ff.linear1."), ("ff.net.2.", "ff.linear2."),
              ("ff_context.net.0.proj.", "ff_context.linear1."),
              ("ff_context.net.2.", "ff_context.linear2."))  # fmt: skip
    weights = []
    for k, v in ref.state_dict().items():
        for a, b in rename:
            k = k.replace(a, b)
        weights.append((k, mx.array(v.detach().float().numpy())))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def mflux_step(model, h: int, w: int):
    class Scheduler:
        sigmas = mx.array([0.7, 0.0])

    class Config:  # the attributes mflux's Transformer reads from its run config
        scheduler, num_train_steps, precision, guidance = Scheduler(), 1000, mx.float32, 3.5
        height, width = h, w

    n_img = (h // 16) * (w // 16)
    img, txt = mx.random.normal((1, n_img, 64)), mx.random.normal((1, TXT, 4096))
    pooled = mx.random.normal((1, 768))
    mx.eval(img, txt, pooled)
    return lambda: mx.eval(model(0, Config(), img, txt, pooled))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--width", type=int, default=3072, help="hidden size (FLUX.1-dev: 3072)")
    p.add_argument("--sizes", default="256,book,vinyl,dvd", help=f"from {sorted(SIZES)}")
    p.add_argument(
        "--precisions",
        default="float32",
        help="comma list: float32,bfloat16,float16,float16-unguarded (float16 with its float32 "
        "streams and overflow checks off: what the guards cost)",
    )
    p.add_argument("--bits", default="none,8", help="comma list of none,4,6,8")
    p.add_argument("--torch-device", default="cpu", help="cpu, mps or cuda")
    p.add_argument(
        "--torch-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="diffusers' dtype: compare like with like (GPUs: bfloat16)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of timing steps, profile one step of each: seconds in matmuls, "
        "attention, elementwise kernels and the rest, for mlxflux and torch",
    )
    p.add_argument(
        "--kontext",
        action="store_true",
        help="FLUX.1 Kontext: append one reference's tokens (~2x the image tokens)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="hold and time one implementation at a time (for models too large to hold "
        "together, e.g. the full model on a Mac); the default runs them round by round",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--iters", type=int, default=5, help="rounds: every implementation one step each"
    )
    p.add_argument("--out", default="bench/results/speed")
    args = p.parse_args()

    import torch

    torch.set_grad_enabled(False)
    ref = build_reference(args)
    from mlxflux.convert.infer import flux_config_from_diffusers

    cfg = flux_config_from_diffusers(dict(ref.config))
    ceiling = matmul_ceiling(args.torch_device)
    print(f"matmul ceiling (fp32 GFLOP/s): {ceiling}", flush=True)
    mode = kernels.choose().mode  # what the models built below run (MLXFLUX_KERNELS)
    variants = [
        (prec, None if b == "none" else int(b))
        for prec in args.precisions.split(",")
        for b in args.bits.split(",")
    ]
    if args.breakdown:
        return run_breakdown(ref, variants, args)
    mflux = build_mflux(ref)
    impls = {
        f"mlxflux {prec}" + (f" {bits}-bit" if bits else "") + f" ({mode})": (prec, bits)
        for prec, bits in variants
    }
    held = {} if args.sequential else {n: mlx_from_reference(ref, *v) for n, v in impls.items()}
    rows = []
    for size in args.sizes.split(","):
        h, w = SIZES[size]
        n_img = (h // 16) * (w // 16)
        if args.kontext:
            n_img += kontext_reference(h, w).extra_tokens
            size = f"{size} + Kontext reference"
        flops = flops_per_step(cfg, n_img)
        torch_name = f"torch {args.torch_device} {args.torch_dtype}"

        def mlx(name: str, h=h, w=w):
            prec, bits = impls[name]
            model, dtype = held.get(name) or mlx_from_reference(ref, prec, bits)
            return mlx_step(model, dtype, h, w, args.kontext)

        makers = {torch_name: lambda h=h, w=w: torch_step(ref, h, w, args)}
        makers.update({n: functools.partial(mlx, n) for n in impls})
        if not isinstance(mflux, str) and not args.kontext:
            makers["mflux fp32"] = lambda h=h, w=w: mflux_step(mflux, h, w)
        if args.sequential:
            results = {}
            for name, make in makers.items():
                results.update(timed({name: make()}, args.warmup, args.iters))
                mx.clear_cache()
        else:
            results = timed({n: make() for n, make in makers.items()}, args.warmup, args.iters)
        for name, t in results.items():
            row = {"size": size, "impl": name, **t}
            row["vs_torch"] = paired(t, results[torch_name])
            row["tflops"] = flops / t["median_s"] / 1e12
            prec, bits = impls.get(name, (None, None))
            base = [n for n, v in impls.items() if v == (prec, None)]
            if bits and base:  # a quantized model against the same precision unquantized
                row["vs_unquantized"] = paired(t, results[base[0]])
            rows.append(row)
        print(json.dumps([r for r in rows if r["size"] == size], indent=1), flush=True)

    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.system()} {platform.machine()} ({platform.processor() or '?'})",
        "mlx_device": str(mx.default_device()),
        "config": f"width {args.width}, {args.depth} double + {args.single} single blocks, "
        f"{TXT} text tokens",
        "matmul_ceiling_gflops": ceiling,
        "mflux": mflux if isinstance(mflux, str) else "measured",
    }
    write_results(rows, meta, Path(args.out))


def run_breakdown(ref, variants, args) -> None:
    """A profiled step per implementation and size, as a Markdown table beside --out."""
    lines = [
        f"Where a step's time goes (seconds; {args.depth} double + {args.single} single "
        f"blocks, width {args.width}, {TXT} text tokens; {platform.machine()}, MLX on "
        f"{mx.default_device()}, {date.today().isoformat()}). mlxflux: Kernels.profiling() "
        "(each kernel evaluated on its own); torch: torch.profiler self CPU times.",
        "",
        "| size | implementation | step s | " + " | ".join(KINDS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |",
    ]
    mode = kernels.choose().mode
    for size in args.sizes.split(","):
        h, w = SIZES[size]
        results = [(f"torch {args.torch_device} {args.torch_dtype}",
                    breakdown_torch(ref, h, w, args))]  # fmt: skip
        for prec, bits in variants:
            model, dtype = mlx_from_reference(ref, prec, bits)
            name = f"mlxflux {prec}" + (f" {bits}-bit" if bits else "") + f" ({mode})"
            results.append((name, breakdown_mlx(model, dtype, h, w, args)))
            del model
            mx.clear_cache()
        for name, r in results:
            cells = " | ".join(f"{r[k]:.2f}" for k in KINDS)
            lines.append(f"| {size} | {name} | {r['total_s']:.2f} | {cells} |")
            print(lines[-1], flush=True)
    out = Path(args.out + "_breakdown").with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_results(rows: list, meta: dict, out: Path) -> None:
    ceiling = meta["matmul_ceiling_gflops"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"Per-step time, {meta['config']}; {meta['machine']}, MLX on {meta['mlx_device']}, "
        f"{meta['date']}. Matmul ceiling: MLX {ceiling['mlx_gflops']:.0f} GFLOP/s, torch "
        f"{ceiling['torch_gflops']:.0f} GFLOP/s (fp32). mflux: {meta['mflux']}.",
        "",
        "| size | implementation | median s/step | spread s | first step s | vs torch | "
        "quantized vs unquantized | TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['impl']} | {r['median_s']:.3f} | {r['min_s']:.3f}-"
            f"{r['max_s']:.3f} | {r.get('first_s', float('nan')):.3f} | {r['vs_torch']:.2f}x | "
            + (f"{r['vs_unquantized']:.3f}x" if "vs_unquantized" in r else "")
            + f" | {r['tflops']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
