"""A three-tier application (db -> app -> web) on real tiny VMs, through real
``ansible-playbook`` plays of haven.dr.drill, haven.dr.failover and
haven.dr.failback against a real havend pair:

- production: db1 (a stamped writer on its disk, and TCP 5432), app1 (TCP 8080)
  and web1 (HTTP 80) booted by the qemu provider from the source node's NBD
  exports, in a production network;
- a drill boots the plan in an isolated network in tier order, each tier gated
  by its health check, while production goes on writing at its own rate;
- a planned failover stops production, loses no acknowledged write (the
  writer's last acknowledged record is on the recovered disk), boots the plan;
- the failback ships no more than 1.1x what the recovery side changed, boots
  production again at home and leaves the group protecting.

Root (network namespaces, taps); several minutes under TCG."""

from __future__ import annotations

import copy
import json
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nodes import MiB, Pair, app_group, make_token, start_pair, wait_caught_up
from plays import ROOT, ansible, ansible_env
from waiting import wait_until

from havend.nbd.client import NBDClient

sys.path.insert(0, str(ROOT / "tools"))
import guest_image
from test_qemu_provider import _collection_on_path, tcp_answer

_collection_on_path()
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)

BOOT = 120
RECORD = re.compile(rb"haven-seq (\d{16}) (\S+)\n")


