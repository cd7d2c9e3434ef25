# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import recovery_plan

CHECKPOINTS = [{"id": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "seq": 10}, {"id": "f0e1d2c3b4a5968778695a4b3c2d1e0f", "seq": 20}]


def volume(name, group, server, state="protected"):
    return {"name": name, "group": group, "server": server, "size": 4096, "uri": "nbd://127.0.0.1:10809/" + name, "state": state}


VOLUMES = [
    volume("db", "app", "db1.example.com"),
    volume("log", "app", "db1.example.com"),
    volume("web-root", "app", "web1.example.com", state="syncing"),
    volume("other", "batch", None),
]


def servers():
    out = {}
    for v in VOLUMES:
        if v["server"]:
            s = out.setdefault(v["server"], {"name": v["server"], "groups": [], "volumes": [], "node": "src1"})
            if v["group"] not in s["groups"]:
                s["groups"].append(v["group"])
            s["volumes"].append({k: v[k] for k in ("name", "group", "size", "uri")})
    return sorted(out.values(), key=lambda s: s["name"])


@pytest.fixture
def source(havend):
    havend.script.on("GET", "/v1/servers", (200, servers()))
    havend.script.on("GET", "/v1/volumes", (200, VOLUMES))
    return havend


@pytest.fixture
def target(havend_tls):
    havend_tls.script.on("GET", "/v1/groups/app/checkpoints", (200, CHECKPOINTS))
    return havend_tls


def the_plan(**changes):
    plan = {
        "name": "app",
        "networks": {"dr-lan": {"isolated": False, "cidr": "10.20.0.0/24", "bridge": "br-dr"}},
        "groups": [
            {
                "name": "database",
                "servers": [
                    {
                        "name": "db1.example.com",
                        "vcpus": 4,
                        "nics": [{"network": "dr-lan", "ip": "10.20.0.11/24"}],
                        "health_check": {"type": "tcp", "port": 5432},
                    }
                ],
            },
            {
                "name": "web",
                "parallel": False,
                "servers": [
                    {
                        "name": "web1.example.com",
                        "network": "dr-lan",
                        "disks": [{"volume": "web-root", "checkpoint": "a1b2c3"}],
                        "health_check": {"type": "http", "url": "http://10.20.0.21/", "body_contains": "ok"},
                    }
                ],
            },
        ],
    }
    plan.update(changes)
    return plan


def run(capsys, source, target=None, check_mode=False, **args):
    args.setdefault("url", source.url)
    args.setdefault("token", "hvn_r_read")
    if target is not None:
        args.setdefault("recovery_url", target.url)
        args.setdefault("recovery_token", "hvn_r_target")
        args.setdefault("recovery_ca_path", target.ca)
    args.setdefault("plan", the_plan())
    if check_mode:
        args["_ansible_check_mode"] = True
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            recovery_plan.main()
    return json.loads(capsys.readouterr().out)


def test_a_plan_is_checked_against_both_nodes_and_shows_what_boots_where(capsys, source, target):
    result = run(capsys, source, target)
    assert not result.get("failed"), result
    assert result["changed"] is False
    db1 = result["plan"]["groups"][0]["servers"][0]
    assert db1["protection_group"] == "app" and db1["volumes"] == ["db", "log"] and db1["memory_mib"] == 2048
    order = result["boot_order"]
    assert [(g["name"], g["parallel"]) for g in order] == [("database", True), ("web", False)]
    boot = order[0]["servers"][0]
    assert boot["provider"] == "qemu" and boot["health_check"] == "tcp 10.20.0.11:5432"
    assert boot["nics"] == [{"network": "dr-lan", "isolated": False, "bridge": "br-dr", "mac": None, "ip": "10.20.0.11/24"}]
    assert [(d["volume"], d["boot"], d["export"]) for d in boot["disks"]] == [
        ("db", True, "app/db@f0e1d2c3b4a5"),
        ("log", False, "app/log@f0e1d2c3b4a5"),
    ]
    web = order[1]["servers"][0]["disks"][0]
    assert (web["checkpoint"], web["checkpoint_id"]) == ("a1b2c3", CHECKPOINTS[0]["id"])
    warnings = json.dumps(result["warnings"])
    assert "web-root of group app is still syncing" in warnings
    assert "booted from 2 different points" in warnings
    # the tokens went to their own node
    assert source.script.requests[0][2]["Authorization"] == "Bearer hvn_r_read"
    assert target.script.requests[0][2]["Authorization"] == "Bearer hvn_r_target"
    assert [r[1] for r in target.script.requests] == ["/v1/groups/app/checkpoints"]


