"""The FLUX text tokenizers: CLIP BPE (77 tokens) and T5 SentencePiece (256+ or 512 tokens).

CLIP uses the Hugging Face `tokenizers` library rather than a BPE written here: it is the
engine transformers' own CLIPTokenizer runs on, so building the same normalizer (NFC, collapse
whitespace, lower-case), pre-tokenizer (CLIP's word regex, byte-level) and BPE model (`</w>`
word suffix) from vocab.json + merges.txt gives transformers' tokens by construction, including
its Unicode classes, at Rust speed. A hand-written BPE would need the `regex` package for
`\\p{L}` and would be one more place to get byte-level details wrong.
T5 uses `sentencepiece` on `spiece.model`, the model T5 was trained with.
"""

from pathlib import Path

CLIP_BOS, CLIP_EOS, CLIP_LENGTH = 49406, 49407, 77
T5_EOS, T5_PAD = 1, 0
T5_PADDING = {"comfy": 256, "max": 512}

_CLIP_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


class CLIPTokenizer:
    def __init__(self, vocab: str | Path, merges: str | Path):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        model = BPE.from_file(
            str(vocab),
            str(merges),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self._tok = tok

    def tokens(self, text: str) -> list[int]:
        """BPE ids of `text`, without specials or padding."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str) -> list[int]:
        """77 ids: BOS, at most 75 text tokens, EOS, then EOS as padding."""
        ids = [CLIP_BOS, *self.tokens(text)[: CLIP_LENGTH - 2], CLIP_EOS]
        return ids + [CLIP_EOS] * (CLIP_LENGTH - len(ids))


class T5Tokenizer:
    def __init__(self, spiece: str | Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def tokens(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def __call__(self, text: str, padding: str = "comfy") -> list[int]:
        """`comfy`: all tokens + EOS, padded to at least 256 (ComfyUI, no truncation).
        `max`: truncated to 511 + EOS and padded to 512 (BFL, diffusers)."""
        if padding not in T5_PADDING:
            raise ValueError(f"t5_padding must be one of {sorted(T5_PADDING)}, got {padding!r}")
        length = T5_PADDING[padding]
        ids = self.tokens(text)
        if padding == "max":
            ids = ids[: length - 1]
        ids = [*ids, T5_EOS]
        return ids + [T5_PAD] * max(0, length - len(ids))
