"""The source side of a consistency group: the journal its writes go into
(through ``ship.capture``), commits in groups, what the target has
acknowledged, and releasing the journal behind it. Overflow, fencing and
reverse staging are the group's too, in ``ship.overflow``, ``ship.fence`` and
``ship.reverse``.

Durability follows a disk's promise: FLUSH (and FUA) return once the journal
records are on stable storage; in ``sync`` mode also once the target has them
(RPO 0). Records are shipped as soon as they are appended, synced or not: a
havend crash loses nothing from the page cache, and a machine crash makes the
next start compare every block with the target anyway (see ``attach_state``).
Records leave the journal only after the target acknowledged them and the
local copies were synced, so a crashed source replays what is left at start.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.retention import RetentionPolicy
from havend.errors import CheckpointError, JournalCorruptError
from havend.fsutil import write_atomic
from havend.journal import Journal, Kind
from havend.journal.record import Record
from havend.members import REMOVED, SYNCING, Slot
from havend.ship.capture import ReplicatedVolume
from havend.ship.fence import Fencing
from havend.ship.loop import call_in
from havend.ship.members import Membership
from havend.ship.overflow import DirtyRegions, OverflowTracking
from havend.ship.records import Fence
from havend.ship.reverse import ReverseStaging
from havend.volume import FileVolume, apply_record

log = logging.getLogger("havend.source")

# Journal records carry at most this much data; larger writes become several
# consecutive records (the target applies them in order, like a disk would).
RECORD_CHUNK = 1 << 20
# Records not yet acknowledged by the target, and not synced, after which the
# journal is synced in the background (see SourceGroup._appended): a FLUSH then
# finds little left to write, while records the target acknowledges in time
# never reach the local disk (their segment is deleted first).
BACKGROUND_SYNC_BYTES = 128 << 20
# Seconds a checkpoint marker waits for the target's ACK before the source
# syncs its journal for it (see SourceGroup.commit_through).
ACK_PATIENCE = 5.0


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
    last_checkpoint: dict[str, Any] | None
    lost_checkpoints: list[str]
    fence: dict[str, Any] | None  # Fence.to_dict()
    paused: bool
    generation: str | None  # the replica's (as its target said), or the promoted one


# Dirty-region tracking after a journal overflow works in chunks of this size.


class SourceGroup(OverflowTracking, Fencing, ReverseStaging, Membership):
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
        background_sync_bytes: int = BACKGROUND_SYNC_BYTES,
        slots: list[Slot] | None = None,
    ) -> None:
        """``volumes``: (name, local copy) per slot, in slot order; ``slots``:
        what ``members.json`` keeps of them (None: they are slots 0, 1...,
        all protected)."""
        self.id = group_id
        self.name = name
        self.mode = mode
        self.rpo_seconds = rpo_seconds
        self.journal = journal
        # A record must fit a segment with room to spare (see RECORD_CHUNK).
        self.record_chunk = min(RECORD_CHUNK, (journal.segment_size // 4) & ~4095)
        self.lock = threading.Lock()
        self.volumes = [ReplicatedVolume(self, i, n, v) for i, (n, v) in enumerate(volumes)]
        self.slots = (
            slots
            if slots is not None
            else [Slot(i, m.name, m.path, m.size) for i, m in enumerate(self.volumes)]
        )
        for slot, member in zip(self.slots, self.volumes, strict=True):
            member.removed = slot.state == REMOVED
        self.acked_seq = journal.tail_seq - 1
        self.connected = False
        self.shipped_bytes = 0
        self.wire_bytes = 0
        self.last_error = ""
        # (seq, monotonic time, bytes) of records not yet acknowledged: lag figures.
        self._unacked: collections.deque[tuple[int, float, int]] = collections.deque()
        self._unacked_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ship_loop: asyncio.AbstractEventLoop | None = None
        self.appended = asyncio.Event()  # new records (or an overflow): the shipper has work
        self.acked = asyncio.Event()  # the acked seq moved: sync-mode flushes wait on it
        self.copy_wanted = asyncio.Event()  # a volume was added: its copy has work
        # Volume name -> the protected server it is a disk of (the config's
        # labels; the node keeps it current), sent to the target in every HELLO.
        self.labels: dict[str, str | None] = {}
        # Per added volume being copied: (seq, bytes copied through it), from
        # which its progress as the target acknowledges it is told.
        self._copy_marks: dict[int, collections.deque[tuple[int, int]]] = {}
        self._slots_saving = threading.Lock()  # one writer of members.json at a time
        self._release_task: asyncio.Task[None] | None = None
        self._volumes_synced_lock = threading.Lock()
        self.background_sync_bytes = background_sync_bytes  # 0: only FLUSH/FUA sync
        self._unsynced_bytes = 0  # appended since the last background sync began
        self._background_sync: concurrent.futures.Future[None] | None = None
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, f"havend-sync-{name}")
        self.resync: Any = None  # a ResyncProgress while a resync runs
        self.last_resync: Any = None
        # Set while the journal is full: changes are tracked by region instead.
        self.overflow: DirtyRegions | None = None
        self.state_dir: str | None = None  # where the overflow flag lives
        self.last_checkpoint: Checkpoint | None = None
        # Set while writes are refused (a failover in progress or done): why, and
        # the promotion record once the target says it was promoted.
        self.fence: Fence | None = None
        self.lost_checkpoints: list[str] = []  # ids lost to journal overflows (newest 100)
        # This clock's time of the newest write accepted (journaled or not): a
        # promoted target compares it with its promotion to tell a split brain.
        self.last_write_time: float | None = None
        self.paused = False  # shipping stopped by an operator
        self.generation: str | None = None  # the target's generation of this group
        # How many checkpoints the target keeps, and for how long (0: no limit).
        self.retention = RetentionPolicy()  # sent to the target in every HELLO

    # Volume sync marker ---------------------------------------------------
    # Records up to the marker are on stable storage in the volumes themselves,
    # so a restart does not replay them (after an overflow, the volumes hold
    # newer data than those records).

    def _synced_marker(self) -> int:
        if not self.state_dir:
            return 0
        try:
            with open(os.path.join(self.state_dir, "volumes_synced")) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def _sync_volumes(self, through_seq: int) -> None:
        # Callers in several threads (a release after an ACK, the shipper
        # leaving an overflow): one writer of the marker at a time.
        with self._volumes_synced_lock:
            for member in self.volumes:
                member.volume.flush()
            if self.state_dir:
                write_atomic(
                    os.path.join(self.state_dir, "volumes_synced"), f"{through_seq}\n".encode()
                )

    def records_after(self, seq: int, *, durable_only: bool = True) -> Iterator[Record]:
        """The journal's records after ``seq`` (those still held), in order,
        read 16 MiB at a time."""
        after = max(seq, self.journal.tail_seq - 1)
        while batch := self.journal.read(after, 16 << 20, durable_only=durable_only):
            yield from batch
            after = batch[-1].seq

    # Start-up ----------------------------------------------------------------

    def replay(self) -> int:
        """Apply the journal's records to the local copies (after a crash the copies
        may lack what the journal has); returns how many were applied."""
        count = 0
        for record in self.records_after(self._synced_marker()):
            apply_record(self.volumes[record.volume].volume, record)
            count += 1
        for member in self.volumes:
            member.volume.flush()
        if self.journal.last_seq >= self.journal.tail_seq:  # the newest write's time
            with contextlib.suppress(JournalCorruptError):
                newest = self.journal.read(self.journal.last_seq - 1, 1, durable_only=False)
                if newest:
                    self.last_write_time = newest[-1].timestamp_ns / 1e9
        now = time.monotonic()
        if self.journal.last_seq > self.acked_seq:  # unacked until the target says so
            self._unacked.append((self.journal.last_seq, now, self.journal.used_bytes))
            self._unacked_bytes = self.journal.used_bytes
        return count

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The node's loop (the caller's): NBD, sync-mode FLUSH waiting for
        ``acked``, releases after an ACK."""
        self._loop = loop
        self._ship_loop = loop

    def bind_shipper(self, loop: asyncio.AbstractEventLoop) -> None:
        """The shipper's loop, when it has one of its own: ``appended`` is its."""
        self._ship_loop = loop

    def _wake_shipper(self) -> None:
        """Set ``appended`` (any thread): the shipper has work."""
        # Already set: the shipper looks at the journal again anyway.
        if self._ship_loop is not None and not self.appended.is_set():
            call_in(self._ship_loop, self.appended.set)

    # Appending (ReplicatedVolume, under self.lock) ---------------------------

    def _appended(self, seq: int, size: int) -> None:
        """Bookkeeping after an append (group lock held)."""
        self._unacked.append((seq, time.monotonic(), size))
        self._unacked_bytes += size
        self._unsynced_bytes += size
        threshold = self.background_sync_bytes
        if threshold and min(self._unsynced_bytes, self._unacked_bytes) >= threshold:
            self._start_background_sync()
        self._wake_shipper()

    def _start_background_sync(self) -> None:
        """Sync the journal in a thread of its own (lock held): called once
        ``background_sync_bytes`` were appended since the last such sync began
        and as many are not acknowledged by the target. Writes are acknowledged
        from the page cache as before; the sync only starts their way to the
        disk early, so that the client's FLUSH (which waits for all of them)
        finds little left to write instead of gigabytes at once, and a crash
        without a FLUSH loses less. While the target keeps up, nothing is synced
        here: its acknowledgements release the segments, whose pages are then
        dropped unwritten. One at a time: while one runs, the next waits for
        more appends after it."""
        if self._background_sync is not None and not self._background_sync.done():
            return
        self._unsynced_bytes = 0
        with contextlib.suppress(RuntimeError):  # closing: the close syncs it all
            self._background_sync = self._syncer.submit(self._sync_in_background)

    def _sync_in_background(self) -> None:
        try:
            self.journal.sync()
        except OSError as exc:  # the next FLUSH fails with it: that one has a client
            log.warning("group %s: background journal sync failed: %s", self.name, exc)

    # Checkpoints ---------------------------------------------------------------

    def create_checkpoint(self, label: str = "", consistency: str = "crash") -> Checkpoint:
        """Put a checkpoint marker in the group's sequence. It stands for the
        volumes as after every write acknowledged before this call; it is
        shipped at once and the target keeps it once applied. Not synced here
        (the caller commits soon after, see :meth:`commit`): a crash of the
        machine before that loses the marker together with every unsynced
        write before it, never the one without the others."""
        checkpoint = Checkpoint.new(label, consistency)
        with self.lock:
            if self.overflow is not None:
                raise CheckpointError(
                    f"group {self.name} is tracking changed regions after a journal "
                    "overflow: checkpoints resume once the resync is done"
                )
            seq = self.journal.append(Kind.CHECKPOINT, 0, 0, checkpoint.payload(), owned=True)
            self._appended(seq, 0)
            self.last_checkpoint = dataclasses.replace(checkpoint, seq=seq)
        if self.state_dir:  # shown after a restart too (a play takes one per label)
            # Advisory, and off the checkpoint's path: written, not synced, by
            # the group's one sync thread (in order; close() waits for it).
            body = json.dumps(self.last_checkpoint.to_dict()).encode()
            path = os.path.join(self.state_dir, "last_checkpoint.json")
            with contextlib.suppress(RuntimeError):  # closing
                self._syncer.submit(write_atomic, path, body, durable=False)
        return self.last_checkpoint

    def load_last_checkpoint(self) -> None:
        """The last checkpoint taken here, as kept by :meth:`create_checkpoint`."""
        if not self.state_dir:
            return
        try:
            with open(os.path.join(self.state_dir, "last_checkpoint.json"), "rb") as f:
                body = f.read()
            self.last_checkpoint = Checkpoint.from_payload(int(json.loads(body)["seq"]), body)
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, CheckpointError) as exc:
            log.warning("group %s: last_checkpoint.json unreadable (%s): ignored", self.name, exc)

    # Durability --------------------------------------------------------------

    def commit(self) -> int:
        """Make every record appended so far durable (blocking; a worker thread).
        While the journal is full, changes live only in the volumes: sync those."""
        if self.overflow is not None or (
            self.state_dir and os.path.exists(os.path.join(self.state_dir, "overflowed"))
        ):
            for member in self.volumes:
                member.volume.flush()
        return self.journal.sync()

    async def commit_through(self, seq: int, patience: float = ACK_PATIENCE) -> None:
        """Make the records through ``seq`` durable without holding anyone up
        (a checkpoint marker): the target's ACK does it if it comes within
        ``patience`` seconds (they are on its stable storage then, and the
        local journal writes none of them: their segment is released before
        it is synced), else a local commit."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_acked(seq), patience)
            return
        await asyncio.get_running_loop().run_in_executor(None, self.commit)

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

    def on_ack(self, seq: int) -> None:
        """The target has everything up to ``seq`` durably (any thread: the
        shipper's). ``acked_seq`` moves at once; what waits for it (sync-mode
        flushes, journal releases) is told in the node's loop."""
        with self.lock:  # the counters are shared with the appending threads
            if seq <= self.acked_seq:
                return
            self.acked_seq = seq
            while self._unacked and self._unacked[0][0] <= seq:
                self._unacked_bytes -= self._unacked.popleft()[2]
        call_in(self._loop, self._acked_moved, seq)

    def _acked_moved(self, seq: int) -> None:
        """(Node's loop.) Wake what waits for acknowledgements; release the
        journal behind ``seq`` when it is time."""
        self.acked.set()
        # A segment whose records the target holds is deleted at once: its pages
        # still in the page cache are then dropped instead of written (the local
        # copies' fdatasync that a release costs writes what must reach the disk
        # anyway). The journal's own writes reach the disk only for what the
        # target does not hold yet: at a FLUSH, or by the background sync.
        if not self.journal.releasable(seq):
            return
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        """Release behind ``acked_seq`` until no whole segment is left to release
        (ACKs that came while one release ran find the task busy)."""
        loop = asyncio.get_running_loop()
        while self.journal.releasable(self.acked_seq):
            await loop.run_in_executor(None, self._sync_and_release, self.acked_seq)

    def _sync_and_release(self, seq: int) -> None:
        with self.lock:  # a change whose record is acknowledged may still be writing
            pass  # its local copy: taking the lock waits for it to finish
        self._sync_volumes(seq)  # released records can no longer be replayed
        self.journal.release_through(seq)

    # Status ---------------------------------------------------------------

    def status(self) -> GroupStatus:
        oldest = next(iter(self._unacked), None)  # acknowledgements pop it meanwhile
        lag_seconds = time.monotonic() - oldest[1] if oldest else 0.0
        lag_bytes = max(0, self._unacked_bytes)
        resync = self.resync
        if resync is not None:
            # The replica is not caught up until the target confirms the resync's
            # end (SYNC_DONE): a staged resync changes it only then, and a direct
            # one leaves it at no consistent point before. So the whole of what
            # the resync covers is lag while it runs, even once every block is
            # compared (a monitor must never read lag 0 during a resync).
            lag_seconds = max(lag_seconds, time.monotonic() - resync.started)
            lag_bytes += resync.total_bytes
        # An added volume's bytes not copied yet are not on the replica either
        # (its lag in seconds is not a write's: the other volumes' figures stand).
        lag_bytes += sum(s.size - s.copied for s in self.slots if s.state == SYNCING)
        overflow = self.overflow
        if overflow is not None:  # regions waiting for a resync: not on the replica yet
            lag_seconds = max(lag_seconds, time.monotonic() - overflow.since)
            lag_bytes += overflow.dirty_bytes()
        return GroupStatus(
            group=str(self.id),
            name=self.name,
            mode=self.mode,
            last_seq=self.journal.last_seq,
            durable_seq=self.journal.durable_seq,
            acked_seq=self.acked_seq,
            lag_records=self.journal.last_seq - self.acked_seq,
            lag_bytes=lag_bytes,
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
            last_checkpoint=self.last_checkpoint.to_dict() if self.last_checkpoint else None,
            fence=self.fence.to_dict() if self.fence is not None else None,
            lost_checkpoints=list(self.lost_checkpoints),
            paused=self.paused,
            generation=(self.fence.generation if self.fence is not None else None)
            or self.generation,
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
        self._syncer.shutdown(wait=True)  # no background sync on a closed journal
        self.journal.close()
        for member in self.volumes:
            member.volume.flush()
            member.volume.close()
        if self.state_dir:  # a clean stop: nothing to distrust at the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.state_dir, "running"))


def group_dir(state_dir: str, group_id: uuid.UUID) -> str:
    return os.path.join(state_dir, "groups", str(group_id))
