"""The target node's replication listener: one TLS connection per shipping group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from havend.blockhash import hash_ranges
from havend.errors import CheckpointError, NotFound, RemoteProtocolError
from havend.link import wire
from havend.link.hello import Hello, MalformedFrame, Welcome
from havend.link.stream import FrameLink
from havend.target.group import TargetGroup

log = logging.getLogger("havend.target")


class TargetNode:
    """Holds the replica groups of this node and serves sources that ship to it."""

    def __init__(self, name: str, state_dir: str, replica_dir: str) -> None:
        self.name = name
        self.state_dir = state_dir
        self.replica_dir = replica_dir
        self.groups: dict[uuid.UUID, TargetGroup] = {}
        self._appliers: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self._links: dict[uuid.UUID, FrameLink] = {}
        self.on_promoted: Callable[[TargetGroup], Any] | None = None  # serve its volumes
        self.on_demoted: Callable[[TargetGroup], Any] | None = None  # stop serving them
        groups_dir = os.path.join(state_dir, "groups")
        if os.path.isdir(groups_dir):
            for entry in sorted(os.listdir(groups_dir)):
                if entry.startswith("."):  # a creation that did not finish
                    continue
                group = TargetGroup.open(os.path.join(groups_dir, entry))
                self.groups[group.id] = group

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None
    ) -> tuple[str, int]:
        for group in self.groups.values():
            self._start_applier(group)
        # Batches are received straight into buffers of their own (FrameLink).
        self._server = await asyncio.get_running_loop().create_server(
            lambda: FrameLink(self._serve), host, port, ssl=ssl_context
        )
        return self._server.sockets[0].getsockname()[:2]

    def _start_applier(self, group: TargetGroup, delay: float = 0.0) -> None:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            await group.applier()

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda t: self._applier_ended(group, t, delay))
        self._appliers.append(task)

    def _applier_ended(self, group: TargetGroup, task: asyncio.Task[None], delay: float) -> None:
        """An applier only ends by cancellation (close); one that died of an
        error outside a batch (which it retries itself) is started again,
        with back-off, its error in the group's status meanwhile."""
        with contextlib.suppress(ValueError):
            self._appliers.remove(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is None:
            return
        group._apply_failed(exc)
        self._start_applier(group, min(30.0, max(0.5, delay * 2)))

    async def _serve(self, link: FrameLink) -> None:
        peer = link.get_extra_info("peername")
        group: TargetGroup | None = None
        decoder = wire.FrameDecoder()
        try:
            first = await link.read_frame(decoder, timeout=30)
            if not isinstance(first, wire.Control) or first.type != wire.FrameType.HELLO:
                raise RemoteProtocolError("the first frame must be HELLO")
            try:
                hello = Hello.from_body(first.body)
            except MalformedFrame as exc:
                refusal = (
                    "malformed retention in HELLO" if exc.key == "retention" else "malformed HELLO"
                )
                log.warning("source %s refused: %s (%s)", peer, refusal, exc)
                link.write(wire.encode_control(wire.FrameType.REFUSED, {"error": refusal}))
                await link.drain()
                return
            group, refusal = self._admit(hello)
            if refusal:
                log.warning("source %s refused: %s", peer, refusal)
                body: dict = {"error": refusal}
                if group is not None and group.promoted:  # the source must know, exactly
                    # With this clock's time: the source tells whether it wrote
                    # after the promotion (a split brain), and reports it here.
                    promoted = group.promoted.to_dict()
                    body |= {"code": "promoted", "promoted": promoted, "clock": time.time()}
                    report = hello.split_brain
                    split = (
                        group.record_split_brain(report, hello.node)
                        if report is not None
                        else group.records.split_brain
                    )
                    if split is not None:
                        body |= {"code": "split_brain", "split_brain": split.to_dict()}
                        body["error"] = group.split_brain_reason()
                link.write(wire.encode_control(wire.FrameType.REFUSED, body))
                await link.drain()
                group = None
                return
            assert group is not None
            failback = group.promoted is not None  # admitted: a failback session
            # The newest link wins: an older one may be half-dead after a
            # partition (no FIN, no RST) and would block the group forever.
            old = self._links.get(group.id)
            if old is not None and old is not link:
                log.warning("group %s: a new link replaces the old one", group.name)
                old.transport.abort()
                for _ in range(100):
                    if self._links.get(group.id) is not old:
                        break
                    await asyncio.sleep(0.05)
            self._links[group.id] = link
            group.connected = True
            group.peer = hello.node or group.peer
            if hello.resolve is not None:
                await self._resolve(group, hello.resolve, link, decoder)
                return
            if hello.reverse is not None:
                await self._reverse(group, hello.reverse, link, decoder)
                return
            # What the link before this one delivered is durable first (its
            # end synced it, unless that failed): the source then knows exactly
            # what arrived (it declares the checkpoints after durable_seq lost
            # if its journal overflowed).
            await asyncio.get_running_loop().run_in_executor(None, group.journal.sync)
            welcome = Welcome(
                node=self.name,
                durable_seq=group.journal.durable_seq,
                state=group.state,
                generation=group.generation,
            )
            if failback:
                applied, changed = group.begin_failback()
                welcome = replace(welcome, failback=True, applied_seq=applied, changed=changed)
            elif hello.failback is not None:
                done = group.failback_done(str(hello.failback.get("generation")))
                finished = done.to_dict() if done is not None else None
                welcome = replace(welcome, answers_failback=True, failback_done=finished)
            link.write(wire.encode_control(wire.FrameType.WELCOME, welcome.to_body()))
            await link.drain()
            log.info("group %s: receiving from %s", group.name, hello.node)
            # This link's own: a batch another link left unsynced must not make
            # this one acknowledge before its source asks for anything (an ACK
            # before SYNC_READY breaks the resync handshake).
            received = asyncio.Event()
            committer = asyncio.ensure_future(self._commit_and_ack(group, link, received))
            try:
                while True:
                    frame = await link.read_frame(decoder, timeout=None)
                    reply = await self._handle(group, frame, received)
                    if reply:
                        link.write(reply)
                        await link.drain()
                    if committer.done():  # it failed: the link is unusable
                        committer.result()
            finally:
                committer.cancel()
        except asyncio.IncompleteReadError:
            if group is not None:
                log.warning("group %s: source closed the link", group.name)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            if group is not None:
                log.warning("group %s: source link lost: %s", group.name, exc)
        except RemoteProtocolError as exc:
            log.warning("source %s: dropping connection: %s", peer, exc)
        except Exception as exc:  # one link's failure must not go unreported
            log.warning("source %s: link failed: %s: %s", peer, type(exc).__name__, exc)
        finally:
            try:
                if group is not None and self._links.get(group.id) is link:
                    await self._link_ended(group)
            finally:
                if group is not None and self._links.get(group.id) is link:
                    del self._links[group.id]
                    group.connected = False
                    group.abort_resync()
                    if group.promoted:
                        group.abort_failback()
                link.close()

    async def _link_ended(self, group: TargetGroup) -> None:
        """Make durable what the link delivered and its commit did not reach
        (it broke mid-commit): the status then says what the replica holds
        (no received seq above the durable one on an idle group); the
        applier finds those records at its next look (it looks every second
        without a wake-up). A new link of the group waits for this (it waits
        until this link is gone from ``_links``)."""
        if group.journal.durable_seq >= group.journal.last_seq:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, group.journal.sync)
        except OSError as exc:  # the next link's HELLO syncs it again
            log.error("group %s: syncing the journal after the link failed: %s", group.name, exc)

    async def _resolve(
        self,
        group: TargetGroup,
        request: dict[str, Any],
        link: FrameLink,
        decoder: wire.FrameDecoder,
    ) -> None:
        """The old source brings the operator's choice of the side that survives
        a split brain (see ``Shipper.resolve``)."""
        loop = asyncio.get_running_loop()
        done = group.resolution(str(request.get("generation")))
        if done is not None:  # resolved already (an answer that was lost): say so again
            result = done.to_dict() | {"earlier": True}
        elif request.get("survivor") == "recovery":
            result = group.keep_recovery().to_dict()
        else:
            applied, changed = group.begin_failback()  # writes paused; what changed, from where
            welcome = Welcome(node=self.name, resolve=True, changed=changed, applied_seq=applied)
            link.write(wire.encode_control(wire.FrameType.WELCOME, welcome.to_body()))
            await link.drain()
            frame = await link.read_frame(decoder, timeout=300)
            if not isinstance(frame, wire.Control) or frame.type != wire.FrameType.RESOLVE_DONE:
                raise RemoteProtocolError(f"expected RESOLVE_DONE, got {frame!r}")
            replaced = frame.body.get("ranges")
            if not isinstance(replaced, list) or len(replaced) != len(group.volumes):
                raise RemoteProtocolError("RESOLVE_DONE without the ranges of every volume")
            async with group.apply_lock:  # the sequence restarts: the applier stays out
                resolved = await loop.run_in_executor(None, group.keep_production, replaced)
            result = resolved.to_dict()
            if self.on_demoted is not None:
                self.on_demoted(group)
        link.write(wire.encode_control(wire.FrameType.RESOLVED, result))
        await link.drain()

    async def _reverse(
        self,
        group: TargetGroup,
        request: dict,
        link: FrameLink,
        decoder: wire.FrameDecoder,
    ) -> None:
        """A round of reverse protection (see ``TargetGroup.begin_reverse``)."""
        loop = asyncio.get_running_loop()
        base = request.get("base")
        checkpoint, incremental, changed, views = await loop.run_in_executor(
            None, group.begin_reverse, str(base) if base else None
        )
        try:
            assert group.promoted is not None
            welcome = Welcome(
                node=self.name,
                reverse=True,
                checkpoint=checkpoint.to_dict(),
                incremental=incremental,
                changed=changed,
                applied_seq=group.promoted.applied_seq,
            )
            link.write(wire.encode_control(wire.FrameType.WELCOME, welcome.to_body()))
            await link.drain()
            while True:
                frame = await link.read_frame(decoder, timeout=300)
                if isinstance(frame, wire.HashRequest):
                    link.write(await _hashes(views, frame))
                elif isinstance(frame, wire.ReadRequest):
                    await self._send_ranges(group, views, frame)
                    done = {"request": frame.request}
                    link.write(wire.encode_control(wire.FrameType.READ_DONE, done))
                elif isinstance(frame, wire.Control) and frame.type == wire.FrameType.REVERSE_DONE:
                    await loop.run_in_executor(None, group.end_reverse, checkpoint.id)
                    ok = {"checkpoint": checkpoint.id}
                    link.write(wire.encode_control(wire.FrameType.REVERSE_OK, ok))
                    await link.drain()
                    return
                else:
                    raise RemoteProtocolError(f"unexpected frame in a reverse round: {frame!r}")
                await link.drain()
        finally:
            for view in views:
                view.close()

    async def _handle(
        self, group: TargetGroup, frame: wire.Frame, received: asyncio.Event
    ) -> bytes | None:
        """Carry out one frame of a session (``received``: its commit loop's
        event); the bytes to answer with."""
        loop = asyncio.get_running_loop()
        group.last_heard = time.time()
        if isinstance(frame, wire.Batch):
            if frame.group != group.id:
                raise RemoteProtocolError(f"BATCH for another group on {group.name}'s link")
            if group.state == "syncing":
                raise RemoteProtocolError(f"group {group.name} needs a resync before records")
            group.receive(frame.records)
            received.set()  # _commit_and_ack makes them durable and acknowledges
            return None
        if isinstance(frame, wire.HashRequest):
            return await _hashes(group.volumes, frame)
        if isinstance(frame, wire.SyncData):
            await loop.run_in_executor(
                None, group.write_block, frame.volume, frame.offset, frame.data
            )
            return None
        if isinstance(frame, wire.Control) and frame.type == wire.FrameType.SYNC_BEGIN:
            await group.begin_resync(int(frame.body["resume_seq"]))
            log.info("group %s: resync begins", group.name)
            return wire.encode_control(wire.FrameType.SYNC_READY, {})
        if isinstance(frame, wire.Control) and frame.type == wire.FrameType.FAILOVER:
            final_seq = int(frame.body["final_seq"])
            log.warning("group %s: planned failover: promoting at seq %d", group.name, final_seq)
            try:
                promoted = await group.promote(final_seq=final_seq, planned=True)
            except (CheckpointError, NotFound) as exc:  # not promoted: the source un-fences
                log.error("group %s: planned failover refused: %s", group.name, exc)
                return wire.encode_control(wire.FrameType.REFUSED, {"error": str(exc)})
            if self.on_promoted is not None:
                self.on_promoted(group)
            return wire.encode_control(wire.FrameType.PROMOTED, promoted)
        if isinstance(frame, wire.ReadRequest):
            if not group.promoted:
                raise RemoteProtocolError("READ_REQ outside a failback")
            await self._send_ranges(group, group.volumes, frame)
            return wire.encode_control(wire.FrameType.READ_DONE, {"request": frame.request})
        if isinstance(frame, wire.Control) and frame.type == wire.FrameType.FAILBACK_DONE:
            if not group.promoted:
                raise RemoteProtocolError("FAILBACK_DONE outside a failback")
            async with group.apply_lock:  # the sequence restarts: the applier stays out
                done = await loop.run_in_executor(
                    None, group.end_failback, int(frame.body["resume_seq"])
                )
            if self.on_demoted is not None:
                self.on_demoted(group)
            return wire.encode_control(wire.FrameType.FAILBACK_OK, done)
        if isinstance(frame, wire.Control) and frame.type == wire.FrameType.SYNC_END:
            # A fresh journal, then the applied seq moved to the resume seq (in
            # a worker thread): an applier looking in between would read the
            # new journal from the old applied seq, and stop for good.
            async with group.apply_lock:
                await loop.run_in_executor(None, group.end_resync, int(frame.body["high_seq"]))
            log.info(
                "group %s: resync done; consistent at seq %s", group.name, frame.body["high_seq"]
            )
            return wire.encode_control(wire.FrameType.SYNC_DONE, {})
        raise RemoteProtocolError(f"unexpected frame {frame!r}")

    async def _commit_and_ack(
        self, group: TargetGroup, link: FrameLink, received: asyncio.Event
    ) -> None:
        """Group commit on the target: one fdatasync for every batch this link
        received meanwhile (``received`` is set), then one ACK; frames keep
        being read while the disk works."""
        loop = asyncio.get_running_loop()
        acked = -1
        while True:
            await received.wait()
            received.clear()
            await loop.run_in_executor(None, group.journal.sync)
            group.new_records.set()
            if group.journal.durable_seq != acked:
                acked = group.journal.durable_seq
                link.write(wire.encode_ack(group.id, acked))
                await link.drain()

    def _admit(self, hello: Hello) -> tuple[TargetGroup | None, str | None]:
        group_id, name, volumes = hello.group, hello.name, hello.volume_dicts()
        if hello.version != wire.VERSION:
            return None, f"protocol version {hello.version} is not {wire.VERSION}"
        group = self.groups.get(group_id)
        if group is None:
            if not name or "/" in name or name.startswith("."):
                return None, f"bad group name {name!r}"
            if any(g.name == name for g in self.groups.values()):
                return None, f"group name {name!r} is taken by another group on this node"
            group = TargetGroup.create(self.state_dir, self.replica_dir, group_id, name, volumes)
            self.groups[group_id] = group
            self._start_applier(group)
            log.info("group %s: new replica with %d volumes", name, len(volumes))
        elif refusal := group.check_volumes(volumes):
            return group, refusal
        if group.refusing:
            return group, f"group {group.name} is {group.refusing}"
        resolve = hello.resolve
        if resolve is not None:
            generation = str(resolve.get("generation"))
            if resolve.get("survivor") not in ("recovery", "production"):
                return group, f"bad survivor {resolve.get('survivor')!r}"
            if group.resolution(generation) is not None:
                return group, None  # done, but the source did not hear it
            if not group.promoted or generation != group.generation:
                return group, f"no split brain of generation {generation} on {group.name}"
            if group.records.split_brain is None:
                return group, f"group {group.name} is not in a split brain"
            return group, None
        reverse = hello.reverse
        if reverse is not None:
            if not group.promoted or reverse.get("generation") != group.generation:
                return group, f"group {group.name} is not promoted as generation " + str(
                    reverse.get("generation")
                )
            return group, group.split_brain_reason() or None
        failback = hello.failback
        if failback is not None:
            if group.promoted:
                if failback.get("generation") != group.generation:
                    return group, f"failback of generation {failback.get('generation')}, not ours"
                if group.records.split_brain is not None:
                    return group, group.split_brain_reason()
                return group, None
            if group.failback_done(str(failback.get("generation"))) is not None:
                return group, None  # done, but the source did not hear it: WELCOME says so
        if group.hold:
            return group, group.hold
        if hello.retention is not None:
            group.set_retention(hello.retention)
        return group, None

    async def _send_ranges(
        self, group: TargetGroup, volumes: Sequence[Any], frame: wire.ReadRequest
    ) -> None:
        """SYNC_DATA frames with the bytes of every range a READ_REQ asks for."""
        if frame.volume >= len(volumes):
            raise RemoteProtocolError("READ_REQ for an unknown volume")
        volume = volumes[frame.volume]
        loop = asyncio.get_running_loop()
        for offset, length in frame.ranges:
            if offset + length > volume.size or length > wire.MAX_FRAME // 2:
                raise RemoteProtocolError("READ_REQ outside the volume")
            data = await loop.run_in_executor(None, volume.read, offset, length)
            self._send_now(group, wire.encode_sync_data(frame.volume, offset, data))

    def _send_now(self, group: TargetGroup, frame: bytes) -> None:
        link = self._links.get(group.id)
        if link is not None:
            link.write(frame)

    def drop_link(self, group: TargetGroup) -> None:
        """End the group's replication link now (a rollback refuses its records)."""
        link = self._links.get(group.id)
        if link is not None:
            link.transport.abort()

    def group_named(self, name: str) -> TargetGroup:
        for group in self.groups.values():
            if group.name == name:
                return group
        raise NotFound(f"no group {name!r} on this node")

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        appliers = list(self._appliers)
        for task in appliers:
            task.cancel()
        await asyncio.gather(*appliers, return_exceptions=True)
        for group in self.groups.values():
            group.close()


async def _hashes(volumes: Sequence[Any], frame: wire.HashRequest) -> bytes:
    """The HASHES answer to a HASH_REQ over ``volumes``."""
    if frame.volume >= len(volumes):
        raise RemoteProtocolError("HASH_REQ for an unknown volume")
    try:
        hashes = await asyncio.get_running_loop().run_in_executor(
            None, hash_ranges, volumes[frame.volume], frame.ranges, frame.granularity
        )
    except ValueError as exc:
        raise RemoteProtocolError(str(exc)) from None
    return wire.encode_hashes(frame.request, hashes)
