#!/usr/bin/env python3
"""Failover of a 3-tier application: orchestration overhead, RTO, failback bytes.

A real havend pair (API on both nodes) protects group ``app``: volumes ``db``
and ``db-log`` (server db1), ``app-root`` (app1), ``web-root`` (web1). The
production VMs (tiny guests under TCG, qemu provider) boot from the source
node's NBD exports: db1 writes stamped records to ``db`` and answers TCP 5432,
app1 TCP 8080, web1 HTTP 80. Each run, as tests/service/test_recovery_plans.py
does it, through real ``ansible-playbook`` plays:

1. ``db-log`` is zeroed at the source (replicated) so the run's records are the
   only ones on it;
2. ``haven.dr.failover`` (planned): production stopped (web first), the group
   failed over, the plan db -> app -> web booted on the recovery node's
   promoted exports, each tier gated by its health check (interval
   ``--interval`` s, 0.2 by default: a coarse interval is orchestration too);
3. the recovered db1 writes ``--records`` synced records to ``db-log``;
4. ``haven.dr.failback``: recovery servers paused, the changes shipped home,
   the recovery servers torn down, production booted in plan order;
5. the bytes the recovery side changed are counted independently of havend:
   the 4 KiB blocks of the source's ``db-log`` holding a stamped record.

The peer (once per run, before production boots): the same three VMs (same
memory, CPUs, NIC, disks - read-only - and roles, db1 without its writer)
booted by a plain sequential script on the qemu provider with no engine,
module or Ansible: network, then per tier create, power on, a probe every
``--interval`` s until the same check passes.

Definitions (also in the JSON's ``definitions``):

- a server's own boot-to-healthy time: its ``power_on`` step's start to its
  ``health_check`` step's (ok) end - QEMU start, guest boot, the role coming
  up, and the check's granularity (a try cannot see the service before it is
  up; one that began just before is counted here too);
- a tier's own time: the max over its servers (they boot in parallel);
- plan wall time: the first plan step's start (the ``network`` step) to the
  last ``health_check`` end;
- ``orchestration_overhead_s`` = plan wall time - sum over tiers of the
  tier's own time, for the failover: what the engine, the provider calls
  around the boot (network, create) and the gaps between tiers cost;
- ``rto_s``: the failover module's ``rto_seconds`` (the task's start to the
  last health check passed: plan check, stop, block-level failover, exports,
  plan);
- ``block_level_s``: the first ``stop`` step's start to the last
  ``failover`` step's end;
- ``overhead_vs_plain_script_s``: ``orchestration_overhead_s`` less the plain
  script's overhead by the same formula;
- ``failback_bytes_ratio``: the failback's shipped bytes (``bytes.shipped``
  of haven.dr.failback, the changed blocks pulled home) / (4 KiB blocks of
  ``db-log`` holding a record, read back from the source after the
  failback, x 4096).

Each run also checks the module's timeline against the machine, independently
of the module: every VM's QEMU process (/proc/PID/stat) started within its
``power_on`` step, and ``rto_seconds`` is within the task's and the play's
wall time (this found the plan steps shifted by the plan's whole duration in
haven.dr.failover and haven.dr.failback).

All per-step numbers are medians over ``--runs`` runs (default 2, 1.5-3 min).

    PYTHONPATH=service/src .venv/bin/python bench/failover.py [--runs N] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, ROOT, BenchError, machine_info, run_benchmark

# havend, the test helpers and tools/ of this checkout, whatever the venv has installed
SERVICE_SRC = str(ROOT / "service" / "src")
sys.path[:0] = [SERVICE_SRC, str(ROOT / "tests" / "service"), str(ROOT / "tools")]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [SERVICE_SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

import guest_image  # noqa: E402
from nodes import MiB, Pair, app_group, make_token, start_pair, subnet, wait_caught_up  # noqa: E402
from plays import ansible, ansible_env  # noqa: E402
from waiting import wait_until  # noqa: E402

from havend.nbd.client import NBDClient  # noqa: E402

BOOT = 180  # seconds a tiny guest may take to boot on a loaded machine
TIERS = (("db", "db1", 11), ("app", "app1", 21), ("web", "web1", 31))
DISKS = {"db1": ["db", "db-log"], "app1": ["app-root"], "web1": ["web-root"]}
PROD_ROLES = {"db1": "writer+tcp:5432", "app1": "tcp:8080", "web1": "http:80:shop%20web"}
# the recovered db writes its log only (what failback brings home)
DR_ROLES = {"db1": "writer:vdb+tcp:5432", "app1": "tcp:8080", "web1": "http:80:shop%20web"}
PLAIN_ROLES = {"db1": "tcp:5432", "app1": "tcp:8080", "web1": "http:80:shop%20web"}
PLAN_STEPS = {"network", "create", "power_on", "delay", "health_check", "boot", "pre", "post"}
TARGETS = {"orchestration_overhead_s": ("<=", 2.0), "failback_bytes_ratio": ("<=", 1.1)}

DEFINITIONS = {
    "server_own_time": "power_on step start -> its ok health_check end (QEMU start, guest "
    "boot, the role up, and the check's granularity: interval_seconds and a try in flight)",
    "tier_own_time": "max over the tier's servers of server_own_time",
    "plan_wall_time": "first plan step start (network) -> last health_check end",
    "orchestration_overhead_s": "failover: plan_wall_time - sum over tiers of tier_own_time",
    "rto_s": "haven.dr.failover's rto_seconds: the task's start -> the last health check "
    "passed (plan check, stop, block-level failover, exports, plan)",
    "block_level_s": "first stop step start -> last failover step end",
    "plain_script_overhead_s": "the same formula for the same VMs booted by a sequential "
    "script on the qemu provider (no engine, no module, no Ansible)",
    "overhead_vs_plain_script_s": "orchestration_overhead_s - plain_script_overhead_s",
    "failback_bytes_ratio": "haven.dr.failback bytes.shipped / (4 KiB blocks of db-log "
    "holding a stamped record, read from the source after the failback, x 4096)",
    "play_wall_s": "the ansible-playbook process, start to exit",
    "qemu_started_after_power_on_s": "cross-check of the module's timeline, independent of "
    "it: each VM's QEMU process start (/proc/PID/stat) - its power_on step's start "
    "(haven_report.started + step.started); the run fails outside [-0.5, step + 0.5] s, "
    "or if rto_seconds exceeds the task's or the play's wall time",
}


def _collection(work: Path) -> Callable[..., Any]:
    """``get_provider`` of this checkout (imported as ansible_collections.haven.dr)."""
    base = work / "pycoll"
    link = base / "ansible_collections" / "haven" / "dr"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(ROOT)
    sys.path.insert(0, str(base))
    from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

    return get_provider


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    with NBDClient.open(uri) as client:
        return client.read(offset, length)


def checks(sub: str) -> dict[str, dict[str, Any]]:
    return {
        "db1": {"type": "tcp", "port": 5432},
        "app1": {"type": "tcp", "port": 8080},
        "web1": {"type": "http", "url": f"http://{sub}.31/", "body_contains": "shop web"},
    }


def plan(net: str, sub: str, interval: float) -> dict[str, Any]:
    """The shop: db, then app, then web, each gated by its check."""

    def server(host: str, octet: int) -> dict[str, Any]:
        check = checks(sub)[host] | {"timeout_seconds": BOOT, "interval_seconds": interval}
        return {
            "name": host,
            "vcpus": 1,
            "memory_mib": 192,
            "nics": [{"network": net, "ip": f"{sub}.{octet}/24"}],
            "health_check": check,
        }

    return {
        "name": "shop",
        "rto_target_seconds": 900,
        "rpo_target_seconds": 60,
        "networks": {net: {"isolated": False, "cidr": f"{sub}.0/24"}},
        "groups": [{"name": tier, "servers": [server(host, octet)]} for tier, host, octet in TIERS],
    }


# --- what a timeline says ----------------------------------------------------------


def own_times(timeline: list[dict[str, Any]]) -> dict[str, float]:
    """{tier server: power_on start -> ok health_check end}."""
    out = {}
    for _tier, host, _octet in TIERS:
        on = [s for s in timeline if s["step"] == "power_on" and s["server"] == host]
        ok = [
            s
            for s in timeline
            if s["step"] == "health_check" and s["server"] == host and s["outcome"] == "ok"
        ]
        if not on or not ok:
            raise BenchError(f"no power_on and ok health_check of {host} in {timeline}")
        out[host] = ok[-1]["ended"] - on[-1]["started"]
    return out


def plan_overhead(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan's wall time, its tiers' own times and the difference."""
    steps = [s for s in timeline if s["step"] in PLAN_STEPS]
    first = min(s["started"] for s in steps)
    last = max(s["ended"] for s in steps if s["step"] == "health_check")
    own = own_times(timeline)  # one server per tier: the tier's max is its server's
    wall = last - first
    return {
        "plan_wall_s": wall,
        "tiers_own_s": sum(own.values()),
        "overhead_s": wall - sum(own.values()),
        "own_s": own,
    }


