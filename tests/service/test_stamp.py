"""Stamped blocks, the prefix and durability checks, the NBD client and the StampWriter."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Havend, start_havend
from faultproxy import FaultProxy
from hypothesis import given, settings
from hypothesis import strategies as st

from havend.errors import NBDClientError
from havend.nbd.client import NBDAddress, NBDClient
from havend.stamp import (
    HEADER,
    ConsistencyError,
    Stamp,
    StampError,
    StampWriter,
    WriteLog,
    check_durable,
    check_prefix,
    make_block,
    parse_block,
)

BS = 512  # small blocks keep hand-built images short


def apply(log: WriteLog, writes: list[Stamp], n_blocks: int, block_size: int = BS) -> dict:
    """Images (volume -> bytearray) after applying ``writes`` in order."""
    images = {v: bytearray(n_blocks * block_size) for v in log.volumes}
    for w in writes:
        at = w.block * block_size
        images[w.volume][at : at + block_size] = make_block(
            w.seq, w.volume, w.block, w.generation, block_size
        )
    return images


def build(writes: list[tuple[int, int]], generation: int = 1) -> WriteLog:
    log = WriteLog()
    for volume, block in writes:
        log.issue(volume, block, generation)
    return log


# Stamps -------------------------------------------------------------------


def test_make_parse_round_trip() -> None:
    for size in (64, 512, 4096, 65536):
        data = make_block(123456789, 7, 99, 3, size)
        assert len(data) == size
        assert parse_block(data) == Stamp(123456789, 7, 99, 3)
        assert data == make_block(123456789, 7, 99, 3, size)  # deterministic
    assert parse_block(bytes(4096)) is None
    assert HEADER.size == 40
    assert make_block(1, 0, 0)[:8] == b"HVNSTAMP"


def test_torn_and_corrupt_blocks_raise() -> None:
    old, new = make_block(1, 0, 5), make_block(2, 0, 5)
    with pytest.raises(StampError, match="torn"):
        parse_block(new[:2048] + old[2048:])
    with pytest.raises(StampError):
        parse_block(old[:2048] + new[2048:])  # old header, new tail
    with pytest.raises(StampError):
        parse_block(new[:2048] + bytes(2048))  # a write to a zero block, torn
    with pytest.raises(StampError, match="neither zero"):
        parse_block(bytes(2048) + new[2048:])
    flipped = bytearray(new)
    flipped[3000] ^= 1
    with pytest.raises(StampError):
        parse_block(flipped)
    with pytest.raises(StampError):
        parse_block(os.urandom(4096))


# check_prefix on hand-built images ------------------------------------------


def test_check_prefix_finds_s() -> None:
    log = build([(0, 0), (1, 0), (0, 1), (0, 0), (1, 3), (1, 0)])
    for s in range(len(log) + 1):
        images = apply(log, list(log)[:s], 4)
        report = check_prefix(log, images, BS)
        assert report.ok and report.seq == s == report.expect(), report
    report = check_prefix(log, apply(log, [], 4), BS)
    assert (report.seq, report.stamped, report.blocks) == (0, 0, 8)


def test_check_prefix_reads_paths_and_initial_content(tmp_path: Path) -> None:
    log = build([(0, 2), (0, 3)])
    base = bytearray(os.urandom(8 * BS))
    image = bytearray(base)
    image[2 * BS : 3 * BS] = make_block(1, 0, 2, 1, BS)
    (tmp_path / "v0").write_bytes(image)
    (tmp_path / "b0").write_bytes(base)
    report = check_prefix(log, {0: tmp_path / "v0"}, BS, initial={0: tmp_path / "b0"})
    assert report.ok and report.seq == 1
    # Without the initial images, random content is neither zero nor a stamp.
    assert not check_prefix(log, {0: tmp_path / "v0"}, BS).ok


def test_a_later_write_without_an_earlier_one_is_reported() -> None:
    # seq 7 goes to volume 1 block 2; seq 10 to volume 0 block 4.
    writes = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (0, 0), (1, 1), (0, 4)]
    log = build(writes)
    shown = [w for w in log if w.seq != 7]
    report = check_prefix(log, apply(log, shown, 8), BS)
    assert not report.ok and report.seq is None
    problem = report.problem
    assert problem is not None
    assert (problem.volume, problem.block) == (1, 2)
    assert problem.found is None and problem.expected == log.get(7)
    assert "seq 10" in problem.detail and report.problems == 1
    with pytest.raises(ConsistencyError, match="volume 1 block 2"):
        report.expect()


def test_torn_foreign_and_misplaced_blocks_are_reported() -> None:
    log = build([(0, 0), (0, 1)])
    images = apply(log, list(log), 4)
    images[0][3 * BS : 4 * BS] = make_block(1, 0, 0, 1, BS)  # seq 1's stamp, wrong place
    report = check_prefix(log, images, BS)
    assert not report.ok and report.problem is not None
    assert report.problem.block == 3 and "another block" in report.problem.reason

    images = apply(log, list(log), 4)
    images[0][BS + 100 : 2 * BS] = make_block(9, 0, 1, 1, BS)[100:]
    assert "torn" in check_prefix(log, images, BS).problem.reason  # type: ignore[union-attr]

    images = apply(log, list(log), 4)
    images[0][2 * BS : 3 * BS] = make_block(50, 0, 2, 1, BS)
    assert "never issued" in check_prefix(log, images, BS).problem.reason  # type: ignore[union-attr]

    images = apply(log, list(log), 4)
    images[0][0:BS] = make_block(1, 0, 0, 2, BS)  # another generation
    assert "does not match" in check_prefix(log, images, BS).problem.reason  # type: ignore[union-attr]

    with pytest.raises(ValueError, match="no image"):
        check_prefix(log, {}, BS)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(1, 3)), max_size=30),
    st.data(),
)
def test_prefix_of_random_logs(writes: list[tuple[int, int, int]], data: st.DataObject) -> None:
    log = WriteLog()
    for volume, block, generation in writes:
        log.issue(volume, block, generation)
    s = data.draw(st.integers(0, len(log)), label="S")
    report = check_prefix(log, apply(log, list(log)[:s], 6), BS)
    assert report.ok and report.seq == s, report


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=20),
    st.data(),
)
def test_check_prefix_agrees_with_brute_force(
    writes: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Apply any subset of the writes; the verdict matches trying every S."""
    log = build(writes)
    kept = data.draw(st.lists(st.booleans(), min_size=len(log), max_size=len(log)))
    images = apply(log, [w for w, k in zip(log, kept, strict=True) if k], 4)
    matching = [s for s in range(len(log) + 1) if apply(log, list(log)[:s], 4) == images]
    report = check_prefix(log, images, BS)
    assert report.ok == bool(matching), report
    if matching:
        assert (report.min_seq, report.seq) == (min(matching), max(matching))


