"""The protected_server role's hypervisor_mirror capture through a real
``ansible-playbook``: a tiny guest (tools/guest_image.py) runs under TCG on its
LOCAL qcow2 disk, its writer writing records and acknowledging them on the
console, while the role registers the disk's volume on a real source havend
and mirrors the running disk onto the source node's NBD export (QMP
``blockdev-mirror``, write-blocking, left READY). The target's replica then
equals the VM's local disk byte for byte; a second run changes nothing; a
source node restart pauses the mirror (not the VM) and the next run repairs
it; a wrong device fails naming the VM's disks and changes nothing; state
absent cancels the mirror and the VM goes on writing on its local disk."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import MiB, Pair, free_port, make_token, start_pair, wait_caught_up
from plays import ROOT, ansible, ansible_env
from waiting import wait_until

sys.path.insert(0, str(ROOT / "tools"))
import guest_image

DISK_SIZE = 64 * MiB
VOLUME = "vm1-vda"


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    return guest_image.build().as_dict()


def qmp(path: Path, command: str, **arguments: Any) -> Any:
    """One QMP command on a session of its own (the VM's socket serves one client)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        stream = sock.makefile("rb")
        assert "QMP" in json.loads(stream.readline())
        for name, args in (("qmp_capabilities", {}), (command, arguments)):
            msg: dict[str, Any] = {"execute": name}
            if args:
                msg["arguments"] = args
            sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = json.loads(stream.readline())
                if "event" not in reply:
                    break
            if "error" in reply:
                raise AssertionError(f"QMP {name}: {reply['error']}")
        return reply["return"]


class Vm:
    """A tiny guest whose writer writes to its local qcow2 disk (virtio ``vda``,
    drive ``drive0``), with a QMP socket; stopped (by its pid) on exit."""

    def __init__(self, tmp: Path, image: dict[str, str]) -> None:
        self.dir = tmp / "vm1"
        self.dir.mkdir()
        self.disk = self.dir / "vda.qcow2"
        self.qmp_path = self.dir / "qmp.sock"
        self.serial = self.dir / "serial.log"
        self.pidfile = self.dir / "qemu.pid"
        subprocess.run(
            # metadata preallocated: the guest's writes never change the qcow2's
            # metadata, so qemu-img reads it as the paused VM has it
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                str(self.disk),
                str(DISK_SIZE),
            ],
            check=True,
            timeout=60,
        )
        self.argv = [
            "qemu-system-x86_64",
            "-name",
            f"guest=hvmirror-{secrets.token_hex(3)}",
            "-machine",
            "q35,accel=tcg",  # KVM hangs on these machines
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            image["kernel"],
            "-initrd",
            image["initrd"],
            "-append",
            "console=ttyS0 panic=-1 quiet haven.name=vm1 haven.role=writer",
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile",
            str(self.pidfile),
            "-daemonize",
            "-drive",
            f"file={self.disk},format=qcow2,if=none,id=drive0,cache=writeback",
            "-device",
            "virtio-blk-pci,drive=drive0,id=vda",
        ]

    def start(self) -> Vm:
        subprocess.run(self.argv, check=True, timeout=120)
        self.pid = int(self.pidfile.read_text())
        return self

    def acks(self) -> list[int]:
        return guest_image.writer_acks(self.serial.read_text(errors="replace"))

    def wait_acks(self, more_than: int, why: str) -> int:
        return wait_until(
            lambda: max(self.acks(), default=0),
            300,
            why,
            until=lambda last: last > more_than,
            detail=lambda: self.serial.read_text(errors="replace")[-2000:],
            interval=0.2,
        )

    def status(self) -> str:
        return qmp(self.qmp_path, "query-status")["status"]

    def jobs(self) -> list[dict[str, Any]]:
        return qmp(self.qmp_path, "query-block-jobs")

    def nodes(self) -> list[str]:
        return [n["node-name"] for n in qmp(self.qmp_path, "query-named-block-nodes")]

    def local_disk(self, out: Path) -> bytes:
        """What the guest sees of its disk (the qcow2 read as raw, shared with the running VM)."""
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(self.disk), str(out)],
            check=True,
            timeout=120,
        )
        return out.read_bytes()

    def stop(self) -> None:
        pid = getattr(self, "pid", None)
        if pid is None:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return
        if str(self.qmp_path).encode() not in cmdline:  # not ours any more
            return
        with contextlib.suppress(OSError, AssertionError, json.JSONDecodeError):
            qmp(self.qmp_path, "quit")
        try:
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "qemu to quit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)


