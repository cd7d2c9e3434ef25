"""``make demo``: the whole DR story of a three-tier application, on VMs,
through the collection's playbooks.

A protected site and a cloud are two network namespaces joined by veth
pairs; a source havend runs in the first, a target havend in the second,
paired, TLS between them and on their APIs. Then, each phase announced:

1. **protect** - ``ansible-playbook haven.dr.protect``: the disks of db1,
   app1 and web1 become the source node's NBD exports (capture
   ``served_disk``), one consistency group ``shop`` made with them, its
   checkpoints every 5 s; the initial copy, then the lag (the RPO).
2. **production** - the three tiers boot on the protected site from those
   exports (tiny guests, tools/guest_image.py): ``db`` writes
   sequence-stamped records and syncs each, ``app`` reads the db's last
   record, ``web`` shows the app's answer on an HTTP page.
3. **checkpoints** - the scheduled checkpoints reach the recovery node.
4. **drill** - ``haven.dr.drill``: the plan booted from the latest
   checkpoint in an isolated network, tier by tier, each gated by its check
   (web's page must show a record the app got from the db), the report,
   the teardown; production keeps writing (its rate during the drill
   against before).
5. **failover** - ``haven.dr.failover`` (planned): production stopped web,
   app, db; the group drained and promoted; the plan booted at the recovery
   site. Every record production acknowledged is on the promoted disk.
6. **recovery writes** - the recovered db goes on after the last record
   production wrote; the recovered web shows it.
7. **failback** - ``haven.dr.failback``: the recovery servers paused, only
   the changed blocks shipped home, production powered on db, app, web.
   Every record the recovery site acknowledged is on production's disk.
8. **normal** - replicating again, production writing after the recovery
   site's last record.

A summary table at the end, the same figures in ``out/demo-summary.json``
(``records_lost``, ``duration_s``, ``drill_write_rate_ratio``,
``failover_rto_s``, ``failback_bytes_ratio``, ``boot_order_ok``, per phase),
the drill/failover/failback reports (HTML, JSON, JUnit) in ``out/reports/``
(the ``haven.dr.drill_report`` callback). Everything it started is gone
at the end, also after Ctrl-C or a failure; ``--clean`` (``make
demo-clean``) removes what a killed run left. Root (namespaces, taps).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".build" / "demo"
OUT = ROOT / "out"
sys.path[:0] = [str(ROOT / "tools"), str(WORK / "collections")]

import guest_image  # noqa: E402
from demo_sites import Live, Network, Node, run_demo, say  # noqa: E402

from havend import certs  # noqa: E402
from havend.nbd.client import NBDClient  # noqa: E402

MiB = 1 << 20
RING = 2048 * 512  # the db's records: seq N at sector N % 2048 of its disk
SERVERS = ("db1", "app1", "web1")  # in boot order: the tiers
DISKS = {
    "db1": {"db": 2 * MiB, "db-log": MiB},
    "app1": {"app-root": MiB},
    "web1": {"web-root": MiB},
}
OCTET = {"db1": 11, "app1": 21, "web1": 31}
PROD_NET, PROD = "demo-prod", "10.232.10"  # the protected site's servers
DR_NET, DR = "demo-dr", "10.232.20"  # the recovery site's (the drill's: isolated)
BOOT = 180  # a tiny guest boots in seconds under TCG; far more on a loaded machine
PLAYBOOK = 900
RPO_TARGET, RTO_TARGET = 30, 300


class DemoError(RuntimeError):
    pass


def roles(prefix: str) -> dict[str, str]:
    """What each tier runs, wired to the others' addresses in ``prefix``."""
    return {
        "db1": "db:5432",
        "app1": f"app:8080:{prefix}.{OCTET['db1']}:5432",
        "web1": f"web:80:{prefix}.{OCTET['app1']}:8080",
    }


