"""roles/replication_node through ``haven.dr.install`` on two real Debian 12
guests (tools/debian_vm.py, TCG): a source src1 and a target tgt1, havend
installed from the collection's service/ with a wheelhouse (the guests have no
package index), TLS from the deployment CA the role makes on tgt1, a
hardened systemd unit, the firewall, the admin tokens kept on the controller.

- the second run changes nothing, and no run prints a token;
- the units are hardened, havend answers over TLS with the controller's
  token, the source replicates to the target, and only ssh and havend's ports
  are reachable from outside;
- an upgrade in place (the collection's havend bumped to another version)
  while a writer writes through the source's NBD export: havend restarts on
  the new release, the writer reconnects, and every acknowledged write is on
  the source and, byte for byte, on the target's replica.

Root (network namespaces, taps); a missing tool fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import RawClient, require_tool
from plays import in_session
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import debian_vm  # noqa: E402
import test_debian_guest as guest  # noqa: E402
import test_readme  # noqa: E402

# measured (2 cores, TCG, idle): two guests to ssh 23 s; the first install
# 220 s, the second 105 s, an upgrade 150 s. The bounds leave room for a
# loaded machine.
PLAYBOOK = 1500
MiB = 1 << 20
BLOCK = 4096
VOLUME = 8 * MiB
FUA = 1 << 0  # NBD_CMD_FLAG_FUA: the reply comes when the write is durable
VERSION = re.compile(r'^(version = |__version__ = )"([^"]+)"$', re.M)


@dataclass
class Nodes:
    tmp: Path
    vms: dict[str, Any]
    collections: Path  # the collection as the README installs it
    script: dict[str, str]  # the README's lines: install, protect
    logs: list[str] = field(default_factory=list)

    def ip(self, name: str) -> str:
        return self.vms["vms"][name]["address"]

    def credentials(self, name: str) -> dict[str, str]:
        path = self.tmp / "nodes" / "haven-credentials" / f"{name}.yml"
        return yaml.safe_load(path.read_text())

    def api(self, name: str) -> httpx.Client:
        creds = self.credentials(name)
        return httpx.Client(
            base_url=creds["replication_node_url"],
            headers={"Authorization": "Bearer " + creds["replication_node_api_token"]},
            verify=ssl.create_default_context(cafile=creds["replication_node_ca_path"]),
            timeout=30,
        )

    def ssh(self, name: str, command: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["ssh", "-i", self.vms["key"], "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
             *debian_vm.SSH_OPTIONS.split(), f"root@{self.ip(name)}", command],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {command}: {done.stdout}{done.stderr}"
        return done.stdout

    def run(self, script: str, collections: Path | None = None) -> str:
        """``script`` (the README's lines) in bash, in its own session, from the
        checkout, with the collection of ``collections`` (default: the one the
        README installed): its output (it must succeed)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAVEN_", "ANSIBLE_"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            ANSIBLE_COLLECTIONS_PATH=str(collections or self.collections),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-local"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_PIPELINING="1",
            ANSIBLE_TIMEOUT="60",
        )
        done = in_session(
            ["bash", "-euo", "pipefail", "-c", "set -x\n" + script],
            env=env,
            cwd=ROOT,
            timeout=PLAYBOOK,
            merge=True,
        )
        out = done.stdout
        self.logs.append(out)
        (self.tmp / f"run-{len(self.logs)}.log").write_text(out)
        assert done.returncode == 0, out[-8000:]
        return out

    def install(self, collections: Path | None = None) -> str:
        return self.run(self.script["install"], collections)


def recap(out: str, host: str) -> dict[str, int]:
    for line in reversed(out.splitlines()):  # the last play's recap
        if line.startswith(host + " ") and "ok=" in line:
            return {k: int(v) for k, v in (f.split("=") for f in line.split()[2:])}
    raise AssertionError(f"no recap for {host}:\n{out[-3000:]}")


