"""The source side of a consistency group: capture writes into the journal, commit
them in groups, track what the target has acknowledged.

Every change to a member volume goes through :class:`ReplicatedVolume`, which
writes the local copy and appends a journal record under the group's lock, so
the journal's order is the order in which the local copy changed (two
overlapping writes in flight can never leave the copy and the journal
disagreeing on which came last).

Durability follows a disk's promise: FLUSH (and FUA) return once the journal
records are on stable storage; in ``sync`` mode also once the target has them
(RPO 0). Records leave the journal only after the target acknowledged them and
the local copies were synced, so a crashed source replays what is left at start.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from havend.journal import Journal, Kind
from havend.journal.record import Record
from havend.volume import FileVolume

log = logging.getLogger("havend.source")

# Journal records carry at most this much data; larger writes become several
# consecutive records (the target applies them in order, like a disk would).
RECORD_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group: str
    name: str
    mode: str
    last_seq: int
    durable_seq: int
    acked_seq: int
    lag_records: int
    lag_bytes: int
    lag_seconds: float
    rpo_seconds: float
    rpo_ok: bool
    journal_used: int
    journal_capacity: int
    connected: bool
    shipped_bytes: int
    wire_bytes: int
    last_error: str
    resync: dict[str, Any] | None


class SourceGroup:
    """A consistency group on the source node: its volumes, journal and counters."""

    def __init__(
        self,
        group_id: uuid.UUID,
        name: str,
        volumes: list[tuple[str, FileVolume]],
        journal: Journal,
        *,
        mode: str = "async",
        rpo_seconds: float = 30.0,
    ) -> None:
        self.id = group_id
        self.name = name
        self.mode = mode
        self.rpo_seconds = rpo_seconds
        self.journal = journal
        self.lock = threading.Lock()
        self.volumes = [ReplicatedVolume(self, i, n, v) for i, (n, v) in enumerate(volumes)]
        self.acked_seq = journal.tail_seq - 1
        self.connected = False
        self.shipped_bytes = 0
        self.wire_bytes = 0
        self.last_error = ""
        # (seq, monotonic time, bytes) of records not yet acknowledged: lag figures.
        self._unacked: collections.deque[tuple[int, float, int]] = collections.deque()
        self._unacked_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.appended = asyncio.Event()  # new records: the committer has work
        self.durable = asyncio.Event()  # the durable seq moved: the shipper has work
        self.acked = asyncio.Event()  # the acked seq moved: sync-mode flushes wait on it
        self._release_task: asyncio.Task[None] | None = None
        self.resync: Any = None  # a ResyncProgress while a resync runs
        self.last_resync: Any = None

    # Start-up ----------------------------------------------------------------

    def replay(self) -> int:
        """Apply the journal's records to the local copies (after a crash the copies
        may lack what the journal has); returns how many were applied."""
        count, after = 0, self.journal.tail_seq - 1
        while records := self.journal.read(after, 16 << 20):
            for record in records:
                apply_record(self.volumes[record.volume].volume, record)
            count += len(records)
            after = records[-1].seq
        for member in self.volumes:
            member.volume.flush()
        now = time.monotonic()
        if self.journal.last_seq > self.acked_seq:  # unacked until the target says so
            self._unacked.append((self.journal.last_seq, now, self.journal.used_bytes))
            self._unacked_bytes = self.journal.used_bytes
        return count

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # Called by ReplicatedVolume under self.lock -----------------------------

    def _appended(self, seq: int, size: int) -> None:
        self._unacked.append((seq, time.monotonic(), size))
        self._unacked_bytes += size
        if threading.get_ident() == self._loop_thread:
            self.appended.set()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self.appended.set)

    # Durability --------------------------------------------------------------

    def commit(self) -> int:
        """Make every record appended so far durable (blocking; a worker thread)."""
        before = self.journal.durable_seq
        durable = self.journal.sync()
        if durable != before and self._loop is not None:
            self._loop.call_soon_threadsafe(self.durable.set)
        return durable

    async def flush(self) -> None:
        """What an NBD FLUSH waits for: journal durable, and in sync mode the target."""
        loop = asyncio.get_running_loop()
        seq = self.journal.last_seq
        await loop.run_in_executor(None, self.commit)
        if self.mode == "sync":
            await self.wait_acked(seq)

    async def wait_acked(self, seq: int) -> None:
        while self.acked_seq < seq:
            self.acked.clear()
            if self.acked_seq >= seq:
                break
            await self.acked.wait()

    async def committer(self, interval: float = 0.002) -> None:
        """Group commit in the background, so async shipping never waits for a FLUSH."""
        loop = asyncio.get_running_loop()
        while True:
            await self.appended.wait()
            self.appended.clear()
            await asyncio.sleep(interval)  # let a burst of writes share one fdatasync
            if self.journal.last_seq > self.journal.durable_seq:
                await loop.run_in_executor(None, self.commit)

    def on_ack(self, seq: int) -> None:
        """The target has everything up to ``seq`` durably (loop thread)."""
        if seq <= self.acked_seq:
            return
        self.acked_seq = seq
        while self._unacked and self._unacked[0][0] <= seq:
            self._unacked_bytes -= self._unacked.popleft()[2]
        self.acked.set()
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        loop = asyncio.get_running_loop()
        target = self.acked_seq
        await loop.run_in_executor(None, self._sync_and_release, target)

    def _sync_and_release(self, seq: int) -> None:
        for member in self.volumes:  # released records are no longer replayable
            member.volume.flush()
        self.journal.release_through(seq)

    # Status ---------------------------------------------------------------

    def status(self) -> GroupStatus:
        lag_seconds = time.monotonic() - self._unacked[0][1] if self._unacked else 0.0
        return GroupStatus(
            group=str(self.id),
            name=self.name,
            mode=self.mode,
            last_seq=self.journal.last_seq,
            durable_seq=self.journal.durable_seq,
            acked_seq=self.acked_seq,
            lag_records=self.journal.last_seq - self.acked_seq,
            lag_bytes=max(0, self._unacked_bytes),
            lag_seconds=round(lag_seconds, 3),
            rpo_seconds=self.rpo_seconds,
            rpo_ok=lag_seconds <= self.rpo_seconds,
            journal_used=self.journal.used_bytes,
            journal_capacity=self.journal.capacity_bytes,
            connected=self.connected,
            shipped_bytes=self.shipped_bytes,
            wire_bytes=self.wire_bytes,
            last_error=self.last_error,
            resync=self._resync_status(),
        )

    def _resync_status(self) -> dict[str, Any] | None:
        progress = self.resync or self.last_resync
        if progress is None:
            return None
        eta = progress.eta_seconds() if self.resync else 0.0
        return {
            "running": self.resync is not None,
            "reason": progress.reason,
            "total_bytes": progress.total_bytes,
            "done_bytes": progress.done_bytes,
            "sent_bytes": progress.sent_bytes,
            "wire_bytes": progress.wire_bytes,
            "eta_seconds": None if eta is None else round(eta, 1),
        }

    def close(self) -> None:
        self.journal.close()
        for member in self.volumes:
            member.volume.flush()
            member.volume.close()


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
            do()
            if kind == Kind.WRITE:
                view = memoryview(data)
                for start in range(0, len(view), RECORD_CHUNK):
                    chunk = view[start : start + RECORD_CHUNK]
                    seq = group.journal.append(kind, self.index, offset + start, chunk)
                    group._appended(seq, len(chunk))
            else:
                seq = group.journal.append(kind, self.index, offset, length=length)
                group._appended(seq, 0)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
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


def apply_record(volume: FileVolume, record: Record) -> None:
    """Carry out one journal record on a volume (source replay, target apply)."""
    if record.kind == Kind.WRITE:
        volume.write(record.offset, record.data)
    else:  # ZERO and TRIM both leave zeroes (a hole where the file system can)
        volume.write_zeroes(record.offset, record.length, may_trim=True)


def group_dir(state_dir: str, group_id: uuid.UUID) -> str:
    return os.path.join(state_dir, "groups", str(group_id))
