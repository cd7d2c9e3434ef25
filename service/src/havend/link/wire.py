"""Frames between a source and a target node, without I/O.

Every frame is ``u32 length | u8 type | payload`` (little-endian; length counts
the payload only). Control frames carry a JSON object; the data path is binary:

``HELLO`` (source → target, JSON)
    ``{"version", "node", "group", "name", "volumes": [{"name", "size", "state"?,
    "purge"?}] (every slot, see havend.members), "mode",
    "retention": {"count", "max_age_seconds"}}``
``WELCOME`` (target → source, JSON)
    ``{"node", "durable_seq", "state", "generation"}``: ship from
    ``durable_seq + 1`` on (``state``: the replica's, see ``target.resync``).
``REFUSED`` (target → source, JSON)
    ``{"code", "error"}``; the target closes the connection after it.
``BATCH`` (source → target)
    ``16s group | u64 first seq | u64 last seq | u8 codec | u32 raw length``,
    then the records, in the journal's own record format (each with its CRC),
    raw or zstd-compressed as a whole.
``ACK`` (target → source)
    ``16s group | u64 durable seq``: every record up to it is on the target's
    stable storage.

Resync (initial sync of a new replica, or after the journal lost records the
target needs), before any BATCH of the session:

``SYNC_BEGIN`` (JSON) ``{"resume_seq"}``: records resume after this seq once
    the pass is over; the target answers ``SYNC_READY`` (JSON) when its
    replica is quiet.
``HASH_REQ`` ``u32 request | u16 volume | u32 granularity | u32 count``, then
    ``count`` times ``u64 offset | u32 length``: hash these ranges in blocks of
    ``granularity`` bytes.
``HASHES`` ``u32 request`` then one xxh3-64 (u64) per block, in order.
``SYNC_DATA`` ``u16 volume | u64 offset`` then the bytes to write there.
``SYNC_END`` (JSON) ``{"high_seq"}``: the replica is consistent once every
    record up to ``high_seq`` is applied; the target answers ``SYNC_DONE``.

Planned failover, once the source is fenced and drained:

``FAILOVER`` (JSON) ``{"final_seq"}``: every write is acknowledged up to it;
    promote the replica there. The target answers ``PROMOTED`` (JSON, the
    promotion record: ``applied_seq``, ``generation``...) and refuses the
    group's records from then on (``REFUSED`` with ``"code": "promoted"``).

Failback, on a session whose HELLO carries ``"failback": {"generation"}`` (the
promoted generation): the target stops its promoted volumes' writes and
answers ``WELCOME`` with ``"failback": true``, ``"applied_seq"`` (where it was
promoted) and ``"changed"`` (per volume, the ranges written since). The
source compares blocks with ``HASH_REQ`` and pulls the differing ones:

``READ_REQ`` (the ``HASH_REQ`` layout; granularity unused): the target answers
    ``SYNC_DATA`` frames with the bytes of every range, then ``READ_DONE``
    (JSON) ``{"request"}``.
``FAILBACK_DONE`` (JSON) ``{"resume_seq"}``: both copies are equal; the
    target is a replica again at ``resume_seq`` and answers ``FAILBACK_OK``.

Split brain: a promoted target answers a HELLO with ``REFUSED`` ``{"code":
"promoted", "promoted", "clock"}``; the source compares that clock with its
own (midway through the round trip) and, if it took writes after the
promotion, reconnects with ``"split_brain": {"generation", "production"}`` in
its HELLO; the target records it, fences its promoted volumes and answers
``REFUSED`` ``{"code": "split_brain", "split_brain"}``. A HELLO with
``"resolve": {"generation", "survivor"}`` ends it: ``survivor: recovery`` is
answered ``RESOLVED`` at once; ``survivor: production`` with ``WELCOME``
``{"resolve": true, "changed"}``, then the source's ``RESOLVE_DONE`` (it holds
those ranges as dirty, durably) and the target's ``RESOLVED`` (a replica again).

Reverse protection, while failed over: a HELLO with ``"reverse": {"generation",
"base"}`` (the round checkpoint the old source holds, or null) starts a round:
``WELCOME`` ``{"reverse": true, "checkpoint", "incremental", "changed",
"applied_seq"}``; ``HASH_REQ`` and ``READ_REQ`` then read the promoted volumes
as of that checkpoint; ``REVERSE_DONE`` ``{"checkpoint"}`` (the old source
holds it now) is answered ``REVERSE_OK``.
"""

