"""ComfyUI's two graphs for an mlxflux PNG: `prompt` (the API graph ComfyUI runs) and `workflow`
(the editor graph it shows when the PNG is dropped on its page).

The graph is the one ComfyUI's own FLUX.1 templates build, with the files named in the model's
manifest (e.g. flux1-dev-fp8.safetensors, t5xxl_fp8_e4m3fn.safetensors, clip_l.safetensors,
ae.safetensors) and the same sampler, scheduler, shift, guidance and seed:

    UNETLoader -> [LoraLoaderModelOnly | LoraLoader ...] -> [ModelSamplingFlux] -> KSampler
    (euler, cfg 1); a LoraLoader also feeds CLIPTextEncode its CLIP
    DualCLIPLoader -> CLIPTextEncode -> [ReferenceLatent ...] -> FluxGuidance -> positive
                                     -> ConditioningZeroOut -> negative
    EmptySD3LatentImage, or LoadImage -> ImageScale -> VAEEncode (image to image)
    Canny/Depth: LoadImage -> ImageScale -> [Canny] -> InstructPixToPixConditioning
    Fill: LoadImage [+ LoadImageMask | ImagePadForOutpaint] -> InpaintModelConditioning
    KSampler -> VAEDecode -> SaveImage

Input images are named by file: put them in ComfyUI's `input` folder.
"""

from .sampling import BASE_SHIFT, MAX_SHIFT
from .variants import variant_of

# ComfyUI node types: (input slots in order, widget names in order, outputs)
NODES = {
    "UNETLoader": ([], ["unet_name", "weight_dtype"], ["MODEL"]),
    "UnetLoaderGGUF": ([], ["unet_name"], ["MODEL"]),  # ComfyUI-GGUF
    "DualCLIPLoader": ([], ["clip_name1", "clip_name2", "type"], ["CLIP"]),
    "VAELoader": ([], ["vae_name"], ["VAE"]),
    "LoraLoaderModelOnly": (["model"], ["lora_name", "strength_model"], ["MODEL"]),
    "LoraLoader": (["model", "clip"], ["lora_name", "strength_model", "strength_clip"],
                   ["MODEL", "CLIP"]),
    "ModelSamplingFlux": (["model"], ["max_shift", "base_shift", "width", "height"], ["MODEL"]),
    "EasyCache": (["model"], ["reuse_threshold", "start_percent", "end_percent", "verbose"],
                  ["MODEL"]),
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
    "CLIPVisionLoader": ([], ["clip_name"], ["CLIP_VISION"]),
    "CLIPVisionEncode": (["clip_vision", "image"], ["crop"], ["CLIP_VISION_OUTPUT"]),
    "StyleModelLoader": ([], ["style_model_name"], ["STYLE_MODEL"]),
    "StyleModelApply": (["conditioning", "style_model", "clip_vision_output"],
                        ["strength", "strength_type"], ["CONDITIONING"]),
    "UpscaleModelLoader": ([], ["model_name"], ["UPSCALE_MODEL"]),
    "ImageUpscaleWithModel": (["upscale_model", "image"], [], ["IMAGE"]),
    "ImageScaleBy": (["image"], ["upscale_method", "scale_by"], ["IMAGE"]),
}  # fmt: skip
# the types of the input slots (the editor graph names them)
SLOT_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "conditioning": "CONDITIONING",
              "positive": "CONDITIONING", "negative": "CONDITIONING", "latent": "LATENT",
              "latent_image": "LATENT", "samples": "LATENT", "pixels": "IMAGE", "image": "IMAGE",
              "images": "IMAGE", "mask": "MASK", "upscale_model": "UPSCALE_MODEL",
              "clip_vision": "CLIP_VISION", "style_model": "STYLE_MODEL",
              "clip_vision_output": "CLIP_VISION_OUTPUT"}  # fmt: skip
