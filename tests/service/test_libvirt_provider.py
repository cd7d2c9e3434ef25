"""The libvirt provider with real VMs: Debian's libvirtd (``qemu:///system``),
TCG domains booting the tiny guest (tools/guest_image.py) from a havend
target node's point-in-time view, libvirt networks (an isolated one has no
forward and no host address), health checks from the network's namespace.

libvirtd is started here when it does not answer (CI containers have no
systemd) and stopped again at the end; a missing libvirt fails, never skips.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool, start_havend
from nodes import MiB, subnet
from test_qemu_provider import (  # the same fixtures and helpers as the qemu provider's
    BOOT,
    _Listener,
    net_name,
    process_gone,
    target_view,
)
from waiting import wait_until

__all__ = ["target_view"]  # a fixture, used by name

# importable once test_qemu_provider linked the collection (ansible_collections.haven.dr)
from ansible_collections.haven.dr.plugins.module_utils.providers import (
    get_provider,
)
from ansible_collections.haven.dr.plugins.module_utils.providers import (
    libvirt as libvirt_provider,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._base import (
    ProviderError,
    ProviderTimeout,
)
from ansible_collections.haven.dr.plugins.module_utils.providers.libvirt import (
    LibvirtProvider,
)

URI = "qemu:///system"
SOCKET = "/run/libvirt/libvirt-sock"
DAEMONS = ("virtlogd", "libvirtd")  # virtlogd takes QEMU's own output


def _answers() -> bool:
    """Does libvirtd accept connections on its system socket?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(SOCKET)
        except OSError:
            return False
    return True


