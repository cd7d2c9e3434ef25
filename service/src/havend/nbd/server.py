"""The asyncio side of the NBD server: sockets in, volume I/O, replies out.

All protocol decisions live in :mod:`havend.nbd.protocol`; this module moves
bytes between a transport and a :class:`~havend.nbd.protocol.ServerConnection`
and carries out the requests it hands back against a
:class:`~havend.volume.FileVolume`.

Small reads and writes run inline on the event loop: from the page cache they
take microseconds, less than a hand-off to a thread. FLUSH, FUA writes,
WRITE_ZEROES and large transfers go to a thread pool so that a slow disk never
stalls other connections. Replies may leave in any order, as NBD allows; a
FLUSH covers every write already replied to, because those writes returned
from pwrite before the FLUSH's fdatasync started.

A client that breaks the protocol or vanishes loses only its own connection,
logged in one line; every other client keeps being served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

from havend.errors import RemoteProtocolError
from havend.nbd import protocol
from havend.nbd.constants import Error, Reply
from havend.volume import FileVolume

log = logging.getLogger("havend.nbd")

# Transfers up to this size run on the event loop (see the module docstring).
INLINE_IO_LIMIT = 256 * 1024
# Requests in worker threads per connection before we stop reading from it.
MAX_PENDING = 64
# Replies queued in the transport before we stop reading from that client.
WRITE_BUFFER_HIGH = 16 * 1024 * 1024

_ERRNO_TO_NBD = {
    errno.EPERM: Error.EPERM,
    errno.EACCES: Error.EPERM,
    errno.EROFS: Error.EPERM,
    errno.ENOSPC: Error.ENOSPC,
    errno.EDQUOT: Error.ENOSPC,
    errno.EFBIG: Error.ENOSPC,
    errno.EINVAL: Error.EINVAL,
    errno.ENOMEM: Error.ENOMEM,
}


def nbd_error(exc: BaseException) -> Error:
    """The NBD error to answer for a failed volume operation."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, Error.EIO)
    return Error.EIO


