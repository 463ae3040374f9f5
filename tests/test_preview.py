"""Live previews (issue 35), on small random models (pure MLX): the last step's preview is
Latent2RGB of the final latent; previews never change the picture, in every workflow, with
either previewer; Kontext previews its own image only; the preview decoder is added to a
folder atomically and recorded, a bad one refused before anything runs; the CLI rewrites
--preview-file after every step; the memory plan counts the decoder. The references
(ComfyUI's formula, diffusers' AutoencoderTiny) are in test_preview_reference.py."""

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlxflux
from mlxflux.convert import ConvertError
from mlxflux.convert.pth_io import PthError, read_pth
from mlxflux.convert.taef1 import add_taef1, read_taef1
from mlxflux.errors import ModelFolderError
from mlxflux.memory_plan import make_plan
from mlxflux.model_folder import MANIFEST, read_manifest, verify_checksums
from mlxflux.preview import latent2rgb

from .helpers import cover_image, run_cli, small_model, write_taef1

KW = dict(width=64, height=48, steps=6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("previewed")
    decoder = write_taef1(tmp / "taef1_decoder.safetensors", seed=7)
    out = {}
    for name, variant, bits in (("dev", "dev", None), ("dev-q8", "dev", 8),
                                ("kontext", "kontext", None), ("canny", "canny", None),
                                ("fill", "fill", None)):  # fmt: skip
        out[name] = add_taef1(small_model(tmp / name, variant=variant, bits=bits, seed=3),
                              decoder, log=lambda m: None)  # fmt: skip
    out["plain"] = small_model(tmp / "plain", seed=3)  # without the decoder
    return out


def run(pipe, previews: bool, seed: int = 5, **settings):
    """(image, [(step, steps, picture)], final latent) of one seed."""
    seen, latents = [], []
    denoise = pipe.denoise

    def keep(*args, **kw):
        latents.append(denoise(*args, **kw))
        return latents[-1]

    pipe.denoise = keep
    try:
        job = pipe.prepare(mlxflux.GenerationRequest("a cover", seeds=(seed,), **settings))
        on_preview = (lambda i, step, steps, p: seen.append((step, steps, p))) if previews else None
        ((_, image),) = job.run(on_preview=on_preview)
    finally:
        del pipe.denoise
    return image, seen, latents[0]


def test_the_last_preview_is_latent2rgb_of_the_final_latent(folders):
    pipe = mlxflux.load(folders["dev"])
    _, seen, latent = run(pipe, True, seed=0, **KW, preview="latent2rgb")
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    last = np.asarray(seen[-1][2])
    assert last.shape == (48 // 8, 64 // 8, 3)  # the latent's resolution
    assert np.array_equal(last, np.asarray(latent2rgb(np.array(latent))))
    # the picture forms: the first estimate is not the last
    assert not np.array_equal(np.asarray(seen[0][2]), last)


WORKFLOWS = {
    "txt2img": ("dev", {}, {}),
    "img2img": ("dev", {}, {"init_image": cover_image(1, 64, 48), "denoise": 0.5}),
    "8-bit": ("dev-q8", {}, {}),
    "float16": ("dev", {"precision": "float16"}, {}),
    "streamed": ("dev", {"memory_budget": "stream"}, {}),
    "kontext": (
        "kontext",
        {},
        {"reference_images": [cover_image(2, 64, 96)], "reference_scale": "none"},
    ),  # fmt: skip
    "canny": ("canny", {}, {"control_image": cover_image(3, 64, 48)}),
    "fill": ("fill", {}, {"init_image": cover_image(4, 48, 48), "outpaint": True}),
}


def streaming_budget(folder) -> float:
    """GiB that streams the denoise stage of this model at KW's size."""
    plan = make_plan(read_manifest(folder), KW["width"], KW["height"], 4, 1 << 50, steps=6,
                     preview="taef1")  # fmt: skip
    low = max(n.streamed for n in plan.needs.values())
    assert low < plan.needs["denoise"].resident
    return (low + 1) / (1 << 30)


@pytest.mark.parametrize("method", ["latent2rgb", "taef1"])
@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_previews_never_change_the_picture(folders, workflow, method):
    name, load_kw, kw = WORKFLOWS[workflow]
    if load_kw.get("memory_budget") == "stream":
        load_kw = {"memory_budget": streaming_budget(folders[name])}
    pipe = mlxflux.load(folders[name], **load_kw)
    plain, none_seen, _ = run(pipe, False, **KW, **kw, preview=method)
    assert none_seen == []
    image, seen, latent = run(pipe, True, **KW, **kw, preview=method)
    assert np.array_equal(np.asarray(image), np.asarray(plain))
    # img2img too: 6 computed steps of a 12-step schedule, previewed from the first
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    # the preview is of the picture's own latent (Kontext: not its references)
    h, w = latent.shape[2:]
    size = (h, w) if method == "latent2rgb" else (h * 8, w * 8)
    assert all(np.asarray(p).shape == (*size, 3) for _, _, p in seen)
    if method == "latent2rgb":
        assert np.array_equal(np.asarray(seen[-1][2]), np.asarray(latent2rgb(np.array(latent))))


def test_auto_is_taef1_when_the_folder_has_it(folders):
    for name, want in (("dev", "taef1"), ("plain", "latent2rgb")):
        pipe = mlxflux.load(folders[name])
        assert pipe.prepare(mlxflux.GenerationRequest("a", **KW)).preview == want
    with pytest.raises(mlxflux.SettingsError, match=r"^preview: .*convert --taef1"):
        mlxflux.load(folders["plain"]).prepare(mlxflux.GenerationRequest("a", preview="taef1"))


def test_taef1_previews_are_pooled_to_the_preview_size(folders):
    """A 1216-pixel-high picture (the DVD's) previews at 256 pixels on the CPU backend: the
    latent averaged 5 x 5 before the tiny decoder."""
    from mlxflux.models.registry import load_component
    from mlxflux.preview import Previewer, pool_factor

    assert pool_factor(152, 104, 256) == 5 and pool_factor(152, 104, 512) == 3
    assert pool_factor(8, 8, 256) == 1
    manifest = read_manifest(folders["dev"])
    decoder = load_component(folders["dev"], "taef1", manifest)
    x0 = mx.random.normal((1, 16, 152, 104), key=mx.random.key(1))
    picture = Previewer("taef1", decoder, size=256)(x0)
    assert picture.size == (104 // 5 * 8, 152 // 5 * 8)
    pooled = x0[:, :, :150, :100].reshape(1, 16, 30, 5, 20, 5).mean(axis=(3, 5))
    direct = Previewer("taef1", decoder, size=1 << 20)(pooled)
    assert np.array_equal(np.asarray(picture), np.asarray(direct))


def test_the_memory_plan_counts_the_preview_decoder(folders):
    manifest = read_manifest(folders["dev"])
    with_it = make_plan(manifest, 832, 1216, 4, 1 << 50, preview="taef1").needs["denoise"]
    without = make_plan(manifest, 832, 1216, 4, 1 << 50, preview="latent2rgb").needs["denoise"]
    weights = sum(p.stat().st_size for p in (folders["dev"] / "taef1").glob("*.safetensors"))
    # the decoder's weights and its activations at the preview's size (400 x 272 at most)
    assert with_it.resident - without.resident > weights - (1 << 16)
    assert with_it.resident - without.resident >= 4 * 64 * 4 * 400 * 272


def test_add_taef1_is_atomic_recorded_and_keeps_the_pictures_identity(tmp_path):
    folder = small_model(tmp_path / "m", seed=1)
    before = read_manifest(folder)
    decoder = write_taef1(tmp_path / "taef1_decoder.safetensors", seed=2)
    add_taef1(folder, decoder, log=lambda m: None)
    after = read_manifest(folder)
    assert after["id"] == before["id"]  # the pictures are the same model's
    record = [s for s in after["sources"] if s["component"] == "taef1"]
    import hashlib

    assert record == [{"component": "taef1", "layout": "comfyui",
                       "name": "taef1_decoder.safetensors", "size": decoder.stat().st_size,
                       "sha256": hashlib.sha256(decoder.read_bytes()).hexdigest()}]  # fmt: skip
    assert verify_checksums(folder, after) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "taef1_decoder.safetensors"]
    # the weights read back are the file's, in MLX's layout
    _, weights = read_taef1(decoder)
    from safetensors.numpy import load_file

    raw = load_file(str(decoder))
    assert np.array_equal(
        np.array(weights["layers.1.weight"]), raw["1.weight"].transpose(0, 2, 3, 1)
    )
    assert np.array_equal(np.array(weights["layers.18.conv.4.bias"]), raw["18.conv.4.bias"])


def test_a_failed_addition_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from mlxflux.convert import component

    folder = small_model(tmp_path / "m", seed=1)
    manifest = (folder / MANIFEST).read_bytes()
    decoder = write_taef1(tmp_path / "taef1_decoder.safetensors", seed=2)

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(component, "write_component", broken)
    with pytest.raises(OSError, match="No space"):
        add_taef1(folder, decoder, log=lambda m: None)
    assert (folder / MANIFEST).read_bytes() == manifest and not (folder / "taef1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "taef1_decoder.safetensors"]


def _shifted(path, out, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"1.weight": np.zeros((64, 4, 3, 3), np.float32)}),
         "4-channel latents"),
        (lambda t: t["5.conv.2.weight"].__setitem__((0, 0, 0, 0), np.nan),
         r"non-finite values in layers\.5\.conv\.2\.weight"),
        (lambda t: t.pop("19.bias"), r"missing.*layers\.19\.bias"),
        (lambda t: t.update({"unet.weight": np.zeros(3, np.float32)}), "not a TAEF1 decoder"),
    ],
)  # fmt: skip
def test_a_bad_decoder_is_refused_before_anything_is_written(tmp_path, change, message):
    folder = small_model(tmp_path / "m", seed=1)
    manifest = (folder / MANIFEST).read_bytes()
    good = write_taef1(tmp_path / "good.safetensors", seed=2)
    bad = _shifted(good, tmp_path / "taef1_decoder.safetensors", change)
    with pytest.raises(ConvertError, match=message) as e:
        add_taef1(folder, bad, log=lambda m: None)
    assert "\n" not in str(e.value) and "taef1_decoder.safetensors" in str(e.value)
    assert (folder / MANIFEST).read_bytes() == manifest


