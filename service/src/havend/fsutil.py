"""Crash-safe file system steps shared by the journal and the node state."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, whole.
    ``durable=False`` skips the syncs, for files that are only ever advisory."""
    tmp = path + ".tmp"  # one writer per file at a time (callers serialize)
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fdatasync(f.fileno())
    os.rename(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")
