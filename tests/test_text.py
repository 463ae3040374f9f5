"""Text stack: tokenizers against transformers on the real files, encoders against transformers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import T5TokenizerFast as HFT5Tokenizer

from mlxflux import kernels
from mlxflux.convert.keymaps import assemble, clip_text, t5_encoder
from mlxflux.models.clip import CLIPConfig
from mlxflux.models.clip import CLIPTextModel as MLXCLIP
from mlxflux.models.t5 import T5Config as MLXT5Config
from mlxflux.models.t5 import T5Encoder
from mlxflux.quant import quantize
from mlxflux.tokenizers import CLIPTokenizer, T5Tokenizer

from .helpers import load_strict, tokenizer_dir
from .reference import rel_err, tiny_clip, tiny_t5, to_mx

pytestmark = pytest.mark.reference

PROMPTS = [
    # the three preset prompts
    "A professional book cover for George Orwell's 1984. A massive, hyper-realistic mechanical "
    "eye integrated into a brutalist concrete skyscraper. The iris of the eye is a glowing CCTV "
    "screen monitor. Cold, cinematic lighting, neon red highlights, dark moody atmosphere. 8k "
    "resolution, cinematic grain, dystopian aesthetic.",
    "Conceptual vinyl album cover for Daft Punk. Two futuristic robotic helmets partially melted "
    "into a pool of liquid iridescent mercury. Reflections of a vibrant sunset and city lights on "
    "the chrome surface. Deep black background with fine cosmic dust. High-end product "
    "photography, soft studio lighting, sharp focus, 8k, elegant and premium.",
    "A cinematic DVD cover for the movie Interstellar. A breathtaking close-up of a supermassive "
    "black hole 'Gargantua' with a glowing golden accretion disk bending time and space. A tiny, "
    "fragile spaceship silhouette in the foreground against the vastness of the cosmos. "
    "Hyper-realistic, lens flare, deep blues and glowing golds, IMAX quality, epic scale.",
    "a photo of a cat",
    "Hello world",
    "",
    " ",
    "   \t\n  ",
    "UPPER lower MiXeD CaSe",
    "Café crème brûlée, naïve façade, jalapeño piñata",
    "Zürich, Kraków, São Paulo, Reykjavík, Ångström",
    "東京タワーの夜景、ネオンの光",
    "Москва зимой, снег и огни",
    "مدينة في الليل",
    "a cat 🐱 wearing a 🎩 hat, 🚀🌌✨",
    "emoji-only: 😀😃😄😁",
    "Punctuation!!! Does it... work?? (yes) [no] {maybe} <tags> — em dash – en dash",
    "quotes \"double\" 'single' `backtick` «guillemets» „low“",
    "it's don't we're they've I'm you'll he'd",
    "numbers 0 1 12 123 1234 3.14159 -42 1e10 1,000,000 2026-11-26",
    "hex 0xDEADBEEF, version v1.2.3, 50% off, $19.99, €5, #hashtag @user",
    "path/to/file.png and https://example.com/a?b=c&d=e",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "  leading and trailing spaces  ",
    "hyphen-ated words and under_scores and CamelCaseWords",
    "repeated repeated repeated repeated",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    "a (weighted:1.2) prompt with [brackets] and {braces}",
    "½ ¼ ¾ ™ © ® ° µ ß ø",
    "ｆｕｌｌｗｉｄｔｈ ｃｈａｒａｃｔｅｒｓ",
    "combining e\u0301 vs precomposed é",
    "zero\u200bwidth space and non\u00a0breaking space",
    "ελληνικά γράμματα, עברית",
    "한국어 텍스트와 中文文本",
    "x" * 300,
    " ".join(["word"] * 100),  # > 77 CLIP tokens
    " ".join(f"token{i}" for i in range(400)),  # > 512 T5 tokens
    ", ".join(["a highly detailed intricate masterpiece"] * 40),
    "The End.",
]


@pytest.fixture(scope="module")
def clip_tokenizers():
    d = tokenizer_dir() / "tokenizer_1"
    return CLIPTokenizer(d / "vocab.json", d / "merges.txt"), HFCLIPTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def t5_tokenizers():
    d = tokenizer_dir() / "tokenizer_2"
    return T5Tokenizer(d / "spiece.model"), HFT5Tokenizer.from_pretrained(d)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_tokens_match_transformers(clip_tokenizers, prompt):
    ours, ref = clip_tokenizers
    want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(prompt) == want


@pytest.mark.parametrize("prompt", PROMPTS)
def test_t5_tokens_match_transformers(t5_tokenizers, prompt):
    ours, ref = t5_tokenizers
    want_max = ref(prompt, padding="max_length", max_length=512, truncation=True).input_ids
    assert ours(prompt, "max") == want_max
    # ComfyUI: no truncation, padded with 0 to at least 256
    full = ref(prompt).input_ids
    want_comfy = full + [0] * max(0, 256 - len(full))
    assert ours(prompt, "comfy") == want_comfy


def test_tokenizers_reference_values(clip_tokenizers, t5_tokenizers):
    # docs/numerics.md, the models (reference tokens)
    assert clip_tokenizers[0]("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t5_tokenizers[0]("Hello world", "comfy")[:3] == [8774, 296, 1]
    long = " ".join(f"token{i}" for i in range(400))
    assert len(t5_tokenizers[0](long, "comfy")) > 512  # comfy never truncates
    assert len(clip_tokenizers[0](" ".join(["word"] * 100))) == 77


# ---- encoders -------------------------------------------------------------------------------


def load_clip(ref, prefix="") -> MLXCLIP:
    items = ((prefix + k, to_mx(v)) for k, v in ref.state_dict().items())
    model = MLXCLIP(CLIPConfig.from_hf(ref.config.to_dict()))
    return load_strict(model, dict(assemble(items, clip_text, "clip")), "clip")


def load_t5(ref) -> T5Encoder:
    items = ((k, to_mx(v)) for k, v in ref.state_dict().items())
    model = T5Encoder(MLXT5Config.from_hf(ref.config.to_dict()))
    return load_strict(model, dict(assemble(items, t5_encoder, "t5")), "t5")


@pytest.mark.parametrize("prefix", ["", "text_model."])
def test_clip_matches_transformers(clip_tokenizers, prefix):
    ref = tiny_clip()
    model = load_clip(ref, prefix)
    ids = [clip_tokenizers[0](p) for p in PROMPTS[:3] + ["", "a photo of a cat"]]
    with torch.no_grad():
        out = ref(torch.tensor(ids))
    hidden, pooled = model(mx.array(ids))
    e1 = rel_err(np.array(hidden), out.last_hidden_state)
    e2 = rel_err(np.array(pooled), out.pooler_output)
    print(f"CLIP rel err: hidden {e1:.2e} pooled {e2:.2e}")
    assert e1 <= 1e-4 and e2 <= 1e-4


def test_t5_matches_transformers_at_512_tokens(t5_tokenizers):
    ref = tiny_t5()
    model = load_t5(ref)
    # 512 tokens: relative offsets up to 511, so buckets past max_distance 128 are used
    ids = [t5_tokenizers[0](p, "max") for p in (PROMPTS[0], PROMPTS[-3])]
    with torch.no_grad():
        want = ref(torch.tensor(ids)).last_hidden_state
    got = np.array(model(mx.array(ids)))
    err = rel_err(got, want)
    print(f"T5 rel err at 512 tokens: {err:.2e}")
    assert err <= 1e-4


def test_t5_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from mlxflux.models.t5 import relative_position_buckets

    n = 600
    pos = torch.arange(n)
    want = T5Attention._relative_position_bucket(
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=32, max_distance=128
    )
    assert np.array_equal(relative_position_buckets(n, 32, 128), want.numpy())


def test_t5_8bit_error_is_small(t5_tokenizers):
    ref = tiny_t5(seed=2)
    model = load_t5(ref)
    ids = mx.array([t5_tokenizers[0](PROMPTS[1], "comfy")])
    full = np.array(model(ids))
    quantize(model, 8, kernels.choose())
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, nn.QuantizedLinear)
    q8 = np.array(model(ids))
    err = rel_err(q8, full)
    mean_err = np.abs(q8 - full).mean() / np.abs(full).mean()
    print(f"T5 8-bit vs fp32: max rel err {err:.2e}, mean rel err {mean_err:.2e}")
    # one 8-bit layer is off by ~0.4%; three random layers amplify it to a few percent
    assert 0 < err <= 5e-2 and mean_err <= 5e-2


def test_t5_stays_finite_with_fp16_weights(t5_tokenizers):
    # activations are fp32 whatever the weight dtype; large weights overflow fp16 activations
    ref = tiny_t5(seed=3)
    with torch.no_grad():
        for blk in ref.encoder.block:
            blk.layer[1].DenseReluDense.wo.weight.mul_(300.0)
    model = load_t5(ref)
    model.set_dtype(mx.float16)
    ids = mx.array([t5_tokenizers[0](PROMPTS[2], "comfy")])
    out = np.array(model(ids))
    assert np.isfinite(out).all()
    ref = ref.half().float()  # the same fp16-rounded weights, fp32 activations
    with torch.no_grad():
        want = ref(ids_t := torch.tensor(np.array(ids))).last_hidden_state
    assert ids_t.shape[1] == 256
    assert rel_err(out, want) <= 1e-4


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_cpu_dequantize_equals_the_quantized_values(bits):
    from mlxflux.kernels import dequantize

    w = mx.random.normal((96, 256), key=mx.random.key(bits)).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, 64, bits)
    # the exact value of each code: q * scale + bias, computed here in float64 from the codes
    one, zero = mx.ones(s.shape, mx.float32), mx.zeros(b.shape, mx.float32)
    codes = np.array(mx.dequantize(q, one, zero, 64, bits)).astype(int)
    exact = codes.reshape(96, -1, 64) * np.array(s.astype(mx.float32))[..., None].astype(
        np.float64
    ) + np.array(b.astype(mx.float32))[..., None].astype(np.float64)
    got = np.array(dequantize(q, s, b, 64, bits)).reshape(96, -1, 64)
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()
