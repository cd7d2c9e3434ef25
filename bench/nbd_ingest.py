"""NBD ingest benchmark: havend against qemu-nbd, side by side, in one run.

What is measured, for each server on its own 1 GiB raw volume file (both files
on the repository's file system, fully written with zeroes first so that block
allocation is not measured, then dropped from the page cache; both servers use
the page cache, writeback, and nobody flushes):

* seq write   ``nbdcopy --connections=4 SOURCE URI``: a 1 GiB file of random
              bytes copied to the export, in MB/s (10^6 bytes/s, wall clock of
              the whole nbdcopy run, connection set-up included).
* seq read    ``nbdcopy --connections=4 --no-extents URI null:``, in MB/s.
* randwrite   ``fio --ioengine=nbd --rw=randwrite --bs=4k`` over the whole
              export at queue depth 1 and 32, one connection, in IOPS.

Each server gets one (shorter) warm-up pass first. Then every metric is run
``--runs`` times per server, alternating havend / qemu-nbd (A B A B A B) so
that drift in machine load hits both; ``sync`` runs before every measurement so
that no run pays the write-back of the one before it. The reported value is the
median of the runs; every run is kept in the JSON too.

Correctness is checked once: after the warm-up copy to havend (whose volume
held zeroes) its volume must equal the source byte for byte; a fast but wrong
server must not win. qemu-nbd's volume is checked the same way, as a check of
the harness itself.

Reading the result, ``bench/results/nbd.json``: each ``*_ratio`` is havend's
value divided by qemu-nbd's, so higher is better for havend and 1.0 means
parity. The targets are seq write/read >= 0.8 and 4k QD32 random write >= 0.4;
they are reported, not enforced. Any tool that fails, times out or leaves wrong
data makes the benchmark exit non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    RESULTS,
    ROOT,
    BenchError,
    cpu_seconds,
    first_line,
    free_port,
    machine_info,
    run,
    run_benchmark,
    stop,
    sync,
    timed_run,
)

HOST = "127.0.0.1"
EXPORT = "bench"
CONNECTIONS = 4
HAVEND = ROOT / ".venv" / "bin" / "havend"
CHUNK = 16 * 2**20
TARGETS = {"seq_write": 0.8, "seq_read": 0.8, "randwrite_qd32": 0.4}
_SERVING = re.compile(r" on nbd://[\d.]+:(\d+)/\S+ \[loop (\w+)\]")


@dataclass
class Server:
    """One running NBD server and what the report says about it."""

    label: str
    command: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    uri: str = ""
    event_loop: str | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # server CPU s per run
    last_cpu: float = 0.0

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def log_problems(self) -> list[str]:
        """Log lines worth a look: havend's warnings and errors, anything qemu-nbd said."""
        if self.label != "havend":
            return self.log_lines()
        return [line for line in self.log_lines() if re.search(r" (WARNING|ERROR) ", line)]


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str


METRICS = (
    Metric("seq_write", "seq write", "MB/s"),
    Metric("seq_read", "seq read", "MB/s"),
    Metric("randwrite_qd1", "4k randwrite QD1", "IOPS"),
    Metric("randwrite_qd32", "4k randwrite QD32", "IOPS"),
)


