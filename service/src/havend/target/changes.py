"""What a promoted replica changed since its promotion: a crash-safe change map.

Failback ships back only the blocks the promoted side wrote (and those the old
source wrote but never shipped), so every block written after a promotion
must be known after any crash. Two levels, as in DRBD's activity log and
bitmap:

``changes.bitmap``
    One bit per 4 KiB block of every volume (volumes one after the other),
    rewritten atomically at every FLUSH (and on close): exact up to then.
``changes.active``
    Appended (and fdatasynced) before a write may reach the disk in a 4 MiB
    extent not listed yet: u16 volume, u32 extent, repeated. Emptied after the
    bitmap is written.

After a crash the blocks of every extent in ``changes.active`` count as
changed too: a superset, never less (failback compares them by hash anyway,
so only differing blocks travel).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Sequence

from havend.bitmap import mark_range, set_runs
from havend.fsutil import fsync_dir, write_atomic

BLOCK = 4096
EXTENT = 4 << 20
_ENTRY = struct.Struct("<HI")


class ChangeMap:
    def __init__(self, directory: str, sizes: Sequence[int]) -> None:
        self.directory = directory
        self.sizes = list(sizes)
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._bitmap_path = os.path.join(directory, "changes.bitmap")
        self._active_path = os.path.join(directory, "changes.active")
        self._starts = []  # first bit of each volume
        bits = 0
        for size in self.sizes:
            self._starts.append(bits)
            bits += (size + BLOCK - 1) // BLOCK
        self._bits = bytearray((bits + 7) // 8)
        # When the newest change was made (as of the bitmap's last write after
        # a restart): a split brain report gives each side's time range.
        self.last_change_time: float | None = None
        try:
            with open(self._bitmap_path, "rb") as f:
                saved = f.read()
                self.last_change_time = os.fstat(f.fileno()).st_mtime if any(saved) else None
            self._bits[: len(saved)] = saved[: len(self._bits)]
        except FileNotFoundError:
            pass
        self._count = int.from_bytes(self._bits, "little").bit_count()
        self._active: set[tuple[int, int]] = set()
        self._active_fd = os.open(
            self._active_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        fsync_dir(directory)
        leftover = os.pread(self._active_fd, os.fstat(self._active_fd).st_size, 0)
        if leftover:  # a crash: extents written since the last flush count whole
            for i in range(len(leftover) // _ENTRY.size):
                volume, extent = _ENTRY.unpack_from(leftover, i * _ENTRY.size)
                if volume < len(self.sizes):
                    start = extent * EXTENT
                    self._set(volume, start, min(EXTENT, self.sizes[volume] - start))
            self.flush()

    def _set(self, volume: int, offset: int, length: int) -> None:
        if length > 0:
            self._count += mark_range(self._bits, self._starts[volume], offset, length, BLOCK)

    def mark(self, volume: int, offset: int, length: int) -> None:
        """Before a change of ``length`` bytes at ``offset`` is issued."""
        if length <= 0:
            return
        first, last = offset // EXTENT, (offset + length - 1) // EXTENT
        with self._lock:
            new = [(volume, e) for e in range(first, last + 1) if (volume, e) not in self._active]
            if new:
                os.write(self._active_fd, b"".join(_ENTRY.pack(v, e) for v, e in new))
                os.fdatasync(self._active_fd)
                self._active.update(new)
            self._set(volume, offset, length)
            self.last_change_time = time.time()

    def flush(self) -> None:
        """The bitmap on stable storage, the activity log emptied (at FLUSH)."""
        with self._lock:
            write_atomic(self._bitmap_path, bytes(self._bits))
            if self._active or os.fstat(self._active_fd).st_size:
                os.ftruncate(self._active_fd, 0)
                os.fdatasync(self._active_fd)
                self._active.clear()

    def ranges(self, volume: int) -> list[tuple[int, int]]:
        """(offset, length) runs of changed blocks of a volume."""
        with self._lock:
            bits = bytes(self._bits)
        return set_runs(bits, self._starts[volume], self.sizes[volume], BLOCK)

    def changed_bytes(self) -> int:
        """Changed blocks x 4 KiB (cheap: counted as they are marked)."""
        return self._count * BLOCK

    def close(self) -> None:
        if self._active_fd >= 0:
            self.flush()
            os.close(self._active_fd)
            self._active_fd = -1