def _readme(tmp: Path) -> tuple[str, dict[str, str]]:
    """The README's blocks with their paths under ``tmp``: the collection
    built and installed ("Using the collection", up to the local setup), then
    "Installing the nodes" split into up, install, protect (down is ours)."""
    using = test_readme.readme_block()
    lines = test_readme.readme_block("## Installing the nodes")
    order = ["debian_vm.py up", "haven.dr.install", "haven.dr.protect", "debian_vm.py down"]
    assert [next((o for o in order if o in line), line) for line in lines] == order, lines
    steps = {
        "build": "\n".join(using[: next(i for i, x in enumerate(using) if "local_site" in x)]),
        "up": next(x for x in lines if "debian_vm.py up" in x),
        "install": next(x for x in lines if x.endswith("haven.dr.install")),
        "protect": next(x for x in lines if x.endswith("haven.dr.protect")),
    }
    for key, text in steps.items():
        steps[key] = text.replace("/tmp/haven-collections", str(tmp / "collections")).replace(
            "/tmp/haven-nodes", str(tmp / "nodes")
        )
    return steps.pop("build"), steps


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    for tool in ("mmdebstrap", "qemu-system-x86_64", "ssh", "ssh-keygen", "tar"):
        require_tool(tool)
    tmp = tmp_path_factory.mktemp("node-role")
    build, steps = _readme(tmp)
    nodes = Nodes(tmp, {}, tmp / "collections", steps)
    try:
        nodes.run(build)  # make build, the collection installed where the README says
        started = time.monotonic()
        nodes.run(steps["up"])
        guest._record("node_role_guests_to_ssh_s", time.monotonic() - started)
        nodes.vms = json.loads((tmp / "nodes" / "vms.json").read_text())
        yield nodes
    finally:
        debian_vm.down(tmp / "nodes")


@pytest.mark.timeout(PLAYBOOK * 2 + 600)
def test_install_twice_is_idempotent_hardened_and_firewalled(nodes: Nodes) -> None:
    started = time.monotonic()
    first = nodes.install()
    guest._record("node_role_first_install_s", time.monotonic() - started)
    for host in ("src1", "tgt1"):
        assert recap(first, host)["changed"] > 0
    started = time.monotonic()
    second = nodes.install()
    guest._record("node_role_second_install_s", time.monotonic() - started)
    assert (recap(second, "src1")["changed"], recap(second, "tgt1")["changed"]) == (0, 0), second
    checked = nodes.run(nodes.script["install"] + " --check --diff")
    assert (recap(checked, "src1")["changed"], recap(checked, "tgt1")["changed"]) == (0, 0)

    creds = nodes.tmp / "nodes" / "haven-credentials"
    for name in ("src1", "tgt1", "site"):
        assert (creds / f"{name}.yml").stat().st_mode & 0o777 == 0o600
    assert creds.stat().st_mode & 0o777 == 0o700
    for name in ("src1", "tgt1"):
        token = nodes.credentials(name)["replication_node_api_token"]
        assert token.startswith("hvn_")
        assert not any(token in log for log in nodes.logs), f"{name}'s token is in the output"
    site = yaml.safe_load((creds / "site.yml").read_text())
    assert site["haven_source_url"] == f"https://{nodes.ip('src1')}:8443"
    assert site["haven_recovery_url"] == f"https://{nodes.ip('tgt1')}:8443"

    for name in ("src1", "tgt1"):
        shown = nodes.ssh(
            name,
            "systemctl is-active havend havend-firewall && systemctl show havend -p User "
            "-p ProtectSystem -p NoNewPrivileges -p Restart -p ReadWritePaths -p PrivateDevices "
            "-p CapabilityBoundingSet -p ProtectHome",
        )
        props = dict(line.split("=", 1) for line in shown.split("\n")[2:] if "=" in line)
        assert shown.split("\n")[:2] == ["active", "active"], shown
        assert props == {
            "User": "havend",
            "ProtectSystem": "strict",
            "NoNewPrivileges": "yes",
            "Restart": "on-failure",
            "ReadWritePaths": "/var/lib/havend",
            "PrivateDevices": "yes",
            "CapabilityBoundingSet": "",
            "ProtectHome": "yes",
        }, shown
        with nodes.api(name) as api:
            node = api.get("/v1/node")
            assert node.status_code == 200, node.text
            assert (node.json()["name"], node.json()["role"]) == (
                name,
                "source" if name == "src1" else "target",
            )
    with nodes.api("src1") as api:
        peers = api.get("/v1/peers").json()
    assert peers["tls"] and peers["certificate"]["issuer_cn"] == "haven.dr deployment CA"
    assert [(p["role"], p["host"], p["server_name"]) for p in peers["peers"]] == [
        ("target", nodes.ip("tgt1"), "tgt1")
    ]

    # the firewall: a port that is not havend's is dropped from outside, answered inside
    nodes.ssh("tgt1", "setsid timeout 120 python3 -m http.server 9000 >/dev/null 2>&1 & sleep 1")
    nodes.ssh(
        "tgt1", "python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:9000')\""
    )
    with pytest.raises(OSError):
        socket.create_connection((nodes.ip("tgt1"), 9000), timeout=5).close()
    socket.create_connection((nodes.ip("tgt1"), 7788), timeout=10).close()  # replication
    socket.create_connection((nodes.ip("src1"), 10809), timeout=10).close()  # NBD (its address)
    with pytest.raises(OSError):  # NBD of a target is loopback only
        socket.create_connection((nodes.ip("tgt1"), 10810), timeout=5).close()


