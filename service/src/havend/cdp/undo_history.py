"""Reading an undo log back: point-in-time reads, what changed between two
checkpoints, retention, rollback and the pins of open views (the
:class:`UndoHistory` part of :class:`havend.cdp.undo.UndoLog`)."""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from crc32c import crc32c

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo_format import (
    _VOLUME_SHIFT,
    _ZERO_BLOCK,
    BLOCK,
    T_ROLLBACK,
    Saved,
    Volume,
    _close,
    _key,
    _runs,
    _Segment,
)
from havend.errors import CheckpointError, NotFound, UndoCorruptError
from havend.fsutil import fsync_dir

if TYPE_CHECKING:
    from havend.cdp.undo import UndoLog

log = logging.getLogger("havend.cdp")


class UndoHistory:
    """UndoLog's part: reading back, retention, rollback, views."""

    # Reading --------------------------------------------------------------------

    def read(
        self: UndoLog, volumes: Sequence[Volume], volume: int, seq: int, offset: int, length: int
    ) -> bytes:
        """``length`` bytes at ``offset`` of ``volume`` as it was at the checkpoint
        of seq ``seq``. The replica is read first, then the saved blocks laid
        over it: a block the applier overwrites meanwhile was saved before."""
        if length <= 0:
            return b""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        base = first * BLOCK
        buf = bytearray(
            volumes[volume].read(base, min((last + 1) * BLOCK, self.sizes[volume]) - base)
        )
        hits: list[tuple[int, Saved]] = []
        with self.lock:
            for block in range(first, last + 1):
                entries = self._index.get(_key(volume, block))
                if entries:
                    i = bisect.bisect_left(entries, (seq,))
                    if i < len(entries):
                        hits.append((block, entries[i]))
            fds = {s.index: s.fd for s in self._segments.values()}
        for block, (_, segment, where, n, crc) in hits:
            at = (block - first) * BLOCK
            if where < 0:
                buf[at : at + n] = _ZERO_BLOCK[:n]
                continue
            data = os.pread(fds[segment], n, where)
            if len(data) != n or crc32c(data) != crc:
                raise UndoCorruptError(
                    f"undo segment {segment:016x} offset {where}: saved block {block} of "
                    f"volume {volume} fails its CRC"
                )
            buf[at : at + n] = data
        return bytes(buf[offset - base : offset - base + length])

    # Retention ------------------------------------------------------------------

    def expire(
        self: UndoLog, retain: int, max_age: float = 0.0, now: float | None = None
    ) -> list[Checkpoint]:
        """Drop the oldest checkpoints beyond ``retain`` or older than ``max_age``
        seconds (0: no limit), never one an open view pins; delete the files
        that held only their epochs. Returns the checkpoints dropped."""
        now = time.time() if now is None else now
        dropped: list[Checkpoint] = []
        with self.lock:
            while self.checkpoints:
                oldest = self.checkpoints[0]
                too_many = len(self.checkpoints) > retain
                too_old = max_age > 0 and oldest.time < now - max_age
                if not (too_many or too_old) or self.pins[oldest.seq]:
                    break
                self.checkpoints.pop(0)
                self._seqs.pop(0)
                del self._by_id[oldest.id]
                dropped.append(oldest)
            if not dropped:
                return []
            gone = self._reclaim(self._seqs[0] if self._seqs else dropped[-1].seq + 1)
        self._delete_segments(gone)
        return dropped

    def forget(self: UndoLog, checkpoint_id: str) -> Checkpoint:
        """Delete one retained checkpoint: it is no longer a rollback, view or
        promotion target. Returns it. NotFound when it is not retained;
        CheckpointError while an open view pins it.

        Why every other checkpoint stays exact: block b at checkpoint C is the
        copy saved in the first epoch E >= C.seq that saved b, else the
        replica's. Removing F from the catalog removes no saved block: the
        blocks saved in F's epoch are F's contents, which are also the
        contents at the newest older checkpoint for every block that epoch
        did not save (that is why they were saved first in F's epoch), so
        older checkpoints keep reading them, and newer ones never look below
        their own seq. Without F in ``_seqs``, later writes that F's epoch
        would have held belong to the previous checkpoint's epoch
        (``epoch_of``): a block F's epoch saved already is not saved again
        (its copy is older, and right for that epoch too), others are saved
        in the previous epoch, which is what that checkpoint needs. So data
        is freed only when F was the oldest: then nothing older reads F's
        epoch (nor those of checkpoints forgotten before, between F and the
        next one), and the freeing is :meth:`expire`'s.

        Durable: ``state.json`` keeps the forgotten ids (id -> seq; their
        checkpoint entries stay in the log and are skipped at open), pruned
        once below ``oldest_seq``; a checkpoint record the applier meets
        again (a redo after a crash) does not bring it back."""
        with self.lock:
            checkpoint = self._by_id.get(checkpoint_id)
            if checkpoint is None:
                raise NotFound(f"no checkpoint {checkpoint_id!r} is retained")
            views = self.pins[checkpoint.seq]
            if views:
                raise CheckpointError(
                    f"checkpoint {checkpoint.id} is used by {views} open views: close them first"
                )
            forgotten = self.forgotten | {checkpoint.id: checkpoint.seq}
            if checkpoint is not self.checkpoints[0]:
                self._write_state(forgotten=forgotten)
                i = bisect.bisect_left(self._seqs, checkpoint.seq)
                del self.checkpoints[i], self._seqs[i], self._by_id[checkpoint.id]
                log.info("undo log %s: checkpoint %s forgotten", self.directory, checkpoint.id)
                return checkpoint
            after = self._seqs[1] if len(self._seqs) > 1 else checkpoint.seq + 1
            gone = self._reclaim(after, forgotten)
        self._delete_segments(gone)
        log.info(
            "undo log %s: oldest checkpoint %s forgotten, %d files freed",
            self.directory,
            checkpoint.id,
            len(gone),
        )
        return checkpoint

    @property
    def forgotten(self: UndoLog) -> dict[str, int]:
        """The checkpoints deleted one by one that the log still records (id -> seq)."""
        return {str(k): int(v) for k, v in (self._state.get("forgotten") or {}).items()}

    def _reclaim(
        self: UndoLog, new_oldest: int, forgotten: dict[str, int] | None = None
    ) -> list[_Segment]:
        """The checkpoints before ``new_oldest`` are gone (lock held): say so
        durably, drop the blocks saved in their epochs and take the files that
        hold only those epochs out of the log. Returns the files, for
        :meth:`_delete_segments` (outside the lock). ``forgotten``: the
        forgotten checkpoints to keep record of (default: those recorded),
        pruned below ``new_oldest``."""
        forgotten = self.forgotten if forgotten is None else forgotten
        kept = {k: s for k, s in forgotten.items() if s >= new_oldest}
        self._write_state(oldest_seq=new_oldest, forgotten=kept or None)
        self._forget_before(new_oldest)
        gone = [
            s for s in self._segments.values() if s is not self._active and s.max_epoch < new_oldest
        ]
        for segment in gone:
            del self._segments[segment.index]
        return gone

    def _delete_segments(self: UndoLog, gone: list[_Segment]) -> None:
        for segment in gone:
            _close(segment)
            os.unlink(segment.path)
        if gone:
            fsync_dir(self.directory)

    def changed_between(self: UndoLog, first: int, last: int) -> list[list[tuple[int, int]]]:
        """Per volume, the (offset, length) runs of blocks written in the epochs
        from checkpoint seq ``first`` up to, not including, ``last``: what
        changed between those two checkpoints (each block's first write in an
        epoch saved it)."""
        with self.lock:
            keys = sorted(
                {k for e, ks in self._epoch_keys.items() if first <= e < last for k in ks}
            )
        mask = (1 << _VOLUME_SHIFT) - 1
        out: list[list[tuple[int, int]]] = [[] for _ in self.sizes]
        for volume, block, count in _runs([(k >> _VOLUME_SHIFT, k & mask) for k in keys]):
            end = min((block + count) * BLOCK, self.sizes[volume])
            out[volume].append((block * BLOCK, end - block * BLOCK))
        return out

    def _forget_before(self: UndoLog, seq: int) -> None:
        """Drop saved blocks of epochs before ``seq`` (lock held)."""
        for epoch in sorted(e for e in self._epoch_keys if e < seq):
            for key in self._epoch_keys.pop(epoch):
                entries = self._index.get(key)
                if entries and entries[0][0] == epoch:
                    entries.pop(0)
                    if not entries:
                        del self._index[key]
        keep = [c for c in self.checkpoints if c.seq >= seq]
        if len(keep) != len(self.checkpoints):
            self.checkpoints = keep
            self._seqs = [c.seq for c in keep]
            self._by_id = {c.id: c for c in keep}

    def _forget_from(self: UndoLog, seq: int) -> None:
        """A rollback to the checkpoint of ``seq``: drop the checkpoints after it
        and every block saved in epochs from it on (lock held)."""
        for epoch in sorted((e for e in self._epoch_keys if e >= seq), reverse=True):
            for key in self._epoch_keys.pop(epoch):
                entries = self._index.get(key)
                if entries and entries[-1][0] == epoch:
                    entries.pop()
                    if not entries:
                        del self._index[key]
        keep = [c for c in self.checkpoints if c.seq <= seq]
        self.checkpoints = keep
        self._seqs = [c.seq for c in keep]
        self._by_id = {c.id: c for c in keep}

    # Rollback -------------------------------------------------------------------

    def rollback(
        self: UndoLog, volumes: Sequence[Volume], checkpoint_id: str
    ) -> tuple[Checkpoint, int]:
        """Make the replica what it was at the checkpoint; the checkpoints after
        it are dropped. Returns (checkpoint, bytes rewritten). Crash-safe: an
        interrupted rollback is finished by :meth:`finish_rollback` at open."""
        checkpoint = self.get(checkpoint_id)
        with self.lock:
            busy = [c for c in self.checkpoints if self.pins[c.seq]]
            if busy:
                raise CheckpointError(
                    f"close the {sum(self.pins.values())} open views first "
                    f"(checkpoints {', '.join(c.id for c in busy)})"
                )
            self._write_state(rolling_back_to=checkpoint.seq)
        return checkpoint, self._roll_back(volumes, checkpoint.seq)

    def finish_rollback(self: UndoLog, volumes: Sequence[Volume]) -> int | None:
        """Carry out a rollback a crash interrupted; returns its seq, or None."""
        if self._pending_rollback is None:
            return None
        seq = self._pending_rollback
        self._roll_back(volumes, seq)
        return seq

    def _roll_back(self: UndoLog, volumes: Sequence[Volume], seq: int) -> int:
        with self.lock:
            plan = []
            for key, entries in self._index.items():
                i = bisect.bisect_left(entries, (seq,))
                if i < len(entries):
                    plan.append((key >> _VOLUME_SHIFT, key & ((1 << _VOLUME_SHIFT) - 1)))
        rewritten = 0
        for volume, block in sorted(plan):
            n = min(BLOCK, self.sizes[volume] - block * BLOCK)
            data = self.read(volumes, volume, seq, block * BLOCK, n)
            volumes[volume].write(block * BLOCK, data)
            rewritten += n
        for volume in volumes:
            volume.flush()
        with self.lock:
            segment, _ = self._append(T_ROLLBACK, seq, b"", 0, [b"{}"], True)
            os.fdatasync(segment.fd)
            self._forget_from(seq)
            kept = {k: s for k, s in self.forgotten.items() if s <= seq}
            self._write_state(rolling_back_to=None, forgotten=kept or None)
            self._pending_rollback = None
        return rewritten

    # Views ----------------------------------------------------------------------

    def pin(self: UndoLog, checkpoint: Checkpoint) -> None:
        with self.lock:
            if checkpoint.id not in self._by_id:
                raise CheckpointError(f"checkpoint {checkpoint.id} is no longer retained")
            self.pins[checkpoint.seq] += 1

    def unpin(self: UndoLog, checkpoint: Checkpoint) -> None:
        with self.lock:
            self.pins[checkpoint.seq] -= 1
            if self.pins[checkpoint.seq] <= 0:
                del self.pins[checkpoint.seq]
