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

On-disk format, in the group's ``cdp/`` directory (integers little-endian):

``undo-<index, 16 hex digits>.log``
    Entries appended one after the other; a new file once one passes
    ``segment_bytes``. An entry::

        magic "HUL1" | u32 crc32c (of the rest of the header, the table and,
        for checkpoint and rollback entries, the data) | u8 type | u8 flags
        | 2 pad | u64 epoch | u64 time ns | u32 count | u32 data length
        count x (u16 volume | u16 flags | u32 length | u64 block | u32 crc32c)
        data (the blocks not flagged zero, in table order; or a JSON body)
        with entry flag 1 (aligned): zeroes up to the next multiple of 4 KiB

    Entries are aligned and written with O_DIRECT from one reused buffer: the
    saved blocks are read back only by views and rollbacks, and putting them
    in the page cache cost more CPU than anything else the undo log does (new
    pages, then their write-back). Where the file system refuses O_DIRECT
    they go through the page cache, in the same format. Files written before
    entries were aligned are read as they are; appends then go to a new file.

    Types: 1 blocks (the table says which; flag 1: all zeroes, no data),
    2 checkpoint (epoch = its seq; JSON id, time, label, consistency),
    3 rollback (epoch = the checkpoint seq made latest again).

``state.json``
    ``{"oldest_seq"}``: checkpoints below it were reclaimed (their entries
    may still sit in a file shared with newer epochs); ``"rolling_back_to"``
    while a rollback is being carried out (finished at the next open).

Retention drops the oldest checkpoints (by count and age, never one that an
open view uses) and deletes the files that hold only their epochs.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import errno
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crc32c import crc32c

from havend.cdp.checkpoint import Checkpoint
from havend.errors import CheckpointError, UndoCorruptError
from havend.fsutil import fsync_dir, write_atomic

log = logging.getLogger("havend.cdp")

BLOCK = 4096
SEGMENT_BYTES = 64 << 20
# Blocks per entry: bounds the memory of one preserve step.
ENTRY_BLOCKS = 2048
_HEADER = struct.Struct("<4sIBB2xQQII")
_SLOT = struct.Struct("<HHIQI")
MAGIC = b"HUL1"
T_BLOCKS, T_CHECKPOINT, T_ROLLBACK = 1, 2, 3
FLAG_ZERO = 1
# Entry flag: zeroes follow the entry up to the next multiple of ALIGN, where
# the next entry starts (entries written with O_DIRECT).
ENTRY_ALIGNED = 1
ALIGN = 4096
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CRC = crc32c(_ZERO_BLOCK)
_SEGMENT_NAME = re.compile(r"^undo-([0-9a-f]{16})\.log$")
# Index keys: volume << 48 | block number.
_VOLUME_SHIFT = 48


class Volume(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


@dataclass(slots=True)
class _Segment:
    index: int
    path: str
    fd: int
    size: int
    max_epoch: int  # newest epoch with an entry here (-1: none)
    direct_fd: int = -1  # the same file opened with O_DIRECT, for appending


def _close(segment: _Segment) -> None:
    for fd in (segment.fd, segment.direct_fd):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# Where a saved block is: (epoch, segment, offset of its data or -1 for zeroes,
# length, crc32c). Tuples sort by epoch first, for bisect.
Saved = tuple[int, int, int, int, int]
# A block of an entry being written: (volume, block, all zeroes, length, crc32c).
_Slot = tuple[int, int, bool, int, int]


def _key(volume: int, block: int) -> int:
    return volume << _VOLUME_SHIFT | block


def _is_zero(data: memoryview, crc: int) -> bool:
    """All zeroes? The CRC rules out nearly every block at no cost (comparing
    a memoryview element by element is slow); a short last block is compared."""
    if len(data) == BLOCK:
        return crc == _ZERO_CRC and data.tobytes() == _ZERO_BLOCK
    return not data.tobytes().strip(b"\0")


def _runs(blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(volume, first block, count) of consecutive blocks, from sorted (volume, block)."""
    run_volume, run_first, run_count = -1, 0, 0
    for volume, block in blocks:
        if volume == run_volume and block == run_first + run_count:
            run_count += 1
            continue
        if run_count:
            yield run_volume, run_first, run_count
        run_volume, run_first, run_count = volume, block, 1
    if run_count:
        yield run_volume, run_first, run_count


class UndoLog:
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
        """Record a checkpoint the applier reached (durably); False if known."""
        with self.lock:
            if checkpoint.id in self._by_id:
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

    # Reading --------------------------------------------------------------------

    def read(
        self, volumes: Sequence[Volume], volume: int, seq: int, offset: int, length: int
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
        self, retain: int, max_age: float = 0.0, now: float | None = None
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
            new_oldest = self._seqs[0] if self._seqs else dropped[-1].seq + 1
            self._write_state(oldest_seq=new_oldest)
            self._forget_before(new_oldest)
            gone = [
                s
                for s in self._segments.values()
                if s is not self._active and s.max_epoch < new_oldest
            ]
            for segment in gone:
                del self._segments[segment.index]
        for segment in gone:
            _close(segment)
            os.unlink(segment.path)
        if gone:
            fsync_dir(self.directory)
        return dropped

    def changed_between(self, first: int, last: int) -> list[list[tuple[int, int]]]:
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

    def _forget_before(self, seq: int) -> None:
        """Drop saved blocks of epochs before ``seq`` (lock held)."""
        for epoch in [e for e in self._epoch_keys if e < seq]:
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

    def _forget_from(self, seq: int) -> None:
        """A rollback to the checkpoint of ``seq``: drop the checkpoints after it
        and every block saved in epochs from it on (lock held)."""
        for epoch in [e for e in self._epoch_keys if e >= seq]:
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

    def rollback(self, volumes: Sequence[Volume], checkpoint_id: str) -> tuple[Checkpoint, int]:
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

    def finish_rollback(self, volumes: Sequence[Volume]) -> int | None:
        """Carry out a rollback a crash interrupted; returns its seq, or None."""
        if self._pending_rollback is None:
            return None
        seq = self._pending_rollback
        self._roll_back(volumes, seq)
        return seq

    def _roll_back(self, volumes: Sequence[Volume], seq: int) -> int:
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
            self._write_state(rolling_back_to=None)
            self._pending_rollback = None
        return rewritten

    # Views ----------------------------------------------------------------------

    def pin(self, checkpoint: Checkpoint) -> None:
        with self.lock:
            if checkpoint.id not in self._by_id:
                raise CheckpointError(f"checkpoint {checkpoint.id} is no longer retained")
            self.pins[checkpoint.seq] += 1

    def unpin(self, checkpoint: Checkpoint) -> None:
        with self.lock:
            self.pins[checkpoint.seq] -= 1
            if self.pins[checkpoint.seq] <= 0:
                del self.pins[checkpoint.seq]

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
