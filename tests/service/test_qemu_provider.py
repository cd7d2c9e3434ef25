"""The qemu provider with real VMs: tiny guests (tools/guest_image.py) under TCG,
their disks NBD exports (a havend target node's point-in-time view,
``havend nbd-serve``), their NICs on bridges in network namespaces."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_havend
from nodes import MiB, app_group, make_token, start_pair, subnet, wait_caught_up
from waiting import wait_until

from havend.nbd.client import NBDClient

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import guest_image  # noqa: E402


def _collection_on_path() -> None:
    """The collection importable as ansible_collections.haven.dr (a link to this
    checkout: one per checkout, so that two worktrees never import each other's)."""
    checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"haven-collection-{os.getuid()}-{checkout}"
    link = base / "ansible_collections" / "haven" / "dr"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another test process made it
            link.symlink_to(ROOT)
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))


_collection_on_path()
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._base import (  # noqa: E402
    ProviderError,
    ProviderTimeout,
)
from ansible_collections.haven.dr.plugins.module_utils.providers.qemu import (  # noqa: E402
    QemuProvider,
    netns_exists,
    netns_name,
    tap_name,
    veth_name,
)

BOOT = 60  # a tiny guest reaches its role in ~5 s under TCG; far more on a loaded machine


@pytest.fixture(scope="session")
def image() -> dict[str, str]:
    return guest_image.build().as_dict()


@pytest.fixture
def provider(tmp_path: Path, image: dict[str, str]) -> Iterator[QemuProvider]:
    """A provider of its own state dir; whatever a test leaves is destroyed,
    also after a failure (VMs first, then the networks they used)."""
    prov = get_provider("qemu", state_dir=str(tmp_path / "qemu"), image=image)
    try:
        yield prov
    finally:
        for name in prov.list(10):
            prov.destroy(name, 30)
        networks = tmp_path / "qemu" / "networks"
        for spec in networks.glob("*.json") if networks.exists() else []:
            prov.destroy_network(spec.stem, 10)


def net_name() -> str:
    return "t" + secrets.token_hex(4)


