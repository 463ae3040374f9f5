"""Finding the tokenizer files a model folder needs: CLIP vocab.json + merges.txt, T5 spiece.model.

ComfyUI files carry no tokenizers. They are looked for in --tokenizers, then beside the
sources (a diffusers download has tokenizer/ and tokenizer_2/), then fetched from public
repositories that ship the same files (a few MB), and otherwise the error says what to pass.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlxflux.errors import MlxfluxError

CLIP_VOCAB_SIZE = 49408
T5_PIECES = 32000
PUBLIC = {"clip": "openai/clip-vit-large-patch14", "t5": "google/t5-v1_1-xxl"}


class TokenizerError(MlxfluxError, ValueError):
    pass


@dataclass
class TokenizerFiles:
    vocab: Path
    merges: Path
    spiece: Path

    def copy_to(self, dest: Path) -> None:
        (dest / "clip").mkdir(parents=True)
        (dest / "t5").mkdir(parents=True)
        shutil.copyfile(self.vocab, dest / "clip" / "vocab.json")
        shutil.copyfile(self.merges, dest / "clip" / "merges.txt")
        shutil.copyfile(self.spiece, dest / "t5" / "spiece.model")


def _is_clip_vocab(path: Path) -> bool:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(vocab, dict)
        and len(vocab) == CLIP_VOCAB_SIZE
        and "<|endoftext|>" in vocab
        and (path.parent / "merges.txt").exists()
    )


def _is_t5_spiece(path: Path) -> bool:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return False
    return sp.get_piece_size() == T5_PIECES


def _search(folder: Path, depth: int = 3):
    """vocab.json / spiece.model files under folder, at most `depth` levels down."""
    found = {"vocab": [], "spiece": []}
    if not folder.is_dir():
        return found
    stack = [(folder, 0)]
    while stack:
        d, level = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for p in entries:
            if p.is_dir() and level < depth and not p.name.startswith("."):
                stack.append((p, level + 1))
            elif p.name == "vocab.json" and _is_clip_vocab(p):
                found["vocab"].append(p)
            elif p.name == "spiece.model" and _is_t5_spiece(p):
                found["spiece"].append(p)
    return found


def _download(log) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download

    log(f"fetching tokenizer files from {PUBLIC['clip']} and {PUBLIC['t5']} (a few MB)")
    vocab = Path(hf_hub_download(PUBLIC["clip"], "vocab.json"))
    hf_hub_download(PUBLIC["clip"], "merges.txt")
    spiece = Path(hf_hub_download(PUBLIC["t5"], "spiece.model"))
    return {"vocab": vocab, "spiece": spiece}


def find_tokenizers(explicit, sources, parts, log=print) -> TokenizerFiles:
    folders: list[Path] = []
    if explicit:
        folders.append(Path(explicit).expanduser())
    for s in sources:
        s = Path(s).expanduser()
        folders.append(s if s.is_dir() else s.parent)
    for part in parts.values():
        for f in part.files:
            folders.extend([f.path.parent, f.path.parent.parent])
    vocab = spiece = None
    for folder in dict.fromkeys(folders):
        found = _search(folder, depth=3 if folder in folders[:1] else 2)
        vocab = vocab or (found["vocab"][0] if found["vocab"] else None)
        spiece = spiece or (found["spiece"][0] if found["spiece"] else None)
        if vocab and spiece:
            break
    if explicit and not (vocab and spiece):
        missing = "vocab.json + merges.txt (CLIP)" if not vocab else "spiece.model (T5)"
        raise TokenizerError(f"{explicit}: no {missing} found in this folder")
    if not (vocab and spiece):
        try:
            fetched = _download(log)
        except Exception as e:  # offline, blocked, or hub errors: explain instead
            raise TokenizerError(
                "tokenizer files not found beside the sources and could not be downloaded "
                f"({type(e).__name__}); pass --tokenizers DIR with CLIP's vocab.json + "
                "merges.txt and T5's spiece.model (the tokenizer/ and tokenizer_2/ folders "
                "of the FLUX.1-dev repo)"
            ) from None
        vocab, spiece = vocab or fetched["vocab"], spiece or fetched["spiece"]
    return TokenizerFiles(vocab, vocab.parent / "merges.txt", spiece)
