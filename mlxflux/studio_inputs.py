"""The LoRAs a studio's jobs may use (`mlxflux serve`): the .safetensors files of the folder the
server was started with (`--lora-dir`) and the ones uploaded from the page, by name. A job names
them; no other path is looked up, so no answer tells anything of the server's other files. Also
what a request may ask of the server (`Limits`) and the error a request gets (`BadRequest`)."""

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError
from .request import is_number, label_of, split_number

MAX_LORA_BYTES = 2 << 30  # an uploaded LoRA: FLUX LoRAs run from 20 MB to ~1.3 GB
LORA_SUFFIXES = (".safetensors",)


class BadRequest(Exception):
    """A request that cannot run: 400 with its one-line message and the field it is about."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @classmethod
    def of(cls, e: SettingsError) -> "BadRequest":
        """A refused setting in the page's words: its field's label."""
        return cls(f"{label_of(e.name)}: {e.reason}", e.name)


@dataclass(frozen=True)
class Limits:
    """What one job may ask of the server, with why (`serve --max-images` and the rest)."""

    images: int = 64  # a job holds the queue for all of them
    steps: int = 150  # FLUX.1 dev draws in 20-50; more holds the queue for nothing
    megapixels: float = 4.2  # 2048x2048: twice what FLUX.1 was trained at (~2 MP)

    def check(self, request, field: str = "count") -> None:
        """`field`: the setting that chose how many images ("count" or "seeds")."""
        n = len(request.seeds)
        if n > self.images:
            raise BadRequest(f"{label_of(field)}: {n} images is over this server's "
                             f"{self.images} per job (serve --max-images)", field)  # fmt: skip
        if request.steps is not None and request.steps > self.steps:
            raise BadRequest(f"{label_of('steps')}: {request.steps} is over this server's "
                             f"{self.steps} (serve --max-steps)", "steps")  # fmt: skip

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.megapixels * 1e6:
            field = "width" if width >= height else "height"
            raise BadRequest(f"{label_of(field)}: {width}x{height} is {width * height / 1e6:.1f} "
                             f"megapixels, over this server's {self.megapixels:g} "
                             "(serve --max-megapixels)", field)  # fmt: skip


def files_in(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """A served folder's files with these suffixes, by their path in it ("sub/name.ext");
    links that lead out of the folder are left out. None: none."""
    found = {}
    if folder is not None and folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in suffixes and path.is_file():
                real = path.resolve()
                if real.is_relative_to(folder):  # no link out of the folder
                    found[path.relative_to(folder).as_posix()] = real
    return found


class LoraLibrary:
    """The LoRAs by name: `folder`'s (None: none) and those uploaded into `uploads`."""

    def __init__(self, folder: str | Path | None, uploads: Path):
        self.folder = Path(folder).expanduser().resolve() if folder else None
        self.uploads = uploads
        self.uploads.mkdir(parents=True, exist_ok=True)

    def names(self) -> dict[str, Path]:
        """Every LoRA a job may name: the --lora-dir's .safetensors files (their paths there),
        then the uploaded ones ("uploaded/NAME")."""
        found = files_in(self.folder, LORA_SUFFIXES)
        for path in sorted(self.uploads.iterdir()):
            found[f"uploaded/{path.name}"] = path
        return found

    def find(self, items) -> list[tuple[Path, float]]:
        """The "loras" setting: NAME, NAME:SCALE, [NAME, SCALE] or {"name", "scale"}, each a
        name of `names()`; nothing else is looked up on disk."""
        if isinstance(items, str) or not isinstance(items, list):
            raise BadRequest(f"{label_of('loras')}: a list of names from the LoRA list", "loras")
        known, out = self.names(), []
        for item in items:
            if isinstance(item, dict):
                item = [item.get("name"), item.get("scale", 1.0)]
            if isinstance(item, str):
                name, scale = split_number(item)
                item = [name, 1.0 if scale is None else scale]
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise BadRequest(f"{label_of('loras')}: each is a name, NAME:SCALE or "
                                 "[name, scale]", "loras")  # fmt: skip
            name, scale = item
            if name not in known:
                how = ("GET /api/loras lists them; or upload it" if known or self.folder else
                       "it takes LoRAs uploaded from the page, or from the folder it was "
                       "started with: serve --lora-dir")  # fmt: skip
                raise BadRequest(f"{label_of('loras')}: {_shown(name)} is not one of this "
                                 f"server's LoRAs ({how})", "loras")  # fmt: skip
            if isinstance(scale, bool) or not is_number(scale):
                raise BadRequest(f"{label_of('loras')}: the scale of {name} is not a number",
                                 "loras")  # fmt: skip
            out.append((known[name], float(scale)))
        return out

    def add(self, filename: str | None, chunks) -> str:
        """An uploaded LoRA (`chunks`: its bytes, in pieces), kept for this session after its
        header is read; its name in `names()`."""
        from .safetensors_io import SafetensorsError, SafetensorsFile

        name = safe_name(filename)
        if not name.lower().endswith(LORA_SUFFIXES):
            raise BadRequest("LoRA: a .safetensors file", "lora")
        tmp = self.uploads / f".{uuid.uuid4().hex}.part"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_LORA_BYTES:
                        raise BadRequest(f"LoRA: {name} is over the {MAX_LORA_BYTES >> 30} GiB "
                                         "limit", "lora")  # fmt: skip
                    f.write(chunk)
            try:
                SafetensorsFile(tmp)
            except SafetensorsError as e:
                reason = str(e).removeprefix(f"{tmp}: ")
                raise BadRequest(f"LoRA: {name} is not a safetensors file ({reason})",
                                 "lora") from None  # fmt: skip
            tmp.replace(self.uploads / name)
        finally:
            tmp.unlink(missing_ok=True)
        return f"uploaded/{name}"


def _shown(name: str) -> str:
    """A name the client sent, quoted and cut short (never a path we looked at)."""
    return repr(name[:80] + ("..." if len(name) > 80 else ""))


def safe_name(filename: str | None) -> str:
    """An upload's own file name reduced to its last part and harmless characters."""
    name = Path((filename or "").replace("\\", "/")).name
    name = re.sub(r"[^\w.\- ]", "_", name).strip(" .")
    return name[:100]
