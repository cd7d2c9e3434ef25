"""haven.dr.drill through a real ``ansible-playbook`` play against a real havend
pair: a tiny guest (tools/guest_image.py) boots under TCG from the target's
writable point-in-time export of a checkpoint, in an isolated network, its
health check runs inside that network, and everything goes away after; the
result is recorded on the target. Production replicates throughout. Root."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nodes import MiB, Pair, app_group, make_token, start_pair, wait_caught_up
from plays import ROOT, ansible, ansible_env

from havend.nbd.client import NBDClient

sys.path.insert(0, str(ROOT / "tools"))
import guest_image
from test_libvirt_provider import libvirtd  # noqa: F401  (a fixture, used by name)

MARK = b"HAVEN-MARK-db1"
PORT = 5432


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    return guest_image.build().as_dict()


class Site:
    def __init__(self, pair: Pair, tmp: Path) -> None:
        self.pair, self.tmp = pair, tmp
        self.src = httpx.Client(
            base_url=pair.source.address("api"),
            headers={"Authorization": "Bearer " + make_token(pair.source, "drill-src", "operate")},
            timeout=30,
        )
        self.tgt = httpx.Client(
            base_url=pair.target.address("api"),
            headers={"Authorization": "Bearer " + make_token(pair.target, "drill-tgt", "operate")},
            timeout=30,
        )
        self.nbd = int(pair.source.address("nbd").rsplit(":", 1)[1])

    def write(self, offset: int, data: bytes) -> None:
        client = NBDClient.tcp("127.0.0.1", self.nbd, "db")
        try:
            client.write(offset, data.ljust(512, b"\0"))
            client.flush()
        finally:
            client.close()

    def replica_reads(self, offset: int, length: int) -> bytes:
        """What the target holds at ``offset``, as of a new checkpoint (a read-only export)."""
        cp = self.src.post("/v1/groups/app/checkpoints", json={"label": "after"})
        assert cp.status_code == 201, cp.text
        wait_caught_up(self.pair.source, self.pair.target)
        view = self.tgt.post(
            "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": cp.json()["id"]}
        )
        assert view.status_code == 201, view.text
        try:
            host_port, name = view.json()["uri"][len("nbd://") :].split("/", 1)
            host, port = host_port.rsplit(":", 1)
            client = NBDClient.tcp(host, int(port), name)
            try:
                return client.read(offset, length)
            finally:
                client.close()
        finally:
            self.tgt.delete("/v1/exports/" + view.json()["export"])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    group = app_group(tmp_path, {"db": 4 * MiB})
    group["volumes"][0]["server"] = "db1"
    pair = start_pair(tmp_path, [group], api=True, caught_up=60)
    try:
        made = Site(pair, tmp_path)
        made.write(0, MARK)
        cp = made.src.post("/v1/groups/app/checkpoints", json={"label": "drill"})
        assert cp.status_code == 201, cp.text
        made.checkpoint = cp.json()
        wait_caught_up(pair.source, pair.target)
        collections = tmp_path / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(ROOT)
        yield made
        made.src.close()
        made.tgt.close()
    finally:
        pair.stop()


def run_drill(
    site: Site, image: dict[str, str], port: int, timeout: float, kind: str = "qemu"
) -> dict[str, Any]:
    """The drill of db1 as a play, its VM on provider ``kind``; its registered result."""
    site.kind = kind
    sub = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    net = "d" + secrets.token_hex(4)
    site.network = net
    task = {
        "name": "drill db1",
        "haven.dr.drill": {
            "url": site.pair.source.address("api"),
            "token": make_token(site.pair.source, "drill-play", "read"),
            "recovery_url": site.pair.target.address("api"),
            "recovery_token": make_token(site.pair.target, "drill-play", "operate"),
            "state_dir": str(site.tmp / "drill-state"),
            "checkpoint": site.checkpoint["id"][:8],
            "plan": {
                "name": "db-drill",
                "provider": kind,
                "networks": {net: {"isolated": True, "cidr": f"{sub}.0/24"}},
                "groups": [
                    {
                        "name": "database",
                        "timeout_seconds": timeout + 60,
                        "servers": [
                            {
                                "name": "db1",
                                "vcpus": 1,
                                "memory_mib": 256,
                                "nics": [{"network": net, "ip": f"{sub}.2/24"}],
                                "health_check": {
                                    "type": "tcp",
                                    "port": port,
                                    "timeout_seconds": timeout,
                                    "interval_seconds": 1,
                                },
                            }
                        ],
                    }
                ],
            },
            "qemu": {
                "kernel": image["kernel"],
                "initrd": image["initrd"],
                "servers": {"db1": {"role": f"tcp:{PORT}"}},
            },
        },
        "register": "drill",
        "ignore_errors": True,
    }
    out = site.tmp / "drill.json"
    save = {"ansible.builtin.copy": {"content": "{{ drill | to_json }}", "dest": str(out)}}
    play = [
        {"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": [task, save]}
    ]
    path = site.tmp / "drill.yml"
    path.write_text(yaml.safe_dump(play))
    done = ansible(
        site.tmp,
        "ansible-playbook",
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(path),
        env=ansible_env(site.tmp),
    )
    (site.tmp / "drill.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return json.loads(out.read_text())


def assert_nothing_left(site: Site) -> None:
    assert site.tgt.get("/v1/exports").json() == []
    assert not Path(f"/var/run/netns/haven-{site.network}").exists()
    vms = site.tmp / "drill-state" / site.kind / "vms"
    assert not vms.exists() or not list(vms.iterdir())
    assert "drill-state/qemu/vms" not in os.popen("ps -eo args").read()
    if site.kind == "libvirt":  # no domain or network of the drill's state dir left in libvirtd
        listed = subprocess.run(
            ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "db1" not in listed, listed
        nets = subprocess.run(
            ["virsh", "-c", "qemu:///system", "net-list", "--all", "--name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert site.network not in nets, nets


@pytest.fixture(params=["qemu", "libvirt"])
def kind(request: pytest.FixtureRequest) -> str:
    """The provider the drill's VM runs on; libvirt's daemon started for it."""
    if request.param == "libvirt":
        request.getfixturevalue("libvirtd")
    return request.param


def test_a_drill_boots_checks_records_and_cleans_up_while_production_replicates(
    site: Site, image: dict[str, str], kind: str
) -> None:
    during: dict[str, float] = {}

    def production() -> None:
        """Once the drill's export is open: a write on the source, replicated."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not site.tgt.get("/v1/exports").json():
            time.sleep(0.2)
        during["opened"] = time.monotonic()
        site.write(1 << 20, b"HAVEN-DURING-DRILL")
        wait_caught_up(site.pair.source, site.pair.target, timeout=120)
        during["replicated"] = time.monotonic()
        during["exports"] = len(site.tgt.get("/v1/exports").json())

    writer = threading.Thread(target=production, daemon=True)
    writer.start()
    result = run_drill(site, image, PORT, timeout=180, kind=kind)
    ended = time.monotonic()
    writer.join(200)
    assert not result.get("failed"), json.dumps(result, indent=1)[-6000:]
    assert result["passed"] is True and result["failure"] is None
    assert result["rto_seconds"] > 0
    steps = [(s["step"], s["outcome"]) for s in result["timeline"]]
    for step in ("export", "network", "create", "power_on", "health_check"):
        assert (step, "ok") in steps, steps
    last_check = max(s["ended"] for s in result["timeline"] if s["step"] == "health_check")
    assert result["rto_seconds"] == pytest.approx(last_check, abs=1e-5)
    cp = site.checkpoint
    assert (
        result["checkpoint"]["app"]["id"] == cp["id"]
        and result["checkpoint"]["app"]["seq"] == cp["seq"]
    )
    assert 0 < result["rpo"]["app"]["seconds"] < 600
    assert result["cleaned_up"] is True
    assert result["verification"]["app"]["passed"] is True
    last = site.tgt.get("/v1/groups/app").json()["last_verified"]
    assert last["checkpoint"]["id"] == cp["id"] and last["plan"] == "db-drill"
    assert last["rto_seconds"] == pytest.approx(result["rto_seconds"])
    assert_nothing_left(site)
    # production went on: the write during the drill reached the replica while the export was open
    assert "replicated" in during, during
    assert during["exports"] >= 1 and during["replicated"] < ended
    assert site.replica_reads(1 << 20, 18) == b"HAVEN-DURING-DRILL"
    assert site.replica_reads(0, len(MARK)) == MARK


def test_a_check_that_never_passes_fails_in_time_names_it_and_cleans_up(
    site: Site, image: dict[str, str]
) -> None:
    started = time.monotonic()
    result = run_drill(site, image, PORT + 1, timeout=25)  # the guest listens on PORT only
    took = time.monotonic() - started
    assert result["failed"] is True and result["passed"] is False
    assert took < 25 + 90, took  # the check's timeout, plus boot, teardown and ansible
    failure = result["failure"]
    assert failure["server"] == "db1" and failure["step"] == "health_check"
    assert failure["check"].startswith("tcp 10.") and failure["check"].endswith(f":{PORT + 1}")
    assert "did not pass within its 25 s" in failure["output"]
    assert "refused" in failure["output"].lower() or "timed out" in failure["output"].lower()
    assert "db1" in result["msg"] and "tcp" in result["msg"]
    assert result["rto_seconds"] is None
    assert result["cleaned_up"] is True
    assert_nothing_left(site)
    assert result["verification"]["app"]["passed"] is False
    assert site.tgt.get("/v1/groups/app").json()["last_verified"] is None
