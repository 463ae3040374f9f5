"""Downloads from the Hugging Face Hub (huggingface-hub's cache, HF_TOKEN, HF_HUB_OFFLINE), each
failure said as one line that names the repo and what to do."""

import re
from pathlib import Path

from .errors import ConvertError


def snapshot(repo: str, patterns: list[str]) -> Path:
    """The files of `repo` matching `patterns`, downloaded into the Hugging Face cache (or
    found there); returns the snapshot's folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        raise ConvertError(gated_message(repo)) from None
    except LocalEntryNotFoundError:
        raise ConvertError(
            f"{repo}: not in the Hugging Face cache and the network is unavailable or "
            "HF_HUB_OFFLINE is set; connect, or pass local files with --from"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ConvertError(f"{repo}: download failed: {e}") from None


def gated_message(repo: str) -> str:
    return (
        f"{repo} is a gated repository: accept its license at https://huggingface.co/{repo} "
        "while logged in, then run `hf auth login` (or set HF_TOKEN) and try again"
    )


def locate(source, names: tuple[str, ...], what: str, log=print) -> Path:
    """A file given as itself, as a folder holding one of `names` (paths inside it, in the
    order looked for), or as a Hugging Face repo id (those files downloaded); ConvertError
    naming the source otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise ConvertError(f"{path}: holds no {what} file ({', '.join(names)})")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        log(f"downloading {source} from the Hugging Face Hub")
        return locate(snapshot(str(source), ["*.json", *names]), names, what, log)
    raise ConvertError(f"{path}: no such file or folder (nor a Hugging Face repo id)")