def _installed(nodes: Nodes) -> None:
    if not (nodes.tmp / "nodes" / "haven-credentials" / "src1.yml").exists():
        nodes.install()  # a test run alone: the nodes installed first


@pytest.mark.timeout(PLAYBOOK * 2 + 300)
def test_protect_as_the_readme_says_replicates_a_new_disk(nodes: Nodes) -> None:
    _installed(nodes)
    first = nodes.run(nodes.script["protect"])
    assert recap(first, "reports1")["changed"] > 0
    with nodes.api("src1") as api:
        volumes = api.get("/v1/volumes", params={"server": "reports1"}).json()
        assert [(v["name"], v["group"], v["uri"], v["size"]) for v in volumes] == [
            ("reports-data", "reports", f"nbd://{nodes.ip('src1')}:10809/reports-data", 4 * MiB)
        ]
        wait_until(
            lambda: (g := _group(api, "reports"))["connected"] and g["acked_seq"] == g["last_seq"],
            300,
            "group reports replicating to tgt1",
            detail=lambda: json.dumps(_group(api, "reports")),
            interval=1,
        )
    replica = "/var/lib/havend/replicas/reports/reports-data.img"
    assert nodes.ssh("tgt1", f"stat -c %s {replica}").strip() == str(4 * MiB)
    again = nodes.run(nodes.script["protect"])
    assert recap(again, "reports1")["changed"] == 0, again[-3000:]


