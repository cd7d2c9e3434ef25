"""The source side of a consistency group: capture writes into the journal, commit
them in groups, track what the target has acknowledged.

Every change to a member volume goes through :class:`ReplicatedVolume`, which
writes the local copy and appends a journal record under the group's lock, so
the journal's order is the order in which the local copy changed (two
overlapping writes in flight can never leave the copy and the journal
disagreeing on which came last).

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
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from havend.bitmap import mark_range, set_runs
from havend.cdp.checkpoint import Checkpoint
from havend.cdp.retention import RetentionPolicy
from havend.cdp.undo import snapshot_ranges
from havend.errors import CheckpointError, JournalCorruptError
from havend.fsutil import write_atomic
from havend.journal import Journal, JournalFull, Kind
from havend.journal.record import Record
from havend.staging import stage, staged
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


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop the caller runs in, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def call_in(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` in ``loop``: at once if the caller runs in it (or there is
    no loop), else soon, from any thread; nothing once that loop is closed."""
    if loop is None or running_loop() is loop:
        fn(*args)
    else:
        with contextlib.suppress(RuntimeError):  # closed: the node is stopping
            loop.call_soon_threadsafe(fn, *args)


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
    fence: dict[str, Any] | None
    paused: bool
    generation: str | None  # the replica's (as its target said), or the promoted one


# Dirty-region tracking after a journal overflow works in chunks of this size.
DIRTY_CHUNK = 64 << 10


