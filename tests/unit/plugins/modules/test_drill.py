# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""haven.dr.drill against scripted nodes, with a provider whose VMs are nothing
(the health checks are real: a local socket). Real VMs: tests/service/test_drill.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import socket

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import drill

CP = {"id": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "seq": 10, "time": 1000.0, "label": "drill"}
SERVERS = [
    {
        "name": "db1",
        "groups": ["app"],
        "volumes": [{"name": "db", "group": "app", "size": 4096, "uri": "nbd://127.0.0.1:1/db"}],
    }
]
VOLUMES = [{"name": "db", "group": "app", "server": "db1", "size": 4096, "state": "protected"}]
EXPORT = {"export": "app/db@a1b2c3d4e5f6.1", "uri": "nbd://127.0.0.1:10809/app/db@a1b2c3d4e5f6.1"}


class NullProvider:
    """Records the calls; no VM."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name == "network_command":  # no netns: the checks run here
            raise AttributeError(name)

        def call(*args):
            self.calls.append((name,) + args[:-1])
            return True

        return call

    def status(self, name, timeout):
        return {"state": "absent"}


@pytest.fixture
def nodes(havend, havend_tls):
    havend.script.on("GET", "/v1/servers", (200, SERVERS))
    havend.script.on("GET", "/v1/volumes", (200, VOLUMES))
    havend_tls.script.on("GET", "/v1/groups/app/checkpoints", (200, [CP]))
    havend_tls.script.on("POST", "/v1/exports", (201, EXPORT))
    havend_tls.script.on("DELETE", "/v1/exports/" + EXPORT["export"], (200, EXPORT))
    havend_tls.script.on("POST", "/v1/groups/app/verifications", (201, {"id": 1, "group": "app"}))
    return havend, havend_tls


def the_plan(port, isolated=True, **server):
    db1 = {
        "name": "db1",
        "nics": [{"network": "drill-lan", "ip": "10.99.0.11/24"}],
        "health_check": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout_seconds": 1, "interval_seconds": 0.2},
    }
    db1.update(server)
    return {
        "name": "db-drill",
        "networks": {"drill-lan": {"isolated": isolated, "cidr": "10.99.0.0/24"}},
        "groups": [{"name": "database", "servers": [db1]}],
    }


def run(capsys, nodes, tmp_path, monkeypatch, check_mode=False, **args):
    source, target = nodes
    provider = NullProvider()
    monkeypatch.setattr(drill, "make_providers", lambda plan, state_dir, guest: {"qemu": provider})
    args.setdefault("url", source.url)
    args.setdefault("token", "hvn_r_read")
    args.update(recovery_url=target.url, recovery_token="hvn_o_target", recovery_ca_path=target.ca)
    args.setdefault("state_dir", str(tmp_path / "state"))
    if check_mode:
        args["_ansible_check_mode"] = True
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            drill.main()
    return json.loads(capsys.readouterr().out), provider


def test_a_drill_opens_boots_checks_tears_down_and_records(capsys, nodes, tmp_path, monkeypatch, listening):
    result, provider = run(capsys, nodes, tmp_path, monkeypatch, plan=the_plan(listening))
    assert not result.get("failed"), result
    assert result["passed"] is True and result["failure"] is None and result["rto_seconds"] > 0
    assert [s["step"] for s in result["timeline"]] == ["export", "network", "create", "power_on", "health_check"]
    assert result["checkpoint"] == {"app": CP}
    assert result["rpo"]["app"]["checkpoint"] == CP["id"] and result["rpo"]["app"]["seconds"] > 1000
    assert result["cleaned_up"] is True
    assert [c[0] for c in provider.calls] == ["create_network", "create", "power_on", "power_off", "destroy", "destroy_network"]
    assert provider.calls[1][2] == [EXPORT["uri"]]
    source, target = nodes
    posted = [(r[0], r[1], r[3]) for r in target.script.requests if r[0] != "GET"]
    assert [p[:2] for p in posted] == [
        ("POST", "/v1/exports"),
        ("DELETE", "/v1/exports/" + EXPORT["export"]),
        ("POST", "/v1/groups/app/verifications"),
    ]
    assert posted[0][2] == {"group": "app", "volume": "db", "checkpoint": CP["id"], "writable": True}
    record = posted[2][2]
    assert record["checkpoint"] == CP["id"] and record["passed"] is True and record["plan"] == "db-drill"
    assert record["rto_seconds"] == result["rto_seconds"] and record["report"]["servers"] == ["db1"]
    report = result["haven_report"]
    assert (report["kind"], report["plan"], report["passed"]) == ("drill", "db-drill", True)
    assert report["rto_seconds"] == result["rto_seconds"] and report["timeline"] == result["timeline"]
    assert report["rpo"]["app"]["checkpoint"] == CP["id"] and report["teardown"] == result["teardown"]
    assert report["servers"] == [{"name": "db1", "group": "database", "protection_group": "app"}]


def test_a_check_that_never_passes_fails_naming_it_and_still_tears_down(capsys, nodes, tmp_path, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = sock.getsockname()[1]
    sock.close()
    result, provider = run(capsys, nodes, tmp_path, monkeypatch, plan=the_plan(closed))
    assert result["failed"] is True and result["passed"] is False and result["rto_seconds"] is None
    assert result["failure"]["server"] == "db1" and result["failure"]["check"] == "tcp 127.0.0.1:%d" % closed
    assert "refused" in result["failure"]["output"].lower()
    assert "db1" in result["msg"] and "tcp 127.0.0.1" in result["msg"]
    assert [c[0] for c in provider.calls][-3:] == ["power_off", "destroy", "destroy_network"]
    source, target = nodes
    methods = [(r[0], r[1]) for r in target.script.requests if r[0] != "GET"]
    assert ("DELETE", "/v1/exports/" + EXPORT["export"]) in methods
    record = [r[3] for r in target.script.requests if r[1].endswith("/verifications")]
    assert record[0]["passed"] is False and record[0]["report"]["failure"]["server"] == "db1"
    assert result["haven_report"]["passed"] is False and result["haven_report"]["failure"] == result["failure"]


def test_check_mode_shows_what_would_boot_and_touches_nothing(capsys, nodes, tmp_path, monkeypatch):
    result, provider = run(capsys, nodes, tmp_path, monkeypatch, check_mode=True, plan=the_plan(1))
    assert not result.get("failed"), result
    assert result["would_boot"][0]["server"] == "db1"
    assert result["would_boot"][0]["disks"] == [
        {"volume": "db", "boot": True, "source": "checkpoint", "checkpoint_id": CP["id"]}
    ]
    assert provider.calls == []
    source, target = nodes
    assert [r[0] for r in target.script.requests] == ["GET"]


@pytest.mark.parametrize(
    "plan, bad_key",
    [
        (the_plan(1, isolated=False), "plan.groups[0].servers[0].nics[0].network"),
        (the_plan(1, disks=[{"volume": "db", "source": "replica"}]), "plan.groups[0].servers[0].disks[0].source"),
    ],
)
def test_a_drill_refuses_what_is_not_a_drill(capsys, nodes, tmp_path, monkeypatch, plan, bad_key):
    result, provider = run(capsys, nodes, tmp_path, monkeypatch, plan=plan)
    assert result["failed"] is True and result["bad_key"] == bad_key, result
    assert provider.calls == []
