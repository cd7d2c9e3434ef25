"""A three-tier application (db -> app -> web) of tiny VMs on a real havend
pair, and the helpers of the tests that recover it through real plays
(test_recovery_plans.py, test_recovery_faults.py):

- :func:`running_app`: production booted by the qemu provider from the source
  node's NBD exports in a production network (all three tiers, or some), the
  source replicating to the target directly or through a fault proxy;
- :class:`App`: the running application (its writer's acknowledgements, a
  task of a module run in a real ``ansible-playbook`` play, the target's
  volumes read);
- :func:`plan`: the shop's recovery plan, each tier gated by its check;
  :func:`records`: the writer's records on a disk.

Root (network namespaces, taps); minutes under TCG."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from nodes import MiB, Pair, app_group, make_token, start_pair, subnet
from plays import ROOT, ansible, ansible_env
from waiting import wait_until

from havend.nbd.client import NBDClient

sys.path.insert(0, str(ROOT / "tools"))
import guest_image
from test_qemu_provider import _collection_on_path

_collection_on_path()
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)

BOOT = 120
SERVERS = ("db1", "app1", "web1")  # in boot order: the tiers
ROLES = {"db1": "writer+tcp:5432", "app1": "tcp:8080", "web1": "http:80:shop%20web"}
DISKS = {"db1": ["db", "db-log"], "app1": ["app-root"], "web1": ["web-root"]}
SIZES = {"db": 2 * MiB, "db-log": 2 * MiB, "app-root": MiB, "web-root": MiB}
OCTETS = {"db1": 11, "app1": 21, "web1": 31}


@dataclass
class App:
    pair: Pair
    tmp: Path
    image: dict[str, str]
    prod: Any  # the production qemu provider
    prod_net: str
    prod_ip: dict[str, str]
    src: httpx.Client
    tgt: httpx.Client
    outputs: dict[str, str] = field(default_factory=dict)  # each play's stdout, by name

    def acks(self) -> list[int]:
        log = self.prod.serial_log("db1")
        return guest_image.writer_acks(log)

    def play(self, name: str, module: str, args: dict[str, Any], timeout: float = 900) -> dict:
        """One task of ``module`` in a play; its registered result."""
        out = self.tmp / f"{name}.json"
        task = {"name": name, module: args, "register": "r", "ignore_errors": True}
        save = {"ansible.builtin.copy": {"content": "{{ r | to_json }}", "dest": str(out)}}
        play = [
            {
                "hosts": "localhost",
                "connection": "local",
                "gather_facts": False,
                "tasks": [task, save],
            }
        ]
        path = self.tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump(play))
        done = ansible(
            self.tmp,
            "ansible-playbook",
            "-i",
            "localhost,",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(path),
            env=ansible_env(self.tmp)
            | {
                "ANSIBLE_CALLBACKS_ENABLED": "haven.dr.drill_report",
                "HAVEN_DRILL_REPORT_DIR": str(self.tmp / "reports"),
            },
            timeout=timeout,
        )
        (self.tmp / f"{name}.log").write_text(done.stdout + done.stderr)
        self.outputs[name] = done.stdout
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        return json.loads(out.read_text())

    def connection(
        self, scope: str = "operate", roles: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The nodes' options of a task; ``roles``: the recovered servers' guest
        roles (default: docs/recovery-plans.md's ``shop_guests``, where the
        recovered db writes its log only)."""
        if roles is None:
            roles = {n: g["role"] for n, g in docs_plan()["shop_guests"]["servers"].items()}
        return {
            "url": self.pair.source.address("api"),
            "token": make_token(self.pair.source, f"p-{secrets.token_hex(3)}", scope),
            "recovery_url": self.pair.target.address("api"),
            "recovery_token": make_token(self.pair.target, f"p-{secrets.token_hex(3)}", "operate"),
            "qemu": {
                "kernel": self.image["kernel"],
                "initrd": self.image["initrd"],
                "servers": {name: {"role": role} for name, role in roles.items()},
            },
        }

    def read_target(
        self, volume: str, offset: int, length: int, checkpoint: str | None = None
    ) -> bytes:
        """``volume`` on the target: the promoted export, or a checkpoint's view."""
        if checkpoint is None:
            uri = next(v["uri"] for v in self.tgt.get("/v1/volumes").json() if v["name"] == volume)
            return read_nbd(uri, offset, length)
        view = self.tgt.post(
            "/v1/exports", json={"group": "app", "volume": volume, "checkpoint": checkpoint}
        )
        assert view.status_code == 201, view.text
        try:
            return read_nbd(view.json()["uri"], offset, length)
        finally:
            self.tgt.delete("/v1/exports/" + view.json()["export"])


def docs_plan() -> dict[str, Any]:
    """The block of docs/recovery-plans.md "A plan that runs here", as written:
    ``shop_plan`` and ``shop_guests``."""
    text = (ROOT / "docs" / "recovery-plans.md").read_text()
    section = text[text.index("## A plan that runs here") :]
    block = section[section.index("```yaml\n") + 8 :]
    return yaml.safe_load(block[: block.index("```")])


