"""Point-in-time views: a replica volume as of a retained checkpoint, over NBD.

A view reads the replica and lays the undo log's saved blocks over it (see
:mod:`havend.cdp.undo`), so opening one copies nothing. A writable view keeps
its writes in a sparse scratch file (copy-on-write by 4 KiB block) that is
deleted when the view closes: drills boot from it while replication goes on,
and nothing they write reaches the replica.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo import BLOCK, UndoLog, Volume
from havend.errors import VolumeError


class PointInTimeView:
    """One volume of a group as of one checkpoint: the NBD server's volume interface."""

    def __init__(
        self,
        undo: UndoLog,
        volumes: Sequence[Volume],
        volume: int,
        checkpoint: Checkpoint,
        *,
        scratch: str | None = None,
        name: str = "",
    ) -> None:
        self.undo = undo
        self.volumes = volumes
        self.volume = volume
        self.checkpoint = checkpoint
        self.size = volumes[volume].size
        self.path = name or f"view of volume {volume} at {checkpoint.id}"
        self.read_only = scratch is None
        self.scratch_path = scratch
        self._scratch_fd = -1
        self._written: set[int] = set()  # blocks that live in the scratch file
        self._lock = threading.Lock()
        undo.pin(checkpoint)
        if scratch is not None:
            try:
                self._scratch_fd = os.open(
                    scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
                os.ftruncate(self._scratch_fd, self.size)
            except OSError as exc:
                undo.unpin(checkpoint)
                raise VolumeError(f"cannot create the scratch file {scratch}: {exc}") from None

    def _base(self, offset: int, length: int) -> bytes:
        return self.undo.read(self.volumes, self.volume, self.checkpoint.seq, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        if self._scratch_fd < 0 or not self._written:
            return self._base(offset, length)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        with self._lock:
            mine = [b for b in range(first, last + 1) if b in self._written]
        if not mine:
            return self._base(offset, length)
        buf = bytearray(self._base(offset, length))
        for block in mine:
            start, end = max(offset, block * BLOCK), min(offset + length, (block + 1) * BLOCK)
            buf[start - offset : end - offset] = os.pread(self._scratch_fd, end - start, start)
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._scratch_fd < 0:
            raise VolumeError("this view is read-only")
        length = len(data)
        if length == 0:
            return
        view = memoryview(data)
        with self._lock:
            first, last = offset // BLOCK, (offset + length - 1) // BLOCK
            for block in (first, last):  # partly written edge blocks: copy them first
                if block in self._written:
                    continue
                start = block * BLOCK
                end = min(start + BLOCK, self.size)
                if offset > start or offset + length < end:
                    os.pwrite(self._scratch_fd, self._base(start, end - start), start)
                    self._written.add(block)
            done = os.pwrite(self._scratch_fd, view, offset)
            while done < length:
                done += os.pwrite(self._scratch_fd, view[done:], offset + done)
            self._written.update(range(first, last + 1))

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write(offset, data)  # the scratch file is thrown away: nothing to make durable

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True) -> None:
        step = 1 << 20
        for start in range(offset, offset + length, step):
            self.write(start, bytes(min(step, offset + length - start)))

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        """Nothing to do: a view's writes live only as long as the view."""

    @property
    def written_bytes(self) -> int:
        return len(self._written) * BLOCK

    def close(self) -> None:
        if self._scratch_fd >= 0:
            os.close(self._scratch_fd)
            self._scratch_fd = -1
            if self.scratch_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.scratch_path)
        if self.checkpoint is not None:
            self.undo.unpin(self.checkpoint)
            self.checkpoint = None  # type: ignore[assignment]
