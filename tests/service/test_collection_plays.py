"""The collection's modules in real plays: ``ansible-playbook`` runs each
integration target (tests/integration/targets/<module>/tasks/main.yml)
against a real source and target havend on loopback, with TLS and tokens.
Each target runs check mode first, then the real run, then the same again
(``changed=false``), then bad input; its own asserts say what must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodes import Pair, app_group, free_port, make_token, start_pair

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ROOT / "tests" / "integration" / "targets"
MiB = 1 << 20
HAVEND = [sys.executable, "-m", "havend"]
# In this order: group_operation fails the group over and back, last.
ORDER = [
    "node_info",
    "api_token",
    "node_pair",
    "replication_info",
    "protection_group",
    "checkpoint",
    "pit_export",
    "group_operation",
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, Path]]:
    tmp = tmp_path_factory.mktemp("plays")
    group = app_group(tmp, {"db": 4 * MiB, "log": 2 * MiB})
    for volume in group["volumes"]:
        volume["server"] = "db1.example.com"  # both disks of one protected server
    pair = start_pair(tmp, [group], tls=True, api=True, caught_up=60)
    try:
        collections = tmp / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(
            ROOT
        )  # ansible-playbook follows it (ansible-test would not)
        closed = free_port()
        assert pair.tls is not None
        variables = {
            "haven_source_url": pair.source.address("api"),
            "haven_target_url": pair.target.address("api"),
            "haven_source_tokens": {
                s: make_token(pair.source, f"plays-{s}", s) for s in ("read", "operate", "admin")
            },
            "haven_target_tokens": {
                s: make_token(pair.target, f"plays-{s}", s) for s in ("read", "operate", "admin")
            },
            "haven_ca": pair.tls[0]["ca"],
            "haven_target_replication_port": int(
                pair.target.address("replication").rsplit(":", 1)[1]
            ),
            "haven_closed_port": closed,
            "haven_closed_url": f"http://127.0.0.1:{closed}",
            "ansible_python_interpreter": sys.executable,
        }
        (tmp / "vars.json").write_text(json.dumps(variables))
        yield pair, tmp
    finally:
        pair.stop()


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


def _env(tmp: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    env = os.environ | {
        "ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("HAVEN_URL", None)
    env.pop("HAVEN_TOKEN", None)
    return env


def _trusted(obj: dict[str, Any]) -> Any:
    """ansible-inventory marks what an inventory plugin read from elsewhere as
    unsafe (never templated): ``{"__ansible_unsafe": value}`` in its JSON."""
    return obj["__ansible_unsafe"] if set(obj) == {"__ansible_unsafe"} else obj


def test_the_inventory_lists_the_protected_servers(sites: tuple[Pair, Path]) -> None:
    """``ansible-inventory`` with haven.dr.nodes over the real source node, and
    a node that does not answer, reported once while the other is listed."""
    tmp = sites[1]
    variables = json.loads((tmp / "vars.json").read_text())
    source = tmp / "inventory.haven.yml"
    source.write_text(
        "plugin: haven.dr.nodes\n"
        f"token: {variables['haven_source_tokens']['read']}\n"
        f"ca_path: {variables['haven_ca']}\n"
        f"nodes:\n  - url: {variables['haven_source_url']}\n"
        f"  - url: {variables['haven_closed_url']}\n"
        "groups:\n  rpo_met: haven_rpo_ok\n"
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(source), "--list"],
        cwd=tmp,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed = json.loads(done.stdout, object_hook=_trusted)
    db1 = listed["_meta"]["hostvars"]["db1.example.com"]
    assert db1["haven_group"] == "app" and db1["haven_node"] == "src1"
    assert {v["name"] for v in db1["haven_volumes"]} == {"db", "log"}
    assert listed["haven_group_app"]["hosts"] == ["db1.example.com"]
    assert listed["rpo_met"]["hosts"] == ["db1.example.com"]
    assert done.stderr.count("connection refused") == 1, done.stderr


@pytest.mark.parametrize("target", ORDER)
def test_target_plays(sites: tuple[Pair, Path], target: str) -> None:
    pair, tmp = sites
    bin_dir = Path(sys.executable).parent
    env = _env(tmp)
    done = subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", "localhost,", str(_play(tmp, target))],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{target} failed:\n{output[-8000:]}"
    assert "failed=0" in output, output[-4000:]
    for node in (pair.source, pair.target):  # no traceback on either side
        assert "Traceback" not in node.log(), node.log()[-3000:]