from __future__ import annotations

import enum
import itertools
import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import zstandard

from havend.errors import RemoteProtocolError
from havend.journal.record import BadRecord, Record, decode_record, record_parts

VERSION = 1
_FRAME = struct.Struct("<IB")
FRAME_HEADER_SIZE = _FRAME.size
_BATCH = struct.Struct("<16sQQBI")
_ACK = struct.Struct("<16sQ")
# Frames larger than this are not ours: drop the connection.
MAX_FRAME = 80 << 20


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    BATCH = 4
    ACK = 5
    SYNC_BEGIN = 6
    SYNC_READY = 7
    HASH_REQ = 8
    HASHES = 9
    SYNC_DATA = 10
    SYNC_END = 11
    SYNC_DONE = 12
    FAILOVER = 13
    PROMOTED = 14
    READ_REQ = 15
    READ_DONE = 16
    FAILBACK_DONE = 17
    FAILBACK_OK = 18
    RESOLVE_DONE = 19
    RESOLVED = 20
    REVERSE_DONE = 21
    REVERSE_OK = 22


_JSON_FRAMES = {
    FrameType.HELLO,
    FrameType.WELCOME,
    FrameType.REFUSED,
    FrameType.SYNC_BEGIN,
    FrameType.SYNC_READY,
    FrameType.SYNC_END,
    FrameType.SYNC_DONE,
    FrameType.FAILOVER,
    FrameType.PROMOTED,
    FrameType.READ_DONE,
    FrameType.FAILBACK_DONE,
    FrameType.FAILBACK_OK,
    FrameType.RESOLVE_DONE,
    FrameType.RESOLVED,
    FrameType.REVERSE_DONE,
    FrameType.REVERSE_OK,
}
_HASH_REQ = struct.Struct("<IHII")
_RANGE = struct.Struct("<QI")
_SYNC_DATA = struct.Struct("<HQ")


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class Control:
    type: FrameType
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Batch:
    group: uuid.UUID
    first_seq: int
    last_seq: int
    records: list[Record]
    wire_bytes: int  # size on the wire, for throughput and compression figures


@dataclass(frozen=True, slots=True)
class Ack:
    group: uuid.UUID
    durable_seq: int


@dataclass(frozen=True, slots=True)
class HashRequest:
    request: int
    volume: int
    granularity: int
    ranges: list[tuple[int, int]]  # (offset, length)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    request: int
    volume: int
    ranges: list[tuple[int, int]]  # (offset, length)


@dataclass(frozen=True, slots=True)
class Hashes:
    request: int
    hashes: list[int]


@dataclass(frozen=True, slots=True)
class SyncData:
    volume: int
    offset: int
    data: bytes


Frame = Control | Batch | Ack | HashRequest | ReadRequest | Hashes | SyncData


def encode_hash_request(req: HashRequest) -> bytes:
    body = _HASH_REQ.pack(req.request, req.volume, req.granularity, len(req.ranges))
    body += b"".join(_RANGE.pack(o, n) for o, n in req.ranges)
    return _FRAME.pack(len(body), FrameType.HASH_REQ) + body


def encode_read_request(request: int, volume: int, ranges: list[tuple[int, int]]) -> bytes:
    body = _HASH_REQ.pack(request, volume, 4096, len(ranges))
    body += b"".join(_RANGE.pack(o, n) for o, n in ranges)
    return _FRAME.pack(len(body), FrameType.READ_REQ) + body


def encode_hashes(request: int, hashes: list[int]) -> bytes:
    body = struct.pack(f"<I{len(hashes)}Q", request, *hashes)
    return _FRAME.pack(len(body), FrameType.HASHES) + body