# check_durable ------------------------------------------------------------


def test_check_durable() -> None:
    log = build([(0, 0), (0, 1), (0, 2), (0, 1)])
    for seq in (1, 2, 3, 4):
        log.ack(seq)
    log.flush_acked(0, log.flush_sent(0) - 2)  # FLUSH after seqs 1 and 2 only
    assert [log.is_durable(s) for s in (1, 2, 3, 4)] == [True, True, False, False]
    everything = apply(log, list(log), 4)
    assert check_durable(log, everything, BS).ok
    # Seq 2 overwritten by (unacknowledged-durable) seq 4: fine. Seq 3 missing: fine.
    assert check_durable(log, apply(log, [log.get(1), log.get(4)], 4), BS).ok
    report = check_durable(log, apply(log, [log.get(1)], 4), BS)
    assert not report.ok and report.problem is not None
    assert (report.problem.block, report.problem.expected) == (1, log.get(2))
    with pytest.raises(ConsistencyError, match="durable write lost"):
        report.expect()
    # FUA makes one write durable without a FLUSH.
    log.issue(0, 3)
    log.ack(5, fua=True)
    assert not check_durable(log, everything, BS).ok


# The NBD client -------------------------------------------------------------


def zero_volume(tmp_path: Path, name: str, size: int = 8 << 20) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def two_volumes(tmp_path: Path) -> Iterator[list[Havend]]:
    servers = [start_havend(zero_volume(tmp_path, f"vol{i}.img"), name=f"vol{i}") for i in (0, 1)]
    yield servers
    for server in servers:
        server.stop()


