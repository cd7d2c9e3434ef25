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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import MiB, wait_caught_up
from recovery_app import (
    BOOT,
    App,
    assert_tier_order,
    build_image,
    docs_plan,
    rate,
    read_nbd,
    records,
    running_app,
)
from test_qemu_provider import tcp_answer
from waiting import wait_until


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
    # (seconds is rounded to the millisecond, the RTO to the microsecond)
    rto, seconds = result["rto_seconds"], result["seconds"]
    assert rto <= seconds + 0.001, (rto, seconds)


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    return build_image()


@pytest.fixture
def app(tmp_path: Path, image: dict[str, str]) -> Iterator[App]:
    with running_app(tmp_path, image) as made:
        yield made


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
    failback_args = app.connection() | {
        "state_dir": str(app.tmp / "failover-state"),
        "production": {"state_dir": str(app.tmp / "production")},
        "plan": dr_plan,
    }
    home = app.play("failback", "haven.dr.failback", failback_args)
    assert not home.get("failed"), json.dumps(home, indent=1)[-5000:]
    assert home["passed"] and home["changed"]
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
    # a failback run again: home already, production running - nothing changes
    again = app.play("failback-again", "haven.dr.failback", failback_args)
    assert again["passed"] and not again["changed"], json.dumps(again, indent=1)[-3000:]
    assert [s["outcome"] for s in again["timeline"] if s["step"] == "failback"] == ["skipped"]
    summary = app.outputs["failback"]
    assert "haven.dr failback shop: PASSED" in summary, summary[-2000:]
    # production writes again, and they replicate in the original direction
    wait_until(lambda: len(app.acks()) >= 5, BOOT, "production db1 to write again")
    wait_caught_up(app.pair.source, app.pair.target, timeout=120)