class NBDServer:
    """Serves named volumes over NBD on TCP and UNIX sockets."""

    def __init__(
        self,
        volumes: Mapping[str, FileVolume],
        *,
        default: str | None = None,
        descriptions: Mapping[str, str] | None = None,
        workers: int = 8,
        inline_io_limit: int = INLINE_IO_LIMIT,
    ) -> None:
        self.volumes = dict(volumes)
        descriptions = descriptions or {}
        self.exports = {
            name: protocol.Export(
                name=name,
                size=vol.size,
                read_only=vol.read_only,
                description=descriptions.get(name, ""),
            )
            for name, vol in self.volumes.items()
        }
        self.default = default
        self.inline_io_limit = inline_io_limit
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="havend-nbd-io"
        )
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[NBDConnection] = set()

    def add_export(self, name: str, volume: FileVolume, description: str = "") -> None:
        """Serve one more volume (new connections see it at once)."""
        if name in self.volumes:
            raise ValueError(f"export {name!r} exists already")
        self.volumes[name] = volume
        self.exports[name] = protocol.Export(
            name=name, size=volume.size, read_only=volume.read_only, description=description
        )

    def remove_export(self, name: str) -> None:
        """Stop serving a volume; connections using it are cut."""
        self.exports.pop(name, None)
        volume = self.volumes.pop(name, None)
        for conn in list(self._connections):
            if volume is not None and conn.volume is volume:
                conn.abort(f"export {name} was removed")

    def _new_connection(self) -> NBDConnection:
        return NBDConnection(self)

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> tuple[str, int]:
        """Start listening; returns the bound address (useful with port 0)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            self._new_connection, host, port, reuse_address=True, backlog=128
        )
        self._listeners.append(listener)
        return listener.sockets[0].getsockname()[:2]

    async def listen_unix(self, path: str) -> str:
        loop = asyncio.get_running_loop()
        if os.path.exists(path) and not os.path.isfile(path):
            os.unlink(path)  # a stale socket from a previous run
        listener = await loop.create_unix_server(self._new_connection, path, backlog=128)
        self._listeners.append(listener)
        return path

    async def close(self) -> None:
        """Stop listening, let connections finish in-flight requests, sync volumes."""
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.shutdown()
        for _ in range(100):  # bounded: at most ~5 s for in-flight requests
            if not self._connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort("server shut down with requests in flight")
        loop = asyncio.get_running_loop()
        for vol in self.volumes.values():
            if not vol.read_only:
                await loop.run_in_executor(self.executor, vol.flush)
        self.executor.shutdown(wait=True)


class NBDConnection(asyncio.BufferedProtocol):
    """One client: feeds the sans-IO protocol and carries out its requests."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.proto = protocol.ServerConnection(server.exports, server.default)
        self.transport: asyncio.Transport | None = None
        self.volume: FileVolume | None = None
        self.peer = "?"
        self.pending = 0
        self.closing = False
        self._paused_for: set[str] = set()

    # asyncio.Protocol callbacks --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.peer = "unix"
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server._connections.add(self)
        self.transport.write(self.proto.greeting())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer()  # a big WRITE's payload is read in place

    def buffer_updated(self, nbytes: int) -> None:
        self.proto.buffer_updated(nbytes)
        self._process()

    def eof_received(self) -> bool:
        self.proto.receive_data(b"")
        self._process()
        return True  # we close once in-flight requests are answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if exc is not None and not self.closing:
            log.warning("nbd %s: client vanished: %s", self.peer, exc)
        self.closing = True

    def pause_writing(self) -> None:
        self._pause("replies")

    def resume_writing(self) -> None:
        self._resume("replies")

    # Flow control -------------------------------------------------------------

    def _pause(self, why: str) -> None:
        if not self._paused_for and self.transport is not None:
            self.transport.pause_reading()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        self._paused_for.discard(why)
        if not self._paused_for and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # Requests -------------------------------------------------------------

    def _process(self) -> None:
        proto = self.proto
        while not self.closing:
            try:
                event = proto.next_event()
            except RemoteProtocolError as exc:
                self.abort(str(exc))
                return
            if event is protocol.NEED_DATA:
                break
            handler = _HANDLERS[type(event)]
            handler(self, event)
        self._send()

    def _send(self, *parts: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pending = self.proto.data_to_send()  # handshake output goes first
        if pending:
            transport.write(pending)
        if len(parts) == 1:
            transport.write(parts[0])
        elif parts:
            transport.writelines(parts)

    def _on_export(self, event: protocol.ExportChosen) -> None:
        self.volume = self.server.volumes[event.export.name]
        log.debug("nbd %s: serving export %r", self.peer, event.export.name)

    def _on_read(self, event: protocol.Read) -> None:
        assert self.volume is not None
        if event.length > self.server.inline_io_limit:
            self._offload(event.cookie, self.volume.read, event.offset, event.length)
            return
        try:
            data = self.volume.read(event.offset, event.length)
        except OSError as exc:
            self._failed(event.cookie, "READ", exc)
            return
        self._send(self.proto.reply(event.cookie), data)

    def _on_write(self, event: protocol.Write) -> None:
        volume = self.volume
        assert volume is not None
        if event.fua:
            if hasattr(volume, "flush_async"):  # a replicated volume: FUA = write + FLUSH
                self._await(
                    event.cookie, _then_flush(volume, volume.write, event.offset, event.data)
                )
            else:
                self._offload(event.cookie, volume.write_fua, event.offset, event.data)
        elif len(event.data) > self.server.inline_io_limit:
            self._offload(event.cookie, volume.write, event.offset, event.data)
        else:
            try:
                volume.write(event.offset, event.data)
            except OSError as exc:
                self._failed(event.cookie, "WRITE", exc)
                return
            self._send(self.proto.reply(event.cookie))

    def _on_flush(self, event: protocol.Flush) -> None:
        assert self.volume is not None
        flush_async = getattr(self.volume, "flush_async", None)
        if flush_async is not None:  # may wait for a replication target (sync mode)
            self._await(event.cookie, flush_async())
        else:
            self._offload(event.cookie, self.volume.flush)

    def _on_trim(self, event: protocol.Trim) -> None:
        volume = self.volume
        assert volume is not None
        if event.fua and hasattr(volume, "flush_async"):
            self._await(event.cookie, _then_flush(volume, volume.trim, event.offset, event.length))
        else:
            self._offload(event.cookie, _trim, volume, event.offset, event.length, event.fua)

    def _on_write_zeroes(self, event: protocol.WriteZeroes) -> None:
        volume = self.volume
        assert volume is not None
        if event.fua and hasattr(volume, "flush_async"):
            zero = functools.partial(volume.write_zeroes, may_trim=event.may_trim)
            self._await(event.cookie, _then_flush(volume, zero, event.offset, event.length))
            return
        self._offload(
            event.cookie,
            _write_zeroes,
            self.volume,
            event.offset,
            event.length,
            event.fua,
            event.may_trim,
        )

    def _on_rejected(self, event: protocol.RequestRejected) -> None:
        log.warning(
            "nbd %s: %s refused with %s: %s",
            self.peer,
            protocol.command_name(event.command),
            event.error.name,
            event.reason,
        )

    def _on_option_rejected(self, event: protocol.OptionRejected) -> None:
        # Clients probe for options routinely; only real refusals are worth a line.
        level = logging.DEBUG if event.reply == Reply.ERR_UNSUP else logging.WARNING
        log.log(
            level,
            "nbd %s: %s refused with %s: %s",
            self.peer,
            protocol.option_name(event.option),
            event.reply.name,
            event.reason,
        )

    def _on_disconnect(self, event: protocol.Disconnect | protocol.ConnectionClosed) -> None:
        self.shutdown()

    # Worker threads -------------------------------------------------------

    def _offload(self, cookie: int, fn: Callable[..., Any], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        self._track(cookie, loop.run_in_executor(self.server.executor, fn, *args))

    def _await(self, cookie: int, coro: Coroutine[Any, Any, Any]) -> None:
        self._track(cookie, asyncio.ensure_future(coro))

    def _track(self, cookie: int, future: asyncio.Future[Any]) -> None:
        self.pending += 1
        if self.pending >= MAX_PENDING:
            self._pause("pending")
        future.add_done_callback(lambda f: self._completed(cookie, f))

    def _completed(self, cookie: int, future: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if self.pending <= MAX_PENDING // 2:
            self._resume("pending")
        exc = future.exception()
        if exc is not None:
            self._failed(cookie, "request", exc)
        else:
            result = future.result()
            if result is None:
                self._send(self.proto.reply(cookie))
            else:  # a READ's data
                self._send(self.proto.reply(cookie), result)
        if self.closing and self.pending == 0 and self.transport is not None:
            self.transport.close()

    def _failed(self, cookie: int, what: str, exc: BaseException) -> None:
        error = nbd_error(exc)
        log.error("nbd %s: %s failed on %s: %s", self.peer, what, self._volume_path(), exc)
        self._send(self.proto.reply(cookie, error))

    def _volume_path(self) -> str:
        return self.volume.path if self.volume is not None else "?"

    # Ending ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Close once in-flight requests are answered (soft disconnect, server stop)."""
        self.closing = True  # _process reads no further request
        if self.transport is not None and self.pending == 0:
            self._send()
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop this connection at once (hard disconnect)."""
        log.warning("nbd %s: dropping connection: %s", self.peer, reason)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


async def _then_flush(volume: Any, change: Callable[..., None], *args: Any) -> None:
    """A change with FUA on a replicated volume: the change, then what FLUSH waits for."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, change, *args)
    await volume.flush_async()


def _trim(volume: FileVolume, offset: int, length: int, fua: bool) -> None:
    volume.trim(offset, length)
    if fua:
        volume.flush()


def _write_zeroes(volume: FileVolume, offset: int, length: int, fua: bool, may_trim: bool) -> None:
    volume.write_zeroes(offset, length, may_trim=may_trim)
    if fua:
        volume.flush()


_HANDLERS: dict[type, Callable[[NBDConnection, Any], None]] = {
    protocol.ExportChosen: NBDConnection._on_export,
    protocol.Read: NBDConnection._on_read,
    protocol.Write: NBDConnection._on_write,
    protocol.Flush: NBDConnection._on_flush,
    protocol.Trim: NBDConnection._on_trim,
    protocol.WriteZeroes: NBDConnection._on_write_zeroes,
    protocol.RequestRejected: NBDConnection._on_rejected,
    protocol.OptionRejected: NBDConnection._on_option_rejected,
    protocol.Disconnect: NBDConnection._on_disconnect,
    protocol.ConnectionClosed: NBDConnection._on_disconnect,
}
