"""A minimal blocking NBD client: one socket, one request in flight.

It exists for havend's own tools and tests (stamped writers, image readers),
not for speed: every request waits for its reply before the next one is sent,
so replies arrive in order and the cookie check is a plain equality.

What it speaks: the fixed newstyle handshake with NBD_OPT_GO (falling back to
NBD_OPT_EXPORT_NAME if the server answers NBD_REP_ERR_UNSUP), simple replies,
and READ, WRITE (+FUA), FLUSH, TRIM (+FUA), WRITE_ZEROES (+FUA) and DISC.
Reads and writes larger than the export's maximum payload are split.

Addresses are URIs: ``nbd://host[:port]/name`` (port 10809 by default) and
``nbd+unix:///name?socket=/path``, the forms ``havend nbd-serve`` prints.

What callers may rely on:

- Every operation is bounded by ``timeout`` seconds in total (not per
  ``recv``); a slow server raises :class:`TimeoutError`.
- An error reply raises :class:`~havend.errors.NBDClientError` carrying the NBD
  error code; the session stays usable.
- A server breaking the protocol raises
  :class:`~havend.errors.RemoteProtocolError`; a dead connection raises
  :class:`ConnectionError` (or another :class:`OSError`). After either, or
  after a timeout, the client is *broken*: the stream may be mid-message, so
  every later call raises :class:`ConnectionError` at once.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

from havend.errors import NBDClientError, RemoteProtocolError
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

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 10.0

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")  # magic, option, data length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
# Option replies longer than this are not from an NBD server we want to talk to.
_MAX_OPTION_REPLY = 64 * 1024


@dataclass(frozen=True, slots=True)
class NBDAddress:
    """Where an export is: TCP ``host``/``port`` or a UNIX ``socket_path``."""

    name: str
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None

    @classmethod
    def parse(cls, uri: str) -> NBDAddress:
        """Parse ``nbd://host[:port]/name`` or ``nbd+unix:///name?socket=path``."""
        parts = urlsplit(uri)
        name = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.scheme == "nbd":
            if not parts.hostname:
                raise ValueError(f"{uri!r}: no host")
            return cls(name, host=parts.hostname, port=parts.port or DEFAULT_PORT)
        if parts.scheme == "nbd+unix":
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise ValueError(f"{uri!r}: nbd+unix needs ?socket=PATH")
            return cls(name, socket_path=sockets[0])
        raise ValueError(f"{uri!r}: not an nbd:// or nbd+unix:// URI")

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{self.name}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.name}"


def _reply_name(reply: int) -> str:
    try:
        return "NBD_REP_" + Reply(reply).name
    except ValueError:
        return f"reply {reply:#x}"


def _error_name(error: int) -> str:
    try:
        return Error(error).name
    except ValueError:
        return f"error {error}"


