"""Crash-safe file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through an fsynced temporary file in the same directory and an atomic rename,
    so readers see the old content or the new one, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:32]}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give what open() would (shared caches)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (a directory after a rename in it, so the rename survives a power cut).
    Platforms that cannot open a directory skip it: the rename itself is still atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: object, **dumps_kwargs: object) -> None:
    """`atomic_write_text` of `json.dumps(obj)` plus a newline, then fsync of the directory."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")
    fsync_path(Path(path).parent)
