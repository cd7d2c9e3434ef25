#!/usr/bin/env python3
"""Continuous data protection: checkpoint latency, the cost of the undo log,
2,048 retained checkpoints, opening and reading point-in-time views.

Two havend pairs (source and target, mutual TLS on loopback), each with one
volume, on this machine's disk, side by side in one run:

1. Replication throughput with CDP on vs. off: ``nbdcopy --flush`` of a random
   file into the source export of each pair, timed until the target has
   *applied* every write (the undo log's work is done by the applier). On
   the "on" pair a checkpoint is taken every ``--checkpoint-every`` seconds
   during the copy, so the target saves the old contents of every block the
   copy overwrites (the volumes hold random data from a first fill: real
   data, not zeroes, is saved). Alternating runs, median of each.
2. Checkpoint latency: ``--latency-samples`` checkpoints through the source's
   admin socket while a paced writer (``--writer-mb`` MB/s of 1 MiB writes)
   keeps the group busy; the time from the request to the answer (the marker
   is in the group's sequence and shipped; its commit to stable storage
   follows in the background).
3. Retention: checkpoints (a 4 KiB write before each) until the target has
   applied more than 2,048; the count it retains.
4. Opening a view of the oldest retained checkpoint: the admin request, the
   NBD handshake and the first 4 KiB read (median of 5).
5. Reading that view whole (``nbdcopy view null:``) vs. reading the replica
   file through ``qemu-nbd -r`` the same way (warm page cache for both; the
   oldest checkpoint's view lays the most saved blocks over the replica).

Beside 1., the same off/on ratio for the design's essential work at C speed
(bench/floor.py: no protocol, just the journal, TLS, undo and replica writes
the design needs, with the same nbdcopy into qemu-nbd): the most any
implementation can reach on this machine.

Top-level keys: checkpoint_p50_ms, checkpoint_p99_ms, throughput_ratio,
throughput_floor_ratio, checkpoints_retained, view_open_s, view_read_ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    BenchError,
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
    running,
    spawn,
    start_qemu_nbd,
    wait_ready,
    write_random,
    write_zeroes,
)
from replication import GROUP, HOST, VOLUME, Pair, make_pair, nbdcopy_argv

from havend import admin
from havend.nbd.client import NBDClient

TARGETS = {
    "checkpoint_p99_ms": ("<=", 5.0),
    "throughput_ratio": (">=", 0.8),
    "checkpoints_retained": (">=", 2048),
    "view_open_s": ("<=", 1.0),
}


def admin_call(node: Any, op: str, **args: Any) -> Any:
    try:
        return admin.call(str(node.state_dir / "admin.sock"), op, **args)
    except admin.AdminError as exc:
        raise BenchError(f"{node.name} {op}: {exc}") from None


def bench_floor(pair: Pair, work: Path, source: Path, size: int, runs: int) -> dict[str, Any]:
    """The same ratio for the essential work of the design at C speed
    (bench/floor.py): nbdcopy into qemu-nbd, a source journal, TLS 1.3, a
    target journal synced per 32 MiB, the replica (random data) written, and
    with CDP every overwritten block read, appended to an undo file and synced
    before the replica write. An upper bound for any implementation here."""
    tls = (pair.source.config["tls"], pair.target.config["tls"])
    volume, replica = work / "floor-volume.img", work / "floor-replica.img"
    write_zeroes(volume, size)
    write_random(replica, size)
    mbps: dict[str, list[float]] = {"off": [], "on": []}
    with running(lambda: start_qemu_nbd(volume, work)) as qemu:
        argv = [arg for arg in nbdcopy_argv(source, qemu.uri) if arg != "--flush"]
        for i in range(runs):
            for name in ("off", "on"):
                sync()
                one = floor_copy(work, tls, argv, size, replica=replica, undo=name == "on")
                mbps[name].append(size / one["applied_s"] / 1e6)
            print(
                f"  run {i + 1}/{runs} floor    off {mbps['off'][-1]:7.1f} MB/s applied, "
                f"on {mbps['on'][-1]:7.1f} MB/s",
                flush=True,
            )
    volume.unlink()
    replica.unlink()
    off, on = statistics.median(mbps["off"]), statistics.median(mbps["on"])
    return {
        "what": bench_floor.__doc__.split("\n\n")[0] if bench_floor.__doc__ else "",
        "off_MBps": round(off, 1),
        "on_MBps": round(on, 1),
        "ratio": round(on / off, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in mbps.items()},
    }


def applied_copy(pair: Pair, source: Path, size: int, checkpoint_every: float) -> dict[str, Any]:
    """nbdcopy into the pair's source; seconds until the target applied it all."""
    sync()
    _, tgt = pair.snapshot()
    saved_before = tgt["group"]["cdp"]["preserved_bytes"]
    stop_taking = threading.Event()
    taken: list[float] = []

    def take() -> None:
        while True:  # one as the copy starts: everything it overwrites is saved
            taken.append(admin_call(pair.source, "checkpoint", group=GROUP)["seq"])
            if stop_taking.wait(checkpoint_every):
                break

    taker = threading.Thread(target=take, daemon=True)
    start = time.time()
    if checkpoint_every:
        taker.start()
        while not taken:
            time.sleep(0.001)
    try:
        run(nbdcopy_argv(source, pair.nbd_uri), timeout=600)
    finally:
        stop_taking.set()
        if checkpoint_every:
            taker.join(30)
    last = pair.snapshot()[0]["group"]["last_seq"]
    _, tgt = pair.wait(
        "applied", lambda s, t: bool(t["group"]) and t["group"]["applied_seq"] >= last, 600
    )
    seconds = tgt["time"] - start
    return {
        "MBps": size / seconds / 1e6,
        "seconds": seconds,
        "checkpoints": len(taken),
        "undo_saved_bytes": tgt["group"]["cdp"]["preserved_bytes"] - saved_before,
    }


