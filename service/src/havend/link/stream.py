"""Reading whole frames of ``link.wire`` from an asyncio connection.

Two ways in: :func:`read_frame` over an ``asyncio.StreamReader`` (the source's
end of a link, which gets small frames back), and :meth:`FrameLink.read_frame`
on the target's end, which receives the batches: a buffered protocol that has
TLS decrypt each frame straight into a buffer of the frame's own size, so the
records' payloads are never copied on their way to the journal.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from havend.errors import RemoteProtocolError
from havend.link import wire

# StreamReader buffer limit for replication links: big enough that a BATCH
# arrives without pausing and resuming the transport at every TLS record.
STREAM_LIMIT = 8 << 20


async def read_frame(
    reader: asyncio.StreamReader, decoder: wire.FrameDecoder, timeout: float | None
) -> wire.Frame:
    """The next frame; IncompleteReadError when the peer closes, TimeoutError
    when it does not arrive whole within ``timeout`` seconds. The payload is
    read in one piece and decoded without further copies."""
    async with asyncio.timeout(timeout):
        header = await reader.readexactly(wire.FRAME_HEADER_SIZE)
        length, kind = decoder.parse_header(header)
        payload = await reader.readexactly(length) if length else b""
    return decoder.decode(kind, payload, wire.FRAME_HEADER_SIZE + length)


class FrameLink(asyncio.BufferedProtocol):
    """One replication connection, served by ``serve(link)``: frames in through
    :meth:`read_frame`, bytes out through the
    ``asyncio.StreamWriter`` methods the target uses (write, writelines,
    drain, close, get_extra_info, transport).

    Each frame's header is read first, then its payload into a buffer of its
    exact length. Frames the server has not taken yet are queued; past
    ``limit`` bytes of them, reading pauses (the peer's window fills, it
    waits). A malformed header is reported to the reader, after the frames
    before it, and nothing more is read."""

    def __init__(
        self, serve: Callable[[FrameLink], Awaitable[None]], limit: int = STREAM_LIMIT
    ) -> None:
        self._serve = serve
        self._limit = limit
        self.transport: asyncio.Transport | None = None
        self._header = bytearray(wire.FRAME_HEADER_SIZE)
        self._into = memoryview(self._header)  # where the next bytes go
        self._got = 0
        self._kind: int | None = None  # None: reading a header
        self._frames: collections.deque[tuple[int, bytearray | bytes]] = collections.deque()
        self._queued = 0
        self._error: BaseException | None = None  # after the queued frames
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._readable: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._lost = False
        self._task: asyncio.Task[None] | None = None

    # Protocol callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._task = asyncio.get_running_loop().create_task(self._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._into[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        self._got += nbytes
        if self._got < len(self._into):
            return
        if self._kind is None:
            try:
                length, kind = wire.FrameDecoder.parse_header(self._header)
            except RemoteProtocolError as exc:
                self._fail(exc)
                return
            if length:
                self._kind, self._into, self._got = kind, memoryview(bytearray(length)), 0
                return
            self._queue(kind, b"")
        else:
            payload = self._into.obj
            assert isinstance(payload, bytearray)
            self._queue(self._kind, payload)
        self._kind, self._into, self._got = None, memoryview(self._header), 0

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake_reader()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("Connection lost"))
            self._drained.exception()  # retrieved: nobody may be waiting

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # Frames in --------------------------------------------------------------------

    def _queue(self, kind: int, payload: bytearray | bytes) -> None:
        self._frames.append((kind, payload))
        self._queued += len(payload)
        if self._queued > self._limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._into = memoryview(bytearray(0))  # nothing more is taken in
        if self.transport is not None:
            self.transport.pause_reading()
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    async def read_frame(self, decoder: wire.FrameDecoder, timeout: float | None) -> wire.Frame:
        """The next frame: as :func:`read_frame` over a StreamReader, with the
        same errors."""
        async with asyncio.timeout(timeout):
            while not self._frames:
                if self._error is not None:
                    raise self._error
                if self._eof:
                    partial = bytes(self._header[: self._got]) if self._kind is None else b""
                    raise asyncio.IncompleteReadError(partial, None)
                self._readable = asyncio.get_running_loop().create_future()
                await self._readable
        kind, payload = self._frames.popleft()
        self._queued -= len(payload)
        if self._reading_paused and self._queued <= self._limit // 2 and not self._lost:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return decoder.decode(kind, payload, wire.FRAME_HEADER_SIZE + len(payload))

    # Bytes out (the StreamWriter methods the target uses) -------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        assert self.transport is not None
        self.transport.writelines(pieces)

    async def drain(self) -> None:
        if self.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as StreamWriter does
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._writing_paused:
            return
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        assert self.transport is not None
        return self.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