def plan(name: str, isolated: bool) -> dict[str, Any]:
    """The shop's recovery plan: db, then app, then web, each gated by its
    check; web's proves the chain (its page shows the db's record via app)."""

    def server(host: str, check: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": host,
            "vcpus": 1,
            "memory_mib": 192,
            "nics": [{"network": DR_NET, "ip": f"{DR}.{OCTET[host]}/24"}],
            "health_check": check | {"timeout_seconds": BOOT, "interval_seconds": 1},
        }

    web = {
        "type": "http",
        "url": f"http://{DR}.{OCTET['web1']}/",
        "body_contains": "app: haven-seq",
    }
    return {
        "name": name,
        "rto_target_seconds": RTO_TARGET,
        "rpo_target_seconds": RPO_TARGET,
        "networks": {DR_NET: {"isolated": isolated, "cidr": f"{DR}.0/24"}},
        "groups": [
            {"name": "db", "servers": [server("db1", {"type": "tcp", "port": 5432})]},
            {"name": "app", "servers": [server("app1", {"type": "tcp", "port": 8080})]},
            {"name": "web", "servers": [server("web1", web)]},
        ],
    }


def read_nbd(uri: str, length: int) -> bytes:
    client = NBDClient.open(uri)
    try:
        return client.read(0, length)
    finally:
        client.close()


def missing(acked: list[int], data: bytes) -> list[int]:
    """The acknowledged seqs not on the disk: each one's sector holds it, or a
    later record (2048 later, the ring's next turn)."""
    held = guest_image.writer_records(data[:RING])
    return [s for s in acked if held.get(s % 2048, -1) < s]


def last_boot(console: str) -> str:
    """The console since the guest last booted (power cycles append)."""
    mark = console.rfind("haven: db ")
    return console[mark:] if mark >= 0 else console


def resumed_from(console: str) -> int | None:
    """The seq the db went on after, as it said at its last boot."""
    line = last_boot(console).split("\n", 1)[0]
    if not line.startswith("haven: db "):
        return None
    return int(line.rsplit(" ", 1)[1])


def tier_order_ok(report: dict[str, Any], step: str) -> bool:
    """Each tier's ``step`` (create, power_on) began only after the tier
    before it passed its check."""
    timeline = report.get("timeline") or []

    def first(kind: str, server: str) -> dict[str, Any] | None:
        return next((s for s in timeline if s["step"] == kind and s["server"] == server), None)

    for before, after in itertools.pairwise(SERVERS):
        passed, started = first("health_check", before), first(step, after)
        if passed is None or started is None or passed.get("outcome") != "ok":
            return False
        if started["started"] < passed["ended"]:
            return False
    return True


