"""A consistency group's journal: append, group commit, read from a seq, release."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from havend.errors import JournalCorruptError, JournalError
from havend.fsutil import fsync_dir
from havend.journal.record import (
    MAX_PAYLOAD,
    RECORD_HEADER,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    Kind,
    Record,
    decode_record,
    encode_header,
    encode_segment_header,
    record_parts,
    record_size,
)
from havend.journal.recovery import Recovered, recover, segment_first_seq
from havend.journal.superblock import Superblock, read_superblock, write_superblock

SUPERBLOCK = "superblock"
_PAYLOAD_LENGTH = struct.Struct("<I")  # at offset 12 of a record header
_SEGMENT_NAME = re.compile(r"^seg-([0-9a-f]{16})\.log$")
# Records appended last are kept in memory too (about this many bytes), so the
# shipper and the target's applier, which read right behind the writer, take
# them from there instead of reading and checking them again from the file.
TAIL_CACHE_BYTES = 64 << 20


class JournalFull(JournalError):
    """No room for the record until the target acknowledges (and we release) more."""


def _segment_name(index: int) -> str:
    return f"seg-{index:016x}.log"


@dataclass(slots=True)
class _Segment:
    index: int
    path: str
    fd: int
    first_seq: int
    write_pos: int


class Journal:
    """One group's journal. Appends come from one thread; ``sync`` may run in another.

    Use :meth:`create` for a new journal and :meth:`open` for an existing one
    (which recovers it). ``durable_seq`` is the last seq known to be on stable
    storage; only records up to it may be acknowledged or shipped.
    """

    def __init__(
        self,
        directory: str,
        block: Superblock,
        recovered: Recovered,
        *,
        cache_bytes: int = TAIL_CACHE_BYTES,
    ) -> None:
        self.directory = directory
        self.group = block.group
        self.segment_size = block.segment_size
        self.max_segments = block.max_segments
        self.recovered = recovered
        self._block = block
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sb_fd = os.open(os.path.join(directory, SUPERBLOCK), os.O_RDWR | os.O_CLOEXEC)
        self._segments: dict[int, _Segment] = {}
        for index, path in sorted(self._segment_files().items()):
            if index < block.tail_segment:
                os.unlink(path)  # released before a crash finished removing it
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            end = recovered.head_offset if index == recovered.head_segment else self.segment_size
            self._segments[index] = _Segment(index, path, fd, segment_first_seq(path, index), end)
        self._active = self._segments[recovered.head_segment]
        self._release_point: int | None = None  # see releasable
        self._note_segments()
        self._sb_lock = threading.Lock()  # superblock writes, in generation order
        self._sb_written = block.generation
        self._dirty: set[int] = set()
        self.last_seq = recovered.last_seq
        for seg in self._segments.values():  # what recovery read may sit in the page cache only
            os.fdatasync(seg.fd)
        self.durable_seq = self.last_seq
        # (segment, offset, seq) up to which everything is on stable storage.
        self._durable_pos = (recovered.head_segment, recovered.head_offset, self.last_seq)
        self.tail_seq = block.tail_seq
        self._cursor = (0, -1, 0)  # (next seq, segment index, offset) of the last read
        # The newest records: (record, segment index, offset after it), in seq order.
        self._tail: collections.deque[tuple[Record, int, int]] = collections.deque()
        self._tail_bytes = 0
        self.cache_bytes = cache_bytes

    # Creating and opening ---------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        group: uuid.UUID,
        *,
        segment_size: int = 64 << 20,
        max_segments: int = 16,
        first_seq: int = 1,
    ) -> Journal:
        """A new, empty journal whose first record will get ``first_seq`` (a target
        journal starts where its source's sequence is)."""
        directory = os.fspath(directory)
        if segment_size < 1 << 16 or segment_size % 4096:
            raise JournalError("segment size must be a multiple of 4096 and at least 64 KiB")
        if max_segments < 2:
            raise JournalError("a journal needs at least 2 segments")
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, SUPERBLOCK)):
            raise JournalError(f"{directory} already holds a journal")
        block = Superblock(
            generation=0,
            group=group,
            segment_size=segment_size,
            max_segments=max_segments,
            tail_segment=0,
            tail_seq=first_seq,
            head_segment=0,
            head_offset=SEGMENT_HEADER_SIZE,
            head_seq=first_seq - 1,
        )
        _new_segment_file(directory, 0, first_seq, segment_size)
        fd = os.open(
            os.path.join(directory, SUPERBLOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            os.ftruncate(fd, 8192)
            write_superblock(fd, block)
        finally:
            os.close(fd)
        fsync_dir(directory)
        # Nothing to recover in a journal made just now (a recovery would read
        # and scan its whole first segment for records: twice 64 MiB of zeroes).
        empty = Recovered(first_seq - 1, 0, SEGMENT_HEADER_SIZE, 0, 0, ())
        return cls(directory, block, empty)

    def moved_to(self, directory: str | os.PathLike[str]) -> None:
        """The journal's directory was renamed to ``directory`` (its open
        files stay valid): name its files there from now on."""
        directory = os.fspath(directory)
        with self._lock:
            self.directory = directory
            for segment in self._segments.values():
                segment.path = os.path.join(directory, os.path.basename(segment.path))

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Journal:
        """Open and recover a journal (see :mod:`havend.journal.recovery`)."""
        directory = os.fspath(directory)
        try:
            block = read_superblock(os.path.join(directory, SUPERBLOCK))
        except FileNotFoundError:
            raise JournalError(f"{directory} holds no journal") from None
        files = {i: p for i, p in cls._list_segments(directory).items() if i >= block.tail_segment}
        recovered = recover(files, block)
        return cls(directory, block, recovered)

    @staticmethod
    def _list_segments(directory: str) -> dict[int, str]:
        found = {}
        for name in os.listdir(directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                found[int(match.group(1), 16)] = os.path.join(directory, name)
        return found

    def _segment_files(self) -> dict[int, str]:
        return self._list_segments(self.directory)

    # Writing ----------------------------------------------------------------

    def append(
        self,
        kind: Kind,
        volume: int,
        offset: int,
        data: bytes | bytearray | memoryview = b"",
        length: int | None = None,
        *,
        seq: int | None = None,
        timestamp_ns: int | None = None,
        owned: bool = False,
    ) -> int:
        """Append one record (not yet durable: see :meth:`sync`); returns its seq.

        ``seq`` and ``timestamp_ns`` are for a target copying its source's
        records: ``seq`` must then be the next one. ``owned``: the caller hands
        ``data`` over and never changes it again, so the journal keeps it in
        memory (see ``TAIL_CACHE_BYTES``) without a copy.
        """
        if not owned and not isinstance(data, bytes):
            data = bytes(data)
        size = record_size(len(data))
        if size > self.segment_size - SEGMENT_HEADER_SIZE:
            raise JournalError(
                f"a record of {size} bytes does not fit a {self.segment_size}-byte segment"
            )
        with self._lock:
            if self._active.write_pos + size > self.segment_size:
                self._roll()
            if seq is None:
                seq = self.last_seq + 1
            elif seq != self.last_seq + 1:
                raise JournalError(f"seq {seq} appended where {self.last_seq + 1} belongs")
            record = Record(
                seq=seq,
                kind=kind,
                volume=volume,
                offset=offset,
                length=len(data) if length is None else length,
                timestamp_ns=time.time_ns() if timestamp_ns is None else timestamp_ns,
                durable=self.durable_seq,
                data=data,
            )
            # With its header (and CRC) kept: the shipper sends it as written.
            record = dataclasses.replace(record, header=encode_header(record))
            segment = self._active
            _pwrite_all(segment.fd, record_parts(record), segment.write_pos)
            segment.write_pos += size
            self._dirty.add(segment.index)
            self.last_seq = seq
            self._remember(record, segment.index, segment.write_pos)
        return seq

    def _remember(self, record: Record, segment: int, end: int) -> None:
        """Keep the newest records in memory (lock held)."""
        tail = self._tail
        tail.append((record, segment, end))
        self._tail_bytes += len(record.data)
        while self._tail_bytes > self.cache_bytes and len(tail) > 1:
            self._tail_bytes -= len(tail.popleft()[0].data)

    def _forget_through(self, seq: int) -> None:
        tail = self._tail
        while tail and tail[0][0].seq <= seq:
            self._tail_bytes -= len(tail.popleft()[0].data)

    def sync(self) -> int:
        """Make every record appended so far durable; returns the new durable seq.

        Safe to call from worker threads while appends go on (group commit): one
        fdatasync covers every record appended before it started, and a caller
        whose records an in-flight sync already covers waits for it, then returns.
        """
        with self._lock:
            wanted = self.last_seq
        with self._sync_lock:  # one fdatasync at a time; later callers piggyback
            with self._lock:
                if self.durable_seq >= wanted:
                    return self.durable_seq
                target = self.last_seq
                position = (self._active.index, self._active.write_pos, target)
                dirty = [self._segments[i].fd for i in self._dirty if i in self._segments]
                self._dirty.clear()
            for fd in dirty:
                os.fdatasync(fd)
            with self._lock:
                if target > self.durable_seq:
                    self.durable_seq = target
                    self._durable_pos = position
                return self.durable_seq

    def _roll(self) -> None:
        """Start the next segment (lock held). Nothing is synced here: the head
        hint written now is the last durable position, so recovery scans every
        record that a crash could have torn."""
        if len(self._segments) >= self.max_segments:
            raise JournalFull(
                f"journal {self.directory} is full: {len(self._segments)} segments of "
                f"{self.segment_size} bytes, oldest unreleased seq {self.tail_seq}"
            )
        index = self._active.index + 1
        path = _new_segment_file(self.directory, index, self.last_seq + 1, self.segment_size)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._active = _Segment(index, path, fd, self.last_seq + 1, SEGMENT_HEADER_SIZE)
        self._segments[index] = self._active
        self._note_segments()
        head_segment, head_offset, head_seq = self._durable_pos
        self._write_block(head_segment=head_segment, head_offset=head_offset, head_seq=head_seq)

    def _write_block(self, **changes: int) -> None:
        """Change the superblock and write it (lock held)."""
        self._store_block(self._change_block(**changes))

    def _change_block(self, **changes: int) -> Superblock:
        self._block = self._block.replace(generation=self._block.generation + 1, **changes)
        return self._block

    def _store_block(self, block: Superblock) -> None:
        """Write ``block`` durably unless a later one is written already: each
        block carries every change before it, so the newest one is enough."""
        with self._sb_lock:
            if block.generation > self._sb_written:
                write_superblock(self._sb_fd, block)
                self._sb_written = block.generation

    def _note_segments(self) -> None:
        """(Lock held.) Remember the first seq of the second-oldest segment:
        records up to just before it free the oldest one."""
        firsts = sorted(s.first_seq for s in self._segments.values())
        self._release_point = firsts[1] if len(firsts) > 1 else None

    # Reading and releasing ----------------------------------------------------

    def read(
        self, after_seq: int, max_bytes: int = 4 << 20, *, durable_only: bool = True
    ) -> list[Record]:
        """Durable records with seq > ``after_seq``, about ``max_bytes`` of them
        (``durable_only=False``: every record appended, synced or not).

        Every record is checked again (CRC, consecutive seq): a damaged one
        raises :class:`JournalCorruptError` and is never returned. Reading on
        from the last record returned is cheap (a cursor remembers where it is).
        """
        with self._lock:
            limit = self.durable_seq if durable_only else self.last_seq
            if after_seq + 1 < self.tail_seq:
                raise JournalError(
                    f"seq {after_seq + 1} was released; the journal starts at {self.tail_seq}"
                )
            if after_seq >= limit:
                return []
            cached = self._read_tail(after_seq, limit, max_bytes)
            if cached is not None:
                return cached
            segments = sorted(self._segments.values(), key=lambda s: s.index)
            active = self._active
        out: list[Record] = []
        segment, pos, expected = self._locate(after_seq + 1, segments)
        total = 0
        while expected <= limit and total < max_bytes:
            end = segment.write_pos if segment is active else self.segment_size
            for record, after in _records(segment, pos, end):
                if record is None:
                    break
                if record.seq != expected:
                    raise JournalCorruptError(
                        f"journal segment {segment.path} offset {pos}: seq {record.seq} "
                        f"where {expected} belongs"
                    )
                pos, expected = after, expected + 1
                if record.seq > after_seq:
                    out.append(record)
                    total += record.size
                    if total >= max_bytes or expected > limit:
                        break
            else:
                break
            if total >= max_bytes or expected > limit:
                break
            following = segments[segments.index(segment) + 1 :]
            if (
                segment is active
                or not following
                or following[0].first_seq != expected
                or os.pread(segment.fd, end - pos, pos).strip(b"\0")
            ):
                raise JournalCorruptError(
                    f"journal segment {segment.path} offset {pos}: record seq {expected} is damaged"
                )
            segment, pos = following[0], SEGMENT_HEADER_SIZE
        self._cursor = (expected, segment.index, pos)
        return out

    def _read_tail(self, after_seq: int, limit: int, max_bytes: int) -> list[Record] | None:
        """Records after ``after_seq`` from memory, or None if they are not all
        there any more (lock held). Moves the file cursor along with them."""
        tail = self._tail
        if not tail or tail[0][0].seq > after_seq + 1:
            return None
        out: list[Record] = []
        total = 0
        position = None
        for record, segment, end in itertools.islice(tail, after_seq + 1 - tail[0][0].seq, None):
            if record.seq > limit:
                break
            out.append(record)
            position = (record.seq + 1, segment, end)
            total += record.size
            if total >= max_bytes:
                break
        if position is not None:
            self._cursor = position
        return out

    def _locate(self, seq: int, segments: list[_Segment]) -> tuple[_Segment, int, int]:
        """(segment, offset, seq there) to start reading ``seq`` from."""
        cursor_seq, cursor_index, cursor_pos = self._cursor
        if cursor_seq == seq and cursor_index in self._segments:
            return self._segments[cursor_index], cursor_pos, cursor_seq
        start = next((s for s in reversed(segments) if s.first_seq <= seq), segments[0])
        return start, SEGMENT_HEADER_SIZE, start.first_seq

    def releasable(self, seq: int) -> bool:
        """Whether :meth:`release_through` of ``seq`` would free a segment.
        Never waits (an event loop asks it at every acknowledgement, while
        the lock may be held through a superblock's fdatasync)."""
        point = self._release_point
        return point is not None and point <= seq + 1

    def release_through(self, seq: int) -> int:
        """Drop whole segments whose records are all ≤ ``seq`` (acknowledged by the
        target); returns the bytes freed. The active segment is never dropped."""
        with self._lock:
            ordered = sorted(self._segments)
            drop = [
                i
                for i, nxt in itertools.pairwise(ordered)
                if self._segments[nxt].first_seq <= seq + 1
            ]
            if not drop:
                return 0
            new_tail = ordered[len(drop)]
            self.tail_seq = self._segments[new_tail].first_seq
            hint: dict[str, int] = {}
            if self._durable_pos[0] < new_tail:  # never point recovery into a freed segment
                self._durable_pos = (new_tail, SEGMENT_HEADER_SIZE, self.tail_seq - 1)
            if self._block.head_segment < new_tail:
                hint = dict(
                    zip(("head_segment", "head_offset", "head_seq"), self._durable_pos, strict=True)
                )
            block = self._change_block(tail_segment=new_tail, tail_seq=self.tail_seq, **hint)
            gone = [self._segments.pop(i) for i in drop]
            self._note_segments()
            self._forget_through(self.tail_seq - 1)
        # Written with the lock released: appends go on meanwhile. Records in
        # the dropped segments are no longer read (tail_seq moved); their files
        # go only once the new tail is on stable storage.
        self._store_block(block)
        # A sync in flight may be about to fdatasync these descriptors: close
        # them once it is done (an EBADF, or another file's number, otherwise).
        with self._sync_lock:
            for segment in gone:
                os.close(segment.fd)
                os.unlink(segment.path)
        fsync_dir(self.directory)
        return len(gone) * self.segment_size

    # Accounting -----------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.write_pos - SEGMENT_HEADER_SIZE for s in self._segments.values())

    @property
    def capacity_bytes(self) -> int:
        return self.max_segments * (self.segment_size - SEGMENT_HEADER_SIZE)

    def close(self) -> None:
        """Sync, record the head hint, close files."""
        if self._sb_fd < 0:
            return
        self.sync()
        with self._lock:
            self._write_block(
                head_segment=self._active.index,
                head_offset=self._active.write_pos,
                head_seq=self.last_seq,
            )
            for segment in self._segments.values():
                os.close(segment.fd)
            os.close(self._sb_fd)
            self._sb_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_READ_CHUNK = 1 << 20


def _records(segment: _Segment, pos: int, end: int) -> Iterator[tuple[Record | None, int]]:
    """(record, offset after it) from ``pos`` up to ``end``, reading in chunks;
    ``(None, offset)`` where no valid record starts (the end, or damage)."""
    while pos + RECORD_HEADER.size <= end:
        buf = os.pread(segment.fd, min(_READ_CHUNK, end - pos), pos)
        off = 0
        while len(buf) - off >= RECORD_HEADER.size:
            (payload,) = _PAYLOAD_LENGTH.unpack_from(buf, off + 12)
            size = record_size(min(payload, MAX_PAYLOAD))
            if len(buf) - off < size:
                if off == 0 and size <= end - pos:  # one record larger than a chunk
                    buf = os.pread(segment.fd, size, pos)
                    continue
                break
            try:
                record = decode_record(buf, off, copy=False)  # buf is never changed
            except BadRecord:
                yield None, pos + off
                return
            off += record.size
            yield record, pos + off
        if off == 0:
            break
        pos += off
    yield None, pos


def _pwrite_all(fd: int, parts: tuple[bytes | bytearray | memoryview, ...], pos: int) -> None:
    done = os.pwritev(fd, parts, pos)
    total = sum(len(p) for p in parts)
    if done < total:  # only on a signal or a full disk: finish it the simple way
        rest = b"".join(parts)[done:]
        while rest:
            n = os.pwrite(fd, rest, pos + done)
            done += n
            rest = rest[n:]


def _new_segment_file(directory: str, index: int, first_seq: int, size: int) -> str:
    """Build a preallocated segment under a temporary name, then publish it."""
    final = os.path.join(directory, _segment_name(index))
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, encode_segment_header(index, first_seq), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(directory)
    return final
