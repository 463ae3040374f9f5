"""ComfyUI's `prompt` and `workflow` chunks in our PNGs: well-formed graphs of ComfyUI's FLUX.1
nodes, naming the manifest's source files, carrying the same sampling settings.

Running the graph in ComfyUI needs ComfyUI's source and weights: `COMFYUI_PATH` (a checkout)
turns on the check of every node and input against ComfyUI's own node classes; without it that
test is skipped, saying why (CI cannot fetch ComfyUI)."""

import json
import os
import sys

import pytest
from PIL import Image

from mlxflux.comfy_graph import NODES, comfy_prompt, comfy_workflow, source_files
from mlxflux.png_settings import comfy_prompt_settings

COMFY_FILES = [
    {"component": "transformer", "name": "flux1-dev-fp8.safetensors"},
    {"component": "t5", "name": "t5xxl_fp8_e4m3fn.safetensors"},
    {"component": "clip", "name": "clip_l.safetensors"},
    {"component": "vae", "name": "ae.safetensors"},
]
BASE = {"prompt": "a DVD cover", "seed": 42, "steps": 20, "scheduler": "simple",
        "guidance": 3.5, "width": 832, "height": 1216, "shift": 1.15, "denoise": 1.0}  # fmt: skip


def manifest(variant="dev", sources=COMFY_FILES):
    return {"variant": variant, "sources": sources,
            "components": {"transformer": {"config": {"guidance_embed": True}}}}  # fmt: skip


CASES = {
    "txt2img": ("dev", {}),
    "auto shift": ("dev", {"shift": "auto"}),
    "fixed shift": ("dev", {"shift": 2.0}),
    "img2img + loras": ("dev", {"init_image": "cover.jpg", "denoise": 0.6,
                                "loras": [{"file": "a.safetensors", "scale": 0.8},
                                          {"file": "b.safetensors", "scale": -0.5}]}),
    "kontext": ("kontext", {"guidance": 2.5, "reference_scale": "kontext",
                            "reference_images": [{"file": "a.png"}, {"file": "b.png"}]}),
    "canny": ("canny", {"guidance": 30.0, "control_image": {"file": "c.png"},
                        "preprocess": "canny"}),
    "depth": ("depth", {"guidance": 10.0, "control_image": {"file": "d.png"},
                        "preprocess": "none"}),
    "fill": ("fill", {"guidance": 30.0, "init_image": "cover.jpg", "mask": {"file": "m.png"}}),
    "outpaint": ("fill", {"guidance": 30.0, "init_image": "vinyl.jpg", "outpaint": True,
                          "init_image_size": [1000, 1000]}),
    "easycache": ("dev", {"cache": "easycache", "cache_threshold": 0.3,
                          "cache_range": [0.2, 0.9]}),
    "redux": ("dev", {"redux_images": [{"file": "a.png", "strength": 0.8},
                                       {"file": "b.png", "strength": 1.0}],
                      "redux_strength_type": "attn_bias", "redux_crop": "none"}),
    "redux + kontext": ("kontext", {"guidance": 2.5, "reference_scale": "kontext",
                                    "reference_images": [{"file": "a.png"}],
                                    "redux_images": [{"file": "b.png", "strength": 1.0}]}),
}  # fmt: skip


def check_wellformed(graph: dict) -> None:
    for node_id, node in graph.items():
        slots, widgets, _ = NODES[node["class_type"]]
        for name in slots:
            optional = node["class_type"] == "ReferenceLatent" and name == "latent"
            assert name in node["inputs"] or optional, (node_id, name)
        for name, value in node["inputs"].items():
            if name in slots:
                src, out = value
                assert src in graph, (node_id, name, src)
                assert out < len(NODES[graph[src]["class_type"]][2]), (node_id, name)
            else:
                assert name in widgets, (node_id, name)


