"""A replica's resync on the target: the states of ``sync.json``, staging,
and the last consistent point kept while a resync has the replica away
from it.

Files, in the group's directory: ``sync.json`` (the state, below, with
``until`` and ``resume``), ``staging.log`` (a staged resync's blocks, see
``havend.staging``), ``resync-base/`` (an undo log with one checkpoint, the
last consistent point, and ``base.json``: its seq and time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import TYPE_CHECKING

from havend.cdp import Checkpoint, UndoLog
from havend.errors import RemoteProtocolError
from havend.fsutil import fsync_dir, write_atomic
from havend.staging import stage, staged

if TYPE_CHECKING:
    from havend.target.group import TargetGroup

log = logging.getLogger("havend.target")

# Staged blocks applied together: one durable save of what they overwrite per batch.
APPLY_BATCH_BYTES = 16 << 20


class Resync:
    """TargetGroup's part: resync states, staging, the kept consistent point."""

    #
    # States in sync.json: ``syncing`` (a new or broken replica: resync data
    # goes straight to the volumes), ``staging`` (a consistent replica being
    # resynced: data goes to staging.log and the replica stays at its last
    # consistent point), ``applying`` (staging.log is complete and being
    # applied; redone after a crash), ``catching_up`` (consistent once the
    # records up to ``until`` are applied), ``consistent``.

    @property
    def state(self: TargetGroup) -> str:
        if self.sync["state"] == "catching_up" and self.applied_seq >= self.sync["until"]:
            self._set_sync("consistent", until=self.applied_seq)
        return str(self.sync["state"])

    def _set_sync(self: TargetGroup, state: str, **fields: int) -> None:
        self.sync = {"state": state, "until": 0, **fields}
        write_atomic(os.path.join(self.directory, "sync.json"), json.dumps(self.sync).encode())

    @property
    def _staging_path(self: TargetGroup) -> str:
        return os.path.join(self.directory, "staging.log")

    def _recover_resync(self: TargetGroup) -> None:
        """At open: finish applying a complete staging log, drop an incomplete one."""
        if self.sync["state"] == "applying":
            self._apply_staging(self.sync["resume"], self.sync["until"])
        elif self.sync["state"] == "staging":
            self.abort_resync()

    def abort_resync(self: TargetGroup) -> None:
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

    async def begin_resync(self: TargetGroup, resume_seq: int) -> None:
        """Quiesce the replica for a resync after which records resume at
        ``resume_seq + 1``. A consistent replica is staged (it stays at its
        point until the pass is over); one that a resync already took away
        from its last consistent point (still catching up when the journal
        overflowed again) takes the blocks directly, that point kept by
        :meth:`_keep_base` all along; only a replica that never was
        consistent (new, or syncing) has no point to keep."""
        while True:
            while self.applied_seq < self.journal.durable_seq:  # let the applier finish
                self.applied_changed.clear()
                await self.applied_changed.wait()
            # The applier out of the way (it may be syncing the replicas, on
            # the journal about to be replaced) while the sequence restarts.
            async with self.apply_lock:
                if self.applied_seq < self.journal.durable_seq:
                    continue  # more came meanwhile
                if self.state == "consistent":
                    self._drop_base()
                    self._staging = open(self._staging_path, "wb")  # noqa: SIM115 - closed at the end
                    self._set_sync("staging", resume=resume_seq)
                else:
                    self._set_sync("syncing")
                    self._restart_sequence(resume_seq)
                return

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
    def _base_dir(self: TargetGroup) -> str:
        return os.path.join(self.directory, "resync-base")

    def _keep_base(self: TargetGroup) -> None:
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

    def _base_preserve(self: TargetGroup, changes: list[tuple[int, int, int]]) -> None:
        """Before ``changes`` are written: save what they overwrite from the
        kept consistent point, if one is kept."""
        if self._base is not None:
            self._base.preserve(self.volumes, None, changes)

    def _drop_base(self: TargetGroup) -> None:
        """The replica is consistent again (or rolled back, or promoted): the
        kept point is of no more use."""
        if self._base is not None:
            self._base.close()
            self._base = None
        shutil.rmtree(self._base_dir, ignore_errors=True)

    def _roll_back_to_base(self: TargetGroup) -> int:
        """Make the replica its kept consistent point again (a promotion while
        a resync has it away from it); returns the bytes rewritten."""
        base = self._base
        assert base is not None
        _, rewritten = base.rollback(self.volumes, base.checkpoints[0].id)
        self._at_base()
        return rewritten

    def _at_base(self: TargetGroup) -> None:
        """The replica holds the kept point again: say so, forget what came after."""
        with open(os.path.join(self._base_dir, "base.json")) as f:
            point = json.load(f)
        self.applied_seq = int(point["seq"])
        self.applied_time_ns = int(point["time_ns"])
        self.checkpoint()  # the applied marker says the kept point from here on
        self._drop_unapplied()
        self._set_sync("consistent", until=self.applied_seq)
        self._drop_base()

    def _apply_blocks(self: TargetGroup, blocks: list[tuple[int, int, bytes]]) -> None:
        """Write staged blocks to the replica, what they overwrite saved first
        (the kept consistent point, and the retained checkpoints), in one
        durable save for all of them: one per block made a resync of many
        small changes wait on a sync each, twice."""
        if not blocks:
            return
        changes = [(volume, offset, len(data)) for volume, offset, data in blocks]
        self._base_preserve(changes)
        self.preserved_bytes += self.undo.preserve(self.volumes, None, changes)
        for volume, offset, data in blocks:
            self.volumes[volume].write(offset, data)

    def _restart_sequence(self: TargetGroup, resume_seq: int) -> None:
        if self.journal.last_seq != resume_seq:
            # Records are about to start elsewhere in the sequence: a fresh journal.
            self._fresh_journal(resume_seq + 1)
        self.applied_seq = self.synced_seq = resume_seq
        write_atomic(os.path.join(self.directory, "applied"), f"{resume_seq}\n".encode())

    def write_block(self: TargetGroup, volume: int, offset: int, data: bytes) -> None:
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

    def end_resync(self: TargetGroup, high_seq: int) -> None:
        if self.sync["state"] == "staging":
            self._staging.flush()
            os.fdatasync(self._staging.fileno())
            self._staging.close()
            resume = self.sync["resume"]
            self._set_sync("applying", resume=resume, until=high_seq)
            self._apply_staging(resume, high_seq)
        else:
            for volume in self.volumes:
                volume.flush()
            self._set_sync("catching_up", until=high_seq)
        self.resync_completed(high_seq)

    def _apply_staging(self: TargetGroup, resume_seq: int, high_seq: int) -> None:
        self._keep_base()  # redone after a crash: kept already then
        with open(self._staging_path, "rb") as f:
            blocks: list[tuple[int, int, bytes]] = []
            held = 0
            for block in staged(f):
                blocks.append(block)
                held += len(block[2])
                if held >= APPLY_BATCH_BYTES:
                    self._apply_blocks(blocks)
                    blocks, held = [], 0
            self._apply_blocks(blocks)
        for volume in self.volumes:
            volume.flush()
        self._restart_sequence(resume_seq)
        self._set_sync("catching_up", until=high_seq)
        os.unlink(self._staging_path)
