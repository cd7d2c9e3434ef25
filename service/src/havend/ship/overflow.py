"""Journal overflow: when the journal is full (or unreadable), changes are
tracked by 64 KiB region instead (``DirtyRegions``, in memory), and the
regions are resynced by hash once the target is reachable. Also what a
restart finds: an overflow before it (the map was lost: every region is
dirty) or a machine crash under a running havend (``running`` holds another
boot id: every region is compared).

Files, in the group's state directory: ``overflowed`` (present from an
overflow until its resync is done) and ``running`` (the boot id while havend
runs; removed at a clean stop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from havend.bitmap import mark_range, set_runs
from havend.cdp.checkpoint import Checkpoint
from havend.errors import JournalCorruptError
from havend.fsutil import write_atomic
from havend.journal import Kind
from havend.ship.loop import call_in

if TYPE_CHECKING:
    from havend.ship.source import SourceGroup

log = logging.getLogger("havend.source")

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

    def add_volume(self, size: int) -> None:
        """A volume added to the group while regions are tracked: dirty whole."""
        self.sizes = [*self.sizes, size]
        self.bits.append(bytearray([0xFF]) * ((size // DIRTY_CHUNK + 8) // 8))

    def mark(self: SourceGroup, volume: int, offset: int, length: int) -> None:
        mark_range(self.bits[volume], 0, offset, length, DIRTY_CHUNK)

    def merge(self: SourceGroup, other: DirtyRegions) -> None:
        self.since = min(self.since, other.since)
        for mine, theirs in zip(self.bits, other.bits, strict=True):
            for i, byte in enumerate(theirs):
                mine[i] |= byte

    def ranges(self: SourceGroup, volume: int) -> list[tuple[int, int]]:
        """(offset, length) runs of dirty chunks, clipped to the volume."""
        return set_runs(self.bits[volume], 0, self.sizes[volume], DIRTY_CHUNK)

    def dirty_bytes(self: SourceGroup) -> int:
        return sum(n for v in range(len(self.sizes)) for _, n in self.ranges(v))


class OverflowTracking:
    """SourceGroup's part: entering and leaving overflow."""

    def _overflow_flag(self: SourceGroup) -> str | None:
        return os.path.join(self.state_dir, "overflowed") if self.state_dir else None

    def attach_state(self: SourceGroup, state_dir: str) -> None:
        """Where the group keeps its markers (call before :meth:`replay`). A group
        that overflowed before a crash lost its dirty map: every region is dirty
        then (a full hash resync, in which only differing blocks travel)."""
        self.state_dir = state_dir
        flag = self._overflow_flag()
        if flag and os.path.exists(flag):
            self.overflow = DirtyRegions(
                self.region_sizes(), everything=True, reason="restart after overflow"
            )
            log.warning("group %s: overflowed before a restart: full hash resync due", self.name)
        running = os.path.join(state_dir, "running")
        with contextlib.suppress(FileNotFoundError), open(running) as f:
            if f.read().strip() != _boot_id() and self.overflow is None:
                # The machine went down under us: a write may have reached a volume
                # while its journal record was torn, so compare every block.
                self.overflow = DirtyRegions(
                    self.region_sizes(), everything=True, reason="machine restart"
                )
                if flag:
                    write_atomic(flag, b"1\n")
                log.warning(
                    "group %s: the machine restarted while havend ran: full hash resync due",
                    self.name,
                )
        write_atomic(running, _boot_id().encode() + b"\n")

    def enter_overflow(
        self: SourceGroup, *, everything: bool = False, reason: str = "journal overflow"
    ) -> None:
        """The journal is full or unreadable (lock held): track dirty regions from
        now on; ``everything`` marks all of them (a full hash resync)."""
        self.journal.sync()
        self._sync_volumes(self.journal.last_seq)  # nothing before this needs a replay
        self.overflow = DirtyRegions(self.region_sizes(), everything, reason)
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

    def take_overflow(self: SourceGroup) -> tuple[DirtyRegions, int]:
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
                    self.region_sizes(), everything=True, reason="journal unreadable"
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

    def give_back_overflow(self: SourceGroup, regions: DirtyRegions) -> None:
        """A resync failed: its regions are dirty again."""
        with self.lock:
            if self.overflow is None:
                self.overflow = DirtyRegions(self.region_sizes())
            self.overflow.merge(regions)

    def overflow_resolved(self: SourceGroup) -> None:
        flag = self._overflow_flag()
        if flag and self.overflow is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(flag)

    def _journal_extents(self: SourceGroup) -> list[tuple[int, int, int]]:
        """What the unacknowledged records change (the journal is about to be
        replaced by a region resync). Checkpoints among them cannot survive
        that (the target never sees the write order they mark): say so."""
        extents, lost = [], []
        for r in self.records_after(self.acked_seq):
            if r.kind == Kind.CHECKPOINT:
                lost.append(Checkpoint.from_record(r))
            elif r.kind != Kind.VOLUME:  # a lost VOLUME marker: the HELLO says it too
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


def _boot_id() -> str:
    """Changes at every boot of the machine (Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
