#!/usr/bin/env python3
"""Failover and failback: planned failover time, failback bytes and time vs. rsync.

One havend pair (source and target, mutual TLS on loopback) with one volume of
random data. Each cycle, side by side in one run:

1. a paced writer (``--writer-mb`` MB/s of 1 MiB writes) runs for a while and
   stops; at once ``havend group failover`` on the source: fence, drain, final
   checkpoint, promotion of the target. ``planned_failover_s`` is the drain plus
   the promotion as havend measures them (no VM is booted here);
2. the source volume is copied (the state at the failover, what rsync starts
   from), then ``--changed-percent`` of its 4 KiB blocks are rewritten with new
   random bytes through the promoted export (production at the recovery site);
3. ``havend group failback`` on the source: the bytes on the wire (hashes of
   the changed ranges, then the blocks that differ) and the time it reports;
4. the peer: ``rsync --inplace --no-whole-file -B 4096`` of the promoted volume
   onto the copy made in 2 (page caches dropped first): its bytes sent and
   received, and its time;
5. the source volume and the replica are compared byte for byte.

Top-level keys: failback_bytes_ratio (failback wire bytes ÷ bytes changed),
failback_time_ratio (ours ÷ rsync), planned_failover_s (medians of the cycles).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import RESULTS, BenchError, drop_cache, machine_info, run, run_benchmark, stop, sync
from cdp import admin_call, paced_writer
from nbd_ingest import assert_same, write_random, write_zeroes
from replication import GROUP, VOLUME, make_pair, nbdcopy_argv, rsync_argv

from havend.nbd.client import NBDClient

BLOCK = 4096
TARGETS = {"failback_bytes_ratio": ("<=", 1.1), "failback_time_ratio": ("<", 1.0)}


def cycle(pair: Any, work: Path, size: int, args: argparse.Namespace, seed: int) -> dict:
    stop_writing = threading.Event()
    writer = threading.Thread(
        target=paced_writer,
        args=(pair.nbd_uri, args.writer_mb * 1e6, stop_writing, size),
        daemon=True,
    )
    writer.start()
    time.sleep(args.writer_seconds)
    stop_writing.set()
    writer.join(30)
    started = time.perf_counter()
    failover = admin_call(pair.source, "failover", group=GROUP)
    failover_wall = time.perf_counter() - started
    if failover["final_seq"] != failover["target_applied_seq"] or failover["lost_writes"]:
        raise BenchError(f"planned failover lost writes: {failover}")
    before = work / "before.img"
    shutil.copyfile(pair.volume, before)
    views = pair.target.status()["addresses"]["views"]
    rng = random.Random(seed)
    blocks = rng.sample(range(size // BLOCK), int(size // BLOCK * args.changed_percent / 100))
    with NBDClient.open(f"{views}/{GROUP}/{VOLUME}") as client:
        for block in blocks:
            client.write(block * BLOCK, rng.randbytes(BLOCK))
        client.flush()
    changed = len(blocks) * BLOCK
    sync()
    back = admin_call(pair.source, "failback", group=GROUP)
    if back["unshipped_here_bytes"] or back["changed_on_target_bytes"] != changed:
        raise BenchError(f"failback saw {back}, {changed} bytes were changed")
    pair.wait_caught_up(timeout=300)
    assert_same(pair.replica, pair.volume, "the replica after the failback")
    sync()
    for path in (pair.replica, before):
        drop_cache(path)
    started = time.perf_counter()
    out = run(rsync_argv(pair.replica, before), timeout=600).stdout
    rsync_s = time.perf_counter() - started
    stats = {
        key: int(re.search(pattern, out)[1].replace(",", ""))  # type: ignore[index]
        for key, pattern in {
            "sent": r"Total bytes sent: ([\d,]+)",
            "received": r"Total bytes received: ([\d,]+)",
            "literal": r"Literal data: ([\d,]+)",
        }.items()
    }
    assert_same(before, pair.volume, "rsync's copy")
    before.unlink()
    return {
        "planned_failover_s": failover["drain_seconds"] + failover["promote_seconds"],
        "failover_admin_wall_s": round(failover_wall, 4),
        "failover": failover,
        "changed_bytes": changed,
        "failback_wire_bytes": back["wire_bytes"],
        "failback_pulled_bytes": back["pulled_bytes"],
        "failback_s": back["seconds"],
        "failback": back,
        "rsync_s": rsync_s,
        "rsync_bytes": stats["sent"] + stats["received"],
        "rsync_stats": stats,
    }


def bench_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()
    size = args.size_mib << 20
    volume, data = work / "volume.img", work / "data.img"
    write_zeroes(volume, size)
    write_random(data, size)
    pair = make_pair(work, volume)
    cycles = []
    with ExitStack() as stack:
        for node in (pair.target, pair.source):
            stack.callback(lambda n=node: n.proc and stop(n.proc))
        pair.target.start()
        pair.start_source()
        pair.wait_caught_up(timeout=300)
        run(nbdcopy_argv(data, pair.nbd_uri), timeout=600)
        data.unlink()
        pair.wait_caught_up(timeout=300)
        for i in range(args.cycles):
            one = cycle(pair, work, size, args, seed=i)
            cycles.append(one)
            print(
                f"  cycle {i + 1}/{args.cycles}: failover {one['planned_failover_s']:.3f} s; "
                f"failback {one['failback_wire_bytes']} bytes in {one['failback_s']:.3f} s; "
                f"rsync {one['rsync_bytes']} bytes in {one['rsync_s']:.3f} s",
                flush=True,
            )
        pair.source.stop()
        pair.target.stop()
    errors = [line for n in pair.nodes() for line in n.problems("ERROR")]
    if errors:
        raise BenchError("havend logged errors:\n" + "\n".join(errors[:10]))

    def median(key: str) -> float:
        return statistics.median(c[key] for c in cycles)

    bytes_ratio = statistics.median(c["failback_wire_bytes"] / c["changed_bytes"] for c in cycles)
    time_ratio = statistics.median(c["failback_s"] / c["rsync_s"] for c in cycles)
    result: dict[str, Any] = {
        "failback_bytes_ratio": round(bytes_ratio, 4),
        "failback_time_ratio": round(time_ratio, 4),
        "planned_failover_s": round(median("planned_failover_s"), 4),
    }
    result["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()}
    result["targets_met"] = {
        k: (result[k] <= v if op == "<=" else result[k] < v) for k, (op, v) in TARGETS.items()
    }
    result |= {
        "what": {
            "failback_bytes_ratio": "failback wire bytes (HASH_REQ/HASHES of the changed "
            "ranges + the differing blocks) / bytes changed on the promoted side",
            "failback_time_ratio": "havend's failback seconds / rsync --inplace "
            "--no-whole-file -B 4096 of the same volume onto its copy at the failover",
            "planned_failover_s": "drain + promotion as havend measures them (admin "
            "failover), after a paced writer stopped",
        },
        "statistic": f"median of {args.cycles} failover/failback cycles",
        "cycles": cycles,
        "setup": {
            "volume_bytes": size,
            "changed_percent": args.changed_percent,
            "writer_MBps": args.writer_mb,
            "writer_seconds": args.writer_seconds,
            "transport": pair.transport,
            "rsync": " ".join(rsync_argv(Path("PROMOTED"), Path("COPY"))),
        },
        "machine": machine,
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print()
    for key in ("failback_bytes_ratio", "failback_time_ratio", "planned_failover_s"):
        target = result["targets"].get(key, "")
        ok = ""
        if key in result["targets_met"]:
            ok = " ok" if result["targets_met"][key] else " MISSED"
        print(f"{key:24} {result[key]:>10}  {target}{ok}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--writer-mb", type=float, default=50)
    parser.add_argument("--writer-seconds", type=float, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "failback.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("failback", lambda work: bench_all(args, work), print_table, args.output)


if __name__ == "__main__":
    sys.exit(main())
