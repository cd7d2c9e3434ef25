"""BATCH frames sent as pieces: what the target decodes is what was framed,
and the records' payloads go out without being copied."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import time
import uuid

import pytest
import zstandard

from havend.cdp.retention import RetentionPolicy
from havend.errors import RemoteProtocolError
from havend.journal.record import Kind, Record
from havend.link import wire
from havend.link.hello import Hello, HelloVolume, MalformedFrame, Welcome
from havend.link.stream import FrameLink

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


class _Transport:
    """What FrameLink asks of a transport, recorded."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _feed(link: FrameLink, data: bytes, cut: int) -> None:
    """Bytes as a buffered transport hands them over: at most ``cut`` at a time."""
    while data:
        into = link.get_buffer(-1)
        n = min(len(into), cut, len(data))
        assert n, "the link takes no more bytes"
        into[:n] = data[:n]
        data = data[n:]
        link.buffer_updated(n)


async def _linked(limit: int = 1 << 20) -> tuple[FrameLink, _Transport, list[FrameLink]]:
    served: list[FrameLink] = []

    async def serve(link: FrameLink) -> None:
        served.append(link)

    link = FrameLink(serve, limit=limit)
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    return link, transport, served


@pytest.mark.parametrize("cut", [1, 7, 4096, 1 << 20])
def test_a_link_takes_frames_in_any_cut_and_pauses_while_too_many_wait(cut: int) -> None:
    async def main() -> None:
        link, transport, served = await _linked(limit=300_000)
        assert served == [link]
        batches = [_records()[:1], _records()[1:]]
        data = b"".join(wire.encode_batch(GROUP, b) for b in batches)
        data += wire.encode_control(wire.FrameType.SYNC_END, {"n": 1})
        _feed(link, data, cut)
        assert transport.paused  # more than the limit waits: the peer is held back
        decoder = wire.FrameDecoder()
        for records in batches:
            frame = await link.read_frame(decoder, timeout=1)
            assert isinstance(frame, wire.Batch)
            assert [bytes(r.data) for r in frame.records] == [bytes(r.data) for r in records]
        assert not transport.paused  # taken: reading goes on
        control = await link.read_frame(decoder, timeout=1)
        assert isinstance(control, wire.Control) and control.body == {"n": 1}
        with pytest.raises(TimeoutError):
            await link.read_frame(decoder, timeout=0.05)

    asyncio.run(main())


def test_a_bad_header_is_reported_after_the_frames_before_it_and_ends_the_reading() -> None:
    async def main() -> None:
        link, transport, _ = await _linked()
        good = wire.encode_control(wire.FrameType.SYNC_END, {})
        huge = struct.pack("<IB", wire.MAX_FRAME + 1, wire.FrameType.BATCH)[
            : wire.FRAME_HEADER_SIZE
        ]
        _feed(link, good + huge.ljust(wire.FRAME_HEADER_SIZE, b"\0"), 3)
        assert len(link.get_buffer(-1)) == 0 and transport.paused
        decoder = wire.FrameDecoder()
        assert isinstance(await link.read_frame(decoder, timeout=1), wire.Control)
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            await link.read_frame(decoder, timeout=1)

    asyncio.run(main())


def test_a_link_closed_inside_a_frame_is_an_incomplete_read_and_drain_fails() -> None:
    async def main() -> None:
        link, _, _ = await _linked()
        frame = wire.encode_batch(GROUP, _records()[:1])
        _feed(link, frame[:1000], 100)
        link.eof_received()
        link.connection_lost(None)
        with pytest.raises(asyncio.IncompleteReadError):
            await link.read_frame(wire.FrameDecoder(), timeout=1)
        with pytest.raises(ConnectionResetError):
            await link.drain()

    asyncio.run(main())


# HELLO and WELCOME as records ------------------------------------------------

