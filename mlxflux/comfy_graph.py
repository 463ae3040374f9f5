"""ComfyUI's two graphs for an mlxflux PNG: `prompt` (the API graph ComfyUI runs) and `workflow`
(the editor graph it shows when the PNG is dropped on its page).

The graph is the one ComfyUI's own FLUX.1 templates build, with the files named in the model's
manifest (e.g. flux1-dev-fp8.safetensors, t5xxl_fp8_e4m3fn.safetensors, clip_l.safetensors,
ae.safetensors) and the same sampler, scheduler, shift, guidance and seed:

    UNETLoader -> [LoraLoaderModelOnly ...] -> [ModelSamplingFlux] -> KSampler (euler, cfg 1)
    DualCLIPLoader -> CLIPTextEncode -> [ReferenceLatent ...] -> FluxGuidance -> positive
                                     -> ConditioningZeroOut -> negative
    EmptySD3LatentImage, or LoadImage -> ImageScale -> VAEEncode (image to image)
    Canny/Depth: LoadImage -> ImageScale -> [Canny] -> InstructPixToPixConditioning
    Fill: LoadImage [+ LoadImageMask | ImagePadForOutpaint] -> InpaintModelConditioning
    KSampler -> VAEDecode -> SaveImage

Input images are named by file: put them in ComfyUI's `input` folder.
"""

# ComfyUI node types: (input slots in order, widget names in order, outputs)
NODES = {
    "UNETLoader": ([], ["unet_name", "weight_dtype"], ["MODEL"]),
    "UnetLoaderGGUF": ([], ["unet_name"], ["MODEL"]),  # ComfyUI-GGUF
    "DualCLIPLoader": ([], ["clip_name1", "clip_name2", "type"], ["CLIP"]),
    "VAELoader": ([], ["vae_name"], ["VAE"]),
    "LoraLoaderModelOnly": (["model"], ["lora_name", "strength_model"], ["MODEL"]),
    "ModelSamplingFlux": (["model"], ["max_shift", "base_shift", "width", "height"], ["MODEL"]),
    "CLIPTextEncode": (["clip"], ["text"], ["CONDITIONING"]),
    "FluxGuidance": (["conditioning"], ["guidance"], ["CONDITIONING"]),
    "ConditioningZeroOut": (["conditioning"], [], ["CONDITIONING"]),
    "EmptySD3LatentImage": ([], ["width", "height", "batch_size"], ["LATENT"]),
    "LoadImage": ([], ["image", "upload"], ["IMAGE", "MASK"]),
    "LoadImageMask": ([], ["image", "channel", "upload"], ["MASK"]),
    "ImageScale": (["image"], ["upscale_method", "width", "height", "crop"], ["IMAGE"]),
    "VAEEncode": (["pixels", "vae"], [], ["LATENT"]),
    "FluxKontextImageScale": (["image"], [], ["IMAGE"]),
    "ReferenceLatent": (["conditioning", "latent"], [], ["CONDITIONING"]),
    "Canny": (["image"], ["low_threshold", "high_threshold"], ["IMAGE"]),
    "InstructPixToPixConditioning": (["positive", "negative", "vae", "pixels"], [],
                                     ["CONDITIONING", "CONDITIONING", "LATENT"]),
    "ImagePadForOutpaint": (["image"], ["left", "top", "right", "bottom", "feathering"],
                            ["IMAGE", "MASK"]),
    "InpaintModelConditioning": (["positive", "negative", "vae", "pixels", "mask"],
                                 ["noise_mask"], ["CONDITIONING", "CONDITIONING", "LATENT"]),
    "KSampler": (["model", "positive", "negative", "latent_image"],
                 ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], ["LATENT"]),
    "VAEDecode": (["samples", "vae"], [], ["IMAGE"]),
    "SaveImage": (["images"], ["filename_prefix"], []),
}  # fmt: skip
# the types of the input slots (the editor graph names them)
SLOT_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "conditioning": "CONDITIONING",
              "positive": "CONDITIONING", "negative": "CONDITIONING", "latent": "LATENT",
              "latent_image": "LATENT", "samples": "LATENT", "pixels": "IMAGE", "image": "IMAGE",
              "images": "IMAGE", "mask": "MASK"}  # fmt: skip
