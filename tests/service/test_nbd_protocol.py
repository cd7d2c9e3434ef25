"""The sans-IO NBD protocol: handshake, transmission, bad input, fuzzing."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from havend.errors import LocalProtocolError, RemoteProtocolError
from havend.nbd import protocol
from havend.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Command,
    CommandFlag,
    Error,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from havend.nbd.protocol import NEED_DATA, Export, ServerConnection, State

SIZE = 1 << 20
EXPORTS = {
    "disk": Export("disk", SIZE, description="test disk"),
    "ro": Export("ro", SIZE, read_only=True),
}


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    encoded = name.encode()
    return (
        struct.pack(">I", len(encoded))
        + encoded
        + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    )


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def events(conn: ServerConnection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, protocol.ConnectionClosed | protocol.Disconnect):
            break
    return out


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    while data:
        magic, opt, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        replies.append((opt, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return replies


def negotiated(name: str = "disk") -> ServerConnection:
    conn = ServerConnection(EXPORTS, default="disk")
    conn.greeting()
    conn.receive_data(struct.pack(">I", 3) + option(Option.GO, go_data(name)))
    assert isinstance(events(conn)[0], protocol.ExportChosen)
    conn.data_to_send()
    return conn


# Handshake -----------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    greeting = ServerConnection(EXPORTS).greeting()
    assert struct.unpack(">QQH", greeting) == (NBDMAGIC, IHAVEOPT, 0b11)


def test_go_reports_export_and_enters_transmission() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1))
    conn.receive_data(option(Option.GO, go_data("disk", (Info.NAME, Info.DESCRIPTION))))
    [event] = events(conn)
    assert event == protocol.ExportChosen(EXPORTS["disk"])
    assert conn.state is State.TRANSMISSION
    replies = option_replies(conn.data_to_send())
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, r, d in replies if r == Reply.INFO}
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == SIZE
    assert flags & TransmissionFlag.SEND_FUA and flags & TransmissionFlag.CAN_MULTI_CONN
    assert not flags & TransmissionFlag.READ_ONLY
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (1, 4096, 1 << 25)
    assert infos[Info.NAME] == b"disk"
    assert infos[Info.DESCRIPTION] == b"test disk"
    assert replies[-1][1] == Reply.ACK


def test_info_stays_in_options_and_empty_name_is_the_default_export() -> None:
    conn = ServerConnection(EXPORTS, default="ro")
    conn.receive_data(struct.pack(">I", 1) + option(Option.INFO, go_data("")))
    assert events(conn) == []
    assert conn.state is State.OPTIONS
    replies = option_replies(conn.data_to_send())
    export_info = next(d for _, r, d in replies if r == Reply.INFO and d[:2] == b"\0\0")
    assert struct.unpack(">QH", export_info[2:])[1] & TransmissionFlag.READ_ONLY


def test_go_unknown_export_is_an_error_reply_not_a_disconnect() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.GO, go_data("nope")))
    [event] = events(conn)
    assert isinstance(event, protocol.OptionRejected) and event.reply == Reply.ERR_UNKNOWN
    [(_, reply, message)] = option_replies(conn.data_to_send())
    assert reply == Reply.ERR_UNKNOWN and b"nope" in message
    # the client may try again
    conn.receive_data(option(Option.GO, go_data("disk")))
    assert isinstance(events(conn)[0], protocol.ExportChosen)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\0\0", "too short"),
        (struct.pack(">I", 50) + b"disk" + b"\0\0", "name longer than the data"),
        (go_data("disk") + b"\0", "trailing byte"),
        (struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0", "not UTF-8"),
    ],
)
def test_malformed_go_is_refused_with_err_invalid(data: bytes, why: str) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.GO, data))
    [event] = events(conn)
    assert isinstance(event, protocol.OptionRejected), why
    assert event.reply == Reply.ERR_INVALID
    assert conn.state is State.OPTIONS


def test_list_names_every_export() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.LIST))
    assert events(conn) == []
    replies = option_replies(conn.data_to_send())
    names = []
    for _, reply, data in replies[:-1]:
        assert reply == Reply.SERVER
        (n,) = struct.unpack_from(">I", data)
        names.append(data[4 : 4 + n].decode())
    assert names == ["disk", "ro"]
    assert replies[-1][1] == Reply.ACK


@pytest.mark.parametrize(
    ("opt", "data", "expected"),
    [
        (Option.LIST, b"x", Reply.ERR_INVALID),
        (Option.STARTTLS, b"", Reply.ERR_UNSUP),
        (Option.STRUCTURED_REPLY, b"", Reply.ERR_UNSUP),
        (Option.SET_META_CONTEXT, b"\0" * 12, Reply.ERR_UNSUP),
        (4242, b"whatever", Reply.ERR_UNSUP),
    ],
)
def test_refused_options_keep_the_session(opt: int, data: bytes, expected: Reply) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(opt, data))
    [event] = events(conn)
    assert isinstance(event, protocol.OptionRejected) and event.reply == expected
    assert option_replies(conn.data_to_send())[0][:2] == (opt, expected)
    assert conn.state is State.OPTIONS


def test_abort_is_acknowledged() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.ABORT))
    assert events(conn) == [protocol.Disconnect()]
    assert option_replies(conn.data_to_send()) == [(Option.ABORT, Reply.ACK, b"")]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(("client_flags", "zeroes"), [(1, 124), (3, 0)])
def test_export_name_answers_size_flags_and_zeroes(client_flags: int, zeroes: int) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", client_flags) + option(Option.EXPORT_NAME, b"ro"))
    assert events(conn) == [protocol.ExportChosen(EXPORTS["ro"])]
    out = conn.data_to_send()
    assert len(out) == 10 + zeroes
    size, flags = struct.unpack_from(">QH", out)
    assert size == SIZE and flags & TransmissionFlag.READ_ONLY


def test_export_name_unknown_drops_the_connection() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.EXPORT_NAME, b"nope"))
    with pytest.raises(RemoteProtocolError, match="unknown export 'nope'"):
        conn.next_event()


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1 << 7))
    with pytest.raises(RemoteProtocolError, match="unknown handshake flags"):
        conn.next_event()


def test_bad_option_magic_drops_the_connection() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="bad option magic"):
        conn.next_event()


def test_oversized_option_is_skipped_across_chunks_and_refused() -> None:
    conn = ServerConnection(EXPORTS)
    big = protocol.MAX_OPTION_DATA + 1000
    conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, Option.GO, big))
    [event] = events(conn)
    assert isinstance(event, protocol.OptionRejected) and event.reply == Reply.ERR_TOO_BIG
    for _ in range(big // 4096):
        conn.receive_data(b"\xaa" * 4096)
    conn.receive_data(b"\xaa" * (big % 4096) + option(Option.GO, go_data("disk")))
    assert isinstance(events(conn)[0], protocol.ExportChosen)


def test_absurd_option_length_drops_the_connection() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, 0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError, match="not an NBD client"):
        conn.next_event()


def test_thousands_of_pipelined_options_do_not_recurse() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + option(Option.LIST) * 20000)
    assert events(conn) == []
    assert len(option_replies(conn.data_to_send())) == 3 * 20000


def test_calls_out_of_order_are_local_errors() -> None:
    conn = negotiated()
    with pytest.raises(LocalProtocolError):
        conn._set_state(State.OPTIONS)


# Transmission --------------------------------------------------------------


def test_requests_become_events() -> None:
    conn = negotiated()
    payload = b"x" * 4096
    conn.receive_data(
        request(Command.READ, 512, 1024, cookie=1)
        + request(Command.WRITE, 4096, len(payload), CommandFlag.FUA, cookie=2)
        + payload
        + request(Command.FLUSH, cookie=3)
        + request(Command.TRIM, 0, 8192, cookie=4)
        + request(Command.WRITE_ZEROES, 0, 4096, CommandFlag.NO_HOLE, cookie=5)
        + request(Command.WRITE_ZEROES, 0, 4096, cookie=6)
        + request(Command.DISC, cookie=8)
        + b"ignored after DISC"
    )
    assert events(conn) == [
        protocol.Read(1, 512, 1024),
        protocol.Write(2, 4096, bytearray(payload), True),
        protocol.Flush(3),
        protocol.Trim(4, 0, 8192, False),
        protocol.WriteZeroes(5, 0, 4096, False, False),
        protocol.WriteZeroes(6, 0, 4096, False, True),
        protocol.Disconnect(),
    ]
    assert conn.state is State.CLOSED
    assert conn.data_to_send() == b""


def test_reply_header() -> None:
    assert ServerConnection.reply(0xABCD, Error.EIO) == struct.pack(
        ">IIQ", SIMPLE_REPLY_MAGIC, 5, 0xABCD
    )


def rejected(conn: ServerConnection) -> tuple[Error, int]:
    [event] = [e for e in events(conn) if isinstance(e, protocol.RequestRejected)]
    magic, error, cookie = struct.unpack(">IIQ", conn.data_to_send())
    assert magic == SIMPLE_REPLY_MAGIC and error == event.error
    return event.error, cookie


@pytest.mark.parametrize(
    ("export", "wire", "expected"),
    [
        ("disk", request(Command.READ, SIZE - 10, 11), Error.EINVAL),
        ("disk", request(Command.TRIM, SIZE, 1), Error.EINVAL),
        ("disk", request(Command.WRITE, SIZE - 1, 2) + b"ab", Error.ENOSPC),
        ("disk", request(Command.WRITE_ZEROES, 2**63, 2**20), Error.ENOSPC),
        ("disk", request(Command.READ, 0, (1 << 25) + 1), Error.EINVAL),
        ("disk", request(Command.CACHE, 0, 4096), Error.EINVAL),
        ("disk", request(Command.BLOCK_STATUS, 0, 4096), Error.EINVAL),
        ("disk", request(99, 0, 0), Error.EINVAL),
        ("disk", request(Command.READ, 0, 512, CommandFlag.FUA), Error.EINVAL),
        ("disk", request(Command.WRITE, 0, 1, CommandFlag.NO_HOLE) + b"a", Error.EINVAL),
        ("disk", request(Command.FLUSH, flags=CommandFlag.FAST_ZERO), Error.EINVAL),
        ("disk", request(Command.TRIM, 0, 512, flags=1 << 12), Error.EINVAL),
        ("ro", request(Command.WRITE, 0, 4) + b"abcd", Error.EPERM),
        ("ro", request(Command.TRIM, 0, 4096), Error.EPERM),
        ("ro", request(Command.WRITE_ZEROES, 0, 4096), Error.EPERM),
    ],
)
def test_invalid_requests_get_the_spec_error_and_the_stream_goes_on(
    export: str, wire: bytes, expected: Error
) -> None:
    conn = negotiated(export)
    conn.receive_data(wire + request(Command.READ, 0, 512, cookie=99))
    evs = events(conn)
    assert [type(e) for e in evs] == [protocol.RequestRejected, protocol.Read]
    assert evs[0].error == expected
    assert evs[1] == protocol.Read(99, 0, 512)
    magic, error, cookie = struct.unpack(">IIQ", conn.data_to_send())
    assert (magic, error, cookie) == (SIMPLE_REPLY_MAGIC, expected, 7)


def test_refused_write_payload_is_skipped_even_when_it_arrives_later() -> None:
    conn = negotiated("ro")
    conn.receive_data(request(Command.WRITE, 0, 10000))
    conn.receive_data(b"z" * 4000)
    assert events(conn) == []  # the whole request must arrive before it is judged
    conn.receive_data(b"z" * 6000 + request(Command.FLUSH, cookie=5))
    evs = events(conn)
    assert evs[0].error == Error.EPERM and evs[1] == protocol.Flush(5)


def test_read_only_export_still_reads_and_flushes() -> None:
    conn = negotiated("ro")
    conn.receive_data(request(Command.READ, 0, 4096) + request(Command.FLUSH))
    assert events(conn) == [protocol.Read(7, 0, 4096), protocol.Flush(7)]


def test_oversized_write_payload_drops_the_connection() -> None:
    conn = negotiated()
    conn.receive_data(request(Command.WRITE, 0, (1 << 25) + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        conn.next_event()


def test_bad_request_magic_drops_the_connection() -> None:
    conn = negotiated()
    conn.receive_data(b"\xde\xad\xbe\xef" + request(Command.READ)[4:])
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        conn.next_event()


def test_client_vanishing_mid_request_is_a_remote_error() -> None:
    conn = negotiated()
    conn.receive_data(request(Command.WRITE, 0, 4096) + b"half")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.next_event()


def test_client_closing_between_requests_is_clean() -> None:
    conn = negotiated()
    conn.receive_data(request(Command.FLUSH))
    conn.receive_data(b"")
    assert events(conn) == [protocol.Flush(7), protocol.ConnectionClosed()]


# Property-based ------------------------------------------------------------

_PREFIX = {
    "flags": b"",
    "options": struct.pack(">I", 1),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    phase=st.sampled_from(["flags", "options", "transmission"]),
    junk=st.binary(max_size=2048),
    cuts=st.lists(st.integers(min_value=0, max_value=2048), max_size=8),
)
def test_random_bytes_only_ever_raise_remote_errors(
    phase: str, junk: bytes, cuts: list[int]
) -> None:
    conn = negotiated() if phase == "transmission" else ServerConnection(EXPORTS)
    conn.receive_data(_PREFIX.get(phase, b""))
    bounds = sorted(set(cuts))
    pieces = [junk[a:b] for a, b in itertools.pairwise([0, *bounds, len(junk)])]
    try:
        for piece in [*(p for p in pieces if p), b""]:
            conn.receive_data(piece)
            events(conn)
            conn.data_to_send()
    except RemoteProtocolError:
        return
    assert conn.state in (State.OPTIONS, State.TRANSMISSION, State.CLOSED)


def _valid_session() -> bytes:
    payload = bytes(range(256)) * 16
    return (
        struct.pack(">I", 1)
        + option(Option.LIST)
        + option(Option.INFO, go_data("disk", (Info.BLOCK_SIZE,)))
        + option(Option.GO, go_data("disk"))
        + request(Command.WRITE, 0, len(payload), cookie=1)
        + payload
        + request(Command.READ, 0, 4096, cookie=2)
        + request(Command.FLUSH, cookie=3)
        + request(Command.WRITE_ZEROES, 8192, 4096, cookie=4)
        + request(Command.TRIM, 0, 4096, cookie=5)
        + request(Command.DISC, cookie=6)
    )


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    mutations=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    truncate=st.booleans(),
)
def test_mutated_sessions_never_crash_the_parser(
    data: st.DataObject, mutations: list[tuple[int, int]], truncate: bool
) -> None:
    wire = bytearray(_valid_session())
    for position, value in mutations:
        wire[position % len(wire)] = value
    if truncate:
        wire = wire[: data.draw(st.integers(min_value=0, max_value=len(wire)))]
    conn = ServerConnection(EXPORTS)
    conn.greeting()
    seen = []
    try:
        conn.receive_data(bytes(wire))
        conn.receive_data(b"")
        seen = events(conn)
    except RemoteProtocolError:
        return
    for event in seen:
        if isinstance(event, protocol.Read | protocol.Write | protocol.Trim | protocol.WriteZeroes):
            length = event.length if not isinstance(event, protocol.Write) else len(event.data)
            assert event.offset + length <= SIZE  # nothing out of range reaches the volume


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=20))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    wire = _valid_session()
    whole = ServerConnection(EXPORTS)
    whole.receive_data(wire)
    expected = events(whole)
    chunked = ServerConnection(EXPORTS)
    got = []
    bounds = sorted({min(c, len(wire)) for c in cuts} - {0, len(wire)})
    for a, b in itertools.pairwise([0, *bounds, len(wire)]):
        chunked.receive_data(wire[a:b])  # never empty: b"" means end of stream
        got += events(chunked)
    assert got == expected
    assert whole.data_to_send() == chunked.data_to_send()


def _feed_buffered(conn: ServerConnection, data: bytes, cut: int) -> list[object]:
    """Bytes as an asyncio buffered protocol hands them over, events as they come."""
    out: list[object] = []
    while data:
        into = conn.get_buffer()
        n = min(len(into), cut, len(data))
        into[:n] = data[:n]
        data = data[n:]
        conn.buffer_updated(n)
        out += events(conn)
    return out


@pytest.mark.parametrize("cut", [1, 1000, 70_000, 1 << 20])
def test_big_write_payloads_are_read_in_place_in_any_cut(cut: int) -> None:
    big, small, other = b"a" * (256 << 10), b"b" * 4096, b"c" * (100 << 10)
    stream = (
        request(Command.WRITE, 0, len(big), flags=CommandFlag.FUA, cookie=1)
        + big
        + request(Command.WRITE, 8192, len(small), cookie=2)
        + small
        + request(Command.WRITE, 4096, len(other), cookie=3)
        + other
        + request(Command.READ, 0, 512, cookie=4)
        + request(Command.FLUSH, cookie=5)
    )
    conn = negotiated()
    assert _feed_buffered(conn, stream, cut) == [
        protocol.Write(1, 0, big, True),
        protocol.Write(2, 8192, small, False),
        protocol.Write(3, 4096, other, False),
        protocol.Read(4, 0, 512),
        protocol.Flush(5),
    ]
    # In place: the payload is the buffer the transport wrote into, and after
    # a big WRITE one header is asked for, so the next payload lands in place too.
    conn.receive_data(request(Command.WRITE, 0, len(big), cookie=6))
    assert events(conn) == []  # the header is read: the payload has a buffer
    into = conn.get_buffer()
    assert len(into) == len(big)
    into[:] = big
    conn.buffer_updated(len(big))
    [write] = events(conn)
    assert write.data is into.obj and write.data == big
    assert len(conn.get_buffer()) == 28


def test_a_big_payload_split_across_receive_data_calls_is_whole() -> None:
    conn = negotiated()
    data = bytes(range(256)) * 800  # 200 KiB
    conn.receive_data(request(Command.WRITE, 0, len(data)) + data[:5000])
    assert events(conn) == []
    conn.receive_data(data[5000:150_000])
    assert events(conn) == []
    conn.receive_data(data[150_000:] + request(Command.FLUSH, cookie=9))
    assert events(conn) == [protocol.Write(7, 0, data, False), protocol.Flush(9)]


def test_a_refused_big_write_is_answered_after_its_payload_and_the_next_request_is_read() -> None:
    conn = negotiated("ro")
    stream = request(Command.WRITE, 0, 128 << 10) + b"z" * (128 << 10)
    evs = _feed_buffered(conn, stream + request(Command.FLUSH, cookie=5), 3000)
    assert [type(e) for e in evs] == [protocol.RequestRejected, protocol.Flush]
    assert evs[0].error == Error.EPERM
    magic, error, cookie = struct.unpack(">IIQ", conn.data_to_send())
    assert (magic, error, cookie) == (SIMPLE_REPLY_MAGIC, Error.EPERM, 7)


def test_a_client_vanishing_inside_a_big_payload_is_a_remote_error() -> None:
    conn = negotiated()
    _feed_buffered(conn, request(Command.WRITE, 0, 1 << 20) + b"x" * 70_000, 65536)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.next_event()
