"""Capture: every change to a member volume of a source group, journaled.

:class:`ReplicatedVolume` is what the NBD server serves: it appends the
journal record and writes the local copy under the group's lock, so the
journal's order is the order in which the local copy changed (two
overlapping writes in flight can never leave the copy and the journal
disagreeing on which came last). While the journal is full, changes are
tracked by region instead (``ship.overflow``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from havend.journal import JournalFull, Kind
from havend.ship.overflow import DirtyRegions
from havend.volume import FileVolume

if TYPE_CHECKING:
    from havend.ship.source import SourceGroup

log = logging.getLogger("havend.source")


class ReplicatedVolume:
    """A member volume as the NBD server sees it: FileVolume's interface, journaled."""

    def __init__(self, group: SourceGroup, index: int, name: str, volume: FileVolume) -> None:
        self.group = group
        self.index = index
        self.name = name
        self.volume = volume
        self.path = volume.path
        self.size = volume.size
        self.read_only = False
        self.removed = False  # taken out of its group: no longer captured

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def _change(
        self,
        kind: Kind,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview,
        do: Callable[[], None],
    ) -> None:
        group = self.group
        with group.lock:
            if group.fence is not None:  # failed over (or failing over): not the live copy
                raise OSError(errno.EROFS, f"group {group.name}: {group.fence.reason}")
            if self.removed:
                raise OSError(errno.EROFS, f"volume {self.name} was removed from {group.name}")
            group.last_write_time = time.time()
            # The record goes first: if havend dies between the two steps, the
            # restart replays the record into the volume (never a volume change
            # that no record carries, which the replica would never get).
            if group.overflow is None:
                try:
                    if kind == Kind.WRITE:
                        view = memoryview(data)
                        step = group.record_chunk
                        for start in range(0, len(view), step):
                            chunk = view[start : start + step]
                            seq = group.journal.append(
                                kind, self.index, offset + start, chunk, owned=True
                            )
                            group._appended(seq, len(chunk))
                    else:
                        seq = group.journal.append(kind, self.index, offset, length=length)
                        group._appended(seq, 0)
                except (JournalFull, OSError):  # full, or its disk is: the write stands
                    group.enter_overflow()
            if group.overflow is not None:  # the application never waits for the journal
                group.overflow.mark(self.index, offset, length)
            try:
                do()
            except OSError as exc:
                self._local_change_failed(kind, offset, length, exc)
                raise  # the client gets its error (EIO, ENOSPC...)

    def _local_change_failed(self, kind: Kind, offset: int, length: int, exc: OSError) -> None:
        """The record is journaled but the local copy refused the change (lock
        held): the copies must not disagree on what the range holds, so journal
        what the local copy holds now (it ships after the failed record and
        wins); if even that cannot be read, the range is resynced by hash."""
        group = self.group
        log.error(
            "group %s: %s of %d bytes at %d on volume %s failed: %s; the replica will "
            "match what the local copy holds",
            group.name,
            kind.name,
            length,
            offset,
            self.name,
            exc,
        )
        if group.overflow is None:
            try:
                step = group.record_chunk
                for start in range(0, length, step):
                    n = min(step, length - start)
                    held = self.volume.read(offset + start, n)
                    seq = group.journal.append(
                        Kind.WRITE, self.index, offset + start, held, owned=True
                    )
                    group._appended(seq, n)
                return
            except (JournalFull, OSError) as again:
                log.error("group %s: reading it back failed too (%s): resync", group.name, again)
        if group.overflow is None:
            try:
                group.enter_overflow(reason=f"a local write failed on volume {self.name}")
            except OSError as broken:  # the volume cannot even be synced: compare them all
                log.error("group %s: %s: every region will be compared", group.name, broken)
                group.overflow = DirtyRegions(
                    group.region_sizes(), everything=True, reason="volume failing"
                )
        group.overflow.mark(self.index, offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write and journal ``data``, which is handed over: the journal keeps it
        in memory for the shipper, so it must never change afterwards (an NBD
        request's payload)."""
        self._change(Kind.WRITE, offset, len(data), data, lambda: self.volume.write(offset, data))

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write(offset, data)
        self.group.commit()

    def flush(self) -> None:
        self.group.commit()

    async def flush_async(self) -> None:
        await self.group.flush()

    def trim(self, offset: int, length: int) -> None:
        # Zeroed, not just discarded: both copies must read back the same bytes.
        self._change(
            Kind.TRIM,
            offset,
            length,
            b"",
            lambda: self.volume.write_zeroes(offset, length, may_trim=True),
        )

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        self._change(
            Kind.ZERO,
            offset,
            length,
            b"",
            lambda: self.volume.write_zeroes(offset, length, may_trim=may_trim),
        )

    def close(self) -> None:
        pass  # the group owns the file
