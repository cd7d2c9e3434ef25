# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json
import os
import re

import pytest

from ansible_collections.haven.dr.plugins.module_utils._plan import (
    PlanError,
    parse_plan,
    plan_argspec,
    network_options,
    resolve_plan,
)

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "docs")


def three_tier():
    return {
        "name": "shop",
        "networks": {
            "dr-lan": {"isolated": False, "cidr": "10.20.0.0/24", "bridge": "br-dr"},
            "drill": {"cidr": "10.99.0.0/24"},
        },
        "groups": [
            {
                "name": "db",
                "timeout_seconds": 900,
                "pre": [{"command": "echo db"}],
                "servers": [
                    {
                        "name": "db1",
                        "vcpus": 4,
                        "memory_mib": 8192,
                        "nics": [{"network": "dr-lan", "ip": "10.20.0.11/24", "mac": "52:54:00:00:00:11"}],
                        "health_check": {"type": "tcp", "port": 5432},
                    }
                ],
            },
            {
                "name": "app",
                "servers": [
                    {
                        "name": "app1",
                        "network": "dr-lan",
                        "health_check": {
                            "type": "http",
                            "url": "http://10.20.0.21:8080/health",
                            "jmespath": "status == 'up'",
                        },
                    },
                    {"name": "app2", "network": "dr-lan"},
                ],
            },
            {
                "name": "web",
                "parallel": False,
                "servers": [
                    {
                        "name": "web1",
                        "protection_group": "shop",
                        "volumes": ["web-root"],
                        "disks": [{"volume": "web-root", "checkpoint": "oldest"}],
                        "nics": [{"network": "drill", "ip": "10.99.0.31"}],
                        "health_check": {"type": "command", "command": "systemctl is-active nginx"},
                    }
                ],
            },
        ],
    }


def facts():
    def vol(name, server, group="shop", state="protected"):
        return {
            "name": name,
            "group": group,
            "server": server,
            "size": 4096,
            "uri": "nbd://src1:10809/" + name,
            "state": state,
        }

    volumes = [
        vol("db-data", "db1"),
        vol("db-wal", "db1"),
        vol("app1-root", "app1"),
        vol("app2-root", "app2", state="syncing"),
        vol("web-root", "web1"),
        vol("other", None, "batch"),
    ]
    servers = {}
    for v in volumes:
        if v["server"]:
            s = servers.setdefault(v["server"], {"name": v["server"], "groups": [], "volumes": []})
            if v["group"] not in s["groups"]:
                s["groups"].append(v["group"])
            s["volumes"].append({"name": v["name"], "group": v["group"]})
    kept = [{"id": "aaaaaa111111", "seq": 1}, {"id": "bbbbbb222222", "seq": 2}, {"id": "bbbbbb333333", "seq": 3}]
    return {
        "node": "src1",
        "servers": list(servers.values()),
        "volumes": volumes,
        "checkpoints": {"shop": kept, "batch": []},
    }


def error(data, facts_=None):
    with pytest.raises(PlanError) as info:
        plan = parse_plan(data)
        if facts_ is not None:
            resolve_plan(plan, facts_)
    return info.value