# Scratch files --------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    """``size`` bytes of os.urandom: no block repeats, nothing compresses."""
    with path.open("wb") as f:
        for _ in range(size // CHUNK):
            f.write(os.urandom(CHUNK))
        f.write(os.urandom(size % CHUNK))
        f.flush()
        os.fsync(f.fileno())


def write_zeroes(path: Path, size: int) -> None:
    """A fully allocated volume: zeroes written (not a hole), synced, then uncached.

    Dropping its pages matters: written in 16 MiB chunks, the file would sit in
    the page cache in huge folios, and every 4 KiB write into one costs the
    kernel far more (about 7k instead of 11k QD1 IOPS here, for both servers).
    Uncached, the page cache is shaped by each server's own writes.
    """
    zero = bytes(CHUNK)
    with path.open("wb") as f:
        for _ in range(size // CHUNK):
            f.write(zero)
        f.write(zero[: size % CHUNK])
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def assert_same(path: Path, source: Path, what: str) -> None:
    """Fail unless ``path`` holds exactly the bytes of ``source``."""
    with path.open("rb") as a, source.open("rb") as b:
        offset = 0
        while True:
            got, want = a.read(CHUNK), b.read(CHUNK)
            if got != want:
                bad = next(
                    (i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                    min(len(got), len(want)),
                )
                raise BenchError(f"{what} differs from the source at byte {offset + bad}")
            if not got:
                return
            offset += len(got)


# Servers --------------------------------------------------------------------


def spawn(label: str, command: list[str], log: Path) -> Server:
    """Start a server, its stderr going to ``log``."""
    try:
        with log.open("wb") as err:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
    except OSError as exc:
        raise BenchError(f"cannot start {label}: {exc}") from None
    return Server(label, command, proc, log)


def wait_ready(server: Server, ready: Callable[[], bool], timeout: float = 15) -> None:
    """Poll ``ready`` until true; on failure or interruption, stop the server."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if server.proc.poll() is not None:
                raise BenchError(
                    f"{server.label} exited with status {server.proc.returncode} at start-up:\n"
                    + server.log_tail()
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{server.label} not ready after {timeout:.0f} s:\n" + server.log_tail()
                )
            time.sleep(0.05)
    except BaseException:
        stop(server.proc)
        raise


def start_havend(volume: Path, work: Path) -> Server:
    command = [str(HAVEND), "nbd-serve", str(volume), "--name", EXPORT]
    command += ["--port", "0", "--bind", HOST]
    server = spawn("havend", command, work / "havend.log")

    def ready() -> bool:
        """havend logs its URI (with the port it got) and event loop once listening."""
        match = _SERVING.search(server.log.read_text(errors="replace"))
        if match:
            server.uri = f"nbd://{HOST}:{match[1]}/{EXPORT}"
            server.event_loop = match[2]
        return match is not None

    wait_ready(server, ready)
    return server


def start_qemu_nbd(volume: Path, work: Path) -> Server:
    port = free_port(HOST)
    command = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-p", str(port), "-b", HOST, "-t"]
    command += ["--cache=writeback", "--aio=threads", f"--shared={CONNECTIONS}", str(volume)]
    server = spawn("qemu-nbd", command, work / "qemu-nbd.log")
    server.uri = f"nbd://{HOST}:{port}/{EXPORT}"

    def ready() -> bool:
        """A full handshake, not a bare connect (qemu-nbd would log that as an error)."""
        try:
            run(["nbdinfo", "--size", server.uri], timeout=10)
        except BenchError:
            return False
        return True

    wait_ready(server, ready)
    return server


def describe_export(server: Server, size: int) -> dict[str, object]:
    """What the server advertises (nbdinfo); checks the size and multi-conn."""
    info = json.loads(run(["nbdinfo", "--json", server.uri], timeout=30).stdout)
    export = info["exports"][0]
    if export["export-size"] != size:
        raise BenchError(f"{server.label}: export is {export['export-size']} bytes, not {size}")
    if not export["can_multi_conn"]:
        raise BenchError(f"{server.label}: no multi-conn; nbdcopy would use one connection")
    keys = ("export-size", "can_multi_conn", "can_flush", "can_fua", "block_size_maximum")
    return {"structured_replies": info["structured"]} | {k: export.get(k) for k in keys}


@contextmanager
def running(start: Callable[[], Server]) -> Iterator[Server]:
    """A started server, always stopped (SIGTERM, then SIGKILL) on the way out."""
    server = start()
    try:
        yield server
    finally:
        stop(server.proc)


# Measurements ----------------------------------------------------------------


class Bench:
    """The clients, their exact commands, and the scratch files they use."""

    def __init__(self, work: Path, source: Path, size: int, fio_runtime: int) -> None:
        self.work = work
        self.source = source
        self.size = size
        self.fio_runtime = fio_runtime
        self.commands: dict[str, dict[str, str]] = {}

    def _client(self, key: str, server: Server, argv: list[str], timeout: float) -> float:
        # The last run's command wins: the measured one, not the warm-up's.
        self.commands.setdefault(key, {})[server.label] = shlex.join(argv)
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.label} died (status {server.proc.returncode}):\n{server.log_tail()}"
            )
        sync()
        before = cpu_seconds(server.proc.pid)
        try:
            elapsed = timed_run(argv, timeout=timeout)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {server.label} log:\n{server.log_tail()}") from None
        server.last_cpu = cpu_seconds(server.proc.pid) - before
        return elapsed

    def seq_write(self, server: Server) -> float:
        argv = ["nbdcopy", f"--connections={CONNECTIONS}", str(self.source), server.uri]
        return self.size / self._client("seq_write", server, argv, timeout=300) / 1e6

    def seq_read(self, server: Server) -> float:
        # --no-extents: both servers must send every byte (qemu-nbd answers
        # block-status queries, havend does not; holes would be skipped).
        argv = ["nbdcopy", f"--connections={CONNECTIONS}", "--no-extents", server.uri, "null:"]
        return self.size / self._client("seq_read", server, argv, timeout=300) / 1e6

    def randwrite(self, server: Server, iodepth: int, runtime: int | None = None) -> float:
        out = self.work / f"fio-{server.label}-qd{iodepth}.json"
        argv = ["fio", "--name=rw", "--ioengine=nbd", f"--uri={server.uri}"]
        argv += ["--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}", f"--size={self.size}"]
        argv += ["--time_based", f"--runtime={runtime or self.fio_runtime}"]
        argv += ["--output-format=json", f"--output={out}"]
        key = f"randwrite_qd{iodepth}"
        self._client(key, server, argv, timeout=(runtime or self.fio_runtime) + 60)
        job = json.loads(out.read_text())["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio on {server.label}: error {job['error']}")
        return float(job["write"]["iops"])

    def measure(self, metric: Metric, server: Server) -> float:
        if metric.key == "seq_write":
            return self.seq_write(server)
        if metric.key == "seq_read":
            return self.seq_read(server)
        return self.randwrite(server, int(metric.key.removeprefix("randwrite_qd")))

    def warm_up(self, server: Server, volume: Path) -> None:
        """One pass of every client; checks written and read data on the way."""
        self.seq_write(server)
        assert_same(volume, self.source, f"{server.label}'s volume after the copy")
        self.seq_read(server)
        readback = self.work / "readback.img"
        run(["nbdcopy", f"--connections={CONNECTIONS}", server.uri, str(readback)], timeout=300)
        assert_same(readback, self.source, f"data read back from {server.label}")
        readback.unlink()
        for qd in (1, 32):
            self.randwrite(server, qd, runtime=max(2, self.fio_runtime // 3))


def measure(bench: Bench, servers: list[Server], runs: int) -> None:
    """Every metric ``runs`` times per server, alternating the servers."""
    for metric in METRICS:
        for i in range(runs):
            for server in servers:
                value = bench.measure(metric, server)
                server.runs.setdefault(metric.key, []).append(value)
                server.cpu.setdefault(metric.key, []).append(server.last_cpu)
                print(
                    f"  {metric.title:<18} run {i + 1}/{runs}  {server.label:<8}"
                    f"{value:10.1f} {metric.unit}",
                    flush=True,
                )


# Report ----------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    return {
        "havend": first_line([str(HAVEND), "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "fio": first_line(["fio", "--version"]),
    }


def report(
    bench: Bench, ours: Server, qemu: Server, exports: dict[str, object], runs: int
) -> dict[str, object]:
    ratios: dict[str, float] = {}
    metrics: dict[str, object] = {}
    for metric in METRICS:
        a = statistics.median(ours.runs[metric.key])
        b = statistics.median(qemu.runs[metric.key])
        ratio = ratios[metric.key] = round(a / b, 3)
        metrics[metric.key] = {
            "unit": metric.unit,
            "havend": round(a, 1),
            "qemu-nbd": round(b, 1),
            "ratio": ratio,
            "target_ratio": TARGETS.get(metric.key),
            "runs": {
                "havend": [round(v, 1) for v in ours.runs[metric.key]],
                "qemu-nbd": [round(v, 1) for v in qemu.runs[metric.key]],
            },
            "server_cpu_s_median": {
                s.label: round(statistics.median(s.cpu[metric.key]), 2) for s in (ours, qemu)
            },
            "server_cpu_s_runs": {
                s.label: [round(v, 2) for v in s.cpu[metric.key]] for s in (ours, qemu)
            },
        }
    return {f"{k}_ratio": v for k, v in ratios.items()} | {
        "targets_met": {k: ratios[k] >= t for k, t in TARGETS.items()},
        "statistic": f"median of {runs} runs per server (alternating havend, qemu-nbd), "
        "after one warm-up pass per server; all runs listed under metrics.*.runs",
        "cache": "writeback (page cache) for both",
        "metrics": metrics,
        "volume_bytes": bench.size,
        "volumes": "raw files on the repository's file system, zero-filled, synced and "
        "dropped from the page cache (POSIX_FADV_DONTNEED) before the servers start",
        "sync_before_each_run": True,
        "correctness": "in the warm-up, each server's volume file and a copy read back "
        "through NBD were compared byte for byte with the source: identical",
        "server_cpu": "user+system CPU seconds of the server process (all threads) during "
        "each client run, from /proc/PID/stat",
        "fio_runtime_s": bench.fio_runtime,
        "nbdcopy_connections": CONNECTIONS,
        "havend_event_loop": ours.event_loop,
        "exports": exports,
        "servers": {s.label: shlex.join(s.command) for s in (ours, qemu)},
        "server_uris": {s.label: s.uri for s in (ours, qemu)},
        "server_log_problems": {s.label: s.log_problems()[:10] for s in (ours, qemu)},
        "clients": bench.commands,
        "versions": tool_versions(),
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def print_table(result: dict[str, object]) -> None:
    metrics = result["metrics"]
    assert isinstance(metrics, dict)
    head = f"{'metric':<19}{'unit':>5}{'havend':>11}{'qemu-nbd':>11}{'ratio':>8}"
    print(f"\n{head}  {'server CPU s (h/q)':<19} target")
    for metric in METRICS:
        m = metrics[metric.key]
        target = m["target_ratio"]
        verdict = (
            "" if target is None else f">= {target} " + ("ok" if m["ratio"] >= target else "MISSED")
        )
        cpu = m["server_cpu_s_median"]
        cpu_text = f"{cpu['havend']:.2f} / {cpu['qemu-nbd']:.2f}"
        print(
            f"{metric.title:<19}{m['unit']:>5}{m['havend']:>11.1f}{m['qemu-nbd']:>11.1f}"
            f"{m['ratio']:>8.3f}  {cpu_text:<19} {verdict}"
        )
    print(f"({result['statistic']}; cache: {result['cache']})")


# Main ------------------------------------------------------------------------


def bench_all(args: argparse.Namespace, work: Path) -> dict[str, object]:
    size = args.size_mib * 2**20
    source, ours_vol, qemu_vol = work / "source.img", work / "havend.img", work / "qemu.img"
    print(f"preparing {args.size_mib} MiB random source and two zero-filled volumes in {work}")
    write_random(source, size)
    write_zeroes(ours_vol, size)
    write_zeroes(qemu_vol, size)
    bench = Bench(work, source, size, args.fio_runtime)
    with ExitStack() as stack:
        ours = stack.enter_context(running(lambda: start_havend(ours_vol, work)))
        qemu = stack.enter_context(running(lambda: start_qemu_nbd(qemu_vol, work)))
        exports = {s.label: describe_export(s, size) for s in (ours, qemu)}
        print(f"havend on {ours.uri} [loop {ours.event_loop}], qemu-nbd on {qemu.uri}")
        for server, volume in ((ours, ours_vol), (qemu, qemu_vol)):
            print(f"warm-up {server.label} (and data check)", flush=True)
            bench.warm_up(server, volume)
        measure(bench, [ours, qemu], args.runs)
    for server in (ours, qemu):
        if server.proc.returncode not in (0, -signal.SIGTERM):
            raise BenchError(f"{server.label} exited with {server.proc.returncode}")
    errors = [line for line in ours.log_problems() if " ERROR " in line]
    if errors:
        raise BenchError("havend logged errors:\n" + "\n".join(errors[:10]))
    return report(bench, ours, qemu, exports, args.runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per metric and server")
    parser.add_argument("--fio-runtime", type=int, default=8, help="seconds per fio run")
    parser.add_argument("--size-mib", type=int, default=1024, help="volume and source size")
    parser.add_argument("--output", type=Path, default=RESULTS / "nbd.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("nbd_ingest", lambda work: bench_all(args, work), print_table, args.output)


if __name__ == "__main__":
    sys.exit(main())
