"""A consistency group on the target node: receive, make durable, apply."""

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
from havend.cdp.undo import snapshot_ranges
from havend.cdp.view import PointInTimeView
from havend.errors import CheckpointError, RemoteProtocolError, VolumeError
from havend.fsutil import fsync_dir, write_atomic
from havend.journal import Journal, Kind
from havend.journal.record import Record
from havend.staging import stage, staged
from havend.target.changes import ChangeMap
from havend.target.promoted import PromotedVolume
from havend.volume import FileVolume, apply_record

log = logging.getLogger("havend.target")
# The target's journal holds what arrived and is not yet synced into the
# replicas: up to 64 segments of 64 MiB, made and freed as it goes.
TARGET_SEGMENTS = 64


# Checkpoints kept per group unless the source's group config says otherwise.
DEFAULT_RETAIN = 2048


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
    promoted: dict | None
    changed_bytes: int  # written on the promoted side since the promotion
    split_brain: dict | None  # both sides took writes: fenced until resolved
    cdp: dict


class TargetGroup:
    """Replica volumes of one group, the journal feeding them, and the applied seq."""

    def __init__(self, directory: str, meta: dict, journal: Journal) -> None:
        self.directory = directory
        self.id = uuid.UUID(meta["group"])
        self.name = meta["name"]
        self.meta = meta
        self.journal = journal
        self.volumes = [FileVolume(v["path"]) for v in meta["volumes"]]
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
        members = []
        for vol in volumes:
            path = os.path.join(replica_dir, name, f"{vol['name']}.img")
            with open(path, "wb") as f:  # a leftover of a creation that crashed
                f.truncate(int(vol["size"]))
            members.append({"name": vol["name"], "size": int(vol["size"]), "path": path})
        meta = {
            "group": str(group),
            "name": name,
            "volumes": members,
            "generation": str(uuid.uuid4()),
            "retention": {"count": DEFAULT_RETAIN, "max_age_seconds": 0},
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

    def check_volumes(self, volumes: list[dict]) -> str | None:
        """Why the source's volume list does not fit this replica, or None."""
        mine = [(v["name"], v["size"]) for v in self.meta["volumes"]]
        theirs = [(v.get("name"), v.get("size")) for v in volumes]
        if mine != theirs:
            return f"volumes differ: replica has {mine}, source sent {theirs}"
        return None

    # Resync ---------------------------------------------------------------
    #
    # States in sync.json: ``syncing`` (a new or broken replica: resync data
    # goes straight to the volumes), ``staging`` (a consistent replica being
    # resynced: data goes to staging.log and the replica stays at its last
    # consistent point), ``applying`` (staging.log is complete and being
    # applied; redone after a crash), ``catching_up`` (consistent once the
    # records up to ``until`` are applied), ``consistent``.

    @property
    def state(self) -> str:
        if self.sync["state"] == "catching_up" and self.applied_seq >= self.sync["until"]:
            self._set_sync("consistent", until=self.applied_seq)
        return str(self.sync["state"])

    def _set_sync(self, state: str, **fields: int) -> None:
        self.sync = {"state": state, "until": 0, **fields}
        write_atomic(os.path.join(self.directory, "sync.json"), json.dumps(self.sync).encode())

    @property
    def _staging_path(self) -> str:
        return os.path.join(self.directory, "staging.log")

    def _recover_resync(self) -> None:
        """At open: finish applying a complete staging log, drop an incomplete one."""
        if self.sync["state"] == "applying":
            self._apply_staging(self.sync["resume"], self.sync["until"])
        elif self.sync["state"] == "staging":
            self.abort_resync()

    def abort_resync(self) -> None:
        """The link broke during a staged resync: the replica never left its
        consistent point, so it stays there (the next resync stages again)."""
        if self.sync["state"] != "staging":
            return
        staging = getattr(self, "_staging", None)
        if staging is not None:
            staging.close()
            self._staging = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._staging_path)
        self._set_sync("consistent", until=self.applied_seq)

    async def begin_resync(self, resume_seq: int) -> None:
        """Quiesce the replica for a resync after which records resume at
        ``resume_seq + 1``. A consistent replica is staged (it stays at its
        point until the pass is over); one that a resync already took away
        from its last consistent point (still catching up when the journal
        overflowed again) takes the blocks directly, that point kept by
        :meth:`_keep_base` all along; only a replica that never was
        consistent (new, or syncing) has no point to keep."""
        while self.applied_seq < self.journal.durable_seq:  # let the applier finish
            self.applied_changed.clear()
            await self.applied_changed.wait()
        if self.state == "consistent":
            self._drop_base()
            self._staging = open(self._staging_path, "wb")  # noqa: SIM115 - closed at the end
            self._set_sync("staging", resume=resume_seq)
        else:
            self._set_sync("syncing")
            self._restart_sequence(resume_seq)

    # The kept consistent point -------------------------------------------------
    #
    # Applying a staged resync takes the replica away from its consistent
    # point until every record up to the resync's ``until`` is applied. Should
    # those records never come (the source's journal overflowed again, and a
    # second resync starts from ``catching_up``), the replica would hold no
    # consistent point for as long as that takes. So, from the first block
    # applied until the replica is consistent again, what every write to it
    # overwrites is saved first (an undo log of its own, ``resync-base/``, with
    # one checkpoint: the last consistent point), and a promotion in between
    # rolls back to it.

    @property
    def _base_dir(self) -> str:
        return os.path.join(self.directory, "resync-base")

    def _keep_base(self) -> None:
        """The replica is about to leave its consistent point (``applied_seq``):
        keep that point until the replica is consistent again."""
        if self._base is not None:
            return  # away from it already: the point kept is the older one
        sizes = [v.size for v in self.volumes]
        building = self._base_dir + ".new"  # whole or absent after a crash
        shutil.rmtree(building, ignore_errors=True)
        base = UndoLog(building, sizes)
        try:
            write_atomic(
                os.path.join(building, "base.json"),
                json.dumps({"seq": self.applied_seq, "time_ns": self.applied_time_ns}).encode(),
            )
            base.add_checkpoint(
                Checkpoint(uuid.uuid4().hex, self.applied_seq + 1, time.time(), "resync base")
            )
        finally:
            base.close()
        os.rename(building, self._base_dir)
        fsync_dir(self.directory)
        self._base = UndoLog(self._base_dir, sizes)

    def _base_preserve(self, changes: list[tuple[int, int, int]]) -> None:
        """Before ``changes`` are written: save what they overwrite from the
        kept consistent point, if one is kept."""
        if self._base is not None:
            self._base.preserve(self.volumes, None, changes)

    def _drop_base(self) -> None:
        """The replica is consistent again (or rolled back, or promoted): the
        kept point is of no more use."""
        if self._base is not None:
            self._base.close()
            self._base = None
        shutil.rmtree(self._base_dir, ignore_errors=True)

    def _roll_back_to_base(self) -> int:
        """Make the replica its kept consistent point again (a promotion while
        a resync has it away from it); returns the bytes rewritten."""
        base = self._base
        assert base is not None
        _, rewritten = base.rollback(self.volumes, base.checkpoints[0].id)
        self._at_base()
        return rewritten

    def _at_base(self) -> None:
        """The replica holds the kept point again: say so, forget what came after."""
        with open(os.path.join(self._base_dir, "base.json")) as f:
            point = json.load(f)
        self.applied_seq = int(point["seq"])
        self.applied_time_ns = int(point["time_ns"])
        self.checkpoint()  # the applied marker says the kept point from here on
        self._drop_unapplied()
        self._set_sync("consistent", until=self.applied_seq)
        self._drop_base()

    def _restart_sequence(self, resume_seq: int) -> None:
        if self.journal.last_seq != resume_seq:
            # Records are about to start elsewhere in the sequence: a fresh journal.
            self._fresh_journal(resume_seq + 1)
        self.applied_seq = self.synced_seq = resume_seq
        write_atomic(os.path.join(self.directory, "applied"), f"{resume_seq}\n".encode())

    def write_block(self, volume: int, offset: int, data: bytes) -> None:
        if volume >= len(self.volumes) or offset + len(data) > self.volumes[volume].size:
            raise RemoteProtocolError(f"group {self.name}: SYNC_DATA outside the volumes")
        if self.refusing or self.promoted:  # the replica is not the source's any more
            raise RemoteProtocolError(f"group {self.name} is promoted: no resync into it")
        if self.sync["state"] == "staging":
            stage(self._staging, volume, offset, data)
        else:
            self._base_preserve([(volume, offset, len(data))])
            self.preserved_bytes += self.undo.preserve(
                self.volumes, None, [(volume, offset, len(data))]
            )
            self.volumes[volume].write(offset, data)
        self.applied_bytes += len(data)

    def end_resync(self, high_seq: int) -> None:
        if self.sync["state"] == "staging":
            self._staging.flush()
            os.fdatasync(self._staging.fileno())
            self._staging.close()
            resume = self.sync["resume"]
            self._set_sync("applying", resume=resume, until=high_seq)
            self._apply_staging(resume, high_seq)
            return
        for volume in self.volumes:
            volume.flush()
        self._set_sync("catching_up", until=high_seq)

    def _apply_staging(self, resume_seq: int, high_seq: int) -> None:
        self._keep_base()  # redone after a crash: kept already then
        with open(self._staging_path, "rb") as f:
            for volume, offset, data in staged(f):
                length = len(data)
                self._base_preserve([(volume, offset, length)])
                # Retained checkpoints keep what the resync overwrites.
                self.preserved_bytes += self.undo.preserve(
                    self.volumes, None, [(volume, offset, length)]
                )
                self.volumes[volume].write(offset, data)
        for volume in self.volumes:
            volume.flush()
        self._restart_sequence(resume_seq)
        self._set_sync("catching_up", until=high_seq)
        os.unlink(self._staging_path)

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
            except OSError as exc:  # e.g. ENOSPC: keep the records, retry when there is room
                log.error("group %s: applying failed: %s; retrying", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(10.0, backoff * 2)
                continue
            backoff = 0.5
            self.applied_changed.set()

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
            retention = self.meta.get("retention") or {}
            self.undo.expire(
                int(retention.get("count", DEFAULT_RETAIN)),
                float(retention.get("max_age_seconds", 0)),
            )

    def set_retention(self, retention: dict) -> None:
        """The source's retention policy for this group (from its HELLO)."""
        if retention and retention != self.meta.get("retention"):
            self.meta["retention"] = retention
            self._write_meta()
            self.undo.expire(
                int(retention.get("count", DEFAULT_RETAIN)),
                float(retention.get("max_age_seconds", 0)),
            )

    def _write_meta(self) -> None:
        write_atomic(
            os.path.join(self.directory, "group.json"), json.dumps(self.meta, indent=2).encode()
        )

    @property
    def generation(self) -> str:
        return str(self.meta.get("generation", ""))

    @property
    def hold(self) -> str:
        return str(self.meta.get("hold", ""))

    # Views and rollback ------------------------------------------------------

    def volume_index(self, name: str) -> int:
        for i, vol in enumerate(self.meta["volumes"]):
            if vol["name"] == name:
                return i
        raise CheckpointError(f"group {self.name} has no volume {name!r}")

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
        if len(found) != 1:
            why = "is ambiguous" if found else "is not retained"
            raise CheckpointError(f"checkpoint {ref!r} of group {self.name} {why}")
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
            raise CheckpointError(f"no view {export!r} is open on group {self.name}")
        view.close()

    async def rollback(self, checkpoint_id: str) -> dict:
        """Make a retained checkpoint the replica's latest point. Records from the
        source are refused from now on (a new generation: the source is on the
        abandoned timeline); the checkpoints after it are dropped."""
        checkpoint = self.undo.get(checkpoint_id)
        if self.promoted:
            raise CheckpointError(
                f"group {self.name} is promoted: its volumes are live, not rolled back under "
                "the servers using them"
            )
        if self.views:
            raise CheckpointError(f"close the {len(self.views)} open views of {self.name} first")
        previous = self.generation
        self.meta["hold"] = (
            f"rolled back to checkpoint {checkpoint.id} (seq {checkpoint.seq}); records of "
            f"generation {previous} are refused until failback or a new protection"
        )
        self.meta["generation"] = str(uuid.uuid4())
        self.meta.setdefault("history", []).append(
            {"rollback_to": checkpoint.to_dict(), "previous_generation": previous}
        )
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

    # Promotion (failover) -----------------------------------------------------

    @property
    def promoted(self) -> dict | None:
        return self.meta.get("promoted")

    async def promote(
        self, *, checkpoint: str | None = None, final_seq: int | None = None, planned: bool = False
    ) -> dict:
        """Make the replica the group's live copy: its volumes become writable
        (see :meth:`promoted_volumes`), every change is tracked for failback,
        and records of the old source are refused from now on (new generation).

        ``final_seq`` (planned failover): the source drained its journal up to
        it; it is applied first. Without a ``checkpoint`` the latest
        consistent point is promoted: every durable record applied.
        """
        if self.promoted:
            raise CheckpointError(f"group {self.name} is promoted already")
        if self.views and checkpoint is not None:
            raise CheckpointError(f"close the {len(self.views)} open views of {self.name} first")
        self.refusing = "being promoted"  # no new link from here on
        try:
            return await self._promote(checkpoint, final_seq, planned)
        finally:
            self.refusing = ""

    async def _promote(self, checkpoint: str | None, final_seq: int | None, planned: bool) -> dict:
        started = time.monotonic()
        if final_seq is not None and self.journal.durable_seq < final_seq:
            raise CheckpointError(
                f"group {self.name}: the source drained to seq {final_seq} but only "
                f"{self.journal.durable_seq} arrived here"
            )
        interrupted = self.meta.get("promoting")
        if interrupted and interrupted.get("checkpoint"):  # finish what was started
            if checkpoint is not None and not interrupted["checkpoint"].startswith(checkpoint):
                raise CheckpointError(
                    f"an interrupted promotion of {self.name} was at checkpoint "
                    f"{interrupted['checkpoint']}: run it again with that one"
                )
            checkpoint = interrupted["checkpoint"]
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
        previous = (interrupted or {}).get("previous_generation", self.generation)
        rewritten = 0
        # Durably on hold before anything changes: a crash from here on leaves a
        # group that refuses its old source until the promotion is run again.
        self.meta["promoting"] = {
            "checkpoint": chosen.id if chosen else None,
            "previous_generation": previous,
            "planned": planned,
        }
        self.meta["hold"] = f"a promotion of {self.name} was interrupted: run it again"
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
            self.meta["promoted"] = {
                "time": time.time(),
                "planned": planned,
                "applied_seq": self.applied_seq,
                "applied_time": self.applied_time_ns / 1e9,
                "checkpoint": chosen.to_dict() if chosen else None,
                "previous_generation": previous,
                "generation": self.meta["generation"],
            }
            self.meta["hold"] = (
                f"promoted at seq {self.applied_seq} (generation {self.meta['generation']}): "
                "the old source's records are refused until failback"
            )
            self.meta.setdefault("history", []).append({"promoted": self.meta["promoted"]})
            del self.meta["promoting"]
            self._write_meta()
        log.warning(
            "group %s: PROMOTED (%s) at seq %d%s; generation %s; changes are tracked for failback",
            self.name,
            "planned" if planned else "unplanned",
            self.applied_seq,
            f", checkpoint {chosen.id} ({rewritten} bytes rewritten)" if chosen else "",
            self.generation,
        )
        return dict(self.meta["promoted"]) | {
            "rewritten_bytes": rewritten,
            "seconds": round(time.monotonic() - started, 3),
        }

    def promoted_volumes(self) -> list[PromotedVolume]:
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

    def _pause_promoted(self, why: str) -> None:
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

    def split_brain_reason(self) -> str:
        split = self.meta.get("split_brain")
        if not split:
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

    def _reverse_dir(self) -> str:
        return os.path.join(self.directory, "reverse")

    def _open_reverse(self) -> UndoLog:
        if self._reverse is None:
            self._reverse = UndoLog(self._reverse_dir(), [v.size for v in self.volumes])
        return self._reverse

    def _drop_reverse(self) -> None:
        if self._reverse is not None:
            self._reverse.close()
            self._reverse = None
        shutil.rmtree(self._reverse_dir(), ignore_errors=True)

    def _reverse_keep_from(self, reverse: UndoLog, seq: int) -> None:
        """Forget the rounds' checkpoints before ``seq`` (the old source has it)."""
        with reverse.lock:
            keep = sum(1 for c in reverse.checkpoints if c.seq >= seq)
        reverse.expire(max(1, keep))

    def begin_reverse(
        self, base_id: str | None
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
            with contextlib.suppress(CheckpointError):
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

    def end_reverse(self, checkpoint_id: str) -> None:
        """The old source holds the volumes as of that round's checkpoint."""
        reverse = self._open_reverse()
        self._reverse_keep_from(reverse, reverse.get(checkpoint_id).seq)

    # Split brain ---------------------------------------------------------------

    def record_split_brain(self, report: dict, node: object) -> dict | None:
        """The old source found that it took writes after this side's promotion
        (``report``: what it wrote, see ``SourceGroup.split_brain``): record it
        durably with what this side changed since, and fence the promoted
        volumes. Returns the record (None: not about this promotion)."""
        if not self.promoted or report.get("generation") != self.generation:
            return None
        if self.resolution(self.generation) is not None:
            return None  # resolved already; the source missed the answer
        record = self.meta.get("split_brain")
        if record is not None:
            return dict(record)
        volumes = self.promoted_volumes()
        assert self.changes is not None
        changed = self.changes.changed_bytes()
        record = {
            "detected": time.time(),
            "generation": self.generation,
            "production": {"node": node} | dict(report.get("production") or {}),
            "recovery": {
                "since": float(self.promoted["time"]),
                "last_write_time": self.changes.last_change_time,
                "changed_bytes": changed,
                "changed_blocks": changed // 4096,
                "ranges": sum(len(self.changes.ranges(i)) for i in range(len(volumes))),
            },
        }
        self.meta["split_brain"] = record
        self.meta.setdefault("history", []).append({"split_brain": record})
        self._write_meta()
        self._pause_promoted(self.split_brain_reason())
        log.error(
            "group %s: SPLIT BRAIN: the old source %s took %s writes after this side's "
            "promotion; %d bytes changed here since. Promoted volumes fenced: choose the "
            "survivor with `havend group resolve` on the source node",
            self.name,
            node,
            record["production"].get("records"),
            changed,
        )
        return dict(record)

    def resolution(self, generation: str) -> dict | None:
        """The record of a split brain of that promoted generation, resolved already."""
        resolved = self.meta.get("split_brain_resolved")
        if resolved and resolved.get("generation") == generation:
            return dict(resolved)
        for event in reversed(self.meta.get("history", [])):
            done = event.get("split_brain_resolved")
            if done and done.get("generation") == generation:
                return dict(done)
        return None

    def keep_recovery(self) -> dict:
        """Split brain resolved for this (promoted) side: writes resume here;
        the old source stays failed over and fails back later as usual."""
        record = self.meta.pop("split_brain")
        resolved = {
            "time": time.time(),
            "survivor": "recovery",
            "generation": self.generation,
            "split_brain": record,
        }
        self.meta["split_brain_resolved"] = resolved
        self.meta.setdefault("history", []).append({"split_brain_resolved": resolved})
        self._write_meta()
        self._pause_promoted("")
        log.warning("group %s: split brain resolved: this side survives, writes resume", self.name)
        return resolved

    def keep_production(self, replaced: list) -> dict:
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
        resolved = {
            "time": time.time(),
            "survivor": "production",
            "generation": generation,
            "split_brain": self.meta.pop("split_brain", None),
            "snapshot": snapshot,
        }
        self.meta.pop("split_brain_resolved", None)
        self._demote(int(self.promoted["applied_seq"]), "split_brain_resolved", resolved)
        log.warning(
            "group %s: split brain resolved for the old source: a replica again (this side's "
            "changes saved in %s)",
            self.name,
            snapshot["directory"],
        )
        return resolved

    # Failback ----------------------------------------------------------------

    def begin_failback(self) -> dict:
        """The old source is taking the data home: the promoted volumes stop
        taking writes, the change map is flushed; what the source needs to know."""
        volumes = self.promoted_volumes()
        assert self.changes is not None and self.promoted is not None
        self._pause_promoted(f"group {self.name} is failing back: writes are paused")
        log.warning("group %s: failback begins: promoted volumes paused", self.name)
        return {
            "failback": True,
            "applied_seq": self.promoted["applied_seq"],
            "changed": [self.changes.ranges(i) for i in range(len(volumes))],
        }

    def failback_done(self, generation: str) -> dict | None:
        """The record of a finished failback of that promoted generation, if any."""
        for event in reversed(self.meta.get("history", [])):
            done = event.get("failback")
            if done and (done.get("promoted") or {}).get("generation") == generation:
                return dict(done)
        return None

    def abort_failback(self) -> None:
        """The failback session ended early: the promoted side stays live (unless
        it is in a split brain)."""
        if self._promoted_volumes is not None:
            self._pause_promoted(self.split_brain_reason())

    def end_failback(self, resume_seq: int) -> dict:
        """Both copies are equal: a replica again, records resume after ``resume_seq``."""
        previous = self.generation
        event = {"time": time.time(), "resume_seq": resume_seq, "promoted": self.promoted}
        self._demote(resume_seq, "failback", event)
        log.warning(
            "group %s: failback done: a replica again at seq %d (generation %s, was %s)",
            self.name,
            resume_seq,
            self.generation,
            previous,
        )
        return {"generation": self.generation, "previous_generation": previous}

    def _demote(self, resume_seq: int, event: str, record: dict) -> None:
        """From promoted to replica (a new generation, kept in ``record`` as
        ``replica_generation``), records resuming after ``resume_seq``; the
        ``event`` goes in the history."""
        for volume in self.volumes:
            volume.flush()
        self.meta["generation"] = record["replica_generation"] = str(uuid.uuid4())
        self.meta.setdefault("history", []).append({event: record})
        self.meta.pop("promoted", None)
        self.meta.pop("hold", None)
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
            promoted=self.promoted,
            changed_bytes=self.changes.changed_bytes() if self.changes else 0,
            split_brain=self.meta.get("split_brain"),
            cdp=self.undo.status() | {"preserved_bytes": self.preserved_bytes},
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