def _daemon_pid(daemon: str) -> int | None:
    try:
        pid = int(Path(f"/run/{daemon}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if process_gone(pid) else pid


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd answering on qemu:///system: systemd's if it runs, else
    ``virtlogd -d`` and ``libvirtd -d`` started here and stopped at the end."""
    if libvirt_provider.libvirt_module is None:
        pytest.fail("libvirt-python is missing: run `make setup` (it installs python3-libvirt)")
    for daemon in DAEMONS:
        require_tool(daemon)
    started: list[int] = []
    if not _answers():
        systemd = subprocess.run(
            ["systemctl", "is-system-running"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if systemd in ("running", "degraded"):
            subprocess.run(
                ["systemctl", "start", "virtlogd.socket", "libvirtd.socket"], check=True, timeout=60
            )
        else:
            for daemon in DAEMONS:
                if _daemon_pid(daemon) is None:
                    subprocess.run([daemon, "-d"], check=True, timeout=30)
                    pid = wait_until(lambda d=daemon: _daemon_pid(d), 30, f"{daemon} to start")
                    started.append(pid)
        wait_until(_answers, 60, "libvirtd to answer on " + SOCKET)
    try:
        yield
    finally:
        for pid in reversed(started):  # only what this fixture started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda p=pid: process_gone(p), 30, f"pid {pid} to stop")
            except Exception:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def image() -> dict[str, str]:
    import guest_image  # tools/ is on sys.path (test_qemu_provider)

    return guest_image.build().as_dict()


def drill_provider(plan: dict[str, Any], state_dir: str, image: dict[str, str]) -> Any:
    """How a drill-like caller builds its provider: by the plan's ``provider``
    key (and its options) through get_provider, a state dir of its own."""
    kind = plan.get("provider", "qemu")
    options = dict(plan.get("provider_options") or {})
    return get_provider(kind, state_dir=state_dir, image=image, **options)


def cleanup(prov: LibvirtProvider) -> None:
    """Every VM, then every network, of ``prov``'s state dir (and of its prefix in libvirt)."""
    for name in prov.list(30):
        prov.destroy(name, 60)
    networks = Path(prov.state_dir) / "networks"
    names = {spec.stem for spec in networks.glob("*.json")} if networks.exists() else set()
    conn = prov._connection(libvirt_provider.Deadline(30), "cleanup", "cleanup")
    for net in conn.listAllNetworks():
        if net.name().startswith(prov.prefix):
            names.add(net.name()[len(prov.prefix) :])
    for name in names:
        prov.destroy_network(name, 30)


@pytest.fixture
def provider(libvirtd: None, tmp_path: Path, image: dict[str, str]) -> Iterator[LibvirtProvider]:
    """A provider of its own state dir; whatever a test leaves is destroyed,
    also after a failure (VMs first, then the networks they used)."""
    prov = drill_provider(
        {"provider": "libvirt", "provider_options": {"uri": URI}}, str(tmp_path / "libvirt"), image
    )
    assert isinstance(prov, LibvirtProvider)
    try:
        yield prov
    finally:
        cleanup(prov)


def run_in(prov: LibvirtProvider, network: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        prov.network_command(network, argv), capture_output=True, text=True, timeout=20
    )


def tcp_answer(prov: LibvirtProvider, network: str | None, host: str, port: int) -> str:
    """What a TCP service says, from inside ``network`` (None: the host); '' if nothing."""
    argv = ["busybox", "nc", "-w", "3", host, str(port)]
    if network is None:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    else:
        out = run_in(prov, network, *argv)
    return out.stdout if out.returncode == 0 else ""


def ping(prov: LibvirtProvider, network: str | None, host: str) -> bool:
    argv = ["busybox", "ping", "-c", "1", "-W", "2", host]
    if network is None:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    return run_in(prov, network, *argv).returncode == 0


def wait_console(prov: LibvirtProvider, name: str, text: str, timeout: float = BOOT) -> str:
    return wait_until(
        lambda: text in prov.serial_log(name) and prov.serial_log(name),
        timeout,
        f"{name} to print {text!r} on its console",
        detail=lambda: f"console of {name}:\n{prov.serial_log(name)[-3000:]}",
        interval=0.2,
    )


def virsh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", URI, *argv], capture_output=True, text=True, timeout=30, check=False
    )


def test_a_domain_boots_from_a_target_view_serves_tcp_pauses_and_goes_away(
    provider: LibvirtProvider, target_view: str, tmp_path: Path, image: dict[str, str]
) -> None:
    net, sub = net_name(), subnet()
    drill = {"name": net, "cidr": f"{sub}.0/24", "isolated": True}
    assert provider.create_network(drill, 30)
    assert not provider.create_network(drill, 30)
    server = {"name": "db1", "role": "tcp:5432", "nics": [{"network": net, "ip": f"{sub}.2/24"}]}
    assert provider.create(server, [target_view], 30)
    assert not provider.create(server, [target_view], 30)  # the same again: no change
    assert provider.status("db1", 10)["state"] == "stopped"
    domain = provider.domain_name("db1")
    xml = virsh("dumpxml", domain).stdout
    assert "<domain type='qemu'" in xml and "protocol='nbd'" in xml, xml

    started = time.monotonic()
    assert provider.power_on("db1", BOOT)
    console = wait_console(provider, "db1", "haven: up")
    assert "haven: vda HAVEN-MARK-db1" in console  # it sees the replicated disk
    assert "role=tcp:5432" in console
    assert tcp_answer(provider, net, f"{sub}.2", 5432) == "haven db1 tcp\n"
    assert tcp_answer(provider, None, f"{sub}.2", 5432) == ""  # the host does not reach it
    assert time.monotonic() - started < BOOT
    assert not provider.power_on("db1", 10)
    status = provider.status("db1", 10)
    assert status["state"] == "running" and status["qemu_status"] == "running"
    assert status["disks"] == [{"uri": target_view, "readonly": False}]
    assert status["domain"] == domain and status["serial_log"].startswith(provider.state_dir)
    pid = status["pid"]
    assert pid and not process_gone(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[cmdline.index("-accel") + 1] == "tcg", cmdline  # TCG, never KVM

    # another provider object (a retry) finds it through the state dir alone
    again = LibvirtProvider(provider.state_dir, uri=URI)
    assert again.status("db1", 10)["state"] == "running"
    assert again.list(10) == ["db1"]

    assert provider.pause("db1", 10)
    assert not provider.pause("db1", 10)
    assert provider.status("db1", 10)["state"] == "paused"
    assert "paused" in virsh("domstate", domain).stdout
    assert tcp_answer(provider, net, f"{sub}.2", 5432) == ""  # frozen CPUs answer nothing
    assert again.resume("db1", 10)
    assert not again.resume("db1", 10)
    assert provider.status("db1", 10)["state"] == "running"
    assert (
        wait_until(
            lambda: tcp_answer(provider, net, f"{sub}.2", 5432),
            30,
            "db1 to answer again after resume",
        )
        == "haven db1 tcp\n"
    )

    assert provider.power_off("db1", 60)
    assert "haven: power button" in provider.serial_log("db1")  # a clean, ACPI shutdown
    assert Path(provider.vm_dir("db1"), "last_stop.json").read_text().count('"clean": true')
    assert not provider.power_off("db1", 10)
    assert provider.status("db1", 10)["state"] == "stopped"
    assert process_gone(pid)

    assert provider.destroy("db1", 30)
    assert not provider.destroy("db1", 30)
    assert provider.status("db1", 10)["state"] == "absent"
    assert not Path(provider.vm_dir("db1")).exists()
    assert domain not in virsh("list", "--all", "--name").stdout
    assert provider.destroy_network(net, 30)
    assert not provider.destroy_network(net, 30)
    assert provider.network_name(net) not in virsh("net-list", "--all", "--name").stdout
    assert not os.path.exists("/run/netns/" + provider.network_name(net))
    assert not os.path.exists("/sys/class/net/" + provider.bridge_name(net))
    assert provider.list(10) == []


def test_destroy_of_a_running_domain_and_the_writer_role(
    provider: LibvirtProvider, tmp_path: Path
) -> None:
    disk = tmp_path / "writer.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    server = start_havend(disk, name="w", unix=str(tmp_path / "w.sock"))  # nbd+unix://
    try:
        assert server.uri.startswith("nbd+unix://"), server.uri
        provider.create({"name": "w1", "role": "writer"}, [server.uri], 30)
        provider.power_on("w1", BOOT)
        wait_console(provider, "w1", "haven: ack 3")
        assert b"haven-seq " in disk.read_bytes()[512 : 4 * 512]  # written through NBD
        pid = provider.status("w1", 10)["pid"]
        assert provider.destroy("w1", 60)  # running: stopped hard, undefined
        assert process_gone(pid)
        assert provider.domain_name("w1") not in virsh("list", "--all", "--name").stdout
        assert provider.list(10) == []
    finally:
        server.stop()


def test_the_isolated_drill_network_cannot_reach_production(provider: LibvirtProvider) -> None:
    prod, drill = net_name(), net_name()
    psub, dsub = subnet(), subnet()
    while dsub == psub:
        dsub = subnet()
    provider.create_network({"name": prod, "cidr": f"{psub}.0/24", "isolated": False}, 30)
    provider.create_network({"name": drill, "cidr": f"{dsub}.0/24", "isolated": True}, 30)
    gateway = f"{psub}.1"  # production's address on the host side (its bridge)
    listener = _Listener(gateway)
    try:
        # production reaches the host side: ping and TCP
        assert ping(provider, prod, gateway)
        assert tcp_answer(provider, prod, gateway, listener.port) == "production\n"
        # the drill network does not: no route, no host address on its bridge, nothing
        assert not ping(provider, drill, gateway)
        assert tcp_answer(provider, drill, gateway, listener.port) == ""
        assert not ping(provider, drill, f"{psub}.254")  # production's own probe address
        routes = run_in(provider, drill, "ip", "route").stdout
        assert routes.startswith(f"{dsub}.0/24") and "default" not in routes, routes
        bridge = provider.bridge_name(drill)
        addrs = subprocess.run(
            ["ip", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True, check=True
        ).stdout
        assert "inet" not in addrs, addrs  # the host has no address on it
        xml = virsh("net-dumpxml", provider.network_name(drill)).stdout
        assert "<forward" not in xml and "<ip" not in xml, xml
        assert "<forward mode='nat'" in virsh("net-dumpxml", provider.network_name(prod)).stdout
        # nor does the host reach into it
        assert not ping(provider, None, f"{dsub}.254")
    finally:
        listener.close()
    assert provider.destroy_network(prod, 30)
    assert not os.path.exists("/sys/class/net/" + provider.bridge_name(prod))


def test_errors_and_timeouts_name_the_vm(
    provider: LibvirtProvider, tmp_path: Path, image: dict[str, str], monkeypatch: Any
) -> None:
    with pytest.raises(ProviderError, match="vm 'nope': power_on: no such VM"):
        provider.power_on("nope", 5)
    assert provider.status("nope", 5)["state"] == "absent"
    assert provider.status({"name": "nope"}, 5)["state"] == "absent"  # a server works as a name
    with pytest.raises(ProviderError, match=r"vm '\.\./x': find: names are"):
        provider.destroy("../x", 5)
    assert not provider.destroy("nope", 5)
    assert not provider.destroy_network("nope", 5)
    with pytest.raises(ProviderError, match="vm 'bad': create: disk '/dev/sda' is not an NBD URI"):
        provider.create({"name": "bad"}, ["/dev/sda"], 5)
    with pytest.raises(
        ProviderError, match="vm 'lost': power_on: network 'missing' does not exist"
    ):
        provider.create({"name": "lost", "nics": ["missing"]}, [], 5)
        provider.power_on("lost", 5)
    # a changed spec of a stopped VM replaces it
    assert provider.create({"name": "lost", "memory": 128}, [], 5)
    assert "<memory unit='KiB'>131072<" in virsh("dumpxml", provider.domain_name("lost")).stdout

    # two state dirs, two VMs of the same name: never the same domain
    other = LibvirtProvider(str(tmp_path / "other"), uri=URI, image=image)
    try:
        assert other.create({"name": "lost"}, [], 10)
        assert other.domain_name("lost") != provider.domain_name("lost")
        assert other.destroy("lost", 10) and provider.status("lost", 5)["state"] == "stopped"
    finally:
        cleanup(other)

    # no libvirt-python: a clear error, not an ImportError
    monkeypatch.setattr(libvirt_provider, "libvirt_module", None)
    with pytest.raises(ProviderError, match="vm 'x1': create: the libvirt provider needs"):
        LibvirtProvider(str(tmp_path / "none"), image=image).create({"name": "x1"}, [], 5)
    monkeypatch.undo()

    # a libvirtd that does not answer: every call ends within its timeout
    pid = _daemon_pid("libvirtd")
    assert pid, "libvirtd has no pid file"
    fresh = LibvirtProvider(provider.state_dir, uri=URI)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ProviderTimeout, match=r"vm 'lost': power_on: libvirt .* within 2 s"):
            provider.power_on("lost", 2)
        with pytest.raises(ProviderTimeout, match=r"vm 'lost': status: libvirt .* within 1 s"):
            fresh.status("lost", 1)  # a new connection: open() itself hangs
        assert time.monotonic() - started < 8
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: provider.status("lost", 10)["state"], 30, "libvirtd back") in (
        "stopped",
        "running",
    )
