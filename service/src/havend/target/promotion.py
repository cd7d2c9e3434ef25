"""Promotion of a replica (failover) and what follows it on the target: the
promoted volumes, reverse protection, split brain, failback.

Files, in the group's directory: ``group.json`` keeps the promotion record
(``promoted``), ``hold``, ``split_brain`` and the ``history`` (typed records:
``target.records``, held by ``TargetGroup.records``); ``changes/``
(what was written since the promotion, see ``target.changes``), ``reverse/``
(the undo log of reverse protection's round checkpoints),
``split-brain-<generation>/`` (what this side held in the ranges a
resolution for the old source replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from havend.cdp import Checkpoint, UndoLog
from havend.cdp.undo import snapshot_ranges
from havend.cdp.view import PointInTimeView
from havend.errors import CheckpointError, NotFound
from havend.link.promotion import LossWindow, Promoted, RecoverySide
from havend.records import Fields
from havend.target.changes import ChangeMap
from havend.target.promoted import PromotedVolume
from havend.target.records import Failback, Promoting, Resolution, TargetSplitBrain

if TYPE_CHECKING:
    from havend.target.group import TargetGroup

log = logging.getLogger("havend.target")
Demotion = TypeVar("Demotion", Failback, Resolution)  # what ends a promotion


class Promotion:
    """TargetGroup's part: promotion, reverse protection, split brain, failback."""

    @property
    def promoted(self: TargetGroup) -> Promoted | None:
        return self.records.promoted

    async def promote(
        self: TargetGroup,
        *,
        checkpoint: str | None = None,
        final_seq: int | None = None,
        planned: bool = False,
    ) -> dict:
        """Make the replica the group's live copy: its volumes become writable
        (see :meth:`promoted_volumes`), every change is tracked for failback,
        and records of the old source are refused from now on (new generation).

        ``final_seq`` (planned failover): the source drained its journal up to
        it; it is applied first. Without a ``checkpoint`` the latest
        consistent point is promoted: every durable record applied.
        """
        refused = self.refusal("promote")
        if refused:
            raise CheckpointError(refused)
        if self.views and checkpoint is not None:
            raise CheckpointError(f"close the {len(self.views)} open views of {self.name} first")
        self.refusing = "being promoted"  # no new link from here on
        try:
            return await self._promote(checkpoint, final_seq, planned)
        finally:
            self.refusing = ""

    async def _promote(
        self: TargetGroup, checkpoint: str | None, final_seq: int | None, planned: bool
    ) -> dict:
        started = time.monotonic()
        if final_seq is not None and self.journal.durable_seq < final_seq:
            raise CheckpointError(
                f"group {self.name}: the source drained to seq {final_seq} but only "
                f"{self.journal.durable_seq} arrived here"
            )
        interrupted = self.records.promoting
        if interrupted and interrupted.checkpoint:  # finish what was started
            if checkpoint is not None and not interrupted.checkpoint.startswith(checkpoint):
                raise CheckpointError(
                    f"an interrupted promotion of {self.name} was at checkpoint "
                    f"{interrupted.checkpoint}: run it again with that one"
                )
            checkpoint = interrupted.checkpoint
        loop = asyncio.get_running_loop()
        if checkpoint is None:
            while self.applied_seq < self.journal.durable_seq:  # the latest point: all applied
                async with self.apply_lock:
                    await loop.run_in_executor(None, self.apply_some, 32 << 20)
        chosen = self.resolve_checkpoint(checkpoint) if checkpoint else None
        to_base = chosen is None and self.state != "consistent" and self._base is not None
        if chosen is None and self.state != "consistent" and not to_base:
            raise CheckpointError(
                f"group {self.name} is {self.state}, not at a consistent point: promote a "
                "retained checkpoint instead"
            )
        point = chosen.seq if chosen else self.applied_seq
        if to_base:
            point = self._base.checkpoints[0].seq - 1  # type: ignore[union-attr]
        incomplete = self.incomplete_at(point)
        if incomplete:
            raise CheckpointError(
                f"group {self.name}: volume {', '.join(incomplete)} is not complete at seq "
                f"{point} (its initial copy finished later, or is still running): promote "
                "after it, or a checkpoint from after it"
            )
        previous = interrupted.previous_generation if interrupted else self.generation
        rewritten = 0
        # Durably on hold before anything changes: a crash from here on leaves a
        # group that refuses its old source until the promotion is run again.
        self.records.promoting = Promoting(chosen.id if chosen else None, previous, planned)
        self.records.hold = f"a promotion of {self.name} was interrupted: run it again"
        self._write_meta()
        async with self.apply_lock:
            if chosen is not None:
                _, rewritten = await loop.run_in_executor(
                    None, self.undo.rollback, self.volumes, chosen.id
                )
            elif to_base:  # a resync had the replica away from its last consistent point
                rewritten = await loop.run_in_executor(None, self._roll_back_to_base)
            self._drop_base()
            await loop.run_in_executor(None, self.checkpoint)  # replicas synced, marker written
            await loop.run_in_executor(None, self._drop_unapplied)
            self._drop_reverse()  # rounds of an earlier promotion, if any
            self.meta["generation"] = str(uuid.uuid4())
            promoted = Promoted(
                time=time.time(),
                planned=planned,
                applied_seq=self.applied_seq,
                applied_time=self.applied_time_ns / 1e9,
                checkpoint=chosen.to_dict() if chosen else None,
                previous_generation=previous,
                generation=self.meta["generation"],
            )
            self.records.promoted = promoted
            self.records.hold = (
                f"promoted at seq {self.applied_seq} (generation {self.meta['generation']}): "
                "the old source's records are refused until failback"
            )
            self.records.record("promoted", promoted)
            self.records.promoting = None
            self._write_meta()
        log.warning(
            "group %s: PROMOTED (%s) at seq %d%s; generation %s; changes are tracked for failback",
            self.name,
            "planned" if planned else "unplanned",
            self.applied_seq,
            f", checkpoint {chosen.id} ({rewritten} bytes rewritten)" if chosen else "",
            self.generation,
        )
        return promoted.to_dict() | {
            "rewritten_bytes": rewritten,
            "seconds": round(time.monotonic() - started, 3),
        }

    def promoted_volumes(self: TargetGroup) -> list[PromotedVolume]:
        """The writable volumes of a promoted group (made once, kept)."""
        if not self.promoted:
            raise CheckpointError(f"group {self.name} is not promoted")
        if self._promoted_volumes is None:
            self.changes = ChangeMap(
                os.path.join(self.directory, "changes"), [v.size for v in self.volumes]
            )
            lock = threading.Lock()
            self._promoted_volumes = [
                PromotedVolume(self.volumes, i, v["name"], self.undo, self.changes, lock)
                for i, v in enumerate(self.meta["volumes"])
            ]
            if os.path.isdir(self._reverse_dir()):  # reverse protection ran before a restart
                reverse = self._open_reverse()
                for member in self._promoted_volumes:
                    member.reverse = reverse
            self._pause_promoted(self.split_brain_reason())
        return self._promoted_volumes

    def _pause_promoted(self: TargetGroup, why: str) -> None:
        """Refuse (``EROFS``) or, with ``why`` empty, accept again writes to the
        promoted volumes; a write in progress finishes first."""
        volumes = self.promoted_volumes()
        with volumes[0]._lock:  # no write between its change-map entry and itself
            for member in volumes:
                member.fenced = why
        if why:
            for member in volumes:
                member.volume.flush()
            assert self.changes is not None
            self.changes.flush()

    def split_brain_reason(self: TargetGroup) -> str:
        if self.records.split_brain is None:
            return ""
        return (
            f"group {self.name}: SPLIT BRAIN with the old source: writes refused until a "
            "survivor is chosen (havend group resolve on the source node)"
        )

    # Reverse protection -------------------------------------------------------
    # While failed over, the old source pulls what the promoted side changed,
    # round after round, each as of a checkpoint of this side (a consistent
    # point, read while writes go on: the reverse undo log saves what they
    # overwrite), so a second disaster here loses at most one round.

    def _reverse_dir(self: TargetGroup) -> str:
        return os.path.join(self.directory, "reverse")

    def _open_reverse(self: TargetGroup) -> UndoLog:
        if self._reverse is None:
            self._reverse = UndoLog(self._reverse_dir(), [v.size for v in self.volumes])
        return self._reverse

    def _drop_reverse(self: TargetGroup) -> None:
        if self._reverse is not None:
            self._reverse.close()
            self._reverse = None
        shutil.rmtree(self._reverse_dir(), ignore_errors=True)

    def _reverse_keep_from(self: TargetGroup, reverse: UndoLog, seq: int) -> None:
        """Forget the rounds' checkpoints before ``seq`` (the old source has it)."""
        with reverse.lock:
            keep = sum(1 for c in reverse.checkpoints if c.seq >= seq)
        reverse.expire(max(1, keep))

    def begin_reverse(
        self: TargetGroup, base_id: str | None
    ) -> tuple[Checkpoint, bool, list[list[tuple[int, int]]], list[PointInTimeView]]:
        """A round of reverse protection: a new checkpoint of the promoted
        volumes; (it, whether the ranges are only those changed since the old
        source's ``base_id`` checkpoint, else every range changed since the
        promotion, the ranges, a read-only view of each volume at it)."""
        volumes = self.promoted_volumes()
        assert self.changes is not None
        reverse = self._open_reverse()
        with volumes[0]._lock:  # no write between the checkpoint and the next one's saving
            newest = reverse.checkpoints[-1] if reverse.checkpoints else None
            checkpoint = Checkpoint(
                uuid.uuid4().hex,
                newest.seq + 1 if newest else 1,
                time.time(),
                "reverse protection",
                "crash",
            )
            reverse.add_checkpoint(checkpoint)
            for member in volumes:
                member.reverse = reverse
        base = None
        if base_id:
            with contextlib.suppress(NotFound):  # not one of the rounds kept here
                base = reverse.get(base_id)
        if base is not None:
            self._reverse_keep_from(reverse, base.seq)
            changed = reverse.changed_between(base.seq, checkpoint.seq)
        else:  # the old source has none of them: everything changed since the promotion
            self._reverse_keep_from(reverse, checkpoint.seq)
            changed = [self.changes.ranges(i) for i in range(len(volumes))]
        views = [
            PointInTimeView(reverse, self.volumes, i, checkpoint, name=f"reverse {i}")
            for i in range(len(volumes))
        ]
        return checkpoint, base is not None, changed, views

    def end_reverse(self: TargetGroup, checkpoint_id: str) -> None:
        """The old source holds the volumes as of that round's checkpoint."""
        reverse = self._open_reverse()
        self._reverse_keep_from(reverse, reverse.get(checkpoint_id).seq)

    # Split brain ---------------------------------------------------------------

    def record_split_brain(self: TargetGroup, report: dict, node: str) -> TargetSplitBrain | None:
        """The old source found that it took writes after this side's promotion
        (``report``: what it wrote, see ``SourceGroup.split_brain``): record it
        durably with what this side changed since, and fence the promoted
        volumes. Returns the record (None: not about this promotion)."""
        if not self.promoted or report.get("generation") != self.generation:
            return None
        if self.resolution(self.generation) is not None:
            return None  # resolved already; the source missed the answer
        if self.records.split_brain is not None:
            return self.records.split_brain
        production = Fields("HELLO", report, "split_brain.").part("production", LossWindow.read)
        volumes = self.promoted_volumes()
        assert self.changes is not None
        changed = self.changes.changed_bytes()
        record = TargetSplitBrain(
            detected=time.time(),
            generation=self.generation,
            production=replace(production, node=node),
            recovery=RecoverySide(
                since=float(self.promoted.time),
                last_write_time=self.changes.last_change_time,
                changed_bytes=changed,
                changed_blocks=changed // 4096,
                ranges=sum(len(self.changes.ranges(i)) for i in range(len(volumes))),
            ),
        )
        self.records.split_brain = record
        self.records.record("split_brain", record)
        self._write_meta()
        self._pause_promoted(self.split_brain_reason())
        log.error(
            "group %s: SPLIT BRAIN: the old source %s took %s writes after this side's "
            "promotion; %d bytes changed here since. Promoted volumes fenced: choose the "
            "survivor with `havend group resolve` on the source node",
            self.name,
            node,
            record.production.records,
            changed,
        )
        return record

    def resolution(self: TargetGroup, generation: str) -> Resolution | None:
        """The record of a split brain of that promoted generation, resolved already."""
        resolved = self.records.split_brain_resolved
        if resolved and resolved.generation == generation:
            return resolved
        for done in self.records.events("split_brain_resolved"):
            if done.generation == generation:
                return done
        return None

    def keep_recovery(self: TargetGroup) -> Resolution:
        """Split brain resolved for this (promoted) side: writes resume here;
        the old source stays failed over and fails back later as usual."""
        record = self.records.split_brain
        if record is None:
            raise CheckpointError(f"group {self.name} is not in a split brain")
        self.records.split_brain = None
        resolved = Resolution(time.time(), "recovery", self.generation, record)
        self.records.split_brain_resolved = resolved
        self.records.record("split_brain_resolved", resolved)
        self._write_meta()
        self._pause_promoted("")
        log.warning("group %s: split brain resolved: this side survives, writes resume", self.name)
        return resolved

    def keep_production(self: TargetGroup, replaced: list) -> Resolution:
        """Split brain resolved for the old source: what this side holds in the
        ranges the source is about to resync (``replaced``, per volume: what it
        changed since the promotion among them) is saved (a snapshot, one
        checkpoint), then the group is a replica again at its promotion's seq."""
        assert self.promoted is not None and self.changes is not None
        generation = self.generation
        volumes = self.promoted_volumes()
        checkpoint = Checkpoint(
            generation.replace("-", ""),
            self.applied_seq + 1,
            time.time(),
            "before split brain resolution",
            "crash",
        )
        snapshot = snapshot_ranges(
            os.path.join(self.directory, f"split-brain-{generation}"),
            self.volumes,
            checkpoint,
            [(i, o, n) for i in range(len(volumes)) for o, n in self.changes.ranges(i)]
            + [
                (i, int(o), int(n))
                for i, ranges in enumerate(replaced)
                for o, n in ranges
                if int(o) + int(n) <= self.volumes[i].size
            ],
        )
        resolved = Resolution(
            time.time(), "production", generation, self.records.split_brain, snapshot
        )
        self.records.split_brain = self.records.split_brain_resolved = None
        resolved = self._demote(self.promoted.applied_seq, "split_brain_resolved", resolved)
        log.warning(
            "group %s: split brain resolved for the old source: a replica again (this side's "
            "changes saved in %s)",
            self.name,
            snapshot["directory"],
        )
        return resolved

    # Failback ----------------------------------------------------------------

    def begin_failback(self: TargetGroup) -> tuple[int, list[list[tuple[int, int]]]]:
        """The old source is taking the data home: the promoted volumes stop
        taking writes, the change map is flushed; what the source needs to know
        (the seq it was promoted at; per volume, the ranges written since)."""
        volumes = self.promoted_volumes()
        assert self.changes is not None and self.promoted is not None
        self._pause_promoted(f"group {self.name} is failing back: writes are paused")
        log.warning("group %s: failback begins: promoted volumes paused", self.name)
        return (
            self.promoted.applied_seq,
            [self.changes.ranges(i) for i in range(len(volumes))],
        )

    def failback_done(self: TargetGroup, generation: str) -> Failback | None:
        """The record of a finished failback of that promoted generation, if any."""
        for done in self.records.events("failback"):
            if done.promoted is not None and done.promoted.generation == generation:
                return done
        return None

    def abort_failback(self: TargetGroup) -> None:
        """The failback session ended early: the promoted side stays live (unless
        it is in a split brain)."""
        if self._promoted_volumes is not None:
            self._pause_promoted(self.split_brain_reason())

    def end_failback(self: TargetGroup, resume_seq: int) -> dict:
        """Both copies are equal: a replica again, records resume after ``resume_seq``."""
        previous = self.generation
        self._demote(resume_seq, "failback", Failback(time.time(), resume_seq, self.promoted))
        log.warning(
            "group %s: failback done: a replica again at seq %d (generation %s, was %s)",
            self.name,
            resume_seq,
            self.generation,
            previous,
        )
        return {"generation": self.generation, "previous_generation": previous}

    def _demote(self: TargetGroup, resume_seq: int, event: str, record: Demotion) -> Demotion:
        """From promoted to replica (a new generation, kept in ``record`` as
        ``replica_generation``: the record returned), records resuming after
        ``resume_seq``; the ``event`` goes in the history."""
        for volume in self.volumes:
            volume.flush()
        self.meta["generation"] = str(uuid.uuid4())
        record = replace(record, replica_generation=self.meta["generation"])
        self.records.record(event, record)
        self.records.promoted = None
        self.records.hold = ""
        if self.changes is not None:
            self.changes.close()
            self.changes = None
        self._promoted_volumes = None
        shutil.rmtree(os.path.join(self.directory, "changes"), ignore_errors=True)
        self._drop_reverse()
        self._restart_sequence(resume_seq)
        self._set_sync("consistent", until=resume_seq)
        self._drop_base()
        self._write_meta()
        return record
