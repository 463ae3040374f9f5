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
CLIP_WORD_LENGTH = 8  # ComfyUI: a group this long may be cut across sections
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
        return self.weighted([(text, 1.0)])

    def weighted(self, segments: list[tuple[str, float]]) -> list[int]:
        """The 77 ids of ComfyUI's first CLIP section for the prompt's segments
        (`prompt_syntax.segments`), each tokenized on its own: its pooled vector is what FLUX
        takes. A segment of fewer than 8 tokens that would cross the end starts the next
        section instead (the first ends early, padded); a longer one is cut (ComfyUI's
        `SDTokenizer.tokenize_with_weights`, max_word_length 8). One segment: BOS, its first
        75 tokens, EOS, EOS as padding."""
        batch = [CLIP_BOS]
        for text, _ in segments:
            group = self.tokens(text)
            if len(group) + len(batch) > CLIP_LENGTH - 1:
                room = CLIP_LENGTH - 1 - len(batch)
                if len(group) >= CLIP_WORD_LENGTH:
                    batch += group[:room]
                return [*batch, CLIP_EOS] + [CLIP_EOS] * (CLIP_LENGTH - 1 - len(batch))
            batch += group
        batch.append(CLIP_EOS)
        return batch + [CLIP_EOS] * (CLIP_LENGTH - len(batch))


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
        return self.weighted([(text, 1.0)], padding)[0]

    def weighted(self, segments: list[tuple[str, float]], padding: str = "comfy"):
        """(ids, weights) of the prompt's segments, each tokenized on its own (as ComfyUI's
        T5 tokenizer does), padded as `__call__`; EOS and padding weigh 1."""
        if padding not in T5_PADDING:
            raise ValueError(f"t5_padding must be one of {sorted(T5_PADDING)}, got {padding!r}")
        length = T5_PADDING[padding]
        ids, weights = [], []
        for text, weight in segments:
            group = self.tokens(text)
            ids += group
            weights += [weight] * len(group)
        if padding == "max":
            ids, weights = ids[: length - 1], weights[: length - 1]
        ids, weights = [*ids, T5_EOS], [*weights, 1.0]
        pad = max(0, length - len(ids))
        return ids + [T5_PAD] * pad, weights + [1.0] * pad

    @staticmethod
    def empty(length: int) -> list[int]:
        """The empty prompt at `length` tokens, as ComfyUI's `gen_empty_tokens` makes it for
        T5 (no start token): EOS, then padding."""
        return [T5_EOS] + [T5_PAD] * (length - 1)