# BFL's file names, for a model converted from files that do not map to ComfyUI's loaders
DEFAULT_FILES = {"transformer": "{model}.safetensors", "t5": "t5xxl_fp16.safetensors",
                 "clip": "clip_l.safetensors", "vae": "ae.safetensors"}  # fmt: skip


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
    """The API graph (ComfyUI's `prompt` chunk) that draws what `settings` drew; the variant's
    family adds its nodes (`variants.base.Family.graph_text`, `graph_model_input`)."""
    variant = variant_of(manifest)
    family = variant.family
    files = source_files(manifest, variant.model_name)
    g = Graph()
    unet = files["transformer"]
    if unet.endswith(".gguf"):
        model = g.add("UnetLoaderGGUF", unet_name=unet)
    else:
        model = g.add("UNETLoader", unet_name=unet, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=files["clip"], clip_name2=files["t5"], type="flux")
    vae = g.add("VAELoader", vae_name=files["vae"])
    clip_out = [clip, 0]
    for lora in settings.get("loras") or []:
        if lora.get("text_layers"):  # its text-encoder parts too, at strength_clip
            model = g.add("LoraLoader", model=[model, 0], clip=clip_out,
                          lora_name=lora["file"], strength_model=lora["scale"],
                          strength_clip=lora["clip_scale"])  # fmt: skip
            clip_out = [model, 1]
        else:
            model = g.add("LoraLoaderModelOnly", model=[model, 0], lora_name=lora["file"],
                          strength_model=lora["scale"])  # fmt: skip
    w, h = settings["width"], settings["height"]
    shift, default = settings["shift"], variant.shift
    if shift == "auto":  # BFL's resolution-dependent shift
        model = g.add("ModelSamplingFlux", model=[model, 0], max_shift=MAX_SHIFT,
                      base_shift=BASE_SHIFT, width=w, height=h)  # fmt: skip
    elif float(shift) != default:  # a fixed shift: both ends the same
        model = g.add("ModelSamplingFlux", model=[model, 0], max_shift=float(shift),
                      base_shift=float(shift), width=w, height=h)  # fmt: skip
    if settings.get("cache") == "easycache":  # ComfyUI's own node, with the same settings
        start, end = settings["cache_range"]
        model = g.add("EasyCache", model=[model, 0], reuse_threshold=settings["cache_threshold"],
                      start_percent=start, end_percent=end, verbose=False)  # fmt: skip
    prompt = settings["prompt"]
    if settings.get("prompt_syntax") == "plain":  # brackets that were text: ComfyUI's escapes
        prompt = prompt.replace("(", "\\(").replace(")", "\\)")
    text = g.add("CLIPTextEncode", clip=clip_out, text=prompt)
    positive, negative = [text, 0], [g.add("ConditioningZeroOut", conditioning=[text, 0]), 0]

    def scaled(name: str) -> list:
        image = g.add("LoadImage", image=name, upload="image")
        return [g.add("ImageScale", image=[image, 0], upscale_method="lanczos", width=w,
                      height=h, crop="center"), 0]  # fmt: skip

    positive = family.graph_text(g, settings, positive, vae)
    positive = _redux(g, settings, manifest, positive)
    positive = [g.add("FluxGuidance", conditioning=positive, guidance=settings["guidance"]), 0]
    positive, negative, latent = family.graph_model_input(g, settings, positive, negative, vae,
                                                          scaled)  # fmt: skip
    if latent is None and settings.get("init_image"):  # image to image
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


