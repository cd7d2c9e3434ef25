"""The server side of the NBD protocol, without I/O.

This is where a reader of havend starts. A :class:`ServerConnection` is fed the
bytes a client sent (:meth:`~ServerConnection.receive_data`), hands back events
(:meth:`~ServerConnection.next_event`) and produces the bytes to send
(:meth:`~ServerConnection.data_to_send`, :meth:`~ServerConnection.reply`). It
owns no socket, no file and no event loop, so it can be tested and fuzzed with
plain bytes; ``havend.nbd.server`` is the asyncio adapter around it.

What it speaks: fixed newstyle handshake with NBD_OPT_EXPORT_NAME, _GO, _INFO,
_LIST and _ABORT (every other option, STARTTLS included, is answered
NBD_REP_ERR_UNSUP); simple replies; commands READ, WRITE (+FUA), FLUSH, TRIM
(+FUA), WRITE_ZEROES (+FUA, +NO_HOLE) and DISC.

The handshake is answered here in full, because every answer follows from the
export table. In transmission, every request is checked against the export
(flags, read-only, range, payload size) before it becomes an event: a request
the spec says to refuse is answered here with the spec's error and surfaces as
:class:`RequestRejected`, so the server only ever sees requests it can carry out.

Who is at fault decides what happens: a client breaking a MUST (bad magic, unknown
client flags, an oversized write payload, a connection closed mid-request) raises
:class:`~havend.errors.RemoteProtocolError` and the server drops that connection;
calling a method in the wrong state raises :class:`~havend.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from havend.errors import LocalProtocolError, RemoteProtocolError
from havend.nbd.constants import (
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Error,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")  # magic, option, data length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
# Bytes taken in one go when no payload is being filled in place (handshake,
# requests without data, small writes), and the payload size from which a
# WRITE's data goes straight into a buffer of its own (see get_buffer).
_STAGING = 64 * 1024
_IN_PLACE = 64 * 1024

# Option data we are willing to read and refuse with ERR_TOO_BIG; above it, the
# client is not an NBD client and the connection is dropped.
MAX_OPTION_DATA = 64 * 1024
_OPTION_DISCARD_LIMIT = 16 * 1024 * 1024

# Flags each command may carry (spec: unknown or inapplicable flags get EINVAL).
# Plain ints: ~ of an IntFlag keeps only the bits the enum names.
_ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: 0,
    Command.WRITE: int(CommandFlag.FUA),
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: int(CommandFlag.FUA),
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE),
}
_MUTATING = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)


class State(enum.Enum):
    """Where a connection is; the transition table below says what may follow."""

    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_TRANSITIONS = {
    State.AWAIT_CLIENT_FLAGS: {State.OPTIONS, State.CLOSED},
    State.OPTIONS: {State.TRANSMISSION, State.CLOSED},
    State.TRANSMISSION: {State.CLOSED},
    State.CLOSED: set(),
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`ServerConnection.next_event` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class Export:
    """What the handshake advertises about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    # Safe when every connection reaches the same storage and FLUSH makes all
    # of it durable (one file, fdatasync): true for havend's volumes.
    multi_conn: bool = True
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = MAX_PAYLOAD

    @property
    def transmission_flags(self) -> int:
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_FUA
                | TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
            )
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)


# Events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """The handshake is over; requests for ``export`` follow."""

    export: Export


@dataclass(frozen=True, slots=True)
class Read:
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Write:
    cookie: int
    offset: int
    data: bytes | bytearray
    fua: bool


@dataclass(frozen=True, slots=True)
class Flush:
    cookie: int


@dataclass(frozen=True, slots=True)
class Trim:
    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    cookie: int
    offset: int
    length: int
    fua: bool
    may_trim: bool  # false when the client sent NBD_CMD_FLAG_NO_HOLE


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request refused with an NBD error; the error reply is already queued."""

    cookie: int
    command: int
    error: Error
    reason: str


@dataclass(frozen=True, slots=True)
class OptionRejected:
    """An option refused during the handshake; the error reply is already queued."""

    option: int
    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session cleanly (NBD_OPT_ABORT or NBD_CMD_DISC)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its end between two messages."""