@pytest.mark.parametrize("case", list(CASES))
def test_graphs_are_wellformed_and_carry_the_settings(case):
    variant, extra = CASES[case]
    settings = {**BASE, **extra}
    graph = comfy_prompt(settings, manifest(variant))
    check_wellformed(graph)
    kinds = [n["class_type"] for n in graph.values()]
    loader = next(n for n in graph.values() if n["class_type"] == "UNETLoader")
    assert loader["inputs"]["unet_name"] == "flux1-dev-fp8.safetensors"
    clip = next(n for n in graph.values() if n["class_type"] == "DualCLIPLoader")["inputs"]
    names = {clip["clip_name1"], clip["clip_name2"]}
    assert names == {"clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"}
    back, notes = comfy_prompt_settings(json.loads(json.dumps(graph)))
    assert notes == []
    for key in ("prompt", "seed", "steps", "scheduler", "guidance", "denoise"):
        assert back[key] == settings[key], key
    if settings["shift"] != 1.15:
        assert back["shift"] == settings["shift"]
    else:
        assert "ModelSamplingFlux" not in kinds  # ComfyUI's FLUX.1 default, 1.15
    expected = {"kontext": ["ReferenceLatent", "FluxKontextImageScale"],
                "canny": ["Canny", "InstructPixToPixConditioning"],
                "depth": ["InstructPixToPixConditioning"], "fill": ["InpaintModelConditioning"],
                "outpaint": ["ImagePadForOutpaint", "InpaintModelConditioning"],
                "img2img + loras": ["VAEEncode", "LoraLoaderModelOnly"]}.get(case, [])  # fmt: skip
    assert set(expected) <= set(kinds)
    if case == "kontext":
        assert kinds.count("ReferenceLatent") == 2
    if case == "depth":
        assert "Canny" not in kinds
    if case == "easycache":  # ComfyUI's own node, its settings read back by --from-png
        node = next(n for n in graph.values() if n["class_type"] == "EasyCache")["inputs"]
        assert (node["reuse_threshold"], node["start_percent"], node["end_percent"]) == (
            0.3, 0.2, 0.9)  # fmt: skip
        assert (back["cache"], back["cache_threshold"], back["cache_range"]) == (
            "easycache", 0.3, (0.2, 0.9))  # fmt: skip
    if case == "outpaint":  # the square fitted into 832 x 832, padded 192 above and below
        pad = next(n for n in graph.values() if n["class_type"] == "ImagePadForOutpaint")
        assert [pad["inputs"][k] for k in ("left", "top", "right", "bottom")] == [0, 192, 0, 192]


def test_workflow_links_match_the_prompt():
    settings = {**BASE, **CASES["canny"][1]}
    prompt = comfy_prompt(settings, manifest("canny"))
    wf = comfy_workflow(prompt)
    ids = {n["id"] for n in wf["nodes"]}
    assert ids == {int(k) for k in prompt}
    by_id = {lk[0]: lk for lk in wf["links"]}
    for node in wf["nodes"]:
        for slot, inp in enumerate(node["inputs"]):
            link = by_id[inp["link"]]
            assert (link[3], link[4]) == (node["id"], slot) and link[1] in ids
        for out in node["outputs"]:
            for link_id in out["links"]:
                assert by_id[link_id][1] == node["id"] and by_id[link_id][2] == out["slot_index"]
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"] == [42, "fixed", 20, 1.0, "euler", "simple", 1.0]


def test_a_first_block_cache_is_said_in_a_note_not_drawn():
    """ComfyUI core has no first-block node: the graph samples in full, and says so."""
    from mlxflux.comfy_graph import comfy_chunks

    settings = {**BASE, "cache": "first-block", "cache_threshold": 0.1, "cache_range": None}
    chunks = comfy_chunks(settings, manifest())
    prompt, workflow = json.loads(chunks["prompt"]), json.loads(chunks["workflow"])
    assert "EasyCache" not in {n["class_type"] for n in prompt.values()}
    (note,) = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert "no such node" in note["widgets_values"][0] and str(note["id"]) not in prompt
    assert "first-block" in workflow["extra"]["mlxflux_note"]