def qemu_started(provider: Any, name: str) -> float:
    """Wall-clock time the VM's QEMU process started (/proc: 10 ms ticks since boot)."""
    pid = provider.pid(name)
    if pid is None:
        raise BenchError(f"{name} does not run")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def check_clock(result: dict[str, Any], provider: Any, wall: float) -> dict[str, float]:
    """The timeline against what the machine says, independently of the module:
    each VM's QEMU started within its power_on step, and the RTO (from the
    report's start) ended before the report and the play did. {server: QEMU's
    start - power_on's start}; a BenchError when the times do not add up."""
    report = result["haven_report"]
    out = {}
    for _tier, host, _octet in TIERS:
        on = [s for s in result["timeline"] if s["step"] == "power_on" and s["server"] == host]
        delta = qemu_started(provider, host) - (report["started"] + on[-1]["started"])
        if not -0.5 <= delta <= on[-1]["seconds"] + 0.5:
            raise BenchError(
                f"{host}'s QEMU started {delta:.3f} s after its power_on step began "
                f"(the step took {on[-1]['seconds']:.3f} s): the timeline is off"
            )
        out[host] = round(delta, 4)
    if not result["rto_seconds"] <= min(wall, report["seconds"] + 0.5):
        raise BenchError(
            f"RTO {result['rto_seconds']} s, but the task took {report['seconds']} s "
            f"and the play {wall:.3f} s: the timeline is off"
        )
    return out