Event = (
    ExportChosen
    | Read
    | Write
    | Flush
    | Trim
    | WriteZeroes
    | RequestRejected
    | OptionRejected
    | Disconnect
    | ConnectionClosed
)


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


def option_name(option: int) -> str:
    try:
        return "NBD_OPT_" + Option(option).name
    except ValueError:
        return f"option {option}"


class ServerConnection:
    """One client connection, from greeting to close, as a pure state machine.

    ``exports`` maps names to exports. The empty name asks for the default
    export: ``exports[""]`` if present, else ``exports[default]``.
    """

    def __init__(self, exports: Mapping[str, Export], default: str | None = None) -> None:
        self._exports = exports
        self._default = default
        self._state = State.AWAIT_CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._discard = 0  # bytes of a refused payload still to skip
        self._staging = bytearray(_STAGING)
        # A big WRITE whose payload is being filled in place: its request
        # fields and buffer, and how much of it has arrived.
        self._write: tuple[int, int, int] | None = None  # flags, cookie, offset
        self._payload = bytearray()
        self._payload_got = 0
        self._header_only = False  # the last request was a big WRITE: read one header
        self._no_zeroes = False
        self.export: Export | None = None

    @property
    def state(self) -> State:
        return self._state

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise LocalProtocolError(f"NBD state {self._state.value} cannot go to {new.value}")
        self._state = new

    # Bytes in and out -----------------------------------------------------

    def greeting(self) -> bytes:
        """The server's first message; send it as soon as the client connects."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its end."""
        if not data:
            self._eof = True
            return
        if self._state is State.CLOSED:
            return
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        if self._write is not None:
            take = min(len(self._payload) - self._payload_got, len(data))
            self._payload[self._payload_got : self._payload_got + take] = data[:take]
            self._payload_got += take
            data = data[take:]
        self._buf += data

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the client may go (an asyncio buffered
        protocol's ``get_buffer``); say how many came with :meth:`buffer_updated`.

        The rest of a big WRITE's payload is read straight into the buffer the
        write will keep (no copy at all); anything else into a staging area.
        After a big WRITE only one request header is asked for, so that the
        next big payload, too, lands in place from its first byte."""
        if self._write is not None:
            return memoryview(self._payload)[self._payload_got :]
        if self._header_only and not self._buf and not self._discard:
            return memoryview(self._staging)[: _REQUEST.size]
        return memoryview(self._staging)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into what :meth:`get_buffer` returned."""
        if self._write is not None:
            self._payload_got += nbytes
        elif nbytes:
            self.receive_data(memoryview(self._staging)[:nbytes])

    def data_to_send(self) -> bytes:
        """Handshake answers and error replies queued since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @staticmethod
    def reply(cookie: int, error: int = 0) -> bytes:
        """Header of a simple reply; a successful READ's data follows it."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    # Events ---------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """Parse one message; return its event, or NEED_DATA."""
        event: Event | _NeedData | None = None
        while event is None:  # None: a message was answered here, parse the next one
            if self._state is State.TRANSMISSION:
                event = self._next_request()
            elif self._state is State.OPTIONS:
                event = self._next_option()
            elif self._state is State.AWAIT_CLIENT_FLAGS:
                event = self._client_flags()
            else:
                return NEED_DATA  # closed: whatever else arrives is ignored
        if event is NEED_DATA and self._eof:
            self._state = State.CLOSED
            if self._buf or self._discard or self._write is not None:
                pending = len(self._buf) + self._discard + len(self._payload) - self._payload_got
                raise RemoteProtocolError(
                    f"client closed the connection in the middle of a message "
                    f"({pending} bytes of it pending)"
                )
            return ConnectionClosed()
        return event

    def _client_flags(self) -> _NeedData | None:
        if len(self._buf) < 4:
            return NEED_DATA
        (flags,) = struct.unpack_from(">I", self._buf)
        del self._buf[:4]
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if flags & ~known:  # int, not IntFlag: ~IntFlag drops the bits it does not name
            raise RemoteProtocolError(f"client sent unknown handshake flags {flags:#x}")
        self._no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._set_state(State.OPTIONS)
        return None

    # Handshake ------------------------------------------------------------

    def _lookup(self, name: str) -> Export | None:
        export = self._exports.get(name)
        if export is None and name == "" and self._default is not None:
            export = self._exports.get(self._default)
        return export

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _refuse_option(self, option: int, reply: Reply, reason: str) -> OptionRejected:
        self._option_reply(option, reply, reason.encode()[:MAX_STRING])
        return OptionRejected(option, reply, reason)

    def _next_option(self) -> Event | _NeedData | None:
        if len(self._buf) < _OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#018x}")
        if length > MAX_OPTION_DATA:
            if length > _OPTION_DISCARD_LIMIT:
                raise RemoteProtocolError(
                    f"{option_name(option)} carries {length} bytes of data: not an NBD client"
                )
            del self._buf[: _OPTION_HEADER.size]
            self._skip(length)
            return self._refuse_option(
                option, Reply.ERR_TOO_BIG, f"option data of {length} bytes is too big"
            )
        end = _OPTION_HEADER.size + length
        if len(self._buf) < end:
            return NEED_DATA
        data = bytes(self._buf[_OPTION_HEADER.size : end])
        del self._buf[:end]

        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._option_reply(option, Reply.ACK)
            self._set_state(State.CLOSED)
            return Disconnect()
        if option == Option.LIST:
            if data:
                return self._refuse_option(option, Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
            for name, export in self._exports.items():
                encoded = name.encode()
                self._option_reply(
                    option,
                    Reply.SERVER,
                    struct.pack(">I", len(encoded)) + encoded + export.description.encode(),
                )
            self._option_reply(option, Reply.ACK)
            return None
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option == Option.STARTTLS:
            return self._refuse_option(option, Reply.ERR_UNSUP, "TLS is not enabled on this server")
        return self._refuse_option(
            option, Reply.ERR_UNSUP, f"{option_name(option)} is not supported"
        )

    def _skip(self, count: int) -> None:
        """Drop ``count`` payload bytes, those buffered first, the rest as they arrive."""
        now = min(count, len(self._buf))
        del self._buf[:now]
        self._discard = count - now

    def _export_name(self, data: bytes) -> Event:
        # This option cannot be answered with an error: an unknown name ends the session.
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError("export name is not UTF-8") from None
        export = self._lookup(name)
        if export is None:
            raise RemoteProtocolError(f"unknown export {name!r} requested with NBD_OPT_EXPORT_NAME")
        self._out += struct.pack(">QH", export.size, export.transmission_flags)
        if not self._no_zeroes:
            self._out += bytes(124)
        return self._enter_transmission(export)

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            return self._refuse_option(option, Reply.ERR_INVALID, "option data too short")
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6 or name_len > MAX_STRING:
            return self._refuse_option(option, Reply.ERR_INVALID, "bad export name length")
        try:
            name = data[4 : 4 + name_len].decode()
        except UnicodeDecodeError:
            return self._refuse_option(option, Reply.ERR_INVALID, "export name is not UTF-8")
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            return self._refuse_option(
                option, Reply.ERR_INVALID, "information request count does not match the length"
            )
        requested = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        export = self._lookup(name)
        if export is None:
            return self._refuse_option(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")

        def info(kind: Info, payload: bytes) -> None:
            self._option_reply(option, Reply.INFO, struct.pack(">H", kind) + payload)

        info(Info.EXPORT, struct.pack(">QH", export.size, export.transmission_flags))
        # Sent even when not asked: our constraints are the spec's defaults, so a
        # client that did not ask loses nothing by ignoring them.
        info(
            Info.BLOCK_SIZE,
            struct.pack(">III", export.min_block, export.preferred_block, export.max_payload),
        )
        if Info.NAME in requested:
            info(Info.NAME, export.name.encode())
        if Info.DESCRIPTION in requested and export.description:
            info(Info.DESCRIPTION, export.description.encode())
        self._option_reply(option, Reply.ACK)
        if option == Option.GO:
            return self._enter_transmission(export)
        return None

    def _enter_transmission(self, export: Export) -> ExportChosen:
        self.export = export
        self._set_state(State.TRANSMISSION)
        return ExportChosen(export)

    # Transmission ---------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        export = self.export
        assert export is not None
        if self._write is not None:  # a big WRITE's payload, filled in place
            if self._payload_got < len(self._payload):
                return NEED_DATA
            (flags, cookie, offset), data = self._write, self._payload
            self._write, self._payload, self._payload_got = None, bytearray(), 0
            self._header_only = True
            error, reason = self._check(Command.WRITE, flags, offset, len(data), export)
            if error:
                return self._reject(cookie, Command.WRITE, error, reason)
            return Write(cookie, offset, data, bool(flags & CommandFlag.FUA))
        buf = self._buf
        if len(buf) < 28:  # _REQUEST.size
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#010x}")
        self._header_only = False

        if command == Command.WRITE:
            if length > export.max_payload:
                raise RemoteProtocolError(
                    f"WRITE payload of {length} bytes exceeds the {export.max_payload} maximum"
                )
            end = 28 + length
            if len(buf) < end:
                if length >= _IN_PLACE:  # the rest straight into the write's own buffer
                    self._write = (flags, cookie, offset)
                    self._payload = bytearray(length)
                    self._payload_got = len(buf) - 28
                    self._payload[: self._payload_got] = buf[28:]
                    del buf[:]
                return NEED_DATA
            error, reason = self._check(command, flags, offset, length, export)
            if error:
                self._skip(end)
                return self._reject(cookie, command, error, reason)
            data = buf[28:end]
            del buf[:end]
            return Write(cookie, offset, data, bool(flags & CommandFlag.FUA))

        del buf[:28]
        error, reason = self._check(command, flags, offset, length, export)
        if error:
            return self._reject(cookie, command, error, reason)
        if command == Command.READ:
            return Read(cookie, offset, length)
        if command == Command.FLUSH:
            return Flush(cookie)
        if command == Command.TRIM:
            return Trim(cookie, offset, length, bool(flags & CommandFlag.FUA))
        if command == Command.WRITE_ZEROES:
            return WriteZeroes(
                cookie,
                offset,
                length,
                bool(flags & CommandFlag.FUA),
                not flags & CommandFlag.NO_HOLE,
            )
        # NBD_CMD_DISC: no reply; whatever follows it is ignored.
        self._set_state(State.CLOSED)
        buf.clear()
        return Disconnect()

    @staticmethod
    def _check(
        command: int, flags: int, offset: int, length: int, export: Export
    ) -> tuple[Error, str]:
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Error.EINVAL, f"unsupported {command_name(command)}"
        if flags & ~allowed:
            return Error.EINVAL, f"flags {flags:#x} not valid for {command_name(command)}"
        if command in _MUTATING and export.read_only:
            return Error.EPERM, "export is read-only"
        if command in (Command.FLUSH, Command.DISC):
            return Error.OK, ""
        if offset + length > export.size:
            error = (
                Error.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Error.EINVAL
            )
            return error, f"offset {offset} + length {length} is beyond the end ({export.size})"
        if command == Command.READ and length > export.max_payload:
            return Error.EINVAL, f"READ of {length} bytes exceeds the {export.max_payload} maximum"
        if export.min_block > 1 and (offset | length) % export.min_block:
            return Error.EINVAL, f"not aligned to the {export.min_block}-byte minimum block"
        return Error.OK, ""

    def _reject(self, cookie: int, command: int, error: Error, reason: str) -> RequestRejected:
        self._out += self.reply(cookie, error)
        return RequestRejected(cookie, command, error, reason)