# BFL's file names, for a model converted from files that do not map to ComfyUI's loaders
DEFAULT_FILES = {"transformer": "{model}.safetensors", "t5": "t5xxl_fp16.safetensors",
                 "clip": "clip_l.safetensors", "vae": "ae.safetensors"}  # fmt: skip
OUTPAINT_FEATHERING = 40


class Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, kind: str, **inputs) -> str:
        slots, widgets, _ = NODES[kind]
        unknown = set(inputs) - set(slots) - set(widgets) - {"upload"}
        assert not unknown, (kind, unknown)
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": kind, "inputs": inputs}
        return node_id


def source_files(manifest: dict, model_name: str) -> dict[str, str]:
    """The file each ComfyUI loader takes, from the manifest's sources: single files keep their
    names (ComfyUI's fp8, BFL's, GGUF); a diffusers folder's shards have none ComfyUI knows,
    so BFL's names stand in."""
    out = {}
    for comp, default in DEFAULT_FILES.items():
        names = [s["name"] for s in manifest.get("sources", []) if s["component"] == comp]
        out[comp] = names[0] if len(names) == 1 else default.format(model=model_name)
    return out


def comfy_prompt(settings: dict, manifest: dict) -> dict:
    """The API graph (ComfyUI's `prompt` chunk) that draws what `settings` drew."""
    from .variants import outpaint_padding, variant_of

    variant = variant_of(manifest)
    files = source_files(manifest, variant.model_name)
    g = Graph()
    unet = files["transformer"]
    if unet.endswith(".gguf"):
        model = g.add("UnetLoaderGGUF", unet_name=unet)
    else:
        model = g.add("UNETLoader", unet_name=unet, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=files["clip"], clip_name2=files["t5"], type="flux")
    vae = g.add("VAELoader", vae_name=files["vae"])
    for lora in settings.get("loras") or []:
        model = g.add("LoraLoaderModelOnly", model=[model, 0], lora_name=lora["file"],
                      strength_model=lora["scale"])  # fmt: skip
    w, h = settings["width"], settings["height"]
    shift, default = settings["shift"], variant.shift
    if shift == "auto":  # BFL's resolution-dependent shift
        model = g.add("ModelSamplingFlux", model=[model, 0], max_shift=1.15, base_shift=0.5,
                      width=w, height=h)  # fmt: skip
    elif float(shift) != default:  # a fixed shift: both ends the same
        model = g.add("ModelSamplingFlux", model=[model, 0], max_shift=float(shift),
                      base_shift=float(shift), width=w, height=h)  # fmt: skip
    text = g.add("CLIPTextEncode", clip=[clip, 0], text=settings["prompt"])
    positive, negative = [text, 0], [g.add("ConditioningZeroOut", conditioning=[text, 0]), 0]

    def scaled(name: str) -> list:
        image = g.add("LoadImage", image=name, upload="image")
        return [g.add("ImageScale", image=[image, 0], upscale_method="lanczos", width=w,
                      height=h, crop="center"), 0]  # fmt: skip

    for ref in settings.get("reference_images") or []:  # Kontext
        image = [g.add("LoadImage", image=ref["file"], upload="image"), 0]
        if settings.get("reference_scale", "kontext") == "kontext":
            image = [g.add("FluxKontextImageScale", image=image), 0]
        latent = g.add("VAEEncode", pixels=image, vae=[vae, 0])
        positive = [g.add("ReferenceLatent", conditioning=positive, latent=[latent, 0]), 0]
    positive = [g.add("FluxGuidance", conditioning=positive, guidance=settings["guidance"]), 0]
    latent = None
    if settings.get("control_image"):  # Canny / Depth
        pixels = scaled(settings["control_image"]["file"])
        if settings.get("preprocess") == "canny":
            pixels = [g.add("Canny", image=pixels, low_threshold=0.4, high_threshold=0.8), 0]
        cond = g.add("InstructPixToPixConditioning", positive=positive, negative=negative,
                     vae=[vae, 0], pixels=pixels)  # fmt: skip
        positive, negative = [cond, 0], [cond, 1]
    if variant.fill and settings.get("init_image"):
        if settings.get("outpaint"):
            image = g.add("LoadImage", image=settings["init_image"], upload="image")
            pad = outpaint_padding(settings["init_image_size"], w, h)
            fw, fh = w - pad[0] - pad[2], h - pad[1] - pad[3]  # the image fitted, then padded
            fit = g.add("ImageScale", image=[image, 0], upscale_method="lanczos", width=fw,
                        height=fh, crop="disabled")  # fmt: skip
            padded = g.add("ImagePadForOutpaint", image=[fit, 0], left=pad[0], top=pad[1],
                           right=pad[2], bottom=pad[3], feathering=OUTPAINT_FEATHERING)  # fmt: skip
            pixels, mask = [padded, 0], [padded, 1]
        else:
            pixels = scaled(settings["init_image"])
            mask_file = settings["mask"]["file"]
            mask = [g.add("LoadImageMask", image=mask_file, channel="red", upload="image"), 0]
        cond = g.add("InpaintModelConditioning", positive=positive, negative=negative,
                     vae=[vae, 0], pixels=pixels, mask=mask, noise_mask=False)  # fmt: skip
        positive, negative, latent = [cond, 0], [cond, 1], [cond, 2]
    elif settings.get("init_image"):  # image to image
        latent = [g.add("VAEEncode", pixels=scaled(settings["init_image"]), vae=[vae, 0]), 0]
    if latent is None:
        latent = [g.add("EmptySD3LatentImage", width=w, height=h, batch_size=1), 0]
    sampler = g.add("KSampler", model=[model, 0], positive=positive, negative=negative,
                    latent_image=latent, seed=settings["seed"], steps=settings["steps"], cfg=1.0,
                    sampler_name="euler", scheduler=settings["scheduler"],
                    denoise=settings.get("denoise", 1.0))  # fmt: skip
    image = g.add("VAEDecode", samples=[sampler, 0], vae=[vae, 0])
    g.add("SaveImage", images=[image, 0], filename_prefix="mlxflux")
    return g.nodes


