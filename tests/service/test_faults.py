"""Fault injection with real havend processes: the replication core's guarantees.

A source and a target ``havend run`` process, with a :class:`FaultProxy` between
them (the source ships to the proxy's port, the proxy forwards to the target).
A :class:`StampWriter` writes stamped blocks to two volumes of one consistency
group through NBD, from a thread, while faults happen; its :class:`WriteLog` is
the ground truth. The guarantees checked:

(a) once the lag is 0, each replica equals its source volume byte for byte;
(b) at every observation (mid-outage, after kill -9 of the target and its
    restart, while the source keeps writing) a *consistent* replica is a
    write-order prefix of the source (:func:`check_prefix`);
(c) a write acknowledged before an acknowledged FLUSH survives kill -9 of the
    source, on the source and on the replica (:func:`check_durable`);
(d) damaged journal records and bad frames give a clear error and no silent
    damage;
(e) a full disk on the target never blocks the application, is logged, and
    replication converges once there is room again.

How a replica is observed (:meth:`Cluster.observe`): a running target is
frozen with SIGSTOP (every thread of it stopped, checked in ``/proc``), its
replica images, ``sync.json`` and ``applied`` files are read, and it gets
SIGCONT; the target is stopped first, never read while it runs. Reading the
replicas of a running target instead gave false verdicts (51 of 300 reads of a
trial were "not a prefix": volume 0 and volume 1 were read at different
instants while the applier moved on); no torn block was seen, but a frozen
target rules that out too. A dead target's files are read as they are. The
replica's state is the one the target's status reports
(``groups[i]["state"]``), derived from the files read in that same instant:
``sync.json`` says ``syncing``, ``staging``, ``applying``, ``catching_up``
(consistent once ``applied`` reaches ``until``) or ``consistent``; status.json
itself may be up to ``status_period`` old (a resync may have begun since), so
it is only quoted in messages. During a resync a replica may be inconsistent:
the prefix is required when the state is ``consistent``, and in ``staging``
(a resync of a consistent replica staged aside: the replica stays where it was).

Bugs these tests found are fixed; their tests stay as regression tests (their
docstrings and the *_BUG texts below say what once failed). A source whose
shipper task dies or a target whose applier sleeps on durable records fails
:meth:`Cluster.caught_up`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from faultproxy import FaultProxy
from nodes import NodeProcess, Pair, start_pair, target_node, wait_caught_up
from waiting import WaitTimeout, wait_until

from havend.errors import HavendError
from havend.journal.record import (
    RECORD_HEADER,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    Record,
    decode_record,
)
from havend.journal.superblock import read_superblock
from havend.link import wire
from havend.nbd.client import NBDClient
from havend.stamp import (
    DEFAULT_BLOCK_SIZE,
    StampWriter,
    WriteLog,
    check_durable,
    check_prefix,
    make_block,
    parse_block,
)

MiB = 1 << 20
VOLUME_SIZE = 4 * MiB
VOLUMES = ("va", "vb")  # volume ids 0 and 1 of the group, in this order
WAIT = 60.0  # bound of every wait for convergence
# A live shipper retries at least every max_backoff (5 s) * 1.5 (jitter).
SHIPPER_SILENCE = 8.5
_RETRY_LINE = re.compile(r"^(\S+ \S+) .* link to \S+ down .*; retrying in ([0-9.]+) s$")
# A live applier applies durable records within milliseconds.
APPLIER_SILENCE = 8.0
# Replica states in which the replica must be a write-order prefix.
PREFIX_STATES = ("consistent", "staging")

# Bugs found by this file, now fixed (their regression tests name them).
SHIPPER_BUG = (
    "fixed bug: with uvloop, StreamWriter.write() on a link whose reset the loop has "
    "already seen raises RuntimeError, which Shipper.run (ship/shipper.py) does not "
    "catch: the shipper task ends silently and the group is never shipped again"
)
COMMIT_CANCEL_BUG = (
    "fixed bug: when a link ends, TargetNode._serve (target/server.py) cancels "
    "_commit_and_ack while it awaits journal.sync in a worker thread; the sync still "
    "completes (durable_seq moves) but group.new_records.set() is skipped, so the applier "
    "sleeps with durable_seq > applied_seq, and a resync that comes next waits forever "
    "in TargetGroup.begin_resync for applied_seq to reach durable_seq"
)


# The writer ---------------------------------------------------------------


class SharedLog(WriteLog):
    """A WriteLog that a writer thread appends to while the test thread checks it.

    Every mutation takes ``lock``; a check holds ``lock`` while it reads the log
    (the writer then waits at its next issue/ack, a few ms).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def issue(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return super().issue(*args, **kwargs)

    def ack(self, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            super().ack(*args, **kwargs)

    def flush_sent(self, volume: int) -> int:
        with self.lock:
            return super().flush_sent(volume)

    def flush_acked(self, volume: int, token: int) -> None:
        with self.lock:
            super().flush_acked(volume, token)


class BackgroundWriter:
    """A StampWriter over both volumes of the group, in a thread, until stopped.

    A failure of the source (kill -9) ends it: the write in flight stays in the
    log as issued, not acknowledged, and ``error`` says what happened.
    """

    def __init__(self, nbd_port: int, log: SharedLog, seed: int, **options: Any) -> None:
        self.log = log
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.clients = {
            i: NBDClient.tcp("127.0.0.1", nbd_port, name, timeout=10)
            for i, name in enumerate(VOLUMES)
        }
        self.writer = StampWriter(self.clients, log=log, seed=seed, **options)
        self.thread = threading.Thread(target=self._run, name=f"stampwriter-{seed}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.writer.run(stop=self.stop_event, final_flush=True)
        except (OSError, HavendError) as exc:
            self.error = exc
        finally:
            for client in self.clients.values():
                with contextlib.suppress(Exception):
                    client.close(disconnect=not client.broken)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30) -> BackgroundWriter:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stamp writer did not stop"
        return self


# Processes ----------------------------------------------------------------


class ShipperGone(Exception):
    """The source stopped trying to reach its target."""


class ApplierStalled(Exception):
    """The target holds durable records it does not apply."""


def make_volume(path: Path, size: int = VOLUME_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def frozen_pids(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
            return False
    return True


@contextlib.contextmanager
def frozen(node: NodeProcess) -> Iterator[bool]:
    """SIGSTOP ``node`` until the block ends; yields whether it was running.

    Only returns once every thread is stopped: no write of it is in progress.
    """
    proc = node.proc
    if proc is None or proc.poll() is not None:
        yield False
        return
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: frozen_pids(proc.pid),
            5,
            f"every thread of {node.name} to stop on SIGSTOP",
            interval=0.0005,
        )
        yield True
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@dataclass
class ReplicaView:
    """One instant of a replica group on the target."""

    state: str  # as the target's status reports it (see the module docstring)
    applied: int
    until: int
    images: dict[int, bytes]
    running: bool
    status_state: str | None  # what the last status.json said (maybe older)

    def __str__(self) -> str:
        return (
            f"state {self.state} (status.json: {self.status_state}), applied {self.applied}, "
            f"until {self.until}, target {'running' if self.running else 'down'}"
        )


def fresh_status(node: NodeProcess, timeout: float = 10) -> dict[str, Any]:
    """The node's status, written after this call began."""
    since = time.time()
    return wait_until(
        node.status,
        timeout,
        f"{node.name}: a fresh status.json (written after {since})",
        until=lambda status: status["time"] > since,
    )


def read_status_state(node: NodeProcess, group_id: str) -> str | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        status = json.loads((node.state_dir / "status.json").read_text())
        for group in status["groups"]:
            if group["group"] == group_id:
                return str(group["state"])
    return None


@dataclass
class Cluster:
    """Target, proxy and source of one group of two volumes, and the writer's log."""

    tmp: Path
    target: NodeProcess
    proxy: FaultProxy
    source: NodeProcess
    volumes: dict[int, Path]
    group: str
    log: SharedLog = field(default_factory=SharedLog)
    observations: int = 0
    prefix_checks: int = 0

    # Addresses and files

    def nbd_port(self) -> int:
        return port_of(self.source.address("nbd"))

    def group_id(self) -> str:
        return (self.source.state_dir / "group-ids" / self.group).read_text().strip()

    def replica_paths(self) -> dict[int, Path]:
        base = self.target.state_dir / "rep" / self.group
        return {i: base / f"{name}.img" for i, name in enumerate(VOLUMES)}

    def writer(self, seed: int, **options: Any) -> BackgroundWriter:
        return BackgroundWriter(self.nbd_port(), self.log, seed, **options)

    def block_on(self, volume: int, block: int, replica: bool = False) -> Any:
        """The stamp (or None) in one block of a source volume, or of its replica."""
        path = self.replica_paths()[volume] if replica else self.volumes[volume]
        with open(path, "rb") as f:
            f.seek(block * DEFAULT_BLOCK_SIZE)
            return parse_block(f.read(DEFAULT_BLOCK_SIZE))

    def _resend(self, stamp: Any) -> None:
        with NBDClient.tcp("127.0.0.1", self.nbd_port(), VOLUMES[stamp.volume]) as client:
            client.write(
                stamp.block * DEFAULT_BLOCK_SIZE,
                make_block(stamp.seq, stamp.volume, stamp.block, stamp.generation),
            )
        self.log.ack(stamp.seq)

    def settle_in_flight(self) -> str:
        """After kill -9 of the source, before any new write: the write that was in
        flight either reached the source (then it is part of the source's history)
        or not; if not, it is sent again now, as an application retrying its failed
        write would. Either way the log stays one history.

        A write that reached the source volume must reach the replica too (the
        replica catches up first, then is read): else (a) is broken for good."""
        with self.log.lock:
            last = self.log.writes[-1] if self.log.writes else None
            if last is None or self.log.is_acked(last.seq):
                return "none"
        held = self.block_on(last.volume, last.block)
        if held is None or held.seq != last.seq:
            self._resend(last)
            return "resent"
        self.caught_up()
        replica = self.block_on(last.volume, last.block, replica=True)
        assert replica is not None and replica.seq == last.seq, (
            f"lag 0, but {last} (in flight at kill -9) is on the source volume and not "
            f"on the replica, which holds {replica}\n{self.logs()}"
        )
        return "landed"

    # Life cycle

    def heal_all(self) -> None:
        self.proxy.heal()
        self.proxy.accept()
        self.proxy.delay(0)
        self.proxy.drop_after(None)

    def ensure_running(self) -> None:
        """Undo whatever an earlier (failed) iteration may have left behind."""
        self.heal_all()
        if self.target.proc is None or self.target.proc.poll() is not None:
            self.target.start()
        if self.source.proc is None or self.source.proc.poll() is not None:
            self.source.start()
            self.settle_in_flight()

    def stop(self) -> None:
        Pair(self.target, self.source, self.proxy).stop()

    # Observations

    def observe(self) -> ReplicaView | None:
        """The replica at one instant (see the module docstring); None before it exists."""
        directory = self.target.state_dir / "groups" / self.group_id()
        with frozen(self.target) as running:
            if not (directory / "sync.json").exists():
                return None
            sync = json.loads((directory / "sync.json").read_text())
            applied = applied_seq(directory)
            images = {i: p.read_bytes() for i, p in self.replica_paths().items()}
            status_state = read_status_state(self.target, self.group_id())
        state = str(sync["state"])
        if state == "catching_up" and applied >= int(sync["until"]):
            state = "consistent"
        return ReplicaView(state, applied, int(sync["until"]), images, running, status_state)

    def check_prefix_now(self, when: str) -> int | None:
        """(b): observe the replica; if consistent it must be a write-order prefix.
        Returns the prefix seq (None when the replica is not consistent)."""
        view = self.observe()
        self.observations += 1
        if view is None or view.state not in PREFIX_STATES:
            return None
        with self.log.lock:
            report = check_prefix(self.log, view.images)
        self.prefix_checks += 1
        assert report.ok, f"{when}: replica {view}: {report}\n{self.logs()}"
        return report.seq

    def _last_retry(self) -> tuple[float, float] | None:
        """(time, backoff) of the source's newest "link ... down; retrying in X s" line."""
        for line in reversed(self.source.log().splitlines()):
            match = _RETRY_LINE.match(line)
            if match:
                when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
                return when.timestamp(), float(match[2])
        return None

    def wait_caught_up(self, timeout: float = WAIT) -> None:
        """:func:`wait_caught_up`, that recognises two known bugs early.

        :class:`ShipperGone`: the source is in no session (no connection open
        through the proxy, link down) and has made no new connection attempt for
        3 s and longer than its last logged backoff allows (1.5 times it, plus
        1.5 s; SHIPPER_SILENCE without such a line): its shipper task ended.
        :class:`ApplierStalled`: the target's applied seq stays below its
        durable seq for APPLIER_SILENCE seconds."""
        accepted, quiet_since = self.proxy.connections, time.monotonic()
        applied, stalled_since = None, time.monotonic()
        last: list[AssertionError] = []

        def caught_up_or_known_bug() -> bool:
            nonlocal accepted, quiet_since, applied, stalled_since
            try:
                wait_caught_up(self.source, self.target, timeout=2)
                return True
            except AssertionError as exc:
                last[:] = [exc]
            groups = self.source.status()["groups"]
            busy = self.proxy.stats().active or any(g["connected"] for g in groups)
            if self.proxy.connections != accepted or busy:
                accepted, quiet_since = self.proxy.connections, time.monotonic()
            else:
                retry = self._last_retry()
                quiet = time.monotonic() - quiet_since
                overdue = (
                    time.time() > retry[0] + 1.5 * retry[1] + 1.5 and quiet > 3
                    if retry is not None
                    else quiet > SHIPPER_SILENCE
                )
                if overdue:
                    raise ShipperGone(
                        f"the source has made no connection attempt for {quiet:.1f} s "
                        f"(link down, last error {groups[0]['last_error']!r}, last retry "
                        f"announced: {retry})"
                    )
            replica = [g for g in self.target.status()["groups"] if g["name"] == self.group]
            if not replica or replica[0]["applied_seq"] >= replica[0]["durable_seq"]:
                applied, stalled_since = None, time.monotonic()
            elif replica[0]["applied_seq"] != applied:
                applied, stalled_since = replica[0]["applied_seq"], time.monotonic()
            elif time.monotonic() - stalled_since > APPLIER_SILENCE:
                raise ApplierStalled(
                    f"the target's applied seq stayed at {applied} for {APPLIER_SILENCE} s "
                    f"while its durable seq is {replica[0]['durable_seq']}"
                )
            return False

        wait_until(
            caught_up_or_known_bug,
            timeout,
            "lag 0 (each try waits up to 2 s)",
            detail=lambda: last[0],
            interval=0,
        )

    def caught_up(self) -> None:
        """Wait for lag 0. A source whose shipper died (SHIPPER_BUG, fixed) or a
        target whose applier sleeps (COMMIT_CANCEL_BUG, fixed) fails the test."""
        self.wait_caught_up()

    def check_converged(self, when: str) -> None:
        """(a) + (b) + (c) once the writers have stopped: wait for lag 0, then
        compare."""
        self.caught_up()
        self._check_converged(when)

    def _check_converged(self, when: str) -> None:
        wait_caught_up(self.source, self.target, timeout=WAIT)
        replicas = self.replica_paths()
        for i, path in self.volumes.items():
            local, copy = path.read_bytes(), replicas[i].read_bytes()
            if local != copy:
                diff = next(
                    o
                    for o in range(0, len(local), 4096)
                    if local[o : o + 4096] != copy[o : o + 4096]
                )
                raise AssertionError(
                    f"{when}: lag 0 but replica {VOLUMES[i]} differs from its source "
                    f"(first at byte {diff})\n{self.logs()}"
                )
        with self.log.lock:
            prefix = check_prefix(self.log, {i: p for i, p in replicas.items()})
            assert prefix.ok, f"{when}: {prefix}"
            assert prefix.seq is not None and prefix.seq >= self.log.last_acked_seq, (
                f"{when}: caught up replica lacks acknowledged writes: {prefix}"
            )
            for what, images in (("source", self.volumes), ("replica", replicas)):
                durable = check_durable(self.log, images)
                assert durable.ok, f"{when}: {what}: {durable}"

    def logs(self, tail: int = 2500) -> str:
        return (
            f"--- source log\n{self.source.log()[-tail:]}\n"
            f"--- target log\n{self.target.log()[-tail:]}"
        )


# Small next to the journal, so the shipper reads records both from memory and
# from the segment files (and checks those) in every randomized iteration.
JOURNAL_CACHE = 256 << 10


def applied_seq(group_dir: Path) -> int:
    """The target's applied marker: ``seq time_ns`` (the time of that record)."""
    fields = (group_dir / "applied").read_text().split()
    return int(fields[0]) if fields else 0


def group_config(
    name: str, volumes: dict[int, Path], cache_bytes: int = JOURNAL_CACHE, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "volumes": [{"name": VOLUMES[i], "path": str(p)} for i, p in sorted(volumes.items())],
        "journal": {"segment_size": MiB, "max_segments": 64, "cache_bytes": cache_bytes},
        **extra,
    }


def start_cluster(
    tmp: Path,
    group: str = "app",
    *,
    target: NodeProcess | None = None,
    cache_bytes: int = JOURNAL_CACHE,
    **source_options: Any,
) -> Cluster:
    """Target (``target`` or a new one), proxy, source; returns once the first
    resync is over (the replica is consistent)."""
    volumes = {i: make_volume(tmp / f"{name}.img") for i, name in enumerate(VOLUMES)}
    groups = [group_config(group, volumes, cache_bytes)]
    pair = start_pair(tmp, groups, proxy=True, target=target, caught_up=WAIT, **source_options)
    assert pair.proxy is not None
    return Cluster(tmp, pair.target, pair.proxy, pair.source, volumes, group)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def uncached_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose source reads every record from its journal files (no
    memory cache): for tests that damage records on disk under a running source."""
    c = start_cluster(tmp_path, cache_bytes=0)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for every randomized iteration: each appends writes to the same group."""
    c = start_cluster(tmp_path_factory.mktemp("faults"))
    try:
        yield c
    finally:
        c.stop()


# (a) (b) (c): one random fault per iteration -----------------------------

FAULTS = (
    "kill_target",
    "kill_source",
    "partition",
    "reset_all",
    "drop_after",
    "delay",
    "refuse",
)
ITERATIONS = 50  # 7 or 8 of each fault
CASES = [(seed, FAULTS[seed % len(FAULTS)]) for seed in range(ITERATIONS)]


def _inject(
    c: Cluster, fault: str, rng: random.Random, writer: BackgroundWriter
) -> BackgroundWriter:
    """One fault while ``writer`` writes; returns the writer that runs afterwards."""
    if fault == "kill_target":
        c.target.kill()
        c.check_prefix_now("target killed")
        time.sleep(rng.uniform(0.1, 0.6))  # the source keeps taking writes
        c.target.start()
        c.check_prefix_now("target restarted")  # maybe before it caught up
        time.sleep(rng.uniform(0.0, 0.3))
        c.check_prefix_now("target restarted, a little later")
    elif fault == "kill_source":
        c.source.kill()
        writer.stop()
        c.check_prefix_now("source killed")
        c.source.start()
        c.settle_in_flight()
        writer = c.writer(rng.randrange(1 << 30), flush_every=rng.choice([4, 16, 64]))
    elif fault == "partition":
        c.proxy.partition()
        time.sleep(rng.uniform(0.1, 0.8))
        c.check_prefix_now("partitioned")
        c.proxy.heal()
    elif fault == "reset_all":
        if rng.random() < 0.5:  # a partition that ends in resets: fatal to the link
            c.proxy.partition()
            time.sleep(rng.uniform(0.1, 0.5))
            c.check_prefix_now("partitioned, before the reset")
            c.proxy.reset_all()
            c.proxy.heal()
        else:
            c.proxy.reset_all()
            c.check_prefix_now("links reset")
    elif fault == "drop_after":
        c.proxy.drop_after(rng.randrange(0, 512 << 10))
        time.sleep(rng.uniform(0.1, 0.6))
        c.check_prefix_now("link cut after n bytes")
        c.proxy.drop_after(None)
    elif fault == "delay":
        c.proxy.delay(rng.uniform(0.005, 0.1))
        time.sleep(rng.uniform(0.2, 0.8))
        c.check_prefix_now("slow link")
        c.proxy.delay(0)
    elif fault == "refuse":
        c.proxy.refuse()
        c.proxy.reset_all()
        time.sleep(rng.uniform(0.1, 0.6))
        c.check_prefix_now("connections refused")
        c.proxy.accept()
    else:
        raise AssertionError(fault)
    return writer


@pytest.mark.parametrize(("seed", "fault"), CASES, ids=[f"{s:02d}-{f}" for s, f in CASES])
def test_random_fault_keeps_prefix_durability_and_converges(
    shared_cluster: Cluster, seed: int, fault: str
) -> None:
    """One fault at a random moment while a stamped writer runs (2 volumes, one group).

    During the fault and after it the replica, when consistent, is a
    write-order prefix of the writes (observed with the target frozen, see the
    module docstring); once the writer stopped and the lag is 0 the replicas
    equal the source volumes byte for byte, and every write acknowledged before
    an acknowledged FLUSH is on the source volumes and on the replicas, also
    after kill -9 of the source.
    """
    c = shared_cluster
    rng = random.Random(seed)
    c.ensure_running()
    writer = c.writer(
        seed,
        flush_every=rng.choice([4, 16, 64]),
        fua_every=rng.choice([None, 7, 31]),
        blocks=rng.choice([None, 64]),
    )
    try:
        time.sleep(rng.uniform(0.05, 0.5))
        c.check_prefix_now("before the fault")
        writer = _inject(c, fault, rng, writer)
        time.sleep(rng.uniform(0.05, 0.4))
        c.check_prefix_now("after the fault")
    finally:
        writer.stop()
        c.heal_all()
    assert writer.error is None, f"writer failed without a source crash: {writer.error}"
    c.check_converged(f"seed {seed} ({fault})")


def _stamp_writes(c: Cluster, seed: int, count: int) -> None:
    """``count`` stamped writes (and a final FLUSH) from this thread."""
    clients = {i: NBDClient.tcp("127.0.0.1", c.nbd_port(), n) for i, n in enumerate(VOLUMES)}
    try:
        StampWriter(clients, log=c.log, seed=seed, flush_every=16).run(count)
    finally:
        for client in clients.values():
            client.close()


# (c): kill -9 of the source while its journal holds what the target lacks --


def test_source_killed_during_an_outage_loses_no_flushed_write(cluster: Cluster) -> None:
    """Partition, write and FLUSH (the journal holds records the target never
    saw), kill -9 the source mid-write, restart it, heal: every write
    acknowledged before an acknowledged FLUSH is on the source volumes and on
    the replicas, and they converge byte for byte."""
    c = cluster
    writer = c.writer(101, flush_every=8)
    try:
        time.sleep(0.3)
        c.proxy.partition()
        with c.log.lock:
            before_partition = c.log.last_seq
        time.sleep(0.8)  # a few thousand records only the journal has
        c.check_prefix_now("partitioned")
        c.source.kill()
        writer.stop()
        assert writer.error is not None, "the writer should have seen the source die"
        with c.log.lock:
            flushed = [s for s in c.log.writes[before_partition:] if c.log.is_durable(s.seq)]
        c.check_prefix_now("source killed, partitioned")
        c.source.start()
        c.proxy.heal()
        c.settle_in_flight()
        writer = c.writer(102, flush_every=8)
        time.sleep(0.3)
    finally:
        writer.stop()
        c.proxy.heal()
    assert len(flushed) > 100, "too few flushed writes during the outage to prove anything"
    c.check_converged("source killed during an outage")


# (d): damaged journal records, bad frames ----------------------------------


def journal_records(directory: Path) -> list[tuple[Path, int, Record]]:
    """(segment, offset, record) of every valid record in a journal's segments, in
    segment order; read-only (a journal may be open in a process)."""
    found = []
    for segment in sorted(directory.glob("seg-*.log")):
        data = segment.read_bytes()
        pos = SEGMENT_HEADER_SIZE
        while pos + RECORD_HEADER.size <= len(data):
            try:
                record = decode_record(data, pos)
            except BadRecord:
                break
            found.append((segment, pos, record))
            pos += record.size
    return found


def corrupt_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0x5A]))


