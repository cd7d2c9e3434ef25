"""Source and target havend processes end to end: every acknowledged write arrives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvloop
from conftest import RawClient, require_tool
from nodes import NodeProcess, source_node, start_pair, wait_caught_up
from waiting import wait_until

from havend.journal import Journal
from havend.ship.shipper import Shipper, ShipperSettings
from havend.ship.source import SourceGroup
from havend.volume import FileVolume

MiB = 1 << 20


def make_volume(path: Path, size: int = 32 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def group(name: str, *volumes: Path, **extra: object) -> dict:
    return {
        "name": name,
        "volumes": [{"name": v.stem, "path": str(v)} for v in volumes],
        "journal": {"segment_size": 4 * MiB, "max_segments": 64},
        **extra,
    }


def nbd_port(source: NodeProcess) -> int:
    return int(source.address("nbd").rsplit(":", 1)[1])


def replica(target: NodeProcess, group_name: str, volume: str) -> Path:
    return target.state_dir / "rep" / group_name / f"{volume}.img"


@pytest.fixture
def pair(tmp_path: Path):
    db = make_volume(tmp_path / "db.img")
    logv = make_volume(tmp_path / "log.img", 16 * MiB)
    sites = start_pair(tmp_path, [group("app1", db, logv)])
    yield sites.source, sites.target, db, logv
    sites.stop()


def nbdcopy_random(tmp_path: Path, uri: str, size: int) -> bytes:
    data = os.urandom(size)
    src = tmp_path / f"in-{size}.img"
    src.write_bytes(data)
    subprocess.run(
        [require_tool("nbdcopy"), "--flush", str(src), uri],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return data


def test_writes_reach_the_target_byte_for_byte(pair, tmp_path: Path) -> None:
    source, target, db, logv = pair
    port = nbd_port(source)
    nbdcopy_random(tmp_path, f"nbd://127.0.0.1:{port}/db", 32 * MiB)
    client = RawClient(port)
    client.go("log")
    for i in range(200):
        assert client.write(i * 65536, os.urandom(4096) * 2) == 0
    client.request(4, 0, 65536, cookie=5)  # TRIM
    assert client.reply()[0] == 0
    client.request(6, 3 * MiB, MiB, cookie=6)  # WRITE_ZEROES
    assert client.reply()[0] == 0
    client.request(3, cookie=7)  # FLUSH
    assert client.reply()[0] == 0
    client.close()
    wait_caught_up(source, target)
    assert replica(target, "app1", "db").read_bytes() == db.read_bytes()
    assert replica(target, "app1", "log").read_bytes() == logv.read_bytes()
    [status] = source.status()["groups"]
    assert status["lag_records"] == 0 and status["rpo_ok"] and status["connected"]


@pytest.mark.parametrize("every", [256 << 10, 0])
def test_the_journal_is_synced_in_the_background_as_writes_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int
) -> None:
    """Past ``journal.background_sync_bytes`` of appends, a thread of the group
    syncs the journal: records become durable with no FLUSH at all, so the
    FLUSH that comes finds little left to write; ``0`` leaves it to FLUSH."""
    syncs: list[str] = []
    real = os.fdatasync

    def traced(fd: int) -> None:
        syncs.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", traced)
    journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=4 * MiB)
    volume = FileVolume(str(make_volume(tmp_path / "v.img", 4 * MiB)))
    group = SourceGroup(uuid.uuid4(), "g", [("v", volume)], journal, background_sync_bytes=every)
    syncs.clear()
    member = group.volumes[0]
    for i in range(16):  # 1 MiB in 64 KiB writes, no FLUSH
        member.write(i * 65536, bytes([i + 1]) * 65536)
    for _ in range(500):  # bounded: until the background sync in flight is done
        if group._background_sync is None or group._background_sync.done():
            break
        time.sleep(0.01)
    in_background = [name for name in syncs if name.startswith("havend-sync-g")]
    if every:
        assert in_background, syncs
        assert journal.durable_seq >= 4  # at least what the first 256 KiB appended
    else:
        assert not in_background and journal.durable_seq == 0
    member.flush()  # the FLUSH: everything, either way
    assert journal.durable_seq == journal.last_seq == 16
    group.close()
    with Journal.open(tmp_path / "journal") as again:
        assert again.last_seq == 16


def _journal_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the journal segment files fdatasync'd from now on."""
    synced: list[str] = []
    real = os.fdatasync

    def traced(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith("seg-") and name.endswith(".log"):  # not a new one being made
            synced.append(name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", traced)
    return synced


def test_records_the_target_holds_are_released_before_the_journal_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the target acknowledges in time, a whole acknowledged segment is
    released at once (local copies synced, segment deleted, its dirty pages
    dropped unwritten) and no background sync runs: the journal's writes reach
    the disk only for records the target does not hold. Once more than
    ``background_sync_bytes`` wait unacknowledged, the background sync runs."""
    every = 256 << 10

    async def scenario() -> tuple[list[str], int, int, list[str], int]:
        loop = asyncio.get_running_loop()
        journal = Journal.create(  # room for all of it, should the releases lag
            tmp_path / "journal", uuid.uuid4(), segment_size=256 << 10, max_segments=64
        )
        volume = FileVolume(str(make_volume(tmp_path / "v.img", 4 * MiB)))
        group = SourceGroup(
            uuid.uuid4(), "g", [("v", volume)], journal, background_sync_bytes=every
        )
        group.bind(loop)
        state = tmp_path / "state"
        state.mkdir()
        group.attach_state(str(state))
        synced = _journal_syncs(monkeypatch)
        member = group.volumes[0]
        for i in range(48):  # 3 MiB in 64 KiB writes, each acknowledged at once
            await loop.run_in_executor(None, member.write, i * 65536, bytes([i + 1]) * 65536)
            group.on_ack(journal.last_seq)
            await asyncio.sleep(0)  # the ACK reaches the node's loop
        for _ in range(500):  # bounded: the release task finishes
            if group._release_task is None or group._release_task.done():
                break
            await asyncio.sleep(0.01)
        acked_phase = list(synced)
        tail, volumes_synced = journal.tail_seq, int((state / "volumes_synced").read_text())
        for i in range(8):  # 512 KiB the target never acknowledges
            await loop.run_in_executor(None, member.write, i * 65536, bytes([100 + i]) * 65536)
        for _ in range(500):
            if group._background_sync is not None and group._background_sync.done():
                break
            await asyncio.sleep(0.01)
        durable = journal.durable_seq
        group.close()
        return acked_phase, tail, volumes_synced, synced, durable

    acked_phase, tail, volumes_synced, synced, durable = asyncio.run(scenario())
    assert acked_phase == []  # not one journal sync while the target kept up
    assert tail > 40 and volumes_synced >= tail - 1  # released as it went, copies synced first
    assert synced and durable >= 48 + 4  # then the background sync: at least 256 KiB of it
    with Journal.open(tmp_path / "journal") as again:
        assert again.last_seq == 56
    assert (tmp_path / "v.img").read_bytes()[:65536] == bytes([100]) * 65536


@pytest.mark.parametrize("acked", [True, False])
def test_a_checkpoint_marker_is_made_durable_by_the_target_or_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acked: bool
) -> None:
    """A checkpoint's marker needs stable storage soon, not at once: the
    target's ACK within the patience is enough (the local journal writes
    nothing for it); without one, the source commits its journal."""

    async def scenario() -> tuple[list[str], int, int]:
        loop = asyncio.get_running_loop()
        journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=4 * MiB)
        group = SourceGroup(
            uuid.uuid4(), "g", [("v", FileVolume(str(make_volume(tmp_path / "v.img"))))], journal
        )
        group.bind(loop)
        synced = _journal_syncs(monkeypatch)
        await loop.run_in_executor(None, group.volumes[0].write, 0, b"x" * 4096)
        marker = group.create_checkpoint("before the upgrade")
        commit = loop.create_task(group.commit_through(marker.seq, patience=2.0))
        if acked:
            await asyncio.sleep(0.01)
            group.on_ack(marker.seq)
        await asyncio.wait_for(commit, 10)
        before_close, durable = list(synced), journal.durable_seq
        group.close()  # (which syncs everything)
        return before_close, durable, marker.seq

    synced, durable, seq = asyncio.run(scenario())
    if acked:
        assert synced == [] and durable == 0  # on the target's disk, not written here
    else:
        assert synced and durable >= seq


def test_the_shipper_runs_in_a_thread_of_its_own_and_stops_with_the_node(
    tmp_path: Path,
) -> None:
    """The shipper has its own thread and loop (the node's serves NBD); the
    node's calls reach it there, appends wake it from any thread, and a stop
    ends the thread before the group closes under it."""

    async def scenario() -> tuple[bool, bool, int, bool]:
        journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=4 * MiB)
        group = SourceGroup(
            uuid.uuid4(), "g", [("v", FileVolume(str(make_volume(tmp_path / "v.img"))))], journal
        )
        group.bind(asyncio.get_running_loop())
        shipper = Shipper(group, ShipperSettings("", 0), None, "src")  # not paired yet
        running = shipper.start_thread()
        await asyncio.sleep(0.2)
        thread = shipper._thread
        assert thread is not None
        separate = thread.is_alive() and thread is not threading.current_thread()
        waiting = not running.done() and group.last_error == "no target paired"
        shipper.pause()  # from the node's loop: carried out in the shipper's
        shipper.resume()
        group.volumes[0].write(0, b"x" * 4096)  # wakes the shipper (which waits for a pairing)
        shipper.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running, 10)
        await shipper.join()
        group.close()
        return separate, waiting, journal.last_seq, thread.is_alive()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        separate, waiting, last, alive = runner.run(scenario())
    assert separate and waiting
    assert last == 1
    assert not alive


def test_volumes_synced_marker_is_written_by_one_thread_at_a_time(tmp_path: Path) -> None:
    """A release after an ACK (node's executor) and the shipper leaving an
    overflow (its thread) both sync the volumes and rewrite the marker: at
    the same moment, one rename found the other's temporary file gone, the
    overflow's regions were dropped and its checkpoints declared lost."""
    journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=4 * MiB)
    volume = FileVolume(str(make_volume(tmp_path / "v.img", MiB)))
    group = SourceGroup(uuid.uuid4(), "g", [("v", volume)], journal)
    state = tmp_path / "state"
    state.mkdir()
    group.attach_state(str(state))
    errors: list[BaseException] = []

    def sync_often(base: int) -> None:
        try:
            for i in range(300):
                group._sync_volumes(base + i)
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=sync_often, args=(n * 1000,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:1]
    assert int((state / "volumes_synced").read_text()) in (299, 1299, 2299)
    group.close()


def test_target_killed_and_restarted_converges(pair, tmp_path: Path) -> None:
    source, target, db, _ = pair
    port = nbd_port(source)
    nbdcopy_random(tmp_path, f"nbd://127.0.0.1:{port}/db", 8 * MiB)
    wait_caught_up(source, target)
    target.kill()  # kill -9 while the source keeps taking writes
    client = RawClient(port)
    client.go("db")
    for i in range(100):
        assert client.write(i * 131072, os.urandom(8192)) == 0
    client.close()
    target.start()
    wait_caught_up(source, target)
    assert replica(target, "app1", "db").read_bytes() == db.read_bytes()
    assert "link" in source.log()  # the outage was noticed and logged


def test_source_killed_after_flush_loses_nothing(pair, tmp_path: Path) -> None:
    source, target, db, _ = pair
    port = nbd_port(source)
    client = RawClient(port)
    client.go("db")
    acked = {}
    for i in range(300):
        data = os.urandom(4096)
        assert client.write(i * 4096 * 7, data) == 0
        acked[i * 4096 * 7] = data
    client.request(3, cookie=9)
    assert client.reply()[0] == 0  # FLUSH acknowledged: all of it must survive
    client.close()
    source.kill()
    source.start()
    wait_caught_up(source, target)
    copy = replica(target, "app1", "db").read_bytes()
    local = db.read_bytes()
    for offset, data in acked.items():
        assert local[offset : offset + 4096] == data
        assert copy[offset : offset + 4096] == data
    assert copy == local


def test_sync_mode_flush_means_the_target_has_it(tmp_path: Path) -> None:
    """RPO 0: kill -9 the source right after FLUSH returns; the target has every write."""
    vol = make_volume(tmp_path / "sdb.img", 8 * MiB)
    sites = start_pair(tmp_path, [group("sync1", vol, mode="sync")])
    source, target = sites.source, sites.target
    try:
        client = RawClient(nbd_port(source))
        client.go("sdb")
        written = {i * 4096: os.urandom(4096) for i in range(50)}
        for offset, data in written.items():
            assert client.write(offset, data) == 0
        client.request(3, cookie=99)
        assert client.reply()[0] == 0
        source.kill()  # no chance to ship anything more
        wait_until(
            lambda: target.status()["groups"],
            30,
            f"the target to apply the {len(written)} flushed writes",
            until=lambda groups: groups and groups[0]["applied_seq"] >= len(written),
            interval=0.1,
        )
        copy = replica(target, "sync1", "sdb").read_bytes()
        for offset, data in written.items():
            assert copy[offset : offset + 4096] == data
    finally:
        sites.stop()


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: {name: x, role: source, state_dir: /tmp/x}\ninsecure_plaintext: true\n")
    result = subprocess.run(
        [sys.executable, "-m", "havend", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "source: required" in result.stderr and "Traceback" not in result.stderr


def _tls(files) -> dict:
    return {"cert": str(files.cert), "key": str(files.key), "ca": str(files.ca)}


def test_nodes_replicate_over_mutual_tls_and_refuse_strangers(tmp_path: Path) -> None:
    from havend import certs

    certs.init_ca(tmp_path / "ca")
    tgt = certs.issue(tmp_path / "ca", tmp_path / "pki", "tgt1", ["tgt1", "127.0.0.1"])
    src = certs.issue(tmp_path / "ca", tmp_path / "pki", "src1", ["src1"])
    certs.init_ca(tmp_path / "other-ca")
    stranger = certs.issue(tmp_path / "other-ca", tmp_path / "other", "src1", ["src1"])

    vol = make_volume(tmp_path / "tls.img", 4 * MiB)
    sites = start_pair(tmp_path, [group("secure", vol)], tls=(_tls(src), _tls(tgt)))
    source, target = sites.source, sites.target
    port = int(target.address("replication").rsplit(":", 1)[1])
    intruder_dir = tmp_path / "intruder"
    intruder_dir.mkdir()
    intruder_vol = make_volume(intruder_dir / "evil.img", MiB)
    intruder = source_node(
        intruder_dir, port, [group("evil", intruder_vol)], name="src2", tls=_tls(stranger)
    ).start()
    try:
        nbdcopy_random(tmp_path, f"nbd://127.0.0.1:{nbd_port(source)}/tls", 4 * MiB)
        wait_caught_up(source, target)
        assert replica(target, "secure", "tls").read_bytes() == vol.read_bytes()

        def intruder_group() -> dict:
            [evil] = intruder.status()["groups"]
            return evil

        evil = wait_until(
            intruder_group,
            20,
            "the intruder to be refused",
            until=lambda evil: evil["last_error"],
            interval=0.2,
        )
        assert not evil["connected"] and evil["last_error"]
        assert [g["name"] for g in target.status()["groups"]] == ["secure"]
        assert "insecure" not in source.log()
    finally:
        intruder.stop()
        sites.stop()


def test_journal_overflow_tracks_regions_and_resyncs_only_them(tmp_path: Path) -> None:
    """With the target down, writes overflow a tiny journal; the application is
    never refused, and once the target is back only the dirty regions travel."""
    vol = make_volume(tmp_path / "ovf.img", 64 * MiB)
    small = group("ovf", vol)
    small["journal"] = {"segment_size": 256 * 1024, "max_segments": 2}
    sites = start_pair(tmp_path, [small])
    source, target = sites.source, sites.target
    try:
        wait_caught_up(source, target)  # initial sync of the empty volume
        target.stop()
        client = RawClient(nbd_port(source))
        client.go("ovf")
        for i in range(64):  # 4 MiB in 64 KiB writes, spread over the first 32 MiB
            assert client.write(i * 512 * 1024, os.urandom(64 * 1024)) == 0
        client.request(3, cookie=5)
        assert client.reply()[0] == 0
        client.close()
        assert "journal full" in source.log()
        target.start()
        wait_caught_up(source, target)
        assert replica(target, "ovf", "ovf").read_bytes() == vol.read_bytes()
        [status] = source.status()["groups"]
        resync = status["resync"]
        assert resync["reason"] == "journal overflow" and not resync["running"]
        assert resync["total_bytes"] < 8 * MiB  # the dirty regions, not the 64 MiB volume
        assert 4 * MiB - 512 * 1024 <= resync["sent_bytes"] <= 5 * MiB
        assert not list((source.state_dir / "groups").glob("*/overflowed"))
    finally:
        sites.stop()


def test_source_that_lost_its_journal_resyncs_by_hashes(pair, tmp_path: Path) -> None:
    """The target is ahead of a source whose state was wiped: a hash resync sends
    only the blocks that differ."""
    source, target, db, _ = pair
    port = nbd_port(source)
    nbdcopy_random(tmp_path, f"nbd://127.0.0.1:{port}/db", 32 * MiB)
    wait_caught_up(source, target)
    source.stop()
    with open(db, "r+b") as f:  # changed behind havend's back: 40 blocks of 4 KiB
        for i in range(40):
            f.seek(i * 797 * 1024 // 4096 * 4096)
            f.write(os.urandom(4096))
    group_dirs = list((source.state_dir / "groups").iterdir())
    for d in group_dirs:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        d.rmdir()
    source.start()
    wait_caught_up(source, target)
    assert replica(target, "app1", "db").read_bytes() == db.read_bytes()
    resync = next(g for g in source.status()["groups"] if g["name"] == "app1")["resync"]
    assert resync["sent_bytes"] == 40 * 4096


def test_black_holed_link_is_detected_and_replication_resumes(tmp_path: Path) -> None:
    """A partition sends no RST: the source notices unacknowledged batches, drops
    the link, reconnects once the network heals, and the target lets the new link
    replace the half-dead one."""
    vol = make_volume(tmp_path / "bh.img", 8 * MiB)
    sites = start_pair(tmp_path, [group("bh", vol)], proxy=True, link_timeout=1.5)
    source, target, proxy = sites.source, sites.target, sites.proxy
    assert proxy is not None
    try:
        wait_caught_up(source, target)
        proxy.partition()
        client = RawClient(nbd_port(source))
        client.go("bh")
        for i in range(64):
            assert client.write(i * 65536, os.urandom(65536)) == 0  # never blocks
        client.close()
        wait_until(
            lambda: "no acknowledgement" in source.log(),
            20,
            "the source to notice the black hole ('no acknowledgement')",
            detail=lambda: source.log()[-2000:],
            interval=0.2,
        )
        assert "no acknowledgement" in source.log()
        proxy.heal()
        wait_caught_up(source, target)
        assert replica(target, "bh", "bh").read_bytes() == vol.read_bytes()
    finally:
        sites.stop()


def test_restart_after_the_machine_went_down_compares_every_block(pair, tmp_path: Path) -> None:
    """After an OS crash a volume may hold a write whose journal record was torn:
    the source then resyncs every region by hash (only differences travel)."""
    source, target, db, _ = pair
    port = nbd_port(source)
    nbdcopy_random(tmp_path, f"nbd://127.0.0.1:{port}/db", 4 * MiB)
    wait_caught_up(source, target)
    source.kill()
    [running] = list((source.state_dir / "groups").glob("*/running"))
    running.write_text("a-boot-before-a-power-loss\n")  # as if the machine had rebooted
    with open(db, "r+b") as f:  # the write that reached the disk but not the journal
        f.seek(12 * MiB)
        f.write(b"\xee" * 4096)
    source.start()
    wait_caught_up(source, target)
    assert replica(target, "app1", "db").read_bytes() == db.read_bytes()
    resync = next(g for g in source.status()["groups"] if g["name"] == "app1")["resync"]
    assert resync["reason"] == "machine restart" and resync["sent_bytes"] == 4096
    assert "machine restarted" in source.log()
