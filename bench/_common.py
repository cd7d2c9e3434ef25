"""Helpers shared by the benchmarks: bounded subprocesses, ports, machine facts.

Every helper that starts or waits for a process takes a timeout, and every
failure raises :class:`BenchError` with enough output to see what went wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Scratch space on the repository's file system; each run makes (and removes)
# its own directory under it.
WORK = ROOT / "bench" / ".work"


class BenchError(Exception):
    """A benchmark cannot go on: a tool failed, timed out or gave wrong data."""


def _tail(text: str | bytes | None, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def run(argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; raise BenchError unless it exits 0 in time."""
    cmd = shlex.join(argv)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:.0f} s: {cmd}\n{_tail(exc.stderr)}") from None
    except OSError as exc:
        raise BenchError(f"cannot run {cmd}: {exc}") from None
    if done.returncode != 0:
        raise BenchError(
            f"exit status {done.returncode}: {cmd}\n{_tail(done.stderr) or _tail(done.stdout)}"
        )
    return done


def timed_run(argv: Sequence[str], *, timeout: float) -> float:
    """Wall-clock seconds ``argv`` took (it must exit 0)."""
    start = time.perf_counter()
    run(argv, timeout=timeout)
    return time.perf_counter() - start


def first_line(argv: Sequence[str]) -> str:
    """First line of a ``--version`` style output."""
    done = run(argv, timeout=30)
    return (done.stdout or done.stderr).strip().splitlines()[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 60) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_core_seconds() -> float:
    """CPU time the whole machine has spent busy since boot, all cores summed
    (/proc/stat: user, nice, system, irq, softirq, steal; not idle or iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def sync(*, timeout: float = 180) -> None:
    """Write all dirty page-cache pages back, so no run pays for the previous one."""
    run(["sync"], timeout=timeout)


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of ``values``, linearly interpolated."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * fraction
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def drop_cache(path: Path) -> None:
    """Write ``path`` back and drop it from the page cache: the next read is cold."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_write_bytes(pid: int) -> int:
    """Bytes a running process caused to be written to storage (/proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise BenchError(f"no write_bytes in /proc/{pid}/io")


def write_json(result: dict[str, object], path: Path) -> None:
    """Replace ``path`` with ``result`` as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that servers are stopped and scratch files removed


def run_benchmark(
    name: str,
    bench: Callable[[Path], dict[str, object]],
    print_table: Callable[[dict[str, object]], None],
    output: Path,
) -> int:
    """A benchmark's ``main``: run ``bench`` in a scratch directory under WORK
    (always removed, also on Ctrl-C or SIGTERM), then write ``output`` and print
    the table. Exit status 0, 1 (a BenchError) or 130 (interrupted)."""
    # Explicit, as a background job may inherit SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-", dir=WORK))
    try:
        result = bench(work)
    except BenchError as exc:
        print(f"{name}: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not any(WORK.iterdir()):
            WORK.rmdir()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(result, output)
    print_table(result)
    print(f"wrote {output} ({result['elapsed_s']} s in all)")
    return 0