def test_a_plan_is_normalised_with_every_default():
    plan = parse_plan(three_tier())
    assert [g.name for g in plan.groups] == ["db", "app", "web"]
    assert plan.rto_target_seconds is None and plan.rpo_target_seconds is None
    assert parse_plan(dict(three_tier(), rto_target_seconds=600)).to_dict()["rto_target_seconds"] == 600
    assert [g.parallel for g in plan.groups] == [True, True, False]
    assert plan.groups[0].timeout_seconds == 900.0 and plan.groups[1].timeout_seconds == 1800.0
    assert plan.networks["drill"].isolated is True and plan.networks["dr-lan"].isolated is False
    db1 = plan.groups[0].servers[0]
    assert (db1.provider, db1.vcpus, db1.memory_mib, db1.delay_seconds) == ("qemu", 4, 8192, 0.0)
    assert db1.health_check.host == "10.20.0.11"  # from its NIC
    assert (db1.health_check.timeout_seconds, db1.health_check.interval_seconds) == (300.0, 5.0)
    app1 = plan.groups[1].servers[0]
    assert [n.network for n in app1.nics] == ["dr-lan"]
    assert app1.health_check.status == 200 and app1.health_check.validate_certs is True
    web1 = plan.groups[2].servers[0]
    assert web1.health_check.user == "root" and web1.health_check.ssh_port == 22 and web1.health_check.expect_rc == 0
    assert web1.disks[0].boot is True and web1.disks[0].checkpoint == "oldest"
    out = plan.to_dict()
    assert json.loads(json.dumps(out)) == out
    assert set(out["groups"][0]["servers"][0]["health_check"]) == {
        "type",
        "timeout_seconds",
        "interval_seconds",
        "host",
        "port",
    }
    assert parse_plan(out).to_dict() == out  # the normalised plan is a plan


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (
            lambda p: p["groups"][1]["servers"][0].update(network="nope"),
            "plan.groups[1].servers[0].network",
            "no network 'nope'",
        ),
        (
            lambda p: p["groups"][0]["servers"][0]["nics"][0].update(network="x"),
            "plan.groups[0].servers[0].nics[0].network",
            "no network",
        ),
        (
            lambda p: p["groups"][1]["servers"].append({"name": "db1"}),
            "plan.groups[1].servers[2].name",
            "listed already, at plan.groups[0].servers[0]",
        ),
        (lambda p: p["groups"][2].update(servers=[]), "plan.groups[2].servers", "has no server"),
        (lambda p: p["groups"].append({"name": "db", "servers": [{"name": "x"}]}), "plan.groups[3].name", "already"),
        (
            lambda p: p["groups"][0]["servers"][0].update(vcpus="four"),
            "plan.groups[0].servers[0].vcpus",
            "must be an integer",
        ),
        (
            lambda p: p["groups"][0]["servers"][0].update(colour="red"),
            "plan.groups[0].servers[0].colour",
            "unknown key",
        ),
        (
            lambda p: p["groups"][0]["servers"][0].update(provider="xen"),
            "plan.groups[0].servers[0].provider",
            "not one of qemu, libvirt",
        ),
        (
            lambda p: p["groups"][0]["servers"][0]["health_check"].update(url="http://x"),
            "plan.groups[0].servers[0].health_check.url",
            "not used by a tcp check",
        ),
        (
            lambda p: p["groups"][0]["servers"][0]["health_check"].pop("port"),
            "plan.groups[0].servers[0].health_check.port",
            "required by a tcp check",
        ),
        (
            lambda p: p["groups"][0]["servers"][0]["nics"][0].update(ip="10.30.0.1/24"),
            "plan.groups[0].servers[0].nics[0].ip",
            "not in network dr-lan",
        ),
        (
            lambda p: p["groups"][0]["servers"][0]["nics"][0].update(mac="52:54"),
            "plan.groups[0].servers[0].nics[0].mac",
            "not a MAC",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["nics"][0].update(network="dr-lan", ip="10.20.0.11"),
            "plan.groups[2].servers[0].nics[0].ip",
            "used already",
        ),
        (
            lambda p: p["groups"][2]["servers"][0].update(nics=None),
            "plan.groups[2].servers[0].health_check.host",
            "no NIC with an ip",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"].append({"volume": "web-root"}),
            "plan.groups[2].servers[0].disks[1].volume",
            "listed already",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"][0].update(volume="x"),
            "plan.groups[2].servers[0].disks[0].volume",
            "not in the server's volumes",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"][0].update(checkpoint="ab"),
            "plan.groups[2].servers[0].disks[0].checkpoint",
            "prefix of 6",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"][0].update(source="replica"),
            "plan.groups[2].servers[0].disks[0].checkpoint",
            "no checkpoint",
        ),
        (lambda p: p["groups"][1]["servers"][1].update(nics=[]), "plan.groups[1].servers[1].network", "not both"),
        (lambda p: p["groups"][0].update(timeout_seconds=0), "plan.groups[0].timeout_seconds", "more than 0"),
        (lambda p: p["networks"]["drill"].update(cidr="10.99.0.0/33"), "plan.networks.drill.cidr", "not a network"),
        (lambda p: p.update(rto_target_seconds=0), "plan.rto_target_seconds", "more than 0"),
        (lambda p: p.update(rpo_target_seconds=-5), "plan.rpo_target_seconds", "more than 0"),
        (lambda p: p.update(groups=[]), "plan.groups", "at least one"),
        (lambda p: p.pop("name"), "plan.name", "required"),
    ],
)
def test_a_bad_plan_names_the_bad_key(change, path, words):
    data = three_tier()
    change(data)
    exc = error(data)
    assert exc.path == path and words in exc.reason, str(exc)
    assert str(exc).startswith(path + ": ")


