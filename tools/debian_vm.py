#!/usr/bin/env python3
"""Debian 12 guests (tools/debian_image.py) booted under TCG as Ansible hosts:
the machines of roles/replication_node's molecule scenario and tests.

``up DIR NAME...`` makes a network the host routes to (the qemu provider,
state under ``DIR/qemu``; its name and /24 chosen free), boots one guest per
NAME at ``.2``, ``.3``, ... with root's key of ``DIR/id_ed25519``, waits until
each answers ssh and systemd is ``running``, and writes

- ``DIR/vms.json``: per name its address, the key, the network;
- ``DIR/inventory.yml``: the hosts and how to reach them (root, the key), for
  ``ansible-playbook -i`` (with the inventory that puts them in groups:
  docs/examples/nodes/); ``replication_node_credentials_dir`` is
  ``DIR/haven-credentials``, and with ``--wheelhouse`` (tools/wheelhouse.py)
  ``replication_node_wheelhouse`` is set too: the guests have no package index;
- ``DIR/instance_config.yml`` (or ``--instance-config PATH``): molecule's
  instance config of a managed delegated driver (address, user, identity).

``down DIR`` powers the guests off and destroys them and the network. Again
is harmless. Root (network namespaces, taps).

    tools/debian_vm.py up /tmp/site src1 tgt1 --wheelhouse
    tools/debian_vm.py down /tmp/site
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "service"))

import debian_image  # noqa: E402
import test_debian_guest as guest  # noqa: E402  (boot, wait_ssh, run: one copy of them)
import wheelhouse  # noqa: E402
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)
from nodes import subnet  # noqa: E402

MEMORY = 1024  # havend, pip and Ansible's modules side by side
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def _provider(site: Path) -> Any:
    return get_provider("qemu", state_dir=str(site / "qemu"), powerdown_grace=guest.POWER_OFF)


def up(
    site: Path,
    names: list[str],
    instance_config: Path | None = None,
    with_wheelhouse: bool = False,
) -> dict[str, Any]:
    if (site / "vms.json").exists():
        raise SystemExit(f"debian_vm: {site} is up already (debian_vm.py down {site} first)")
    site.mkdir(parents=True, exist_ok=True)
    image = debian_image.build().as_dict()
    key = site / "id_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
        )
    pubkey = key.with_suffix(".pub").read_text().strip()
    prov = _provider(site)
    prefix = subnet()
    network = "v" + prefix.replace(".", "")[-7:]
    prov.create_network({"name": network, "cidr": f"{prefix}.0/24", "isolated": False}, 30)
    vms: dict[str, Any] = {}
    record = {"network": network, "key": str(key), "vms": vms}
    (site / "vms.json").write_text(json.dumps(record, indent=2))  # down finds them from here
    started = time.monotonic()
    for number, name in enumerate(names, start=2):
        ip = f"{prefix}.{number}"
        guest.boot(prov, image, name, network, ip, f"{prefix}.1", pubkey, memory=MEMORY)
        vms[name] = {"address": ip}
        (site / "vms.json").write_text(json.dumps(record, indent=2))
    for name, vm in vms.items():
        client = guest.wait_ssh(prov, name, vm["address"], key)
        try:
            guest.check_guest(client, name)
        finally:
            client.close()
    print(f"debian_vm: {', '.join(names)} up in {time.monotonic() - started:.0f} s", flush=True)
    hosts = {
        name: {
            "ansible_host": vm["address"],
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": SSH_OPTIONS,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        for name, vm in vms.items()
    }
    variables: dict[str, Any] = {
        "replication_node_credentials_dir": str(site / "haven-credentials")
    }
    if with_wheelhouse:
        variables["replication_node_wheelhouse"] = str(wheelhouse.build())
    (site / "inventory.yml").write_text(
        "# written by tools/debian_vm.py up: the guests, as root with the key beside this file\n"
        + yaml.safe_dump({"all": {"hosts": hosts, "vars": variables}}, sort_keys=True)
    )
    instances = [
        {
            "instance": name,
            "address": vm["address"],
            "user": "root",
            "port": 22,
            "identity_file": str(key),
            "connection": "ssh",
        }
        for name, vm in vms.items()
    ]
    (instance_config or site / "instance_config.yml").write_text(yaml.safe_dump(instances))
    return record


def down(site: Path) -> None:
    path = site / "vms.json"
    if not path.exists():
        return
    record = json.loads(path.read_text())
    prov = _provider(site)
    for name in prov.list(10):
        prov.destroy(name, 60)
    prov.destroy_network(record["network"], 30)
    path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="boot the guests, write the inventory")
    start.add_argument("dir", type=Path)
    start.add_argument("names", nargs="+")
    start.add_argument("--instance-config", type=Path, help="molecule's instance config file")
    start.add_argument(
        "--wheelhouse", action="store_true", help="set replication_node_wheelhouse (built, cached)"
    )
    stop = sub.add_parser("down", help="destroy the guests and their network")
    stop.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            up(args.dir, args.names, args.instance_config, args.wheelhouse)
        except BaseException:
            down(args.dir)
            raise
    else:
        down(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