def test_check_mode_reads_and_returns_the_same(capsys, source, target):
    real = run(capsys, source, target)
    checked = run(capsys, source, target, check_mode=True)
    assert checked["boot_order"] == real["boot_order"] and checked["changed"] is False
    assert {r[0] for r in source.script.requests + target.script.requests} == {"GET"}


def test_without_the_recovery_node_the_checkpoints_are_not_resolved(capsys, source):
    result = run(capsys, source)
    assert result["boot_order"][0]["servers"][0]["disks"][0]["export"] is None
    assert "checkpoints of the plan are not checked" in json.dumps(result["warnings"])


@pytest.mark.parametrize(
    ("change", "bad_key", "words"),
    [
        (lambda p: p["groups"][1]["servers"][0].update(network="prod-lan"), "plan.groups[1].servers[0].network", "no network 'prod-lan'"),
        (lambda p: p["groups"][1]["servers"][0].update(name="db1.example.com"), "plan.groups[1].servers[0].name", "listed already"),
        (lambda p: p["groups"][0]["servers"][0].update(name="db9.example.com"), "plan.groups[0].servers[0].name", "no protected server"),
        (lambda p: p["groups"][1]["servers"][0].update(volumes=["web-root", "db"]), "plan.groups[1].servers[0].volumes[1]", "used already"),
        (lambda p: p["groups"][1]["servers"][0]["disks"][0].update(checkpoint="ffffff"), "plan.groups[1].servers[0].disks[0].checkpoint", "not retained"),
        (lambda p: p["groups"][1].update(servers=[]), "plan.groups[1].servers", "no server"),
    ],
)
def test_a_bad_plan_fails_naming_the_bad_key(capsys, source, target, change, bad_key, words):
    plan = the_plan()
    change(plan)
    result = run(capsys, source, target, plan=plan)
    assert result["failed"] and result["bad_key"] == bad_key
    assert result["msg"].startswith(bad_key + ": ") and words in result["msg"], result["msg"]


def test_the_argspec_rejects_an_unknown_key_before_any_request(capsys, source, target):
    plan = the_plan()
    plan["groups"][0]["servers"][0]["colour"] = "red"
    result = run(capsys, source, target, plan=plan)
    assert result["failed"] and "colour" in result["msg"]
    assert source.script.requests == [] and target.script.requests == []


def test_a_group_the_recovery_node_does_not_hold_is_named(capsys, source, havend_tls):
    havend_tls.script.on("GET", "/v1/groups/app/checkpoints", (404, {"detail": "no group 'app' on this node"}))
    result = run(capsys, source, havend_tls)
    assert result["bad_key"] == "plan.groups[0].servers[0].protection_group"
    assert "group app is not on the recovery node" in result["msg"]


def test_the_source_node_unreachable_is_one_line_naming_it(capsys, source, closed_port):
    result = run(capsys, source, url="http://127.0.0.1:%d" % closed_port, retries=0)
    assert result["failed"] and result["msg"].startswith("http://127.0.0.1:%d: connection refused" % closed_port)


def test_the_argspec_is_the_models():
    spec = recovery_plan.plan_argspec()
    assert spec["groups"]["options"]["parallel"]["default"] is True
    assert sorted(spec["groups"]["options"]["servers"]["options"]["health_check"]["options"]["type"]["choices"]) == [
        "command",
        "guest_agent",
        "http",
        "tcp",
    ]