def _redux(g: Graph, settings: dict, manifest: dict, positive: list) -> list:
    """Redux: CLIPVisionLoader and StyleModelLoader with the files the folder was converted
    from, then per image LoadImage -> CLIPVisionEncode -> StyleModelApply, chained."""
    images = settings.get("redux_images") or []
    if not images:
        return positive
    names = {s["layout"]: s["name"] for s in manifest.get("sources", [])
             if s["component"] == "redux"}  # fmt: skip
    vision = g.add(
        "CLIPVisionLoader",
        clip_name=names.get("clip_vision", "sigclip_vision_patch14_384.safetensors"),
    )
    style = g.add(
        "StyleModelLoader", style_model_name=names.get("style_model", "flux1-redux-dev.safetensors")
    )
    for item in images:
        image = g.add("LoadImage", image=item["file"], upload="image")
        encoded = g.add("CLIPVisionEncode", clip_vision=[vision, 0], image=[image, 0],
                        crop=settings.get("redux_crop", "center"))  # fmt: skip
        positive = [
            g.add(
                "StyleModelApply",
                conditioning=positive,
                style_model=[style, 0],
                clip_vision_output=[encoded, 0],
                strength=item["strength"],
                strength_type=settings.get("redux_strength_type", "multiply"),
            ),
            0,
        ]
    return positive


def upscale_chunks(image_name: str, model_name: str, factor: int, scale: float,
                   refine: dict | None = None) -> dict:  # fmt: skip
    """The ComfyUI graphs of a model upscale: LoadImage -> ImageUpscaleWithModel (the model
    from UpscaleModelLoader) -> [ImageScaleBy, lanczos, below the model's factor] -> SaveImage.
    `refine`: the FLUX refine's settings, which ComfyUI core cannot run (the note says so)."""
    import json

    g = Graph()
    image = g.add("LoadImage", image=image_name, upload="image")
    model = g.add("UpscaleModelLoader", model_name=model_name)
    out = g.add("ImageUpscaleWithModel", upscale_model=[model, 0], image=[image, 0])
    if scale != factor:
        out = g.add("ImageScaleBy", image=[out, 0], upscale_method="lanczos",
                    scale_by=scale / factor)  # fmt: skip
    g.add("SaveImage", images=[out, 0], filename_prefix="mlxflux-upscaled")
    note = None
    if refine:
        w, h = refine["tile"]
        note = (f"mlxflux then refined the upscaled picture with FLUX: image to image at denoise "
                f"{refine['denoise']:g} over {refine['tiles']} overlapping tiles of {w}x{h} "
                f"(overlap {refine['overlap']} px), one seed's noise for the whole picture, "
                "the tiles blended every step. ComfyUI core has no tiled refine (the 'Ultimate "
                "SD Upscale' custom node is the nearest, tile by tile), so this graph stops at "
                "the model upscale.")  # fmt: skip
    return {"prompt": json.dumps(g.nodes), "workflow": json.dumps(comfy_workflow(g.nodes, note))}


def comfy_chunks(settings: dict, manifest: dict) -> dict[str, str]:
    """The PNG text chunks ComfyUI reads: `prompt` and `workflow`, as JSON."""
    import json

    prompt = comfy_prompt(settings, manifest)
    note = None
    if settings.get("cache") == "first-block":
        note = (f"mlxflux drew this with a first-block cache (threshold "
                f"{settings['cache_threshold']:g}, as diffusers' FirstBlockCache); ComfyUI core "
                "has no such node, so this graph samples every step in full: a close picture, "
                "not the same one. EasyCache (cache easycache) is ComfyUI's own.")  # fmt: skip
    workflow = comfy_workflow(prompt, note)
    return {"prompt": json.dumps(prompt), "workflow": json.dumps(workflow)}


def comfy_workflow(prompt: dict, note: str | None = None) -> dict:
    """The editor graph (ComfyUI's `workflow` chunk) for an API graph: the same nodes, laid out
    left to right in the order they run, their links and widget values; `note`: a Note node
    (the editor's own, not run) saying what the graph cannot redraw."""
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
    extra = {"mlxflux": "written by mlxflux"}
    if note:
        extra["mlxflux_note"] = note
        row = 80 + 260 * (len(nodes) // 6 + 1)  # below the graph
        nodes.append({"id": len(nodes) + 1, "type": "Note", "pos": [60, row], "size": [420, 160],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [note]})  # fmt: skip
    return {
        "last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": extra, "version": 0.4,
    }  # fmt: skip
