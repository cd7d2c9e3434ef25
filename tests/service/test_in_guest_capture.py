"""The in-guest capture of roles/protected_server (``protected_server_capture:
in_guest``) by ``ansible-playbook`` over ssh against the Debian guest
(tools/debian_image.py, with mdadm and nbd-client baked in) under TCG: the
guest's disk becomes an md RAID1 whose second leg is ``nbd-client`` to the
source node's export, write-mostly with a write-behind bitmap, and what the
guest writes through ``/dev/md/<disk>`` reaches the target's replica, byte
for byte. The disk already holds an ext4 filesystem with room at its end: it
is kept (mounted through md afterwards, its file intact) and copied by md's
resync. A second run changes nothing; ``state: absent`` takes the NBD leg away
and unregisters the disk while md goes on serving the local leg. Bad input
(a device that does not exist, a filesystem that reaches the end of its
device) fails naming the disk and changes nothing.

Where things run and how they reach each other:

- The guest's network is a qemu-provider network, not isolated: a namespace
  with a bridge, and a veth pair whose host end holds the gateway address
  ``<prefix>.1``. The guest (``<prefix>.2``) reaches the host at that address
  directly (same subnet, no routing), so the source node's NBD listener
  binds to it (``source.nbd.host``): the export URIs the node hands out
  (``nbd://<prefix>.1:<port>/<disk>``) are the ones the guest connects to.
  Its API and the target stay on 127.0.0.1 (the play calls the API from the
  host, ``delegate_to: localhost``).
- The guest's local disks are raw files on the host served by ``qemu-nbd``
  on 127.0.0.1; QEMU (in the host's namespace) opens them as its drives
  (``/dev/vdb``, ``/dev/vdc``): the qemu provider only takes NBD disks.
- ansible-playbook runs on the host (its own session, killed with it), the
  collection a link to this checkout; it reaches the guest over ssh with the
  test's key (``haven.ssh_key=`` on the kernel command line).

Root; a missing tool fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_debian_guest as guest
import yaml
from conftest import require_tool
from nodes import NodeProcess, free_port, make_tls, make_token, source_node, target_node, wait_caught_up
from test_debian_guest import SSH_UP, _keypair, _record, _subnet, boot, power_off, run, wait_ssh
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
debian = guest.debian  # the fixtures: the cached image, a provider that cleans up
provider = guest.provider
MiB = 1 << 20
DISK = 64 * MiB  # the guest's disk to protect (vdb)
FS = 60 * MiB  # its ext4 filesystem: 4 MiB left at the end for md's superblock and bitmap
FULL = 16 * MiB  # vdc: an ext4 filesystem to its very end (refused)
PLAYBOOK = 1500  # one run under TCG on a loaded machine (measured: see _record)
COPY = 900  # md's resync of 64 MiB through the NBD leg, then the target catching up
PATTERN_AT = 61 * MiB  # past the filesystem's end, before md's superblock
PATTERN = 2 * MiB
HELLO = "haven.dr in-guest: kept through md\n"


@dataclass
class Site:
    tmp: Path
    net: str
    prefix: str
    ip: str
    key: Path
    source: NodeProcess
    target: NodeProcess
    api: httpx.Client
    variables: dict[str, Any]
    inventory: Path


def _local_disks(tmp: Path) -> tuple[Path, Path]:
    """vdb: 64 MiB, an ext4 of 60 MiB holding hello.txt; vdc: 16 MiB, an ext4
    of all of it."""
    content = tmp / "fs-content"
    content.mkdir()
    (content / "hello.txt").write_text(HELLO)
    vdb, vdc = tmp / "vdb.raw", tmp / "vdc.raw"
    for path, size in ((vdb, DISK), (vdc, FULL)):
        with open(path, "wb") as f:
            f.truncate(size)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(vdb), f"{FS // 1024}K"],
        check=True,
        timeout=60,
        env=env,
    )
    subprocess.run(["mkfs.ext4", "-q", "-F", str(vdc)], check=True, timeout=60, env=env)
    return vdb, vdc


@contextlib.contextmanager
def _served(path: Path, name: str) -> Iterator[str]:
    """``path`` served by qemu-nbd on 127.0.0.1: its NBD URI."""
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", name, "-p", str(port), "-b", "127.0.0.1", "-t",
         "--cache=none", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        uri = f"nbd://127.0.0.1:{port}/{name}"
        wait_until(
            lambda: proc.poll() is None
            and subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=30).returncode
            == 0,
            60,
            f"qemu-nbd serving {path}",
        )
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _nodes(tmp: Path, nbd_host: str) -> tuple[NodeProcess, NodeProcess, str]:
    """Target tgt1 and source src1 with TLS and the API, on 127.0.0.1 but the
    source's NBD listener, on ``nbd_host`` (the guest network's gateway); and
    the CA of their certificates."""
    src_tls, tgt_tls = make_tls(tmp)
    target = target_node(tmp, tls=tgt_tls, api=True)
    target.start()
    try:
        port = int(target.address("replication").rsplit(":", 1)[1])
        source = source_node(tmp, port, [], tls=src_tls, api=True)
        config = yaml.safe_load(source.config_path.read_text())
        config["source"]["nbd"]["host"] = nbd_host
        source.config_path.write_text(yaml.safe_dump(config))
        source.start()
    except BaseException:
        target.kill()
        raise
    return source, target, src_tls["ca"]


def _ansible_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAVEN_", "ANSIBLE_"))}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(tmp / "collections"),
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_TIMEOUT="60",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_STDOUT_CALLBACK="default",
    )
    return env


def ansible_playbook(site: Site, playbook: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook`` in its own session (on a timeout, or an interrupt,
    its workers and ssh masters go with it): the completed process."""
    binary = Path(sys.executable).parent / "ansible-playbook"
    assert binary.exists(), f"{binary} is missing: run `make setup`"
    proc = subprocess.Popen(
        [str(binary), "-i", str(site.inventory), str(playbook), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ansible_env(site.tmp),
        cwd=site.tmp,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=PLAYBOOK)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (site.tmp / f"{playbook.stem}-{time.monotonic_ns()}.log").write_text(stdout + stderr)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    return out.stdout


def _recap(stdout: str, host: str = "g1") -> dict[str, int]:
    for line in stdout.splitlines():
        if line.startswith(host + " ") and "ok=" in line:
            return {k: int(v) for k, v in (f.split("=") for f in line.split()[2:])}
    raise AssertionError(f"no recap for {host}:\n{stdout[-3000:]}")


def _play(site: Site, name: str, disks: list[dict[str, Any]], state: str = "present") -> Path:
    """A play of the role on g1 with ``disks``; writes the role's facts to
    ``<tmp>/<name>.facts.json`` (from the host)."""
    role = {
        "role": "haven.dr.protected_server",
        "protected_server_capture": "in_guest",
        "protected_server_group": "app",
        "protected_server_disks": disks,
        "protected_server_state": state,
        "protected_server_url": "{{ haven_source_url }}",
        "protected_server_token": "{{ haven_source_token }}",
        "protected_server_ca_path": "{{ haven_ca }}",
        "protected_server_wait_timeout": COPY,
        "protected_server_guest_write_behind": 512,
    }
    facts = site.tmp / f"{name}.facts.json"
    play = [
        {
            "hosts": "g1",
            "gather_facts": False,
            "vars_files": [str(site.tmp / "vars.json")],
            "roles": [role],
            "post_tasks": [
                {
                    "name": "The role's facts, for the test",
                    "ansible.builtin.copy": {
                        "content": "{{ {'md': protected_server_md_devices | default(None),"
                        " 'nbd': protected_server_nbd_devices | default(None),"
                        " 'exports': protected_server_exports | default(None)} | to_json }}",
                        "dest": str(facts),
                        "mode": "0644",
                    },
                    "delegate_to": "localhost",
                }
            ],
        }
    ]
    path = site.tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


@contextlib.contextmanager
def in_guest_site(provider: Any, debian: dict[str, str], tmp: Path) -> Iterator[Site]:
    """The guest g1 booted with its local disks, the two nodes, the group
    ``app`` (an anchor volume of another server in it: a group has one at
    least), the collection and the inventory. Everything stopped on exit."""
    net, prefix = "i" + secrets.token_hex(4), _subnet()
    gateway, ip = f"{prefix}.1", f"{prefix}.2"
    provider.create_network({"name": net, "cidr": f"{prefix}.0/24", "isolated": False}, 30)
    key, pubkey = _keypair(tmp)
    vdb, vdc = _local_disks(tmp)
    with contextlib.ExitStack() as stack:
        vdb_uri = stack.enter_context(_served(vdb, "vdb"))
        vdc_uri = stack.enter_context(_served(vdc, "vdc"))
        source, target, ca = _nodes(tmp, gateway)
        stack.callback(target.kill)
        stack.callback(target.stop)
        stack.callback(source.kill)
        stack.callback(source.stop)
        token = make_token(source, "in-guest", "admin")
        api = stack.enter_context(
            httpx.Client(
                base_url=source.address("api"),
                headers={"Authorization": f"Bearer {token}"},
                verify=ca,
                timeout=60,
            )
        )
        made = api.post(
            "/v1/groups",
            json={
                "name": "app",
                "journal": {"segment_size": MiB, "max_segments": 64},
                "volumes": [{"name": "anchor", "path": "anchor.img", "size": MiB, "server": "other"}],
            },
        )
        assert made.status_code == 201, made.text
        wait_caught_up(source, target, timeout=120)

        server = {
            "name": "g1",
            "memory": 1024,
            "cpus": 1,
            "nics": [{"network": net, "ip": f"{ip}/24", "gateway": gateway}],
            "options": {k: debian[k] for k in ("kernel", "initrd", "image")} | {"ssh_key": pubkey},
        }
        provider.create(server, [{"uri": vdb_uri}, {"uri": vdc_uri}], 30)
        started = time.monotonic()
        assert provider.power_on("g1", 60)
        stack.callback(lambda: provider.destroy("g1", 60))
        wait_ssh(provider, "g1", ip, key).close()
        _record("in_guest_boot_to_ssh_s", time.monotonic() - started)

        collections = tmp / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(ROOT)
        variables = {
            "haven_source_url": source.address("api"),
            "haven_source_token": token,
            "haven_ca": ca,
        }
        (tmp / "vars.json").write_text(json.dumps(variables))
        inventory = tmp / "inventory.ini"
        inventory.write_text(
            f"g1 ansible_host={ip} ansible_user=root ansible_ssh_private_key_file={key} "
            "ansible_python_interpreter=/usr/bin/python3 "
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n"
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        )
        yield Site(tmp, net, prefix, ip, key, source, target, api, variables, inventory)