def test_a_damaged_decoder_in_the_folder_is_refused_at_load(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["dev"], tmp_path / "m")
    shard = next((folder / "taef1").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match="taef1") as e:
        mlxflux.load(folder)
    assert "\n" not in str(e.value)


def test_pth_files_are_read_without_running_their_pickle(tmp_path):
    """A .pth whose pickle asks for anything but tensors is refused, naming what it asked."""
    import io
    import pickle
    import zipfile

    class Shell:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "taef1_decoder.pth"
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        pickle.dump({"1.weight": Shell()}, buf, protocol=4)
        z.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(PthError, match=r"asks for builtins\.print; refused"):
        read_pth(path)
    (tmp_path / "old.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PthError, match="not a torch.save zip file"):
        read_pth(tmp_path / "old.pth")


def test_cli_rewrites_the_preview_file_after_every_step(folders, tmp_path):
    out = tmp_path / "out"
    r = run_cli("gen", "--prompt", "a cover", "--model", str(folders["plain"]), "--seeds", "3,4",
                "--width", "64", "--height", "48", "--steps", "3",
                "--output", str(out / "{seed}.png"),
                "--preview-file", str(tmp_path / "forming-{seed}.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    for seed in (3, 4):
        preview = Image.open(tmp_path / f"forming-{seed}.png")
        assert preview.size == (8, 6)  # latent2rgb: the latent's size
        final = np.asarray(Image.open(out / f"{seed}.png").convert("RGB").resize((8, 6)))
        assert np.asarray(preview).shape == final.shape
    assert not list(tmp_path.glob(".forming*"))  # no temporary file left behind
    r = run_cli("gen", "--prompt", "a", "--model", str(folders["plain"]), "--preview", "taef1",
                "--preview-file", str(tmp_path / "p.png"))  # fmt: skip
    assert r.returncode == 2 and "convert --taef1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_convert_adds_the_decoder_from_the_cli(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["plain"], tmp_path / "m")
    decoder = write_taef1(tmp_path / "taef1_decoder.safetensors", seed=2)
    r = run_cli("convert", "--taef1", str(tmp_path), "--out", str(folder))
    assert r.returncode == 0, r.stderr
    assert "taef1" in json.loads((folder / MANIFEST).read_text())["components"]
    r = run_cli("info", str(folder), "--check")
    assert r.returncode == 0 and "checksums match" in r.stdout, r.stdout + r.stderr
    assert "taef1" in run_cli("info", str(folder)).stdout
    assert decoder.exists()
