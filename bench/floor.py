#!/usr/bin/env python3
"""The least work the replication design asks of this machine, done at C speed.

An upper bound for ``throughput_ratio`` (bench/replication.py) and for the CDP
``throughput_ratio`` (bench/cdp.py): whatever havend does, it must at least
take the client's writes into the source volume (synced by the client's
FLUSH), append the same bytes to a journal (in the page cache: what the target
acknowledges in time is released before it reaches the disk, so a FLUSH finds
nothing left to sync there), send them over TLS 1.3, append them to the
target's journal and sync that before acknowledging (and, to apply them, write
the replica; with CDP, save what each write overwrites, durably, first). This
module does exactly that and nothing more - no protocol, no ordering, no CRC,
no compression - with the cheapest calls Python exposes to C (1 MiB blocking
``pwrite``/``sendall``/``recv_into``/``fdatasync``, each releasing the GIL,
one thread per stream), while the *same* ``nbdcopy`` as the benchmark writes
into ``qemu-nbd`` (the volume write; bench/replication.py keeps its
``--flush``, as havend syncs the volume before it releases journal records).
If even this takes longer than
1/target of qemu-nbd's time alone, no implementation of the design reaches the
target on this machine, where the client, both nodes and qemu-nbd share its
cores and its one disk.

Measured, it is an upper bound only while the machine holds still: in six
full runs of bench/replication.py on 2026-11-28 it came out above havend
twice (0.63 and 0.72 of qemu-nbd against 0.40 and 0.45) and below it four
times (0.32-0.39 against 0.40-0.44), with whole-machine CPU per GiB from 4.9
to 8.4 core-s and, in a slow hour, half of all samples in the kernel's page
cache copies (``perf record -a``: qemu-nbd's threads and the two journal
writers copying at once; qemu-nbd's threads also contend for the file's
lock). ``throughput.cpu_budget`` in replication.json is the sturdier figure.

``floor_copy`` runs one such copy; the two ends are this file run as
``send`` (the source's journal and TLS sender) and ``receive`` (the target:
journal, group commit, apply, undo), each its own process like havend's
nodes. Each prints one JSON line of time stamps when done.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import BenchError, busy_core_seconds, free_port, stop

CHUNK = 1 << 20
COMMIT_BYTES = 32 << 20  # havend's default window: one fdatasync per window at least
HOST = "127.0.0.1"


def _context(args: argparse.Namespace, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx


def _prealloc(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.posix_fallocate(fd, 0, size)
    os.fsync(fd)
    return fd


def receive(args: argparse.Namespace) -> dict[str, float]:
    """The target: journal, one fdatasync per ``COMMIT_BYTES`` received (in its
    own thread while receiving goes on), then apply in commit-sized steps:
    with ``--undo``, the replica's old contents of the step first read,
    appended to the undo file and synced, then the replica written."""
    size = args.size
    journal = _prealloc(args.journal, size)
    undo = _prealloc(args.undo, size) if args.undo else -1
    replica = os.open(args.replica, os.O_RDWR | os.O_CLOEXEC) if args.replica else -1
    listener = socket.create_server((HOST, args.port))
    print("ready", flush=True)
    raw, _ = listener.accept()
    link = _context(args, server=True).wrap_socket(raw, server_side=True)
    received = durable = 0
    chunks: list[bytearray] = []
    cond = threading.Condition()
    stamps: dict[str, float] = {}

    def commit() -> None:
        nonlocal durable
        synced = 0
        while synced < size:
            with cond:
                cond.wait_for(
                    lambda since=synced: received - since >= COMMIT_BYTES or received >= size
                )
                upto = received
            os.fdatasync(journal)
            synced = upto
            with cond:
                durable = upto
                cond.notify_all()
        stamps["durable"] = time.time()

    def apply() -> None:
        done = 0
        while done < size:
            with cond:
                cond.wait_for(lambda after=done: durable > after)
                upto = durable
            if undo >= 0:
                os.pwrite(undo, os.pread(replica, upto - done, done), done)
                os.fdatasync(undo)
            for offset in range(done, upto, CHUNK):
                os.pwrite(replica, chunks[offset // CHUNK], offset)
                chunks[offset // CHUNK] = bytearray()  # applied: free it
            done = upto
        stamps["applied"] = time.time()

    workers = [threading.Thread(target=commit)]
    if replica >= 0:
        workers.append(threading.Thread(target=apply))
    for worker in workers:
        worker.start()
    while received < size:
        buf = bytearray(CHUNK)
        view, got = memoryview(buf), 0
        while got < CHUNK:
            n = link.recv_into(view[got:], CHUNK - got)
            if not n:
                raise BenchError("floor: the sender closed early")
            got += n
        os.pwrite(journal, buf, received)
        if replica >= 0:
            chunks.append(buf)
        with cond:
            received += CHUNK
            cond.notify_all()
    for worker in workers:
        worker.join()
    link.sendall(b"done")
    return stamps


def send(args: argparse.Namespace) -> dict[str, float]:
    """The source: the bytes appended to a journal (the page cache: the file is
    deleted unsynced, as havend releases what the target holds) and sent over
    TLS, in two threads."""
    size = args.size
    journal = _prealloc(args.journal, size)
    data = os.urandom(CHUNK)
    link = _context(args, server=False).wrap_socket(socket.create_connection((HOST, args.port)))
    print("connected", flush=True)
    sys.stdin.readline()  # go
    stamps: dict[str, float] = {"start": time.time()}

    def sender() -> None:
        for _ in range(size // CHUNK):
            link.sendall(data)
        stamps["sent"] = time.time()

    def journaler() -> None:
        for i in range(size // CHUNK):
            os.pwrite(journal, data, i * CHUNK)
        stamps["journal_written"] = time.time()

    workers = [threading.Thread(target=f) for f in (sender, journaler)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    link.recv(16)  # the receiver is done
    return stamps


def floor_copy(
    work: Path,
    tls: tuple[dict[str, str], dict[str, str]],
    nbdcopy: list[str],
    size: int,
    *,
    replica: Path | None = None,
    undo: bool = False,
) -> dict[str, float]:
    """One floor copy: the caller's ``nbdcopy`` command (into qemu-nbd) while the sender
    and the receiver move the same number of bytes. Seconds from the start
    until the client is done, the target durable, the target applied, and the
    busy core-seconds of the whole machine meanwhile (``machine_cpu_s``)."""
    source_tls, target_tls = tls
    port = free_port(HOST)
    me = [sys.executable, str(Path(__file__).resolve())]

    def flags(t: dict[str, str]) -> list[str]:
        return ["--cert", t["cert"], "--key", t["key"], "--ca", t["ca"], "--size", str(size)]

    argv = [*me, "receive", "--port", str(port), "--journal", str(work / "floor-tj")]
    argv += flags(target_tls)
    if replica is not None:
        argv += ["--replica", str(replica)]
    if undo:
        argv += ["--undo", str(work / "floor-undo")]
    procs: list[subprocess.Popen[str]] = []
    try:
        target = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        procs.append(target)
        _expect(target, "ready")
        argv = [*me, "send", "--port", str(port), "--journal", str(work / "floor-sj")]
        source = subprocess.Popen(
            argv + flags(source_tls), stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
        )
        procs.append(source)
        _expect(source, "connected")
        start, busy = time.time(), busy_core_seconds()
        assert source.stdin is not None
        source.stdin.write("go\n")
        source.stdin.flush()
        client = subprocess.run(nbdcopy, capture_output=True, text=True, timeout=600)
        client_done = time.time()
        if client.returncode != 0:
            raise BenchError(f"floor: nbdcopy failed: {client.stderr[-2000:]}")
        ends = {name: json.loads(_line(p, 600)) for name, p in (("s", source), ("t", target))}
        busy = busy_core_seconds() - busy
        for proc in procs:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            stop(proc, timeout=10)  # type: ignore[arg-type]
        for name in ("floor-tj", "floor-sj", "floor-undo"):
            (work / name).unlink(missing_ok=True)
    durable = max(client_done, ends["s"]["journal_written"], ends["t"]["durable"])
    out = {"client_s": client_done - start, "durable_s": durable - start, "machine_cpu_s": busy}
    if "applied" in ends["t"]:
        out["applied_s"] = max(durable, ends["t"]["applied"]) - start
    return out


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        raise BenchError(f"floor: {proc.args[2]} said nothing in {timeout:.0f} s")  # type: ignore[index]
    return result[0]


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    line = _line(proc, 60).strip()
    if line != word:
        raise BenchError(f"floor: expected {word!r}, got {line!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["send", "receive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--replica")
    parser.add_argument("--undo")
    args = parser.parse_args(argv)
    if args.size % CHUNK:
        parser.error(f"--size must be a multiple of {CHUNK}")
    stamps = receive(args) if args.mode == "receive" else send(args)
    print(json.dumps(stamps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
