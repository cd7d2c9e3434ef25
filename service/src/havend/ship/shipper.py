"""Shipping a group's journal to its target: batches, compression, credits,
a bandwidth cap, and reconnecting until stopped.

A session starts with HELLO; the target's WELCOME says the last seq it holds
durably, and shipping resumes right after it, so a batch lost with a broken
connection is simply sent again (the target skips seqs it already has). Records are shipped
as soon as they are appended (see ``ship.source`` for why that is safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import zstandard

from havend.errors import CheckpointError, JournalError, RemoteProtocolError
from havend.journal.record import Record
from havend.link import wire
from havend.link.hello import Hello, HelloVolume, Welcome
from havend.link.promotion import Promoted
from havend.link.stream import STREAM_LIMIT, read_frame
from havend.ship import resync
from havend.ship.failback import failback_session, reverse_session
from havend.ship.loop import call_in, run_in, running_loop, start_loop_thread
from havend.ship.source import DirtyRegions, SourceGroup
from havend.ship.splitbrain import (
    FailedOver,
    SplitBrain,
    refused_promoted,
    resolve_session,
    split_brain_report,
)

log = logging.getLogger("havend.ship")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShipperSettings:
    host: str
    port: int
    server_name: str | None = None  # TLS name of the target (default: host)
    compression_level: int = 3  # 0: off
    bandwidth_limit: int = 0  # bytes per second on the wire, 0: unlimited
    window_bytes: int = 32 << 20  # sent but not yet acknowledged
    batch_bytes: int = 4 << 20
    min_backoff: float = 0.05
    max_backoff: float = 5.0
    reverse_interval: float = 0.0  # failed over: seconds between reverse rounds (0: off)
    connect_timeout: float = 10.0
    # A link that leaves sent batches unacknowledged this long is dead (a
    # partition sends no RST): drop it and reconnect.
    ack_timeout: float = 30.0


class TokenBucket:
    """Bandwidth cap: ``take(n)`` sleeps so that at most ``rate`` bytes/s pass."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._allowance = float(rate)
        self._stamp = time.monotonic()

    async def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._stamp) * self.rate)
        self._stamp = now
        self._allowance -= amount
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