def in_netns(network: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns_name(network), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tcp_answer(network: str, host: str, port: int, wait: int = 3) -> str:
    """What a TCP service in ``network`` says (from inside the network), '' if nothing."""
    out = in_netns(network, "busybox", "nc", "-w", str(wait), host, str(port))
    return out.stdout if out.returncode == 0 else ""


def ping(network: str | None, host: str) -> bool:
    argv = ["busybox", "ping", "-c", "1", "-W", "2", host]
    if network is None:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    return in_netns(network, *argv).returncode == 0


def wait_console(prov: QemuProvider, name: str, text: str, timeout: float = BOOT) -> str:
    return wait_until(
        lambda: text in prov.serial_log(name) and prov.serial_log(name),
        timeout,
        f"{name} to print {text!r} on its console",
        detail=lambda: f"console of {name}:\n{prov.serial_log(name)[-3000:]}",
        interval=0.2,
    )


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def target_view(tmp_path: Path) -> Iterator[str]:
    """A real pair (source replicating to a target); a marker written through
    the source's NBD export; a checkpoint; the target's writable
    point-in-time view of it: its NBD URI. Stopped after the test."""
    pair = start_pair(tmp_path, [app_group(tmp_path, {"db": 4 * MiB})], api=True, caught_up=60)
    try:
        nbd = int(pair.source.address("nbd").rsplit(":", 1)[1])
        client = NBDClient.tcp("127.0.0.1", nbd, "db")
        client.write(0, b"HAVEN-MARK-db1".ljust(512, b"\0"))
        client.flush()
        client.close()
        headers = {
            node: {"Authorization": "Bearer " + make_token(proc, f"qemu-{node}", "operate")}
            for node, proc in (("source", pair.source), ("target", pair.target))
        }
        with httpx.Client(
            base_url=pair.source.address("api"), headers=headers["source"], timeout=30
        ) as src:
            cp = src.post("/v1/groups/app/checkpoints", json={"label": "drill"})
            assert cp.status_code == 201, cp.text
        wait_caught_up(pair.source, pair.target)
        with httpx.Client(
            base_url=pair.target.address("api"), headers=headers["target"], timeout=30
        ) as tgt:
            view = tgt.post(
                "/v1/exports",
                json={
                    "group": "app",
                    "volume": "db",
                    "checkpoint": cp.json()["id"],
                    "writable": True,
                },
            )
            assert view.status_code == 201, view.text
            yield view.json()["uri"]
    finally:
        pair.stop()


def test_a_vm_boots_from_a_target_view_serves_tcp_pauses_and_goes_away(
    provider: QemuProvider, target_view: str, tmp_path: Path
) -> None:
    net, sub = net_name(), subnet()
    assert provider.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    assert not provider.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    server = {"name": "db1", "role": "tcp:5432", "nics": [{"network": net, "ip": f"{sub}.2/24"}]}
    assert provider.create(server, [target_view], 10)
    assert not provider.create(server, [target_view], 10)  # the same again: no change
    assert provider.status("db1", 10)["state"] == "stopped"

    started = time.monotonic()
    assert provider.power_on("db1", BOOT)
    console = wait_console(provider, "db1", "haven: up")
    assert "haven: vda HAVEN-MARK-db1" in console  # it sees the replicated disk
    assert tcp_answer(net, f"{sub}.2", 5432) == "haven db1 tcp\n"
    assert time.monotonic() - started < BOOT
    assert not provider.power_on("db1", 10)
    status = provider.status("db1", 10)
    assert status["state"] == "running" and status["qemu_status"] == "running"
    assert status["disks"] == [{"uri": target_view, "readonly": False}]
    pid, tap = status["pid"], tap_name("db1", 0)
    assert tap in in_netns(net, "ip", "link").stdout

    # another process (a retry) finds it through the state dir alone
    again = QemuProvider(str(tmp_path / "qemu"))
    assert again.status("db1", 10)["state"] == "running"

    assert provider.pause("db1", 10)
    assert not provider.pause("db1", 10)
    assert provider.status("db1", 10)["state"] == "paused"
    assert tcp_answer(net, f"{sub}.2", 5432, wait=2) == ""  # frozen CPUs answer nothing
    assert again.resume("db1", 10)
    assert not again.resume("db1", 10)
    assert provider.status("db1", 10)["state"] == "running"
    assert (
        wait_until(
            lambda: tcp_answer(net, f"{sub}.2", 5432), 30, "db1 to answer again after resume"
        )
        == "haven db1 tcp\n"
    )

    assert provider.power_off("db1", 60)
    assert "haven: power button" in provider.serial_log("db1")  # a clean, ACPI shutdown
    assert not provider.power_off("db1", 10)
    assert provider.status("db1", 10)["state"] == "stopped"
    assert process_gone(pid)
    assert tap not in in_netns(net, "ip", "link").stdout

    assert provider.destroy("db1", 30)
    assert not provider.destroy("db1", 30)
    assert provider.status("db1", 10)["state"] == "absent"
    assert not Path(provider.vm_dir("db1")).exists()
    assert provider.destroy_network(net, 10)
    assert not provider.destroy_network(net, 10)
    assert not netns_exists(net)


def test_destroy_of_a_running_vm_leaves_no_process_tap_or_netns(provider: QemuProvider) -> None:
    net, sub = net_name(), subnet()
    provider.create_network({"name": net, "cidr": f"{sub}.0/24"}, 10)
    provider.create(
        {
            "name": "web1",
            "role": "http:80:hello%20drill",
            "nics": [{"network": net, "ip": f"{sub}.3/24"}],
        },
        [],
        10,
    )
    provider.power_on("web1", BOOT)
    wait_console(provider, "web1", "haven: up")
    fetch = (
        "import urllib.request, sys; "
        f"sys.stdout.write(urllib.request.urlopen('http://{sub}.3/', timeout=10).read().decode())"
    )
    page = in_netns(net, sys.executable, "-c", fetch)
    assert page.stdout == "hello drill", page
    pid = provider.status("web1", 10)["pid"]
    assert provider.destroy("web1", 30)
    assert process_gone(pid)
    assert tap_name("web1", 0) not in in_netns(net, "ip", "link").stdout
    assert provider.destroy_network(net, 10)
    assert (
        netns_name(net)
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def test_the_writer_role_stamps_its_disk_and_syncs(provider: QemuProvider, tmp_path: Path) -> None:
    disk = tmp_path / "writer.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    server = start_havend(disk, name="w")
    try:
        provider.create({"name": "w1", "role": "writer+tcp:7001"}, [server.uri], 10)
        provider.power_on("w1", BOOT)
        wait_console(provider, "w1", "haven: up")

        def records() -> list[int]:
            data = disk.read_bytes()[: 2048 * 512]
            return [
                int(data[i : i + 512].split()[1])
                for i in range(0, len(data), 512)
                if data[i : i + 10] == b"haven-seq "
            ]

        wait_until(lambda: len(records()) >= 5, 30, "w1 to write 5 records")
        assert provider.power_off("w1", 60)
        seqs = sorted(records())
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] <= 2, seqs
        assert b" w1\n" in disk.read_bytes()[512:1024]
        # every acknowledged record is on the disk: the last one too
        log = Path(provider.status("w1", 10)["serial_log"]).read_text(errors="replace")
        acks = guest_image.writer_acks(log)
        assert acks and acks == list(range(acks[0], acks[0] + len(acks))), acks
        assert acks[-1] in seqs
        assert "unknown role" not in log and "role=writer+tcp:7001" in log
    finally:
        server.stop()


class _Listener:
    """A TCP server on the host (production) side: accepts and says ok."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"production\n")

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


def test_a_second_run_with_the_same_network_is_refused_and_touches_nothing_of_the_first(
    provider: QemuProvider, tmp_path: Path, image: dict[str, str]
) -> None:
    # two drills of one plan at once (a scheduled one and a manual one), each with its own
    # state_dir: the second is refused at its network, and its cleanup (destroy of its VMs
    # and networks, the same names) leaves the first's VM serving on its network
    net, sub = net_name(), subnet()
    web = {
        "name": "web1",
        "role": "http:80:first%20run",
        "nics": [{"network": net, "ip": f"{sub}.3/24"}],
    }
    provider.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    provider.create(web, [], 10)
    provider.power_on("web1", BOOT)
    wait_console(provider, "web1", "haven: up")
    second = get_provider("qemu", state_dir=str(tmp_path / "second"), image=image)
    with pytest.raises(
        ProviderError, match=rf"network '{net}': create_network: in use by another run"
    ) as refused:
        second.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    assert provider.state_dir in str(refused.value)  # where the other run is
    second.create(web, [], 10)  # its VM of the same name, on a network it could not make
    with pytest.raises(ProviderError, match=rf"vm 'web1': power_on: network '{net}' is another"):
        second.power_on("web1", 10)
    assert second.destroy("web1", 30)
    assert not second.destroy_network(net, 10)  # nothing of its own to destroy
    fetch = (
        "import urllib.request, sys; "
        f"sys.stdout.write(urllib.request.urlopen('http://{sub}.3/', timeout=10).read().decode())"
    )
    assert tap_name("web1", 0) in in_netns(net, "ip", "link").stdout
    page = in_netns(net, sys.executable, "-c", fetch)
    assert page.stdout == "first run", page
    assert provider.status("web1", 10)["state"] == "running"
    # the first run ends: the name is free for the second
    assert provider.destroy("web1", 30)
    assert provider.destroy_network(net, 10)
    assert second.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    assert second.destroy_network(net, 10)


def test_a_network_left_by_a_run_that_is_gone_is_taken_over(
    provider: QemuProvider, tmp_path: Path, image: dict[str, str]
) -> None:
    net, sub = net_name(), subnet()
    gone = get_provider("qemu", state_dir=str(tmp_path / "gone"), image=image)
    gone.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    shutil.rmtree(tmp_path / "gone")  # its state_dir removed, the namespace left
    assert provider.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": True}, 10)
    assert provider.network(net)["name"] == net
    assert provider.destroy_network(net, 10)
    assert not os.path.exists(f"/run/netns/{netns_name(net)}")


def test_the_isolated_drill_network_cannot_reach_production(provider: QemuProvider) -> None:
    prod, drill = net_name(), net_name()
    psub, dsub = subnet(), subnet()
    while dsub == psub:
        dsub = subnet()
    provider.create_network({"name": prod, "cidr": f"{psub}.0/24", "isolated": False}, 10)
    provider.create_network({"name": drill, "cidr": f"{dsub}.0/24", "isolated": True}, 10)
    gateway = f"{psub}.1"  # production's address on the host side
    listener = _Listener(gateway)
    try:
        # production reaches the host side: ping and TCP
        assert ping(prod, gateway)
        assert tcp_answer(prod, gateway, listener.port) == "production\n"
        # the drill network does not: no route, no link, nothing
        assert not ping(drill, gateway)
        assert tcp_answer(drill, gateway, listener.port) == ""
        assert not ping(drill, f"{psub}.254")  # production's own address in its namespace
        assert in_netns(drill, "ip", "route").stdout.split("\n")[0].startswith(f"{dsub}.0/24")
        assert "default" not in in_netns(drill, "ip", "route").stdout
        links = in_netns(drill, "ip", "-o", "link").stdout
        assert "veth" not in links and "uplink" not in links, links
        # nor does the host reach into it
        assert not ping(None, f"{dsub}.254")
        assert os.path.exists(f"/sys/class/net/{veth_name(prod)}")
        assert not os.path.exists(f"/sys/class/net/{veth_name(drill)}")
    finally:
        listener.close()
    assert provider.destroy_network(prod, 10)
    assert not os.path.exists(f"/sys/class/net/{veth_name(prod)}")


def test_errors_name_the_vm_and_what_timed_out(provider: QemuProvider, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="vm 'nope': power_on: no such VM"):
        provider.power_on("nope", 5)
    assert provider.status("nope", 5)["state"] == "absent"
    assert provider.status({"name": "nope"}, 5)["state"] == "absent"  # a server works as a name
    with pytest.raises(ProviderError, match=r"vm '\.\./x': find: names are"):
        provider.destroy("../x", 5)
    assert not provider.destroy("nope", 5)
    with pytest.raises(ProviderError, match="vm 'bad': create: disk '/dev/sda' is not an NBD URI"):
        provider.create({"name": "bad"}, ["/dev/sda"], 5)
    with pytest.raises(ProviderError, match="network 'missing' does not exist"):
        provider.create({"name": "lost", "nics": ["missing"]}, [], 5)
        provider.power_on("lost", 5)
    slow = tmp_path / "slow-qemu"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    stuck = QemuProvider(provider.state_dir, image=provider.image, qemu=str(slow))
    stuck.create({"name": "stuck"}, [], 5)
    started = time.monotonic()
    with pytest.raises(
        ProviderTimeout, match="vm 'stuck': power_on: QEMU did not start within 1 s"
    ):
        stuck.power_on("stuck", 1)
    assert time.monotonic() - started < 5
    assert stuck.status("stuck", 5)["state"] == "stopped"


def test_a_disk_whose_nbd_server_never_answers_times_out_power_on_naming_it(
    provider: QemuProvider,
) -> None:
    # a server that takes the connection and never says a word: QEMU (the real one) waits
    # in the NBD handshake before it daemonizes; power_on gives up at its deadline, naming
    # the disk, and leaves nothing running
    silent = socket.create_server(("127.0.0.1", 0))
    uri = f"nbd://127.0.0.1:{silent.getsockname()[1]}/mute"
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(silent.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        provider.create({"name": "mute"}, [uri], 5)
        started = time.monotonic()
        with pytest.raises(ProviderTimeout) as caught:
            provider.power_on("mute", 8)
        assert time.monotonic() - started < 8 + 12  # its deadline, then the kill's (10 s)
        assert "vm 'mute': power_on: QEMU did not start within 8 s" in str(caught.value)
        assert f"its disks: {uri}" in str(caught.value), str(caught.value)
        assert held, "QEMU never connected to the disk's server"
        assert provider.status("mute", 5)["state"] == "stopped"
        assert provider.pid("mute") is None
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        silent.close()