def read_nbd(uri: str, offset: int, length: int) -> bytes:
    client = NBDClient.open(uri)
    try:
        return client.read(offset, length)
    finally:
        client.close()


records = guest_image.writer_records  # {sector: seq} of the writer's records


def plan(
    name: str,
    networks: dict[str, Any],
    net: str,
    sub: str,
    timeout: float = 180,
    servers: Sequence[str] = SERVERS,
) -> dict:
    """The shop: db first, then app, then web (those of ``servers``), each
    gated by its check."""

    def server(host: str, octet: int, check: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": host,
            "vcpus": 1,
            "memory_mib": 192,
            "nics": [{"network": net, "ip": f"{sub}.{octet}/24"}],
            "health_check": check | {"timeout_seconds": timeout, "interval_seconds": 1},
        }

    tiers = {
        "db1": ("db", server("db1", 11, {"type": "tcp", "port": 5432})),
        "app1": ("app", server("app1", 21, {"type": "tcp", "port": 8080})),
        "web1": (
            "web",
            server(
                "web1",
                31,
                {"type": "http", "url": f"http://{sub}.31/", "body_contains": "shop web"},
            ),
        ),
    }
    return {
        "name": name,
        "rto_target_seconds": 900,
        "rpo_target_seconds": 60,
        "networks": networks,
        "groups": [
            {"name": tiers[s][0], "servers": [tiers[s][1]]} for s in SERVERS if s in servers
        ],
    }


def assert_tier_order(result: dict) -> None:
    """Each tier's servers are created only after the tier before passed its check."""
    steps = result["timeline"]

    def first(step: str, server: str) -> dict:
        return next(s for s in steps if s["step"] == step and s["server"] == server)

    for before, after in (("db1", "app1"), ("app1", "web1")):
        passed = first("health_check", before)
        assert passed["outcome"] == "ok"
        assert first("create", after)["started"] >= passed["ended"], steps


def build_image() -> dict[str, str]:
    return guest_image.build().as_dict()


@contextlib.contextmanager
def running_app(
    tmp_path: Path,
    image: dict[str, str],
    servers: Sequence[str] = SERVERS,
    proxy: bool = False,
) -> Iterator[App]:
    """Production (``servers`` of the shop) running and db1 writing, its
    volumes replicating (through a :class:`FaultProxy`, ``app.pair.proxy``, if
    ``proxy``); everything it, a drill or a failover started is gone after."""
    volumes = [v for s in servers for v in DISKS[s]]
    group = app_group(tmp_path, {v: SIZES[v] for v in volumes})
    for volume in group["volumes"]:
        volume["server"] = next(s for s in servers if volume["name"] in DISKS[s])
    pair = start_pair(tmp_path, [group], api=True, caught_up=60, proxy=proxy)
    collections = tmp_path / "collections" / "ansible_collections" / "haven"
    collections.mkdir(parents=True)
    (collections / "dr").symlink_to(ROOT)
    prod = get_provider("qemu", state_dir=str(tmp_path / "production"), image=image)
    net, sub = "p" + secrets.token_hex(4), subnet()
    src = httpx.Client(
        base_url=pair.source.address("api"),
        headers={"Authorization": "Bearer " + make_token(pair.source, "t-src", "operate")},
        timeout=30,
    )
    tgt = httpx.Client(
        base_url=pair.target.address("api"),
        headers={"Authorization": "Bearer " + make_token(pair.target, "t-tgt", "operate")},
        timeout=30,
    )
    made = App(pair, tmp_path, image, prod, net, {}, src, tgt)
    try:
        prod.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": False}, 30)
        nbd = pair.source.address("nbd")
        for name in servers:
            octet = OCTETS[name]
            made.prod_ip[name] = f"{sub}.{octet}"
            prod.create(
                {
                    "name": name,
                    "memory": 192,
                    "role": ROLES[name],
                    "nics": [{"network": net, "ip": f"{sub}.{octet}/24"}],
                },
                [f"{nbd}/{d}" for d in DISKS[name]],
                30,
            )
            prod.power_on(name, BOOT)
        for name in servers:
            wait_until(
                lambda n=name: "haven: up" in prod.serial_log(n),
                BOOT,
                f"production {name} to boot",
                detail=lambda n=name: prod.serial_log(n)[-2000:],
            )
        wait_until(lambda: len(made.acks()) >= 5, BOOT, "db1 to write")
        yield made
    finally:
        # production, and whatever a failed run left of the drill and the failover
        for where in ("production", "drill-state/qemu", "failover-state/qemu"):
            left = get_provider("qemu", state_dir=str(tmp_path / where), image=image)
            for name in left.list(10):
                left.destroy(name, 30)
            networks = tmp_path / where / "networks"
            for spec in networks.glob("*.json") if networks.exists() else []:
                left.destroy_network(spec.stem, 30)
        prod.destroy_network(net, 30)
        src.close()
        tgt.close()
        pair.stop()


def rate(app: App, seconds: float) -> float:
    """db1's acknowledged writes per second over the next ``seconds``."""
    before, started = len(app.acks()), time.monotonic()
    time.sleep(seconds)
    return (len(app.acks()) - before) / (time.monotonic() - started)
