"""What a group's status and its links say is true of the replica (issue 16).

Unit tests of the source's status and of the target's per-link state; the
end-to-end ones run real nodes (see nodes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path

from conftest import RawClient
from nodes import source_node, target_node, wait_caught_up

from havend.cdp.retention import RetentionPolicy
from havend.journal import Journal, Kind, Record
from havend.link import wire
from havend.link.stream import read_frame
from havend.ship.resync import ResyncProgress
from havend.ship.source import SourceGroup
from havend.target import TargetNode
from havend.volume import FileVolume

MiB = 1 << 20


def _source_group(tmp_path: Path) -> SourceGroup:
    image = tmp_path / "v.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=MiB)
    return SourceGroup(uuid.uuid4(), "g", [("v", FileVolume(str(image)))], journal)


def test_status_never_reports_lag_zero_while_a_resync_runs(tmp_path: Path) -> None:
    """Every block compared, nothing sent, SYNC_DONE not back yet: the target is
    not caught up, so neither lag figure may read 0 (an RPO alert reads them)."""
    group = _source_group(tmp_path)
    try:
        assert group.status().lag_bytes == 0
        group.resync = ResyncProgress(
            "journal overflow", 4 * MiB, done_bytes=4 * MiB, started=time.monotonic() - 1
        )
        status = group.status()
        assert status.resync is not None and status.resync["running"]
        assert status.lag_bytes > 0
        assert status.lag_seconds > 0
        group.last_resync, group.resync = group.resync, None
        status = group.status()
        assert status.resync is not None and not status.resync["running"]
        assert status.lag_bytes == 0 and status.lag_seconds == 0
    finally:
        group.close()


# The target's end of a link --------------------------------------------------


async def _frame(reader: asyncio.StreamReader, decoder: wire.FrameDecoder) -> wire.Frame:
    return await read_frame(reader, decoder, 10)


async def _hello(
    port: int, group_id: uuid.UUID, size: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.FrameDecoder, wire.Frame]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder = wire.FrameDecoder()
    hello = {
        "version": wire.VERSION,
        "node": "src",
        "group": str(group_id),
        "name": "g",
        "mode": "async",
        "volumes": [{"name": "v", "size": size}],
    }
    writer.write(wire.encode_control(wire.FrameType.HELLO, hello))
    await writer.drain()
    return reader, writer, decoder, await _frame(reader, decoder)


async def _ask(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: wire.FrameDecoder,
    kind: wire.FrameType,
    body: dict,
) -> wire.Frame:
    writer.write(wire.encode_control(kind, body))
    await writer.drain()
    return await _frame(reader, decoder)


def _records(tmp_path: Path, count: int) -> list[Record]:
    journal = Journal.create(tmp_path / "src-journal", uuid.uuid4(), segment_size=MiB)
    try:
        for i in range(count):
            journal.append(Kind.WRITE, 0, i * 4096, os.urandom(4096))
        return journal.read(0, 16 * MiB, durable_only=False)
    finally:
        journal.close()


def test_a_link_that_broke_mid_commit_leaks_nothing_into_the_next(tmp_path: Path) -> None:
    """A batch arrives and the link ends before its commit ran. The target's
    status must then say what the replica holds (nothing received that is not
    durable: an idle group does not look busy), and the next link's commit
    loop must not acknowledge anything before its source asked (an ACK before
    SYNC_READY broke every resync after a journal overflow)."""
    size = 4 * MiB
    group_id = uuid.uuid4()
    records = _records(tmp_path, 8)

    async def scenario() -> None:
        node = TargetNode("tgt", str(tmp_path / "state"), str(tmp_path / "replicas"))
        _, port = await node.start("127.0.0.1", 0, None)
        try:
            for round_ in range(5):  # the commit may win the race once or twice
                reader, writer, decoder, welcome = await _hello(port, group_id, size)
                assert isinstance(welcome, wire.Control)
                assert welcome.type == wire.FrameType.WELCOME, welcome
                resume = int(welcome.body["durable_seq"])
                # A resync first (a new replica; then as after an overflow).
                ready = await _ask(
                    reader, writer, decoder, wire.FrameType.SYNC_BEGIN, {"resume_seq": resume}
                )
                assert isinstance(ready, wire.Control), ready
                assert ready.type == wire.FrameType.SYNC_READY, ready
                done = await _ask(
                    reader, writer, decoder, wire.FrameType.SYNC_END, {"high_seq": resume}
                )
                assert isinstance(done, wire.Control), done
                assert done.type == wire.FrameType.SYNC_DONE, done
                # Records the target does not hold yet, then the link ends at once.
                batch = [r for r in records if r.seq > resume][:2] or records[-2:]
                writer.write(wire.encode_batch(group_id, batch))
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                group = node.groups[group_id]
                for _ in range(200):  # the target notices the end of the link
                    if not group.connected:
                        break
                    await asyncio.sleep(0.01)
                assert not group.connected
                status = group.status()
                assert status.received_seq == status.durable_seq, (round_, status)
        finally:
            await node.close()

    asyncio.run(scenario())


def test_an_overflow_while_shipping_resyncs_without_a_failed_link(tmp_path: Path) -> None:
    """The journal overflows while the link is up: the shipper ends its session
    (mid-commit on the target, often) and reconnects to resync the dirty
    regions. That next link must come up cleanly: no link down in the
    source's log (an ACK the old link left pending once arrived before
    SYNC_READY, every time)."""
    target = target_node(tmp_path).start()
    port = int(target.address("replication").rsplit(":", 1)[1])
    volume = tmp_path / "ovf.img"
    with open(volume, "wb") as f:
        f.truncate(32 * MiB)
    small = {
        "name": "ovf",
        "volumes": [{"name": "ovf", "path": str(volume)}],
        "journal": {"segment_size": 256 * 1024, "max_segments": 2},
    }
    source = source_node(tmp_path, port, [small]).start()
    try:
        wait_caught_up(source, target)
        client = RawClient(int(source.address("nbd").rsplit(":", 1)[1]))
        client.go("ovf")
        for round_ in range(12):  # each round fills the 512 KiB journal many times over
            for i in range(64):
                offset = (round_ * 64 + i) % 448 * 64 * 1024
                assert client.write(offset, os.urandom(64 * 1024)) == 0
            client.request(3, cookie=5)  # FLUSH
            assert client.reply()[0] == 0
        client.close()
        wait_caught_up(source, target)
        log = source.log()
        logs = f"--- source\n{log[-4000:]}\n--- target\n{target.log()[-4000:]}"
        assert "journal full" in log
        assert "; retrying" not in log, logs  # no link went down
        assert "expected SYNC_READY" not in log, logs
        replica_path = target.state_dir / "rep" / "ovf" / "ovf.img"
        assert replica_path.read_bytes() == volume.read_bytes()
    finally:
        source.stop()
        target.stop()


def test_the_retention_policy_in_hello_is_a_record_kept_as_its_dict(tmp_path: Path) -> None:
    """A HELLO's retention policy is parsed as a RetentionPolicy: kept in
    group.json as its dict; a malformed one is refused, and changes nothing."""
    group_id = uuid.uuid4()

    async def hello(retention: object) -> wire.Frame:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = wire.FrameDecoder()
        body = {
            "version": wire.VERSION,
            "node": "src",
            "group": str(group_id),
            "name": "g",
            "mode": "async",
            "volumes": [{"name": "v", "size": MiB}],
            "retention": retention,
        }
        writer.write(wire.encode_control(wire.FrameType.HELLO, body))
        await writer.drain()
        try:
            return await _frame(reader, decoder)
        finally:
            writer.close()

    async def scenario() -> None:
        nonlocal port
        node = TargetNode("tgt", str(tmp_path / "state"), str(tmp_path / "replicas"))
        _, port = await node.start("127.0.0.1", 0, None)
        try:
            welcome = await hello({"count": 7, "max_age_seconds": 60})
            assert isinstance(welcome, wire.Control) and welcome.type == wire.FrameType.WELCOME
            meta = json.loads((Path(node.groups[group_id].directory) / "group.json").read_text())
            assert meta["retention"] == RetentionPolicy(7, 60.0).to_dict()
            for bad in ({"count": "many"}, {"count": 0}, ["count", 7]):
                refused = await hello(bad)
                assert isinstance(refused, wire.Control), refused
                assert refused.type == wire.FrameType.REFUSED, refused
                assert "malformed retention" in refused.body["error"]
            assert node.groups[group_id].retention == RetentionPolicy(7, 60.0)
        finally:
            await node.close()

    port = 0
    asyncio.run(scenario())
