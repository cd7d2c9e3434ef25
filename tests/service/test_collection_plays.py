"""The collection's modules in real plays: ``ansible-playbook`` runs each
integration target (tests/integration/targets/<module>/tasks/main.yml)
against a real source and target havend on loopback, with TLS and tokens.
Each target runs check mode first, then the real run, then the same again
(``changed=false``), then bad input; its own asserts say what must hold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plays import ROOT, Sites, ansible, collection_sites

TARGETS = ROOT / "tests" / "integration" / "targets"
# In this order: group_operation fails the group over and back, last.
ORDER = [
    "node_info",
    "api_token",
    "node_pair",
    "replication_info",
    "protection_group",
    "checkpoint",
    "pit_export",
    "protected_server",
    "group_operation",
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    with collection_sites(tmp_path_factory.mktemp("plays")) as made:
        yield made


def _play(tmp: Path, target: str) -> Path:
    play = tmp / f"play-{target}.yml"
    play.write_text(
        "- hosts: localhost\n"
        "  connection: local\n"
        "  gather_facts: false\n"
        "  vars_files: [vars.json]\n"
        "  tasks:\n"
        f"    - ansible.builtin.include_tasks: {TARGETS / target / 'tasks' / 'main.yml'}\n"
    )
    return play


def _trusted(obj: dict[str, Any]) -> Any:
    """ansible-inventory marks what an inventory plugin read from elsewhere as
    unsafe (never templated): ``{"__ansible_unsafe": value}`` in its JSON."""
    return obj["__ansible_unsafe"] if set(obj) == {"__ansible_unsafe"} else obj


def test_the_inventory_lists_the_protected_servers(sites: Sites) -> None:
    """``ansible-inventory`` with haven.dr.nodes over the real source node, and
    a node that does not answer, reported once while the other is listed."""
    tmp, variables = sites.tmp, sites.variables
    source = tmp / "inventory.haven.yml"
    source.write_text(
        "plugin: haven.dr.nodes\n"
        f"token: {variables['haven_source_tokens']['read']}\n"
        f"ca_path: {variables['haven_ca']}\n"
        f"nodes:\n  - url: {variables['haven_source_url']}\n"
        f"  - url: {variables['haven_closed_url']}\n"
        "groups:\n  rpo_met: haven_rpo_ok\n"
    )
    done = ansible(tmp, "ansible-inventory", "-i", str(source), "--list", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = json.loads(done.stdout, object_hook=_trusted)
    db1 = listed["_meta"]["hostvars"]["db1.example.com"]
    assert db1["haven_group"] == "app" and db1["haven_node"] == "src1"
    assert {v["name"] for v in db1["haven_volumes"]} == {"db", "log"}
    assert listed["haven_group_app"]["hosts"] == ["db1.example.com"]
    assert listed["rpo_met"]["hosts"] == ["db1.example.com"]
    assert done.stderr.count("connection refused") == 1, done.stderr


@pytest.mark.parametrize("target", ORDER)
def test_target_plays(sites: Sites, target: str) -> None:
    done = ansible(sites.tmp, "ansible-playbook", "-i", "localhost,", str(_play(sites.tmp, target)))
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{target} failed:\n{output[-8000:]}"
    assert "failed=0" in output, output[-4000:]
    for node in (sites.pair.source, sites.pair.target):  # no traceback on either side
        assert "Traceback" not in node.log(), node.log()[-3000:]
