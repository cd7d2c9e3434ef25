"""The collection at scale, against Ansible's own tools in the same run.

Two havend source nodes (API on, plaintext, loopback) hold 500 protected
servers in 50 consistency groups (25 groups of 10 one-volume servers each).

* ``inventory_ratio``: ``ansible-inventory --list`` with the haven.dr.nodes
  plugin over both nodes, against ``ansible-inventory --list`` of a static
  YAML inventory of the same hosts, host vars and groups (made from the
  plugin's own output), median of alternating runs. Target: <= 2.0.
* ``play_ratio``: a play of 20 haven.dr.protection_group tasks against
  groups already in the wanted state (every one ``changed=false``), against
  the same play of 20 ``ansible.builtin.uri`` tasks reading the same
  routes, median of alternating runs. Target: <= 1.2.

    .venv/bin/python bench/collection.py [--runs N] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, ROOT, BenchError, free_port, machine_info, run, run_benchmark, stop

BIN = Path(sys.executable).parent
HAVEND = BIN / "havend"
GROUPS_PER_NODE = 25
SERVERS_PER_GROUP = 10
PLAY_TASKS = 20


class Node:
    """A source node with the API on and no target (the servers are labels)."""

    def __init__(self, work: Path, name: str) -> None:
        self.name = name
        self.state = work / name
        self.config = work / f"{name}.yaml"
        self.port = free_port()
        self.config.write_text(
            yaml.safe_dump(
                {
                    "node": {"name": name, "role": "source", "state_dir": str(self.state)},
                    "insecure_plaintext": True,
                    "source": {
                        "nbd": {"host": "127.0.0.1", "port": 0},
                        "volume_dir": str(work / f"{name}-volumes"),
                    },
                    "api": {"host": "127.0.0.1", "port": self.port},
                    "status_period": 1,
                }
            )
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self) -> None:
        log = open(self.state.parent / f"{self.name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [str(HAVEND), "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        status = self.state / "status.json"
        deadline = time.monotonic() + 60
        while not status.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not start: see {self.state.parent}")
            time.sleep(0.1)
        config = str(self.config)
        made = run(
            [str(HAVEND), "token", "create", "--config", config, "--name", "b", "--scope", "admin"],
            timeout=60,
        )
        self.token = json.loads(made.stdout)["token"]

    def populate(self, first_server: int) -> list[str]:
        """Its groups and labelled volumes, through the API; the group names."""
        import httpx

        names = []
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as api:
            for g in range(GROUPS_PER_NODE):
                name = f"{self.name}-g{g:02d}"
                volumes = []
                for s in range(SERVERS_PER_GROUP):
                    server = f"srv-{first_server + g * SERVERS_PER_GROUP + s:03d}"
                    volumes.append(
                        {"name": server, "path": f"{server}.img", "size": 4096, "server": server}
                    )
                body = {
                    "name": name,
                    "rpo_seconds": 30,
                    "journal": {"segment_size": 256 << 10, "max_segments": 2},
                    "volumes": volumes,
                }
                made = api.post("/v1/groups", json=body)
                if made.status_code != 201:
                    raise BenchError(f"{self.name}: group {name}: {made.status_code} {made.text}")
                names.append(name)
        return names

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def _env(work: Path) -> dict[str, str]:
    collections = work / "collections" / "ansible_collections" / "haven"
    collections.mkdir(parents=True, exist_ok=True)
    link = collections / "dr"
    if not link.exists():
        link.symlink_to(ROOT)
    return os.environ | {
        "ANSIBLE_COLLECTIONS_PATH": str(work / "collections"),
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
    )
    took = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return took, done.stdout


def _unwrap(obj: dict[str, Any]) -> Any:
    return obj["__ansible_unsafe"] if set(obj) == {"__ansible_unsafe"} else obj


def static_inventory(listed: dict[str, Any]) -> dict[str, Any]:
    """The YAML inventory of the same hosts, vars and groups."""
    hostvars = listed["_meta"]["hostvars"]
    children = {}
    for group, body in listed.items():
        if group in ("_meta", "all", "ungrouped") or not isinstance(body, dict):
            continue
        if body.get("hosts"):
            children[group] = {"hosts": dict.fromkeys(body["hosts"])}
    return {"all": {"hosts": hostvars, "children": children}}


def bench(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    nodes = [Node(work, "src1"), Node(work, "src2")]
    try:
        groups = []
        for i, node in enumerate(nodes):
            node.start()
            groups += node.populate(i * GROUPS_PER_NODE * SERVERS_PER_GROUP)
        env = _env(work)
        plugin = work / "bench.haven.yml"
        plugin.write_text(
            yaml.safe_dump(
                {
                    "plugin": "haven.dr.nodes",
                    "nodes": [{"url": n.url, "token": n.token} for n in nodes],
                    "request_timeout": 120,
                }
            )
        )
        ours = [str(BIN / "ansible-inventory"), "-i", str(plugin), "--list"]
        _, listed_text = _timed(ours, env, work)
        listed = json.loads(listed_text, object_hook=_unwrap)
        hosts = len(listed["_meta"]["hostvars"])
        if hosts != len(nodes) * GROUPS_PER_NODE * SERVERS_PER_GROUP:
            raise BenchError(f"the plugin listed {hosts} hosts")
        static = work / "static.yml"
        static.write_text(yaml.safe_dump(static_inventory(listed)))
        theirs = [str(BIN / "ansible-inventory"), "-i", str(static), "--list"]
        inventory = {"haven.dr.nodes": [], "static_yaml": []}
        for _ in range(args.runs):
            inventory["haven.dr.nodes"].append(_timed(ours, env, work)[0])
            inventory["static_yaml"].append(_timed(theirs, env, work)[0])

        node = nodes[0]
        chosen = [g for g in groups if g.startswith(node.name)][:PLAY_TASKS]
        connection = {"url": node.url, "token": node.token}
        module_tasks = [
            {
                "name": f"group {g}",
                "haven.dr.protection_group": connection | {"name": g, "rpo_seconds": 30},
            }
            for g in chosen
        ]
        uri_tasks = [
            {
                "name": f"group {g}",
                "ansible.builtin.uri": {
                    "url": f"{node.url}/v1/groups/{g}",
                    "headers": {"Authorization": f"Bearer {node.token}"},
                },
            }
            for g in chosen
        ]
        plays = {}
        for label, tasks in (("haven.dr", module_tasks), ("uri", uri_tasks)):
            path = work / f"play-{label}.yml"
            path.write_text(
                yaml.safe_dump(
                    [
                        {
                            "hosts": "localhost",
                            "connection": "local",
                            "gather_facts": False,
                            "vars": {"ansible_python_interpreter": sys.executable},
                            "tasks": tasks,
                        }
                    ]
                )
            )
            plays[label] = [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path)]
        _, first = _timed(plays["haven.dr"], env, work)
        if "changed=0" not in first:
            raise BenchError(f"the module play changed something:\n{first[-2000:]}")
        play = {"haven.dr": [], "uri": []}
        for _ in range(args.runs):
            for label in ("haven.dr", "uri"):
                play[label].append(_timed(plays[label], env, work)[0])
    finally:
        for node in nodes:
            node.stop()

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    inventory_ratio = median(inventory["haven.dr.nodes"]) / median(inventory["static_yaml"])
    play_ratio = median(play["haven.dr"]) / median(play["uri"])
    return {
        "benchmark": "collection",
        "machine": machine_info(),
        "servers": hosts,
        "groups": len(groups),
        "nodes": len(nodes),
        "runs": args.runs,
        "inventory": {
            "what": "ansible-inventory --list: haven.dr.nodes over 2 nodes vs a static YAML "
            "inventory of the same hosts, vars and groups (seconds, alternating runs)",
            "haven_dr_nodes_s": [round(t, 3) for t in inventory["haven.dr.nodes"]],
            "static_yaml_s": [round(t, 3) for t in inventory["static_yaml"]],
        },
        "play": {
            "what": f"ansible-playbook of {PLAY_TASKS} haven.dr.protection_group tasks in the "
            f"wanted state vs {PLAY_TASKS} ansible.builtin.uri reads of the same routes",
            "haven_dr_s": [round(t, 3) for t in play["haven.dr"]],
            "uri_s": [round(t, 3) for t in play["uri"]],
        },
        "inventory_ratio": round(inventory_ratio, 3),
        "inventory_ratio_target": 2.0,
        "play_ratio": round(play_ratio, 3),
        "play_ratio_target": 1.2,
    }


def print_table(result: dict[str, Any]) -> None:
    inv, play = result["inventory"], result["play"]
    print(f"{result['servers']} servers in {result['groups']} groups on {result['nodes']} nodes")
    print(
        f"inventory: haven.dr.nodes {statistics.median(inv['haven_dr_nodes_s']):.2f} s, static "
        f"{statistics.median(inv['static_yaml_s']):.2f} s -> ratio {result['inventory_ratio']}"
        f" (target <= {result['inventory_ratio_target']})"
    )
    print(
        f"play: haven.dr {statistics.median(play['haven_dr_s']):.2f} s, uri "
        f"{statistics.median(play['uri_s']):.2f} s -> ratio {result['play_ratio']}"
        f" (target <= {result['play_ratio_target']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--output", type=Path, default=RESULTS / "collection.json")
    args = parser.parse_args(argv)
    return run_benchmark("collection", lambda work: bench(work, args), print_table, args.output)


if __name__ == "__main__":
    sys.exit(main())
