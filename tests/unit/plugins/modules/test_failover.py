# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""haven.dr.failover and haven.dr.failback against scripted nodes (real HTTP
servers), with providers whose VMs are nothing (the health checks are real: a
local socket). Real VMs: tests/service/test_recovery_plans.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import time

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import failback, failover

SERVERS = [
    {
        "name": "db1",
        "groups": ["app"],
        "volumes": [{"name": "db", "group": "app", "size": 4096, "uri": "nbd://127.0.0.1:1/db"}],
    }
]
VOLUMES = [{"name": "db", "group": "app", "server": "db1", "size": 4096, "state": "protected"}]
PROMOTED = [dict(VOLUMES[0], uri="nbd://127.0.0.1:10809/app/db", writable=True)]
OP = {"id": "op1", "kind": "failover", "target": "app", "state": "running"}
FAILOVER_DONE = {
    "final_seq": 42,
    "last_acknowledged_seq": 42,
    "target_applied_seq": 42,
    "lost_writes": 0,
    "final_checkpoint": {"id": "c" * 32, "seq": 42},
    "drain_seconds": 0.1,
    "promote_seconds": 0.2,
}


class NullProvider:
    """Records the calls; VMs in ``states`` (name -> state), absent by default."""

    def __init__(self, states=None, hang=None):
        self.calls = []
        self.states = dict(states or {})
        self.hang = hang

    def __getattr__(self, name):
        if name == "network_command":  # no netns: the checks run here
            raise AttributeError(name)

        def call(*args):
            self.calls.append((name,) + args[:-1])
            if name == self.hang:
                time.sleep(args[-1] + 5)
            return True

        return call

    def status(self, name, timeout):
        self.calls.append(("status", name))
        state = self.states.get(name, "absent")
        out = {"state": state}
        if state != "absent":
            out["nics"] = [{"network": "prod", "ip": "127.0.0.1/8"}]
        return out

    def power_off(self, name, timeout):
        self.calls.append(("power_off", name))
        self.states[name] = "stopped"
        return True

    def network(self, name):
        return {"name": name, "cidr": "127.0.0.0/8", "isolated": False}


def the_plan(port, **extra):
    db1 = {
        "name": "db1",
        "nics": [{"network": "dr-lan", "ip": "10.20.0.11/24"}],
        "health_check": {"type": "tcp", "port": port, "timeout_seconds": 1, "interval_seconds": 0.2},
    }
    plan = {
        "name": "shop",
        "rto_target_seconds": 600,
        "networks": {"dr-lan": {"isolated": False, "cidr": "10.20.0.0/24"}},
        "groups": [{"name": "db", "servers": [db1]}],
    }
    plan.update(extra)
    return plan


def tcp_here(plan):
    """The check's host is the loopback (the NIC's address is nobody's here)."""
    plan["groups"][0]["servers"][0]["health_check"]["host"] = "127.0.0.1"
    return plan


def run(module, capsys, nodes, tmp_path, monkeypatch, recovery=None, prod=None, check_mode=False, **args):
    source, target = nodes
    recovery = recovery or NullProvider()
    monkeypatch.setattr(module, "make_providers", lambda plan, state_dir, guest: {"qemu": recovery})
    if prod is not None:
        monkeypatch.setattr(module, "get_provider", lambda kind, **options: prod)
    args.setdefault("url", source.url)
    args.setdefault("token", "hvn_o_source")
    args.update(recovery_url=target.url, recovery_token="hvn_o_target", recovery_ca_path=target.ca)
    args.setdefault("state_dir", str(tmp_path / "state"))
    if check_mode:
        args["_ansible_check_mode"] = True
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out), recovery


@pytest.fixture
def nodes(havend, havend_tls):
    for node in (havend, havend_tls):
        node.script.on("GET", "/v1/servers", (200, SERVERS))
        node.script.on("GET", "/v1/node", (200, {"name": "n", "role": "source"}))
    havend.script.on("GET", "/v1/volumes", (200, VOLUMES))
    havend.script.on("GET", "/v1/groups/app", (200, {"state": "protecting"}), (200, {"state": "failed_over"}))
    havend.script.on("POST", "/v1/groups/app/operations/failover", (202, OP))
    havend.script.on("GET", "/v1/operations/op1", (200, dict(OP, state="succeeded", result=FAILOVER_DONE)))
    havend_tls.script.on("GET", "/v1/volumes", (200, PROMOTED))
    # a replica before the promotion, failed over after it
    havend_tls.script.on("GET", "/v1/groups/app", (200, {"state": "replica"}), (200, {"state": "failed_over"}))
    return havend, havend_tls