class Writer(threading.Thread):
    """Writes 4 KiB blocks with FUA through the source's NBD export, each
    sequence number at block ``seq % blocks``; a write that fails (havend
    restarting) is retried on a new connection until acknowledged, so the
    last acknowledged write of a block is what the block holds."""

    def __init__(self, host: str, port: int, export: str, blocks: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.export, self.blocks = host, port, export, blocks
        self.acked = 0
        self.reconnects = 0
        self.last: dict[int, int] = {}  # block -> the seq it holds
        self.stop = threading.Event()
        self.error: BaseException | None = None

    @staticmethod
    def payload(seq: int) -> bytes:
        return struct.pack(">Q", seq) * (BLOCK // 8)

    def _connect(self) -> RawClient:
        client = RawClient(self.port, timeout=10, host=self.host)
        client.go(self.export)
        return client

    def run(self) -> None:
        client: RawClient | None = None
        seq = 0
        deadline = time.monotonic() + PLAYBOOK
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    if client is None:
                        client = self._connect()
                    block = seq % self.blocks
                    error = client.write(block * BLOCK, self.payload(seq), flags=FUA, cookie=seq)
                    assert error == 0, f"write {seq} failed with NBD error {error}"
                    self.last[block] = seq
                    self.acked += 1
                    seq += 1
                except (OSError, ConnectionError, struct.error):
                    if client is not None:
                        client.close()
                        client = None
                        self.reconnects += 1
                    time.sleep(0.5)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            if client is not None:
                client.close()


def _bumped_collection(nodes: Nodes, version: str) -> Path:
    """A copy of the installed collection, its havend at ``version``: the
    collections path of an upgrade."""
    where = nodes.tmp / "collections-v2" / "ansible_collections" / "haven" / "dr"
    shutil.copytree(nodes.collections / "ansible_collections" / "haven" / "dr", where)
    for path in (where / "service" / "pyproject.toml", where / "service/src/havend/__init__.py"):
        text, n = VERSION.subn(lambda m: f'{m.group(1)}"{version}"', path.read_text())
        assert n == 1, path
        path.write_text(text)
    return nodes.tmp / "collections-v2"


def _group(api: httpx.Client, name: str = "app") -> dict[str, Any]:
    got = api.get(f"/v1/groups/{name}")
    assert got.status_code == 200, got.text
    return got.json()


@pytest.mark.timeout(PLAYBOOK + 900)
def test_an_upgrade_in_place_under_writes_loses_no_write(nodes: Nodes) -> None:
    _installed(nodes)
    src = nodes.api("src1")
    made = src.post(
        "/v1/groups",
        json={
            "name": "app",
            "journal": {"segment_size": MiB, "max_segments": 64},
            "volumes": [{"name": "data", "path": "data.img", "size": VOLUME, "server": "db1"}],
        },
    )
    assert made.status_code == 201, made.text
    wait_until(lambda: _group(src)["connected"], 120, "src1 replicating to tgt1", interval=1)
    uri = next(v["uri"] for v in src.get("/v1/volumes").json() if v["name"] == "data")
    assert uri == f"nbd://{nodes.ip('src1')}:10809/data", uri

    writer = Writer(nodes.ip("src1"), 10809, "data", VOLUME // BLOCK)
    writer.start()
    try:
        wait_until(lambda: writer.acked >= 200 or writer.error, 120, "the first writes")
        collections = _bumped_collection(nodes, "0.1.1")
        started = time.monotonic()
        upgraded = nodes.install(collections)
        guest._record("node_role_upgrade_s", time.monotonic() - started)
        assert recap(upgraded, "src1")["changed"] > 0
        for name in ("src1", "tgt1"):
            with nodes.api(name) as api:
                assert api.get("/v1/node").json()["version"] == "0.1.1"
            releases = nodes.ssh(name, "ls /opt/havend/releases").split()
            assert len(releases) == 2, releases  # the old one kept (keep_releases 2)
        after = writer.acked
        wait_until(lambda: writer.acked >= after + 200 or writer.error, 120, "writes after it")
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert writer.reconnects >= 1, "the writer never saw havend restart"
    print(f"upgrade: {writer.acked} writes acknowledged, {writer.reconnects} reconnects")

    # every acknowledged write is on the source
    client = RawClient(10809, timeout=30, host=nodes.ip("src1"))
    try:
        client.go("data")
        for block, seq in sorted(writer.last.items()):
            error, data = client.read(block * BLOCK, BLOCK, cookie=seq + 1)
            assert (error, data) == (0, Writer.payload(seq)), f"block {block} lost write {seq}"
    finally:
        client.close()

    # and on the target's replica, byte for byte
    wait_until(
        lambda: (g := _group(src))["acked_seq"] == g["last_seq"] and g["lag_records"] == 0,
        300,
        "the target to acknowledge every write",
        detail=lambda: json.dumps(_group(src)),
    )
    source = nodes.ssh("src1", "sha256sum /var/lib/havend/volumes/data.img").split()[0]
    replica = nodes.ssh("tgt1", "sha256sum /var/lib/havend/replicas/app/data.img").split()[0]
    assert replica == source
    expected = bytearray(VOLUME)
    for block, seq in writer.last.items():
        expected[block * BLOCK : (block + 1) * BLOCK] = Writer.payload(seq)
    assert source == hashlib.sha256(expected).hexdigest()
    src.close()