def test_address_parsing() -> None:
    assert NBDAddress.parse("nbd://127.0.0.1:1234/disk") == NBDAddress("disk", "127.0.0.1", 1234)
    assert NBDAddress.parse("nbd://host/x").port == 10809
    unix = NBDAddress.parse("nbd+unix:///vol?socket=/tmp/s.sock")
    assert (unix.name, unix.socket_path) == ("vol", "/tmp/s.sock")
    assert str(unix) == "nbd+unix:///vol?socket=/tmp/s.sock"
    for bad in ("http://x/y", "nbd+unix:///vol", "nbd:///x"):
        with pytest.raises(ValueError):
            NBDAddress.parse(bad)


def test_client_against_havend(tmp_path: Path) -> None:
    server = start_havend(zero_volume(tmp_path, "c.img"), name="c")
    try:
        with NBDClient.open(server.uri, timeout=10) as client:
            assert client.size == 8 << 20 and not client.read_only
            client.write(4096, b"A" * 8192, fua=True)
            client.flush()
            assert client.read(4096, 8192) == b"A" * 8192
            client.trim(4096, 4096)
            client.write_zeroes(8192, 4096)
            assert client.read(4096, 8192) == bytes(8192)
            with pytest.raises(NBDClientError) as info:
                client.write(client.size - 100, b"x" * 200)
            assert info.value.error == 28  # ENOSPC; the session goes on
            assert client.read(0, 10) == bytes(10)
        with pytest.raises(NBDClientError, match="ERR_UNKNOWN"):
            NBDClient.tcp("127.0.0.1", server.port or 0, "nope", timeout=10)
    finally:
        server.stop()


def test_client_over_unix_socket_and_read_only(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    server = start_havend(zero_volume(tmp_path, "u.img"), "--read-only", name="u", unix=sock)
    try:
        with NBDClient.open(server.uri) as client:
            assert client.read_only and client.read(0, 4096) == bytes(4096)
            with pytest.raises(NBDClientError) as info:
                client.write(0, b"x" * 512)
            assert info.value.error == 1  # EPERM
    finally:
        server.stop()


def test_client_is_broken_after_the_server_dies(tmp_path: Path) -> None:
    server = start_havend(zero_volume(tmp_path, "d.img"), name="d")
    client = NBDClient.open(server.uri, timeout=5)
    try:
        server.stop(signal.SIGKILL)
        with pytest.raises(OSError):
            client.write(0, b"y" * 4096)
        assert client.broken
        with pytest.raises(ConnectionError, match="broken"):
            client.flush()
    finally:
        client.close()
        server.stop()


# The StampWriter end to end -----------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "sequential"])
def test_stamp_writer_against_havend(two_volumes: list[Havend], pattern: str) -> None:
    clients = {i: NBDClient.open(server.uri) for i, server in enumerate(two_volumes)}
    try:
        writer = StampWriter(
            clients, seed=7, pattern=pattern, blocks=300, flush_every=50, fua_every=97
        )
        assert writer.run(1000) == 1000
        writer.write(1, 5, fua=True)
    finally:
        for client in clients.values():
            client.close()
    for server in two_volumes:
        assert server.stop() == 0
    log = writer.log
    assert log.last_seq == 1001 and log.last_acked_seq == 1001
    assert log.is_durable(1000) and log.is_durable(1001)
    images = {i: server.path for i, server in enumerate(two_volumes)}
    report = check_prefix(log, images)
    assert report.ok and report.seq == log.last_seq, report
    assert report.blocks == 2 * (8 << 20) // 4096
    assert check_durable(log, images).ok
    assert report.min_seq == 1001


def test_stamp_writer_through_the_fault_proxy_stops_on_a_reset(tmp_path: Path) -> None:
    server = start_havend(zero_volume(tmp_path, "p.img"), name="p")
    assert server.port is not None
    try:
        with FaultProxy("127.0.0.1", server.port) as proxy:
            client = NBDClient.tcp("127.0.0.1", proxy.port, "p", timeout=5)
            writer = StampWriter({0: client}, blocks=64, flush_every=10)
            writer.run(100, final_flush=False)
            proxy.reset_all()
            with pytest.raises(OSError):
                writer.run(100)
            client.close()
        assert server.stop() == 0
        log = writer.log
        assert log.last_seq == 101 and not log.is_acked(101)
        report = check_prefix(log, {0: server.path})
        assert report.ok and report.seq in (100, 101)
        assert check_durable(log, {0: server.path}).ok
    finally:
        server.stop()