_HELLO_BODY = {
    "version": wire.VERSION,
    "node": "src",
    "group": str(GROUP),
    "name": "g",
    "mode": "sync",
    "volumes": [{"name": "a", "size": 1 << 20}, {"name": "b", "size": 4096}],
    "retention": {"count": 7, "max_age_seconds": 60.0},
}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"split_brain": {"generation": "g1", "production": {"records": 3}}},
        {"failback": {"generation": "g1"}},
        {"reverse": {"generation": "g1", "base": None}},
        {"resolve": {"generation": "g1", "survivor": "production"}},
    ],
)
def test_a_hello_round_trips_to_the_same_bytes(extra: dict) -> None:
    """A HELLO read from its JSON gives back the same keys in the same order
    (the bytes on the wire are those sent before it was a record)."""
    body = _HELLO_BODY | extra
    hello = Hello.from_body(body)
    assert hello.group == GROUP and hello.volumes[1] == HelloVolume("b", 4096)
    assert hello.retention == RetentionPolicy(7, 60.0)
    framed = wire.encode_control(wire.FrameType.HELLO, hello.to_body())
    assert framed == wire.encode_control(wire.FrameType.HELLO, body)
    decoder = wire.FrameDecoder()
    decoder.feed(framed)
    frame = decoder.next_frame()
    assert isinstance(frame, wire.Control) and Hello.from_body(frame.body) == hello


@pytest.mark.parametrize(
    "body",
    [
        {"node": "tgt", "durable_seq": 12, "state": "consistent", "generation": "g1"},
        {
            "node": "tgt",
            "durable_seq": 12,
            "state": "consistent",
            "generation": "g1",
            "failback": True,
            "applied_seq": 10,
            "changed": [[[0, 4096]], []],
        },
        {
            "node": "tgt",
            "durable_seq": 12,
            "state": "consistent",
            "generation": "g2",
            "failback_done": None,
        },
        {
            "node": "tgt",
            "durable_seq": 12,
            "state": "consistent",
            "generation": "g2",
            "failback_done": {"resume_seq": 12},
        },
        {"node": "tgt", "resolve": True, "changed": [[], [[8192, 4096]]], "applied_seq": 10},
        {
            "node": "tgt",
            "reverse": True,
            "checkpoint": {"id": "c1", "time": 1.5},
            "incremental": False,
            "changed": [[], []],
            "applied_seq": 10,
        },
    ],
)
def test_a_welcome_round_trips_to_the_same_bytes(body: dict) -> None:
    welcome = Welcome.from_body(body)
    assert json.dumps(welcome.to_body()) == json.dumps(body)
    assert Welcome.from_body(welcome.to_body()) == welcome


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"group": None}, "group"),
        ({"group": "not-a-uuid"}, "group"),
        ({"name": 7}, "name"),
        ({"version": "1"}, "version"),
        ({"node": ["src"]}, "node"),
        ({"volumes": {"a": 1}}, "volumes"),
        ({"volumes": [{"name": "a", "size": "big"}]}, "size"),
        ({"volumes": [{"size": 4096}]}, "name"),
        ({"retention": {"count": "many"}}, "retention"),
        ({"retention": ["count", 7]}, "retention"),
        ({"failback": "g1"}, "failback"),
        ({"resolve": True}, "resolve"),
    ],
)
def test_a_malformed_hello_is_a_protocol_error_naming_its_key(change: dict, key: str) -> None:
    body = _HELLO_BODY | change
    with pytest.raises(RemoteProtocolError, match=f"'{key}'") as caught:
        Hello.from_body(body)
    assert isinstance(caught.value, MalformedFrame) and caught.value.key == key


@pytest.mark.parametrize("key", ["version", "node", "group", "name", "mode", "volumes"])
def test_a_hello_without_a_required_key_is_a_protocol_error_naming_it(key: str) -> None:
    body = {k: v for k, v in _HELLO_BODY.items() if k != key}
    with pytest.raises(RemoteProtocolError, match=f"'{key}' is missing"):
        Hello.from_body(body)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"durable_seq": 1}, "node"),
        ({"node": "tgt"}, "durable_seq"),
        ({"node": "tgt", "durable_seq": "1"}, "durable_seq"),
        ({"node": "tgt", "durable_seq": 1, "failback": True, "changed": []}, "applied_seq"),
        ({"node": "tgt", "reverse": True, "changed": [], "applied_seq": 1}, "checkpoint"),
    ],
)
def test_a_malformed_welcome_is_a_protocol_error_naming_its_key(body: dict, key: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"'{key}'"):
        Welcome.from_body(body)
