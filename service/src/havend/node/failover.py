"""Checkpoints and the failover operations as the node carries them out:
planned failover (drain, final checkpoint, promote the target), failback,
reverse protection, reclaim, split-brain resolution (source node), and
promotion and rollback (target node). The guards (which role and state
allow each, one at a time per group) are the operations layer's
(``havend.operations``); the data plane refuses what it cannot do."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any

from havend.cdp.hooks import SSHTarget, app_consistent
from havend.errors import CheckpointError
from havend.node.base import NodeBase
from havend.ship import FailoverRefused, Fence

log = logging.getLogger("havend")


class FailoverMixin(NodeBase):
    def refusal(self, kind: str, name: str) -> str | None:
        """Why the data plane would refuse ``kind`` on group ``name`` as it is
        now, in its own words (None: it would not refuse outright). The
        operations layer says it together with the state machine's refusal."""
        if self.config.role == "source":
            return self._source_group(name).refusal(kind)
        return self._target_group(name).refusal(kind)

    async def checkpoint(self, name: str, label: str = "", app: bool | None = None) -> Any:
        """Take a checkpoint of a source group: application-consistent through its
        hooks when it has some (unless ``app`` is False), else crash-consistent."""
        group = self._source_group(name)
        hooks = self._group_config(name).checkpoints.hooks
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        if app and hooks is None:
            raise CheckpointError(f"group {name} has no freeze/thaw hooks configured")
        if hooks is not None and app is not False:
            ssh = None
            if hooks.ssh is not None:
                s = hooks.ssh
                ssh = SSHTarget(s.host, s.user, s.key_file, s.known_hosts, s.port)
            result = await app_consistent(
                hooks.pre,
                hooks.post,
                hooks.timeout_seconds,
                lambda: group.create_checkpoint(label, "app"),
                ssh,
            )
            assert result.checkpoint is not None
            answer = result.checkpoint.to_dict() | {
                "frozen_seconds": round(result.freeze_seconds, 3),
                "thaw_error": result.thaw_error,
            }
        else:
            answer = group.create_checkpoint(label, "crash").to_dict()  # microseconds

        # The marker reaches stable storage in the background, soon after.
        def committed(task: asyncio.Task[None]) -> None:
            self._commits.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "group %s: committing checkpoint %s: %s", name, answer["id"], task.exception()
                )

        commit = loop.create_task(group.commit_through(answer["seq"]))
        self._commits.add(commit)
        commit.add_done_callback(committed)
        answer["group"] = name
        answer["took_seconds"] = round(time.monotonic() - started, 4)
        log.info(
            "group %s: checkpoint %s at seq %d (%s%s)",
            name,
            answer["id"],
            answer["seq"],
            answer["consistency"],
            f", {label}" if label else "",
        )
        return answer

    async def failover(self, name: str, timeout: float = 300) -> dict[str, Any]:
        """Planned failover: refuse new writes, drain the journal to the target,
        take a final checkpoint, and have the target promote itself at exactly
        the last acknowledged write (RPO 0, proven by the seqs)."""
        group = self._source_group(name)
        refused = self.refusal("failover", name)
        if refused:
            raise CheckpointError(refused)
        shipper = self._shipper(name)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        # Marked with this process: a restart that finds it knows the failover
        # was cut short (and lifts it once the target shows it was not promoted).
        fence = Fence("planned failover in progress", pid=os.getpid(), stage="draining")
        group.set_fence(fence)
        log.warning("group %s: planned failover: writes refused from now on, draining", name)
        try:
            await loop.run_in_executor(None, group.commit)
            final = group.create_checkpoint("failover", "crash")
            await asyncio.wait_for(group.wait_acked(final.seq), timeout)
            drained = time.monotonic()
            log.info("group %s: drained to seq %d; the target promotes itself", name, final.seq)
            # From here the target may promote itself even if we never hear it: stay
            # fenced on failure; the next connection tells (see Shipper._ship).
            group.set_fence(replace(fence, stage="promoting", final_seq=final.seq))
            promoted = await shipper.request_failover(final.seq, timeout)
        except BaseException as exc:  # not failed over: the group is live again here
            refused = isinstance(exc, FailoverRefused)
            if group.fence and group.fence.stage == "promoting" and not refused:
                raise CheckpointError(
                    f"group {name}: asked the target to promote itself at seq {final.seq} and "
                    f"did not hear back ({exc}); the group stays fenced until the link tells "
                    "whether it was promoted"
                ) from None
            group.set_fence(None)
            if isinstance(exc, TimeoutError):
                raise CheckpointError(
                    f"group {name}: the target did not take everything within {timeout:g} s; "
                    "writes are accepted again"
                ) from None
            raise
        if promoted.applied_seq != final.seq:
            log.error("group %s: promoted at %s, not at %d", name, promoted.applied_seq, final.seq)
        lost = group.promoted_elsewhere(promoted).lost
        done = time.monotonic()
        log.warning(
            "group %s: failed over to the target at seq %d (RPO 0): drain %.3f s, promote %.3f s",
            name,
            final.seq,
            drained - started,
            done - drained,
        )
        return {
            "group": name,
            "final_seq": final.seq,
            "last_acknowledged_seq": group.acked_seq,
            "target_applied_seq": promoted.applied_seq,
            "lost_writes": lost.records if lost is not None else None,
            "final_checkpoint": final.to_dict(),
            "generation": promoted.generation,
            "drain_seconds": round(drained - started, 4),
            "promote_seconds": round(done - drained, 4),
        }

    async def failback(self, name: str, timeout: float = 3600) -> dict[str, Any]:
        """Bring production home after a failover (source node): see Shipper.failback."""
        return await self._shipper(name).failback(timeout)

    async def reverse(self, name: str, timeout: float = 3600) -> dict[str, Any]:
        """A round of reverse protection now (source node, failed over)."""
        return await self._shipper(name).reverse_round(timeout)

    def reclaim(self, name: str) -> dict[str, Any]:
        """Production resumes here at the last reverse round (source node)."""
        return self._source_group(name).reclaim()

    async def resolve(self, name: str, survivor: str, timeout: float = 3600) -> dict[str, Any]:
        """End a split brain with the side that survives (source node): see Shipper.resolve."""
        return await self._shipper(name).resolve(survivor, timeout)

    async def promote(self, name: str, ref: str | None = None) -> dict[str, Any]:
        """Unplanned failover: the group's replica becomes the live copy (at its
        latest consistent point, or at a retained checkpoint)."""
        group = self._target_group(name)
        assert self.target is not None
        self.target.drop_link(group)
        result = await group.promote(checkpoint=ref)
        return (
            result
            | {"loss_window": loss_window(result, group.last_heard)}
            | {"exports": self._export_promoted(group)}
        )

    async def rollback(self, name: str, ref: str) -> dict[str, Any]:
        group = self._target_group(name)
        checkpoint = group.resolve_checkpoint(ref)
        assert self.target is not None
        result = await group.rollback(checkpoint.id)
        self.target.drop_link(group)
        return result


def loss_window(promoted: dict[str, Any], last_heard: float | None) -> dict[str, Any]:
    """What an unplanned promotion may have lost, as far as the target knows:
    the writes the source made after ``from_time`` (its clock: the applied
    point, or the chosen checkpoint's) that never arrived, up to when it was
    last heard (this side's clock; None when not since this process started).
    Writes made after that are counted by the source when it returns
    (``fence.lost``)."""
    applied, seq = promoted.get("applied_time"), promoted.get("applied_seq")
    chosen = promoted.get("checkpoint")
    if chosen:  # rolled back to it: everything after it is lost too
        applied, seq = chosen.get("time"), chosen.get("seq")
    seconds = None
    if last_heard is not None and applied is not None:
        seconds = round(max(0.0, last_heard - applied), 6)
    return {
        "from_seq": seq,
        "from_time": applied,
        "last_heard": last_heard,
        "seconds": seconds,
    }
