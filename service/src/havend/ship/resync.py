"""The hash-compare resync engine: make one side's blocks equal to the
other's, moving only the blocks that differ.

Both directions use it: the push resync (``push``: a replica made equal to
the local copies, before any BATCH of a session) and the pull (``pull``:
the local copies made equal to the promoted target's, at a failback or a
round of reverse protection). Hashes are xxh3-64 of blocks: ``HASH_REQ``
asks the other side for them, ``HASHES`` brings them, in order, and
:func:`differing_ranges` turns two lists of them into the byte ranges to
move (see ``havend.link.wire`` for the frames).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from havend.blockhash import block_hashes, differing_runs, hash_ranges
from havend.errors import RemoteProtocolError
from havend.link import wire
from havend.link.stream import read_frame
from havend.volume import FileVolume

if TYPE_CHECKING:
    from havend.ship.shipper import Shipper
    from havend.ship.source import DirtyRegions

log = logging.getLogger("havend.ship")

# Regions compared with coarse hashes, differing chunks with fine ones.
RESYNC_REGION = 8 << 20
RESYNC_COARSE = 64 << 10
RESYNC_FINE = 4096
RESYNC_FINE_AHEAD = 4  # regions whose fine hashes may be awaited at once (8 MiB each)
SYNC_DATA_MAX = 4 << 20
# Seconds an answer of the other side may take (it reads and hashes a region).
ANSWER_TIMEOUT = 300

Ranges = list[tuple[int, int]]  # (offset, length)


@dataclass(slots=True)
class ResyncProgress:
    reason: str
    total_bytes: int
    done_bytes: int = 0
    sent_bytes: int = 0  # block data sent (or pulled)
    wire_bytes: int = 0  # every resync frame, both directions
    started: float = 0.0

    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if not self.done_bytes or elapsed <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / (self.done_bytes / elapsed)


def differing_ranges(
    ranges: Ranges, ours: list[int], theirs: list[int], granularity: int
) -> Ranges:
    """The byte ranges, within ``ranges``, whose blocks' hashes differ
    (``ours`` and ``theirs``: one per ``granularity`` block of each range, in
    order, the last block of a range possibly shorter)."""
    if len(ours) != len(theirs):
        raise RemoteProtocolError(
            f"{len(theirs)} hashes for ranges of {len(ours)} blocks: not the ranges asked"
        )
    out: Ranges = []
    at = 0
    for offset, length in ranges:
        blocks = (length + granularity - 1) // granularity
        runs = differing_runs(ours[at : at + blocks], theirs[at : at + blocks], granularity)
        out += [(offset + start, min(n, length - start)) for start, n in runs]
        at += blocks
    return out


def split_ranges(ranges: Ranges, most: int) -> Ranges:
    """``ranges`` cut into pieces of at most ``most`` bytes."""
    return [
        (offset + start, min(most, length - start))
        for offset, length in ranges
        for start in range(0, length, most)
    ]


def batches(ranges: Ranges, most: int) -> list[Ranges]:
    """Consecutive ranges grouped so that each group holds at most ``most`` bytes
    (and 4,096 ranges: a HASH_REQ's size stays small)."""
    out: list[Ranges] = []
    total = most
    for offset, length in ranges:
        if total + length > most or len(out[-1]) >= 4096:
            out.append([])
            total = 0
        out[-1].append((offset, length))
        total += length
    return out


class Hashes:
    """The other side's hashes over a link: asked for ahead, answered in order
    (a reply that comes before the one awaited waits here)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        progress: ResyncProgress,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.progress = progress
        self.request = 0
        self._answered: dict[int, list[int]] = {}
        self._pending: dict[int, int] = {}  # request -> blocks it covers

    async def ask(self, volume: int, granularity: int, ranges: Ranges) -> int:
        """Send a HASH_REQ; its request number."""
        self.request += 1
        frame = wire.encode_hash_request(
            wire.HashRequest(self.request, volume, granularity, ranges)
        )
        self._pending[self.request] = sum((n + granularity - 1) // granularity for _, n in ranges)
        self.writer.write(frame)
        await self.writer.drain()
        self.progress.wire_bytes += len(frame)
        return self.request

    async def answer(self, asked: int) -> list[int]:
        """The hashes of request ``asked``, once they are here."""
        while asked not in self._answered:
            reply = await read_frame(self.reader, self.decoder, ANSWER_TIMEOUT)
            if not isinstance(reply, wire.Hashes) or reply.request not in self._pending:
                raise RemoteProtocolError(f"expected HASHES {asked}, got {reply!r}")
            blocks = self._pending.pop(reply.request)
            if len(reply.hashes) != blocks:
                raise RemoteProtocolError(
                    f"HASHES {reply.request} has {len(reply.hashes)} hashes for {blocks} blocks"
                )
            self._answered[reply.request] = reply.hashes
            self.progress.wire_bytes += 4 + 8 * len(reply.hashes)
        return self._answered.pop(asked)


# Push: the replica made equal to the local copies ------------------------------


async def push(
    shipper: Shipper,
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
    group = shipper.group
    loop = asyncio.get_running_loop()
    plan = [
        (index, [(0, member.size)] if regions is None else regions.ranges(index))
        for index, member in enumerate(group.volumes)
        if not member.removed
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

    hashes = Hashes(reader, writer, decoder, progress)

    def read_and_hash(volume: FileVolume, offset: int, length: int) -> tuple[bytes, list[int]]:
        data = volume.read(offset, length)
        return data, block_hashes(data, RESYNC_COARSE)

    # Regions whose fine hashes were asked for: (volume, its data, first
    # byte, the ranges asked, request). Answered later, a few regions on.
    fine: collections.deque[tuple[int, bytes, int, Ranges, int]] = collections.deque()

    async def send_differing() -> None:
        """The oldest region waiting for its fine hashes: send its blocks
        that differ."""
        index, data, offset, ranges, asked = fine.popleft()
        theirs = await hashes.answer(asked)
        view = memoryview(data)
        ours = [h for start, size in ranges for h in _fine_hashes(view, start - offset, size)]
        for start, size in differing_ranges(ranges, ours, theirs, RESYNC_FINE):
            await _send_sync_data(shipper, writer, index, start, view[start - offset :][:size])

    await ask(wire.FrameType.SYNC_BEGIN, {"resume_seq": resume_seq}, wire.FrameType.SYNC_READY)
    for index, ranges in plan:
        member = group.volumes[index]
        pieces = split_ranges(ranges, RESYNC_REGION)
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
                    coarse[ahead] = await hashes.ask(index, RESYNC_COARSE, [pieces[ahead]])
            if mine is None:
                mine = loop.run_in_executor(None, read_and_hash, member.volume, offset, length)
            data, ours = await mine
            mine = None
            if i + 1 < len(pieces):
                mine = loop.run_in_executor(None, read_and_hash, member.volume, *pieces[i + 1])
            theirs = await hashes.answer(coarse.pop(i))
            chunks = differing_ranges([(offset, length)], ours, theirs, RESYNC_COARSE)
            if chunks:
                asked = await hashes.ask(index, RESYNC_FINE, chunks)
                fine.append((index, data, offset, chunks, asked))
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


def _fine_hashes(data: memoryview, start: int, size: int) -> list[int]:
    return block_hashes(data[start : start + size], RESYNC_FINE)


async def _send_sync_data(
    shipper: Shipper, writer: asyncio.StreamWriter, volume: int, offset: int, data: memoryview
) -> None:
    for start in range(0, len(data), SYNC_DATA_MAX):
        piece = data[start : start + SYNC_DATA_MAX]
        frame = wire.encode_sync_data(volume, offset + start, piece)
        await shipper.bucket.take(len(frame))
        writer.write(frame)
        await writer.drain()
        progress = shipper.group.resync
        assert progress is not None
        progress.sent_bytes += len(piece)
        progress.wire_bytes += len(frame)


# Pull: the local copies made equal to the other side's ---------------------------


async def pull(
    shipper: Shipper,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: wire.FrameDecoder,
    regions: list[tuple[int, Ranges]],
    sink: Callable[[int, int, bytes], None],
    *,
    compare: bool = True,
    reason: str = "failback",
) -> tuple[int, int]:
    """Get the target's blocks in ``regions`` ((volume, ranges)) that differ
    from this side's (``compare``: xxh3 of 4 KiB blocks, many ranges per
    round trip; else all of them), each given to ``sink(volume, offset,
    data)`` in a worker thread; (bytes pulled, bytes on the wire)."""
    group = shipper.group
    total = sum(n for _, ranges in regions for _, n in ranges)
    progress = ResyncProgress(reason, total, started=time.monotonic())
    group.resync = progress
    try:
        volumes = group.volumes
        await _pull_regions(reader, writer, decoder, volumes, regions, sink, compare, progress)
        return progress.sent_bytes, progress.wire_bytes
    finally:
        group.resync = None
        group.last_resync = progress


async def _pull_regions(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: wire.FrameDecoder,
    volumes: list,
    regions: list[tuple[int, Ranges]],
    sink: Callable[[int, int, bytes], None],
    compare: bool,
    progress: ResyncProgress,
) -> None:
    loop = asyncio.get_running_loop()
    hashes = Hashes(reader, writer, decoder, progress)
    for index, ranges in regions:
        member = volumes[index]
        for batch in batches(split_ranges(ranges, RESYNC_REGION), RESYNC_REGION):
            size = sum(n for _, n in batch)
            try:
                wanted = batch
                if compare:
                    ours = await loop.run_in_executor(
                        None, hash_ranges, member.volume, batch, RESYNC_FINE
                    )
                    theirs = await hashes.answer(await hashes.ask(index, RESYNC_FINE, batch))
                    wanted = differing_ranges(batch, ours, theirs, RESYNC_FINE)
                if not wanted:
                    continue
                hashes.request += 1
                writer.write(wire.encode_read_request(hashes.request, index, wanted))
                await writer.drain()
                while True:
                    got = await read_frame(reader, decoder, ANSWER_TIMEOUT)
                    if isinstance(got, wire.SyncData):
                        await loop.run_in_executor(None, sink, index, got.offset, got.data)
                        progress.sent_bytes += len(got.data)
                        progress.wire_bytes += len(got.data) + 16
                        continue
                    if isinstance(got, wire.Control) and got.type == wire.FrameType.READ_DONE:
                        break
                    raise RemoteProtocolError(f"expected SYNC_DATA or READ_DONE, got {got!r}")
            finally:  # progress: bytes done and ETA, in the status and the API
                progress.done_bytes += size
