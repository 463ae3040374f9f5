"""Folders only this user can write: where compiled code is cached and loaded from.

A library loaded with `ctypes.CDLL` (mlxflux's CPU loop) or `dlopen` (MLX's compiled CPU
kernels, cached under `$TMPDIR/mlx/<version>/cpu`) runs with the user's rights: its constructor
runs as it loads. On a shared Linux `/tmp` anyone can create the folder first and plant a
library under the name that will be loaded. So compiled code lives in the user's own cache
(`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS), in folders made 0700,
and nothing is loaded from a path that another user owns or can write (`trusted`).
"""

import os
import stat
import sys
import tempfile
from pathlib import Path


class UntrustedPath(OSError):
    """A file, or a folder on its path, that someone else could have written."""


def cache_root() -> Path:
    """The user's cache folder: ~/Library/Caches on macOS, $XDG_CACHE_HOME or ~/.cache."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"


def private_folder(*parts: str) -> Path:
    """`<cache root>/mlxflux/<parts>`, each missing folder created 0700, and checked
    (`trusted`)."""
    folder = cache_root()
    for part in ("", "mlxflux", *parts):
        folder = folder / part if part else folder
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)  # whatever the umask
    return trusted(folder)


def trusted(path: Path) -> Path:
    """`path` if it and every folder above it are safe to load code from: not a symbolic link,
    owned by this user or by root, and writable by nobody else (a root-owned sticky folder such
    as /tmp may be above it: others cannot rename or delete what is inside). UntrustedPath
    otherwise, naming the path and the reason."""
    uid = os.geteuid()
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        raise UntrustedPath(f"{path}: a symbolic link")
    real = Path(os.path.realpath(path))  # folders above it may be links (macOS: /var)
    for i, p in enumerate([real, *real.parents]):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            raise UntrustedPath(f"{p}: a symbolic link")
        if st.st_uid not in (uid, 0):
            raise UntrustedPath(f"{p}: owned by another user (uid {st.st_uid})")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0
        if writable and not (i > 0 and sticky):
            raise UntrustedPath(f"{p}: group or others can write it")
    return path


def use_private_tmpdir() -> Path | None:
    """Point this process's temporary folder (TMPDIR, which MLX's CPU compiler caches its
    kernels under) at a private folder when the current one is shared: on Linux, /tmp. Returns
    the new folder, or None when the current one is already private (macOS gives each user
    its own). Call it before MLX compiles anything: MLX reads TMPDIR at each compile."""
    current = Path(tempfile.gettempdir())
    try:
        trusted(current)
        return None
    except (UntrustedPath, OSError):
        pass
    folder = private_folder("tmp")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # Python's own temporary files follow
    return folder