def run_to_exit(node: NodeProcess, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``havend run`` on ``node``'s config, in the foreground: for a node that must refuse."""
    return subprocess.run(
        [sys.executable, "-m", "havend", "run", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _outage_with_records(c: Cluster, seed: int, seconds: float) -> None:
    """Stop the target, write and flush while it is down: the source journal then
    holds durable records the target does not have."""
    c.target.stop()
    writer = c.writer(seed, flush_every=16)
    time.sleep(seconds)
    writer.stop()
    assert writer.error is None, writer.error


@pytest.mark.parametrize("where", ["behind_head_hint", "after_head_hint"])
def test_damaged_journal_record_of_a_stopped_source_is_refused(
    cluster: Cluster, where: str
) -> None:
    """A byte flipped in the middle of a durable, unshipped journal record of a
    stopped source. ``behind_head_hint``: a clean stop (the superblock's head
    hint is at the journal's end), a record in the middle of the unshipped ones:
    recovery does not scan it, the replay at start reads it. ``after_head_hint``:
    kill -9 (the hint is where the last segment began), a record in the middle
    of that segment with later records proving it durable: recovery scans it.
    Either way the source refuses to start with one error line naming the
    journal segment and the damaged seq (after the hint also saying that
    acknowledged writes are unreadable), changes neither its volumes nor the
    replica, and the replica stays a write-order prefix."""
    c = cluster
    _outage_with_records(c, 201, 0.6)
    journal = c.source.state_dir / "groups" / c.group_id() / "journal"
    if where == "behind_head_hint":
        assert c.source.stop() == 0
    else:
        # The hint is where the newest segment began: write on until that segment
        # holds enough records (the writes may have just rolled into a new one).
        for burst in range(10):
            block = read_superblock(str(journal / "superblock"))
            hint = (journal / f"seg-{block.head_segment:016x}.log", block.head_offset)
            if sum(1 for r in journal_records(journal) if (r[0], r[1]) >= hint) > 40:
                break
            writer = c.writer(301 + burst, flush_every=16)
            time.sleep(0.2)
            writer.stop()
            assert writer.error is None, writer.error
        c.source.kill()
    applied = applied_seq(c.target.state_dir / "groups" / c.group_id())
    block = read_superblock(str(journal / "superblock"))
    records = [r for r in journal_records(journal) if r[2].seq > applied]
    head = (journal / f"seg-{block.head_segment:016x}.log", block.head_offset)
    if where == "behind_head_hint":
        candidates = [r for r in records if (r[0], r[1]) < head]
    else:
        candidates = [r for r in records if (r[0], r[1]) >= head]
    assert len(candidates) > 20, f"too few unshipped records {where}: {len(candidates)}, {block}"
    segment, offset, record = candidates[len(candidates) // 2]
    later = [r for _, _, r in records if r.seq > record.seq]
    assert any(r.durable >= record.seq for r in later), "a later record must prove it durable"
    corrupt_byte(segment, offset + RECORD_HEADER.size + len(record.data) // 2)
    volumes_before = {i: p.read_bytes() for i, p in c.volumes.items()}
    replicas_before = {i: p.read_bytes() for i, p in c.replica_paths().items()}

    result = run_to_exit(c.source)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    [error] = errors
    assert f"journal segment {segment}" in error and f"record seq {record.seq} is damaged" in error
    if where == "after_head_hint":
        assert "acknowledged writes are unreadable" in error, error
    assert {i: p.read_bytes() for i, p in c.volumes.items()} == volumes_before
    assert {i: p.read_bytes() for i, p in c.replica_paths().items()} == replicas_before
    with c.log.lock:
        report = check_prefix(c.log, replicas_before)
    assert report.ok, report


def test_damaged_record_in_a_running_source_is_logged_and_resynced(
    uncached_cluster: Cluster,
) -> None:
    """A byte flipped in the middle of a durable journal record that a running
    source has not shipped yet (the target is down, the link held in a
    partition, so the shipper is not reading ahead). When the link comes back
    the shipper reads the record: one ERROR line names the journal segment and
    the damaged seq, no damaged record reaches the replica (it stays a
    write-order prefix throughout), and the group converges byte for byte (the
    source's volumes are resynced by hash). The journal's memory cache is off
    here: with it, the shipper would send the record from memory, as written."""
    c = uncached_cluster
    writer = c.writer(801, flush_every=16)
    time.sleep(0.3)
    writer.stop()
    c.caught_up()
    c.proxy.partition()
    c.target.stop()  # a FIN (no reset) ends the session; reconnects wait in the partition
    writer = c.writer(802, flush_every=16)
    time.sleep(0.6)
    writer.stop()
    assert writer.error is None, writer.error
    journal = c.source.state_dir / "groups" / c.group_id() / "journal"
    applied = applied_seq(c.target.state_dir / "groups" / c.group_id())
    records = [r for r in journal_records(journal) if r[2].seq > applied]
    assert len(records) > 100, f"only {len(records)} unshipped records"
    segment, offset, record = records[len(records) // 2]
    assert any(r.durable >= record.seq for _, _, r in records), "the victim must be durable"
    corrupt_byte(segment, offset + RECORD_HEADER.size + len(record.data) // 2)
    c.target.start()
    c.check_prefix_now("target back, link still held")
    c.proxy.heal()

    def damaged_line() -> list[str]:
        lines = [line for line in c.source.log().splitlines() if "damaged" in line]
        if not lines:
            c.check_prefix_now("while the source meets the damaged record")
        return lines

    wait_until(
        damaged_line,
        20,
        "an error about the damaged record",
        detail=c.logs,
        interval=0.1,
    )
    errors = [
        line for line in c.source.log().splitlines() if "damaged" in line and " ERROR " in line
    ]
    assert len(errors) == 1, errors
    [error] = errors
    assert " ERROR " in error and f"journal segment {segment}" in error, error
    assert f"record seq {record.seq} is damaged" in error, error
    for _ in range(3):
        c.check_prefix_now("resync after the damaged record")
        time.sleep(0.1)
    c.check_converged("damaged record in a running source")


def _peer_lines(log: str, port: int) -> list[str]:
    return [line for line in log.splitlines() if f"'127.0.0.1', {port})" in line]


def _raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Connect to the target, send ``data``; (our port, what came back until the
    target closed the connection). Bounded by ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        ours = sock.getsockname()[1]
        sock.sendall(data)
        received = b""

        def closed() -> bool:
            nonlocal received
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return True
            received += chunk
            return not chunk

        wait_until(closed, timeout, "the target to close the connection", interval=0)
    return ours, received


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IB", len(payload), kind) + payload


def _wait_log_line(node: NodeProcess, port: int, timeout: float = 10) -> list[str]:
    wait_until(
        lambda: _peer_lines(node.log(), port),
        timeout,
        f"a line of {node.name}'s log about the peer at port {port}",
    )
    time.sleep(0.2)  # a second line would come right after the first
    return _peer_lines(node.log(), port)


def test_garbage_on_the_replication_port_is_dropped_with_one_line(cluster: Cluster) -> None:
    """Garbage, an unknown frame, a frame that is not HELLO, a HELLO that is not
    JSON and a malformed HELLO: each connection is dropped (a malformed HELLO gets
    REFUSED first) with exactly one log line naming the peer and the cause, while
    the real source keeps replicating; afterwards the replica converges."""
    c = cluster
    port = port_of(c.target.address("replication"))
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "dropping connection: frame of"),
        (_frame(99, b""), "dropping connection: unknown frame type 99"),
        (
            _frame(wire.FrameType.ACK, bytes(24)),
            "dropping connection: the first frame must be HELLO",
        ),
        (
            _frame(wire.FrameType.HELLO, b"{not json"),
            "dropping connection: HELLO frame is not JSON",
        ),
        (_frame(wire.FrameType.HELLO, b'{"hello": "world"}'), "refused: malformed HELLO"),
    ]
    writer = c.writer(301, flush_every=16)
    try:
        for data, expected in cases:
            ours, answer = _raw_exchange(port, data)
            lines = _wait_log_line(c.target, ours)
            assert len(lines) == 1, f"{data[:20]!r}: {lines}"
            assert expected in lines[0] and " WARNING " in lines[0], lines[0]
            if "refused" in expected:
                decoder = wire.FrameDecoder()
                decoder.feed(answer)
                frame = decoder.next_frame()
                assert isinstance(frame, wire.Control) and frame.type == wire.FrameType.REFUSED
                assert frame.body["error"] == "malformed HELLO"
            else:
                assert answer == b""
            c.check_prefix_now(f"after {expected}")
        assert c.target.proc is not None and c.target.proc.poll() is None
    finally:
        writer.stop()
    assert writer.error is None, writer.error
    c.check_converged("garbage on the replication port")


def test_batch_with_a_bad_crc_is_dropped_and_damages_nothing(cluster: Cluster) -> None:
    """With the real link held in a partition, a raw client says HELLO for the real
    group (same volumes), gets WELCOME, and sends the next seq's BATCH with one
    payload byte flipped (its record CRC fails): the connection is dropped with
    one log line, the record is not taken (the target's received seq does not
    move), and once healed the real source ships that seq and the replica
    converges byte for byte."""
    c = cluster
    writer = c.writer(401, flush_every=16)
    try:
        time.sleep(0.3)
        c.proxy.partition()
        time.sleep(0.3)
        gid = c.group_id()
        hello = {
            "version": wire.VERSION,
            "node": "impostor",
            "group": gid,
            "name": c.group,
            "mode": "async",
            "volumes": [{"name": n, "size": VOLUME_SIZE} for n in VOLUMES],
        }
        port = port_of(c.target.address("replication"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            ours = sock.getsockname()[1]
            sock.sendall(wire.encode_control(wire.FrameType.HELLO, hello))
            decoder = wire.FrameDecoder()

            def welcomed() -> Any:
                frame = decoder.next_frame()
                if frame is None:
                    chunk = sock.recv(65536)
                    assert chunk, "the target closed instead of WELCOME"
                    decoder.feed(chunk)
                return frame

            welcome = wait_until(
                welcomed, 10, "WELCOME", until=lambda frame: frame is not None, interval=0
            )
            assert isinstance(welcome, wire.Control) and welcome.type == wire.FrameType.WELCOME
            durable = int(welcome.body["durable_seq"])
            record = Record(durable + 1, 1, 0, 0, 4096, time.time_ns(), durable, os.urandom(4096))
            frame = bytearray(wire.encode_batch(uuid.UUID(gid), [record], None))
            frame[-100] ^= 0xFF  # in the payload: the record's CRC no longer matches
            sock.sendall(frame)
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
        lines = _wait_log_line(c.target, ours)
        assert len(lines) == 1, lines
        assert " WARNING " in lines[0] and "dropping connection" in lines[0], lines[0]
        assert "CRC" in lines[0], lines[0]
        [status] = [g for g in fresh_status(c.target)["groups"] if g["group"] == gid]
        assert status["received_seq"] == durable, status
        c.check_prefix_now("after the bad BATCH")
        c.proxy.heal()
        time.sleep(0.3)
    finally:
        writer.stop()
        c.proxy.heal()
    assert writer.error is None, writer.error
    c.check_converged("bad BATCH")


# Known bug: the shipper dies on a write to a link the loop saw reset -------


def test_shipper_survives_a_reset_seen_before_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic form of a failure the randomized test hits now and then
    (a target killed or a link refused: the proxy resets the new connection).

    In process, on uvloop (what ``havend run`` uses when it is installed): a
    target resets every connection, and each connection is handed to the
    shipper only once the loop has seen that reset, as happens when the loop is
    busy. The shipper's HELLO write then raises RuntimeError("unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed"); a
    shipper must treat that like any broken link: log it and reconnect.
    """
    import asyncio

    import uvloop  # havend's dependency on Linux (service/pyproject.toml): never skipped

    from havend.journal import Journal
    from havend.ship.shipper import Shipper, ShipperSettings
    from havend.ship.source import SourceGroup
    from havend.volume import FileVolume

    async def scenario() -> tuple[int, BaseException | None]:
        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        real_open = asyncio.open_connection
        attempts = 0

        async def open_after_reset(*args: Any, **kwargs: Any) -> Any:
            nonlocal attempts
            attempts += 1
            reader, writer = await real_open(*args, **kwargs)
            for _ in range(200):  # bounded: until the loop has seen the reset
                if writer.transport.is_closing():
                    break
                await asyncio.sleep(0.005)
            return reader, writer

        monkeypatch.setattr(asyncio, "open_connection", open_after_reset)
        volume = make_volume(tmp_path / "v.img", MiB)
        journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=MiB)
        group = SourceGroup(uuid.uuid4(), "g", [("v", FileVolume(volume))], journal)
        group.bind(asyncio.get_running_loop())
        settings = ShipperSettings("127.0.0.1", port, min_backoff=0.01, max_backoff=0.02)
        shipper = Shipper(group, settings, None, "src")
        task = asyncio.ensure_future(shipper.run())
        await asyncio.sleep(1.0)
        died = task.exception() if task.done() else None
        shipper.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
        group.close()
        return attempts, died

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        attempts, died = runner.run(scenario())
    assert died is None, f"the shipper task died after {attempts} attempt(s): {died!r}"
    assert attempts >= 5, f"only {attempts} connection attempts in 1 s"


# kill -9 inside one write of the source (strace) -----------------------------


def _strace() -> str:
    """strace places a kill -9 (or an error, a delay) on one exact system call;
    tools/setup.sh installs it, so a missing one fails."""
    return require_tool("strace")


def _wait_traced(pid: int, timeout: float = 10) -> None:
    """Until every thread of ``pid`` has a tracer (strace finished attaching)."""

    def tracers() -> list[int]:
        found = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                found.append(int(status.split("TracerPid:")[1].split()[0]))
        return found

    try:
        wait_until(
            tracers,
            timeout,
            f"a tracer on every thread of {pid}",
            until=lambda found: found and all(found),
            interval=0.02,
        )
    except WaitTimeout as exc:
        raise RuntimeError(f"strace did not attach to {pid} within {timeout} s: {exc}") from None


def _kill_at_first_pwrite(pid: int, paths: list[Path]) -> subprocess.Popen[bytes]:
    """strace ``pid``: SIGKILL it on entry to its first pwrite64 or pwritev (the
    journal writes a record's pieces with one pwritev) to one of ``paths`` (the
    write itself never happens)."""
    command = [_strace(), "-f", "-qq", "-o", "/dev/null", "-p", str(pid)]
    for path in paths:
        command += ["-P", str(path)]
    writes = "pwrite64,pwritev,pwritev2"
    command += ["-e", f"trace={writes}", "-e", f"inject={writes}:signal=KILL:when=1"]
    tracer = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_traced(pid)
    except BaseException:
        tracer.kill()
        tracer.wait(10)
        raise
    return tracer


def _launch_traced(node: NodeProcess, strace_args: list[str]) -> subprocess.Popen[bytes]:
    """``havend run`` for ``node`` under strace (from its first instruction), its log
    appended to the node's log; returns the strace process."""
    (node.state_dir / "status.json").unlink(missing_ok=True)
    command = [_strace(), "-f", "-qq", "-o", "/dev/null", *strace_args]
    command += [sys.executable, "-m", "havend", "run", "--config", str(node.config_path)]
    with open(node.log_path, "ab") as log:
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )


def _reap(tracer: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait for strace (it ends when its tracee is killed); kill the whole session if not."""
    try:
        tracer.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tracer.pid, signal.SIGKILL)
        tracer.wait(10)
        raise RuntimeError("setup: strace's tracee was not killed where intended") from None


@pytest.mark.parametrize("where", ["journal_append", "local_write"])
def test_source_killed_between_journal_append_and_local_write_converges(
    cluster: Cluster, where: str
) -> None:
    """kill -9 of the source exactly inside one write: strace kills it on entry
    to its first pwrite64 to a journal segment (``journal_append``: neither the
    record nor the local copy is written) or to the volume file (``local_write``:
    the record is, the local copy is not). The write was never acknowledged, so
    it may be lost or kept, but after the restart it must be on both copies or
    on neither, and once the lag is 0 the volumes equal the replicas (a); this
    once failed (the local copy was written first, so a kill between the two
    left a change on the source that no record carried)."""
    c = cluster
    _stamp_writes(c, 501, 200)
    c.caught_up()
    journal = c.source.state_dir / "groups" / c.group_id() / "journal"
    if where == "journal_append":
        paths = sorted(journal.glob("seg-*.log"))
        newest = int(paths[-1].name[4:20], 16)
        paths.append(journal / f"seg-{newest + 1:016x}.log")  # should the append roll
    else:
        paths = [c.volumes[0]]
    assert c.source.proc is not None
    clients = {i: NBDClient.tcp("127.0.0.1", c.nbd_port(), n) for i, n in enumerate(VOLUMES)}
    try:
        writer = StampWriter(clients, log=c.log, seed=502, flush_every=16)
        tracer = _kill_at_first_pwrite(c.source.proc.pid, paths)
        try:
            with contextlib.suppress(OSError, HavendError):
                writer.write(0, 7)  # the source dies in the middle of it
        finally:
            _reap(tracer, 10)
        c.source.proc.wait(10)
    finally:
        for client in clients.values():
            client.close(disconnect=False)
    victim = c.log.writes[-1]
    block = make_block(victim.seq, 0, 7)
    if c.log.is_acked(victim.seq):
        raise RuntimeError("setup: the write in flight was acknowledged: the kill missed")
    journaled = any(r.data == block for _, _, r in journal_records(journal))
    local = c.block_on(0, 7)
    if journaled != (where == "local_write") or (local is not None and local.seq == victim.seq):
        raise RuntimeError(f"setup: killed elsewhere (journaled {journaled}, local {local})")

    c.source.start()
    c.caught_up()
    on_source = c.block_on(0, 7)
    on_replica = c.block_on(0, 7, replica=True)
    assert on_source == on_replica, (
        f"lag 0, but volume 0 block 7 holds {on_source} on the source and {on_replica} "
        f"on the replica (the write in flight was {victim})"
    )
    assert (on_source is not None and on_source.seq == victim.seq) == journaled
    c.settle_in_flight()
    c.check_converged(f"kill -9 at the {where.replace('_', ' ')}")


# A target killed during its redo --------------------------------------------


def _replica_files(c: Cluster) -> tuple[dict[str, Any], int, dict[int, bytes]]:
    directory = c.target.state_dir / "groups" / c.group_id()
    sync = json.loads((directory / "sync.json").read_text())
    applied = applied_seq(directory)
    return sync, applied, {i: p.read_bytes() for i, p in c.replica_paths().items()}


def test_target_killed_during_its_redo_keeps_a_consistent_replica_a_prefix(
    cluster: Cluster,
) -> None:
    """(b) after kill -9 of the target and its restart, before catching up.

    1. The target is stopped; the source takes writes to a few blocks (many
       overwrites) and FLUSHes. 2. The target starts under strace, receives
       them in one batch, applies them, and is killed on entry to the rename
       that records its applied seq (``applied.tmp`` -> ``applied``): the
       replica holds every write, the ``applied`` file says it holds none.
    3. It starts again (the source held off by a partition) and redoes those
       records from the first one; strace kills it on entry to the J-th
       replica pwrite of the redo, J chosen (by replaying the records on a
       copy of the images) so that the redo has just rewritten a block with an
       older write than one it held.
    The replica is not a prefix then, so its state must not say it is one
    (this once failed: sync.json said consistent through the redo). Started
    normally, the target finishes the redo and the group converges."""
    c = cluster
    directory = c.target.state_dir / "groups" / c.group_id()
    clients = {i: NBDClient.tcp("127.0.0.1", c.nbd_port(), n) for i, n in enumerate(VOLUMES)}
    try:
        writer = StampWriter(clients, log=c.log, seed=601, blocks=8, flush_every=64)
        writer.run(64)
        c.caught_up()
        c.proxy.partition()  # no resets of the source's link (see SHIPPER_BUG)
        c.target.stop()
        _, applied_before, _ = _replica_files(c)
        writer.run(500)
    finally:
        for client in clients.values():
            client.close()

    # 2. Apply everything, die before recording it.
    tracer = _launch_traced(
        c.target,
        [
            "-P",
            str(directory / "applied.tmp"),
            "-e",
            "trace=rename",
            "-e",
            "inject=rename:signal=KILL:when=1",
        ],
    )
    try:

        def started() -> bool:
            if (c.target.state_dir / "status.json").exists():
                return True
            if tracer.poll() is not None:
                raise RuntimeError("setup: the traced target did not start (strace ended)")
            return False

        try:
            wait_until(started, 30, "the traced target's status.json")
        except WaitTimeout as exc:
            raise RuntimeError(f"setup: the traced target did not start: {exc}") from None
        c.proxy.heal()
        _reap(tracer)
    finally:
        c.proxy.partition()
    sync, applied, images = _replica_files(c)
    with c.log.lock:
        ahead = check_prefix(c.log, images)
    if applied != applied_before or not ahead.ok or (ahead.min_seq or 0) < c.log.last_seq - 5:
        raise RuntimeError(f"setup: want every write applied, none recorded: {applied}, {ahead}")

    # 3. Choose where to stop the redo: replay the records after `applied` on a copy.
    redo = [r for _, _, r in journal_records(directory / "journal") if r.seq > applied]
    redo.sort(key=lambda r: r.seq)
    copy = {i: bytearray(image) for i, image in images.items()}
    stop_at = None
    for j, record in enumerate(redo, start=1):
        copy[record.volume][record.offset : record.offset + len(record.data)] = record.data
        with c.log.lock:
            if not check_prefix(c.log, copy).ok:
                stop_at = j + 1  # killed on entry to the next pwrite: j records redone
                break
    if stop_at is None:
        raise RuntimeError("setup: no point of the redo leaves a non-prefix replica")
    tracer = _launch_traced(
        c.target,
        [
            "-P",
            str(c.replica_paths()[0]),
            "-P",
            str(c.replica_paths()[1]),
            "-e",
            "trace=pwrite64",
            "-e",
            f"inject=pwrite64:signal=KILL:when={stop_at}",
        ],
    )
    _reap(tracer)
    sync, applied, images = _replica_files(c)
    if images != copy:
        raise RuntimeError("setup: the redo was not stopped where intended")
    state = sync["state"]
    if state == "catching_up" and applied >= sync["until"]:
        state = "consistent"
    with c.log.lock:
        report = check_prefix(c.log, images)
    assert not report.ok, report  # the point of the scenario
    assert state not in PREFIX_STATES, (
        f"target killed after redoing {stop_at - 1} of {len(redo)} records: replica "
        f"state {state} (sync.json {sync}, applied {applied}) but {report}"
    )
    c.target.start()
    c.proxy.heal()
    c.check_converged("target killed during its redo")


# (e): a full disk on the target ---------------------------------------------

# The target's journal preallocates one 64 MiB segment per group: the group
# must fit, then its sparse replicas fill what is left.
TMPFS_SIZE = "70m"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path``. Mounting needs root (CAP_SYS_ADMIN),
    which the tests have where they run (CI runs them as root on Debian 12): a
    machine that cannot mount one fails these tests, it does not skip them."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs on {path} ({result.stderr.strip() or result.returncode}): "
            "the full-disk tests need root (CAP_SYS_ADMIN) to mount one; run them as root"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)


@pytest.fixture
def full_disk_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    """A cluster whose target keeps its state and replicas on a small tmpfs
    (its config and log stay outside, where there is room)."""
    with tmpfs(tmp_path / "tgtfs", TMPFS_SIZE) as fs:
        target = target_node(tmp_path)
        config = yaml.safe_load(target.config_path.read_text())
        config["node"]["state_dir"] = str(fs / "tgt1")
        config["target"]["replica_dir"] = str(fs / "tgt1" / "rep")
        target.config_path.write_text(yaml.safe_dump(config))
        target.state_dir = fs / "tgt1"
        c = start_cluster(tmp_path, target=target)
        try:
            yield c, fs
        finally:
            c.stop()


def _fill_target_disk(c: Cluster) -> tuple[BackgroundWriter, str]:
    """Write sequentially (every block of both volumes) until the target reports
    that its disk is full; returns the running writer and the error line."""
    writer = c.writer(701, pattern="sequential", flush_every=32)

    def full_disk_lines() -> list[str]:
        lines = [
            line
            for line in c.target.log().splitlines()
            if "No space left" in line and f"group {c.group}" in line
        ]
        assert lines or writer.alive, f"the writer stopped: {writer.error}"
        return lines

    try:
        lines = wait_until(full_disk_lines, 30, "the target to report a full disk", interval=0.1)
    except WaitTimeout as exc:
        writer.stop()
        raise AssertionError(f"the target never reported a full disk: {exc}\n{c.logs()}") from None
    return writer, lines[0]


def test_full_target_disk_never_blocks_the_source_and_is_logged(
    full_disk_cluster: tuple[Cluster, Path],
) -> None:
    """(e) The target's replicas fill its tmpfs: the target logs a clear error
    (an ERROR line naming the group and ENOSPC), the replica stays a
    write-order prefix, and the source keeps acknowledging writes at full
    speed (at least 200 a second, every second): the application never waits
    for the full target."""
    c, _ = full_disk_cluster
    writer, line = _fill_target_disk(c)
    try:
        assert " ERROR " in line and f"group {c.group}" in line, line
        assert "[Errno 28] No space left on device" in line, line
        c.check_prefix_now("target disk full")
        rates = []
        for _ in range(3):  # writes acknowledged per second while the target is full
            with c.log.lock:
                before = c.log.last_acked_seq
            time.sleep(1.0)
            with c.log.lock:
                rates.append(c.log.last_acked_seq - before)
        assert min(rates) >= 200, f"the source slowed down for a full target: {rates} writes/s"
        c.check_prefix_now("target disk full, source still writing")
    finally:
        writer.stop()
    assert writer.error is None, writer.error


def test_full_target_disk_converges_once_there_is_room(
    full_disk_cluster: tuple[Cluster, Path],
) -> None:
    """(e) The target's disk fills while the source writes; then the tmpfs is
    made ten times bigger (nothing restarted): replication converges to byte
    equality by itself. This once failed: ENOSPC ended the target's applier
    task and its status reports for good."""
    c, fs = full_disk_cluster
    writer, _ = _fill_target_disk(c)
    try:
        time.sleep(0.5)
        resize_tmpfs(fs, "400m")
        time.sleep(0.5)
    finally:
        writer.stop()
    assert writer.error is None, writer.error
    try:
        wait_caught_up(c.source, c.target, timeout=20)
    except AssertionError as exc:
        raise AssertionError(f"no convergence within 20 s of freeing space: {exc}") from None
    c.check_converged("after the target's disk got room again")


# Known bug: a link that ends during the target's group commit stalls the applier


def test_link_ending_during_the_target_group_commit_does_not_stall_the_replica(
    uncached_cluster: Cluster,
) -> None:
    """Deterministic form of a failure the damaged-record test hits about every
    other run. 1. With the target down, the source journals 300 writes. 2. The
    target starts with strace slowing its journal fdatasyncs to 2 s each; the
    source ships the 300 records in one batch, and is killed (kill -9: the
    link ends) while the target's group commit sleeps in that fdatasync. 3. The
    fdatasync completes: the target holds durable records it does not apply
    (precondition, checked). 4. Behind a partition the source restarts and
    journals more writes, the first of them damaged; healed, the source reads
    it, logs it and resyncs by hash. The replica must converge."""
    c = uncached_cluster
    _stamp_writes(c, 901, 100)
    c.caught_up()
    c.proxy.partition()
    c.target.stop()
    _stamp_writes(c, 902, 300)
    last = int(fresh_status(c.source)["groups"][0]["last_seq"])
    c.target.start()
    target_journal = c.target.state_dir / "groups" / c.group_id() / "journal"
    segments = sorted(target_journal.glob("seg-*.log"))
    newest = int(segments[-1].name[4:20], 16)
    segments += [target_journal / f"seg-{newest + i:016x}.log" for i in (1, 2)]
    assert c.target.proc is not None
    command = [_strace(), "-f", "-qq", "-o", "/dev/null", "-p", str(c.target.proc.pid)]
    for path in segments:
        command += ["-P", str(path)]
    command += ["-e", "trace=fdatasync", "-e", "inject=fdatasync:delay_enter=2000000"]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_traced(c.target.proc.pid)
        c.proxy.heal()

        def replica_group() -> dict[str, Any]:
            [replica] = [g for g in c.target.status()["groups"] if g["name"] == c.group]
            return replica

        try:  # until the batch is in (not yet durable), then end the link
            wait_until(
                replica_group,
                15,
                f"the target to receive seq {last}",
                until=lambda replica: replica["received_seq"] >= last,
                interval=0.02,
            )
        except WaitTimeout as exc:
            raise RuntimeError(f"setup: the batch never arrived: {exc}") from None
        c.source.kill()
        time.sleep(2.5)  # the slow fdatasync completes
    finally:
        tracer.terminate()  # strace detaches; the target runs on at full speed
        tracer.wait(10)
    [stalled] = [g for g in fresh_status(c.target)["groups"] if g["name"] == c.group]
    if not stalled["applied_seq"] < stalled["durable_seq"] == last:
        raise RuntimeError(f"setup: want {last} durable and not applied: {stalled}")
    c.proxy.partition()
    c.source.start()
    _stamp_writes(c, 903, 50)
    journal = c.source.state_dir / "groups" / c.group_id() / "journal"
    [(segment, offset, record)] = [r for r in journal_records(journal) if r[2].seq == last + 1]
    corrupt_byte(segment, offset + RECORD_HEADER.size + len(record.data) // 2)
    c.proxy.heal()
    try:
        wait_until(lambda: "damaged" in c.source.log(), 20, "the source to read the damaged record")
    except WaitTimeout:
        raise RuntimeError("setup: the source never read the damaged record") from None
    try:
        wait_caught_up(c.source, c.target, timeout=15)
    except AssertionError as exc:
        raise AssertionError(
            f"no convergence within 15 s; the target held {stalled}: {exc}"
        ) from None
    c.check_converged("link ended during the target's group commit")


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
def test_a_local_write_that_fails_leaves_both_copies_equal(cluster: Cluster, error: str) -> None:
    """The source volume refuses one write (strace makes its first pwrite64 to
    the volume file fail with EIO or ENOSPC) after the record was journaled.
    The client gets the error; the replica must end up holding what the
    source volume holds (not the refused data), and the group goes on."""
    c = cluster
    _stamp_writes(c, 601, 100)
    c.caught_up()
    assert c.source.proc is not None
    command = [_strace(), "-f", "-qq", "-o", "/dev/null", "-p", str(c.source.proc.pid)]
    command += ["-P", str(c.volumes[0]), "-e", "trace=pwrite64"]
    command += ["-e", f"inject=pwrite64:error={error}:when=1"]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_traced(c.source.proc.pid)
        with NBDClient.tcp("127.0.0.1", c.nbd_port(), VOLUMES[0]) as client:
            with pytest.raises(HavendError) as refused:
                client.write(7 * DEFAULT_BLOCK_SIZE, make_block(10**9, 0, 7))
            assert getattr(refused.value, "error", None), refused.value
    finally:
        tracer.terminate()
        tracer.wait(10)
    assert "failed" in c.source.log() and "will match what the local copy holds" in c.source.log()
    _stamp_writes(c, 602, 100)
    c.caught_up()
    assert c.block_on(0, 7) == c.block_on(0, 7, replica=True)
    for i, path in c.replica_paths().items():
        assert path.read_bytes() == c.volumes[i].read_bytes(), f"volume {i} differs"