def bench_throughput(
    off: Pair, on: Pair, work: Path, size: int, runs: int, every: float
) -> dict[str, Any]:
    files = [work / "a.img", work / "b.img"]
    for f in files:
        write_random(f, size)
    for pair in (off, on):  # random data everywhere first: overwrites save real blocks
        applied_copy(pair, files[1], size, 0)
        pair.wait_caught_up()
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for i in range(runs):
        source = files[i % 2]
        for name, pair, period in (("off", off, 0.0), ("on", on, every)):
            one = applied_copy(pair, source, size, period)
            results[name].append(one)
            print(
                f"  run {i + 1}/{runs} CDP {name:3}  {one['MBps']:7.1f} MB/s applied, "
                f"{one['checkpoints']} checkpoints, {one['undo_saved_bytes'] / 1e6:.0f} MB saved",
                flush=True,
            )
            pair.wait_caught_up()
    off_mb = statistics.median(r["MBps"] for r in results["off"])
    on_mb = statistics.median(r["MBps"] for r in results["on"])
    floor = bench_floor(on, work, files[0], size, runs)
    for f in files:
        f.unlink()
    return {
        "unit": "MB/s (10^6 bytes/s) until the target applied every write",
        "cdp_off": round(off_mb, 1),
        "cdp_on": round(on_mb, 1),
        "ratio": round(on_mb / off_mb, 3),
        "floor": floor,
        "runs": {k: [round(r["MBps"], 1) for r in v] for k, v in results.items()},
        "checkpoints_during_copy": [r["checkpoints"] for r in results["on"]],
        "undo_saved_bytes": [r["undo_saved_bytes"] for r in results["on"]],
        "checkpoint_every_s": every,
        "statistic": "median of the runs, alternating off and on",
        "command": " ".join(nbdcopy_argv(Path("SOURCE"), "nbd://SOURCE-NODE/vol")),
    }