def test_against_the_nodes_defaults_are_filled_in():
    plan, warnings = resolve_plan(parse_plan(three_tier()), facts())
    db1 = plan.groups[0].servers[0]
    assert db1.protection_group == "shop" and db1.volumes == ["db-data", "db-wal"]
    assert [(d.volume, d.boot, d.checkpoint, d.checkpoint_id) for d in db1.disks] == [
        ("db-data", True, "latest", "bbbbbb333333"),
        ("db-wal", False, "latest", "bbbbbb333333"),
    ]
    assert plan.groups[2].servers[0].disks[0].checkpoint_id == "aaaaaa111111"
    text = "\n".join(warnings)
    assert "plan.groups[1].servers[1].volumes: volume app2-root of group shop is still syncing" in text
    assert "plan.groups[1].servers[1]: app2 has no health check" in text
    assert "protection group shop is booted from 2 different points" in text


@pytest.mark.parametrize(
    ("change", "fact", "path", "words"),
    [
        (
            lambda p: p["groups"][1]["servers"][0].update(name="app9"),
            None,
            "plan.groups[1].servers[0].name",
            "no protected server 'app9' on src1",
        ),
        (
            lambda p: p["groups"][0]["servers"][0].update(protection_group="nope"),
            None,
            "plan.groups[0].servers[0].protection_group",
            "no protection group 'nope'",
        ),
        (
            lambda p: p["groups"][0]["servers"][0].update(protection_group="batch"),
            None,
            "plan.groups[0].servers[0].protection_group",
            "db1 has no volume in group batch",
        ),
        (
            lambda p: p["groups"][2]["servers"][0].update(volumes=["web-root", "gone"]),
            None,
            "plan.groups[2].servers[0].volumes[1]",
            "no volume 'gone'",
        ),
        (
            lambda p: p["groups"][2]["servers"][0].update(volumes=["web-root", "db-wal"]),
            None,
            "plan.groups[2].servers[0].volumes[1]",
            "used already, by plan.groups[0].servers[0]",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"][0].update(checkpoint="cccccc"),
            None,
            "plan.groups[2].servers[0].disks[0].checkpoint",
            "not retained",
        ),
        (
            lambda p: p["groups"][2]["servers"][0]["disks"][0].update(checkpoint="bbbbbb"),
            None,
            "plan.groups[2].servers[0].disks[0].checkpoint",
            "ambiguous",
        ),
        (
            lambda p: None,
            lambda f: f["checkpoints"].update(shop=[]),
            "plan.groups[0].servers[0].disks",
            "retains no checkpoint",
        ),
        (
            lambda p: None,
            lambda f: f["checkpoints"].pop("shop"),
            "plan.groups[0].servers[0].protection_group",
            "not on the recovery node",
        ),
    ],
)
def test_what_the_nodes_do_not_hold_names_the_bad_key(change, fact, path, words):
    data, f = three_tier(), facts()
    change(data)
    if fact:
        fact(f)
    exc = error(data, f)
    assert exc.path == path and words in exc.reason, str(exc)


def test_a_server_in_two_groups_must_name_one():
    f = facts()
    f["servers"][0]["groups"].append("batch")
    exc = error(three_tier(), f)
    assert exc.path == "plan.groups[0].servers[0].protection_group" and "required" in exc.reason


def test_without_the_recovery_node_checkpoints_are_not_checked():
    f = facts()
    del f["checkpoints"]
    plan, warnings = resolve_plan(parse_plan(three_tier()), f)
    assert plan.groups[0].servers[0].disks[0].checkpoint_id is None
    assert "checkpoints of the plan are not checked" in warnings[0]


def test_a_plan_is_not_changed_by_parsing_or_resolving():
    data = three_tier()
    kept = copy.deepcopy(data)
    plan = parse_plan(data)
    resolve_plan(plan, facts())
    assert data == kept and plan.groups[0].servers[0].disks is None