class Site:
    """The source and target havend (the source's API and NBD port fixed,
    so that it comes back where QEMU and the plays look), group ``app`` made
    through the API, the collection linked in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pair: Pair = start_pair(tmp, [], api="source", nbd_port=free_port())
        self.token = make_token(self.pair.source, "mirror-admin", "admin")
        made = self.api().post(
            "/v1/groups",
            json={
                "name": "app",
                "journal": {"segment_size": MiB, "max_segments": 256},
                "volumes": [{"name": "other", "path": "other.img", "size": MiB, "server": "other"}],
            },
        )
        assert made.status_code == 201, made.text
        wait_caught_up(self.pair.source, self.pair.target, timeout=120)
        collections = tmp / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(ROOT)

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.pair.source.address("api"),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def volumes(self, server: str) -> list[dict[str, Any]]:
        with self.api() as api:
            got = api.get("/v1/volumes", params={"server": server})
            assert got.status_code == 200, got.text
            return got.json()

    def replica(self) -> Path:
        return self.pair.target.state_dir / "rep" / "app" / f"{VOLUME}.img"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.pair.stop()


@pytest.fixture
def vm(tmp_path: Path, image: dict[str, str]) -> Iterator[Vm]:
    vm = Vm(tmp_path, image)
    try:
        yield vm.start()
    finally:
        vm.stop()


def play(site: Site, vm: Vm, *flags: str, **overrides: Any) -> subprocess.CompletedProcess[str]:
    """The role on localhost (the hypervisor and the API host both), with
    ``overrides`` of its options and ``flags`` for ansible-playbook; the
    registered results written to a file."""
    role_vars = {
        "protected_server_name": "vm1",
        "protected_server_capture": "hypervisor_mirror",
        "protected_server_group": "app",
        "protected_server_disks": [{"name": VOLUME, "path": f"{VOLUME}.img", "device": "vda"}],
        "protected_server_url": site.pair.source.address("api"),
        "protected_server_token": site.token,
        "protected_server_wait_timeout": 600,
        "protected_server_mirror_host": "localhost",
        "protected_server_mirror_qmp_socket": str(vm.qmp_path),
        "protected_server_mirror_wait_timeout": 600,
        "protected_server_mirror_qmp_timeout": 60,
    } | overrides
    out = site.tmp / "results.json"
    out.unlink(missing_ok=True)
    playbook = [
        {
            "name": "vm1 captured by its hypervisor's mirror",
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {
                    "name": "The role",
                    "ansible.builtin.include_role": {"name": "haven.dr.protected_server"},
                    "vars": role_vars,
                },
                {
                    "name": "What it returned",
                    "ansible.builtin.copy": {
                        "dest": str(out),
                        "content": "{{ {'mirrors': protected_server_mirrors | default({}),"
                        " 'exports': protected_server_exports | default({}),"
                        " 'result': protected_server_mirror_result | default({})} | to_json }}",
                        "mode": "0600",
                    },
                    "changed_when": False,
                    "check_mode": False,  # written in check mode too
                },
            ],
        }
    ]
    path = site.tmp / "play.yml"
    path.write_text(json.dumps(playbook))
    return ansible(
        site.tmp,
        "ansible-playbook",
        "-v",
        *flags,
        str(path),
        env=ansible_env(site.tmp),
        timeout=1500,
    )


def results(site: Site) -> dict[str, Any]:
    return json.loads((site.tmp / "results.json").read_text())


def recap(run: subprocess.CompletedProcess[str]) -> str:
    return [line for line in run.stdout.splitlines() if line.startswith("localhost")][-1]


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return recap(run)


def test_a_running_vms_disk_is_mirrored_onto_the_source_export_and_replicated(
    site: Site, vm: Vm, tmp_path: Path
) -> None:
    vm.wait_acks(5, "the guest's writer to acknowledge records on its local disk")

    # Check mode: what would be done, nothing done.
    checked = play(site, vm, "--check")
    assert "changed=0" not in ok(checked)
    assert results(site)["mirrors"][VOLUME]["action"] == "started"
    assert vm.jobs() == [] and site.volumes("vm1") == []

    # The role: the volume registered as big as the VM's disk, the mirror READY.
    first = play(site, vm)
    assert "changed=0" not in ok(first)
    mirror = results(site)["mirrors"][VOLUME]
    assert mirror["action"] == "started" and mirror["disk"]["virtual_size"] == DISK_SIZE
    assert mirror["mirror"]["status"] == "ready" and mirror["mirror"]["io_status"] == "ok"
    assert mirror["mirror"]["export"].endswith(f"/{VOLUME}")
    assert mirror["progress_lines"] and "ready" in mirror["progress_lines"][-1]
    [volume] = site.volumes("vm1")
    assert volume["name"] == VOLUME and volume["size"] == DISK_SIZE
    assert [j["device"] for j in vm.jobs()] == ["haven-mirror-vda"]
    assert vm.status() == "running"

    # The guest goes on writing; a second run changes nothing.
    vm.wait_acks(max(vm.acks()) + 5, "more records written while mirrored")
    again = play(site, vm)
    assert "changed=0" in ok(again), again.stdout[-4000:]
    assert results(site)["mirrors"][VOLUME]["action"] == "none"

    # The source node restarts: the mirror pauses on the export's error, the VM
    # does not (its writer goes on, on its local disk); the next run repairs it.
    site.pair.source.stop()
    paused = wait_until(
        vm.jobs,
        300,
        "the mirror to pause on the lost export",
        until=lambda jobs: jobs and jobs[0]["io-status"] != "ok",
        interval=0.5,
    )
    assert paused[0]["status"] in ("standby", "paused"), paused
    assert vm.status() == "running"
    vm.wait_acks(max(vm.acks()) + 5, "records written while the source node is down")
    site.pair.source.start()
    repaired = play(site, vm)
    assert "changed=0" not in ok(repaired)
    mirror = results(site)["mirrors"][VOLUME]
    assert mirror["action"] in ("resumed", "restarted") and mirror["mirror"]["status"] == "ready"
    print(f"repaired by: {mirror['action']}; {mirror['progress_lines']}")
    assert mirror["mirror"]["io_status"] == "ok"
    vm.wait_acks(max(vm.acks()) + 5, "records written after the repair")

    # The writer stopped (the VM paused: every write it saw complete is on the
    # export), replication caught up: the target's replica is the VM's local disk.
    qmp(vm.qmp_path, "stop")
    last_ack = max(vm.acks())
    wait_caught_up(site.pair.source, site.pair.target, timeout=300)
    local = vm.local_disk(tmp_path / "local.raw")
    replica = site.replica().read_bytes()
    assert len(replica) == len(local) == DISK_SIZE
    assert replica == local, "the target's replica differs from the VM's local disk"
    records = guest_image.writer_records(replica)
    assert max(records.values()) >= last_ack > 15
    qmp(vm.qmp_path, "cont")
    vm.wait_acks(last_ack + 2, "the writer to go on once the VM runs again")

    # A wrong device: the VM's disks named, nothing changed (no volume, same job).
    jobs_before = [(j["device"], j["status"]) for j in vm.jobs()]
    wrong = play(
        site,
        vm,
        protected_server_disks=[
            {"name": VOLUME, "path": f"{VOLUME}.img", "device": "vda"},
            {"name": "vm1-vdz", "path": "vm1-vdz.img", "device": "vdz"},
        ],
    )
    assert wrong.returncode != 0
    assert "device vdz is not a disk of this VM; its disks: vda (drive drive0" in wrong.stdout
    assert [v["name"] for v in site.volumes("vm1")] == [VOLUME]
    assert [(j["device"], j["status"]) for j in vm.jobs()] == jobs_before

    # state absent: the mirror cancelled, the volume unregistered; the VM goes
    # on running and writing on its local disk, the export no longer follows it.
    gone = play(site, vm, protected_server_state="absent")
    assert "changed=0" not in ok(gone)
    assert results(site)["mirrors"][VOLUME]["action"] == "cancelled"
    assert vm.jobs() == [] and not [n for n in vm.nodes() if n.startswith("haven-")]
    assert site.volumes("vm1") == []
    assert vm.status() == "running"
    after = max(vm.acks())
    vm.wait_acks(after + 5, "the writer to go on on its local disk once the mirror is gone")
    time.sleep(1)
    local = vm.local_disk(tmp_path / "local-after.raw")
    assert max(guest_image.writer_records(local).values()) > after
    assert "changed=0" in ok(play(site, vm, protected_server_state="absent"))