def subnet() -> str:
    return f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"


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
    outputs: dict[str, str] = field(default_factory=dict)

    def acks(self) -> list[int]:
        log = self.prod.serial_log("db1")
        return [int(n) for n in re.findall(r"haven: ack (\d+)", log)]

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

    def connection(self, scope: str = "operate") -> dict[str, Any]:
        return {
            "url": self.pair.source.address("api"),
            "token": make_token(self.pair.source, f"p-{secrets.token_hex(3)}", scope),
            "recovery_url": self.pair.target.address("api"),
            "recovery_token": make_token(self.pair.target, f"p-{secrets.token_hex(3)}", "operate"),
            "qemu": {"kernel": self.image["kernel"], "initrd": self.image["initrd"]}
            | docs_plan()["shop_guests"],
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


def read_nbd(uri: str, offset: int, length: int) -> bytes:
    client = NBDClient.open(uri)
    try:
        return client.read(offset, length)
    finally:
        client.close()


def records(data: bytes) -> dict[int, int]:
    """{sector: seq} of the writer's records in ``data``."""
    out = {}
    for i in range(0, len(data) - 511, 512):
        m = RECORD.match(data, i)
        if m:
            out[i // 512] = int(m.group(1))
    return out


def docs_plan() -> dict[str, Any]:
    """The block of docs/recovery-plans.md "A plan that runs here", as written."""
    text = (ROOT / "docs" / "recovery-plans.md").read_text()
    section = text[text.index("## A plan that runs here") :]
    block = section[section.index("```yaml\n") + 8 :]
    return yaml.safe_load(block[: block.index("```")])


def assert_tier_order(result: dict) -> None:
    """Each tier's servers are created only after the tier before passed its check."""
    steps = result["timeline"]

    def first(step: str, server: str) -> dict:
        return next(s for s in steps if s["step"] == step and s["server"] == server)

    for before, after in (("db1", "app1"), ("app1", "web1")):
        passed = first("health_check", before)
        assert passed["outcome"] == "ok"
        assert first("create", after)["started"] >= passed["ended"], steps


def assert_times_add_up(result: dict, before: str) -> None:
    """The plan's steps start right after the module's last step ``before``
    (or the recovery teardown after it), as the engine's times are shifted by
    when its run began, not when it ended; and the RTO is within the task's
    own time."""
    steps = result["timeline"]
    last = max(s["ended"] for s in steps if s["step"] == before)
    last = max([last, *(s["ended"] for s in result.get("teardown", []))])
    network = next(s for s in steps if s["step"] == "network")
    assert last <= network["started"] <= last + 1.0, steps
    assert result["rto_seconds"] <= result["seconds"], (result["rto_seconds"], result["seconds"])


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    return guest_image.build().as_dict()


@pytest.fixture
def app(tmp_path: Path, image: dict[str, str]) -> Iterator[App]:
    group = app_group(
        tmp_path, {"db": 2 * MiB, "db-log": 2 * MiB, "app-root": MiB, "web-root": MiB}
    )
    for volume in group["volumes"]:
        volume["server"] = {"db": "db1", "db-log": "db1", "app-root": "app1", "web-root": "web1"}[
            volume["name"]
        ]
    pair = start_pair(tmp_path, [group], api=True, caught_up=60)
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
        roles = {"db1": "writer+tcp:5432", "app1": "tcp:8080", "web1": "http:80:shop%20web"}
        disks = {"db1": ["db", "db-log"], "app1": ["app-root"], "web1": ["web-root"]}
        for octet, name in ((11, "db1"), (21, "app1"), (31, "web1")):
            made.prod_ip[name] = f"{sub}.{octet}"
            prod.create(
                {
                    "name": name,
                    "memory": 192,
                    "role": roles[name],
                    "nics": [{"network": net, "ip": f"{sub}.{octet}/24"}],
                },
                [f"{nbd}/{d}" for d in disks[name]],
                30,
            )
            prod.power_on(name, BOOT)
        for name in ("db1", "app1", "web1"):
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


def test_drill_failover_and_failback_of_a_three_tier_application(app: App) -> None:
    # --- a drill: in an isolated network, production writing throughout ----------
    before = rate(app, 8)
    assert before > 1, before
    cp = app.src.post("/v1/groups/app/checkpoints", json={"label": "before drill"})
    assert cp.status_code == 201, cp.text
    wait_caught_up(app.pair.source, app.pair.target, timeout=60)
    drill_plan = copy.deepcopy(docs_plan()["shop_plan"])
    drill_plan["name"] = "shop-drill"
    drill_plan["networks"]["shop-dr"]["isolated"] = True  # a drill's network: no route out
    acks_before, t0 = len(app.acks()), time.monotonic()
    drill = app.play(
        "drill",
        "haven.dr.drill",
        app.connection("read")
        | {
            "state_dir": str(app.tmp / "drill-state"),
            "plan": drill_plan,
        },
    )
    during = (len(app.acks()) - acks_before) / (time.monotonic() - t0)
    assert not drill.get("failed"), json.dumps(drill, indent=1)[-5000:]
    assert drill["passed"] and drill["cleaned_up"]
    assert_tier_order(drill)
    assert during >= 0.8 * before, (during, before)
    report = drill["haven_report"]
    assert report["kind"] == "drill" and report["rto_target_seconds"] == 900
    assert app.tgt.get("/v1/exports").json() == []
    assert app.tgt.get("/v1/groups/app").json()["last_verified"]["plan"] == "shop-drill"

    # --- a planned failover: production stops, nothing is lost ---------------------
    dr_plan = docs_plan()["shop_plan"]  # as written in docs/recovery-plans.md
    dr_net, dr_sub = "shop-dr", "10.231.20"
    failover_args = app.connection() | {
        "mode": "planned",
        "state_dir": str(app.tmp / "failover-state"),
        "production": {"state_dir": str(app.tmp / "production")},
        "plan": dr_plan,
    }
    moved = app.play("failover", "haven.dr.failover", failover_args)
    assert not moved.get("failed"), json.dumps(moved, indent=1)[-5000:]
    assert moved["passed"] and moved["changed"]
    assert_tier_order(moved)
    stops = [s for s in moved["timeline"] if s["step"] == "stop"]
    assert [s["server"] for s in stops] == ["web1", "app1", "db1"] and all(
        s["outcome"] == "ok" for s in stops
    )
    failover = next(s for s in moved["timeline"] if s["step"] == "failover")
    assert failover["started"] >= max(s["ended"] for s in stops)
    assert moved["rpo"]["app"]["writes"] == 0 and moved["rpo"]["app"]["seconds"] == 0.0
    assert moved["rpo"]["app"]["final_seq"] == moved["rpo"]["app"]["target_applied_seq"]
    assert moved["rto_seconds"] == pytest.approx(
        max(s["ended"] for s in moved["timeline"] if s["step"] == "health_check"), abs=1e-5
    )
    assert_times_add_up(moved, "exports")
    assert all(app.prod.status(n, 10)["state"] == "stopped" for n in ("db1", "app1", "web1"))
    # the last write production acknowledged is on the recovered disk
    acked = app.acks()
    last = acked[-1]
    on_disk = records(app.read_target("db", 0, MiB))
    assert on_disk.get(last % 2048) == last, (last, sorted(on_disk.items())[-5:])
    assert max(on_disk.values()) in (last, last + 1)  # at most the write in flight at power-off
    assert app.tgt.get("/v1/groups/app").json()["state"] == "failed_over"
    # the recovered app answers on the recovery network
    assert "haven web1" not in tcp_answer(dr_net, f"{dr_sub}.21", 8080)
    assert "haven app1 tcp" in tcp_answer(dr_net, f"{dr_sub}.21", 8080)

    # running it again changes nothing and boots nothing twice
    again = app.play("failover-again", "haven.dr.failover", failover_args)
    assert again["passed"] and not again["changed"], json.dumps(again, indent=1)[-3000:]
    assert {s["outcome"] for s in again["timeline"] if s["step"] in ("failover", "boot")} == {
        "skipped"
    }

    # the recovered db writes its log: what failback must bring home
    wait_until(
        lambda: len(records(app.read_target("db-log", 0, MiB))) >= 20,
        BOOT,
        "the recovered db1 to write 20 records to its log",
    )

    # --- failback: only the changes go home, production boots again ----------------
    home = app.play(
        "failback",
        "haven.dr.failback",
        app.connection()
        | {
            "state_dir": str(app.tmp / "failover-state"),
            "production": {"state_dir": str(app.tmp / "production")},
            "plan": dr_plan,
        },
    )
    assert not home.get("failed"), json.dumps(home, indent=1)[-5000:]
    assert home["passed"]
    assert_tier_order(home)
    assert_times_add_up(home, "failback")
    pauses = [s["server"] for s in home["timeline"] if s["step"] == "pause"]
    assert pauses == ["web1", "app1", "db1"]
    log_records = records(read_nbd(f"{app.pair.source.address('nbd')}/db-log", 0, MiB))
    blocks = {sector // 8 for sector in log_records}  # 4 KiB blocks the recovery side wrote
    changed = len(blocks) * 4096
    assert log_records and home["bytes"]["shipped"] <= 1.1 * changed, (home["bytes"], changed)
    assert home["bytes"]["volumes"] == 6 * MiB
    assert app.src.get("/v1/groups/app").json()["state"] == "protecting"
    assert app.tgt.get("/v1/groups/app").json()["state"] != "failed_over"
    assert not list((app.tmp / "failover-state" / "qemu" / "vms").glob("*"))
    for name in ("db1", "app1", "web1"):
        assert app.prod.status(name, 10)["state"] == "running"
    # the checks ran against production's own addresses
    checks = [s for s in home["timeline"] if s["step"] == "health_check"]
    assert len(checks) == 3 and all(s["outcome"] == "ok" for s in checks), checks
    # every run left its report (JSON, JUnit, HTML) and a summary line
    reports = sorted((app.tmp / "reports").glob("*.json"))
    kinds = sorted(json.loads(r.read_text())["report"]["kind"] for r in reports)
    assert kinds == ["drill", "failback", "failover", "failover"], reports
    assert len(list((app.tmp / "reports").glob("*.html"))) == 4
    summary = app.outputs["failback"]
    assert "haven.dr failback shop: PASSED" in summary, summary[-2000:]
    # production writes again, and they replicate in the original direction
    wait_until(lambda: len(app.acks()) >= 5, BOOT, "production db1 to write again")
    wait_caught_up(app.pair.source, app.pair.target, timeout=120)
