"""BATCH frames sent as pieces: what the target decodes is what was framed,
and the records' payloads go out without being copied."""

from __future__ import annotations

import itertools
import os
import time
import uuid

import pytest
import zstandard

from havend.journal.record import Kind, Record
from havend.ship import wire

GROUP = uuid.uuid4()


def _records() -> list[Record]:
    """Writes of many sizes (small ones between big ones) and a checkpoint marker."""
    out = []
    sizes = [256 << 10, 512, 4096, 1, 100_000, 0, 64 << 10]
    for i, size in enumerate(sizes, start=1):
        kind = Kind.CHECKPOINT if size == 0 else Kind.WRITE
        data = b'{"id": "c"}' if kind == Kind.CHECKPOINT else os.urandom(size)
        out.append(Record(i, kind, 0, i * (1 << 20), len(data), time.time_ns(), i - 1, data))
    return out


def _decode(pieces: list[wire.Piece]) -> wire.Batch:
    decoder = wire.FrameDecoder()
    for piece in pieces:  # fed as they would arrive, in any cut
        decoder.feed(bytes(piece))
    frame = decoder.next_frame()
    assert isinstance(frame, wire.Batch)
    assert decoder.next_frame() is None
    return frame


def test_a_batch_in_pieces_decodes_to_its_records_and_its_payloads_are_not_copied() -> None:
    records = _records()
    pieces = wire.batch_pieces(GROUP, records)
    batch = _decode(pieces)
    assert [(r.seq, r.kind, r.offset, bytes(r.data)) for r in batch.records] == [
        (r.seq, r.kind, r.offset, bytes(r.data)) for r in records
    ]
    assert batch.wire_bytes == sum(len(p) for p in pieces)
    big = [r.data for r in records if len(r.data) >= 4096]
    assert all(any(p is data for p in pieces) for data in big), "a payload was copied"
    # Small pieces are joined with their neighbours: no TLS record of a few bytes each.
    assert len(pieces) <= 2 * len(big) + 1
    assert not any(len(a) < 4096 and len(b) < 4096 for a, b in itertools.pairwise(pieces))
    assert b"".join(pieces) == wire.encode_batch(GROUP, records)


@pytest.mark.parametrize("compressible", [True, False])
def test_compression_only_when_it_pays_and_the_frame_still_decodes(compressible: bool) -> None:
    data = bytes(1 << 20) if compressible else os.urandom(1 << 20)
    records = [Record(1, Kind.WRITE, 0, 0, len(data), time.time_ns(), 0, data)]
    pieces = wire.batch_pieces(GROUP, records, zstandard.ZstdCompressor(level=3))
    size = sum(len(p) for p in pieces)
    assert (size < len(data) // 10) if compressible else (size > len(data))
    [record] = _decode(pieces).records
    assert bytes(record.data) == data