def test_a_planned_failover_stops_production_fails_over_and_boots(
    capsys, nodes, tmp_path, monkeypatch, listening
):
    production = NullProvider({"db1": "running"})
    nodes[1].script.on("GET", "/v1/groups/app", (200, {"state": "failed_over"}))  # asked after the boot only
    result, recovery = run(
        failover,
        capsys,
        nodes,
        tmp_path,
        monkeypatch,
        prod=production,
        mode="planned",
        production={"state_dir": str(tmp_path / "prod")},
        plan=tcp_here(the_plan(listening)),
    )
    assert not result.get("failed"), result
    assert result["passed"] and result["changed"] and result["rto_seconds"] > 0
    steps = [s["step"] for s in result["timeline"]]
    assert steps == ["stop", "failover", "exports", "network", "create", "power_on", "health_check", "verify"]
    assert production.calls[-1] == ("power_off", "db1")
    assert result["rpo"]["app"]["writes"] == 0 and result["rpo"]["app"]["final_seq"] == 42
    assert [c[0] for c in recovery.calls] == ["create_network", "create", "power_on"]
    assert recovery.calls[1][2] == ["nbd://127.0.0.1:10809/app/db"]  # the promoted export
    source, target = nodes
    posted = [r for r in source.script.requests if r[0] == "POST"]
    assert posted[0][1] == "/v1/groups/app/operations/failover" and posted[0][3] == {"timeout": 600.0}
    assert not [r for r in target.script.requests if r[0] == "POST"]  # the source promotes it
    report = result["haven_report"]
    assert (report["kind"], report["mode"], report["rto_target_seconds"]) == ("failover", "planned", 600)
    assert (tmp_path / "state" / "plan-state.json").exists()  # what failback and a retry find


def test_check_mode_fails_over_nothing(capsys, nodes, tmp_path, monkeypatch):
    result, recovery = run(failover, capsys, nodes, tmp_path, monkeypatch, check_mode=True, mode="planned", plan=the_plan(1))
    assert not result.get("failed"), result
    assert result["would_boot"][0]["disks"] == [{"volume": "db", "boot": True, "source": "replica", "checkpoint_id": None}]
    assert recovery.calls == []
    source, target = nodes
    assert not [r for r in source.script.requests + target.script.requests if r[0] != "GET"]


def test_an_unplanned_failover_completes_without_the_source(capsys, nodes, tmp_path, monkeypatch, listening, closed_port):
    source, target = nodes
    target.script.on("POST", "/v1/groups/app/operations/promote", (202, dict(OP, kind="promote")))
    window = {"from_seq": 40, "from_time": 1000.0, "last_heard": 1000.4, "seconds": 0.4}
    target.script.on(
        "GET",
        "/v1/operations/op1",
        (200, dict(OP, state="succeeded", result={"applied_seq": 40, "loss_window": window})),
    )
    started = time.monotonic()
    result, recovery = run(
        failover,
        capsys,
        nodes,
        tmp_path,
        monkeypatch,
        url="http://127.0.0.1:%d" % closed_port,  # the source is gone
        mode="unplanned",
        checkpoint="latest",
        plan=tcp_here(the_plan(listening)),
    )
    assert not result.get("failed"), result
    assert time.monotonic() - started < 30
    assert result["timeline"][0]["step"] == "source" and "gone" in result["timeline"][0]["output"]
    assert result["rpo"]["app"]["seconds"] == 0.4 and result["rpo"]["app"]["writes"] is None
    promote = [r for r in target.script.requests if r[0] == "POST"][0]
    assert promote[1].endswith("/operations/promote") and promote[3]["checkpoint"] == "latest"


