"""Writing files and folders so that a crash, Ctrl-C or kill -9 never leaves half of one.

Everything is written under a hidden name that carries the writer's process id
(`.<name>.partial-<pid>-<random>`), then renamed or linked into place. What a killed process
left behind is recognised by that pid (its process is gone) and removed by the next writer of
the same name (`remove_stale`).
"""

import os
import shutil
import uuid
from pathlib import Path


def private_name(folder: Path, prefix: str) -> Path:
    """`folder/<prefix><pid>-<random>`: a name no other process or thread will pick."""
    return folder / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove what a killed process left: `<prefix><pid>-...` entries whose process is gone
    (kill -9 or a power cut skip the cleanup; Ctrl-C does not). Returns what was removed."""
    removed = stale(folder, prefix)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def stale(folder: Path, prefix: str) -> list[Path]:
    """`<prefix><pid>-...` entries of `folder` whose process is gone, sorted."""
    found = []
    for path in sorted(folder.glob(f"{prefix}*")):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            found.append(path)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; an old `out` is kept aside until the new one is
    in place, and put back if the move fails (`restore_folder` finishes what kill -9 cut)."""
    if out.exists():
        old = private_name(out.parent, f".{out.name}.old-")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def restore_folder(out: Path) -> None:
    """Before writing `out`: remove partial folders of dead writers, and put back an old folder
    that a writer killed between its two renames left aside."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.partial-")
    if not out.exists():
        for old in stale(out.parent, f".{out.name}.old-")[:1]:
            old.rename(out)
    remove_stale(out.parent, f".{out.name}.old-")
