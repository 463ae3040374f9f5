"""ComfyUI's prompt syntax (`mlxflux.prompt_syntax`): the parse, as ComfyUI's `sd1_clip.py`
reads each case (the expectations below are worked out from its rules: `(x)` x1.1, `(x:w)`,
nesting, `\\(` `\\)` escapes, malformed text kept), the tokenization of segments on their own,
and the first CLIP section's boundary rule. With COMFYUI_PATH set, ComfyUI's own tokenizer is
the reference for every prompt here."""

import os

import pytest

from mlxflux.prompt_syntax import segments, weighted
from mlxflux.tokenizers import CLIP_BOS, CLIP_EOS, CLIPTokenizer, T5Tokenizer

from .helpers import comfyui, tokenizer_dir

CASES = {
    "a lighthouse at dusk": [("a lighthouse at dusk", 1.0)],
    "a (b) c": [("a ", 1.0), ("b", 1.1), (" c", 1.0)],
    "(supermassive black hole:1.3) in gold": [("supermassive black hole", 1.3), (" in gold", 1.0)],
    "((liquid mercury))": [("liquid mercury", 1.1 * 1.1)],
    "\\(the novel\\) 1984": [("(the novel) 1984", 1.0)],
    "(a (b:1.5) c:0.8)": [("a ", 0.8), ("b", 1.5), (" c", 0.8)],
    "(word:abc)": [("word:abc", 1.1)],  # not a number: the text stays, at x1.1
    "(:1.3)": [(":1.3", 1.1)],  # a colon first is text
    "unclosed (bracket": [("unclosed ", 1.0), ("(bracket", 1.0)],
    "a) b (c": [("a) b (c", 1.0)],  # a stray ")" keeps the rest at its depth
    "((a:2):0.5)": [("a", 2.0)],
    "(a\\):1.2)": [("a)", 1.2)],
    "": [],
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_the_parse_reads_as_comfyui_reads(prompt):
    assert segments(prompt) == CASES[prompt]
    assert segments(prompt, "plain") == [(prompt, 1.0)]


def test_weighted_only_when_a_weight_differs_from_one():
    assert not weighted("a lighthouse (at dusk:1.0)")
    assert weighted("a (lighthouse)") and not weighted("a (lighthouse)", "plain")
    with pytest.raises(ValueError, match="comfy, plain"):
        segments("x", "a1111")


@pytest.fixture(scope="module")
def tokenizers():
    tok = tokenizer_dir()
    clip = CLIPTokenizer(tok / "tokenizer_1" / "vocab.json", tok / "tokenizer_1" / "merges.txt")
    return clip, T5Tokenizer(tok / "tokenizer_2" / "spiece.model")


def test_a_prompt_without_weights_tokenizes_as_before(tokenizers):
    clip, t5 = tokenizers
    prompt = "A cinematic DVD cover, " * 20  # over 77 CLIP tokens
    assert len(clip.tokens(prompt)) > 75
    clip_ids = [CLIP_BOS, *clip.tokens(prompt)[:75], CLIP_EOS]
    assert clip.weighted(segments(prompt)) == clip_ids
    for padding, length in (("comfy", 256), ("max", 512)):
        ids, weights = t5.weighted(segments(prompt), padding)
        assert ids[: len(t5.tokens(prompt)) + 1] == [*t5.tokens(prompt), 1]
        assert len(ids) == length and set(weights) == {1.0}


def test_segments_are_tokenized_on_their_own_with_their_weights(tokenizers):
    clip, t5 = tokenizers
    parts = segments("a cover of (supermassive black hole:1.3), gold")
    ids, weights = t5.weighted(parts)
    want = []
    for text, w in [("a cover of ", 1.0), ("supermassive black hole", 1.3), (", gold", 1.0)]:
        want += [(i, w) for i in t5.tokens(text)]
    assert list(zip(ids, weights, strict=True))[: len(want) + 1] == [*want, (1, 1.0)]
    assert ids[len(want) + 1 :] == [0] * (256 - len(want) - 1)


def test_a_short_group_crossing_the_clip_end_starts_the_next_section(tokenizers):
    clip, _ = tokenizers
    words = "cat " * 74  # 74 single tokens: BOS + 74 leaves room for one more before EOS
    short = clip.weighted(segments(words + "(golden disk)"))
    assert short[:75] == [CLIP_BOS, *clip.tokens(words)] and short[75:] == [CLIP_EOS] * 2
    long_group = "(a b c d e f g h i)"  # 9 tokens: cut at the end instead
    cut = clip.weighted(segments(words + long_group))
    assert cut[75] == clip.tokens("a")[0] and cut[76] == CLIP_EOS


PROMPTS = [
    *CASES,
    "a cover of (supermassive black hole:1.3), ((liquid mercury)) and \\(the novel\\)",
    "cat " * 74 + "(golden disk)",
    "cat " * 70 + "(a b c d e f g h i:1.2) " + "dog " * 300,
]


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_tokens_and_weights_are_comfyuis_own(tokenizers, prompt):
    clip, t5 = tokenizers
    (flux,) = comfyui("comfy.text_encoders.flux")
    theirs = flux.FluxTokenizer().tokenize_with_weights(prompt)
    assert clip.weighted(segments(prompt)) == [t for t, _ in theirs["l"][0]]
    (t5_theirs,) = theirs["t5xxl"]
    ids, weights = t5.weighted(segments(prompt))
    assert list(zip(ids, weights, strict=True)) == t5_theirs


def test_pngs_record_the_syntax_and_older_ones_read_as_plain(tmp_path):
    import json

    from PIL import Image, PngImagePlugin

    from mlxflux.png_settings import read_png_settings

    for recorded, want in (({"prompt_syntax": "comfy"}, "comfy"), ({}, "plain")):
        info = PngImagePlugin.PngInfo()
        meta = {"prompt": "a (novel) cover", "seed": 1, "steps": 4, **recorded}
        info.add_text("mlxflux", json.dumps(meta))
        path = tmp_path / "old.png"
        Image.new("RGB", (16, 16)).save(path, pnginfo=info)
        settings, kind, _ = read_png_settings(path)
        assert kind == "mlxflux" and settings["prompt_syntax"] == want