class DirtyRegions:
    """Which chunks of each volume changed while the journal was full."""

    def __init__(
        self, sizes: list[int], everything: bool = False, reason: str = "journal overflow"
    ) -> None:
        self.sizes = sizes
        self.reason = reason  # why these regions need a resync (shown in the status)
        self.since = time.monotonic()  # the oldest change they may hold
        fill = 0xFF if everything else 0
        self.bits = [bytearray([fill]) * ((s // DIRTY_CHUNK + 8) // 8) for s in sizes]

    def mark(self, volume: int, offset: int, length: int) -> None:
        mark_range(self.bits[volume], 0, offset, length, DIRTY_CHUNK)

    def merge(self, other: DirtyRegions) -> None:
        self.since = min(self.since, other.since)
        for mine, theirs in zip(self.bits, other.bits, strict=True):
            for i, byte in enumerate(theirs):
                mine[i] |= byte

    def ranges(self, volume: int) -> list[tuple[int, int]]:
        """(offset, length) runs of dirty chunks, clipped to the volume."""
        return set_runs(self.bits[volume], 0, self.sizes[volume], DIRTY_CHUNK)

    def dirty_bytes(self) -> int:
        return sum(n for v in range(len(self.sizes)) for _, n in self.ranges(v))


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
        background_sync_bytes: int = BACKGROUND_SYNC_BYTES,
    ) -> None:
        self.id = group_id
        self.name = name
        self.mode = mode
        self.rpo_seconds = rpo_seconds
        self.journal = journal
        # A record must fit a segment with room to spare (see RECORD_CHUNK).
        self.record_chunk = min(RECORD_CHUNK, (journal.segment_size // 4) & ~4095)
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
        self._ship_loop: asyncio.AbstractEventLoop | None = None
        self.appended = asyncio.Event()  # new records (or an overflow): the shipper has work
        self.acked = asyncio.Event()  # the acked seq moved: sync-mode flushes wait on it
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
        self.fence: dict[str, Any] | None = None
        self.lost_checkpoints: list[str] = []  # ids lost to journal overflows (newest 100)
        # This clock's time of the newest write accepted (journaled or not): a
        # promoted target compares it with its promotion to tell a split brain.
        self.last_write_time: float | None = None
        self.paused = False  # shipping stopped by an operator
        self.generation: str | None = None  # the target's generation of this group
        # How many checkpoints the target keeps, and for how long (0: no limit).
        self._retention = RetentionPolicy()  # sent to the target in every HELLO

    @property
    def retention(self) -> RetentionPolicy:
        """How many checkpoints the target keeps, and for how long."""
        return self._retention

    @retention.setter
    def retention(self, policy: RetentionPolicy | dict[str, Any]) -> None:
        # A dict is accepted while the node still assigns one (transition).
        self._retention = (
            policy if isinstance(policy, RetentionPolicy) else RetentionPolicy.from_dict(policy)
        )

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

    # Journal overflow -------------------------------------------------------

    def _overflow_flag(self) -> str | None:
        return os.path.join(self.state_dir, "overflowed") if self.state_dir else None

    def attach_state(self, state_dir: str) -> None:
        """Where the group keeps its markers (call before :meth:`replay`). A group
        that overflowed before a crash lost its dirty map: every region is dirty
        then (a full hash resync, in which only differing blocks travel)."""
        self.state_dir = state_dir
        flag = self._overflow_flag()
        if flag and os.path.exists(flag):
            self.overflow = DirtyRegions(
                [v.size for v in self.volumes], everything=True, reason="restart after overflow"
            )
            log.warning("group %s: overflowed before a restart: full hash resync due", self.name)
        running = os.path.join(state_dir, "running")
        with contextlib.suppress(FileNotFoundError), open(running) as f:
            if f.read().strip() != _boot_id() and self.overflow is None:
                # The machine went down under us: a write may have reached a volume
                # while its journal record was torn, so compare every block.
                self.overflow = DirtyRegions(
                    [v.size for v in self.volumes], everything=True, reason="machine restart"
                )
                if flag:
                    write_atomic(flag, b"1\n")
                log.warning(
                    "group %s: the machine restarted while havend ran: full hash resync due",
                    self.name,
                )
        write_atomic(running, _boot_id().encode() + b"\n")

    def enter_overflow(self, *, everything: bool = False, reason: str = "journal overflow") -> None:
        """The journal is full or unreadable (lock held): track dirty regions from
        now on; ``everything`` marks all of them (a full hash resync)."""
        self.journal.sync()
        self._sync_volumes(self.journal.last_seq)  # nothing before this needs a replay
        self.overflow = DirtyRegions([v.size for v in self.volumes], everything, reason)
        flag = self._overflow_flag()
        if flag:
            write_atomic(flag, b"1\n")
        log.warning(
            "group %s: %s (%d bytes unacknowledged): tracking changed regions; "
            "they are resynced once the link catches up",
            self.name,
            "journal full" if reason == "journal overflow" else reason,
            self._unacked_bytes,
        )
        self._wake_shipper()

    def take_overflow(self) -> tuple[DirtyRegions, int]:
        """Leave overflow for a resync: (regions to resync, seq the journal resumes
        after). The journal is emptied: the regions cover every record in it."""
        with self.lock:
            assert self.overflow is not None
            regions = self.overflow
            self.journal.sync()
            try:
                for record_volume, offset, length in self._journal_extents():
                    regions.mark(record_volume, offset, length)
            except JournalCorruptError:  # unreadable records: every region is suspect
                regions = DirtyRegions(
                    [v.size for v in self.volumes], everything=True, reason="journal unreadable"
                )
            resume = self.journal.last_seq
            self.overflow = regions  # still pending if the sync below fails
            self._sync_volumes(resume)
            self.overflow = None
        self.journal.release_through(resume)
        with self.lock:
            self.acked_seq = max(self.acked_seq, resume)
            self._unacked.clear()
            self._unacked_bytes = 0
        # Sync-mode flushes waiting on these records: they are covered.
        call_in(self._loop, self.acked.set)
        return regions, resume

    def give_back_overflow(self, regions: DirtyRegions) -> None:
        """A resync failed: its regions are dirty again."""
        with self.lock:
            if self.overflow is None:
                self.overflow = DirtyRegions([v.size for v in self.volumes])
            self.overflow.merge(regions)

    def overflow_resolved(self) -> None:
        flag = self._overflow_flag()
        if flag and self.overflow is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(flag)

    def records_after(self, seq: int, *, durable_only: bool = True) -> Iterator[Record]:
        """The journal's records after ``seq`` (those still held), in order,
        read 16 MiB at a time."""
        after = max(seq, self.journal.tail_seq - 1)
        while batch := self.journal.read(after, 16 << 20, durable_only=durable_only):
            yield from batch
            after = batch[-1].seq

    def _journal_extents(self) -> list[tuple[int, int, int]]:
        """What the unacknowledged records change (the journal is about to be
        replaced by a region resync). Checkpoints among them cannot survive
        that (the target never sees the write order they mark): say so."""
        extents, lost = [], []
        for r in self.records_after(self.acked_seq):
            if r.kind == Kind.CHECKPOINT:
                lost.append(Checkpoint.from_record(r))
            else:
                extents.append((r.volume, r.offset, r.length))
        if lost:
            self.lost_checkpoints = (self.lost_checkpoints + [c.id for c in lost])[-100:]
            log.warning(
                "group %s: %d checkpoints had not reached the target when the journal "
                "overflowed and are lost: %s",
                self.name,
                len(lost),
                ", ".join(f"{c.id} (seq {c.seq})" for c in lost),
            )
        return extents

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

    # Called by ReplicatedVolume under self.lock -----------------------------

    # Fencing and failover ------------------------------------------------------

    def _fence_path(self) -> str | None:
        return os.path.join(self.state_dir, "fence.json") if self.state_dir else None

    def load_fence(self) -> None:
        path = self._fence_path()
        if path and os.path.exists(path):
            with open(path) as f:
                self.fence = json.load(f)
            log.warning("group %s: writes are refused: %s", self.name, self.fence.get("reason"))

    def set_fence(self, fence: dict[str, Any] | None) -> None:
        """Refuse writes to the group's volumes from now on (None: accept them again);
        durable, so a restart keeps the group fenced."""
        with self.lock:  # no write is between its record and its local change
            self.fence = fence
            path = self._fence_path()
            if path:
                if fence is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                else:
                    write_atomic(path, json.dumps(fence, indent=1).encode())

    def promoted_elsewhere(self, promoted: dict[str, Any]) -> dict[str, Any]:
        """The target was promoted (a failover this node did not take part in, or
        did): fence the group and say exactly which writes never reached it."""
        applied = int(promoted.get("applied_seq", 0))
        if self.fence and self.fence.get("promoted", {}).get("generation") == promoted.get(
            "generation"
        ):
            return self.fence
        lost = self._writes_after(applied)
        fence = {
            "reason": f"the target was promoted at seq {applied} (generation "
            f"{promoted.get('generation')}): failed over",
            "promoted": promoted,
            "lost": lost,
        }
        self.set_fence(fence)
        if lost["records"] or lost.get("regions_bytes"):
            log.error(
                "group %s: FAILED OVER without us at seq %d: %d writes (%d bytes, seq %s to %s, "
                "written %s to %s) never reached the target; they are kept here for failback",
                self.name,
                applied,
                lost["records"],
                lost["bytes"],
                lost["first_seq"],
                lost["last_seq"],
                lost["first_time"],
                lost["last_time"],
            )
        else:
            log.warning(
                "group %s: the target was promoted at seq %d: no write lost", self.name, applied
            )
        return fence

    def writes_after_extents(self, seq: int) -> list[tuple[int, int, int]]:
        """(volume, offset, length) of the journaled changes after ``seq``."""
        return [
            (r.volume, r.offset, r.length)
            for r in self.records_after(seq, durable_only=False)
            if r.kind != Kind.CHECKPOINT
        ]

    def promotion_delta(
        self, changed: list, applied: int, reason: str
    ) -> tuple[DirtyRegions, int, int]:
        """What either side changed since a promotion at seq ``applied``: the
        target's ``changed`` ranges (per volume), this side's journaled writes
        after it, and the regions written while its journal was full; (those
        regions, bytes changed there, bytes of this side's unshipped writes)."""
        delta = DirtyRegions([v.size for v in self.volumes], reason=reason)
        changed_there = 0
        for index, ranges in enumerate(changed):
            for offset, length in ranges:
                delta.mark(index, int(offset), int(length))
                changed_there += int(length)
        unshipped = 0
        for index, offset, length in self.writes_after_extents(applied):
            delta.mark(index, offset, length)
            unshipped += length
        if self.overflow is not None:
            delta.merge(self.overflow)
        return delta, changed_there, unshipped

    def snapshot_before_failback(
        self, generation: str, regions: list[tuple[int, list[tuple[int, int]]]]
    ) -> dict[str, Any]:
        """Save what the volumes hold in ``regions`` before a failback overwrites
        it (the writes that never reached the target among them): an undo log
        with one checkpoint, kept under the group's state directory."""
        assert self.state_dir is not None
        checkpoint = Checkpoint(
            generation.replace("-", ""),
            self.journal.last_seq + 1,
            time.time(),
            "before failback",
            "crash",
        )
        return snapshot_ranges(
            os.path.join(self.state_dir, f"failback-{generation}"),
            [m.volume for m in self.volumes],
            checkpoint,
            [(index, offset, length) for index, ranges in regions for offset, length in ranges],
        )

    def finish_failback(self, resume_seq: int) -> None:
        """The volumes now equal the target's: make them durable and mark every
        record up to ``resume_seq`` as in them (a restart must not replay the
        superseded unshipped records over the data just pulled)."""
        with self.lock:
            self._sync_volumes(resume_seq)
            if self.overflow is not None:
                self.overflow = None
                self.overflow_resolved()

    # Reverse protection ---------------------------------------------------------
    # While failed over, rounds pull the recovery side's changes into the
    # volumes (fenced here), each as of one of its checkpoints: staged in a file
    # first, so a crash mid-way leaves the volumes at the previous round's
    # point, or finishes applying this one at the next start.

    def _reverse_paths(self) -> tuple[str, str]:
        assert self.state_dir is not None
        return (
            os.path.join(self.state_dir, "reverse.staging"),
            os.path.join(self.state_dir, "reverse.staged"),
        )

    def reverse_staging(self) -> BinaryIO:
        """An empty staging file for a round's blocks (see :meth:`stage`)."""
        staging, marker = self._reverse_paths()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        return open(staging, "wb")  # the round closes it

    @staticmethod
    def stage(staging: BinaryIO, volume: int, offset: int, data: bytes) -> None:
        stage(staging, volume, offset, data)

    def apply_reverse(self, staging: BinaryIO, round_: dict[str, Any]) -> None:
        """Every block of a round is staged: make that durable, then write them
        into the volumes and record the round in the fence."""
        staging.flush()
        os.fdatasync(staging.fileno())
        staging.close()
        _, marker = self._reverse_paths()
        write_atomic(marker, json.dumps(round_).encode())
        self._apply_staged(round_)

    def recover_reverse(self) -> None:
        """At start: finish applying a round that was staged whole before a crash."""
        if not self.state_dir:
            return
        staging, marker = self._reverse_paths()
        try:
            with open(marker) as f:
                round_ = json.load(f)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)  # a round cut short: the volumes never saw it
            return
        log.warning("group %s: finishing reverse round %s", self.name, round_.get("checkpoint"))
        self._apply_staged(round_)

    def _apply_staged(self, round_: dict[str, Any]) -> None:
        staging, marker = self._reverse_paths()
        with self.lock:
            # The journal's records are superseded: never replayed over these blocks.
            self._sync_volumes(self.journal.last_seq)
            with open(staging, "rb") as f:
                for volume, offset, data in staged(f):
                    self.volumes[volume].volume.write(offset, data)
            for member in self.volumes:
                member.volume.flush()
        fence = dict(self.fence or {})
        done = int((fence.get("reverse") or {}).get("rounds", 0))
        fence["reverse"] = round_ | {"rounds": done + 1}
        self.set_fence(fence)
        os.unlink(marker)
        os.unlink(staging)

    def _reclaimed_path(self) -> str:
        assert self.state_dir is not None
        return os.path.join(self.state_dir, "reclaimed.json")

    def reclaimed(self) -> dict[str, Any] | None:
        if not self.state_dir:
            return None
        try:
            with open(self._reclaimed_path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def reclaim(self) -> dict[str, Any]:
        """The recovery side is lost while failed over: production resumes here,
        from the last round of reverse protection. Its writes after that round
        are not here; if it comes back, both sides took writes: a split brain,
        reported, and resolved by an operator's choice."""
        fence = self.fence or {}
        promoted, reverse = fence.get("promoted"), fence.get("reverse")
        if not promoted:
            raise CheckpointError(f"group {self.name} has not failed over: nothing to reclaim")
        if fence.get("split_brain"):
            raise CheckpointError(f"group {self.name} is in a split brain: resolve it instead")
        if not reverse:
            raise CheckpointError(
                f"group {self.name} has no round of reverse protection: these volumes hold "
                "production as it was at the failover, not the recovery side's data"
            )
        record = {
            "time": time.time(),
            "generation": promoted["generation"],
            "reverse": reverse,
            "lag_seconds": round(time.time() - float(reverse["checkpoint_time"]), 3),
        }
        write_atomic(self._reclaimed_path(), json.dumps(record).encode())
        self.set_fence(None)
        log.error(
            "group %s: RECLAIMED: production resumes here at reverse round %s (the recovery "
            "side as of %.3f, %.1f s ago); its later writes are not here",
            self.name,
            reverse["checkpoint"],
            float(reverse["checkpoint_time"]),
            record["lag_seconds"],
        )
        return record

    def forget_reclaim(self) -> None:
        if self.state_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._reclaimed_path())

    def _writes_after(self, seq: int, since: float | None = None) -> dict[str, Any]:
        """The journaled writes after ``seq`` (and at or after the time ``since``,
        by this clock): the data-loss window of a failover, or this side's part
        of a split brain."""
        records = 0
        size = 0
        first = last = None
        blocks: set[tuple[int, int]] = set()
        since_ns = None if since is None else int(since * 1e9)
        with contextlib.suppress(JournalCorruptError):
            for r in self.records_after(seq, durable_only=False):
                if r.kind == Kind.CHECKPOINT:
                    continue
                if since_ns is not None and r.timestamp_ns < since_ns:
                    continue
                records += 1
                size += r.length
                first = first or r
                last = r
                if since_ns is not None and r.length:
                    blocks.update(
                        (r.volume, b)
                        for b in range(r.offset // 4096, (r.offset + r.length - 1) // 4096 + 1)
                    )
        regions = self.overflow.dirty_bytes() if self.overflow is not None else 0
        writes = {
            "records": records,
            "bytes": size,
            "first_seq": first.seq if first else None,
            "last_seq": last.seq if last else None,
            "first_time": first.timestamp_ns / 1e9 if first else None,
            "last_time": last.timestamp_ns / 1e9 if last else None,
            "regions_bytes": regions,  # written while the journal was full: by region
        }
        if since_ns is not None:
            writes["blocks"] = len(blocks)
        return writes

    def split_brain(
        self, promoted: dict[str, Any], since: float, offset: float, rtt: float
    ) -> dict[str, Any]:
        """The target was promoted and this side took writes after that (at or
        after ``since``, this clock's time of the promotion; the target's
        clock is ``offset`` s ahead, measured over a ``rtt`` s round trip):
        both copies diverged. Fence the group and say what this side wrote;
        nothing moves until an operator picks the side that survives (see
        ``Shipper.resolve``)."""
        applied = int(promoted.get("applied_seq", 0))
        here = self._writes_after(applied, since)
        fence = {
            "reason": f"SPLIT BRAIN: the target was promoted (generation "
            f"{promoted.get('generation')}) and this side took writes after that: both are "
            "fenced until a survivor is chosen (havend group resolve)",
            "promoted": promoted,
            "lost": self._writes_after(applied),
            "split_brain": {
                "detected": time.time(),
                "generation": promoted.get("generation"),
                "since": since,
                "clock_offset_s": round(offset, 6),
                "round_trip_s": round(rtt, 6),
                "production": here,
                "recovery": None,  # filled in once the target recorded it
            },
        }
        self.set_fence(fence)
        log.error(
            "group %s: SPLIT BRAIN with generation %s: %d writes here (%d bytes, %d blocks, seq "
            "%s to %s, written %s to %s) after the target's promotion at %.3f. Writes refused "
            "on both sides: choose the survivor with `havend group resolve`",
            self.name,
            promoted.get("generation"),
            here["records"],
            here["bytes"],
            here["blocks"],
            here["first_seq"],
            here["last_seq"],
            here["first_time"],
            here["last_time"],
            since,
        )
        return fence

    def split_brain_recorded(self, promoted: dict[str, Any], record: dict[str, Any]) -> None:
        """The target recorded the split brain: keep what it says it changed."""
        fence = self.fence or {}
        split = fence.get("split_brain")
        if not split or split.get("generation") != promoted.get("generation"):
            since = float((record.get("recovery") or {}).get("since") or promoted["time"])
            fence = self.split_brain(promoted, since, 0.0, 0.0)
            split = fence["split_brain"]
        if split.get("recovery") != record.get("recovery"):
            split["recovery"] = record.get("recovery")
            self.set_fence(fence)
            log.error(
                "group %s: split brain recorded by the target: %s bytes changed there since "
                "the promotion",
                self.name,
                (record.get("recovery") or {}).get("changed_bytes"),
            )

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
        return self.last_checkpoint

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
            fence=self.fence,
            lost_checkpoints=list(self.lost_checkpoints),
            paused=self.paused,
            generation=((self.fence or {}).get("promoted") or {}).get("generation")
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
            if group.fence is not None:  # failed over (or failing over): not the live copy
                raise OSError(errno.EROFS, f"group {group.name}: {group.fence['reason']}")
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
                    [v.size for v in group.volumes], everything=True, reason="volume failing"
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


def _boot_id() -> str:
    """Changes at every boot of the machine (Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def group_dir(state_dir: str, group_id: uuid.UUID) -> str:
    return os.path.join(state_dir, "groups", str(group_id))