class NBDClient:
    """One NBD session to one export; see the module docstring for the guarantees.

    Construct with :meth:`open` (a URI), :meth:`tcp` or :meth:`unix`, or pass
    an already connected socket. The handshake runs in the constructor; after
    it, :attr:`size`, :attr:`flags` and the block size constraints are known.
    Not thread-safe: one thread per client.
    """

    def __init__(self, sock: socket.socket, name: str = "", *, timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.min_block = 1
        self.preferred_block = 4096
        self.max_payload = MAX_PAYLOAD
        self._cookie = 0
        self._broken: str | None = None
        self._closed = False
        try:
            self._handshake()
        except BaseException:
            sock.close()
            raise

    # Construction ---------------------------------------------------------

    @classmethod
    def open(cls, uri: str | NBDAddress, *, timeout: float = DEFAULT_TIMEOUT) -> NBDClient:
        """Connect to ``uri`` (see :class:`NBDAddress`) and run the handshake."""
        address = uri if isinstance(uri, NBDAddress) else NBDAddress.parse(uri)
        if address.socket_path is not None:
            return cls.unix(address.socket_path, address.name, timeout=timeout)
        assert address.host is not None and address.port is not None
        return cls.tcp(address.host, address.port, address.name, timeout=timeout)

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        name: str = "",
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> NBDClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # QD1: no Nagle stalls
        return cls(sock, name, timeout=timeout)

    @classmethod
    def unix(cls, path: str, name: str = "", *, timeout: float = DEFAULT_TIMEOUT) -> NBDClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, name, timeout=timeout)

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def broken(self) -> bool:
        """True once the stream is unusable (transport error, timeout, protocol error)."""
        return self._broken is not None

    # Byte moving ----------------------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"NBD server did not answer within {self.timeout} s")
        return left

    def _send(self, data: bytes | bytearray | memoryview, deadline: float) -> None:
        # Since Python 3.5 a socket timeout bounds the whole sendall, not each send.
        self.sock.settimeout(self._remaining(deadline))
        self.sock.sendall(data)

    def _recv_into(self, buf: bytearray | memoryview, deadline: float) -> None:
        view = memoryview(buf)
        got = 0
        while got < len(view):
            self.sock.settimeout(self._remaining(deadline))
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError(
                    f"NBD server closed the connection ({got} of {len(view)} bytes received)"
                )
            got += n

    def _recv(self, n: int, deadline: float) -> bytes:
        buf = bytearray(n)
        self._recv_into(buf, deadline)
        return bytes(buf)

    def _guard(self) -> None:
        if self._closed:
            raise ConnectionError("NBD client is closed")
        if self._broken is not None:
            raise ConnectionError(f"NBD connection is broken: {self._broken}")

    # Handshake ------------------------------------------------------------

    def _handshake(self) -> None:
        deadline = self._deadline()
        magic, opt_magic, hflags = _GREETING.unpack(self._recv(_GREETING.size, deadline))
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"not an NBD server (magic {magic:#018x})")
        if opt_magic != IHAVEOPT:
            raise RemoteProtocolError("server speaks only the oldstyle handshake")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not speak the fixed newstyle handshake")
        no_zeroes = bool(hflags & HandshakeFlag.NO_ZEROES)
        cflags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if no_zeroes else 0)
        self._send(struct.pack(">I", cflags), deadline)

        encoded = self.name.encode()
        if len(encoded) > MAX_STRING:
            raise ValueError(f"export name longer than {MAX_STRING} bytes")
        # We ask for BLOCK_SIZE and so promise to honour it: payloads are split below.
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        self._send(_OPTION_HEADER.pack(IHAVEOPT, Option.GO, len(data)) + data, deadline)
        while True:
            reply, payload = self._option_reply(Option.GO, deadline)
            if reply == Reply.ACK:
                return
            if reply == Reply.INFO:
                self._info(payload)
            elif reply == Reply.ERR_UNSUP:
                self._export_name(encoded, no_zeroes, deadline)
                return
            elif reply & (1 << 31):
                message = payload.decode(errors="replace")
                raise NBDClientError(
                    f"export {self.name!r} refused: {_reply_name(reply)}"
                    + (f": {message}" if message else "")
                )
            # Other non-error replies may be ignored, says the spec.

    def _option_reply(self, option: int, deadline: float) -> tuple[int, bytes]:
        magic, got, reply, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size, deadline))
        if magic != OPTION_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic {magic:#018x}")
        if got != option:
            raise RemoteProtocolError(f"reply for option {got}, expected {option}")
        if length > _MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes")
        return reply, self._recv(length, deadline)

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("empty NBD_REP_INFO")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == Info.EXPORT:
            if len(payload) != 12:
                raise RemoteProtocolError("NBD_INFO_EXPORT of the wrong length")
            self.size, flags = struct.unpack_from(">QH", payload, 2)
            self.flags = TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != 14:
                raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
            self.min_block, self.preferred_block, self.max_payload = struct.unpack_from(
                ">III", payload, 2
            )

    def _export_name(self, encoded: bytes, no_zeroes: bool, deadline: float) -> None:
        self._send(
            _OPTION_HEADER.pack(IHAVEOPT, Option.EXPORT_NAME, len(encoded)) + encoded, deadline
        )
        self.size, flags = struct.unpack(">QH", self._recv(10, deadline))
        self.flags = TransmissionFlag(flags)
        if not no_zeroes:
            self._recv(124, deadline)

    # Transmission ---------------------------------------------------------

    def _request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
        into: memoryview | None = None,
    ) -> None:
        """Send one request, wait for its reply; raise NBDClientError on an error reply."""
        self._guard()
        self._cookie += 1
        cookie = self._cookie
        deadline = self._deadline()
        try:
            header = _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
            if payload is not None and len(payload) <= 64 * 1024:
                self._send(header + bytes(payload), deadline)  # one segment for small writes
            else:
                self._send(header, deadline)
                if payload is not None:
                    self._send(payload, deadline)
            if command == Command.DISC:
                return  # no reply to DISC
            magic, error, got = _SIMPLE_REPLY.unpack(self._recv(_SIMPLE_REPLY.size, deadline))
            if magic != SIMPLE_REPLY_MAGIC:
                raise RemoteProtocolError(f"bad reply magic {magic:#010x}")
            if got != cookie:
                raise RemoteProtocolError(f"reply for cookie {got}, expected {cookie}")
            if error == 0 and into is not None:
                self._recv_into(into, deadline)
        except (OSError, RemoteProtocolError) as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        if error:
            raise NBDClientError(
                f"{command.name} at offset {offset}, length {length}: {_error_name(error)}", error
            )

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = max(self.max_payload - self.max_payload % max(self.min_block, 1), 1)
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        buf = bytearray(length)
        view = memoryview(buf)
        for o, n in self._chunks(offset, length):
            self._request(Command.READ, o, n, into=view[o - offset : o - offset + n])
        return bytes(buf)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns."""
        view = memoryview(data).cast("B")
        flags = int(CommandFlag.FUA) if fua else 0
        for o, n in self._chunks(offset, len(view)):
            self._request(
                Command.WRITE, o, n, flags=flags, payload=view[o - offset : o - offset + n]
            )

    def flush(self) -> None:
        """Every write already acknowledged on this connection is durable when this returns."""
        self._request(Command.FLUSH)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        flags = int(CommandFlag.FUA) if fua else 0
        for o, n in self._chunks(offset, length):
            self._request(Command.TRIM, o, n, flags=flags)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        flags = int(CommandFlag.FUA) if fua else 0
        for o, n in self._chunks(offset, length):
            self._request(Command.WRITE_ZEROES, o, n, flags=flags)

    def close(self, *, disconnect: bool = True) -> None:
        """Send NBD_CMD_DISC (best effort, unless ``disconnect`` is false) and close.

        Idempotent. ``disconnect=False`` just drops the socket, like a client
        that vanished.
        """
        if self._closed:
            return
        try:
            if disconnect and self._broken is None:
                self._request(Command.DISC)
        except OSError:
            pass  # the server may already be gone; closing is all that is left
        finally:
            self._closed = True
            self.sock.close()
