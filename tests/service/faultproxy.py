"""A userspace TCP proxy that injects network faults between two local peers.

``tc netem`` does not work on the test machines, so tests put a
:class:`FaultProxy` between a client and a server instead: it listens on
127.0.0.1 (a free port), connects each accepted client to the target, and
forwards bytes both ways from its own asyncio loop in a background thread.

Controls are thread-safe and synchronous: when a control returns, the fault
is in effect for every later chunk. Faults:

- ``delay(s)``: every forwarded chunk waits ``s`` seconds first (per direction,
  per connection, so throughput drops to at most a chunk per delay).
- ``bandwidth(bps)``: each direction of each connection at most ``bps`` bytes/s.
- ``partition()`` / ``heal()``: nothing is forwarded either way, and new
  connections are accepted but not connected to the target, until ``heal()``.
  Bytes are held, not dropped (TCP would retransmit them after a real
  partition heals): the stream stays intact. A test that wants the
  connection dead must say so with ``reset_all()``.
- ``refuse()`` / ``accept()``: new connections are reset at once: the client's
  connect() fails with ECONNRESET or succeeds and its first read fails with a
  reset or EOF (a race in the kernel; clients must handle both).
- ``reset_all()``: every current connection is aborted with RST (SO_LINGER 0)
  on both sides.
- ``drop_after(n)``: a connection is cut (RST both sides) once ``n`` bytes
  have been forwarded client->server after the call; exactly ``n`` bytes reach
  the server. With ``once`` (the default) only the first connection to reach
  ``n`` is cut, so a client that reconnects gets through.

Every wait is bounded; ``stop()`` aborts everything and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
CONTROL_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since the proxy started."""

    client_to_server: int  # bytes forwarded
    server_to_client: int
    accepted: int  # connections accepted (refused ones included)
    refused: int
    active: int  # connections open now
    resets: int  # connections aborted by reset_all() or drop_after()


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST: SO_LINGER 0, then abort the transport."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    c2s_since_arm: int = 0
    handler: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dead: bool = False

    def abort(self) -> None:
        """RST both sides and end this connection's tasks (they may be parked in a partition)."""
        self.dead = True
        _abort(self.client)
        _abort(self.server)
        current = asyncio.current_task()
        for task in self.tasks or ([self.handler] if self.handler else []):
            if task is not current:
                task.cancel()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` with faults on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._conns: set[_Conn] = set()
        # State below is touched only on the proxy's loop.
        self._delay = 0.0
        self._bandwidth: float | None = None
        self._healed: asyncio.Event | None = None  # set when not partitioned
        self._refusing = False
        self._drop_after: int | None = None
        self._drop_once = True
        self._c2s = self._s2c = 0
        self._accepted = self._refused = self._resets = 0

    # Life cycle -----------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the loop thread and listen; returns self once ``port`` is known."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(CONTROL_TIMEOUT):
            raise TimeoutError("FaultProxy did not start")
        if self._start_error is not None:
            raise self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # reported to start(), which re-raises it
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0, backlog=128)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Abort every connection, stop listening, join the thread (all bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(STOP_TIMEOUT)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for conn in list(self._conns):
            conn.abort()
            tasks += [*conn.tasks, *([conn.handler] if conn.handler else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Controls (any thread) ------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop and wait for it: controls take effect in order."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("FaultProxy is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CONTROL_TIMEOUT)

    def delay(self, seconds: float) -> None:
        """Hold every forwarded chunk ``seconds`` (0 to stop)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    def bandwidth(self, bytes_per_s: float | None) -> None:
        """Limit each direction of each connection; None for no limit."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bandwidth must be > 0 (or None)")
        self._call(lambda: setattr(self, "_bandwidth", bytes_per_s))

    def partition(self) -> None:
        """Forward nothing, in both directions, until :meth:`heal`."""
        self._call(lambda: self._healed.clear())  # type: ignore[union-attr]

    def heal(self) -> None:
        self._call(lambda: self._healed.set())  # type: ignore[union-attr]

    def refuse(self) -> None:
        """Reset new connections at once, until :meth:`accept`."""
        self._call(lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        self._call(lambda: setattr(self, "_refusing", False))

    def reset_all(self) -> int:
        """Abort every current connection with RST on both sides; returns how many."""

        def reset() -> int:
            conns = [conn for conn in self._conns if not conn.dead]
            for conn in conns:
                conn.abort()
            self._resets += len(conns)
            return len(conns)

        return self._call(reset)

    def drop_after(self, n_bytes: int | None, *, once: bool = True) -> None:
        """Cut a connection after ``n_bytes`` more client->server bytes; None disarms."""
        if n_bytes is not None and n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")

        def arm() -> None:
            self._drop_after = n_bytes
            self._drop_once = once
            for conn in self._conns:
                conn.c2s_since_arm = 0

        self._call(arm)

    def stats(self) -> ProxyStats:
        def snapshot() -> ProxyStats:
            return ProxyStats(
                self._c2s,
                self._s2c,
                self._accepted,
                self._refused,
                len(self._conns),
                self._resets,
            )

        return self._call(snapshot)

    @property
    def bytes_client_to_server(self) -> int:
        return self.stats().client_to_server

    @property
    def bytes_server_to_client(self) -> int:
        return self.stats().server_to_client

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self.stats().accepted

    # Forwarding (the proxy's loop) ----------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._refusing:
            self._refused += 1
            _abort(writer)
            return
        conn = _Conn(writer, handler=asyncio.current_task())  # type: ignore[arg-type]
        self._conns.add(conn)
        try:
            assert self._healed is not None
            # A partitioned network carries no SYN: connect only once healed.
            await self._healed.wait()
            if conn.dead:
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                conn.abort()  # the target is down: the client sees a reset
                return
            conn.server = up_writer
            if conn.dead:  # reset while connecting
                conn.abort()
                return
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Limits of 0: drain() returns only once bytes are in the kernel.
                w.transport.set_write_buffer_limits(0)
            conn.tasks = [
                asyncio.ensure_future(self._pump(conn, reader, up_writer, to_server=True)),
                asyncio.ensure_future(self._pump(conn, up_reader, writer, to_server=False)),
            ]
            await asyncio.wait(conn.tasks)
        finally:
            self._conns.discard(conn)
            for w in (conn.client, conn.server):
                if w is not None and not conn.dead:
                    w.close()

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
    ) -> None:
        assert self._healed is not None
        try:
            while not conn.dead:
                data = await reader.read(CHUNK)
                if not data:
                    # Half-close: pass the EOF on, keep the other direction going.
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await self._healed.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                cut = False
                if to_server and self._drop_after is not None:
                    room = self._drop_after - conn.c2s_since_arm
                    if len(data) >= room:
                        data, cut = data[: max(room, 0)], True
                if conn.dead:
                    return
                if data:
                    writer.write(data)
                    await writer.drain()
                    if to_server:
                        self._c2s += len(data)
                        conn.c2s_since_arm += len(data)
                    else:
                        self._s2c += len(data)
                if cut:
                    if self._drop_once:
                        self._drop_after = None
                    self._resets += 1
                    conn.abort()
                    return
                if self._bandwidth:
                    await asyncio.sleep(len(data) / self._bandwidth)
        except (OSError, asyncio.IncompleteReadError):
            conn.abort()  # a reset on one side becomes a reset on the other

    def __repr__(self) -> str:
        return f"FaultProxy(127.0.0.1:{self.port} -> {self.target_host}:{self.target_port})"
