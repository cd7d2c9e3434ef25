"""The Debian 12 guest (tools/debian_image.py) under TCG with the qemu
provider: systemd reaches ``running``, sshd answers root's key, python3 is
there (what Ansible needs), it powers off cleanly on the ACPI button, and a
second VM from the cached image boots without a rebuild. The cached base is
never written (each VM boots from its own overlay). Root; a missing tool fails.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from conftest import require_tool
from nodes import subnet
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import debian_image  # noqa: E402
import test_qemu_provider  # noqa: E402

test_qemu_provider._collection_on_path()  # the collection importable (once per checkout)
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._base import (  # noqa: E402
    ProviderError,
)
from ansible_collections.haven.dr.plugins.module_utils.providers.qemu import (  # noqa: E402
    QemuProvider,
    netns_exists,
)

process_gone = test_qemu_provider.process_gone

# measured (2 shared cores, TCG): power on to sshd 25 s and 53 s (first and
# second VM), `running` 4-7 s later; with two CPU burners 53 s and 58 s;
# a clean power off 2.5-5 s. The bounds leave room for a loaded machine.
SSH_UP = 300
SYSTEM_RUNNING = 240
POWER_OFF = 120
TIMES = Path(os.environ.get("HAVEN_DEBIAN_TIMES", "/tmp/haven-debian-guest-times.json"))


@pytest.fixture(scope="session")
def debian() -> dict[str, str]:
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img", "ssh-keygen", "qemu-system-x86_64"):
        require_tool(tool)
    started = time.monotonic()
    image = debian_image.build().as_dict()
    _record("build_or_cache_s", time.monotonic() - started)
    return image


def _record(key: str, seconds: float) -> None:
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[key] = round(seconds, 1)
    TIMES.write_text(json.dumps(times, indent=2) + "\n")
    print(f"debian guest: {key} = {seconds:.1f} s")


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[QemuProvider]:
    prov = get_provider("qemu", state_dir=str(tmp_path / "qemu"), powerdown_grace=POWER_OFF)
    try:
        yield prov
    finally:
        for name in prov.list(10):
            prov.destroy(name, 30)
        networks = tmp_path / "qemu" / "networks"
        for spec in networks.glob("*.json") if networks.exists() else []:
            prov.destroy_network(spec.stem, 10)


def _keypair(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    return key, key.with_suffix(".pub").read_text().strip()


def _connect(ip: str, key: Path) -> paramiko.SSHClient | None:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a new host key per VM
    try:
        client.connect(
            ip,
            username="root",
            key_filename=str(key),
            timeout=5,
            banner_timeout=15,
            auth_timeout=15,
            look_for_keys=False,
            allow_agent=False,
        )
    except (OSError, paramiko.SSHException, EOFError):
        client.close()
        return None
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 60) -> tuple[int, str]:
    """``command`` over ssh: (exit status, stdout + stderr); bounded by ``timeout``."""
    channel = client.get_transport().open_session(timeout=10)
    try:
        channel.settimeout(timeout)
        channel.set_combine_stderr(True)
        channel.exec_command(f"timeout {int(timeout)} sh -c {_quote(command)}")
        out = b""
        deadline = time.monotonic() + timeout + 5
        while True:
            chunk = channel.recv(65536)  # socket.timeout after ``timeout``
            if not chunk:
                break
            out += chunk
            assert time.monotonic() < deadline, f"{command!r} still talking after {timeout} s"
        return channel.recv_exit_status(), out.decode(errors="replace")
    finally:
        channel.close()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def boot(
    prov: QemuProvider,
    debian: dict[str, str],
    name: str,
    network: str,
    ip: str,
    gateway: str,
    ssh_key: str | None,
    memory: int = 1024,
) -> float:
    options = {k: debian[k] for k in ("kernel", "initrd", "image")}
    if ssh_key:
        options["ssh_key"] = ssh_key
    server = {
        "name": name,
        "memory": memory,
        "cpus": 1,
        "nics": [{"network": network, "ip": f"{ip}/24", "gateway": gateway}],
        "options": options,
    }
    prov.create(server, [], 30)
    started = time.monotonic()
    assert prov.power_on(name, 60)
    return started


def wait_ssh(prov: QemuProvider, name: str, ip: str, key: Path) -> paramiko.SSHClient:
    def connected() -> paramiko.SSHClient | None:
        assert prov.pid(name) is not None, (
            f"QEMU of {name} exited:\n{prov.serial_log(name)[-3000:]}"
        )
        return _connect(ip, key)

    return wait_until(
        connected,
        SSH_UP,
        f"sshd of {name} at {ip}",
        detail=lambda: f"console of {name}:\n{prov.serial_log(name)[-3000:]}",
        interval=2,
    )


def check_guest(client: paramiko.SSHClient, name: str) -> None:
    rc, out = run(client, "systemctl is-system-running --wait", SYSTEM_RUNNING)
    if out.strip() != "running":
        _rc, failed = run(client, "systemctl --failed --no-pager; journalctl -b -p err --no-pager")
        pytest.fail(f"{name}: system is {out.strip()!r} (rc {rc}):\n{failed[-3000:]}")
    rc, out = run(client, "systemctl is-active multi-user.target ssh.service systemd-networkd")
    assert rc == 0, out
    rc, out = run(client, "python3 -c 'import sys, apt, venv; print(sys.version_info[:2])'")
    assert (rc, out.strip()) == (0, "(3, 11)"), out
    rc, out = run(client, "hostname; . /etc/os-release; echo $VERSION_ID; cat /proc/1/comm")
    assert (rc, out.split()) == (0, [name, "12", "systemd"]), out


def power_off(prov: QemuProvider, name: str) -> float:
    pid = prov.pid(name)
    started = time.monotonic()
    assert prov.power_off(name, POWER_OFF + 30)
    took = time.monotonic() - started
    stop = json.loads((Path(prov.vm_dir(name)) / "last_stop.json").read_text())
    assert stop["clean"], (
        f"{name} did not power off on the ACPI button:\n{prov.serial_log(name)[-3000:]}"
    )
    assert pid is not None and process_gone(pid)
    return took


@pytest.mark.timeout(SSH_UP * 2 + SYSTEM_RUNNING * 2 + POWER_OFF * 2 + 120)
def test_debian_guest_boots_systemd_with_sshd_and_python(
    provider: QemuProvider, debian: dict[str, str], tmp_path: Path
) -> None:
    base = Path(debian["image"])
    before = base.stat()
    net, prefix = "d" + secrets.token_hex(4), subnet()
    gateway = f"{prefix}.1"
    provider.create_network(  # not isolated: the host routes to it (its veth)
        {"name": net, "cidr": f"{prefix}.0/24", "isolated": False}, 30
    )
    key, pubkey = _keypair(tmp_path)

    # the first VM: root's key from the kernel command line (haven.ssh_key=)
    started = boot(provider, debian, "deb1", net, f"{prefix}.2", gateway, pubkey)
    client = wait_ssh(provider, "deb1", f"{prefix}.2", key)
    _record("first_boot_to_ssh_s", time.monotonic() - started)
    try:
        check_guest(client, "deb1")
        _record("first_boot_to_running_s", time.monotonic() - started)
        rc, out = run(client, "echo written > /root/marker && sync && cat /root/marker")
        assert (rc, out.strip()) == (0, "written")
    finally:
        client.close()
    _record("first_power_off_s", power_off(provider, "deb1"))
    root_disk = Path(provider.vm_dir("deb1")) / "root.qcow2"
    assert root_disk.stat().st_size > 0  # what the guest wrote went to its overlay

    # the second VM: from the cache (no rebuild), the image's own baked key
    started_build = time.monotonic()
    again = debian_image.build().as_dict()
    _record("second_build_cached_s", time.monotonic() - started_build)
    assert again == debian
    assert time.monotonic() - started_build < 10, "the second build did not come from the cache"
    started = boot(provider, debian, "deb2", net, f"{prefix}.3", gateway, None)
    client = wait_ssh(provider, "deb2", f"{prefix}.3", Path(debian["ssh_key"]))
    _record("second_boot_to_ssh_s", time.monotonic() - started)
    try:
        check_guest(client, "deb2")
        _record("second_boot_to_running_s", time.monotonic() - started)
        rc, out = run(client, "test -e /root/marker && echo shared || echo own")
        assert out.strip() == "own"  # deb1's write is in deb1's overlay only
    finally:
        client.close()
    _record("second_power_off_s", power_off(provider, "deb2"))

    after = base.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    for name in ("deb1", "deb2"):
        assert provider.destroy(name, 30)
    assert provider.destroy_network(net, 10)
    assert not netns_exists(net)
    assert provider.list(5) == []


def test_an_image_that_is_not_a_file_is_refused(provider: QemuProvider, tmp_path: Path) -> None:
    server = {
        "name": "nodisk",
        "options": {"kernel": "/k", "initrd": "/i", "image": str(tmp_path / "missing.qcow2")},
    }
    with pytest.raises(ProviderError, match=r"options.image .* is not a local image file"):
        provider.create(server, [], 10)