def test_an_unplanned_failover_of_a_group_the_source_still_protects_is_refused(capsys, nodes, tmp_path, monkeypatch):
    source, target = nodes
    source.script.on("GET", "/v1/groups/app", (200, {"state": "protecting"}))
    result, recovery = run(failover, capsys, nodes, tmp_path, monkeypatch, mode="unplanned", plan=the_plan(1))
    assert result["failed"] and result["failure"]["step"] == "promote" and result["failure"]["group"] == "app"
    assert "split brain" in result["msg"] and "mode planned" in result["msg"]
    assert not [r for r in target.script.requests if r[0] == "POST"] and recovery.calls == []


def test_a_failed_operation_stops_the_run_and_names_the_group(capsys, nodes, tmp_path, monkeypatch):
    source, target = nodes
    source.script.on("GET", "/v1/operations/op1", (200, dict(OP, state="failed", error="drain timed out after 600 s")))
    result, recovery = run(failover, capsys, nodes, tmp_path, monkeypatch, mode="planned", plan=the_plan(1))
    assert result["failed"] and result["passed"] is False
    assert result["failure"]["group"] == "app" and "drain timed out" in result["failure"]["output"]
    assert "failover of group app failed" in result["msg"] and recovery.calls == []


def test_a_provider_call_that_never_returns_fails_in_its_call_timeout(capsys, nodes, tmp_path, monkeypatch):
    started = time.monotonic()
    result, recovery = run(
        failover,
        capsys,
        nodes,
        tmp_path,
        monkeypatch,
        recovery=NullProvider(hang="power_on"),
        mode="planned",
        call_timeout=1.5,
        plan=the_plan(1),
    )
    assert time.monotonic() - started < 20
    assert result["failed"] and result["failure"]["server"] == "db1" and result["failure"]["step"] == "power_on"
    step = [s for s in result["timeline"] if s["step"] == "power_on"][0]
    assert step["outcome"] == "timeout" and step["seconds"] < 5


# --- failback ------------------------------------------------------------------------

FAILBACK_DONE = {
    "changed_on_target_bytes": 8192,
    "unshipped_here_bytes": 0,
    "compared_bytes": 8192,
    "pulled_bytes": 4096,
    "wire_bytes": 4500,
    "snapshot": "before failback",
    "seconds": 0.3,
}


@pytest.fixture
def failed_over(havend, havend_tls):
    havend.script.on("GET", "/v1/servers", (200, SERVERS))
    havend.script.on("GET", "/v1/volumes", (200, VOLUMES))
    havend.script.on("GET", "/v1/groups/app", (200, {"state": "failed_over"}), (200, {"state": "protecting"}))
    havend.script.on("POST", "/v1/groups/app/operations/failback", (202, dict(OP, kind="failback")))
    havend.script.on("GET", "/v1/operations/op1", (200, dict(OP, state="succeeded", result=FAILBACK_DONE)))
    return havend, havend_tls


def test_a_failback_pauses_ships_tears_down_and_boots_production(capsys, failed_over, tmp_path, monkeypatch, listening):
    state = tmp_path / "state"
    state.mkdir()
    (state / "plan-state.json").write_text(
        json.dumps({"created": ["db1"], "running": ["db1"], "healthy": ["db1"], "networks": [["qemu", "dr-lan"]]})
    )
    production = NullProvider({"db1": "stopped"})
    plan = the_plan(listening)  # the check's host: the production address (127.0.0.1), not the plan's
    result, recovery = run(
        failback,
        capsys,
        failed_over,
        tmp_path,
        monkeypatch,
        prod=production,
        plan=plan,
        production={"state_dir": str(tmp_path / "prod")},
    )
    assert not result.get("failed"), result
    assert result["passed"] and result["changed"]
    steps = [s["step"] for s in result["timeline"]]
    assert steps == ["pause", "failback", "network", "create", "power_on", "health_check"]
    assert [c[0] for c in recovery.calls] == ["pause", "power_off", "destroy", "destroy_network"]
    assert [s["step"] for s in result["teardown"]] == ["power_off", "destroy", "destroy_network"]
    assert ("power_on", "db1") in production.calls and ("create", {"name": "db1"}) not in production.calls
    assert result["bytes"] == {
        "changed": 8192, "shipped": 4096, "wire": 4500, "compared": 8192, "volumes": 4096, "ratio": 0.5
    }
    assert "127.0.0.1:%d" % listening in json.dumps(result["timeline"]) or result["passed"]
    assert not (state / "plan-state.json").exists()  # nothing of the recovery side is left
    assert result["haven_report"]["kind"] == "failback" and result["haven_report"]["bytes"]["shipped"] == 4096


