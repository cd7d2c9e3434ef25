"""Shipping a group's journal to its target: batches, compression, credits,
a bandwidth cap, and reconnecting until stopped.

A session starts with HELLO; the target's WELCOME says the last seq it holds
durably, and shipping resumes right after it, so a batch lost with a broken
connection is simply sent again (the target skips seqs it already has). Records are shipped
as soon as they are appended (see ``ship.source`` for why that is safe).
"""

from __future__ import annotations

import asyncio
import collections
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

from havend.blockhash import block_hashes, differing_runs, hash_ranges
from havend.errors import CheckpointError, JournalError, RemoteProtocolError
from havend.journal.record import Record
from havend.link import wire
from havend.link.stream import STREAM_LIMIT, read_frame
from havend.ship.source import DirtyRegions, SourceGroup, call_in, running_loop
from havend.volume import FileVolume

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


# Resync: regions compared with coarse hashes, differing chunks with fine ones.
RESYNC_REGION = 8 << 20
RESYNC_COARSE = 64 << 10
RESYNC_FINE = 4096
RESYNC_FINE_AHEAD = 4  # regions whose fine hashes may be awaited at once (8 MiB each)
SYNC_DATA_MAX = 4 << 20


@dataclass(slots=True)
class ResyncProgress:
    reason: str
    total_bytes: int
    done_bytes: int = 0
    sent_bytes: int = 0  # block data sent
    wire_bytes: int = 0  # every resync frame, both directions
    started: float = 0.0

    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if not self.done_bytes or elapsed <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / (self.done_bytes / elapsed)


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
        main = asyncio.get_running_loop()
        own = type(main)()  # uvloop.Loop or asyncio's selector loop
        self._loop = own
        self.group.bind_shipper(own)

        def loop_thread() -> None:
            asyncio.set_event_loop(own)
            try:
                own.run_forever()
                own.run_until_complete(own.shutdown_default_executor())
            finally:
                own.close()

        self._thread = threading.Thread(
            target=loop_thread, name=f"havend-ship-{self.group.name}", daemon=True
        )
        self._thread.start()
        running = asyncio.run_coroutine_threadsafe(self.run(), own)
        running.add_done_callback(lambda _: own.call_soon_threadsafe(own.stop))
        return asyncio.wrap_future(running, loop=main)

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
        if self._here():
            return await work
        assert self._loop is not None
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(work, self._loop)  # type: ignore[arg-type]
        )

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
        group = self.group
        fence = group.fence or {}
        promoted = fence.get("promoted")
        if not promoted:
            raise CheckpointError(f"group {group.name} has not failed over: nothing to fail back")
        if fence.get("split_brain"):
            raise CheckpointError(
                f"group {group.name} is in a split brain: choose the surviving side first "
                "(havend group resolve --survivor recovery|production)"
            )
        return await self._exclusive_session(
            lambda reader, writer: self._failback(reader, writer, promoted), timeout
        )

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

    async def _failback(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, promoted: dict
    ) -> dict:
        group = self.group
        loop = asyncio.get_running_loop()
        decoder = wire.FrameDecoder()
        started = time.monotonic()
        writer.write(
            wire.encode_control(
                wire.FrameType.HELLO,
                self._hello() | {"failback": {"generation": promoted["generation"]}},
            )
        )
        await writer.drain()
        welcome = await read_frame(reader, decoder, self.settings.connect_timeout)
        finished = welcome.body.get("failback_done") if isinstance(welcome, wire.Control) else None
        if finished:  # the target switched back but we did not hear it: finish here
            resume = int(finished["resume_seq"])
            if resume != group.journal.last_seq:
                raise CheckpointError(
                    f"the target finished a failback at seq {resume}, this side is at "
                    f"{group.journal.last_seq}: resolve by hand"
                )
            await loop.run_in_executor(None, group.finish_failback, resume)
            group.set_fence(None)
            group.on_ack(resume)
            log.warning(
                "group %s: failback had finished on the target at seq %d", group.name, resume
            )
            return {
                "group": group.name,
                "resume_seq": resume,
                "finished_earlier": True,
                "generation": welcome.body.get("generation"),
            }
        if not isinstance(welcome, wire.Control) or not welcome.body.get("failback"):
            why = welcome.body.get("error") if isinstance(welcome, wire.Control) else welcome
            raise CheckpointError(f"the target refused the failback: {why}")
        applied = int(welcome.body["applied_seq"])
        # The delta: what either side changed since the promotion.
        delta, changed_there, unshipped = group.promotion_delta(
            welcome.body["changed"], applied, "failback"
        )
        regions = [(i, delta.ranges(i)) for i in range(len(group.volumes))]
        delta_bytes = sum(n for _, ranges in regions for _, n in ranges)
        # Keep what only this side has before overwriting it: a recoverable snapshot.
        snapshot = await loop.run_in_executor(
            None, group.snapshot_before_failback, promoted["generation"], regions
        )
        pulled, wire_bytes = await self._pull(
            reader,
            writer,
            decoder,
            regions,
            lambda index, offset, data: group.volumes[index].volume.write(offset, data),
        )
        # Equal now: the journal's unshipped records are superseded (never replayed).
        resume = group.journal.last_seq
        await loop.run_in_executor(None, group.finish_failback, resume)
        writer.write(wire.encode_control(wire.FrameType.FAILBACK_DONE, {"resume_seq": resume}))
        await writer.drain()
        done = await read_frame(reader, decoder, 300)
        if not isinstance(done, wire.Control) or done.type != wire.FrameType.FAILBACK_OK:
            raise RemoteProtocolError(f"expected FAILBACK_OK, got {done!r}")
        group.set_fence(None)
        group.on_ack(resume)
        log.warning(
            "group %s: failback done: %d bytes pulled of %d changed (%d compared), resume at "
            "seq %d; replication back to normal",
            group.name,
            pulled,
            changed_there + unshipped,
            delta_bytes,
            resume,
        )
        return {
            "group": group.name,
            "resume_seq": resume,
            "changed_on_target_bytes": changed_there,
            "unshipped_here_bytes": unshipped,
            "compared_bytes": delta_bytes,
            "pulled_bytes": pulled,
            "wire_bytes": wire_bytes,
            "snapshot": snapshot,
            "generation": done.body.get("generation"),
            "seconds": round(time.monotonic() - started, 3),
        }

    async def _pull(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        regions: list[tuple[int, list[tuple[int, int]]]],
        sink: Callable[[int, int, bytes], None],
        *,
        compare: bool = True,
        reason: str = "failback",
    ) -> tuple[int, int]:
        """Get the target's blocks in ``regions`` ((volume, ranges)) that differ
        from this side's (``compare``: xxh3 of 4 KiB blocks, many ranges per
        round trip; else all of them), each given to ``sink(volume, offset,
        data)`` in a worker thread; (bytes pulled, bytes on the wire)."""
        group = self.group
        total = sum(n for _, ranges in regions for _, n in ranges)
        progress = ResyncProgress(reason, total, started=time.monotonic())
        group.resync = progress
        try:
            return await self._pull_regions(
                reader, writer, decoder, regions, sink, compare, progress
            )
        finally:
            group.resync = None
            group.last_resync = progress

    async def _pull_regions(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        regions: list[tuple[int, list[tuple[int, int]]]],
        sink: Callable[[int, int, bytes], None],
        compare: bool,
        progress: ResyncProgress,
    ) -> tuple[int, int]:
        group = self.group
        loop = asyncio.get_running_loop()
        request, pulled, wire_bytes = 0, 0, 0
        for index, ranges in regions:
            member = group.volumes[index]
            for batch in _batches(_split(ranges, RESYNC_REGION), RESYNC_REGION):
                size = sum(n for _, n in batch)
                try:
                    wanted = batch
                    if compare:
                        ours = await loop.run_in_executor(
                            None, hash_ranges, member.volume, batch, RESYNC_FINE
                        )
                        request += 1
                        frame = wire.encode_hash_request(
                            wire.HashRequest(request, index, RESYNC_FINE, batch)
                        )
                        writer.write(frame)
                        await writer.drain()
                        reply = await read_frame(reader, decoder, 300)
                        if not isinstance(reply, wire.Hashes) or reply.request != request:
                            raise RemoteProtocolError(f"expected HASHES {request}, got {reply!r}")
                        if len(reply.hashes) != len(ours):
                            raise RemoteProtocolError("HASHES does not match the ranges asked")
                        wire_bytes += len(frame) + 4 + 8 * len(reply.hashes)
                        wanted, at = [], 0
                        for offset, length in batch:
                            blocks = (length + RESYNC_FINE - 1) // RESYNC_FINE
                            runs = differing_runs(
                                ours[at : at + blocks], reply.hashes[at : at + blocks], RESYNC_FINE
                            )
                            wanted += [(offset + a, min(n, length - a)) for a, n in runs]
                            at += blocks
                    if not wanted:
                        continue
                    request += 1
                    writer.write(wire.encode_read_request(request, index, wanted))
                    await writer.drain()
                    while True:
                        got = await read_frame(reader, decoder, 300)
                        if isinstance(got, wire.SyncData):
                            await loop.run_in_executor(None, sink, index, got.offset, got.data)
                            pulled += len(got.data)
                            wire_bytes += len(got.data) + 16
                            continue
                        if isinstance(got, wire.Control) and got.type == wire.FrameType.READ_DONE:
                            break
                        raise RemoteProtocolError(f"expected SYNC_DATA or READ_DONE, got {got!r}")
                finally:  # progress: bytes done and ETA, in the status and the API
                    progress.done_bytes += size
                    progress.sent_bytes = pulled
                    progress.wire_bytes = wire_bytes

        return pulled, wire_bytes

    async def reverse_round(self, timeout: float) -> dict:
        """Reverse protection while failed over: pull what the recovery side
        changed since the last round, as of a new checkpoint of it (staged,
        then applied here), so losing that side too loses one round at most.
        The first round also saves this side's unshipped writes (the
        failback's snapshot) before the recovery side's data replaces them."""
        group = self.group
        fence = group.fence or {}
        promoted = fence.get("promoted")
        if not promoted:
            raise CheckpointError(f"group {group.name} has not failed over: nothing to protect")
        if fence.get("split_brain"):
            raise CheckpointError(f"group {group.name} is in a split brain: resolve it first")
        return await self._exclusive_session(
            lambda reader, writer: self._reverse(reader, writer, promoted), timeout, wake=False
        )

    async def _reverse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, promoted: dict
    ) -> dict:
        group = self.group
        loop = asyncio.get_running_loop()
        decoder = wire.FrameDecoder()
        started = time.monotonic()
        base = ((group.fence or {}).get("reverse") or {}).get("checkpoint")
        request = {"generation": promoted["generation"], "base": base}
        writer.write(
            wire.encode_control(wire.FrameType.HELLO, self._hello() | {"reverse": request})
        )
        await writer.drain()
        welcome = await read_frame(reader, decoder, self.settings.connect_timeout)
        if not isinstance(welcome, wire.Control) or not welcome.body.get("reverse"):
            why = welcome.body.get("error") if isinstance(welcome, wire.Control) else welcome
            raise CheckpointError(f"the target refused reverse protection: {why}")
        checkpoint = welcome.body["checkpoint"]
        incremental = bool(welcome.body["incremental"])
        regions: list[tuple[int, list[tuple[int, int]]]] = []
        snapshot = None
        if incremental:  # exactly the blocks written there since the last round
            regions = [
                (i, [(int(o), int(n)) for o, n in r]) for i, r in enumerate(welcome.body["changed"])
            ]
        else:  # the first round: what either side changed since the promotion
            delta, _, _ = group.promotion_delta(
                welcome.body["changed"], int(welcome.body["applied_seq"]), "reverse protection"
            )
            regions = [(i, delta.ranges(i)) for i in range(len(group.volumes))]
            snapshot = await loop.run_in_executor(
                None, group.snapshot_before_failback, promoted["generation"], regions
            )
        staging = group.reverse_staging()
        try:
            pulled, wire_bytes = await self._pull(
                reader,
                writer,
                decoder,
                regions,
                lambda index, offset, data: group.stage(staging, index, offset, data),
                compare=not incremental,
                reason="reverse protection",
            )
        except BaseException:
            staging.close()
            raise
        round_ = {
            "checkpoint": checkpoint["id"],
            "checkpoint_time": checkpoint["time"],
            "incremental": incremental,
            "compared_bytes": sum(n for _, ranges in regions for _, n in ranges),
            "pulled_bytes": pulled,
            "wire_bytes": wire_bytes,
            "time": time.time(),
            "seconds": round(time.monotonic() - started, 3),
        }
        await loop.run_in_executor(None, group.apply_reverse, staging, round_)
        writer.write(
            wire.encode_control(wire.FrameType.REVERSE_DONE, {"checkpoint": checkpoint["id"]})
        )
        await writer.drain()
        done = await read_frame(reader, decoder, 300)
        if not isinstance(done, wire.Control) or done.type != wire.FrameType.REVERSE_OK:
            raise RemoteProtocolError(f"expected REVERSE_OK, got {done!r}")
        log.info(
            "group %s: reverse protection: the recovery side as of %s pulled (%d bytes, %s) "
            "in %.2f s",
            group.name,
            checkpoint["id"],
            pulled,
            "incremental" if incremental else "first round",
            round_["seconds"],
        )
        return {"group": group.name, "snapshot": snapshot} | round_

    async def resolve(self, survivor: str, timeout: float) -> dict:
        """End a split brain with the operator's choice of the copy that lives on.

        ``recovery``: the promoted side's; this side stays failed over (its
        writes after the promotion are kept by the failback's snapshot, as any
        unshipped write). ``production``: this side's; the target saves what
        it changed since the promotion in a snapshot, becomes a replica again,
        and the blocks either side changed are resynced from here (by hash).
        """
        group = self.group
        fence = group.fence or {}
        split = fence.get("split_brain")
        if not split:
            raise CheckpointError(f"group {group.name} is not in a split brain")
        if survivor not in ("recovery", "production"):
            raise CheckpointError(f"survivor must be recovery or production, not {survivor!r}")
        return await self._exclusive_session(
            lambda reader, writer: self._resolve(reader, writer, fence, survivor), timeout
        )

    async def _resolve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fence: dict,
        survivor: str,
    ) -> dict:
        group = self.group
        decoder = wire.FrameDecoder()
        generation = fence["promoted"]["generation"]
        request = {"generation": generation, "survivor": survivor}
        writer.write(
            wire.encode_control(wire.FrameType.HELLO, self._hello() | {"resolve": request})
        )
        await writer.drain()
        answer = await read_frame(reader, decoder, self.settings.connect_timeout)
        if not isinstance(answer, wire.Control) or answer.type not in (
            wire.FrameType.WELCOME,
            wire.FrameType.RESOLVED,
        ):
            why = answer.body.get("error") if isinstance(answer, wire.Control) else answer
            raise CheckpointError(f"the target refused to resolve the split brain: {why}")
        if answer.type == wire.FrameType.WELCOME:  # production survives: the target's delta
            with group.lock:
                if group.overflow is None:
                    group.enter_overflow(reason="split brain resolved for production")
                overflow = group.overflow
                assert overflow is not None
                delta, _, _ = group.promotion_delta(
                    answer.body["changed"], int(answer.body.get("applied_seq", 0)), overflow.reason
                )
                overflow.merge(delta)
                replaced = [overflow.ranges(i) for i in range(len(group.volumes))]
            # Durable here (the overflow flag) before the target forgets its changes;
            # it keeps what it has in every range the resync may replace.
            done = {"ranges": replaced}
            writer.write(wire.encode_control(wire.FrameType.RESOLVE_DONE, done))
            await writer.drain()
            answer = await read_frame(reader, decoder, 300)
            if not isinstance(answer, wire.Control) or answer.type != wire.FrameType.RESOLVED:
                raise RemoteProtocolError(f"expected RESOLVED, got {answer!r}")
        result = dict(answer.body)
        chosen = result.get("survivor", survivor)
        group.forget_reclaim()
        if chosen == "production":
            group.set_fence(None)
            log.warning(
                "group %s: split brain resolved: production survives; the target is a replica "
                "again (its changes saved in %s); resyncing the blocks either side changed",
                group.name,
                (result.get("snapshot") or {}).get("directory"),
            )
        else:
            settled = {k: v for k, v in fence.items() if k != "split_brain"}
            settled["reason"] = (
                f"failed over to generation {generation} (a split brain resolved for the "
                "recovery side; this side's later writes are kept by the failback's snapshot)"
            )
            settled["split_brain_resolved"] = fence["split_brain"] | {"survivor": "recovery"}
            group.set_fence(settled)
            log.warning(
                "group %s: split brain resolved: the recovery side survives; fail back when ready",
                group.name,
            )
        return {"group": group.name, "survivor": chosen, "generation": generation} | result

    async def request_failover(self, final_seq: int, timeout: float) -> dict:
        """Planned failover, once the group is fenced and drained to ``final_seq``:
        ask the target to promote itself there; its promotion record."""
        return await self._there(self._request_failover(final_seq, timeout))

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
            except _FailedOver as exc:  # nothing to ship until failback: ask rarely
                group.last_error = f"failed over: {exc}"
                self._wake.clear()
                every = self.settings.reverse_interval or self.settings.max_backoff * 6
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), every)
                fence = group.fence or {}
                if self.settings.reverse_interval and fence.get("promoted"):
                    try:
                        await self.reverse_round(timeout=max(300, 10 * every))
                    except Exception as exc:  # the next round tries again
                        group.last_error = f"reverse protection: {type(exc).__name__}: {exc}"
                        log.warning("group %s: %s", group.name, group.last_error)
                continue
            except _SplitBrain:
                continue  # at once: the target must learn of it and fence itself too
            except _Overflowed:
                log.info(
                    "group %s: reconnecting to resync the regions written meanwhile", group.name
                )
                backoff = self.settings.min_backoff
                continue
            except Exception as exc:  # a shipper must outlive any one failure
                # e.g. uvloop raises RuntimeError writing to a transport it saw reset.
                group.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("group %s: link failed (%s); retrying", group.name, group.last_error)
            except (OSError, asyncio.IncompleteReadError, RemoteProtocolError, ssl.SSLError) as exc:
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

    def _hello(self) -> dict:
        group = self.group
        return {
            "version": wire.VERSION,
            "node": self.node_name,
            "group": str(group.id),
            "name": group.name,
            "mode": group.mode,
            "volumes": [{"name": v.name, "size": v.size} for v in group.volumes],
            "retention": group.retention.to_dict(),
        } | self._split_brain_report()

    def _split_brain_report(self) -> dict:
        """While this side is fenced in a split brain: what it wrote after the
        promotion, for the target to record (and fence itself)."""
        split = (self.group.fence or {}).get("split_brain")
        if not split:
            return {}
        return {
            "split_brain": {"generation": split["generation"], "production": split["production"]}
        }

    def _refused_promoted(self, body: dict, sent: float, received: float) -> None:
        """The target is promoted: fence this side, and tell whether it took
        writes after the promotion (a split brain) by comparing the two clocks:
        the target's, as it answered, against this one's midway through the
        round trip (the error is at most half of it)."""
        group = self.group
        promoted = dict(body.get("promoted") or {})
        if body.get("code") == "split_brain":
            group.split_brain_recorded(promoted, dict(body.get("split_brain") or {}))
            raise _FailedOver("split brain: " + str(body.get("error")))
        fence = group.fence or {}
        known = (fence.get("promoted") or {}).get("generation") == promoted.get("generation")
        reclaimed = group.reclaimed()
        if not known and reclaimed and reclaimed.get("generation") == promoted.get("generation"):
            # Production resumed here while that side was out of reach: both live.
            offset = float(body.get("clock", received)) - (sent + received) / 2
            group.split_brain(promoted, float(reclaimed["time"]), offset, received - sent)
            raise _SplitBrain()
        if not known and "clock" in body and group.last_write_time is not None:
            offset = float(body["clock"]) - (sent + received) / 2
            # The latest the promotion can have been on this clock: the target
            # read its clock anywhere within the round trip (it may have been
            # busy before answering), so the midpoint is off by up to half of
            # it. A write before this is an ordinary loss (kept at failback);
            # only one certainly after the promotion makes a split brain.
            since = float(promoted["time"]) - offset + (received - sent) / 2
            if group.last_write_time >= since:
                group.split_brain(promoted, since, offset, received - sent)
                raise _SplitBrain()  # report it to the target at once
        group.promoted_elsewhere(promoted)
        raise _FailedOver(str(body.get("error")))

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

    async def _resync(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        resume_seq: int,
        why: str,
        regions: DirtyRegions | None = None,
    ) -> None:
        """Make the replica equal to the local copies (or to their ``regions``),
        sending only differing blocks.

        Blocks are read without the group lock: a write racing a read has a seq
        after ``resume_seq``, so the records shipped after the pass fix it up.
        """
        group = self.group
        loop = asyncio.get_running_loop()
        plan = [
            (index, [(0, member.size)] if regions is None else regions.ranges(index))
            for index, member in enumerate(group.volumes)
        ]
        total = sum(n for _, ranges in plan for _, n in ranges)
        progress = ResyncProgress(why, total, started=time.monotonic())
        group.resync = progress
        log.info("group %s: resync (%s) of %d bytes begins", group.name, why, progress.total_bytes)

        async def ask(kind: wire.FrameType, body: dict, answer: wire.FrameType) -> None:
            writer.write(wire.encode_control(kind, body))
            await writer.drain()
            # Generous: SYNC_DONE waits for the target to apply a whole staged resync.
            frame = await read_frame(reader, decoder, 3600)
            if not isinstance(frame, wire.Control) or frame.type != answer:
                raise RemoteProtocolError(f"expected {answer.name}, got {frame!r}")

        # The target answers in order; replies that come before the one awaited
        # (a look-ahead request's) wait here.
        answered: dict[int, list[int]] = {}
        pending: set[int] = set()
        request = 0

        async def ask_hashes(volume: int, block: int, ranges: list[tuple[int, int]]) -> int:
            nonlocal request
            request += 1
            frame = wire.encode_hash_request(wire.HashRequest(request, volume, block, ranges))
            pending.add(request)
            writer.write(frame)
            await writer.drain()
            progress.wire_bytes += len(frame)
            return request

        async def hashes_of(asked: int) -> list[int]:
            while asked not in answered:
                reply = await read_frame(reader, decoder, 300)
                if not isinstance(reply, wire.Hashes) or reply.request not in pending:
                    raise RemoteProtocolError(f"expected HASHES {asked}, got {reply!r}")
                pending.discard(reply.request)
                answered[reply.request] = reply.hashes
                progress.wire_bytes += 4 + 8 * len(reply.hashes)
            return answered.pop(asked)

        def read_and_hash(volume: FileVolume, offset: int, length: int) -> tuple[bytes, list[int]]:
            data = volume.read(offset, length)
            return data, block_hashes(data, RESYNC_COARSE)

        # Regions whose fine hashes were asked for: (volume, its data, first
        # byte, the ranges asked, request). Answered later, a few regions on.
        fine: collections.deque[tuple[int, bytes, int, list[tuple[int, int]], int]]
        fine = collections.deque()

        async def send_differing() -> None:
            """The oldest region waiting for its fine hashes: send its blocks
            that differ."""
            index, data, offset, ranges, asked = fine.popleft()
            theirs_fine = await hashes_of(asked)
            pos = 0
            for start, size in ranges:
                part = memoryview(data)[start - offset : start - offset + size]
                ours_fine = block_hashes(part, RESYNC_FINE)
                count = len(ours_fine)
                runs = differing_runs(ours_fine, theirs_fine[pos : pos + count], RESYNC_FINE)
                pos += count
                for run_start, run_len in runs:
                    await self._send_sync_data(
                        writer, index, start + run_start, part[run_start : run_start + run_len]
                    )

        await ask(wire.FrameType.SYNC_BEGIN, {"resume_seq": resume_seq}, wire.FrameType.SYNC_READY)
        for index, ranges in plan:
            member = group.volumes[index]
            pieces = _split(ranges, RESYNC_REGION)
            # Pipelined, so that no round trip waits for another: the target
            # hashes its copy of a region (and of the next one) while this side
            # reads and hashes its own, the next region is read here while this
            # one is compared, and the fine hashes of a region are answered
            # while the next regions are compared.
            coarse: dict[int, int] = {}  # piece -> request
            mine: asyncio.Future[tuple[bytes, list[int]]] | None = None
            for i, (offset, length) in enumerate(pieces):
                for ahead in range(i, min(i + 2, len(pieces))):
                    if ahead not in coarse:
                        coarse[ahead] = await ask_hashes(index, RESYNC_COARSE, [pieces[ahead]])
                if mine is None:
                    mine = loop.run_in_executor(None, read_and_hash, member.volume, offset, length)
                data, ours = await mine
                mine = None
                if i + 1 < len(pieces):
                    mine = loop.run_in_executor(None, read_and_hash, member.volume, *pieces[i + 1])
                theirs = await hashes_of(coarse.pop(i))
                chunks = differing_runs(ours, theirs, RESYNC_COARSE)
                if chunks:
                    ranges = [(offset + s, min(n, length - s)) for s, n in chunks]
                    asked = await ask_hashes(index, RESYNC_FINE, ranges)
                    fine.append((index, data, offset, ranges, asked))
                    if len(fine) > RESYNC_FINE_AHEAD:
                        await send_differing()
                progress.done_bytes += length
        while fine:
            await send_differing()
        await ask(
            wire.FrameType.SYNC_END, {"high_seq": group.journal.last_seq}, wire.FrameType.SYNC_DONE
        )
        log.info(
            "group %s: resync done: %d bytes compared, %d bytes of blocks sent (%d on the wire) "
            "in %.1f s",
            group.name,
            progress.total_bytes,
            progress.sent_bytes,
            progress.wire_bytes,
            time.monotonic() - progress.started,
        )
        group.resync = None
        group.last_resync = progress

    async def _send_sync_data(
        self, writer: asyncio.StreamWriter, volume: int, offset: int, data: memoryview
    ) -> None:
        for start in range(0, len(data), SYNC_DATA_MAX):
            piece = data[start : start + SYNC_DATA_MAX]
            frame = wire.encode_sync_data(volume, offset + start, piece)
            await self._bucket.take(len(frame))
            writer.write(frame)
            await writer.drain()
            progress = self.group.resync
            assert progress is not None
            progress.sent_bytes += len(piece)
            progress.wire_bytes += len(frame)

    async def _ship(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = self.group
        decoder = wire.FrameDecoder()
        sent = time.time()
        writer.write(wire.encode_control(wire.FrameType.HELLO, self._hello()))
        await writer.drain()
        welcome = await read_frame(reader, decoder, self.settings.connect_timeout)
        received = time.time()
        if not isinstance(welcome, wire.Control) or welcome.type != wire.FrameType.WELCOME:
            if isinstance(welcome, wire.Control) and welcome.type == wire.FrameType.REFUSED:
                if welcome.body.get("code") in ("promoted", "split_brain"):
                    self._refused_promoted(welcome.body, sent, received)
                raise RemoteProtocolError(f"target refused: {welcome.body.get('error')}")
            raise RemoteProtocolError("target did not answer HELLO with WELCOME")
        fence = group.fence
        interrupted = fence and not fence.get("promoted") and fence.get("stage")
        if interrupted and (fence.get("stage") == "promoting" or fence.get("pid") != os.getpid()):
            # A planned failover this node started before a restart never promoted
            # the target (it just welcomed us as its source): writes resume here.
            log.warning("group %s: an interrupted planned failover is called off", group.name)
            group.set_fence(None)
        group.generation = welcome.body.get("generation") or group.generation
        cursor = int(welcome.body["durable_seq"])
        journal = group.journal
        lost = cursor + 1 < journal.tail_seq  # released before the target had them
        ahead = cursor > journal.last_seq  # the target holds writes we never made
        syncing = welcome.body.get("state") == "syncing"
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
                await self._resync(reader, writer, decoder, resume, why, regions)
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
        log.info(
            "group %s: shipping to %s from seq %d", group.name, welcome.body.get("node"), cursor + 1
        )
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
                    raise _FailedOver("promoted at our request")
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


def _batches(ranges: list[tuple[int, int]], most: int) -> list[list[tuple[int, int]]]:
    """Consecutive ranges grouped so that each group holds at most ``most`` bytes
    (and 4,096 ranges: a HASH_REQ's size stays small)."""
    out: list[list[tuple[int, int]]] = []
    total = most
    for offset, length in ranges:
        if total + length > most or len(out[-1]) >= 4096:
            out.append([])
            total = 0
        out[-1].append((offset, length))
        total += length
    return out


def _split(ranges: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    return [
        (offset + start, min(most, length - start))
        for offset, length in ranges
        for start in range(0, length, most)
    ]


class FailoverRefused(CheckpointError):
    """The target answered FAILOVER with a refusal: it did not promote itself."""


class _FailedOver(Exception):
    """The target was promoted: this group is fenced here until failback."""


class _SplitBrain(Exception):
    """This side took writes after the target's promotion: both sides fenced."""


class _Overflowed(Exception):
    """The journal filled up mid-session: reconnect and resync the dirty regions."""