def test_files_from_a_diffusers_folder_get_bfls_names():
    shards = [{"component": c, "name": f"model-0000{i}-of-00002.safetensors"}
              for c in ("transformer", "t5") for i in (1, 2)]  # fmt: skip
    shards += [{"component": "clip", "name": "model.safetensors"},
               {"component": "vae", "name": "diffusion_pytorch_model.safetensors"}]  # fmt: skip
    files = source_files(manifest(sources=shards), "flux1-dev")
    assert files["transformer"] == "flux1-dev.safetensors"
    assert files["t5"] == "t5xxl_fp16.safetensors"
    assert files["clip"] == "model.safetensors"  # one file: its own name


def test_pngs_carry_both_graphs(tmp_path):
    from .helpers import run_cli, small_model

    folder = small_model(tmp_path / "model", seed=95)
    r = run_cli("gen", "--model", folder, "--prompt", "x", "--width", 32, "--height", 32,
                "--steps", 1, "--seed", 9, "--shift", "auto", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = Image.open(r.stdout.strip()).text
    prompt, workflow = json.loads(text["prompt"]), json.loads(text["workflow"])
    check_wellformed(prompt)
    assert len(workflow["nodes"]) == len(prompt)
    back, _ = comfy_prompt_settings(prompt)
    assert (back["seed"], back["width"], back["shift"]) == (9, 32, "auto")


NO_COMFYUI = "COMFYUI_PATH (a ComfyUI checkout) is not set: CI cannot fetch it"


@pytest.fixture(scope="module")
def comfy_nodes():
    """ComfyUI's node classes, loaded as its main.py loads them (CPU only)."""
    import asyncio

    from .helpers import torchvision_stand_in

    torchvision_stand_in()  # ComfyUI's cosmos model imports it at load time
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import nodes  # ComfyUI's

        started = nodes.init_extra_nodes(init_custom_nodes=False)
        if asyncio.iscoroutine(started):
            asyncio.run(started)
    finally:
        sys.argv = argv
    return nodes


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason=NO_COMFYUI)
@pytest.mark.parametrize("case", list(CASES))
def test_every_node_and_input_is_comfyuis(case, comfy_nodes):
    nodes = comfy_nodes
    variant, extra = CASES[case]
    for node in comfy_prompt({**BASE, **extra}, manifest(variant)).values():
        cls = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        spec = cls.INPUT_TYPES()
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in node["inputs"]:
            assert name in known or name == "upload", (node["class_type"], name)
        for name in spec.get("required", {}):
            assert name in node["inputs"], (node["class_type"], name)


def test_a_plain_prompts_brackets_reach_comfyui_as_text():
    """A prompt read as plain text: its brackets go to ComfyUI escaped, so ComfyUI's parse (the
    one `prompt_syntax` ports, checked against ComfyUI's own) reads them as the same text at
    weight 1; a prompt read with ComfyUI's syntax goes as written."""
    from mlxflux.prompt_syntax import segments

    prompt = "a (novel) cover, (gold:1.3), \\(c\\)"
    for syntax in ("plain", "comfy"):
        graph = comfy_prompt({**BASE, "prompt": prompt, "prompt_syntax": syntax}, manifest())
        (text,) = [n["inputs"]["text"] for n in graph.values()
                   if n["class_type"] == "CLIPTextEncode"]  # fmt: skip
        if syntax == "plain":
            assert segments(text) == [(prompt, 1.0)]
        else:
            assert text == prompt


def test_a_lora_with_text_encoder_parts_goes_through_lora_loader():
    loras = [
        {"file": "a.safetensors", "scale": 0.8, "clip_scale": 0.5, "text_layers": 12},
        {"file": "b.safetensors", "scale": 1.0, "clip_scale": 1.0, "text_layers": 0},
    ]
    graph = comfy_prompt({**BASE, "loras": loras}, manifest())
    check_wellformed(graph)
    (loader,) = [(i, n) for i, n in graph.items() if n["class_type"] == "LoraLoader"]
    assert loader[1]["inputs"]["strength_clip"] == 0.5
    assert loader[1]["inputs"]["strength_model"] == 0.8
    (encode,) = [n for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert encode["inputs"]["clip"] == [loader[0], 1]  # the CLIP the LoRA changed
    kinds = [n["class_type"] for n in graph.values()]
    assert kinds.count("LoraLoaderModelOnly") == 1