def comfy_chunks(settings: dict, manifest: dict) -> dict[str, str]:
    """The PNG text chunks ComfyUI reads: `prompt` and `workflow`, as JSON."""
    import json

    prompt = comfy_prompt(settings, manifest)
    return {"prompt": json.dumps(prompt), "workflow": json.dumps(comfy_workflow(prompt))}


def comfy_workflow(prompt: dict) -> dict:
    """The editor graph (ComfyUI's `workflow` chunk) for an API graph: the same nodes, laid out
    left to right in the order they run, their links and widget values."""
    nodes, links = [], []
    consumers: dict[tuple[str, int], list[int]] = {}
    for node_id, node in prompt.items():
        slots = NODES[node["class_type"]][0]
        for slot_index, name in enumerate(s for s in slots if s in node["inputs"]):
            src, out = node["inputs"][name]
            links.append([len(links) + 1, int(src), out, int(node_id), slot_index,
                          NODES[prompt[src]["class_type"]][2][out]])  # fmt: skip
            consumers.setdefault((src, out), []).append(len(links))
    link_of = {(lk[3], lk[4]): lk[0] for lk in links}
    for order, (node_id, node) in enumerate(prompt.items()):
        kind = node["class_type"]
        slots, widgets, outputs = NODES[kind]
        present = [s for s in slots if s in node["inputs"]]
        values = []
        for name in widgets:
            if name == "upload":
                continue
            values.append(node["inputs"].get(name))
            if name == "seed":
                values.append("fixed")  # control_after_generate
        if kind in ("LoadImage", "LoadImageMask"):
            values.append("image")
        pos = [60 + 320 * (order % 6), 80 + 260 * (order // 6)]
        nodes.append({
            "id": int(node_id), "type": kind, "pos": pos,
            "size": [300, 120], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": s, "type": SLOT_TYPES[s], "link": link_of[(int(node_id), i)]}
                       for i, s in enumerate(present)],
            "outputs": [{"name": t, "type": t, "links": consumers.get((node_id, i), []),
                         "slot_index": i} for i, t in enumerate(outputs)],
            "properties": {"Node name for S&R": kind}, "widgets_values": values,
        })  # fmt: skip
    return {
        "last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {"mlxflux": "written by mlxflux"}, "version": 0.4,
    }  # fmt: skip