def step_seconds(timeline: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """{"<prefix>.<step>.<server or group>": seconds} (summed if a step repeats)."""
    out: dict[str, float] = {}
    for s in timeline:
        key = ".".join(p for p in (prefix, s["step"], s["server"] or s["group"]) if p)
        out[key] = out.get(key, 0.0) + s["seconds"]
    return out


# --- the sites -----------------------------------------------------------------------


class Shop:
    """The pair, production, and the plays run against them."""

    def __init__(self, work: Path, image: dict[str, str], get_provider: Callable) -> None:
        self.work = work
        self.image = image
        self.get_provider = get_provider
        self.pair: Pair | None = None
        self.prod: Any = None
        self.prod_net = "p" + secrets.token_hex(4)
        self.dr_net, self.dr_sub = "r" + secrets.token_hex(4), subnet()
        self.prod_sub = subnet()
        while self.prod_sub == self.dr_sub:
            self.prod_sub = subnet()

    def start(self, stack: ExitStack) -> None:
        group = app_group(
            self.work, {"db": 2 * MiB, "db-log": 2 * MiB, "app-root": MiB, "web-root": MiB}
        )
        for volume in group["volumes"]:
            volume["server"] = next(s for s, d in DISKS.items() if volume["name"] in d)
        stack.callback(self.cleanup)
        self.pair = start_pair(self.work, [group], api=True, caught_up=60)
        collections = self.work / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(ROOT)
        self.prod = self.get_provider(
            "qemu", state_dir=str(self.work / "production"), image=self.image
        )

    def boot_production(self) -> None:
        assert self.pair is not None
        self.prod.create_network(
            {"name": self.prod_net, "cidr": f"{self.prod_sub}.0/24", "isolated": False}, 30
        )
        nbd = self.pair.source.address("nbd")
        for _tier, host, octet in TIERS:
            self.prod.create(
                {
                    "name": host,
                    "memory": 192,
                    "role": PROD_ROLES[host],
                    "nics": [{"network": self.prod_net, "ip": f"{self.prod_sub}.{octet}/24"}],
                },
                [f"{nbd}/{d}" for d in DISKS[host]],
                30,
            )
            self.prod.power_on(host, BOOT)
        for _tier, host, _octet in TIERS:
            wait_until(
                lambda n=host: "haven: up" in self.prod.serial_log(n),
                BOOT,
                f"production {host} to boot",
                detail=lambda n=host: self.prod.serial_log(n)[-2000:],
                interval=0.2,
            )
        self.wait_acks(self.prod, 5, "production db1 to write")

    @staticmethod
    def wait_acks(provider: Any, count: int, what: str) -> None:
        wait_until(
            lambda: len(guest_image.writer_acks(provider.serial_log("db1"))) >= count,
            BOOT,
            what,
            detail=lambda: provider.serial_log("db1")[-2000:],
            interval=0.2,
        )

    def connection(self) -> dict[str, Any]:
        assert self.pair is not None
        return {
            "url": self.pair.source.address("api"),
            "token": make_token(self.pair.source, f"b-{secrets.token_hex(3)}", "operate"),
            "recovery_url": self.pair.target.address("api"),
            "recovery_token": make_token(self.pair.target, f"b-{secrets.token_hex(3)}", "operate"),
            "qemu": {
                "kernel": self.image["kernel"],
                "initrd": self.image["initrd"],
                "servers": {host: {"role": role} for host, role in DR_ROLES.items()},
            },
        }

    def play(self, name: str, module: str, args: dict[str, Any]) -> tuple[dict, float]:
        """One task of ``module`` in a play: its registered result, the play's wall time."""
        out = self.work / f"{name}.json"
        task = {"name": name, module: args, "register": "r", "ignore_errors": True}
        save = {"ansible.builtin.copy": {"content": "{{ r | to_json }}", "dest": str(out)}}
        play = [
            {"hosts": "localhost", "connection": "local", "gather_facts": False}
            | {"tasks": [task, save]}
        ]
        path = self.work / f"{name}.yml"
        path.write_text(yaml.safe_dump(play))
        started = time.perf_counter()
        done = ansible(
            self.work,
            "ansible-playbook",
            "-i",
            "localhost,",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(path),
            env=ansible_env(self.work),
            timeout=900,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"{name} play failed:\n{(done.stdout + done.stderr)[-4000:]}")
        result = json.loads(out.read_text())
        if result.get("failed") or not result.get("passed"):
            raise BenchError(f"{name} did not pass: {json.dumps(result)[-4000:]}")
        return result, wall

    def cleanup(self) -> None:
        """Every VM and network of the run (production, recovery, plain), then the pair."""
        for where in ("production", "failover-state/qemu", "plain"):
            if not (self.work / where).exists():
                continue
            left = self.get_provider("qemu", state_dir=str(self.work / where), image=self.image)
            for name in left.list(10):
                try:
                    left.destroy(name, 30)
                except Exception as exc:
                    print(f"  cleanup: {where}/{name}: {exc}", file=sys.stderr)
            networks = self.work / where / "networks"
            for spec in networks.glob("*.json") if networks.exists() else []:
                try:
                    left.destroy_network(spec.stem, 30)
                except Exception as exc:
                    print(f"  cleanup: network {spec.stem}: {exc}", file=sys.stderr)
        if self.pair is not None:
            self.pair.stop()
            self.pair = None


# --- the peer: a plain script ---------------------------------------------------


PROBE = (
    "import socket,sys,urllib.request as u\n"
    "h,p,url=sys.argv[1],int(sys.argv[2]),sys.argv[3]\n"
    "try:\n"
    "    if url: sys.exit(0 if b'shop web' in u.urlopen(url,timeout=1).read() else 1)\n"
    "    socket.create_connection((h,p),timeout=1).close()\n"
    "except Exception: sys.exit(1)\n"
)


def plain_script(shop: Shop, work: Path, index: int, interval: float) -> dict[str, Any]:
    """The three VMs booted in tier order with no engine; a timeline like the engine's."""
    assert shop.pair is not None
    prov = shop.get_provider("qemu", state_dir=str(work / "plain"), image=shop.image)
    net, sub = f"q{index}" + secrets.token_hex(3), subnet()
    nbd = shop.pair.source.address("nbd")
    origin = time.monotonic()
    timeline: list[dict[str, Any]] = []

    def step(name: str, server: str | None, func: Callable[[], Any]) -> Any:
        started = time.monotonic() - origin
        value = func()
        ended = time.monotonic() - origin
        timeline.append(
            {"step": name, "group": None, "server": server, "started": started}
            | {"ended": ended, "seconds": ended - started, "outcome": "ok"}
        )
        return value

    def healthy(host: str, octet: int) -> None:
        check = checks(sub)[host]
        probe = [sys.executable, "-c", PROBE, f"{sub}.{octet}", str(check.get("port", 80))]
        argv = prov.network_command(net, [*probe, check.get("url", "")])
        deadline = time.monotonic() + BOOT
        while subprocess.run(argv, capture_output=True, timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                raise BenchError(f"plain script: {host} not healthy within {BOOT} s")
            time.sleep(interval)

    try:
        spec = {"name": net, "cidr": f"{sub}.0/24", "isolated": False}
        step("network", None, lambda: prov.create_network(spec, 30))
        for _tier, host, octet in TIERS:
            server = {
                "name": host,
                "memory": 192,
                "cpus": 1,
                "role": PLAIN_ROLES[host],
                "nics": [{"network": net, "ip": f"{sub}.{octet}/24"}],
            }
            disks = [{"uri": f"{nbd}/{d}", "readonly": True} for d in DISKS[host]]
            step("create", host, lambda s=server, d=disks: prov.create(s, d, 30))
            step("power_on", host, lambda h=host: prov.power_on(h, BOOT))
            step("health_check", host, lambda h=host, o=octet: healthy(h, o))
    finally:
        for _tier, host, _octet in reversed(TIERS):
            if prov.status(host, 10)["state"] != "absent":
                prov.destroy(host, 30)
        prov.destroy_network(net, 30)
    return {"timeline": timeline} | plan_overhead(timeline)


# --- one run ---------------------------------------------------------------------------


def one_run(shop: Shop, args: argparse.Namespace, index: int) -> dict[str, Any]:
    assert shop.pair is not None
    src, tgt = shop.pair.source, shop.pair.target
    with NBDClient.open(f"{src.address('nbd')}/db-log") as client:
        client.write(0, bytes(2 * MiB))
        client.flush()
    wait_caught_up(src, tgt, timeout=120)
    dr_plan = plan(shop.dr_net, shop.dr_sub, args.interval)
    common = shop.connection() | {
        "state_dir": str(shop.work / "failover-state"),
        "production": {"state_dir": str(shop.work / "production")},
        "plan": dr_plan,
    }
    moved, moved_wall = shop.play(
        f"failover-{index}", "haven.dr.failover", common | {"mode": "planned"}
    )
    rpo = moved["rpo"]["app"]
    if rpo["writes"] != 0 or rpo["final_seq"] != rpo["target_applied_seq"]:
        raise BenchError(f"the planned failover lost writes: {rpo}")
    recovery = shop.get_provider(
        "qemu", state_dir=str(shop.work / "failover-state" / "qemu"), image=shop.image
    )
    shop.wait_acks(recovery, args.records, f"the recovered db1 to write {args.records} records")
    qemu_vs_power_on = check_clock(moved, recovery, moved_wall)
    home, home_wall = shop.play(f"failback-{index}", "haven.dr.failback", common)
    back_qemu_vs_power_on = check_clock(home, shop.prod, home_wall)
    on_disk = guest_image.writer_records(nbd_read(f"{src.address('nbd')}/db-log", 0, 2 * MiB))
    changed = len({sector // 8 for sector in on_disk}) * 4096
    if not changed:
        raise BenchError("no record of the recovered db1 on db-log after the failback")
    shipped = home["bytes"]["shipped"]
    # production writes again and replicates before the next run
    shop.wait_acks(shop.prod, 3, "production db1 to write again")
    wait_caught_up(src, tgt, timeout=120)

    timeline = moved["timeline"]
    stops = [s for s in timeline if s["step"] == "stop"]
    fails = [s for s in timeline if s["step"] == "failover"]
    overhead = plan_overhead(timeline)
    back = plan_overhead(home["timeline"])
    return {
        "rto_s": moved["rto_seconds"],
        "orchestration_overhead_s": overhead["overhead_s"],
        "plan_wall_s": overhead["plan_wall_s"],
        "tiers_own_s": overhead["tiers_own_s"],
        "server_own_s": overhead["own_s"],
        "block_level_s": max(s["ended"] for s in fails) - min(s["started"] for s in stops),
        "before_first_step_s": min(s["started"] for s in timeline),
        "play_wall_s": moved_wall,
        "qemu_started_after_power_on_s": qemu_vs_power_on,
        "failback_rto_s": home["rto_seconds"],
        "failback_qemu_started_after_power_on_s": back_qemu_vs_power_on,
        "failback_orchestration_overhead_s": back["overhead_s"],
        "failback_plan_wall_s": back["plan_wall_s"],
        "failback_server_own_s": back["own_s"],
        "failback_play_wall_s": home_wall,
        "failback_changed_bytes_on_disk": changed,
        "failback_bytes": home["bytes"],
        "failback_bytes_ratio": shipped / changed,
        "records_on_disk": len(on_disk),
        "steps_s": step_seconds(timeline, "failover")
        | step_seconds(home["timeline"], "failback")
        | step_seconds(home["teardown"], "failback.teardown"),
        "failover_timeline": timeline,
        "failback_timeline": home["timeline"],
    }


def bench_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()
    image = guest_image.build().as_dict()
    get_provider = _collection(work)
    shop = Shop(work, image, get_provider)
    runs, plains = [], []
    with ExitStack() as stack:
        shop.start(stack)
        for i in range(args.runs):
            plains.append(plain_script(shop, work, i, args.interval))
            print(
                f"  plain script {i + 1}/{args.runs}: plan wall {plains[-1]['plan_wall_s']:.2f} s, "
                f"overhead {plains[-1]['overhead_s']:.3f} s",
                flush=True,
            )
        shop.boot_production()
        for i in range(args.runs):
            one = one_run(shop, args, i)
            runs.append(one)
            print(
                f"  run {i + 1}/{args.runs}: RTO {one['rto_s']:.2f} s, overhead "
                f"{one['orchestration_overhead_s']:.3f} s (plan {one['plan_wall_s']:.2f} s - "
                f"VMs {one['tiers_own_s']:.2f} s), block level {one['block_level_s']:.2f} s; "
                f"failback {one['failback_bytes']['shipped']} B shipped / "
                f"{one['failback_changed_bytes_on_disk']} B changed",
                flush=True,
            )
        assert shop.pair is not None
        errors = [
            line
            for node in (shop.pair.source, shop.pair.target)
            for line in node.log().splitlines()
            if " ERROR " in line
        ]
    if errors:
        raise BenchError("havend logged errors:\n" + "\n".join(errors[:10]))

    def median(key: str, of: list[dict[str, Any]] = runs) -> float:
        return round(statistics.median(r[key] for r in of), 4)

    keys = sorted({k for r in runs for k in r["steps_s"]})
    steps = {k: round(statistics.median(r["steps_s"].get(k, 0.0) for r in runs), 4) for k in keys}
    plain_overhead = median("overhead_s", plains)
    result: dict[str, Any] = {
        "orchestration_overhead_s": median("orchestration_overhead_s"),
        "rto_s": median("rto_s"),
        "failback_bytes_ratio": median("failback_bytes_ratio"),
        "block_level_s": median("block_level_s"),
        "overhead_vs_plain_script_s": round(median("orchestration_overhead_s") - plain_overhead, 4),
        "plain_script_overhead_s": plain_overhead,
        "failback_orchestration_overhead_s": median("failback_orchestration_overhead_s"),
        "failback_rto_s": median("failback_rto_s"),
    }
    result["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()}
    result["targets_met"] = {k: result[k] <= v for k, (_op, v) in TARGETS.items()}
    result |= {
        "definitions": DEFINITIONS,
        "statistic": f"median of {args.runs} runs",
        "failover": {
            "plan_wall_s": median("plan_wall_s"),
            "tiers_own_s": median("tiers_own_s"),
            "server_own_s": {
                h: round(statistics.median(r["server_own_s"][h] for r in runs), 4)
                for _t, h, _o in TIERS
            },
            "before_first_step_s": median("before_first_step_s"),
            "play_wall_s": median("play_wall_s"),
        },
        "failback": {
            "plan_wall_s": median("failback_plan_wall_s"),
            "play_wall_s": median("failback_play_wall_s"),
            "changed_bytes_on_disk": int(median("failback_changed_bytes_on_disk")),
            "shipped_bytes": int(statistics.median(r["failback_bytes"]["shipped"] for r in runs)),
            "wire_bytes": int(statistics.median(r["failback_bytes"]["wire"] for r in runs)),
            "havend_changed_bytes": int(
                statistics.median(r["failback_bytes"]["changed"] for r in runs)
            ),
        },
        "plain_script": {
            "plan_wall_s": median("plan_wall_s", plains),
            "tiers_own_s": median("tiers_own_s", plains),
            "server_own_s": {
                h: round(statistics.median(p["own_s"][h] for p in plains), 4) for _t, h, _o in TIERS
            },
            "what": "the same three VMs (db1 without its writer, disks read-only) booted by "
            "a sequential script on the qemu provider: network, then per tier create, "
            "power_on, a probe in the network every interval_seconds until it passes",
        },
        "steps_s": steps,
        "runs": runs,
        "plain_runs": plains,
        "setup": {
            "tiers": [f"{t}: {h}" for t, h, _o in TIERS],
            "interval_seconds": args.interval,
            "records": args.records,
            "memory_mib": 192,
            "volumes_bytes": 6 * MiB,
            "accel": "tcg",
        },
        "machine": machine,
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print()
    for key in (
        "orchestration_overhead_s",
        "rto_s",
        "block_level_s",
        "failback_bytes_ratio",
        "plain_script_overhead_s",
        "overhead_vs_plain_script_s",
        "failback_orchestration_overhead_s",
        "failback_rto_s",
    ):
        target = result["targets"].get(key, "")
        ok = ""
        if key in result["targets_met"]:
            ok = " ok" if result["targets_met"][key] else " MISSED"
        print(f"{key:34} {result[key]:>10}  {target}{ok}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.2, help="health check interval (s)")
    parser.add_argument("--records", type=int, default=20, help="recovered db1's records")
    parser.add_argument("--output", type=Path, default=RESULTS / "failover.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("failover", lambda work: bench_all(args, work), print_table, args.output)


if __name__ == "__main__":
    sys.exit(main())
