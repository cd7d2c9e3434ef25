"""A consistency group on the target node: receive, make durable, apply;
views and rollback of its checkpoints (resync: ``target.resync``; promotion
and what follows it: ``target.promotion``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass

from havend.cdp import Checkpoint, UndoLog
from havend.cdp.retention import RetentionPolicy
from havend.cdp.view import PointInTimeView
from havend.errors import CheckpointError, Invalid, NotFound, RemoteProtocolError, VolumeError
from havend.fsutil import fsync_dir, write_atomic
from havend.journal import Journal, Kind
from havend.journal.record import Record
from havend.target.changes import ChangeMap
from havend.target.members import ReplicaMembers, make_replica, open_replica
from havend.target.promoted import PromotedVolume
from havend.target.promotion import Promotion
from havend.target.records import PromotionMeta, Rollback
from havend.target.resync import Resync
from havend.volume import FileVolume, apply_record

log = logging.getLogger("havend.target")
# The target's journal holds what arrived and is not yet synced into the
# replicas: up to 64 segments of 64 MiB, made and freed as it goes.
TARGET_SEGMENTS = 64


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    group: str
    name: str
    received_seq: int
    durable_seq: int
    applied_seq: int
    state: str
    connected: bool
    applied_bytes: int
    generation: str
    hold: str  # why records are refused (after a rollback or a promotion), or ""
    promoted: dict | None  # Promoted.to_dict()
    changed_bytes: int  # written on the promoted side since the promotion
    split_brain: dict | None  # TargetSplitBrain.to_dict(): fenced until resolved
    cdp: dict
    last_heard: float | None = None  # wall clock of the source's last frame (None: not since start)
    # Why the applier cannot apply (it retries with back-off): {error, since, attempts}, or None
    apply_error: dict | None = None


class TargetGroup(Resync, Promotion, ReplicaMembers):
    """Replica volumes of one group, the journal feeding them, and the applied seq."""

    def __init__(self, directory: str, meta: dict, journal: Journal) -> None:
        self.directory = directory
        self.id = uuid.UUID(meta["group"])
        self.name = meta["name"]
        self.meta = meta  # group.json's object (the promotion records: self.records)
        self.records = PromotionMeta.from_meta(meta, os.path.join(directory, "group.json"))
        self.journal = journal
        self._members_lock = threading.Lock()  # volume changes: the loop and the applier
        self.volumes: list[FileVolume] = [open_replica(v) for v in meta["volumes"]]
        self.declared: list[dict] | None = None  # the volumes of the session's HELLO
        # When the source was last heard from (wall clock, this process): the end of an
        # unplanned failover's loss window as far as this side can know it.
        self.last_heard: float | None = None
        self.apply_error: dict | None = None  # see ReplicaStatus.apply_error
        self.applied_seq = self._read_applied()
        self.synced_seq = self.applied_seq  # what the "applied" file says
        with open(os.path.join(directory, "sync.json")) as f:
            self.sync = json.load(f)
        self.undo = UndoLog(os.path.join(directory, "cdp"), [v.size for v in self.volumes])
        self.preserved_bytes = 0
        # The last consistent point, kept while a resync has taken the replica
        # away from it (see _keep_base).
        self._base: UndoLog | None = None
        shutil.rmtree(self._base_dir + ".new", ignore_errors=True)  # a keeping cut short
        if os.path.isdir(self._base_dir):
            self._base = UndoLog(self._base_dir, [v.size for v in self.volumes])
            if self._base.finish_rollback(self.volumes) is not None:
                self._at_base()  # a promotion to it was cut short: at it now
        # A staged resync saves what it overwrites: after the undo log.
        self._recover_resync()
        if self.sync["state"] == "consistent":
            self._drop_base()  # consistent again before a crash: nothing to keep
        if self.sync["state"] == "consistent" and self.journal.durable_seq > self.applied_seq:
            # A crash left records after the applied marker: the replica may hold
            # some of them, so it is a prefix again only once they are redone.
            self._set_sync("catching_up", until=self.journal.durable_seq)
        finished = self.undo.finish_rollback(self.volumes)
        if finished is not None:
            log.warning(
                "group %s: finished the rollback to seq %d a crash cut short", self.name, finished
            )
        self.views: dict[str, PointInTimeView] = {}
        self.refusing = ""  # why new links are refused for a moment (a promotion)
        self.changes: ChangeMap | None = None
        self._promoted_volumes: list[PromotedVolume] | None = None
        self._reverse: UndoLog | None = None  # reverse protection's checkpoints
        self.connected = False
        self.peer = self.meta.get("source_node")  # the source node's name, from its HELLO
        self.applied_bytes = 0
        self.apply_lock = asyncio.Lock()  # held while the applier works; rollback waits
        self.new_records = asyncio.Event()  # durable records for the applier
        self.applied_changed = asyncio.Event()

    @classmethod
    def create(
        cls, state_dir: str, replica_dir: str, group: uuid.UUID, name: str, volumes: list[dict]
    ) -> TargetGroup:
        """A new replica group with sparse, zeroed volumes of the source's sizes.

        Built in a temporary directory and renamed into place, so a crash part
        way leaves nothing that a restart would trip over.
        """
        groups = os.path.join(state_dir, "groups")
        directory = os.path.join(groups, str(group))
        building = os.path.join(groups, f".{group}.new")
        shutil.rmtree(building, ignore_errors=True)
        os.makedirs(building)
        os.makedirs(os.path.join(replica_dir, name), exist_ok=True)
        members: list[dict] = []
        for i, vol in enumerate(volumes):
            base = f"{vol['name']}.img"
            if any(os.path.basename(m["path"]) == base for m in members):
                base = f"{vol['name']}.{i}.img"  # a removed volume's name, taken again
            path = os.path.join(replica_dir, name, base)
            member = {"name": vol["name"], "size": int(vol["size"]), "path": path}
            if vol.get("server") is not None:
                member["server"] = vol["server"]
            if vol.get("state") == "removed":  # nothing of it will ever come
                member |= {"state": "removed", "purged": True}
            else:
                make_replica(path, int(vol["size"]))  # a leftover of a creation that crashed
                if vol.get("state") == "syncing":
                    member["state"] = "syncing"
            members.append(member)
        meta = {
            "group": str(group),
            "name": name,
            "volumes": members,
            "generation": str(uuid.uuid4()),
            "retention": RetentionPolicy().to_dict(),
        }
        Journal.create(
            os.path.join(building, "journal"), group, max_segments=TARGET_SEGMENTS
        ).close()
        write_atomic(os.path.join(building, "applied"), b"0\n")
        write_atomic(os.path.join(building, "sync.json"), b'{"state": "syncing", "until": 0}')
        write_atomic(os.path.join(building, "group.json"), json.dumps(meta, indent=2).encode())
        os.rename(building, directory)
        fsync_dir(groups)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str) -> TargetGroup:
        with open(os.path.join(directory, "group.json")) as f:
            meta = json.load(f)
        path = os.path.join(directory, "journal")
        if not os.path.exists(path):  # a crash between the renames of _fresh_journal
            os.rename(path + ".new" if os.path.exists(path + ".new") else path + ".old", path)
        for leftover in (path + ".new", path + ".old"):
            shutil.rmtree(leftover, ignore_errors=True)
        journal = Journal.open(path)
        return cls(directory, meta, journal)

    def _read_applied(self) -> int:
        """The applied marker: ``seq [time_ns of that record]``."""
        with open(os.path.join(self.directory, "applied")) as f:
            fields = f.read().split()
        self.applied_time_ns = int(fields[1]) if len(fields) > 1 else 0
        return int(fields[0]) if fields else 0

    # Resync: see target.resync; promotion and after: see target.promotion.

    # Receiving ------------------------------------------------------------

    def receive(self, records: list[Record]) -> int:
        """Append the records not held yet; returns how many were new (loop thread).
        Raises RemoteProtocolError on a gap: the replica never skips a seq."""
        new = 0
        for record in records:
            if record.seq <= self.journal.last_seq:
                continue  # sent again after a reconnect: already here
            if record.seq != self.journal.last_seq + 1:
                raise RemoteProtocolError(
                    f"group {self.name}: got seq {record.seq}, expected {self.journal.last_seq + 1}"
                )
            if record.kind == Kind.VOLUME:
                self.received_volume_event(record)
            if record.volume >= len(self.volumes):
                raise RemoteProtocolError(f"group {self.name}: record for unknown volume")
            self.journal.append(
                record.kind,
                record.volume,
                record.offset,
                record.data,
                record.length,
                seq=record.seq,
                timestamp_ns=record.timestamp_ns,
                owned=True,  # a view into the received batch, which nothing changes
            )
            new += 1
        return new

    # Applying -------------------------------------------------------------

    async def applier(self, batch_bytes: int = 32 << 20) -> None:
        """Apply durable records in seq order, forever (one task per group)."""
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while True:
            if self._base is not None and self.state == "consistent":
                async with self.apply_lock:  # consistent again: the kept point is not needed
                    if self._base is not None and self.state == "consistent":
                        await loop.run_in_executor(None, self._drop_base)
            if self.journal.durable_seq <= self.applied_seq:
                if self.synced_seq < self.applied_seq:  # idle: make the replicas durable
                    try:
                        async with self.apply_lock:
                            await loop.run_in_executor(None, self.checkpoint)
                    except OSError as exc:
                        log.error("group %s: syncing the replicas failed: %s", self.name, exc)
                        await asyncio.sleep(backoff)
                        backoff = min(10.0, backoff * 2)
                    continue
                self.new_records.clear()
                if self.journal.durable_seq <= self.applied_seq:
                    # Bounded: a link torn down mid-commit may never set the event.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.new_records.wait(), 1.0)
                continue
            try:
                async with self.apply_lock:
                    if self.hold:  # rolled back: the records left are of the old timeline
                        await asyncio.sleep(0.2)
                        continue
                    await loop.run_in_executor(None, self.apply_some, batch_bytes)
            except Exception as exc:  # the applier must outlive any one batch
                # OSError (ENOSPC...) and anything else (a bad record, a bug): the
                # records stay in the journal, the applied seq where it was, and the
                # batch is tried again with back-off; meanwhile the group's status
                # says why (apply_error) instead of the replica silently falling behind.
                self._apply_failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            if self.apply_error is not None:
                log.warning(
                    "group %s: applying again after %d failed attempts",
                    self.name,
                    self.apply_error["attempts"],
                )
                self.apply_error = None
            backoff = 0.5
            self.applied_changed.set()

    def _apply_failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if self.apply_error is None or self.apply_error["error"] != error:
            # the first time (or a new cause): the traceback once, not at every retry
            log.error(
                "group %s: applying records after seq %d failed: %s; retrying",
                self.name,
                self.applied_seq,
                error,
                exc_info=not isinstance(exc, OSError),
            )
            self.apply_error = {"error": error, "since": time.time(), "attempts": 0}
        self.apply_error["attempts"] += 1

    def apply_some(self, batch_bytes: int = 8 << 20) -> int:
        """Apply up to ``batch_bytes`` of records in order (page cache); the
        replicas are synced by :meth:`checkpoint`, when the journal needs room
        or the applier is idle."""
        records = self.journal.read(self.applied_seq, batch_bytes)
        if not records:
            return 0
        run: list[Record] = []
        for record in records:
            if record.volume >= len(self.volumes):
                raise VolumeError(f"group {self.name}: record {record.seq} for unknown volume")
            if record.kind == Kind.CHECKPOINT:
                self._apply_run(run)
                run = []
                self._reach_checkpoint(record)
            elif record.kind == Kind.VOLUME:
                self._apply_run(run)
                run = []
                self.apply_volume_event(record)
            else:
                run.append(record)
        self._apply_run(run)
        self.applied_seq = records[-1].seq
        self.applied_time_ns = records[-1].timestamp_ns
        if self.journal.used_bytes > self.journal.capacity_bytes // 2:
            self.checkpoint()
        return len(records)

    def _apply_run(self, run: list[Record]) -> None:
        """Apply records of one epoch: first save what they overwrite (durably)."""
        if not run:
            return
        changes = [(r.volume, r.offset, r.length) for r in run]
        self._base_preserve(changes)
        self.preserved_bytes += self.undo.preserve(self.volumes, run[0].seq, changes)
        for record in run:
            apply_record(self.volumes[record.volume], record)
            self.applied_bytes += len(record.data)

    def _reach_checkpoint(self, record: Record) -> None:
        """The replica is now as the source was at this checkpoint: keep it."""
        try:
            checkpoint = Checkpoint.from_record(record)
        except CheckpointError as exc:
            log.error("group %s: %s; not kept", self.name, exc)
            return
        if self.undo.add_checkpoint(checkpoint):
            retention = self.retention
            self.undo.expire(retention.count, retention.max_age_seconds)

    @property
    def retention(self) -> RetentionPolicy:
        """How many checkpoints are kept, and for how long (``group.json`` keeps
        it as its dict; one that is not a policy means the defaults)."""
        try:
            return RetentionPolicy.from_dict(self.meta.get("retention") or {})
        except Invalid:
            return RetentionPolicy()

    def set_retention(self, retention: RetentionPolicy) -> None:
        """The source's retention policy for this group (from its HELLO)."""
        if retention.to_dict() != self.meta.get("retention"):
            self.meta["retention"] = retention.to_dict()
            self._write_meta()
            self.undo.expire(retention.count, retention.max_age_seconds)

    def _write_meta(self) -> None:
        self.records.into_meta(self.meta)
        write_atomic(
            os.path.join(self.directory, "group.json"), json.dumps(self.meta, indent=2).encode()
        )

    @property
    def generation(self) -> str:
        return str(self.meta.get("generation", ""))

    @property
    def hold(self) -> str:
        return self.records.hold

    # Views and rollback ------------------------------------------------------

    def volume_index(self, name: str) -> int:
        for i, vol in self.live_specs():
            if vol["name"] == name:
                return i
        raise NotFound(f"group {self.name} has no volume {name!r}")

    def resolve_checkpoint(self, ref: str) -> Checkpoint:
        """A retained checkpoint by id, unique id prefix (6+ characters),
        ``latest`` or ``oldest``."""
        with self.undo.lock:
            retained = list(self.undo.checkpoints)
        if not retained:
            raise CheckpointError(f"group {self.name} retains no checkpoints")
        if ref == "latest":
            return retained[-1]
        if ref == "oldest":
            return retained[0]
        found = [c for c in retained if c.id == ref] or (
            [c for c in retained if c.id.startswith(ref)] if len(ref) >= 6 else []
        )
        if len(found) > 1:  # a prefix of several: a bad argument
            raise Invalid(f"checkpoint {ref!r} of group {self.name} is ambiguous")
        if not found:
            raise NotFound(f"checkpoint {ref!r} of group {self.name} is not retained")
        return found[0]

    def open_view(
        self, export: str, volume: str, checkpoint_id: str, scratch: str | None
    ) -> PointInTimeView:
        index = self.volume_index(volume)
        checkpoint = self.undo.get(checkpoint_id)
        view = PointInTimeView(
            self.undo,
            self.volumes,
            index,
            checkpoint,
            scratch=scratch,
            name=f"{self.name}/{volume}@{checkpoint.id}",
        )
        self.views[export] = view
        return view

    def close_view(self, export: str) -> None:
        view = self.views.pop(export, None)
        if view is None:
            raise NotFound(f"no view {export!r} is open on group {self.name}")
        view.close()

    async def delete_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """Delete one retained checkpoint (``UndoLog.forget``), the applier idle
        meanwhile; refused while an open view shows it."""
        async with self.apply_lock:
            loop = asyncio.get_running_loop()
            checkpoint = await loop.run_in_executor(None, self.undo.forget, checkpoint_id)
        log.warning(
            "group %s: checkpoint %s (seq %d) deleted", self.name, checkpoint.id, checkpoint.seq
        )
        return checkpoint

    def refusal(self, kind: str) -> str | None:
        """Why this group cannot be promoted or rolled back (``kind``) as it is
        now, in the words its refusal uses; None when nothing here forbids it.
        The one place these preconditions are written: promote and rollback
        check them, and the operations layer quotes them."""
        if kind == "promote" and self.promoted:
            return f"group {self.name} is promoted already"
        if kind == "rollback" and self.promoted:
            return (
                f"group {self.name} is promoted: its volumes are live, not rolled back under "
                "the servers using them"
            )
        if kind == "rollback" and self.views:
            return f"close the {len(self.views)} open views of {self.name} first"
        return None

    async def rollback(self, checkpoint_id: str) -> dict:
        """Make a retained checkpoint the replica's latest point. Records from the
        source are refused from now on (a new generation: the source is on the
        abandoned timeline); the checkpoints after it are dropped."""
        checkpoint = self.undo.get(checkpoint_id)
        refused = self.refusal("rollback")
        if refused:
            raise CheckpointError(refused)
        previous = self.generation
        self.records.hold = (
            f"rolled back to checkpoint {checkpoint.id} (seq {checkpoint.seq}); records of "
            f"generation {previous} are refused until failback or a new protection"
        )
        self.meta["generation"] = str(uuid.uuid4())
        self.records.record("rollback_to", Rollback(checkpoint.to_dict(), previous))
        self._write_meta()
        loop = asyncio.get_running_loop()
        async with self.apply_lock:  # the applier is idle from here on
            _, rewritten = await loop.run_in_executor(
                None, self.undo.rollback, self.volumes, checkpoint.id
            )
            await loop.run_in_executor(None, self._drop_unapplied)
            self._drop_base()
        log.warning(
            "group %s: rolled back to checkpoint %s (seq %d): %d bytes rewritten; new "
            "generation %s",
            self.name,
            checkpoint.id,
            checkpoint.seq,
            rewritten,
            self.generation,
        )
        return {
            "checkpoint": checkpoint.to_dict(),
            "rewritten_bytes": rewritten,
            "generation": self.generation,
            "previous_generation": previous,
        }

    # The journal and the applied marker ----------------------------------------

    def _drop_unapplied(self) -> None:
        """Records received after the rollback point belong to the abandoned timeline."""
        applied = self.applied_seq
        self._fresh_journal(applied + 1)
        self.synced_seq = applied

    def _fresh_journal(self, first_seq: int) -> None:
        """Replace the journal with an empty one starting at ``first_seq``, so
        that a crash at any moment leaves one whole journal (see :meth:`open`):
        the new one is made aside, then swapped in by renames."""
        directory = self.journal.directory
        fresh, old = directory + ".new", directory + ".old"
        shutil.rmtree(fresh, ignore_errors=True)
        journal = Journal.create(fresh, self.id, first_seq=first_seq, max_segments=TARGET_SEGMENTS)
        try:
            self.journal.close()
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(fresh, directory)
            fsync_dir(os.path.dirname(directory))
        except BaseException:
            journal.close()  # a restart finishes the swap (see open)
            raise
        journal.moved_to(directory)
        shutil.rmtree(old, ignore_errors=True)
        self.journal = journal

    def checkpoint(self) -> None:
        """Sync the replicas, record the applied seq, free the journal behind it.
        After a crash, the records after the recorded seq are applied again."""
        applied = self.applied_seq
        for volume in self.volumes:
            volume.flush()
        write_atomic(
            os.path.join(self.directory, "applied"), f"{applied} {self.applied_time_ns}\n".encode()
        )
        self.synced_seq = applied
        self.journal.release_through(applied)

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            group=str(self.id),
            name=self.name,
            received_seq=self.journal.last_seq,
            durable_seq=self.journal.durable_seq,
            applied_seq=self.applied_seq,
            state=self.state,
            connected=self.connected,
            applied_bytes=self.applied_bytes,
            generation=self.generation,
            hold=self.hold,
            promoted=self.promoted.to_dict() if self.promoted is not None else None,
            changed_bytes=self.changes.changed_bytes() if self.changes else 0,
            split_brain=split.to_dict() if (split := self.records.split_brain) else None,
            cdp=self.undo.status() | {"preserved_bytes": self.preserved_bytes},
            last_heard=self.last_heard,
            apply_error=dict(self.apply_error) if self.apply_error else None,
        )

    def close(self) -> None:
        for export in list(self.views):
            self.close_view(export)
        if self.changes is not None:
            self.changes.close()
        if self._reverse is not None:
            self._reverse.close()
        if self.synced_seq < self.applied_seq:
            self.checkpoint()
        if self._base is not None:
            self._base.close()
        self.undo.close()
        self.journal.close()
        for volume in self.volumes:
            volume.flush()
            volume.close()
