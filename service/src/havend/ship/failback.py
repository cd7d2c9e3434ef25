"""Sessions that bring data home from the promoted target: the failback
(pull what either side changed since the promotion, then make the target a
replica again) and the rounds of reverse protection while failed over (pull
what the recovery side changed, as of one of its checkpoints, staged then
applied). Both pull with the resync engine (``ship.resync.pull``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from havend.errors import CheckpointError, RemoteProtocolError
from havend.link import wire
from havend.link.hello import Welcome
from havend.link.promotion import Promoted
from havend.link.stream import read_frame
from havend.ship.records import ReverseRound
from havend.ship.resync import pull

if TYPE_CHECKING:
    from havend.ship.shipper import Shipper

log = logging.getLogger("havend.ship")


async def _hello(
    shipper: Shipper,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    **session: dict[str, Any],
) -> tuple[wire.FrameDecoder, Welcome | None, wire.Frame]:
    """Open a session of its own: the group's HELLO with what the session is
    for (``failback=`` or ``reverse=``, the request); (the session's decoder,
    the target's WELCOME or None, its answer as it came)."""
    decoder = wire.FrameDecoder()
    hello = replace(shipper.hello(), **session)
    writer.write(wire.encode_control(wire.FrameType.HELLO, hello.to_body()))
    await writer.drain()
    answer = await read_frame(reader, decoder, shipper.settings.connect_timeout)
    if isinstance(answer, wire.Control) and answer.type == wire.FrameType.WELCOME:
        return decoder, Welcome.from_body(answer.body), answer
    return decoder, None, answer


def _refusal(answer: wire.Frame) -> object:
    """Why the target did not welcome a session (its words, or its frame)."""
    return answer.body.get("error") if isinstance(answer, wire.Control) else answer


async def failback_session(
    shipper: Shipper,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    promoted: Promoted,
) -> dict:
    group = shipper.group
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    request = {"generation": promoted.generation}
    decoder, welcome, answer = await _hello(shipper, reader, writer, failback=request)
    finished = welcome.failback_done if welcome is not None else None
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
        log.warning("group %s: failback had finished on the target at seq %d", group.name, resume)
        return {
            "group": group.name,
            "resume_seq": resume,
            "finished_earlier": True,
            "generation": welcome.generation if welcome is not None else None,
        }
    if welcome is None or not welcome.failback:
        raise CheckpointError(f"the target refused the failback: {_refusal(answer)}")
    assert welcome.applied_seq is not None and welcome.changed is not None
    applied = welcome.applied_seq
    # The delta: what either side changed since the promotion.
    delta, changed_there, unshipped = group.promotion_delta(welcome.changed, applied, "failback")
    regions = [(i, delta.ranges(i)) for i in range(len(group.volumes))]
    delta_bytes = sum(n for _, ranges in regions for _, n in ranges)
    # Keep what only this side has before overwriting it: a recoverable snapshot.
    snapshot = await loop.run_in_executor(
        None, group.snapshot_before_failback, promoted.generation, regions
    )
    pulled, wire_bytes = await pull(
        shipper,
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


async def reverse_session(
    shipper: Shipper,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    promoted: Promoted,
) -> dict:
    group = shipper.group
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    fence = group.fence
    base = fence.reverse.checkpoint if fence is not None and fence.reverse is not None else None
    request = {"generation": promoted.generation, "base": base}
    decoder, welcome, answer = await _hello(shipper, reader, writer, reverse=request)
    if welcome is None or not welcome.reverse:
        raise CheckpointError(f"the target refused reverse protection: {_refusal(answer)}")
    assert welcome.checkpoint is not None and welcome.changed is not None
    assert welcome.applied_seq is not None
    checkpoint = welcome.checkpoint
    incremental = bool(welcome.incremental)
    regions: list[tuple[int, list[tuple[int, int]]]] = []
    snapshot = None
    if incremental:  # exactly the blocks written there since the last round
        regions = [(i, [(int(o), int(n)) for o, n in r]) for i, r in enumerate(welcome.changed)]
    else:  # the first round: what either side changed since the promotion
        delta, _, _ = group.promotion_delta(
            welcome.changed, welcome.applied_seq, "reverse protection"
        )
        regions = [(i, delta.ranges(i)) for i in range(len(group.volumes))]
        snapshot = await loop.run_in_executor(
            None, group.snapshot_before_failback, promoted.generation, regions
        )
    staging = group.reverse_staging()
    try:
        pulled, wire_bytes = await pull(
            shipper,
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
    round_ = ReverseRound(
        checkpoint=checkpoint["id"],
        checkpoint_time=checkpoint["time"],
        incremental=incremental,
        compared_bytes=sum(n for _, ranges in regions for _, n in ranges),
        pulled_bytes=pulled,
        wire_bytes=wire_bytes,
        time=time.time(),
        seconds=round(time.monotonic() - started, 3),
    )
    await loop.run_in_executor(None, group.apply_reverse, staging, round_)
    writer.write(wire.encode_control(wire.FrameType.REVERSE_DONE, {"checkpoint": checkpoint["id"]}))
    await writer.drain()
    done = await read_frame(reader, decoder, 300)
    if not isinstance(done, wire.Control) or done.type != wire.FrameType.REVERSE_OK:
        raise RemoteProtocolError(f"expected REVERSE_OK, got {done!r}")
    log.info(
        "group %s: reverse protection: the recovery side as of %s pulled (%d bytes, %s) in %.2f s",
        group.name,
        checkpoint["id"],
        pulled,
        "incremental" if incremental else "first round",
        round_.seconds,
    )
    return {"group": group.name, "snapshot": snapshot} | round_.to_dict()
