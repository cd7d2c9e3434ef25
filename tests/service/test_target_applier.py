"""The target's applier and a resync's end (test_failover's
test_split_brain_resolved_for_the_production_side, once, on a loaded CI
machine: records after the resync received and durable, never applied).

SYNC_END applies the staged blocks in a worker thread and restarts the
sequence there: a fresh journal starting after the resume seq, then the
applied seq set to it. The applier, woken (every second, or by a commit)
between those two steps, saw durable records above an applied seq the new
journal no longer holds; its read raised and the applier task ended, for
good. Driven in-process through the target's frame handler, the window made
certain by a pause injected in it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid
from pathlib import Path

import pytest

from havend.journal import Journal, Kind, Record
from havend.link import wire
from havend.operations import machine
from havend.target.group import TargetGroup
from havend.target.server import TargetNode

BLOCK = 4096
SIZE = 16 * BLOCK


def _records(journal: Journal, count: int) -> list[Record]:
    first = journal.last_seq
    for _ in range(count):
        block = int.from_bytes(os.urandom(2), "little") % (SIZE // BLOCK)
        journal.append(Kind.WRITE, 0, block * BLOCK, os.urandom(BLOCK))
    return journal.read(first, 16 << 20, durable_only=False)


async def _deliver(group: TargetGroup, records: list[Record]) -> None:
    """A batch arrives and its commit runs; wait until the applier took it."""
    group.receive(records)
    group.journal.sync()
    group.new_records.set()
    for _ in range(300):
        if group.applied_seq >= group.journal.durable_seq:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"applier stuck at {group.applied_seq} of {group.journal.durable_seq}")


def _one_group(tmp_path: Path) -> tuple[Journal, TargetNode, TargetGroup]:
    source = Journal.create(tmp_path / "src", uuid.uuid4(), segment_size=1 << 20)
    state, replicas = str(tmp_path / "state"), str(tmp_path / "rep")
    TargetGroup.create(state, replicas, uuid.uuid4(), "g", [{"name": "v", "size": SIZE}]).close()
    node = TargetNode("t", state, replicas)
    [group] = node.groups.values()
    return source, node, group


def test_the_applier_survives_a_resync_ending_while_it_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, node, group = _one_group(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        applier = loop.create_task(group.applier())

        async def frame(kind: wire.FrameType, body: dict) -> None:
            await node._handle(group, wire.Control(kind, body), asyncio.Event())

        try:
            await frame(wire.FrameType.SYNC_BEGIN, {"resume_seq": 0})
            await frame(wire.FrameType.SYNC_END, {"high_seq": 0})
            await _deliver(group, _records(source, 5))
            assert group.state == "consistent" and group.applied_seq == 5

            # Records 6-10 travel as a staged resync (as after a split brain's
            # resolution for the production side); records resume at 11.
            _records(source, 5)
            await frame(wire.FrameType.SYNC_BEGIN, {"resume_seq": 10})
            assert group.state == "staging"
            group.write_block(0, 0, os.urandom(BLOCK))

            fresh_journal = TargetGroup._fresh_journal
            looked = threading.Event()
            apply_some = TargetGroup.apply_some

            def applying(self: TargetGroup, *args: object) -> int:
                looked.set()
                return apply_some(self, *args)

            def fresh_then_pause(self: TargetGroup, first_seq: int) -> None:
                fresh_journal(self, first_seq)
                # The new journal is in place, the applied seq not yet moved:
                # wake the applier and give it time to look.
                loop.call_soon_threadsafe(self.new_records.set)
                looked.wait(1.0)

            monkeypatch.setattr(TargetGroup, "_fresh_journal", fresh_then_pause)
            monkeypatch.setattr(TargetGroup, "apply_some", applying)
            await frame(wire.FrameType.SYNC_END, {"high_seq": 10})
            monkeypatch.undo()
            assert group.applied_seq == 10 and group.state == "consistent"
            await asyncio.sleep(0.1)  # the applier's turn
            assert not applier.done(), f"the applier stopped: {applier.exception()!r}"

            await _deliver(group, _records(source, 5))
            assert group.applied_seq == 15
            assert not applier.done(), applier.exception()
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        source.close()
        for g in node.groups.values():
            g.close()


def test_a_batch_that_fails_is_retried_its_error_in_the_status_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only OSError: whatever a batch raises (a bad record, a bug), the
    records stay, the applier lives on and says why in the group's status."""
    source, node, group = _one_group(tmp_path)
    apply_some = TargetGroup.apply_some
    failures = {"left": 3}

    def failing(self: TargetGroup, *args: object) -> int:
        if failures["left"]:
            failures["left"] -= 1
            raise ValueError("record 1: a damaged payload")
        return apply_some(self, *args)

    async def scenario() -> None:
        applier = asyncio.get_running_loop().create_task(group.applier())
        try:
            await node._handle(
                group, wire.Control(wire.FrameType.SYNC_BEGIN, {"resume_seq": 0}), asyncio.Event()
            )
            await node._handle(
                group, wire.Control(wire.FrameType.SYNC_END, {"high_seq": 0}), asyncio.Event()
            )
            monkeypatch.setattr(TargetGroup, "apply_some", failing)
            records = _records(source, 4)
            group.receive(records)
            group.journal.sync()
            group.new_records.set()
            for _ in range(200):
                if group.status().apply_error is not None:
                    break
                await asyncio.sleep(0.01)
            error = group.status().apply_error
            assert error is not None and error["error"] == "ValueError: record 1: a damaged payload"
            assert error["attempts"] >= 1 and error["since"] > 0
            assert group.applied_seq == 0 and not applier.done()
            state, why = machine.state_of("target", dataclasses.asdict(group.status()), None)
            assert state == "error" and "applying records fails (ValueError" in why, why
            for _ in range(1000):  # back-off 0.5 + 1 + 2 s, then the batch applies
                if group.applied_seq == 4:
                    break
                await asyncio.sleep(0.01)
            assert group.applied_seq == 4, group.status()
            assert group.status().apply_error is None and not applier.done()
            assert (
                machine.state_of("target", dataclasses.asdict(group.status()), None)[0]
                == "protecting"
            )
            last = {r.offset: bytes(r.data) for r in records}  # a block written twice: the later
            with open(group.volumes[0].path, "rb") as replica:
                for offset, data in last.items():
                    replica.seek(offset)
                    assert replica.read(len(data)) == data
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        source.close()
        for g in node.groups.values():
            g.close()
    logged = [r for r in caplog.records if "applying records after seq 0 failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info  # once, with its traceback, not per retry


def test_an_applier_that_dies_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error outside a batch ends the task: the node starts it again (with
    back-off), the error in the status until it applies again."""
    source, node, group = _one_group(tmp_path)
    deaths = {"left": 1}

    def dying(self: TargetGroup) -> None:  # the kept point of a resync, dropped
        if deaths["left"]:
            deaths["left"] -= 1
            raise RuntimeError("the kept point is gone")
        self._base = None

    async def scenario() -> None:
        node._start_applier(group)
        try:
            await node._handle(
                group, wire.Control(wire.FrameType.SYNC_BEGIN, {"resume_seq": 0}), asyncio.Event()
            )
            await node._handle(
                group, wire.Control(wire.FrameType.SYNC_END, {"high_seq": 0}), asyncio.Event()
            )
            monkeypatch.setattr(TargetGroup, "_drop_base", dying)
            group._base = object()  # type: ignore[assignment]  # a kept point to drop, as after a resync
            group.new_records.set()
            for _ in range(300):
                if group.status().apply_error is not None:
                    break
                await asyncio.sleep(0.01)
            error = group.status().apply_error
            assert error is not None and error["error"] == "RuntimeError: the kept point is gone"
            await _deliver(group, _records(source, 3))  # the new applier takes them
            assert group.applied_seq == 3 and group.status().apply_error is None
            assert len(node._appliers) == 1 and not node._appliers[0].done()
        finally:
            await node.close()

    try:
        asyncio.run(scenario())
    finally:
        source.close()