class Demo:
    def __init__(self) -> None:
        self.net = Network()
        self.nodes: list[Node] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.consoles: dict[str, str] = {}  # the recovery servers' last console seen
        self.t0 = time.monotonic()
        self.live = Live()
        self.src: httpx.Client | None = None
        self.tgt: httpx.Client | None = None
        self.prod: Any = None

    # --- the phases ------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        WORK.mkdir(parents=True, exist_ok=True)
        for stale in (
            "drill",
            "failover",
            "production",
            "ansible",
            "pki",
            "ca",
            "src1",
            "tgt1",
            "volumes",
        ):
            _remove(WORK / stale)
        (OUT / "reports").mkdir(parents=True, exist_ok=True)
        for old in (OUT / "reports").iterdir():
            old.unlink()
        say("haven.dr demo: a three-tier shop protected, drilled, failed over and back, on VMs\n")
        self.setup()
        self.protect()
        self.production()
        self.checkpoints()
        self.drill()
        self.failover()
        self.recovery_writes()
        self.failback()
        self.normal()
        return self.finish()

    def setup(self) -> None:
        started = time.monotonic()
        say("== setup: the images, two sites, two nodes")
        self.image = guest_image.build()
        _collections()
        importlib.invalidate_caches()  # the link may be new: sys.path has it already
        from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

        self.get_provider = get_provider
        how = self.net.up()
        if not self.net.namespaces:
            raise DemoError(f"the demo needs network namespaces (root): {how}")
        (WORK / "netns.json").write_text(json.dumps([self.net.site, self.net.cloud]))
        a = self.net.addr
        certs.init_ca(WORK / "ca", "haven-demo-ca")
        tls = {}
        for name, ips in (("src1", [a["site"]]), ("tgt1", [a["cloud"], a["link"]])):
            files = certs.issue(WORK / "ca", WORK / "pki", name, [name, *ips, "127.0.0.1"])
            tls[name] = {"cert": str(files.cert), "key": str(files.key), "ca": str(files.ca)}
        self.ca = tls["src1"]["ca"]
        target = self._node(
            "tgt1",
            {
                "tls": tls["tgt1"],
                "target": {
                    "listen": {"host": a["link"], "port": 0},
                    "replica_dir": str(WORK / "tgt1" / "replicas"),
                    "nbd": {"host": a["cloud"], "port": 0},  # the recovery servers' disks
                },
                "api": {"host": a["cloud"], "port": 0},
            },
            "cloud",
        )
        source = self._node(
            "src1",
            {
                "tls": tls["src1"],
                "source": {
                    "nbd": {"host": a["site"], "port": 0},  # production's disks
                    "link_timeout": 10,
                    "volume_dir": str(WORK / "volumes"),
                },
                "api": {"host": a["site"], "port": 0},
            },
            "site",
        )
        self.tokens = {
            "src_admin": source.token("admin", "demo-admin"),
            "src": source.token("operate", "demo"),
            "tgt": target.token("operate", "demo"),
        }
        self.urls = {
            "src": source.status()["addresses"]["api"],
            "tgt": target.status()["addresses"]["api"],
        }
        self.src = httpx.Client(
            base_url=self.urls["src"],
            verify=self.ca,
            headers={"Authorization": "Bearer " + self.tokens["src_admin"]},
            timeout=60,
        )
        self.tgt = httpx.Client(
            base_url=self.urls["tgt"],
            verify=self.ca,
            headers={"Authorization": "Bearer " + self.tokens["tgt"]},
            timeout=60,
        )
        host, port = target.status()["addresses"]["replication"].rsplit(":", 1)
        paired = self.src.post(
            "/v1/peers", json={"host": host, "port": int(port), "server_name": "tgt1"}
        )
        if paired.status_code != 200:
            raise DemoError(f"pairing the nodes: {paired.status_code} {paired.text}")
        self._write_ansible_files()
        self.row("setup", started, detail=f"{how}; src1 paired with tgt1 over TLS 1.3")

    def protect(self) -> None:
        started = time.monotonic()
        say("== protect: ansible-playbook haven.dr.protect (served disks, group shop)")
        self.playbook("protect", "protect")
        total = sum(v["size"] for v in self.src.get("/v1/volumes", params={"group": "shop"}).json())
        group = self._wait(
            "the initial copy",
            lambda: g if (g := self.group()) and g["connected"] and g["lag_bytes"] == 0 else None,
            120,
        )
        self.row(
            "protect",
            started,
            rpo=group["lag_seconds"],
            detail=f"{len(SERVERS)} servers, {sum(len(d) for d in DISKS.values())} disks, "
            f"{_mib(total)} copied to the recovery site",
        )

    def production(self) -> None:
        started = time.monotonic()
        say("== production: db1, app1, web1 boot from the source node's exports")
        self.prod = self.get_provider(
            "qemu", state_dir=str(WORK / "production"), image=self.image.as_dict()
        )
        self.prod.create_network({"name": PROD_NET, "cidr": f"{PROD}.0/24", "isolated": False}, 30)
        uris = {v["name"]: v["uri"] for v in self.src.get("/v1/volumes").json()}
        for name in SERVERS:
            server = {
                "name": name,
                "memory": 192,
                "role": roles(PROD)[name],
                "nics": [{"network": PROD_NET, "ip": f"{PROD}.{OCTET[name]}/24"}],
            }
            self.prod.create(server, [uris[d] for d in DISKS[name]], 30)
            self.prod.power_on(name, BOOT)
        for name in SERVERS:  # side by side: app and web ask the others when they are asked
            self._wait(
                f"{name} to boot", lambda n=name: "haven: up" in self.prod.serial_log(n), BOOT
            )
        page = self._wait("production's web page", lambda: self.page(self.prod, PROD), BOOT)
        self._wait("db1 to write", lambda: len(self.acks()) >= 5, BOOT)
        self.row("production", started, detail=f"web1 says: {page.strip()}")

    def checkpoints(self) -> None:
        started = time.monotonic()
        say("== checkpoints: every 5 s, kept by the recovery node")
        kept = self._wait(
            "3 checkpoints on the recovery node",
            lambda: c if len(c := self.tgt_checkpoints()) >= 3 else None,
            120,
        )
        group = self.group()
        self.row(
            "checkpoints",
            started,
            rpo=group["lag_seconds"],
            detail=f"{len(kept)} kept, lag {_lag(group)}",
        )

    def drill(self) -> None:
        started = time.monotonic()
        say(
            "== drill: ansible-playbook haven.dr.drill (isolated network; production keeps writing)"
        )
        before = self.rate(10)
        acks, t = len(self.acks()), time.monotonic()
        self.playbook("drill", "drill")
        during = (len(self.acks()) - acks) / (time.monotonic() - t)
        report = self.report("drill")
        ratio = round(during / before, 3) if before else None
        self.summary["drill_write_rate_ratio"] = ratio
        self.summary["drill_passed"] = report["passed"]
        self.summary["drill_boot_order_ok"] = tier_order_ok(report, "create")
        if not report["passed"]:
            raise DemoError(f"the drill failed: {report.get('failure')}")
        self.row(
            "drill",
            started,
            rpo=_rpo(report),
            rto=report["rto_seconds"],
            detail=f"passed; production wrote {during:.1f} records/s during it, "
            f"{before:.1f} before "
            f"(x{ratio})",
        )

    def failover(self) -> None:
        started = time.monotonic()
        say("== failover: ansible-playbook haven.dr.failover (planned: production first)")
        self.playbook("failover", "failover")
        report = self.report("failover")
        acked = self.acks()  # production is off: its last acknowledgement is final
        promoted = {v["name"]: v["uri"] for v in self.tgt.get("/v1/volumes").json()}
        lost = missing(acked, read_nbd(promoted["db"], RING))
        recovery = self.recovery()
        resumed = resumed_from(recovery.serial_log("db1"))
        self.summary.update(
            failover_rto_s=report["rto_seconds"],
            failover_records_acked=len(acked),
            failover_records_lost=len(lost),
            failover_boot_order_ok=tier_order_ok(report, "create"),
            failover_last_production_record=acked[-1] if acked else None,
            failover_recovery_resumed_after=resumed,
        )
        if not report["passed"]:
            raise DemoError(f"the failover failed: {report.get('failure')}")
        self.row(
            "failover",
            started,
            rpo=_rpo(report),
            rto=report["rto_seconds"],
            lost=len(lost),
            detail=f"production's {len(acked)} acknowledged records all on the promoted disk"
            if not lost
            else f"{len(lost)} acknowledged records missing: {lost[:10]}",
        )

    def recovery_writes(self) -> None:
        started = time.monotonic()
        say("== recovery writes: the recovered db goes on after production's last record")
        recovery = self.recovery()
        last = self.summary["failover_last_production_record"] or 0
        self._wait(
            "the recovered db1 to write 10 records",
            lambda: len(guest_image.writer_acks(last_boot(recovery.serial_log("db1")))) >= 10,
            BOOT,
        )
        page = self._wait("the recovered web page", lambda: self.page(recovery, DR), BOOT)
        shown = int(page.rsplit("haven-seq ", 1)[1].split()[0])
        self.summary["recovery_page_seq"] = shown
        if shown <= last:
            raise DemoError(f"the recovered web shows record {shown}, not one after {last}")
        self.row(
            "recovery writes", started, detail=f"web1 at the recovery site says: {page.strip()}"
        )

    def failback(self) -> None:
        started = time.monotonic()
        say("== failback: ansible-playbook haven.dr.failback (the changes, then production)")
        recovery = self.recovery()
        self.consoles = {}
        self.playbook("failback", "failback", watch=lambda: self._keep_console(recovery))
        report = self.report("failback")
        acked = guest_image.writer_acks(last_boot(self.consoles.get("db1", "")))
        home = {v["name"]: v["uri"] for v in self.src.get("/v1/volumes").json()}
        lost = missing(acked, read_nbd(home["db"], RING))
        written = {(s % 2048) // 8 for s in acked}  # the 4 KiB blocks the recovered db wrote
        shipped = (report.get("bytes") or {}).get("shipped")
        ratio = (
            round(shipped / (len(written) * 4096), 3) if shipped is not None and written else None
        )
        self.summary.update(
            failback_records_acked=len(acked),
            failback_records_lost=len(lost),
            failback_bytes=report.get("bytes"),
            failback_blocks_written=len(written),
            failback_bytes_ratio=ratio,
            failback_boot_order_ok=tier_order_ok(report, "power_on"),
            failback_last_recovery_record=acked[-1] if acked else None,
        )
        if not report["passed"]:
            raise DemoError(f"the failback failed: {report.get('failure')}")
        self.row(
            "failback",
            started,
            rto=report["rto_seconds"],
            shipped=shipped,
            lost=len(lost),
            detail=f"{_mib(shipped or 0)} shipped for {len(written)} blocks of 4 KiB the recovery "
            f"site wrote (x{ratio}); production powered on db1, app1, web1",
        )

    def normal(self) -> None:
        started = time.monotonic()
        say("== normal: replicating again, production writing")
        last = self.summary["failback_last_recovery_record"] or 0
        self._wait(
            "production db1 to write again",
            lambda: len(guest_image.writer_acks(last_boot(self.prod.serial_log("db1")))) >= 5,
            BOOT,
        )
        resumed = resumed_from(self.prod.serial_log("db1"))
        self.summary["production_resumed_after"] = resumed
        if resumed is None or resumed < last:
            raise DemoError(f"production's db went on after record {resumed}, not after {last}")
        group = self._wait(
            "the group to replicate, caught up",
            lambda: (
                g
                if (g := self.group())
                and g["state"] == "protecting"
                and g["connected"]
                and g["lag_bytes"] == 0
                else None
            ),
            120,
        )
        page = self._wait("production's web page", lambda: self.page(self.prod, PROD), BOOT)
        self.row("normal", started, rpo=group["lag_seconds"], detail=f"web1 says: {page.strip()}")

    def finish(self) -> dict[str, Any]:
        s = self.summary
        s["records_lost"] = s["failover_records_lost"] + s["failback_records_lost"]
        s["boot_order_ok"] = bool(
            s["drill_boot_order_ok"] and s["failover_boot_order_ok"] and s["failback_boot_order_ok"]
        )
        s["duration_s"] = round(time.monotonic() - self.t0, 1)
        s["phases"] = self.rows
        s["reports"] = sorted(str(p.relative_to(ROOT)) for p in (OUT / "reports").iterdir())
        for kind in ("drill", "failover", "failback"):  # at a fixed place too (README links it)
            html = sorted((OUT / "reports").glob(f"*-{kind}-*.html"))
            if html:
                shutil.copyfile(html[-1], OUT / f"{kind}-report.html")
        (OUT / "demo-summary.json").write_text(json.dumps(s, indent=2) + "\n")
        say("\n" + table(self.rows))
        say(
            f"\nrecords lost: {s['records_lost']}; boot order kept: {s['boot_order_ok']}; "
            f"drill write rate x{s['drill_write_rate_ratio']}; "
            f"failover RTO {s['failover_rto_s']:.1f} s; "
            f"failback shipped x{s['failback_bytes_ratio']} of what changed; "
            f"{s['duration_s']:.0f} s in all"
        )
        html = [p for p in s["reports"] if p.endswith(".html")]
        say(
            "reports: out/drill-report.html, out/failover-report.html, out/failback-report.html "
            f"(all of them: {', '.join(html)}); summary: out/demo-summary.json"
        )
        return s

    # --- helpers ---------------------------------------------------------------

    def _node(self, name: str, config: dict[str, Any], where: str) -> Node:
        role = "target" if "target" in config else "source"
        node = Node(
            name,
            {
                "node": {"name": name, "role": role, "state_dir": str(WORK / name)},
                "status_period": 0.2,
            }
            | config,
            self.net.prefix(where),
            WORK,
        )
        self.nodes.append(node)
        node.start()
        return node

    def _write_ansible_files(self) -> None:
        where = WORK / "ansible"
        where.mkdir(parents=True, exist_ok=True)
        python = sys.executable
        servers = {
            name: {
                "protected_server_disks": [
                    {"name": d, "path": f"shop/{d}.img", "size": size}
                    for d, size in DISKS[name].items()
                ]
            }
            for name in SERVERS
        }
        inventory = {
            "all": {
                "hosts": {
                    "localhost": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": python,
                    }
                },
                "children": {
                    "haven_protected_servers": {
                        "hosts": servers,
                        "vars": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": python,
                            "protected_server_capture": "served_disk",
                            "protected_server_group": "shop",
                        },
                    }
                },
            }
        }
        (where / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
        qemu = {
            "kernel": str(self.image.kernel),
            "initrd": str(self.image.initrd),
            "servers": {name: {"role": role} for name, role in roles(DR).items()},
        }
        production = {"state_dir": str(WORK / "production")}
        variables = {
            "haven_source_url": self.urls["src"],
            "haven_source_token": self.tokens["src"],
            "haven_source_admin_token": self.tokens["src_admin"],
            "haven_recovery_url": self.urls["tgt"],
            "haven_recovery_token": self.tokens["tgt"],
            "haven_ca_path": self.ca,
            "haven_protection_groups": [
                {
                    "name": "shop",
                    "rpo_seconds": RPO_TARGET,
                    "checkpoints": {"interval_seconds": 5, "retain": 2048},
                }
            ],
            "drill_plan": plan("shop-drill", isolated=True),
            "drill_qemu": qemu,
            "drill_state_dir": str(WORK / "drill"),
            "drill_report_path": str(WORK / "drill.json"),
            "failover_plan": plan("shop", isolated=False),
            "failover_mode": "planned",
            "failover_qemu": qemu,
            "failover_production": production,
            "failover_state_dir": str(WORK / "failover"),
            "failover_report_path": str(WORK / "failover.json"),
            "failback_plan": plan("shop", isolated=False),
            "failback_qemu": qemu,
            "failback_production": production,
            "failback_state_dir": str(WORK / "failover"),
            "failback_report_path": str(WORK / "failback.json"),
        }
        vars_file = where / "demo.yml"
        vars_file.touch(mode=0o600)
        vars_file.write_text(
            "# written by tools/demo.py: the nodes (tokens: keep it private)\n"
            + yaml.safe_dump(variables)
        )

    def playbook(self, name: str, label: str, watch: Callable[[], None] | None = None) -> None:
        """``ansible-playbook haven.dr.<name>``, its output in .build/demo/<name>.log,
        a progress line meanwhile (elapsed, lag, production's writes)."""
        log_path = WORK / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAVEN_", "ANSIBLE_"))} | {
            "ANSIBLE_COLLECTIONS_PATH": str(WORK / "collections"),
            "ANSIBLE_LOCAL_TEMP": str(WORK / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_CALLBACKS_ENABLED": "haven.dr.drill_report",
            "HAVEN_DRILL_REPORT_DIR": str(OUT / "reports"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        inventory, variables = WORK / "ansible" / "inventory.yml", WORK / "ansible" / "demo.yml"
        command = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            "-e",
            f"@{variables}",
            f"haven.dr.{name}",
        ]
        say(f"   $ ansible-playbook -i {_rel(inventory)} -e @{_rel(variables)} haven.dr.{name}")
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=WORK,
                start_new_session=True,
            )
        self.children.append(proc)
        try:
            while proc.poll() is None:
                if watch is not None:
                    watch()
                if time.monotonic() - started > PLAYBOOK:
                    raise DemoError(
                        f"{name}: still running after {PLAYBOOK} s (see {_rel(log_path)})"
                    )
                self.live.show(
                    f"   {label}: {time.monotonic() - started:5.1f} s, {self.progress()}"
                )
                time.sleep(0.5)
        finally:
            self.live.done()
            if proc.poll() is None:
                _kill_group(proc)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-2500:]
            raise DemoError(
                f"ansible-playbook haven.dr.{name} failed (exit {proc.returncode}):\n{tail}"
            )
        recap = [
            line
            for line in log_path.read_text().splitlines()
            if "ok=" in line and "changed=" in line
        ]
        say("   " + "\n   ".join(recap))

    def progress(self) -> str:
        parts = []
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError):
            group = self.group()
            if group:
                parts.append(f"lag {_lag(group)}")
        if self.prod is not None:
            acks = self.acks()
            if acks:
                parts.append(f"production's last record {acks[-1]}")
        return ", ".join(parts) or "starting"

    def group(self) -> dict[str, Any] | None:
        assert self.src is not None
        answer = self.src.get("/v1/groups/shop")
        return answer.json() if answer.status_code == 200 else None

    def tgt_checkpoints(self) -> list[dict[str, Any]]:
        assert self.tgt is not None
        answer = self.tgt.get("/v1/groups/shop/checkpoints")
        return answer.json() if answer.status_code == 200 else []

    def acks(self) -> list[int]:
        """Production db1's acknowledged records since it last booted."""
        return guest_image.writer_acks(last_boot(self.prod.serial_log("db1")))

    def rate(self, seconds: float) -> float:
        before, started = len(self.acks()), time.monotonic()
        time.sleep(seconds)
        return (len(self.acks()) - before) / (time.monotonic() - started)

    def recovery(self) -> Any:
        return self.get_provider(
            "qemu", state_dir=str(WORK / "failover" / "qemu"), image=self.image.as_dict()
        )

    def page(self, provider: Any, prefix: str) -> str | None:
        """web1's page, fetched from app1 (its guest agent runs wget)."""
        with contextlib.suppress(Exception):
            got = provider.guest_exec(
                "app1", ["/bin/sh", "-c", f"wget -q -O - http://{prefix}.{OCTET['web1']}/"], 20
            )
            if got["rc"] == 0 and "app: haven-seq" in got["stdout"]:
                return got["stdout"]
        return None

    def _keep_console(self, provider: Any) -> None:
        """The recovery servers' consoles as last seen (the failback destroys them)."""
        for name in SERVERS:
            text = provider.serial_log(name)
            if text:
                self.consoles[name] = text

    def report(self, name: str) -> dict[str, Any]:
        return json.loads((WORK / f"{name}.json").read_text())

    def _wait(self, what: str, done: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = done()
            if got:
                return got
            if time.monotonic() > deadline:
                raise DemoError(f"gave up waiting for {what} after {timeout:.0f} s")
            self.live.show(f"   waiting for {what}: {self.progress()}")
            time.sleep(0.5)

    def row(
        self,
        phase: str,
        started: float,
        rpo: float | None = None,
        rto: float | None = None,
        shipped: int | None = None,
        lost: int | None = None,
        detail: str = "",
    ) -> None:
        self.live.done()
        row = {
            "phase": phase,
            "seconds": round(time.monotonic() - started, 1),
            "rpo_s": None if rpo is None else round(rpo, 3),
            "rpo_target_s": RPO_TARGET if rpo is not None else None,
            "rto_s": None if rto is None else round(rto, 1),
            "bytes_shipped": shipped,
            "records_lost": lost,
            "detail": detail,
        }
        self.rows.append(row)
        say(f"   done in {row['seconds']:.1f} s: {detail}")

    # --- cleanup ---------------------------------------------------------------

    def close(self) -> None:
        self.live.done()
        for proc in self.children:
            _kill_group(proc)
        for client in (self.src, self.tgt):
            if client is not None:
                client.close()
        clean_vms()
        for node in reversed(self.nodes):  # the source first
            node.stop()
        self.net.down()
        (WORK / "netns.json").unlink(missing_ok=True)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("phase", "time", "RPO (target)", "RTO", "shipped", "lost")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["phase"],
                f"{r['seconds']:.1f} s",
                f"{r['rpo_s']:.2f} s ({r['rpo_target_s']} s)" if r["rpo_s"] is not None else "-",
                f"{r['rto_s']:.1f} s" if r["rto_s"] is not None else "-",
                _mib(r["bytes_shipped"]) if r["bytes_shipped"] is not None else "-",
                str(r["records_lost"]) if r["records_lost"] is not None else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def clean_vms() -> None:
    """Every VM and network of the demo's provider state dirs, gone."""
    if not (WORK / "collections").exists():
        return
    from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

    for where in (WORK / "production", WORK / "drill" / "qemu", WORK / "failover" / "qemu"):
        if not where.exists():
            continue
        left = get_provider("qemu", state_dir=str(where))
        for name in left.list(10):
            with contextlib.suppress(Exception):
                left.destroy(name, 30)
        for spec in (where / "networks").glob("*.json") if (where / "networks").exists() else []:
            with contextlib.suppress(Exception):
                left.destroy_network(spec.stem, 30)


def clean() -> None:
    """``--clean``: what a killed demo left - VMs, nodes (``havend run`` of a
    config in .build/demo), its namespaces."""
    clean_vms()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in cmdline and any(a.startswith(str(WORK).encode() + b"/") for a in cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    names = WORK / "netns.json"
    if names.exists():
        for ns in json.loads(names.read_text()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        names.unlink()


def _collections() -> Path:
    """``.build/demo/collections``: haven.dr as a link to this checkout."""
    link = WORK / "collections" / "ansible_collections" / "haven" / "dr"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)
    return WORK / "collections"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB / 10 else f"{n / 1024:.0f} KiB"


def _lag(group: dict[str, Any]) -> str:
    return f"{group['lag_seconds']:.2f} s / {_mib(group['lag_bytes'])}"


def _rpo(report: dict[str, Any]) -> float | None:
    seconds = [
        r["seconds"] for r in (report.get("rpo") or {}).values() if r.get("seconds") is not None
    ]
    return max(seconds) if seconds else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove what an interrupted demo left")
    args = parser.parse_args(argv)
    if args.clean:
        clean()
        say("demo-clean: nothing of the demo is left")
        return 0
    if os.geteuid() != 0:
        say("make demo needs root (network namespaces, taps)")
        return 2

    return run_demo(Demo(), _rel(WORK))


if __name__ == "__main__":
    sys.exit(main())
