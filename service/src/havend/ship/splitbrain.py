"""The split-brain exchange of a source with its promoted target.

A promoted target refuses the old source's HELLO and says when it was
promoted, by its clock; the source compares that with the time of its newest
write (:func:`refused_promoted`) and either fences itself as failed over or,
having written after the promotion, reports a split brain in its next HELLO
(:func:`split_brain_report`) so that the target fences itself too. An
operator's choice of the surviving side ends it (:func:`resolve_session`).
See ``havend.link.wire`` for the frames."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from havend.errors import CheckpointError, RemoteProtocolError
from havend.link import wire
from havend.link.hello import Welcome
from havend.link.promotion import Promoted, RecoverySide
from havend.link.stream import read_frame
from havend.records import Fields
from havend.ship.records import Fence

if TYPE_CHECKING:
    from havend.ship.shipper import Shipper

log = logging.getLogger("havend.ship")


class FailedOver(Exception):
    """The target was promoted: this group is fenced here until failback."""


class SplitBrain(Exception):
    """This side took writes after the target's promotion: both sides fenced."""


def split_brain_report(shipper: Shipper) -> dict[str, Any] | None:
    """While this side is fenced in a split brain: what it wrote after the
    promotion, for the target to record (and fence itself); None otherwise."""
    fence = shipper.group.fence
    split = fence.split_brain if fence is not None else None
    if split is None:
        return None
    return {"generation": split.generation, "production": split.production.to_dict()}


def refused_promoted(shipper: Shipper, body: dict, sent: float, received: float) -> None:
    """The target is promoted: fence this side, and tell whether it took
    writes after the promotion (a split brain) by comparing the two clocks:
    the target's, as it answered, against this one's midway through the
    round trip (the error is at most half of it)."""
    group = shipper.group
    f = Fields("REFUSED", body)
    promoted = f.part("promoted", Promoted.read)
    if body.get("code") == "split_brain":
        split = Fields("REFUSED", body.get("split_brain") or {}, "split_brain.")
        group.split_brain_recorded(promoted, split.optional_part("recovery", RecoverySide.read))
        raise FailedOver("split brain: " + str(body.get("error")))
    known = group.fence is not None and group.fence.generation == promoted.generation
    reclaimed = group.reclaimed()
    if not known and reclaimed and reclaimed.get("generation") == promoted.generation:
        # Production resumed here while that side was out of reach: both live.
        offset = float(body.get("clock", received)) - (sent + received) / 2
        group.split_brain(promoted, float(reclaimed["time"]), offset, received - sent)
        raise SplitBrain()
    if not known and "clock" in body and group.last_write_time is not None:
        offset = float(body["clock"]) - (sent + received) / 2
        # The latest the promotion can have been on this clock: the target
        # read its clock anywhere within the round trip (it may have been
        # busy before answering), so the midpoint is off by up to half of
        # it. A write before this is an ordinary loss (kept at failback);
        # only one certainly after the promotion makes a split brain.
        since = float(promoted.time) - offset + (received - sent) / 2
        if group.last_write_time >= since:
            group.split_brain(promoted, since, offset, received - sent)
            raise SplitBrain()  # report it to the target at once
    group.promoted_elsewhere(promoted)
    raise FailedOver(str(body.get("error")))


async def resolve_session(
    shipper: Shipper,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    fence: Fence,
    survivor: str,
) -> dict:
    group = shipper.group
    decoder = wire.FrameDecoder()
    generation = fence.generation
    request = {"generation": generation, "survivor": survivor}
    hello = replace(shipper.hello(), resolve=request)
    writer.write(wire.encode_control(wire.FrameType.HELLO, hello.to_body()))
    await writer.drain()
    answer = await read_frame(reader, decoder, shipper.settings.connect_timeout)
    if not isinstance(answer, wire.Control) or answer.type not in (
        wire.FrameType.WELCOME,
        wire.FrameType.RESOLVED,
    ):
        why = answer.body.get("error") if isinstance(answer, wire.Control) else answer
        raise CheckpointError(f"the target refused to resolve the split brain: {why}")
    if answer.type == wire.FrameType.WELCOME:  # production survives: the target's delta
        welcome = Welcome.from_body(answer.body)
        assert welcome.changed is not None and welcome.applied_seq is not None
        with group.lock:
            if group.overflow is None:
                group.enter_overflow(reason="split brain resolved for production")
            overflow = group.overflow
            assert overflow is not None
            delta, _, _ = group.promotion_delta(
                welcome.changed, welcome.applied_seq, overflow.reason
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
        assert fence.split_brain is not None
        settled = replace(
            fence,
            reason=f"failed over to generation {generation} (a split brain resolved for the "
            "recovery side; this side's later writes are kept by the failback's snapshot)",
            split_brain=None,
            split_brain_resolved=replace(fence.split_brain, survivor="recovery"),
        )
        group.set_fence(settled)
        log.warning(
            "group %s: split brain resolved: the recovery side survives; fail back when ready",
            group.name,
        )
    return {"group": group.name, "survivor": chosen, "generation": generation} | result