class Shipper:
    """Ships one group to one target until :meth:`stop`."""

    def __init__(
        self,
        group: SourceGroup,
        settings: ShipperSettings,
        ssl_context: ssl.SSLContext | None,
        node_name: str,
    ) -> None:
        self.group = group
        self.settings = settings
        self.ssl_context = ssl_context
        self.node_name = node_name
        self._compressor = (
            zstandard.ZstdCompressor(level=settings.compression_level)
            if settings.compression_level > 0
            else None
        )
        self._bucket = TokenBucket(settings.bandwidth_limit)
        self._stopping = False
        self._writer: asyncio.StreamWriter | None = None  # of the session up now
        self._failover: asyncio.Future[dict] | None = None
        self._wake = asyncio.Event()  # a failback ended: connect again now
        # Failback, split-brain resolution and reverse rounds: one at a time.
        self._exclusive = asyncio.Lock()
        self.paused = False  # an operator stopped shipping (writes are still journaled)
        # The loop run() runs in; everything that touches the link happens there.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # A thread of its own --------------------------------------------------------

    def start_thread(self) -> asyncio.Future[None]:
        """Run :meth:`run` in a thread with an event loop of its own (of the
        caller's loop's kind); the future, in the caller's loop, ends with it.
        Cancelling it stops the shipper; :meth:`join` waits for the thread.

        Why: the node's loop serves NBD. Sharing it, the shipper got a turn per
        loop iteration and fell gigabytes behind while a client wrote at full
        speed (then read its records back from the segment files). In its own
        loop it keeps pace: the TLS encryption and the socket writes release
        the GIL, so they run while the node's loop serves the next writes."""
        own, self._thread, running = start_loop_thread(f"havend-ship-{self.group.name}", self.run())
        self._loop = own
        self.group.bind_shipper(own)
        return running

    async def join(self, timeout: float = 30.0) -> None:
        """Wait until the shipper's thread ended (after :meth:`stop` and the
        cancellation of :meth:`start_thread`'s future)."""
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
            if thread.is_alive():
                log.error("group %s: the shipper's thread did not end", self.group.name)

    def _here(self) -> bool:
        """Whether the caller runs in the shipper's loop (or it has none yet)."""
        return self._loop is None or running_loop() is self._loop

    def _soon(self, fn: Callable[[], None]) -> None:
        """``fn()`` in the shipper's loop: now if this is it."""
        call_in(self._loop, fn)

    async def _there(self, work: Awaitable[T]) -> T:
        """Await ``work`` (a coroutine) in the shipper's loop."""
        return await run_in(self._loop, work)

    @property
    def bucket(self) -> TokenBucket:
        """The bandwidth cap of BATCH and SYNC_DATA frames."""
        return self._bucket

    def reconfigure(self, **changes: Any) -> None:
        """New settings (a new target, compression, bandwidth cap...); a new
        target drops the current link, the next one goes there."""
        old = self.settings
        self.settings = dataclasses.replace(old, **changes)
        level = self.settings.compression_level
        self._compressor = zstandard.ZstdCompressor(level=level) if level > 0 else None
        self._bucket = TokenBucket(self.settings.bandwidth_limit)
        if (old.host, old.port, old.server_name) != (
            self.settings.host,
            self.settings.port,
            self.settings.server_name,
        ):
            self._soon(self._drop_link)
        self._soon(self._wake.set)

    def pause(self) -> None:
        """Stop shipping until :meth:`resume` (the journal keeps every write; a
        full journal switches to region tracking as during an outage)."""
        self.paused = True
        self._soon(self._drop_link)

    def resume(self) -> None:
        self.paused = False
        self._soon(self._wake.set)

    def _drop_link(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()

    async def failback(self, timeout: float) -> dict:
        """Bring the data home from the promoted target: pull the blocks that
        differ in the ranges either side changed since the promotion (the old
        source's unshipped writes are saved first, as a recoverable snapshot),
        then make the target a replica again and resume shipping."""
        promoted = self._failed_over("failback")
        return await self._exclusive_session(
            lambda reader, writer: failback_session(self, reader, writer, promoted), timeout
        )

    def _failed_over(self, kind: str) -> Promoted:
        """The promotion record of a failed-over group, for a session (``kind``)
        that needs one; else CheckpointError with the group's refusal."""
        refused = self.group.refusal(kind)
        if refused:
            raise CheckpointError(refused)
        fence = self.group.fence
        assert fence is not None and fence.promoted is not None  # refusal says so
        return fence.promoted

    async def _exclusive_session(
        self,
        run: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[dict]],
        timeout: float,
        *,
        wake: bool = True,
    ) -> dict:
        """A session of its own (failback, resolution, reverse round), one at a
        time; ``wake``: the shipping loop reconnects at once afterwards."""
        return await self._there(self._exclusive_here(run, timeout, wake))

    async def _exclusive_here(
        self,
        run: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[dict]],
        timeout: float,
        wake: bool,
    ) -> dict:
        async with self._exclusive:
            reader, writer = await self._connect()
            try:
                return await asyncio.wait_for(run(reader, writer), timeout)
            finally:
                writer.close()
                if wake:
                    self._wake.set()

    async def reverse_round(self, timeout: float) -> dict:
        """Reverse protection while failed over: pull what the recovery side
        changed since the last round, as of a new checkpoint of it (staged,
        then applied here), so losing that side too loses one round at most.
        The first round also saves this side's unshipped writes (the
        failback's snapshot) before the recovery side's data replaces them."""
        promoted = self._failed_over("reverse")
        return await self._exclusive_session(
            lambda reader, writer: reverse_session(self, reader, writer, promoted),
            timeout,
            wake=False,
        )

    async def resolve(self, survivor: str, timeout: float) -> dict:
        """End a split brain with the operator's choice of the copy that lives on.

        ``recovery``: the promoted side's; this side stays failed over (its
        writes after the promotion are kept by the failback's snapshot, as any
        unshipped write). ``production``: this side's; the target saves what
        it changed since the promotion in a snapshot, becomes a replica again,
        and the blocks either side changed are resynced from here (by hash).
        """
        refused = self.group.refusal("resolve")
        if refused:
            raise CheckpointError(refused)
        fence = self.group.fence
        assert fence is not None  # in a split brain: refusal says so
        if survivor not in ("recovery", "production"):
            raise CheckpointError(f"survivor must be recovery or production, not {survivor!r}")
        return await self._exclusive_session(
            lambda reader, writer: resolve_session(self, reader, writer, fence, survivor), timeout
        )

    async def request_failover(self, final_seq: int, timeout: float) -> Promoted:
        """Planned failover, once the group is fenced and drained to ``final_seq``:
        ask the target to promote itself there; its promotion record."""
        body = await self._there(self._request_failover(final_seq, timeout))
        return Promoted.from_dict(body, record="PROMOTED")

    async def _request_failover(self, final_seq: int, timeout: float) -> dict:
        group = self.group
        if not group.connected or self._writer is None or group.acked_seq < final_seq:
            raise RemoteProtocolError(f"group {group.name}: the link to the target is down")
        self._failover = asyncio.get_running_loop().create_future()
        self._writer.write(wire.encode_control(wire.FrameType.FAILOVER, {"final_seq": final_seq}))
        await self._writer.drain()
        return await asyncio.wait_for(self._failover, timeout)

    async def run(self) -> None:
        """Connect, ship, and on any failure back off and reconnect."""
        self._loop = asyncio.get_running_loop()
        backoff = self.settings.min_backoff
        group = self.group
        while not self._stopping:
            if self.paused or not self.settings.host:  # until resumed, or paired
                group.last_error = "paused by an operator" if self.paused else "no target paired"
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            try:
                await self._session()
            except JournalError as exc:
                group.last_error = f"journal: {exc}"
                log.error(
                    "group %s: %s; the journal cannot be shipped: resyncing every region by hash",
                    group.name,
                    exc,
                )
                with group.lock:
                    group.enter_overflow(everything=True, reason="journal unreadable")
                continue
            except FailedOver as exc:  # nothing to ship until failback: ask rarely
                group.last_error = f"failed over: {exc}"
                self._wake.clear()
                every = self.settings.reverse_interval or self.settings.max_backoff * 6
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), every)
                fence = group.fence
                if self.settings.reverse_interval and fence is not None and fence.promoted:
                    try:
                        await self.reverse_round(timeout=max(300, 10 * every))
                    except Exception as exc:  # the next round tries again
                        group.last_error = f"reverse protection: {type(exc).__name__}: {exc}"
                        log.warning("group %s: %s", group.name, group.last_error)
                continue
            except SplitBrain:
                continue  # at once: the target must learn of it and fence itself too
            except _Overflowed:
                log.info(
                    "group %s: reconnecting to resync the regions written meanwhile", group.name
                )
                backoff = self.settings.min_backoff
                continue
            except Exception as exc:  # a shipper must outlive any one failure
                # OSError, IncompleteReadError, RemoteProtocolError, SSLError... and
                # e.g. the RuntimeError uvloop raises writing to a transport it saw reset.
                group.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "group %s: link to %s:%d down (%s); retrying in %.2f s",
                    group.name,
                    self.settings.host,
                    self.settings.port,
                    group.last_error,
                    backoff,
                )
            finally:
                group.connected = False
            if time.monotonic() - started > 10:
                backoff = self.settings.min_backoff  # it worked for a while: retry fast
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.settings.max_backoff, backoff * 2)

    def stop(self) -> None:
        self._stopping = True
        self._soon(self._wake.set)

    def hello(self) -> Hello:
        """The HELLO of this group (sessions of their own add to it)."""
        group = self.group
        return Hello(
            version=wire.VERSION,
            node=self.node_name,
            group=group.id,
            name=group.name,
            mode=group.mode,
            volumes=tuple(  # every slot, at its volume's size now (a resized one: refused)
                HelloVolume(s.name, m.size, s.state, s.purge, group.labels.get(s.name, s.server))
                for s, m in zip(group.slots, group.volumes, strict=True)
            ),
            retention=group.retention,
            split_brain=split_brain_report(self),
        )

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        s = self.settings
        return await asyncio.wait_for(
            asyncio.open_connection(
                s.host,
                s.port,
                ssl=self.ssl_context,
                server_hostname=(s.server_name or s.host) if self.ssl_context else None,
                limit=STREAM_LIMIT,
            ),
            s.connect_timeout,
        )

    async def _session(self) -> None:
        reader, writer = await self._connect()
        try:
            await self._ship(reader, writer)
        finally:
            writer.close()

    async def _ship(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = self.group
        decoder = wire.FrameDecoder()
        sent = time.time()
        writer.write(wire.encode_control(wire.FrameType.HELLO, self.hello().to_body()))
        await writer.drain()
        answer = await read_frame(reader, decoder, self.settings.connect_timeout)
        received = time.time()
        if not isinstance(answer, wire.Control) or answer.type != wire.FrameType.WELCOME:
            if isinstance(answer, wire.Control) and answer.type == wire.FrameType.REFUSED:
                if answer.body.get("code") in ("promoted", "split_brain"):
                    refused_promoted(self, answer.body, sent, received)
                raise RemoteProtocolError(f"target refused: {answer.body.get('error')}")
            raise RemoteProtocolError("target did not answer HELLO with WELCOME")
        welcome = Welcome.from_body(answer.body)
        fence = group.fence
        interrupted = fence is not None and fence.promoted is None and fence.stage
        if interrupted and (fence.stage == "promoting" or fence.pid != os.getpid()):
            # A planned failover this node started before a restart never promoted
            # the target (it just welcomed us as its source): writes resume here.
            log.warning("group %s: an interrupted planned failover is called off", group.name)
            group.set_fence(None)
        group.generation = welcome.generation or group.generation
        assert welcome.durable_seq is not None  # a steady session's WELCOME has it
        cursor = welcome.durable_seq
        journal = group.journal
        lost = cursor + 1 < journal.tail_seq  # released before the target had them
        ahead = cursor > journal.last_seq  # the target holds writes we never made
        syncing = welcome.state == "syncing"
        dirty: DirtyRegions | None = None
        if not ahead and not syncing:  # what the target holds is acknowledged, overflow or not
            group.on_ack(cursor)
        if group.overflow is not None:  # changes since the journal filled: by region
            dirty, overflow_resume = group.take_overflow()
        if syncing or lost or ahead or dirty is not None:
            if dirty is not None:
                resume, why = overflow_resume, dirty.reason
            else:
                resume = journal.tail_seq - 1 if lost or ahead else cursor
                why = "new replica" if syncing else f"target at seq {cursor}"
            # Only the dirty regions, unless the replica needs everything anyway.
            regions = None if (syncing or lost or ahead) else dirty
            try:
                await resync.push(self, reader, writer, decoder, resume, why, regions)
            except BaseException:
                if dirty is not None:
                    group.give_back_overflow(dirty)
                raise
            if dirty is not None:
                group.overflow_resolved()
            cursor = resume
        group.on_ack(cursor)
        group.connected = True
        group.last_error = ""
        log.info("group %s: shipping to %s from seq %d", group.name, welcome.node, cursor + 1)
        inflight: dict[int, int] = {}  # last seq of a batch -> its wire bytes
        credit = asyncio.Event()
        credit.set()
        last_heard = time.monotonic()

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(min(1.0, self.settings.ack_timeout / 4))
                silent = time.monotonic() - last_heard
                if inflight and silent > self.settings.ack_timeout:
                    raise TimeoutError(f"no acknowledgement for {silent:.0f} s")

        async def receive() -> None:
            nonlocal last_heard
            while True:
                frame = await read_frame(reader, decoder, None)
                if isinstance(frame, wire.Control) and frame.type == wire.FrameType.PROMOTED:
                    if self._failover is not None and not self._failover.done():
                        self._failover.set_result(frame.body)
                    raise FailedOver("promoted at our request")
                if isinstance(frame, wire.Control) and frame.type == wire.FrameType.REFUSED:
                    why = str(frame.body.get("error"))
                    if self._failover is not None and not self._failover.done():
                        self._failover.set_exception(FailoverRefused(f"target: {why}"))
                    raise RemoteProtocolError(f"target refused: {why}")
                if not isinstance(frame, wire.Ack):
                    raise RemoteProtocolError(f"unexpected frame from target: {frame!r}")
                last_heard = time.monotonic()
                group.on_ack(frame.durable_seq)
                for last in [seq for seq in inflight if seq <= frame.durable_seq]:
                    del inflight[last]
                credit.set()

        def next_batch(after: int) -> tuple[list[Record], list[wire.Piece], int]:
            """Read and frame the batch after ``after`` (a worker thread): the
            records, the frame's pieces and its length."""
            records = group.journal.read(after, self.settings.batch_bytes, durable_only=False)
            if not records:
                return records, [], 0
            pieces = wire.batch_pieces(group.id, records, self._compressor)
            return records, pieces, sum(len(p) for p in pieces)

        async def send() -> None:
            nonlocal cursor, last_heard
            loop = asyncio.get_running_loop()
            # The next batch is read and framed while the current one goes out.
            ahead: asyncio.Future[tuple[list[Record], list[wire.Piece], int]] | None = None
            while True:
                if group.overflow is not None:
                    raise _Overflowed()
                if ahead is None:
                    if group.journal.last_seq <= cursor:
                        group.appended.clear()
                        if group.journal.last_seq <= cursor:
                            await group.appended.wait()
                        continue
                    ahead = loop.run_in_executor(None, next_batch, cursor)
                records, frame, frame_len = await ahead
                ahead = None
                if not records:
                    continue
                if group.journal.last_seq > records[-1].seq:
                    ahead = loop.run_in_executor(None, next_batch, records[-1].seq)
                while sum(inflight.values()) >= self.settings.window_bytes:
                    credit.clear()
                    await credit.wait()
                await self._bucket.take(frame_len)
                writer.writelines(frame)
                await writer.drain()
                cursor = records[-1].seq
                if not inflight:
                    last_heard = time.monotonic()  # the clock runs from the first batch out
                inflight[cursor] = frame_len
                group.shipped_bytes += sum(len(r.data) for r in records)
                group.wire_bytes += frame_len

        self._writer = writer
        tasks = [asyncio.ensure_future(c) for c in (receive(), send(), watchdog())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            self._writer = None
            if self._failover is not None and not self._failover.done():
                self._failover.set_exception(
                    RemoteProtocolError("the link to the target broke during the failover")
                )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class FailoverRefused(CheckpointError):
    """The target answered FAILOVER with a refusal: it did not promote itself."""


class _Overflowed(Exception):
    """The journal filled up mid-session: reconnect and resync the dirty regions."""
