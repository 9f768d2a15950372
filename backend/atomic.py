"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from backend import UserError


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file beside `path`, sync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, a quota: the old file is still there
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def check_writable(path: Path) -> None:
    """Refuse, before any work and without creating anything, a path write_atomic cannot write."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: cannot write (it is a directory)")
    folder = path.parent
    while not folder.exists():  # write_atomic creates the missing folders from here
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{path}: cannot write ({folder} is not a directory)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write (no permission to write in {folder})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