def encode_sync_data(volume: int, offset: int, data: bytes | memoryview) -> bytes:
    header = _SYNC_DATA.pack(volume, offset)
    return _FRAME.pack(len(header) + len(data), FrameType.SYNC_DATA) + header + bytes(data)


def encode_control(kind: FrameType, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return _FRAME.pack(len(payload), kind) + payload


def encode_ack(group: uuid.UUID, durable_seq: int) -> bytes:
    return _FRAME.pack(_ACK.size, FrameType.ACK) + _ACK.pack(group.bytes, durable_seq)


def encode_batch(
    group: uuid.UUID,
    records: list[Record],
    compressor: zstandard.ZstdCompressor | None = None,
) -> bytes:
    """One BATCH frame, in one piece (see :func:`batch_pieces`)."""
    return b"".join(batch_pieces(group, records, compressor))


Piece = bytes | bytearray | memoryview


def batch_pieces(
    group: uuid.UUID,
    records: list[Record],
    compressor: zstandard.ZstdCompressor | None = None,
) -> list[Piece]:
    """One BATCH frame as pieces to send one after the other (``writelines``):
    the records' payloads as they are, never copied, with the small pieces
    between them (headers, padding) joined. Compressed only when that makes
    it smaller."""
    parts = [part for r in records for part in record_parts(r)]
    raw_len = sum(len(p) for p in parts)
    header = _BATCH.pack(group.bytes, records[0].seq, records[-1].seq, Codec.RAW, raw_len)
    if compressor is not None and _worth_compressing(records, raw_len, compressor):
        raw = b"".join(parts)
        packed = compressor.compress(raw)
        if len(packed) < raw_len * 0.9:
            header = _BATCH.pack(group.bytes, records[0].seq, records[-1].seq, Codec.ZSTD, raw_len)
            return [_FRAME.pack(len(header) + len(packed), FrameType.BATCH) + header, packed]
        parts = [raw]
    pieces: list[Piece] = []
    small: list[Piece] = [_FRAME.pack(len(header) + raw_len, FrameType.BATCH), header]
    for part in parts:
        if len(part) < _SMALL_PIECE:
            small.append(part)
            continue
        if small:
            pieces.append(b"".join(small))
            small = []
        pieces.append(part)
    if small:
        pieces.append(b"".join(small))
    return pieces


# Pieces shorter than this are joined with their neighbours rather than sent
# alone: each piece becomes at least one TLS record of its own.
_SMALL_PIECE = 4096


_SAMPLE = 64 * 1024


def _worth_compressing(
    records: list[Record], raw_len: int, compressor: zstandard.ZstdCompressor
) -> bool:
    """Incompressible data (encrypted, already compressed) is sent as it is: a
    sample from the middle of the batch decides, for a fraction of the cost."""
    if raw_len <= 4 * _SAMPLE:
        return True
    pieces: list[bytes | bytearray | memoryview] = []
    taken = 0
    for record in itertools.islice(records, len(records) // 2, None):
        pieces.append(record.data[: _SAMPLE - taken])
        taken += len(pieces[-1])
        if taken >= _SAMPLE:
            break
    if taken < 4096:  # hardly any data in the middle (zeroes, trims): let zstd try
        return True
    sample = b"".join(pieces)
    return len(compressor.compress(sample)) < len(sample) * 0.9


class FrameDecoder:
    """Feed bytes, take frames. Raises RemoteProtocolError on anything malformed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decompressor = zstandard.ZstdDecompressor()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> Frame | None:
        buf = self._buf
        if len(buf) < _FRAME.size:
            return None
        length, kind = self.parse_header(buf)
        end = _FRAME.size + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[_FRAME.size : end])
        del buf[:end]
        return self.decode(kind, payload, end)

    @staticmethod
    def parse_header(header: bytes | bytearray) -> tuple[int, int]:
        """(payload length, frame type) from the first ``FRAME_HEADER_SIZE`` bytes."""
        length, kind = _FRAME.unpack_from(header)
        if length > MAX_FRAME:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        return length, kind

    def decode(self, kind: int, payload: bytes, wire_bytes: int) -> Frame:
        """The frame of type ``kind`` whose payload is ``payload`` (kept, not
        copied: a BATCH's records are views into it)."""
        try:
            kind = FrameType(kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {kind}") from None
        if kind == FrameType.BATCH:
            return self._batch(payload, wire_bytes)
        if kind == FrameType.ACK:
            if len(payload) != _ACK.size:
                raise RemoteProtocolError("malformed ACK frame")
            group, seq = _ACK.unpack(payload)
            return Ack(uuid.UUID(bytes=group), seq)
        if kind not in _JSON_FRAMES:
            return _resync_frame(kind, payload)
        try:
            body = json.loads(payload)
        except ValueError:
            raise RemoteProtocolError(f"{kind.name} frame is not JSON") from None
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"{kind.name} frame is not a JSON object")
        return Control(kind, body)

    def _batch(self, payload: bytes, wire_bytes: int) -> Batch:
        if len(payload) < _BATCH.size:
            raise RemoteProtocolError("truncated BATCH header")
        group, first, last, codec, raw_len = _BATCH.unpack_from(payload)
        body: bytes | memoryview = memoryview(payload)[_BATCH.size :]
        if raw_len > MAX_FRAME:
            raise RemoteProtocolError(f"BATCH claims {raw_len} raw bytes")
        if codec == Codec.ZSTD:
            try:
                body = self._decompressor.decompress(body, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise RemoteProtocolError(f"BATCH does not decompress: {exc}") from None
        elif codec != Codec.RAW:
            raise RemoteProtocolError(f"unknown BATCH codec {codec}")
        if len(body) != raw_len:
            raise RemoteProtocolError(f"BATCH body is {len(body)} bytes, header says {raw_len}")
        records = []
        pos = 0
        while pos < len(body):
            try:
                record = decode_record(body, pos, copy=False)  # views into payload
            except BadRecord as exc:
                raise RemoteProtocolError(f"BATCH record at byte {pos}: {exc}") from None
            records.append(record)
            pos += record.size
        if not records or records[0].seq != first or records[-1].seq != last:
            raise RemoteProtocolError("BATCH seq range does not match its records")
        if any(b.seq != a.seq + 1 for a, b in itertools.pairwise(records)):
            raise RemoteProtocolError("BATCH records are not consecutive")
        return Batch(uuid.UUID(bytes=group), first, last, records, wire_bytes)


def _resync_frame(kind: FrameType, payload: bytes) -> Frame:
    if kind == FrameType.READ_REQ:
        hash_request = _resync_frame(FrameType.HASH_REQ, payload)
        assert isinstance(hash_request, HashRequest)
        return ReadRequest(hash_request.request, hash_request.volume, hash_request.ranges)
    if kind == FrameType.HASH_REQ:
        if len(payload) < _HASH_REQ.size:
            raise RemoteProtocolError("truncated HASH_REQ")
        request, volume, granularity, count = _HASH_REQ.unpack_from(payload)
        if len(payload) != _HASH_REQ.size + count * _RANGE.size or granularity < 512:
            raise RemoteProtocolError("malformed HASH_REQ")
        ranges = [
            _RANGE.unpack_from(payload, _HASH_REQ.size + i * _RANGE.size) for i in range(count)
        ]
        return HashRequest(request, volume, granularity, ranges)
    if kind == FrameType.HASHES:
        if len(payload) < 4 or (len(payload) - 4) % 8:
            raise RemoteProtocolError("malformed HASHES")
        count = (len(payload) - 4) // 8
        request, *hashes = struct.unpack(f"<I{count}Q", payload)
        return Hashes(request, hashes)
    if len(payload) < _SYNC_DATA.size:
        raise RemoteProtocolError("truncated SYNC_DATA")
    volume, offset = _SYNC_DATA.unpack_from(payload)
    return SyncData(volume, offset, payload[_SYNC_DATA.size :])
