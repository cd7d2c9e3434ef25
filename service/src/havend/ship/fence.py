"""Fencing, failover and split brain on the source: refusing writes while
the target is (being) promoted, what a failover lost, the failback's
snapshot, reclaiming production after losing the recovery side, and this
side's part of a split brain.

Files, in the group's state directory: ``fence.json`` (why writes are
refused: the fence, a :class:`havend.ship.records.Fence`; absent when they
are not), ``reclaimed.json`` (production resumed here after the recovery
side was lost), ``failback-<generation>/`` (the undo log saving, before a
failback or a first reverse round, what only this side had).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo import snapshot_ranges
from havend.errors import CheckpointError, JournalCorruptError
from havend.fsutil import write_atomic
from havend.link.promotion import LossWindow, Promoted, RecoverySide
from havend.ship.overflow import DirtyRegions
from havend.ship.records import Fence, SourceSplitBrain

if TYPE_CHECKING:
    from havend.ship.source import SourceGroup

log = logging.getLogger("havend.source")

# Operations that need a failed-over group: (what there is nothing to do, the
# advice in a split brain).
_NEEDS_FAILED_OVER = {
    "failback": (
        "fail back",
        "choose the surviving side first (havend group resolve --survivor recovery|production)",
    ),
    "reverse": ("protect", "resolve it first"),
    "reclaim": ("reclaim", "resolve it instead"),
}


class Fencing:
    """SourceGroup's part: the fence, failover, failback and split brain."""

    def _fence_path(self: SourceGroup) -> str | None:
        return os.path.join(self.state_dir, "fence.json") if self.state_dir else None

    def load_fence(self: SourceGroup) -> None:
        path = self._fence_path()
        if path and os.path.exists(path):
            with open(path) as f:
                self.fence = Fence.from_dict(json.load(f), record=path)
            log.warning("group %s: writes are refused: %s", self.name, self.fence.reason)

    def set_fence(self: SourceGroup, fence: Fence | None) -> None:
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
                    write_atomic(path, json.dumps(fence.to_dict(), indent=1).encode())

    def promoted_elsewhere(self: SourceGroup, promoted: Promoted) -> Fence:
        """The target was promoted (a failover this node did not take part in, or
        did): fence the group and say exactly which writes never reached it."""
        applied = promoted.applied_seq
        if self.fence and self.fence.generation == promoted.generation:
            return self.fence
        lost = self._writes_after(applied)
        fence = Fence(
            reason=f"the target was promoted at seq {applied} (generation "
            f"{promoted.generation}): failed over",
            promoted=promoted,
            lost=lost,
        )
        self.set_fence(fence)
        if lost.records or lost.regions_bytes:
            log.error(
                "group %s: FAILED OVER without us at seq %d: %d writes (%d bytes, seq %s to %s, "
                "written %s to %s) never reached the target; they are kept here for failback",
                self.name,
                applied,
                lost.records,
                lost.bytes,
                lost.first_seq,
                lost.last_seq,
                lost.first_time,
                lost.last_time,
            )
        else:
            log.warning(
                "group %s: the target was promoted at seq %d: no write lost", self.name, applied
            )
        return fence

    def writes_after_extents(self: SourceGroup, seq: int) -> list[tuple[int, int, int]]:
        """(volume, offset, length) of the journaled changes after ``seq``."""
        return [
            (r.volume, r.offset, r.length)
            for r in self.records_after(seq, durable_only=False)
            if not r.kind.is_marker
        ]

    def promotion_delta(
        self: SourceGroup, changed: list, applied: int, reason: str
    ) -> tuple[DirtyRegions, int, int]:
        """What either side changed since a promotion at seq ``applied``: the
        target's ``changed`` ranges (per volume), this side's journaled writes
        after it, and the regions written while its journal was full; (those
        regions, bytes changed there, bytes of this side's unshipped writes)."""
        delta = DirtyRegions(self.region_sizes(), reason=reason)
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
        self: SourceGroup, generation: str, regions: list[tuple[int, list[tuple[int, int]]]]
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

    def finish_failback(self: SourceGroup, resume_seq: int) -> None:
        """The volumes now equal the target's: make them durable and mark every
        record up to ``resume_seq`` as in them (a restart must not replay the
        superseded unshipped records over the data just pulled)."""
        with self.lock:
            self._sync_volumes(resume_seq)
            if self.overflow is not None:
                self.overflow = None
                self.overflow_resolved()

    def _reclaimed_path(self: SourceGroup) -> str:
        assert self.state_dir is not None
        return os.path.join(self.state_dir, "reclaimed.json")

    def reclaimed(self: SourceGroup) -> dict[str, Any] | None:
        if not self.state_dir:
            return None
        try:
            with open(self._reclaimed_path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def refusal(self: SourceGroup, kind: str) -> str | None:
        """Why this group cannot run ``kind`` (a failover operation) as it is
        now, in the words its refusal uses; None when nothing here forbids it.
        The one place these preconditions are written: the operations run
        here check them, and the operations layer quotes them."""
        fence = self.fence
        promoted = fence.promoted if fence is not None else None
        split = fence.split_brain if fence is not None else None
        if kind == "failover":
            if fence is None:
                return None
            if promoted is None and fence.stage and fence.pid != os.getpid():
                # the fence of a planned failover this node was running when it stopped
                return (
                    f"group {self.name} is fenced already: a planned failover that an "
                    f"earlier run of this node left at {fence.stage}; it is called off when "
                    "this node reaches its target again and the target was not promoted "
                    "(then run again)"
                )
            return f"group {self.name} is fenced already: {fence.reason}"
        if kind == "resolve":
            return None if split else f"group {self.name} is not in a split brain"
        if kind not in _NEEDS_FAILED_OVER:
            return None
        nothing, advice = _NEEDS_FAILED_OVER[kind]
        if not promoted:
            return f"group {self.name} has not failed over: nothing to {nothing}"
        if split:
            return f"group {self.name} is in a split brain: {advice}"
        if kind == "reclaim" and not (fence is not None and fence.reverse):
            return (
                f"group {self.name} has no round of reverse protection: these volumes hold "
                "production as it was at the failover, not the recovery side's data"
            )
        return None

    def reclaim(self: SourceGroup) -> dict[str, Any]:
        """The recovery side is lost while failed over: production resumes here,
        from the last round of reverse protection. Its writes after that round
        are not here; if it comes back, both sides took writes: a split brain,
        reported, and resolved by an operator's choice."""
        refused = self.refusal("reclaim")
        if refused:
            raise CheckpointError(refused)
        fence = self.fence
        assert fence is not None and fence.promoted is not None and fence.reverse is not None
        promoted, reverse = fence.promoted, fence.reverse
        record = {
            "time": time.time(),
            "generation": promoted.generation,
            "reverse": reverse.to_dict(),
            "lag_seconds": round(time.time() - float(reverse.checkpoint_time), 3),
        }
        write_atomic(self._reclaimed_path(), json.dumps(record).encode())
        self.set_fence(None)
        log.error(
            "group %s: RECLAIMED: production resumes here at reverse round %s (the recovery "
            "side as of %.3f, %.1f s ago); its later writes are not here",
            self.name,
            reverse.checkpoint,
            float(reverse.checkpoint_time),
            record["lag_seconds"],
        )
        return record

    def forget_reclaim(self: SourceGroup) -> None:
        if self.state_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._reclaimed_path())

    def _writes_after(self: SourceGroup, seq: int, since: float | None = None) -> LossWindow:
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
                if r.kind.is_marker:
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
        return LossWindow(
            records=records,
            bytes=size,
            first_seq=first.seq if first else None,
            last_seq=last.seq if last else None,
            first_time=first.timestamp_ns / 1e9 if first else None,
            last_time=last.timestamp_ns / 1e9 if last else None,
            regions_bytes=regions,  # written while the journal was full: by region
            blocks=len(blocks) if since_ns is not None else None,
        )

    def split_brain(
        self: SourceGroup, promoted: Promoted, since: float, offset: float, rtt: float
    ) -> Fence:
        """The target was promoted and this side took writes after that (at or
        after ``since``, this clock's time of the promotion; the target's
        clock is ``offset`` s ahead, measured over a ``rtt`` s round trip):
        both copies diverged. Fence the group and say what this side wrote;
        nothing moves until an operator picks the side that survives (see
        ``Shipper.resolve``)."""
        applied = promoted.applied_seq
        here = self._writes_after(applied, since)
        fence = Fence(
            reason=f"SPLIT BRAIN: the target was promoted (generation "
            f"{promoted.generation}) and this side took writes after that: both are "
            "fenced until a survivor is chosen (havend group resolve)",
            promoted=promoted,
            lost=self._writes_after(applied),
            split_brain=SourceSplitBrain(
                detected=time.time(),
                generation=promoted.generation,
                since=since,
                clock_offset_s=round(offset, 6),
                round_trip_s=round(rtt, 6),
                production=here,
                recovery=None,  # filled in once the target recorded it
            ),
        )
        self.set_fence(fence)
        log.error(
            "group %s: SPLIT BRAIN with generation %s: %d writes here (%d bytes, %d blocks, seq "
            "%s to %s, written %s to %s) after the target's promotion at %.3f. Writes refused "
            "on both sides: choose the survivor with `havend group resolve`",
            self.name,
            promoted.generation,
            here.records,
            here.bytes,
            here.blocks,
            here.first_seq,
            here.last_seq,
            here.first_time,
            here.last_time,
            since,
        )
        return fence

    def split_brain_recorded(
        self: SourceGroup, promoted: Promoted, recovery: RecoverySide | None
    ) -> None:
        """The target recorded the split brain: keep what it says it changed
        (``recovery``, its part of the record)."""
        fence = self.fence
        split = fence.split_brain if fence is not None else None
        if fence is None or split is None or split.generation != promoted.generation:
            since = float((recovery.since if recovery is not None else None) or promoted.time)
            fence = self.split_brain(promoted, since, 0.0, 0.0)
            split = fence.split_brain
            assert split is not None
        if split.recovery != recovery:
            self.set_fence(replace(fence, split_brain=replace(split, recovery=recovery)))
            log.error(
                "group %s: split brain recorded by the target: %s bytes changed there since "
                "the promotion",
                self.name,
                recovery.changed_bytes if recovery is not None else None,
            )
