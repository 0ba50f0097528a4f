"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from mtp.errors import MTPError


def atomic_write(path: str | Path, chunks: Iterable[str | bytes], binary: bool = False) -> int:
    """Write `chunks` (str, or bytes when binary) to `path` through a temporary file in the same
    directory, fsync, then rename over `path`. Returns the number of characters (or bytes)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    size = 0
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def check_writable(path: str | Path, flag: str = "--out", directory: bool = False) -> Path:
    """Refuse (MTPError) an output path that cannot be written, before any work is done.

    `path` is a file to write (or replace), or with `directory` a directory to create or write
    into. Its nearest existing ancestor (the directory itself, when it exists) must be a
    directory in which a file can be created: that is tried for real, with a temporary file made
    and removed at once, since permission bits say nothing for root, nor for read-only mounts.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not directory:
        raise MTPError(f"cannot write {flag} {path}: it is a directory")
    if path.exists() and not path.is_dir() and directory:
        raise MTPError(f"cannot write {flag} {path}: it is a file, not a directory")
    base = path if directory and path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise MTPError(f"cannot write {flag} {path}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".mtp-write-check-")
    except OSError as e:
        raise MTPError(f"cannot write {flag} {path}: cannot create files in {base} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return path
