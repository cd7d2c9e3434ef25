# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest
from ansible.errors import AnsibleError
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import inventory_loader

SERVERS = [
    {
        "name": "db1.example.com",
        "node": "src1",
        "groups": ["app"],
        "state": "protecting",
        "lag_seconds": 0.4,
        "rpo_ok": True,
        "volumes": [{"name": "db", "group": "app", "size": 4096, "uri": "nbd://h/db", "writable": True}],
    },
    {
        "name": "web1",
        "node": "src1",
        "groups": ["web"],
        "state": "paused",
        "lag_seconds": 45.0,
        "rpo_ok": False,
        "volumes": [],
    },
]


def parse(tmp_path, text):
    path = tmp_path / "haven.yml"
    path.write_text(text)
    plugin = inventory_loader.get("haven.dr.nodes")
    assert plugin.verify_file(str(path))
    inventory = InventoryData()
    plugin.parse(inventory, DataLoader(), str(path), cache=False)
    return plugin, inventory


def test_servers_become_hosts_grouped_by_group_and_state(havend, tmp_path, closed_port, monkeypatch):
    havend.script.on("GET", "/v1/servers", (200, SERVERS))
    warnings = []
    monkeypatch.setattr("ansible.utils.display.Display.warning", lambda self, msg, *a, **k: warnings.append(msg))
    plugin, inventory = parse(
        tmp_path,
        "plugin: haven.dr.nodes\n"
        "token: hvn_r_read\n"
        "nodes:\n"
        "  - url: %s\n"
        "  - url: http://127.0.0.1:%d\n"
        "groups:\n"
        "  lagging: haven_lag_seconds > 30\n"
        "keyed_groups:\n"
        "  - key: haven_rpo_ok | ternary('rpo_met', 'rpo_breached')\n"
        "    separator: ''\n" % (havend.url, closed_port),
    )
    assert sorted(inventory.hosts) == ["db1.example.com", "web1"]
    db1 = inventory.get_host("db1.example.com").get_vars()
    assert db1["haven_group"] == "app" and db1["haven_state"] == "protecting"
    assert db1["haven_node"] == "src1" and db1["haven_node_url"] == havend.url
    assert db1["haven_volumes"][0]["uri"] == "nbd://h/db"
    groups = inventory.groups
    assert [h.name for h in groups["haven_group_app"].hosts] == ["db1.example.com"]
    assert [h.name for h in groups["haven_state_paused"].hosts] == ["web1"]
    assert [h.name for h in groups["lagging"].hosts] == ["web1"]
    assert [h.name for h in groups["rpo_breached"].hosts] == ["web1"]
    assert [h.name for h in groups["rpo_met"].hosts] == ["db1.example.com"]
    # The node that does not answer: reported once, the other's servers listed.
    assert len(warnings) == 1 and "connection refused" in warnings[0] and str(closed_port) in warnings[0]
    assert havend.script.requests[0][2]["Authorization"] == "Bearer hvn_r_read"


def test_strict_nodes_fails_on_a_node_that_does_not_answer(tmp_path, closed_port):
    with pytest.raises(AnsibleError, match="connection refused"):
        parse(
            tmp_path,
            "plugin: haven.dr.nodes\nstrict_nodes: true\nnodes:\n  - url: http://127.0.0.1:%d\n" % closed_port,
        )


def test_a_node_without_url_is_named(tmp_path):
    with pytest.raises(AnsibleError, match=r"nodes\[0\]: a dictionary with a url"):
        parse(tmp_path, "plugin: haven.dr.nodes\nnodes:\n  - token: x\n")


def test_only_haven_files_are_read(tmp_path):
    other = tmp_path / "hosts.yml"
    other.write_text("plugin: haven.dr.nodes\nnodes: []\n")
    assert not inventory_loader.get("haven.dr.nodes").verify_file(str(other))
