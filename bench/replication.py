"""Replication benchmark: a havend source+target pair against plain peers, in one run.

One havend source node (one group, one volume) ships to one target node over
mutual TLS 1.3 on loopback (certificates made by ``havend certs`` for the run),
with the group's defaults (async, zstd level 3) except a 2 GiB journal. Both
nodes rewrite ``status.json`` every ``STATUS_PERIOD`` s (``status_period``; the
period actually seen is reported, as havend ignores keys it does not know).
The volume is a raw file on the repository's file system, zero-filled; the
replica starts empty and the initial sync must finish (target ``consistent``)
before anything is measured. Three measurements, each checked byte for byte:

1. Replicated write throughput, MB/s (10^6 bytes/s): ``nbdcopy --flush`` of a
   random source file to the source node's export, from the start of nbdcopy
   until the first source status (written after nbdcopy exited) that shows
   ``acked_seq == last_seq``: every write durable on the target. The status
   ``time`` of that snapshot is the end (conservative by at most one status
   period; the bracket is kept). Peer: the same nbdcopy into ``qemu-nbd -f raw
   -t --cache=writeback`` on a zero-filled file on the same disk, no
   replication. ``--runs`` alternating runs each (havend, qemu-nbd, ...),
   median; ``sync`` before each. After each qemu-nbd run, the *floor*: the
   design's essential work at C speed (bench/floor.py: the same nbdcopy into
   qemu-nbd, the bytes appended to a source journal in the page cache, sent
   over TLS 1.3 and appended to a target journal synced per 32 MiB; no
   protocol), until the target journal is durable: ``throughput_floor_ratio``
   is meant as the most any implementation of the design can reach on this
   machine (it is one only while the machine holds still: see bench/floor.py).
   Around every run of the three, the busy core-seconds of the whole machine
   (/proc/stat) are counted: ``throughput.cpu_budget`` sets them per GiB
   against the budget of the target (every core busy for the whole of a copy
   at 0.7 x qemu-nbd's median), so whether a design *can* reach the target on
   this machine is a figure, not a guess.
2. Replication lag under a paced 50 MB/s writer (havend's blocking NBD client,
   1 MiB writes on a fixed schedule, no flushes, for ``--lag-seconds``). Each
   write carries a stamp (run nonce, write index) in its first bytes; a thread
   polls the *target's replica file* at that offset every millisecond, so the
   lag of each write is a true end-to-end figure: from just before the write was
   submitted until its bytes are readable in the replica. p50/p99 over every
   write. The source status ``lag_seconds`` (age of the oldest unacknowledged
   write) is sampled too, as a cross-check.
3. Delta resync of the volume after 1% of its 4 KiB blocks changed behind the
   journal's back: a 1 MiB write through NBD (so the target's seq is ahead),
   caught up, the source stopped, random blocks of its volume file rewritten,
   its group state (``<state_dir>/groups/<id>``, journal included; the group
   id is kept) deleted; on restart the source finds the target ahead of its
   new journal and runs the hash resync. Time: between the "resync ...
   begins" and "resync done" log lines; bytes: the status
   ``resync.wire_bytes`` (hash requests and replies plus block data, both
   directions), also the TCP byte counters of the connection (``ss``, TLS
   included). Peer: ``rsync --inplace --no-whole-file --ignore-times -B 4096``
   from the changed volume file to a copy of it made before the change. Every
   file is written back and dropped from the page cache before each side, so
   both read cold. ``--resync-runs`` runs (other blocks each time), median.

Reading ``bench/results/replication.json``: ``throughput_ratio`` is havend's
MB/s over qemu-nbd's (higher is better; ``throughput_floor_ratio`` the
floor's), ``lag_p50_s``/``lag_p99_s`` the lag,
``resync_bytes_ratio`` havend's resync wire bytes over the changed bytes
(1.0 = only the changed blocks), ``resync_time_ratio`` havend's resync time
over rsync's (lower is better). Targets: throughput >= 0.7, lag p99 <= 1 s,
bytes <= 1.05, time <= 0.5; reported, not enforced. Any tool that fails,
times out or leaves wrong data makes the benchmark exit non-zero. The file
helpers and the qemu-nbd peer are nbd_ingest.py's, so both benchmarks agree.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    ROOT,
    BenchError,
    busy_core_seconds,
    cpu_seconds,
    disk_write_bytes,
    drop_cache,
    first_line,
    free_port,
    machine_info,
    percentile,
    run,
    run_benchmark,
    stop,
    sync,
)
from floor import floor_copy
from nbd_ingest import (
    Server,
    assert_same,
    running,
    start_qemu_nbd,
    write_random,
    write_zeroes,
)

from havend.nbd.client import NBDClient

HOST = "127.0.0.1"
HAVEND = ROOT / ".venv" / "bin" / "havend"
GROUP = "bench"
VOLUME = "vol"
CONNECTIONS = 4
STATUS_PERIOD = 0.1  # s between status.json rewrites (the nodes' status_period)
BLOCK = 4096
LAG_CHUNK = 1 << 20
LAG_POLL = 0.001
# 32 x 64 MiB: a 1 GiB copy barely fits havend's default 16 x 64 MiB journal (the
# shipper hardly ships while nbdcopy writes), and JournalFull would fail the writes;
# this measures throughput, not journal capacity. Peak use is reported.
JOURNAL = {"segment_size": 64 << 20, "max_segments": 32}
TARGETS = {
    "throughput_ratio": (">=", 0.7),
    "lag_p99_s": ("<=", 1.0),
    "resync_bytes_ratio": ("<=", 1.05),
    "resync_time_ratio": ("<=", 0.5),
}
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_RESYNC_BEGINS = re.compile(r"resync \((.*)\) of (\d+) bytes begins")
_RESYNC_DONE = re.compile(
    r"resync done: (\d+) bytes compared, (\d+) bytes of blocks sent \((\d+) on the wire\) "
    r"in ([\d.]+) s"
)


# Nodes -----------------------------------------------------------------------


@dataclass
class Node:
    """One ``havend run`` process, its config, state directory and log."""

    name: str
    config: dict[str, Any]
    work: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.work / self.name

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.log"

    @property
    def command(self) -> list[str]:
        return [str(HAVEND), "run", "--config", str(self.work / f"{self.name}.yaml")]

    def start(self, timeout: float = 30) -> Node:
        """Start (or restart) the node; ready once it wrote its first status."""
        status = self.state_dir / "status.json"
        status.unlink(missing_ok=True)
        # JSON is YAML: no YAML writer needed.
        (self.work / f"{self.name}.yaml").write_text(json.dumps(self.config, indent=1))
        try:
            with self.log.open("ab") as err:
                self.proc = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
                )
        except OSError as exc:
            raise BenchError(f"cannot start {self.name}: {exc}") from None
        deadline = time.monotonic() + timeout
        while not status.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not up after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is not running (status {code}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            code = stop(self.proc)
            if code not in (0, -signal.SIGTERM):
                raise BenchError(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        """The last status.json (replaced atomically, but absent for an instant)."""
        for _ in range(100):
            try:
                return json.loads((self.state_dir / "status.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.01)
        raise BenchError(f"{self.name}: no readable status.json")

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def problems(self, level: str = "WARNING|ERROR") -> list[str]:
        return [line for line in self.log_lines() if re.search(rf" ({level}) ", line)]


def only_group(status: dict[str, Any], node: str) -> dict[str, Any]:
    groups = status["groups"]
    if len(groups) != 1:
        raise BenchError(f"{node}: expected one group in its status, got {len(groups)}")
    return groups[0]


@dataclass
class Pair:
    source: Node
    target: Node
    volume: Path
    replica: Path
    transport: str
    nbd_uri: str = ""

    def nodes(self) -> tuple[Node, Node]:
        return self.source, self.target

    def start_source(self) -> None:
        self.source.start()
        nbd = self.source.status()["addresses"]["nbd"]
        self.nbd_uri = f"{nbd}/{VOLUME}"

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(source status, its group) and (target status, its group or {})."""
        for node in self.nodes():
            node.check_alive()
        src, tgt = self.source.status(), self.target.status()
        src["group"] = only_group(src, self.source.name)
        tgt["group"] = only_group(tgt, self.target.name) if tgt["groups"] else {}
        return src, tgt

    def wait(
        self, what: str, done: Callable[[dict, dict], bool], timeout: float, since: float = 0.0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Poll both statuses until ``done`` holds for statuses written after ``since``."""
        since = since or time.time()
        deadline = time.monotonic() + timeout
        while True:
            src, tgt = self.snapshot()
            if src["time"] > since and tgt["time"] > since and done(src, tgt):
                return src, tgt
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{what}: not after {timeout:.0f} s\nsource {src['group']}\n"
                    f"target {tgt['group']}\n--- source log\n{self.source.log_tail()}\n"
                    f"--- target log\n{self.target.log_tail()}"
                )
            time.sleep(STATUS_PERIOD / 2)

    def wait_caught_up(self, timeout: float = 120) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every write acknowledged and applied; the replica consistent."""
        return self.wait("caught up", caught_up, timeout)


def caught_up(src: dict[str, Any], tgt: dict[str, Any]) -> bool:
    g, t = src["group"], tgt["group"]
    return bool(
        t
        and g["acked_seq"] == g["last_seq"]
        and t["applied_seq"] == g["last_seq"]
        and t["state"] == "consistent"
        and not (g["resync"] or {}).get("running")
    )


def make_pki(work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A CA and a certificate per node, with ``havend certs`` (TLS for the pair)."""
    ca, pki = work / "ca", work / "pki"
    run([str(HAVEND), "certs", "init", "--dir", str(ca)], timeout=60)
    tls = {}
    for name, sans in (("tgt1", ["tgt1", HOST]), ("src1", ["src1"])):
        argv = [str(HAVEND), "certs", "issue", "--ca", str(ca), "--name", name]
        argv += [arg for san in sans for arg in ("--san", san)] + ["--out", str(pki)]
        run(argv, timeout=60)
        tls[name] = {
            "cert": str(pki / f"{name}.pem"),
            "key": str(pki / f"{name}.key"),
            "ca": str(pki / "ca.pem"),
        }
    return tls["src1"], tls["tgt1"]


def make_pair(work: Path, volume: Path) -> Pair:
    src_tls, tgt_tls = make_pki(work)
    port = free_port(HOST)
    common = {"status_interval": 5, "status_period": STATUS_PERIOD}
    target = Node(
        "tgt1",
        {
            "node": {"name": "tgt1", "role": "target", "state_dir": str(work / "tgt1")},
            "tls": tgt_tls,
            "target": {
                "listen": {"host": HOST, "port": port},
                "replica_dir": str(work / "tgt1" / "replicas"),
            },
        }
        | common,
        work,
    )
    source = Node(
        "src1",
        {
            "node": {"name": "src1", "role": "source", "state_dir": str(work / "src1")},
            "tls": src_tls,
            "source": {
                "nbd": {"host": HOST, "port": 0},
                "target": {"host": HOST, "port": port, "server_name": "tgt1"},
                "groups": [
                    {
                        "name": GROUP,
                        "volumes": [{"name": VOLUME, "path": str(volume)}],
                        "journal": JOURNAL,
                    }
                ],
            },
        }
        | common,
        work,
    )
    replica = work / "tgt1" / "replicas" / GROUP / f"{VOLUME}.img"
    return Pair(source, target, volume, replica, "mutual TLS 1.3 (havend certs), loopback")


# 1. Throughput ---------------------------------------------------------------


@dataclass
class Throughput:
    ours: list[float] = field(default_factory=list)  # MB/s, until acknowledged
    ours_applied: list[float] = field(default_factory=list)  # MB/s, until applied
    ours_ingest: list[float] = field(default_factory=list)  # MB/s, nbdcopy alone
    ours_bracket_s: list[float] = field(default_factory=list)  # end-time uncertainty
    ours_peak_journal: list[int] = field(default_factory=list)
    ours_peak_lag_bytes: list[int] = field(default_factory=list)
    ours_unacked_at_end: list[int] = field(default_factory=list)  # when nbdcopy exited
    ours_tail_s: list[float] = field(default_factory=list)  # nbdcopy exit -> acknowledged
    ours_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # per node, per run
    ours_disk: dict[str, list[int]] = field(default_factory=dict)  # bytes written, per node
    journal_capacity: int = 0
    peer: list[float] = field(default_factory=list)
    peer_cpu_s: list[float] = field(default_factory=list)
    peer_disk: list[int] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    floor: list[float] = field(default_factory=list)  # MB/s, essential work only, durable
    floor_with_apply: list[float] = field(default_factory=list)  # same, replica written too
    # Busy core-seconds of the whole machine during each run (every process).
    ours_machine_cpu_s: list[float] = field(default_factory=list)
    peer_machine_cpu_s: list[float] = field(default_factory=list)
    floor_machine_cpu_s: list[float] = field(default_factory=list)


def nbdcopy_argv(source: Path, uri: str) -> list[str]:
    return ["nbdcopy", f"--connections={CONNECTIONS}", "--flush", str(source), uri]


def replicated_copy(pair: Pair, source: Path, size: int, result: Throughput) -> None:
    """One nbdcopy to the source node, timed until the target acknowledged it all."""
    argv = nbdcopy_argv(source, pair.nbd_uri)
    result.commands["havend"] = shlex.join(argv)
    sync()
    peak_journal = peak_lag = 0
    cpu = {n.name: cpu_seconds(n.proc.pid) for n in pair.nodes() if n.proc}
    disk = {n.name: disk_write_bytes(n.proc.pid) for n in pair.nodes() if n.proc}
    busy, own = busy_core_seconds(), time.process_time()
    start = time.time()
    try:
        copy = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise BenchError(f"cannot run nbdcopy: {exc}") from None
    try:
        deadline = time.monotonic() + 300
        while copy.poll() is None:
            src, _ = pair.snapshot()
            peak_journal = max(peak_journal, src["group"]["journal_used"])
            peak_lag = max(peak_lag, src["group"]["lag_bytes"])
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after 300 s: {shlex.join(argv)}")
            time.sleep(0.01)
        copied = time.time()
        if copy.returncode != 0:
            err = copy.stderr.read().decode(errors="replace") if copy.stderr else ""
            raise BenchError(
                f"exit status {copy.returncode}: {shlex.join(argv)}\n{err[-2000:]}\n"
                f"--- source log\n{pair.source.log_tail()}"
            )
    finally:
        stop(copy, timeout=10)
        if copy.stderr:
            copy.stderr.close()
    # The first status written after nbdcopy exited with every write acknowledged.
    previous = copied
    unacked_at_end = None
    deadline = time.monotonic() + 300
    while True:
        src, _ = pair.snapshot()
        g = src["group"]
        peak_journal = max(peak_journal, g["journal_used"])
        peak_lag = max(peak_lag, g["lag_bytes"])
        if src["time"] > copied and unacked_at_end is None:
            unacked_at_end = g["lag_bytes"]
        if src["time"] > copied and g["acked_seq"] == g["last_seq"]:
            acked = src["time"]
            # Less this process's own polling of the status files.
            polling = time.process_time() - own
            result.ours_machine_cpu_s.append(busy_core_seconds() - busy - polling)
            break
        if src["time"] > copied:
            previous = max(previous, src["time"])
        if time.monotonic() > deadline:
            raise BenchError(f"not acknowledged after 300 s: {g}\n{pair.source.log_tail()}")
        time.sleep(0.005)
    last = g["last_seq"]
    result.ours_unacked_at_end.append(unacked_at_end or 0)
    result.ours_tail_s.append(acked - copied)
    result.journal_capacity = g["journal_capacity"]
    for node in pair.nodes():
        assert node.proc is not None
        used = cpu_seconds(node.proc.pid) - cpu[node.name]
        result.ours_cpu_s.setdefault(node.name, []).append(used)
        written = disk_write_bytes(node.proc.pid) - disk[node.name]
        result.ours_disk.setdefault(node.name, []).append(written)
    _, tgt = pair.wait(
        "applied", lambda s, t: bool(t["group"]) and t["group"]["applied_seq"] >= last, 300
    )
    result.ours.append(size / (acked - start) / 1e6)
    result.ours_applied.append(size / (tgt["time"] - start) / 1e6)
    result.ours_ingest.append(size / (copied - start) / 1e6)
    result.ours_bracket_s.append(acked - previous)
    result.ours_peak_journal.append(peak_journal)
    result.ours_peak_lag_bytes.append(peak_lag)


def peer_copy(server: Server, source: Path, size: int, result: Throughput) -> None:
    argv = nbdcopy_argv(source, server.uri)
    result.commands["qemu-nbd"] = shlex.join(argv)
    sync()
    cpu, disk = cpu_seconds(server.proc.pid), disk_write_bytes(server.proc.pid)
    busy = busy_core_seconds()
    start = time.perf_counter()
    run(argv, timeout=300)
    result.peer.append(size / (time.perf_counter() - start) / 1e6)
    result.peer_machine_cpu_s.append(busy_core_seconds() - busy)
    result.peer_cpu_s.append(cpu_seconds(server.proc.pid) - cpu)
    result.peer_disk.append(disk_write_bytes(server.proc.pid) - disk)


def floor_copies(
    pair: Pair, work: Path, source: Path, size: int, uri: str, result: Throughput
) -> None:
    """The essential work of the design at C speed (bench/floor.py), beside the
    same nbdcopy into qemu-nbd: meant as an upper bound for any implementation
    here, and one only while the machine holds still (see bench/floor.py)."""
    tls = (pair.source.config["tls"], pair.target.config["tls"])
    argv = nbdcopy_argv(source, uri)  # the volume synced, as havend's release does
    replica = work / "floor-replica.img"
    write_zeroes(replica, size)
    try:
        sync()
        floor = floor_copy(work, tls, argv, size)
        result.floor.append(size / floor["durable_s"] / 1e6)
        result.floor_machine_cpu_s.append(floor["machine_cpu_s"])
        sync()
        applied = floor_copy(work, tls, argv, size, replica=replica)
        result.floor_with_apply.append(size / applied["durable_s"] / 1e6)
    finally:
        replica.unlink(missing_ok=True)


def bench_throughput(
    pair: Pair, work: Path, source: Path, size: int, runs: int
) -> tuple[Throughput, str]:
    peer_volume = work / "qemu.img"
    write_zeroes(peer_volume, size)
    result = Throughput()
    with running(lambda: start_qemu_nbd(peer_volume, work)) as qemu:
        for i in range(runs):
            replicated_copy(pair, source, size, result)
            print(
                f"  throughput run {i + 1}/{runs}  havend   {result.ours[-1]:8.1f} MB/s "
                f"(nbdcopy alone {result.ours_ingest[-1]:.1f}, "
                f"applied {result.ours_applied[-1]:.1f})",
                flush=True,
            )
            if i == 0:
                pair.wait_caught_up()
                assert_same(pair.replica, source, "the replica after the first copy")
                assert_same(pair.volume, source, "the source volume after the first copy")
            peer_copy(qemu, source, size, result)
            print(
                f"  throughput run {i + 1}/{runs}  qemu-nbd {result.peer[-1]:8.1f} MB/s",
                flush=True,
            )
            if i == 0:
                assert_same(peer_volume, source, "qemu-nbd's volume after the first copy")
            floor_copies(pair, work, source, size, qemu.uri, result)
            print(
                f"  throughput run {i + 1}/{runs}  floor    {result.floor[-1]:8.1f} MB/s "
                f"(with the replica written too {result.floor_with_apply[-1]:.1f})",
                flush=True,
            )
            pair.wait_caught_up()
        qemu_command = shlex.join(qemu.command)
    peer_volume.unlink()
    return result, qemu_command


# 2. Lag ----------------------------------------------------------------------


@dataclass
class Lag:
    rate: float  # bytes/s asked for
    seconds: float
    lags: list[float] = field(default_factory=list)
    achieved_rate: float = 0.0
    max_behind_s: float = 0.0  # worst lateness of a write against its schedule
    status_lag: list[float] = field(default_factory=list)
    status_times: list[float] = field(default_factory=list)


def _stamp(nonce: int, index: int) -> bytes:
    return struct.pack("<8sQQ", b"HAVNDLAG", nonce, index)


def bench_lag(pair: Pair, size: int, rate: float, seconds: float) -> Lag:
    """A paced writer through NBD; each write's lag until readable on the target."""
    result = Lag(rate, seconds)
    slots = size // LAG_CHUNK
    count = int(rate * seconds / LAG_CHUNK)
    nonce = random.getrandbits(63)
    pool = os.urandom(min(size, 64 << 20))  # distinct data within any batch
    submitted = [0.0] * count
    seen = [0.0] * count
    failure: list[BaseException] = []
    stopping = threading.Event()
    stamp_size = len(_stamp(0, 0))

    def writer() -> None:
        try:
            with NBDClient.open(pair.nbd_uri, timeout=30) as client:
                begin = time.monotonic()
                for k in range(count):
                    due = begin + k * LAG_CHUNK / rate
                    now = time.monotonic()
                    if now < due:
                        time.sleep(due - now)
                    else:
                        result.max_behind_s = max(result.max_behind_s, now - due)
                    if stopping.is_set():
                        return
                    start = (k * LAG_CHUNK) % len(pool)
                    data = bytearray(pool[start : start + LAG_CHUNK])
                    data[:stamp_size] = _stamp(nonce, k)
                    submitted[k] = time.time()
                    client.write((k % slots) * LAG_CHUNK, data)
                result.achieved_rate = count * LAG_CHUNK / (time.monotonic() - begin)
                client.flush()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    def watcher() -> None:
        try:
            fd = os.open(pair.replica, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for k in range(count):
                    want, offset = _stamp(nonce, k), (k % slots) * LAG_CHUNK
                    while os.pread(fd, stamp_size, offset) != want:
                        if stopping.is_set():
                            return
                        time.sleep(LAG_POLL)
                    seen[k] = time.time()
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, watcher)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + seconds + 120
        last_time = 0.0
        while any(t.is_alive() for t in threads) and not failure:
            src, _ = pair.snapshot()
            if src["time"] != last_time:
                last_time = src["time"]
                if threads[0].is_alive():  # only while the writer writes
                    result.status_lag.append(src["group"]["lag_seconds"])
                    result.status_times.append(src["time"])
            if time.monotonic() > deadline:
                raise BenchError(f"lag run not over after {seconds + 120:.0f} s")
            time.sleep(STATUS_PERIOD / 2)
    finally:
        stopping.set()
        for thread in threads:
            thread.join(timeout=40)
    if failure:
        raise BenchError(f"lag run: {type(failure[0]).__name__}: {failure[0]}")
    result.lags = [s - w for s, w in zip(seen, submitted, strict=True)]
    return result


# 3. Resync -------------------------------------------------------------------


@dataclass
class ResyncRun:
    changed_blocks: int
    changed_bytes: int
    reason: str = ""
    seconds: float = 0.0  # between the log lines
    logged_seconds: float = 0.0  # what the "done" line says
    restart_to_caught_up_s: float = 0.0
    compared_bytes: int = 0
    sent_bytes: int = 0
    wire_bytes: int = 0
    tcp_bytes: dict[str, int] | None = None
    rsync_seconds: float = 0.0
    rsync_stats: dict[str, int] = field(default_factory=dict)


def _log_time(line: str) -> float:
    match = _LOG_TIME.match(line)
    if not match:
        raise BenchError(f"no time stamp on log line: {line}")
    return datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def tcp_bytes(port: int) -> dict[str, int] | None:
    """Bytes the source's connection to ``port`` sent and received (``ss -ti``)."""
    try:
        out = run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"], timeout=10)
    except BenchError:
        return None
    sent = re.findall(r"\bbytes_sent:(\d+)", out.stdout)
    received = re.findall(r"\bbytes_received:(\d+)", out.stdout)
    if len(sent) != 1 or len(received) != 1:
        return None
    return {"sent": int(sent[0]), "received": int(received[0])}


def rsync_argv(src: Path, dst: Path) -> list[str]:
    # --ignore-times: same size, and the copy's mtime may fall in the same second.
    argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-B", str(BLOCK)]
    return [*argv, "--stats", str(src), str(dst)]


def change_blocks(path: Path, blocks: list[int]) -> None:
    """New random bytes (found nowhere else in the file: rsync could match those)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for block in blocks:
            os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def resync_once(pair: Pair, work: Path, size: int, fraction: float, seed: int) -> ResyncRun:
    """Change blocks behind the journal's back; havend's resync, then rsync's."""
    # A write through the node first, so the target's seq is ahead of the fresh
    # journal the source will start with (also in a second run, after a resync).
    with NBDClient.open(pair.nbd_uri, timeout=30) as client:
        client.write(0, os.urandom(LAG_CHUNK))
        client.flush()
    pair.wait_caught_up()
    group_id = (pair.source.state_dir / "group-ids" / GROUP).read_text().strip()
    pair.source.stop()
    before = work / "rsync-dst" / "vol.img"  # the volume as the replica has it
    before.parent.mkdir(exist_ok=True)
    shutil.copyfile(pair.volume, before)
    blocks = random.Random(seed).sample(range(size // BLOCK), round(size // BLOCK * fraction))
    result = ResyncRun(len(blocks), len(blocks) * BLOCK)
    change_blocks(pair.volume, blocks)
    shutil.rmtree(pair.source.state_dir / "groups" / group_id)  # a fresh journal at seq 1
    sync()
    for path in (pair.volume, pair.replica):
        drop_cache(path)
    lines_before = len(pair.source.log_lines())
    restarted = time.time()
    pair.start_source()
    pair.wait("resync over", lambda s, t: caught_up(s, t) and s["group"]["resync"], 300)
    result.restart_to_caught_up_s = time.time() - restarted
    result.tcp_bytes = tcp_bytes(pair.source.config["source"]["target"]["port"])
    status = pair.source.status()["groups"][0]["resync"]
    result.sent_bytes, result.wire_bytes = status["sent_bytes"], status["wire_bytes"]
    new = pair.source.log_lines()[lines_before:]
    begins = [line for line in new if _RESYNC_BEGINS.search(line)]
    done = [line for line in new if _RESYNC_DONE.search(line)]
    if len(begins) != 1 or len(done) != 1:
        raise BenchError(
            "expected one resync after the restart, the source log says:\n" + "\n".join(new[-20:])
        )
    begin_match, done_match = _RESYNC_BEGINS.search(begins[0]), _RESYNC_DONE.search(done[0])
    assert begin_match and done_match
    result.reason = begin_match[1]
    result.seconds = _log_time(done[0]) - _log_time(begins[0])
    result.logged_seconds = float(done_match[4])
    result.compared_bytes = int(done_match[1])
    if result.compared_bytes != size or result.sent_bytes != result.changed_bytes:
        raise BenchError(
            f"resync compared {result.compared_bytes} bytes and sent {result.sent_bytes} of "
            f"blocks; expected {size} and the {result.changed_bytes} changed"
        )
    assert_same(pair.replica, pair.volume, "the replica after the resync")

    # rsync: from the changed volume (nobody writes it) to the copy made before.
    sync()
    for path in (pair.volume, before):
        drop_cache(path)
    start = time.perf_counter()
    out = run(rsync_argv(pair.volume, before), timeout=600).stdout
    result.rsync_seconds = time.perf_counter() - start
    for key, pattern in {
        "total_bytes_sent": r"Total bytes sent: ([\d,]+)",
        "total_bytes_received": r"Total bytes received: ([\d,]+)",
        "literal_data": r"Literal data: ([\d,]+)",
        "matched_data": r"Matched data: ([\d,]+)",
    }.items():
        match = re.search(pattern, out)
        if not match:
            raise BenchError(f"rsync --stats without {pattern!r}:\n{out}")
        result.rsync_stats[key] = int(match[1].replace(",", ""))
    if result.rsync_stats["literal_data"] != result.changed_bytes:
        raise BenchError(f"rsync: {result.rsync_stats}, for {result.changed_bytes} changed bytes")
    assert_same(before, pair.volume, "rsync's copy")
    before.unlink()
    return result


# Report ------------------------------------------------------------------------


def met(key: str, value: float) -> bool:
    op, limit = TARGETS[key]
    return value >= limit if op == ">=" else value <= limit


def tool_versions() -> dict[str, str]:
    return {
        "havend": first_line([str(HAVEND), "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "rsync": first_line(["rsync", "--version"]),
    }


def _r(values: list[float], digits: int = 1) -> list[float]:
    return [round(v, digits) for v in values]


def cpu_budget(tput: Throughput, size: int, peer_mbps: float) -> dict[str, Any]:
    """What reaching the throughput target allows per GiB of CPU on this machine,
    and what havend, qemu-nbd and the floor spent (whole machine, every process:
    nbdcopy, the servers, the kernel's page cache and network work)."""
    cores = os.cpu_count() or 1
    per_gib = (1 << 30) / size
    target = TARGETS["throughput_ratio"][1]
    # Every core busy all the time, at exactly the target's rate.
    budget = cores * (1 << 30) / (target * peer_mbps * 1e6)

    def spent(runs: list[float]) -> dict[str, Any]:
        return {
            "median": round(statistics.median(runs) * per_gib, 2),
            "runs": [round(r * per_gib, 2) for r in runs],
        }

    havend = statistics.median(tput.ours_machine_cpu_s) * per_gib
    floor = statistics.median(tput.floor_machine_cpu_s) * per_gib
    return {
        "what": "busy core-seconds per GiB copied of the whole machine (/proc/stat: user, "
        "nice, system, irq, softirq, steal) over the span of each MB/s figure: nbdcopy, "
        "the servers, the kernel's page-cache and network work (less the benchmark's own "
        "polling of havend's status files). The budget is what a copy "
        f"at {target} x qemu-nbd's median may spend with all {cores} cores busy all the "
        "time: a design whose whole-machine CPU per GiB is above it cannot reach the "
        "target here, however it overlaps its work",
        "cores": cores,
        "budget_core_s_per_gib": round(budget, 2),
        "havend_core_s_per_gib": spent(tput.ours_machine_cpu_s),
        "qemu-nbd_core_s_per_gib": spent(tput.peer_machine_cpu_s),
        "floor_core_s_per_gib": spent(tput.floor_machine_cpu_s),
        "havend_over_budget": round(havend / budget, 3),
        "floor_over_budget": round(floor / budget, 3),
    }


def report(
    pair: Pair,
    size: int,
    runs: int,
    initial_sync_s: float,
    tput: Throughput,
    qemu_command: str,
    lag: Lag,
    resync: list[ResyncRun],
    status_period_seen: float,
    machine: dict[str, object],
) -> dict[str, Any]:
    ours, peer = statistics.median(tput.ours), statistics.median(tput.peer)
    floor = statistics.median(tput.floor)
    ratios = {
        "throughput_ratio": round(ours / peer, 3),
        "throughput_floor_ratio": round(floor / peer, 3),
        "lag_p50_s": round(percentile(lag.lags, 0.5), 4),
        "lag_p99_s": round(percentile(lag.lags, 0.99), 4),
        "resync_bytes_ratio": round(
            statistics.median(r.wire_bytes / r.changed_bytes for r in resync), 4
        ),
        "resync_time_ratio": round(
            statistics.median(r.seconds for r in resync)
            / statistics.median(r.rsync_seconds for r in resync),
            3,
        ),
    }
    return ratios | {
        "targets": {k: f"{op} {limit}" for k, (op, limit) in TARGETS.items()},
        "targets_met": {k: met(k, ratios[k]) for k in TARGETS},
        "throughput": {
            "unit": "MB/s (10^6 bytes/s)",
            "havend": round(ours, 1),
            "qemu-nbd": round(peer, 1),
            "statistic": f"median of {runs} runs each, alternating havend, qemu-nbd",
            "havend_end": "the status time of the first source status.json written after "
            "nbdcopy exited that shows acked_seq == last_seq (every write durable on the "
            "target); conservative by at most the bracket below",
            "runs": {"havend": _r(tput.ours), "qemu-nbd": _r(tput.peer)},
            "havend_until_applied_runs": _r(tput.ours_applied),
            "havend_nbdcopy_alone_runs": _r(tput.ours_ingest),
            "havend_end_bracket_s": _r(tput.ours_bracket_s, 3),
            "havend_peak_journal_used_bytes": tput.ours_peak_journal,
            "havend_journal_capacity_bytes": tput.journal_capacity,
            "havend_peak_lag_bytes": tput.ours_peak_lag_bytes,
            "havend_unacked_bytes_at_nbdcopy_exit": tput.ours_unacked_at_end,
            "havend_nbdcopy_exit_to_acked_s": _r(tput.ours_tail_s, 3),
            "havend_shipping_after_nbdcopy_MBps": [
                round(b / t / 1e6, 1) if t > 0 else None
                for b, t in zip(tput.ours_unacked_at_end, tput.ours_tail_s, strict=True)
            ],
            "cpu_s_runs": {k: _r(v, 2) for k, v in tput.ours_cpu_s.items()}
            | {"qemu-nbd": _r(tput.peer_cpu_s, 2)},
            "disk_write_bytes_runs": dict(tput.ours_disk) | {"qemu-nbd": tput.peer_disk},
            "cpu_s_what": "user+system CPU seconds of each server process during each run "
            "(havend nodes: from nbdcopy start until acknowledged)",
            "disk_write_bytes_what": "write_bytes of /proc/PID/io over the same span: bytes "
            "the process dirtied for storage (journal, volume, replica; page cache included)",
            "commands": tput.commands | {"qemu-nbd server": qemu_command},
            "correctness": "after the first run the replica, the source volume and qemu-nbd's "
            "volume were compared with the source file byte for byte: identical",
            "cpu_budget": cpu_budget(tput, size, peer),
            "floor": {
                "what": "the least work of the design (volume write by qemu-nbd from the same "
                "nbdcopy, --flush included; the bytes appended to a source journal in the page "
                "cache only; sent over TLS 1.3 with the same certificates; appended to a target "
                "journal with one fdatasync per 32 MiB in its own thread) at C speed, no "
                "protocol, ordering, CRC or compression: bench/floor.py. MB/s until the target "
                "journal is durable. throughput_floor_ratio = its median / qemu-nbd's: meant as "
                "the most any implementation of the design reaches on this machine, but as "
                "noisy as the machine (see bench/floor.py); cpu_budget is the sturdier figure",
                "MBps": round(floor, 1),
                "runs": _r(tput.floor),
                "with_replica_written_runs": _r(tput.floor_with_apply),
                "havend_share_of_floor": round(ours / floor, 3),
            },
        },
        "lag": {
            "method": "direct: each 1 MiB write stamped (nonce, index) in its first bytes; "
            "a thread polls the target's replica file at that offset every "
            f"{LAG_POLL * 1000:.0f} ms; lag = time the stamp is readable there - time just "
            "before the write was submitted (havend.nbd.client.NBDClient, one request in "
            "flight, no flushes)",
            "rate_asked_MBps": round(lag.rate / 1e6, 1),
            "rate_achieved_MBps": round(lag.achieved_rate / 1e6, 1),
            "writer_max_behind_schedule_s": round(lag.max_behind_s, 3),
            "seconds": lag.seconds,
            "writes": len(lag.lags),
            "p50_s": ratios["lag_p50_s"],
            "p90_s": round(percentile(lag.lags, 0.9), 4),
            "p99_s": ratios["lag_p99_s"],
            "max_s": round(max(lag.lags), 4),
            "mean_s": round(statistics.fmean(lag.lags), 4),
            "status_lag_seconds": {
                "what": "source status lag_seconds (age of the oldest unacknowledged write) "
                "sampled once per status.json rewrite while the writer ran",
                "samples": len(lag.status_lag),
                "p50_s": round(percentile(lag.status_lag, 0.5), 3) if lag.status_lag else None,
                "p99_s": round(percentile(lag.status_lag, 0.99), 3) if lag.status_lag else None,
                "max_s": round(max(lag.status_lag), 3) if lag.status_lag else None,
            },
            "correctness": "afterwards the replica equalled the source volume byte for byte",
        },
        "resync": resync_report(resync),
        "volume_bytes": size,
        "initial_sync_s": round(initial_sync_s, 2),
        "transport": pair.transport,
        "status_period_s": {"configured": STATUS_PERIOD, "observed": round(status_period_seen, 3)},
        "group_config": "defaults (async, compression_level 3) but the journal: "
        f"{JOURNAL['max_segments']} x {JOURNAL['segment_size'] >> 20} MiB (default 16 x 64 MiB)",
        "nodes": {n.name: shlex.join(n.command) for n in pair.nodes()},
        "node_configs": {n.name: n.config for n in pair.nodes()},
        "node_log_problems": {n.name: n.problems()[:10] for n in pair.nodes()},
        "versions": tool_versions(),
        "machine": machine,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _rsync_bytes(run: ResyncRun) -> int:
    return run.rsync_stats["total_bytes_sent"] + run.rsync_stats["total_bytes_received"]


def resync_report(runs: list[ResyncRun]) -> dict[str, Any]:
    def median(get: Callable[[ResyncRun], float]) -> float:
        return statistics.median(get(r) for r in runs)

    def each(get: Callable[[ResyncRun], Any]) -> list[Any]:
        return [get(r) for r in runs]

    tcp = [r.tcp_bytes for r in runs]
    return {
        "statistic": f"median of {len(runs)} runs (each: havend, then rsync; other blocks "
        "changed each run); the bytes ratio is the median of the per-run ratios",
        "changed_blocks": each(lambda r: r.changed_blocks),
        "block_bytes": BLOCK,
        "changed_bytes": each(lambda r: r.changed_bytes),
        "how": "a 1 MiB write through NBD (so the target's seq is ahead), caught up; source "
        "stopped; random 4 KiB blocks of its volume file rewritten; <state_dir>/groups/<id> "
        "deleted (group-ids kept); restarted: the target is ahead of the new journal, so "
        "the source runs its hash resync",
        "reason_logged": each(lambda r: r.reason),
        "havend_seconds": round(median(lambda r: r.seconds), 3),
        "havend_seconds_runs": each(lambda r: round(r.seconds, 3)),
        "havend_seconds_timing": "between the 'resync ... begins' and 'resync done' log "
        "lines (ms time stamps)",
        "havend_seconds_logged_runs": each(lambda r: r.logged_seconds),
        "havend_restart_to_caught_up_s_runs": each(lambda r: round(r.restart_to_caught_up_s, 2)),
        "havend_compared_bytes": each(lambda r: r.compared_bytes),
        "havend_block_bytes_sent": each(lambda r: r.sent_bytes),
        "havend_wire_bytes": round(median(lambda r: r.wire_bytes)),
        "havend_wire_bytes_runs": each(lambda r: r.wire_bytes),
        "havend_wire_bytes_what": "status resync.wire_bytes: HASH_REQ + HASHES + SYNC_DATA "
        "frames, both directions (not TLS, not the few control frames)",
        "havend_bytes_ratio_runs": each(lambda r: round(r.wire_bytes / r.changed_bytes, 4)),
        "havend_tcp_bytes_runs": tcp,
        "havend_tcp_bytes_ratio_runs": [
            round((t["sent"] + t["received"]) / r.changed_bytes, 4) if t else None
            for t, r in zip(tcp, runs, strict=True)
        ],
        "havend_tcp_bytes_what": "ss -ti byte counters of the source's connection after "
        "the resync: the whole session (TLS handshake and records, HELLO/WELCOME)",
        "rsync_seconds": round(median(lambda r: r.rsync_seconds), 3),
        "rsync_seconds_runs": each(lambda r: round(r.rsync_seconds, 3)),
        "rsync_bytes": round(median(_rsync_bytes)),
        "rsync_stats_runs": each(lambda r: r.rsync_stats),
        "rsync_bytes_ratio_runs": each(lambda r: round(_rsync_bytes(r) / r.changed_bytes, 4)),
        "rsync_command": shlex.join(rsync_argv(Path("CHANGED-VOLUME"), Path("COPY-FROM-BEFORE"))),
        "cache": "every file written back and dropped from the page cache "
        "(POSIX_FADV_DONTNEED) before each side: both read cold",
        "correctness": "after each run the replica, and rsync's copy, equalled the changed "
        "source volume byte for byte",
    }


def print_table(result: dict[str, Any]) -> None:
    t, lag, rs = result["throughput"], result["lag"], result["resync"]
    ok = {k: "ok" if v else "MISSED" for k, v in result["targets_met"].items()}
    tg = result["targets"]
    mb = 1e6
    print(f"\n{'metric':<30}{'havend':>12}{'peer':>12}  {'peer is':<10}{'value':>9}  target")
    print(
        f"{'replicated write MB/s':<30}{t['havend']:>12.1f}{t['qemu-nbd']:>12.1f}  "
        f"{'qemu-nbd':<10}{result['throughput_ratio']:>9.3f}  "
        f"{tg['throughput_ratio']} {ok['throughput_ratio']}"
    )
    print(
        f"{'  essential work at C speed':<30}{t['floor']['MBps']:>12.1f}{t['qemu-nbd']:>12.1f}  "
        f"{'qemu-nbd':<10}{result['throughput_floor_ratio']:>9.3f}  (meant as an upper bound)"
    )
    budget = t["cpu_budget"]
    print(
        f"{'  core-s per GiB, whole machine':<30}"
        f"{budget['havend_core_s_per_gib']['median']:>12.2f}"
        f"{budget['qemu-nbd_core_s_per_gib']['median']:>12.2f}  "
        f"{'budget':<10}{budget['budget_core_s_per_gib']:>9.2f}  "
        f"(havend {budget['havend_over_budget']:.2f} x the budget of the target)"
    )
    rate = f"lag at {lag['rate_achieved_MBps']:.0f} MB/s p50 s"
    print(f"{rate:<30}{lag['p50_s']:>12.4f}{'':>12}  {'':<10}{result['lag_p50_s']:>9.4f}")
    print(
        f"{'lag p99 s':<30}{lag['p99_s']:>12.4f}{'':>12}  {'':<10}{result['lag_p99_s']:>9.4f}  "
        f"{tg['lag_p99_s']} {ok['lag_p99_s']}"
    )
    rsync_bytes = rs["rsync_bytes"]
    print(
        f"{'resync MB on the wire':<30}{rs['havend_wire_bytes'] / mb:>12.2f}"
        f"{rsync_bytes / mb:>12.2f}  {'changed':<10}{result['resync_bytes_ratio']:>9.4f}  "
        f"{tg['resync_bytes_ratio']} {ok['resync_bytes_ratio']}"
    )
    print(
        f"{'resync s':<30}{rs['havend_seconds']:>12.3f}{rs['rsync_seconds']:>12.3f}  "
        f"{'rsync':<10}{result['resync_time_ratio']:>9.3f}  "
        f"{tg['resync_time_ratio']} {ok['resync_time_ratio']}"
    )
    print(
        f"(throughput: {t['statistic']}; lag: {lag['writes']} stamped writes; resync: "
        f"{rs['statistic'].split(' (')[0]}, {rs['changed_blocks'][0]} changed 4 KiB blocks = "
        f"{rs['changed_bytes'][0] / mb:.2f} MB each; transport: {result['transport']})"
    )


# Main ------------------------------------------------------------------------


def observed_status_period(node: Node, samples: int = 6, timeout: float = 30) -> float:
    """Median seconds between status.json rewrites, as seen by a reader."""
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < samples:
        node.check_alive()
        now = node.status()["time"]
        if not times or now != times[-1]:
            times.append(now)
        if time.monotonic() > deadline:
            raise BenchError(f"{node.name}: status.json not rewritten {samples} times")
        time.sleep(0.005)
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def bench_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()  # the load average before anything of ours runs
    size = args.size_mib * 2**20
    source, volume = work / "source.img", work / "volume.img"
    print(f"preparing a {args.size_mib} MiB random source and zero-filled volumes in {work}")
    write_random(source, size)
    write_zeroes(volume, size)
    pair = make_pair(work, volume)
    with ExitStack() as stack:
        for node in (pair.target, pair.source):  # stopped in reverse: source first
            stack.callback(lambda n=node: n.proc and stop(n.proc))
        pair.target.start()
        started = time.time()
        pair.start_source()
        pair.wait_caught_up(timeout=300)
        initial_sync_s = time.time() - started
        period = observed_status_period(pair.source)
        print(
            f"pair up over {pair.transport}; initial sync of the empty volume "
            f"{initial_sync_s:.1f} s; status every {period:.3f} s",
            flush=True,
        )
        print("1. replicated write throughput (nbdcopy)", flush=True)
        tput, qemu_command = bench_throughput(pair, work, source, size, args.runs)
        source.unlink()
        print(f"2. lag under a paced {args.lag_rate_mb:g} MB/s writer", flush=True)
        sync()  # no write-back of the copies above during the lag run
        lag = bench_lag(pair, size, args.lag_rate_mb * 1e6, args.lag_seconds)
        pair.wait_caught_up()
        assert_same(pair.replica, pair.volume, "the replica after the lag run")
        print(
            f"  {len(lag.lags)} writes at {lag.achieved_rate / 1e6:.1f} MB/s: lag p50 "
            f"{percentile(lag.lags, 0.5):.4f} s, p99 {percentile(lag.lags, 0.99):.4f} s",
            flush=True,
        )
        print(f"3. delta resync, {args.changed_percent:g}% of 4 KiB blocks changed", flush=True)
        resync = []
        for i in range(args.resync_runs):
            one = resync_once(pair, work, size, args.changed_percent / 100, args.seed + i)
            resync.append(one)
            print(
                f"  run {i + 1}/{args.resync_runs}  havend {one.seconds:.3f} s, "
                f"{one.wire_bytes} bytes on the wire; rsync {one.rsync_seconds:.3f} s, "
                f"{_rsync_bytes(one)} bytes",
                flush=True,
            )
        pair.source.stop()
        pair.target.stop()
    errors = [line for n in pair.nodes() for line in n.problems("ERROR")]
    if errors:
        raise BenchError("havend logged errors:\n" + "\n".join(errors[:10]))
    return report(
        pair, size, args.runs, initial_sync_s, tput, qemu_command, lag, resync, period, machine
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="throughput runs per side")
    parser.add_argument("--size-mib", type=int, default=1024, help="volume and source size")
    parser.add_argument("--lag-seconds", type=float, default=20, help="paced writer duration")
    parser.add_argument("--lag-rate-mb", type=float, default=50, help="paced writer MB/s")
    parser.add_argument("--changed-percent", type=float, default=1, help="blocks changed")
    parser.add_argument("--resync-runs", type=int, default=3, help="resync runs per side")
    parser.add_argument("--seed", type=int, default=1, help="which blocks change")
    parser.add_argument("--output", type=Path, default=RESULTS / "replication.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "replication", lambda work: bench_all(args, work), print_table, args.output
    )


if __name__ == "__main__":
    sys.exit(main())
