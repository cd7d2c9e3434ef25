"""The target's undo log: the old contents of blocks, kept per checkpoint.

Epochs. Every retained checkpoint C starts an *epoch* named by its seq: the
writes with ``C.seq < seq`` up to the next checkpoint. Before a write of
epoch E overwrites a block of the replica for the first time in E, the
block's current contents (its contents at checkpoint E) are appended here and
made durable; only then does the replica change. So the contents of block b
at checkpoint C are those saved in the first epoch E >= C.seq that saved b,
or the replica's own when no such epoch did: a view of C needs no copying,
however old C is, and opening one costs nothing.

Crash safety. An undo entry is fdatasynced before the write it protects is
issued, and entries are only ever appended in epoch order, so after a crash
the log holds every block a write touched (a torn tail held only blocks whose
writes were never issued, and is cut). A redo of the journal after a crash
finds its blocks saved already and saves nothing twice.

The on-disk format (segments of entries, ``state.json``) is in
``cdp.undo_format``; reading back, retention and rollback are
``cdp.undo_history``'s part of :class:`UndoLog`.

Retention drops the oldest checkpoints (by count and age, never one that an
open view uses) and deletes the files that hold only their epochs; ``forget``
deletes one checkpoint (its saved blocks stay while older checkpoints need
them, see :meth:`UndoHistory.forget`).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import errno
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from crc32c import crc32c

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo_format import (
    _HEADER,
    _SEGMENT_NAME,
    _SLOT,
    ALIGN,
    BLOCK,
    ENTRY_ALIGNED,
    ENTRY_BLOCKS,
    FLAG_ZERO,
    MAGIC,
    SEGMENT_BYTES,
    T_BLOCKS,
    T_CHECKPOINT,
    T_ROLLBACK,
    Saved,
    Volume,
    _aligned,
    _close,
    _is_zero,
    _key,
    _runs,
    _Segment,
    _Slot,
)
from havend.cdp.undo_history import UndoHistory
from havend.errors import CheckpointError, UndoCorruptError
from havend.fsutil import fsync_dir, write_atomic

log = logging.getLogger("havend.cdp")


class UndoLog(UndoHistory):
    """One group's undo log and checkpoint catalog. Writes come from one
    thread (the applier); views read from any thread (``lock`` guards the index)."""

    def __init__(
        self, directory: str, sizes: Sequence[int], *, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.sizes = list(sizes)
        self.segment_bytes = segment_bytes
        self.lock = threading.RLock()
        self.checkpoints: list[Checkpoint] = []  # retained, by seq
        self._seqs: list[int] = []
        self._by_id: dict[str, Checkpoint] = {}
        self._index: dict[int, list[Saved]] = {}
        self._epoch_keys: dict[int, list[int]] = collections.defaultdict(list)
        self._segments: dict[int, _Segment] = {}
        self.pins: collections.Counter[int] = collections.Counter()  # seq -> open views
        self.damaged = ""  # why history was dropped at the last open, if it was
        self._write_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Entries are written with O_DIRECT from this page-aligned buffer: the
        # saved blocks are read again only by views and rollbacks, and in the
        # page cache each new page costs far more than the copy into it.
        self.direct = True  # False once the file system refuses O_DIRECT
        self._scratch: mmap.mmap | None = None
        self._scratch_lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._state = self._read_state()
        self._recover()
        rolling = self._state.get("rolling_back_to")
        self._pending_rollback = int(rolling) if rolling is not None else None

    # State ----------------------------------------------------------------------

    @property
    def oldest_seq(self) -> int:
        return int(self._state.get("oldest_seq", 0))

    def _read_state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.directory, "state.json")) as f:
                state = json.load(f)
        except FileNotFoundError:
            return {"oldest_seq": 0}
        except ValueError as exc:
            raise UndoCorruptError(f"{self.directory}/state.json is unreadable: {exc}") from None
        return state if isinstance(state, dict) else {"oldest_seq": 0}

    def _write_state(self, **changes: Any) -> None:
        state = {k: v for k, v in (self._state | changes).items() if v is not None}
        write_atomic(os.path.join(self.directory, "state.json"), json.dumps(state).encode())
        self._state = state

    # Recovery -------------------------------------------------------------------

    def _segment_files(self) -> dict[int, str]:
        found = {}
        for name in os.listdir(self.directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                found[int(match.group(1), 16)] = os.path.join(self.directory, name)
        return found

    def _recover(self) -> None:
        files = self._segment_files()
        order = sorted(files)
        # Entries in the last two files may be torn (one preserve step can span a
        # roll): their block data is checked too; older files were synced whole.
        check_data = set(order[-2:])
        for n, index in enumerate(order):
            fd = os.open(files[index], os.O_RDWR | os.O_CLOEXEC)
            segment = _Segment(index, files[index], fd, os.fstat(fd).st_size, -1)
            self._segments[index] = segment
            end = self._scan(segment, index in check_data)
            if end >= segment.size:
                continue
            if any(os.path.getsize(files[i]) for i in order[n + 1 :]):
                self._drop_history(f"undo segment {files[index]} is damaged at offset {end}")
            else:  # a torn tail: the writes it protected were never issued
                log.warning("undo log %s: cutting a torn tail at offset %d", files[index], end)
                os.ftruncate(fd, end)
                os.fdatasync(fd)
                segment.size = end
        self._forget_before(self.oldest_seq)
        if not self._segments:
            self._new_segment(0)
        self._active = self._segments[max(self._segments)]
        if self._active.size % ALIGN:  # written before entries were aligned
            self._active = self._new_segment(self._active.index + 1)

    def _drop_history(self, why: str) -> None:
        """Damage in the middle: every checkpoint recorded before it is unusable
        (a view of it could read damaged blocks), so they are dropped; the
        checkpoints recorded after it are whole."""
        self.damaged = why
        dropped = len(self.checkpoints)
        self.checkpoints, self._seqs, self._by_id = [], [], {}
        self._index.clear()
        self._epoch_keys.clear()
        log.error("%s: %d older checkpoints dropped; newer ones are intact", why, dropped)
        self._state["oldest_seq"] = 1 << 62  # raised to the next checkpoint recorded

    def _scan(self, segment: _Segment, check_data: bool) -> int:
        """Index the entries of one file; returns where the valid entries end."""
        pos = 0
        while pos + _HEADER.size <= segment.size:
            header = os.pread(segment.fd, _HEADER.size, pos)
            magic, crc, kind, flags, epoch, time_ns, count, data_len = _HEADER.unpack(header)
            if magic != MAGIC or kind not in (T_BLOCKS, T_CHECKPOINT, T_ROLLBACK):
                return pos
            table_len = count * _SLOT.size
            end = pos + _HEADER.size + table_len + data_len
            if end > segment.size:
                return pos
            table = os.pread(segment.fd, table_len, pos + _HEADER.size)
            body = b"" if kind == T_BLOCKS else os.pread(segment.fd, data_len, end - data_len)
            if crc32c(body, crc32c(table, crc32c(header[8:]))) != crc:
                return pos
            del time_ns
            data_pos = pos + _HEADER.size + table_len
            if kind == T_BLOCKS:
                slots = self._slots(table, count, segment.index, data_pos, epoch)
                if check_data and not self._data_ok(segment, slots):
                    return pos
                self._add_saved(epoch, slots)
            elif kind == T_CHECKPOINT:
                checkpoint = Checkpoint.from_payload(epoch, body)
                if checkpoint.id not in self.forgotten:  # else deleted since (forget)
                    if self._state.get("oldest_seq", 0) >= 1 << 62:  # first one after damage
                        self._state["oldest_seq"] = checkpoint.seq
                    self._catalog_add(checkpoint)
            else:
                self._forget_from(epoch)
            segment.max_epoch = max(segment.max_epoch, epoch)
            pos = _aligned(end) if flags & ENTRY_ALIGNED else end
        return min(pos, segment.size)

    def _slots(
        self, table: bytes, count: int, segment: int, data_pos: int, epoch: int
    ) -> list[tuple[int, Saved]]:
        out = []
        for i in range(count):
            volume, flags, length, block, crc = _SLOT.unpack_from(table, i * _SLOT.size)
            if flags & FLAG_ZERO:
                out.append((_key(volume, block), (epoch, segment, -1, length, crc)))
            else:
                out.append((_key(volume, block), (epoch, segment, data_pos, length, crc)))
                data_pos += length
        return out

    def _data_ok(self, segment: _Segment, slots: list[tuple[int, Saved]]) -> bool:
        for _, (_, _, offset, length, crc) in slots:
            if offset >= 0:
                data = os.pread(segment.fd, length, offset)
                if len(data) != length or crc32c(data) != crc:
                    return False
        return True

    # Catalog --------------------------------------------------------------------

    def _catalog_add(self, checkpoint: Checkpoint) -> None:
        if checkpoint.id in self._by_id:
            return
        if self._seqs and checkpoint.seq <= self._seqs[-1]:
            raise UndoCorruptError(f"checkpoint at seq {checkpoint.seq} is out of order")
        self.checkpoints.append(checkpoint)
        self._seqs.append(checkpoint.seq)
        self._by_id[checkpoint.id] = checkpoint

    def get(self, checkpoint_id: str) -> Checkpoint:
        with self.lock:
            found = self._by_id.get(checkpoint_id)
        if found is None:
            raise CheckpointError(f"no checkpoint {checkpoint_id!r} is retained")
        return found

    def epoch_of(self, seq: int) -> int | None:
        """The epoch a write with this seq belongs to: the newest checkpoint before it."""
        i = bisect.bisect_left(self._seqs, seq)
        return self._seqs[i - 1] if i else None

    # Writing --------------------------------------------------------------------

    def _new_segment(self, index: int) -> _Segment:
        path = os.path.join(self.directory, f"undo-{index:016x}.log")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        segment = _Segment(index, path, fd, os.fstat(fd).st_size, -1)
        self._segments[index] = segment
        fsync_dir(self.directory)
        return segment

    def _append(
        self,
        kind: int,
        epoch: int,
        table: bytes,
        count: int,
        parts: Sequence[bytes | memoryview],
        body: bool,
    ) -> tuple[_Segment, int]:
        """Write one entry (not synced); returns its file and where its data starts."""
        data_len = sum(len(p) for p in parts)
        segment = self._active
        if segment.size and segment.size + data_len > self.segment_bytes:
            with self.lock:  # readers look the files up under it
                segment = self._active = self._new_segment(segment.index + 1)
        header = _HEADER.pack(MAGIC, 0, kind, ENTRY_ALIGNED, epoch, time.time_ns(), count, data_len)
        crc = crc32c(table, crc32c(header[8:]))
        if body:
            for part in parts:
                crc = crc32c(part, crc)
        header = header[:4] + crc.to_bytes(4, "little") + header[8:]
        pos = segment.size
        size = len(header) + len(table) + data_len
        written = _aligned(size)
        done = -1
        if self.direct and self._direct_fd(segment) >= 0:
            # One copy into the aligned buffer (warm, reused), then straight to
            # the disk: no page cache pages to allocate and write back.
            with self._scratch_lock:
                scratch = self._scratch_for(written)
                at = 0
                for piece in (header, table, *parts):
                    scratch[at : at + len(piece)] = piece
                    at += len(piece)
                scratch[at:written] = bytes(written - at)
                try:
                    with memoryview(scratch) as view:
                        done = os.pwrite(segment.direct_fd, view[:written], pos)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._no_direct(exc)  # opened, but refused: through the page cache
        if done < 0:
            pad = bytes(written - size)
            # One pwritev, within IOV_MAX (1024) pieces.
            if len(parts) < 512:
                pieces = [header, table, *parts, pad]
            else:
                pieces = [header, table, b"".join(parts), pad]
            done = os.pwritev(segment.fd, pieces, pos)
            if not body:  # start writing it out now: the caller's fdatasync waits less
                os.posix_fadvise(segment.fd, pos, written, os.POSIX_FADV_DONTNEED)
        if done != written:
            raise OSError(f"short write to {segment.path}")
        segment.size += written
        segment.max_epoch = max(segment.max_epoch, epoch)
        return segment, pos + len(header) + len(table)

    def _direct_fd(self, segment: _Segment) -> int:
        """The segment's O_DIRECT descriptor (-1, and ``direct`` off, where the
        file system does not take O_DIRECT, e.g. tmpfs)."""
        if segment.direct_fd < 0:
            try:
                segment.direct_fd = os.open(segment.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                self._no_direct(exc)
        return segment.direct_fd

    def _no_direct(self, why: OSError) -> None:
        log.info(
            "undo log %s: no O_DIRECT (%s): written through the page cache", self.directory, why
        )
        self.direct = False

    def _scratch_for(self, size: int) -> mmap.mmap:
        if self._scratch is None or len(self._scratch) < size:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = mmap.mmap(-1, max(size, ENTRY_BLOCKS * BLOCK + (1 << 20)))
        return self._scratch

    def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Record a checkpoint the applier reached (durably); False if known
        (or deleted: :meth:`forget`)."""
        with self.lock:
            if checkpoint.id in self._by_id or checkpoint.id in self.forgotten:
                return False
            if self._seqs and checkpoint.seq <= self._seqs[-1]:
                raise CheckpointError(
                    f"checkpoint at seq {checkpoint.seq} is not after the newest ({self._seqs[-1]})"
                )
            body = json.dumps(
                {
                    "id": checkpoint.id,
                    "time": checkpoint.time,
                    "label": checkpoint.label,
                    "consistency": checkpoint.consistency,
                }
            ).encode()
            segment, _ = self._append(T_CHECKPOINT, checkpoint.seq, b"", 0, [body], True)
            os.fdatasync(segment.fd)
            self._catalog_add(checkpoint)
            if self.oldest_seq >= 1 << 62:
                self._write_state(oldest_seq=checkpoint.seq)
            return True

    def preserve(
        self, volumes: Sequence[Volume], seq: int | None, changes: Iterable[tuple[int, int, int]]
    ) -> int:
        """Save, durably, what ``changes`` ((volume, offset, length) about to be
        written, by writes of seq ``seq``; None: after every checkpoint, e.g. a
        resync) would overwrite for the first time in their epoch. Returns the
        bytes saved. Call before issuing the writes."""
        with self.lock:
            epoch = self.epoch_of(seq) if seq is not None else (self._seqs or [None])[-1]
            if epoch is None:
                return 0
            wanted: list[tuple[int, int]] = []
            seen: set[int] = set()
            for volume, offset, length in changes:
                if length <= 0:
                    continue
                for block in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1):
                    key = _key(volume, block)
                    if key in seen:
                        continue
                    saved = self._index.get(key)
                    if saved and saved[-1][0] >= epoch:
                        continue
                    seen.add(key)
                    wanted.append((volume, block))
        if not wanted:
            return 0
        saved_bytes = 0
        written: dict[int, _Segment] = {}
        new: list[tuple[int, Saved]] = []
        wanted.sort()
        chunks = [wanted[i : i + ENTRY_BLOCKS] for i in range(0, len(wanted), ENTRY_BLOCKS)]

        def done(appended: tuple[_Segment, int], slots: list[_Slot]) -> None:
            nonlocal saved_bytes
            segment, data_pos = appended
            written[segment.index] = segment
            for volume, block, zero, length, crc in slots:
                where = -1 if zero else data_pos
                new.append((_key(volume, block), (epoch, segment.index, where, length, crc)))
                if not zero:
                    data_pos += length
                    saved_bytes += length

        # With several entries, each is written by a helper thread while the
        # next one is read and checked here (one in flight at a time).
        pool = self._writer() if len(chunks) > 1 else None
        writing: tuple[concurrent.futures.Future[tuple[_Segment, int]], list[_Slot]] | None = None

        def finish_writing() -> None:
            nonlocal writing
            if writing is not None:
                (future, slots), writing = writing, None
                done(future.result(), slots)

        try:
            for chunk in chunks:
                table, parts, slots = self._gather(volumes, chunk)
                if not slots:
                    continue
                args = (T_BLOCKS, epoch, bytes(table), len(slots), parts, False)
                if pool is None:
                    done(self._append(*args), slots)
                    continue
                finish_writing()
                writing = (pool.submit(self._append, *args), slots)
            finish_writing()
        finally:
            if writing is not None:  # failed meanwhile: the entry in flight ends first
                concurrent.futures.wait([writing[0]])
        for segment in written.values():
            os.fdatasync(segment.fd)
        with self.lock:
            self._add_saved(epoch, new)
        return saved_bytes

    def _gather(
        self, volumes: Sequence[Volume], blocks: list[tuple[int, int]]
    ) -> tuple[bytearray, list[memoryview], list[_Slot]]:
        """Read ``blocks`` ((volume, block), sorted) for one entry: its table,
        its data (stretches of non-zero blocks, as read: not copied) and its
        slots."""
        table = bytearray()
        parts: list[memoryview] = []
        slots: list[_Slot] = []
        for volume, first, count in _runs(blocks):
            # One read per run of consecutive blocks, cut into blocks here.
            size = self.sizes[volume]
            end = min((first + count) * BLOCK, size)
            run = memoryview(volumes[volume].read(first * BLOCK, end - first * BLOCK))
            stretch = 0  # where the current stretch of non-zero blocks starts
            at = 0
            for block in range(first, first + count):
                data = run[at : at + BLOCK]
                length = len(data)
                if length <= 0:
                    break
                crc = crc32c(data)
                zero = _is_zero(data, crc)
                table += _SLOT.pack(volume, FLAG_ZERO if zero else 0, length, block, crc)
                slots.append((volume, block, zero, length, crc))
                if zero:
                    if at > stretch:
                        parts.append(run[stretch:at])
                    stretch = at + length
                at += length
            if at > stretch:
                parts.append(run[stretch:at])
        return table, parts, slots

    def _writer(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._write_pool is None:
            self._write_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="havend-undo"
            )
        return self._write_pool

    def _add_saved(self, epoch: int, slots: Iterable[tuple[int, Saved]]) -> None:
        keys = self._epoch_keys[epoch]
        for key, saved in slots:
            entries = self._index.setdefault(key, [])
            if entries and entries[-1][0] >= epoch:
                continue  # a redo after a crash: saved already
            entries.append(saved)
            keys.append(key)

    # Figures ----------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self.lock:
            return sum(s.size for s in self._segments.values())

    @property
    def saved_blocks(self) -> int:
        with self.lock:
            return sum(len(v) for v in self._index.values())

    def status(self) -> dict[str, Any]:
        with self.lock:
            newest = self.checkpoints[-1] if self.checkpoints else None
            oldest = self.checkpoints[0] if self.checkpoints else None
            return {
                "checkpoints": len(self.checkpoints),
                "oldest": oldest.to_dict() if oldest else None,
                "newest": newest.to_dict() if newest else None,
                "undo_bytes": sum(s.size for s in self._segments.values()),
                "views_open": sum(self.pins.values()),
                "damaged": self.damaged,
            }

    def close(self) -> None:
        if self._write_pool is not None:
            self._write_pool.shutdown()
            self._write_pool = None
        with self.lock:
            for segment in self._segments.values():
                _close(segment)
            self._segments.clear()
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None


def snapshot_ranges(
    directory: str,
    volumes: Sequence[Volume],
    checkpoint: Checkpoint,
    ranges: Iterable[tuple[int, int, int]],
) -> dict[str, Any]:
    """Keep what ``volumes`` hold in ``ranges`` ((volume, offset, length)) before
    they are overwritten by the other side's copy (a failback, a split brain
    resolved for the other side): an undo log in ``directory`` with the one
    ``checkpoint``, readable as a view of it. Run again over the same ranges,
    it keeps the first saved copy of each block."""
    undo = UndoLog(directory, [v.size for v in volumes])
    try:
        undo.add_checkpoint(checkpoint)  # known already when run again
        # One preserve step: entries of up to 2,048 blocks, one fdatasync in all.
        undo.preserve(volumes, None, list(ranges))
        return {"directory": directory, "checkpoint": checkpoint.id, "bytes": undo.used_bytes}
    finally:
        undo.close()
