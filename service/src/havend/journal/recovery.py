"""Finding where a journal ends after a crash, and telling a torn tail from corruption."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from havend.errors import JournalCorruptError
from havend.journal.record import (
    ALIGN,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    Record,
    decode_record,
    decode_segment_header,
)
from havend.journal.superblock import Superblock


@dataclass(frozen=True, slots=True)
class Recovered:
    """Where appends resume, and what recovery had to discard."""

    last_seq: int
    head_segment: int
    head_offset: int
    records_scanned: int
    torn_bytes: int  # bytes zeroed at the end of the head segment
    dropped_segments: tuple[int, ...]  # later segments holding only torn records


def read_segment(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def segment_first_seq(path: str, index: int) -> int:
    with open(path, "rb") as f:
        header = f.read(SEGMENT_HEADER_SIZE)
    try:
        got, first_seq = decode_segment_header(header)
    except BadRecord as exc:
        raise JournalCorruptError(f"journal segment {path}: {exc}") from None
    if got != index:
        raise JournalCorruptError(f"journal segment {path} says it is segment {got}")
    return first_seq


def _valid_records_from(buf: bytes, pos: int) -> list[Record]:
    """Every valid record at an aligned position at or after ``pos``."""
    found = []
    while (pos := buf.find(RECORD_MAGIC, pos)) >= 0:
        if pos % ALIGN == 0:
            with contextlib.suppress(BadRecord):
                found.append(decode_record(buf, pos))
        pos += 1
    return found


def recover(segments: Mapping[int, str], block: Superblock) -> Recovered:
    """Scan from the superblock's head hint to the last valid record.

    Raises :class:`JournalCorruptError` when a record is damaged although a later
    record proves it had been made durable. A torn tail is zeroed in place.
    """
    index, pos, expected = block.head_segment, block.head_offset, block.head_seq + 1
    if index not in segments:
        raise JournalCorruptError(f"journal head segment {index} is missing")
    scanned = 0
    while True:
        path = segments[index]
        buf = read_segment(path)
        if segment_first_seq(path, index) > expected:
            raise JournalCorruptError(
                f"journal segment {path} starts at seq {segment_first_seq(path, index)}, "
                f"but seq {expected} is missing before it"
            )
        while True:
            try:
                record = decode_record(buf, pos)
            except BadRecord:
                break
            if record.seq != expected:
                break
            scanned += 1
            expected += 1
            pos += record.size
        following = [r for r in _valid_records_from(buf, pos) if r.seq >= expected]
        nxt = segments.get(index + 1)
        if not following and nxt is not None and segment_first_seq(nxt, index + 1) == expected:
            index, pos = index + 1, SEGMENT_HEADER_SIZE  # the writer rolled here
            continue
        break

    later = [i for i in sorted(segments) if i > index]
    for i in later:
        following += [r for r in _valid_records_from(read_segment(segments[i]), 0)]
    proof = max((r.durable for r in following if r.seq >= expected), default=0)
    if proof >= expected:
        raise JournalCorruptError(
            f"journal segment {segments[index]} offset {pos}: record seq {expected} is "
            f"damaged, but a later record shows seq {proof} had been made durable: "
            "acknowledged writes are unreadable; the group needs a resync"
        )
    torn = _zero_tail(segments[index], pos)
    for i in later:
        os.unlink(segments[i])
    return Recovered(expected - 1, index, pos, scanned, torn, tuple(later))


def _zero_tail(path: str, pos: int) -> int:
    """Zero a segment from ``pos`` on if anything is there; the bytes zeroed."""
    buf = read_segment(path)
    tail = buf[pos:]
    if not tail.strip(b"\0"):
        return 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(len(tail)), pos)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return len(tail.rstrip(b"\0"))