# The published schema agrees with the model ------------------------------------


def schema():
    with open(os.path.join(DOCS, "recovery-plan.schema.json")) as f:
        return json.load(f)


def _keys(options, prefix):
    out = set()
    for key, spec in options.items():
        out.add(prefix + key)
        if "options" in spec:
            out |= _keys(spec["options"], prefix + key + ".")
    return out


def _schema_keys(node, defs, prefix):
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    out = set()
    for key, sub in node.get("properties", {}).items():
        out.add(prefix + key)
        if "$ref" in sub:
            sub = defs[sub["$ref"].rsplit("/", 1)[1]]
        if sub.get("type") == "array" and "properties" in _deref(sub.get("items", {}), defs):
            out |= _schema_keys(sub["items"], defs, prefix + key + ".")
        elif "properties" in sub:
            out |= _schema_keys(sub, defs, prefix + key + ".")
    return out


def _deref(node, defs):
    return defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node


def test_the_schema_has_every_key_of_the_model_and_no_other():
    s = schema()
    defs = s.get("$defs", {})
    assert _schema_keys(s, defs, "") == _keys(plan_argspec(), "")
    network = _deref(s["properties"]["networks"]["additionalProperties"], defs)
    assert set(network["properties"]) == set(network_options())


def _required(options, prefix):
    out = set()
    for key, spec in options.items():
        if spec.get("required"):
            out.add(prefix + key)
        if "options" in spec:
            out |= _required(spec["options"], prefix + key + ".")
    return out


def _schema_required(node, defs, prefix):
    node = _deref(node, defs)
    out = set(prefix + k for k in node.get("required", []))
    for key, sub in node.get("properties", {}).items():
        sub = _deref(sub, defs)
        if sub.get("type") == "array":
            out |= _schema_required(sub.get("items", {}), defs, prefix + key + ".")
        elif "properties" in sub:
            out |= _schema_required(sub, defs, prefix + key + ".")
    return out


def test_the_schema_requires_what_the_model_requires_and_has_its_choices():
    s = schema()
    defs = s.get("$defs", {})
    assert _schema_required(s, defs, "") == _required(plan_argspec(), "")
    server = _deref(s["$defs"]["server"], defs)
    assert server["properties"]["provider"]["enum"] == ["qemu", "libvirt"]
    assert _deref(server["properties"]["health_check"], defs)["properties"]["type"]["enum"] == [
        "tcp",
        "http",
        "command",
        "guest_agent",
    ]


def docs_example():
    """The plan of docs/recovery-plans.md's full example (its first yaml block under ``plan:``)."""
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(DOCS, "recovery-plans.md")) as f:
        text = f.read()
    block = re.search(r"```yaml\n(# the full example.*?)```", text, re.S).group(1)
    return yaml.safe_load(block)["plan"]


def test_the_docs_example_is_a_valid_plan():
    plan = parse_plan(docs_example())
    assert [g.name for g in plan.groups] == ["db", "app", "web"]


def test_the_docs_example_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(docs_example(), schema())
    bad = docs_example()
    bad["groups"][0]["servers"][0]["colour"] = "red"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())


def test_a_failover_boots_every_disk_from_the_promoted_replica():
    data = three_tier()
    data["groups"][2]["servers"][0]["disks"][0].pop("checkpoint")  # its own point: refused below
    f = facts()
    del f["checkpoints"]  # nothing of the checkpoints is asked or checked
    plan, warnings = resolve_plan(parse_plan(data), f, replica=True)
    disks = [d for s in plan.servers() for d in s.disks]
    assert disks and all(d.source == "replica" and d.checkpoint is None and d.checkpoint_id is None for d in disks)
    assert not [w for w in warnings if "checkpoints of the plan" in w or "different points" in w]
    exc = error_replica(three_tier(), f)  # web1's disk names checkpoint "oldest"
    assert exc.path == "plan.groups[2].servers[0].disks[0].checkpoint" and "promoted replica" in exc.reason


def error_replica(data, facts_):
    with pytest.raises(PlanError) as info:
        resolve_plan(parse_plan(data), facts_, replica=True)
    return info.value