def test_a_failback_refuses_a_server_production_does_not_have(capsys, failed_over, tmp_path, monkeypatch):
    result, recovery = run(
        failback,
        capsys,
        failed_over,
        tmp_path,
        monkeypatch,
        prod=NullProvider(),
        plan=the_plan(1),
        production={"state_dir": str(tmp_path / "prod")},
    )
    assert result["failed"] and result["bad_key"] == "plan.groups[0].servers[0].name"
    assert "not in the production provider's state" in result["msg"]
    source, target = failed_over
    assert not [r for r in source.script.requests if r[0] == "POST"] and recovery.calls == []


def test_a_failback_refused_for_a_split_brain_says_how_to_resolve_it_and_resumes_the_recovery_side(
    capsys, failed_over, tmp_path, monkeypatch
):
    source, target = failed_over
    source.script.on("GET", "/v1/groups/app", (200, {"state": "failed_over"}))
    split = "group app is in a split brain: choose the surviving side first (havend group resolve --survivor ...)"
    source.script.on("POST", "/v1/groups/app/operations/failback", (409, {"detail": split}))
    state = tmp_path / "state"
    state.mkdir()
    (state / "plan-state.json").write_text(
        json.dumps({"created": ["db1"], "running": ["db1"], "healthy": ["db1"], "networks": [["qemu", "dr-lan"]]})
    )
    result, recovery = run(
        failback,
        capsys,
        failed_over,
        tmp_path,
        monkeypatch,
        prod=NullProvider({"db1": "stopped"}),
        plan=the_plan(1),
        production={"state_dir": str(tmp_path / "prod")},
    )
    assert result["failed"] and result["failure"]["step"] == "failback" and result["failure"]["group"] == "app"
    assert "split brain" in result["msg"] and "operation=resolve" in result["msg"] and "nothing was merged" in result["msg"]
    assert [c[0] for c in recovery.calls] == ["pause", "resume"]  # the application stays up where it is
    assert [s["step"] for s in result["timeline"]] == ["pause", "failback", "resume"]
    assert json.loads((state / "plan-state.json").read_text())["created"] == ["db1"]  # nothing torn down


def test_a_failback_without_production_brings_the_groups_home_and_leaves_the_servers_to_you(
    capsys, failed_over, tmp_path, monkeypatch
):
    result, recovery = run(failback, capsys, failed_over, tmp_path, monkeypatch, plan=the_plan(1))
    assert not result.get("failed"), result
    assert result["passed"] and result["changed"] and result["rto_seconds"] >= result["timeline"][-1]["ended"]
    assert [s["step"] for s in result["timeline"]] == ["failback"]  # nothing ran here: nothing to pause
    assert "not powered on by this task" in json.dumps(result.get("warnings"))
    assert result["bytes"]["shipped"] == 4096 and recovery.calls == []


def test_a_recovery_node_that_stops_serving_during_the_boot_fails_the_failover(
    capsys, nodes, tmp_path, monkeypatch, listening
):
    source, target = nodes
    target.script.on("GET", "/v1/groups/app", (200, {"state": "replica"}))  # the promotion undone under us
    result, recovery = run(failover, capsys, nodes, tmp_path, monkeypatch, mode="planned", plan=tcp_here(the_plan(listening)))
    assert result["failed"] and result["failure"]["step"] == "verify"
    assert "group app is replica on the recovery node" in result["failure"]["output"]
    assert [s["step"] for s in result["timeline"]][-2:] == ["health_check", "verify"]


def test_an_unplanned_failover_is_refused_when_the_source_answers_but_not_to_its_token(
    capsys, nodes, tmp_path, monkeypatch
):
    source, target = nodes
    source.script.on("GET", "/v1/node", (401, {"detail": "no valid token"}))
    result, recovery = run(failover, capsys, nodes, tmp_path, monkeypatch, mode="unplanned", plan=the_plan(1))
    assert result["failed"] and "the source node answers" in result["msg"] and "or force" in result["msg"]
    assert not [r for r in target.script.requests if r[0] == "POST"] and recovery.calls == []
