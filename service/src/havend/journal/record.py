"""Journal records and segment headers: encoding and checked decoding, no I/O."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from crc32c import crc32c

RECORD_MAGIC = b"HJR1"
# magic, crc, kind, volume, payload length, seq, offset, length, timestamp, durable
RECORD_HEADER = struct.Struct("<4sIHHIQQQQQ")
SEGMENT_MAGIC = b"HVNJSEG1"
# magic, version, crc, index, first seq, then zero padding to 64 bytes
SEGMENT_HEADER = struct.Struct("<8sIIQQ")
SEGMENT_HEADER_SIZE = 64
VERSION = 1
ALIGN = 8
# A record's payload is one NBD request at most (32 MiB); more means garbage.
MAX_PAYLOAD = 1 << 25


class Kind(enum.IntEnum):
    """What a record does to its volume."""

    WRITE = 1  # payload is the data written at offset
    ZERO = 2  # length bytes at offset now read as zeroes
    TRIM = 3  # length bytes at offset were discarded (read as zeroes here)
    CHECKPOINT = 4  # a marker in the sequence (payload: JSON, see havend.cdp); no data
    VOLUME = 5  # a change of the group's volumes (payload: JSON, see havend.members); no data

    @property
    def is_marker(self) -> bool:
        """A mark in the write order that changes no block."""
        return self in (Kind.CHECKPOINT, Kind.VOLUME)


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    kind: Kind
    volume: int
    offset: int
    length: int
    timestamp_ns: int
    # The journal's durable seq when this record was written: every record up to
    # it had been fdatasynced (and maybe acknowledged). Recovery uses it to tell
    # a torn tail from lost acknowledged data.
    durable: int = 0
    # The payload; a view into a larger immutable buffer when the record was
    # decoded without copying (a received batch, a journal's memory).
    data: bytes | bytearray | memoryview = b""
    # The header as stored or received (with its CRC), when known: a record
    # read from a journal is shipped as it is, without computing its CRC again.
    header: bytes = field(default=b"", compare=False, repr=False)

    @property
    def size(self) -> int:
        """Bytes the record takes in a segment."""
        return record_size(len(self.data))


def record_size(payload: int) -> int:
    return RECORD_HEADER.size + (payload + ALIGN - 1) // ALIGN * ALIGN


_PADDING = [bytes(n) for n in range(ALIGN)]


def encode_header(record: Record) -> bytes:
    """The record's header, CRC included (covers the header and the payload)."""
    data = record.data
    header = RECORD_HEADER.pack(
        RECORD_MAGIC,
        0,
        record.kind,
        record.volume,
        len(data),
        record.seq,
        record.offset,
        record.length,
        record.timestamp_ns,
        record.durable,
    )
    crc = crc32c(data, crc32c(header[8:]))
    return b"".join((header[:4], crc.to_bytes(4, "little"), header[8:]))


def record_parts(record: Record) -> tuple[bytes, bytes | bytearray | memoryview, bytes]:
    """(header, payload, padding): the record as stored, in pieces to write or
    join without copying the payload first."""
    return record.header or encode_header(record), record.data, _PADDING[-len(record.data) % ALIGN]


def encode_record(record: Record) -> bytes:
    return b"".join(record_parts(record))


class BadRecord(Exception):
    """Why the bytes at a position are not a valid record (internal to the journal)."""


def decode_record(
    buf: bytes | bytearray | memoryview, pos: int = 0, *, copy: bool = True
) -> Record:
    """The record at ``buf[pos:]``; raises :class:`BadRecord` if it is not one, whole.

    ``copy=False`` leaves the payload a view into ``buf`` (which must then never
    change: an immutable ``bytes``)."""
    if len(buf) - pos < RECORD_HEADER.size:
        raise BadRecord("truncated header")
    magic, crc, kind, volume, payload, seq, offset, length, ts, durable = RECORD_HEADER.unpack_from(
        buf, pos
    )
    if magic != RECORD_MAGIC:
        raise BadRecord("no record magic")
    if payload > MAX_PAYLOAD:
        raise BadRecord(f"payload length {payload} is implausible")
    start = pos + RECORD_HEADER.size
    if len(buf) - start < payload:
        raise BadRecord("truncated payload")
    view = memoryview(buf)
    if crc32c(view[start : start + payload], crc32c(view[pos + 8 : start])) != crc:
        raise BadRecord("CRC mismatch")
    try:
        kind = Kind(kind)
    except ValueError:
        raise BadRecord(f"unknown record kind {kind}") from None
    data = view[start : start + payload]
    header = bytes(view[pos:start])
    return Record(
        seq, kind, volume, offset, length, ts, durable, bytes(data) if copy else data, header
    )


def encode_segment_header(index: int, first_seq: int) -> bytes:
    header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, 0, index, first_seq)
    crc = crc32c(header)
    header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, crc, index, first_seq)
    return header + bytes(SEGMENT_HEADER_SIZE - len(header))


def decode_segment_header(buf: bytes) -> tuple[int, int]:
    """(index, first seq) of a segment header; raises :class:`BadRecord`."""
    if len(buf) < SEGMENT_HEADER.size:
        raise BadRecord("truncated segment header")
    magic, version, crc, index, first_seq = SEGMENT_HEADER.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        raise BadRecord("no segment magic")
    if version != VERSION:
        raise BadRecord(f"segment version {version} is not {VERSION}")
    if crc32c(SEGMENT_HEADER.pack(magic, version, 0, index, first_seq)) != crc:
        raise BadRecord("segment header CRC mismatch")
    return index, first_seq