def paced_writer(uri: str, rate: float, stop_writing: threading.Event, size: int) -> None:
    chunk = 1 << 20
    data = bytes(range(256)) * (chunk // 256)
    with NBDClient.open(uri) as client:
        begin, n = time.monotonic(), 0
        while not stop_writing.is_set():
            client.write((n * chunk) % (size - chunk), data)
            n += 1
            ahead = begin + n * chunk / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def bench_latency(pair: Pair, samples: int, rate: float, size: int) -> dict[str, Any]:
    sync()  # the copies above leave GBs of dirty pages: their write-back is not ours to time
    stop_writing = threading.Event()
    writer = threading.Thread(
        target=paced_writer, args=(pair.nbd_uri, rate, stop_writing, size), daemon=True
    )
    writer.start()
    waits, server = [], []
    try:
        time.sleep(0.5)
        for _ in range(samples):
            started = time.perf_counter()
            answer = admin_call(pair.source, "checkpoint", group=GROUP, label="latency")
            waits.append((time.perf_counter() - started) * 1000)
            server.append(answer["took_seconds"] * 1000)
            time.sleep(0.01)
    finally:
        stop_writing.set()
        writer.join(30)
    return {
        "unit": "ms, admin request to answer (the marker is in the group's sequence; "
        "its background commit follows within milliseconds)",
        "samples": samples,
        "writer_MBps": rate / 1e6,
        "p50_ms": round(percentile(waits, 0.5), 3),
        "p90_ms": round(percentile(waits, 0.9), 3),
        "p99_ms": round(percentile(waits, 0.99), 3),
        "max_ms": round(max(waits), 3),
        "server_side_p50_ms": round(percentile(server, 0.5), 3),
        "server_side_p99_ms": round(percentile(server, 0.99), 3),
    }


def bench_retention(pair: Pair, wanted: int) -> dict[str, Any]:
    started = time.monotonic()
    block = bytes(4096)
    with NBDClient.open(pair.nbd_uri) as client:
        for i in range(wanted + 16):
            client.write((i * 4096) % (client.size - 4096), block)
            admin_call(pair.source, "checkpoint", group=GROUP, label=f"r{i}")
    pair.wait_caught_up(timeout=600)
    retained = admin_call(pair.target, "checkpoints", group=GROUP)
    status = pair.target.status()["groups"][0]["cdp"]
    return {
        "taken": wanted + 16,
        "retained": len(retained),
        "seconds_to_take": round(time.monotonic() - started, 1),
        "undo_bytes": status["undo_bytes"],
    }


def start_qemu_reader(replica: Path, work: Path) -> Server:
    port = free_port(HOST)
    command = ["qemu-nbd", "-r", "-f", "raw", "-x", "replica", "-p", str(port), "-b", HOST]
    command += ["-t", "--cache=writeback", "--aio=threads", "--shared=4", str(replica)]
    server = spawn("qemu-nbd", command, work / "qemu-reader.log")
    server.uri = f"nbd://{HOST}:{port}/replica"

    def ready() -> bool:
        try:
            run(["nbdinfo", "--size", server.uri], timeout=10)
        except BenchError:
            return False
        return True

    wait_ready(server, ready)
    return server


def bench_views(pair: Pair, work: Path, size: int, runs: int) -> tuple[dict, dict]:
    opens = []
    for _ in range(5):
        started = time.perf_counter()
        view = admin_call(pair.target, "view_open", group=GROUP, volume=VOLUME, checkpoint="oldest")
        with NBDClient.open(view["uri"]) as client:
            client.read(0, 4096)
        opens.append(time.perf_counter() - started)
        admin_call(pair.target, "view_close", export=view["export"])
    view = admin_call(pair.target, "view_open", group=GROUP, volume=VOLUME, checkpoint="oldest")
    ours, peer = [], []
    try:
        with running(lambda: start_qemu_reader(pair.replica, work)) as qemu:
            for uri in (view["uri"], qemu.uri):  # warm the page cache for both
                run(["nbdcopy", "--connections=4", uri, "null:"], timeout=600)
            for _ in range(runs):
                for uri, out in ((view["uri"], ours), (qemu.uri, peer)):
                    started = time.perf_counter()
                    run(["nbdcopy", "--connections=4", uri, "null:"], timeout=600)
                    out.append(size / (time.perf_counter() - started) / 1e6)
    finally:
        admin_call(pair.target, "view_close", export=view["export"])
    opened = {
        "what": "admin view_open of the oldest retained checkpoint + NBD handshake + first "
        "4 KiB read",
        "median_s": round(statistics.median(opens), 4),
        "runs_s": [round(x, 4) for x in opens],
        "checkpoint": view["checkpoint"],
    }
    read = {
        "unit": "MB/s, nbdcopy --connections=4 URI null: (warm page cache)",
        "view": round(statistics.median(ours), 1),
        "qemu-nbd -r replica": round(statistics.median(peer), 1),
        "ratio": round(statistics.median(ours) / statistics.median(peer), 3),
        "runs": {"view": [round(x, 1) for x in ours], "qemu-nbd": [round(x, 1) for x in peer]},
    }
    return opened, read


def met(key: str, value: float) -> bool:
    op, limit = TARGETS[key]
    return value <= limit if op == "<=" else value >= limit


def bench_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()
    size = args.size_mib << 20
    pairs = {}
    with ExitStack() as stack:
        for name in ("off", "on"):
            (work / name).mkdir()
            volume = work / name / "volume.img"
            write_zeroes(volume, size)
            pair = make_pair(work / name, volume)
            for node in (pair.target, pair.source):
                stack.callback(lambda n=node: n.proc and stop(n.proc))
            pair.target.start()
            pair.start_source()
            pair.wait_caught_up(timeout=300)
            pairs[name] = pair
        print(f"1. replication with CDP off and on ({args.size_mib} MiB copies)", flush=True)
        tput = bench_throughput(
            pairs["off"], pairs["on"], work, size, args.runs, args.checkpoint_every
        )
        pairs["off"].source.stop()
        pairs["off"].target.stop()
        on = pairs["on"]
        print(f"2. checkpoint latency under a {args.writer_mb:g} MB/s writer", flush=True)
        latency = bench_latency(on, args.latency_samples, args.writer_mb * 1e6, size)
        print(f"   p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms", flush=True)
        print(f"3. retention: more than {args.checkpoints} checkpoints", flush=True)
        retention = bench_retention(on, args.checkpoints)
        print(f"   {retention['retained']} retained", flush=True)
        print("4./5. views of the oldest checkpoint: open, read", flush=True)
        opened, read = bench_views(on, work, size, args.runs)
        on.source.stop()
        on.target.stop()
    errors = [line for p in pairs.values() for n in p.nodes() for line in n.problems("ERROR")]
    if errors:
        raise BenchError("havend logged errors:\n" + "\n".join(errors[:10]))
    result = {
        "checkpoint_p50_ms": latency["p50_ms"],
        "checkpoint_p99_ms": latency["p99_ms"],
        "throughput_ratio": tput["ratio"],
        "throughput_floor_ratio": tput["floor"]["ratio"],
        "checkpoints_retained": retention["retained"],
        "view_open_s": opened["median_s"],
        "view_read_ratio": read["ratio"],
    }
    result["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()}
    result["targets_met"] = {k: met(k, result[k]) for k in TARGETS}
    result |= {
        "throughput": tput,
        "checkpoint_latency": latency,
        "retention": retention,
        "view_open": opened,
        "view_read": read,
        "setup": {
            "volume_bytes": size,
            "transport": on.transport,
            "retain": 2048,
        },
        "machine": machine,
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print()
    print(f"{'metric':34} {'value':>10}  target")
    for key in (
        "checkpoint_p50_ms",
        "checkpoint_p99_ms",
        "throughput_ratio",
        "throughput_floor_ratio",
        "checkpoints_retained",
        "view_open_s",
        "view_read_ratio",
    ):
        target = result["targets"].get(key, "")
        ok = (
            ""
            if key not in result["targets_met"]
            else (" ok" if result["targets_met"][key] else " MISSED")
        )
        print(f"{key:34} {result[key]:>10}  {target}{ok}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="volume and copy size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=float, default=0.5, help="s, during copies")
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--writer-mb", type=float, default=20, help="MB/s during the latency run")
    parser.add_argument("--checkpoints", type=int, default=2048, help="retention run")
    parser.add_argument("--output", type=Path, default=RESULTS / "cdp.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("cdp", lambda work: bench_all(args, work), print_table, args.output)


if __name__ == "__main__":
    sys.exit(main())
