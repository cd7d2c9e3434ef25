"""Fencing, failover and split brain on the source: refusing writes while
the target is (being) promoted, what a failover lost, the failback's
snapshot, reclaiming production after losing the recovery side, and this
side's part of a split brain.

Files, in the group's state directory: ``fence.json`` (why writes are
refused: the fence, see :class:`havend.ship.fence.Fencing`; absent when they
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
from typing import TYPE_CHECKING, Any

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo import snapshot_ranges
from havend.errors import CheckpointError, JournalCorruptError
from havend.fsutil import write_atomic
from havend.ship.overflow import DirtyRegions

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
                self.fence = json.load(f)
            log.warning("group %s: writes are refused: %s", self.name, self.fence.get("reason"))

    def set_fence(self: SourceGroup, fence: dict[str, Any] | None) -> None:
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

    def promoted_elsewhere(self: SourceGroup, promoted: dict[str, Any]) -> dict[str, Any]:
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
        fence = self.fence or {}
        promoted, split = fence.get("promoted"), fence.get("split_brain")
        if kind == "failover":
            return f"group {self.name} is fenced already: {fence.get('reason')}" if fence else None
        if kind == "resolve":
            return None if split else f"group {self.name} is not in a split brain"
        if kind not in _NEEDS_FAILED_OVER:
            return None
        nothing, advice = _NEEDS_FAILED_OVER[kind]
        if not promoted:
            return f"group {self.name} has not failed over: nothing to {nothing}"
        if split:
            return f"group {self.name} is in a split brain: {advice}"
        if kind == "reclaim" and not fence.get("reverse"):
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
        fence = self.fence or {}
        promoted, reverse = fence["promoted"], fence["reverse"]
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

    def forget_reclaim(self: SourceGroup) -> None:
        if self.state_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._reclaimed_path())

    def _writes_after(self: SourceGroup, seq: int, since: float | None = None) -> dict[str, Any]:
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
        self: SourceGroup, promoted: dict[str, Any], since: float, offset: float, rtt: float
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

    def split_brain_recorded(
        self: SourceGroup, promoted: dict[str, Any], record: dict[str, Any]
    ) -> None:
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
