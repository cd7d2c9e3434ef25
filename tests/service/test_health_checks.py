"""The ``command`` (ssh) and ``guest_agent`` health checks against real tiny
guests (tools/guest_image.py: dropbear with the key of ``options.ssh_key``,
qemu-ga on the agent's virtio-serial port) in an isolated network, through
the real ``Checker`` as a drill builds it (``in_server_network``): the ssh
client runs inside the network's namespace, the agent is reached over the
VM's ``qga.sock``. The disk is an nbdkit memory disk."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nodes import subnet
from test_qemu_provider import guest_image, net_name, wait_console
from waiting import wait_until

from ansible_collections.haven.dr.plugins.module_utils._health import (  # isort: skip
    Checker,
    in_server_network,
)
from ansible_collections.haven.dr.plugins.module_utils._plan import parse_plan  # isort: skip
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # isort: skip
    get_provider,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._base import (  # isort: skip
    ProviderError,
)
from ansible_collections.haven.dr.plugins.module_utils.providers.qemu import (  # isort: skip
    QemuProvider,
    netns_exists,
)


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is needed by these tests (make setup installs it)"
    return path


def ssh_key(path: Path) -> str:
    """A new ed25519 key at ``path`` (OpenSSH format); its authorized_keys line."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode() + " haven-test"


class Guests:
    """One provider, one isolated network, an nbdkit memory disk; VMs booted
    with an ssh key. Everything goes at the end, checked gone."""

    def __init__(self, base: Path) -> None:
        need("qemu-system-x86_64")
        need("ip")
        self.base = base
        self.provider: QemuProvider = get_provider(
            "qemu", state_dir=str(base / "qemu"), image=guest_image.build().as_dict()
        )
        self.net = net_name()
        self.subnet = subnet()
        self.key_file = base / "id_ed25519"
        self.public = ssh_key(self.key_file)
        self.other_key = base / "other_ed25519"
        ssh_key(self.other_key)
        self.socket = base / "disk.sock"
        self.nbdkit = subprocess.Popen(
            [need("nbdkit"), "-f", "-U", str(self.socket), "memory", "16M"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_until(lambda: self.socket.exists(), 20, "nbdkit's socket", interval=0.1)
        self.provider.create_network({"name": self.net, "cidr": self.subnet + ".0/24"}, 20)

    def ip(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    def boot(self, name: str, n: int, ssh: bool = True) -> None:
        options = {"ssh_key": self.public} if ssh else {}
        server = {
            "name": name,
            "nics": [{"network": self.net, "ip": self.ip(n) + "/24"}],
            "role": "tcp:5432",
            "options": options,
        }
        self.provider.create(server, [f"nbd+unix:///?socket={self.socket}"], 20)
        self.provider.power_on(name, 30)
        wait_console(self.provider, name, "haven: up")

    def plan(self, servers: dict[str, tuple[int, dict[str, Any]]]) -> Any:
        return parse_plan(
            {
                "name": "hc",
                "networks": {self.net: {"cidr": self.subnet + ".0/24"}},
                "groups": [
                    {
                        "name": "g",
                        "servers": [
                            {
                                "name": name,
                                "nics": [{"network": self.net, "ip": self.ip(n) + "/24"}],
                                "health_check": check,
                            }
                            for name, (n, check) in servers.items()
                        ],
                    }
                ],
            }
        )

    def check(self, name: str, n: int, timeout: float, **check: Any) -> tuple[bool, str, float]:
        """One try of ``check`` of server ``name`` (at .n) by the drill's
        Checker: (ok, output, seconds)."""
        plan = self.plan({name: (n, check)})
        server = plan.groups[0].servers[0]
        checker = Checker(in_server_network(plan, {"qemu": self.provider}))
        started = time.monotonic()
        ok, output = checker.check(server, server.health_check, timeout)
        return ok, output, time.monotonic() - started

    def close(self) -> None:
        try:
            for name in self.provider.list(10):
                self.provider.destroy(name, 30)
            self.provider.destroy_network(self.net, 10)
        finally:
            self.nbdkit.kill()
            self.nbdkit.wait(10)
        left = subprocess.run(
            ["ps", "-eo", "cmd"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        assert str(self.base / "qemu") not in left, "a qemu of this test is still running"
        assert not netns_exists(self.net)


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    g = Guests(tmp_path_factory.mktemp("health"))
    try:
        g.boot("hc1", 11)
        yield g
    finally:
        g.close()


def test_the_command_check_runs_over_ssh_inside_the_isolated_network(guests: Guests) -> None:
    key = str(guests.key_file)
    target = f"ssh root@{guests.ip(11)}:22"
    ok, out, _s = guests.check(
        "hc1", 11, 20, type="command", command="test -b /dev/vda && echo disk", key_file=key
    )
    assert ok, out
    assert out.startswith(target + " (host key ssh-ed25519 SHA256:"), out
    assert out.endswith(": 'test -b /dev/vda && echo disk' exited 0: disk"), out
    # the host key is new to the client: accepted, and the same each try
    again = guests.check("hc1", 11, 20, type="command", command="true", key_file=key)[1]
    assert again.split("): ")[0] == out.split("): ")[0]

    ok, out, _s = guests.check(
        "hc1",
        11,
        20,
        type="command",
        command="echo here; test -b /dev/vda",
        key_file=key,
        expect_rc=3,
    )
    assert not ok and out.endswith(": 'echo here; test -b /dev/vda' exited 0, not 3: here"), out

    ok, out, _s = guests.check(
        "hc1", 11, 20, type="command", command="true", key_file=str(guests.other_key)
    )
    assert not ok and out.startswith(target + ": authentication failed (the key file "), out


def test_the_command_check_fails_within_its_timeout(guests: Guests) -> None:
    key = str(guests.key_file)
    ok, out, seconds = guests.check(
        "hc1", 11, 5, type="command", command="true", ssh_port=2222, key_file=key
    )
    assert not ok and out == f"ssh root@{guests.ip(11)}:2222: connection refused", out
    assert seconds < 5
    # nothing at that address of the isolated network: no answer at all
    ok, out, seconds = guests.check(
        "nobody", 99, 3, type="command", command="true", host=guests.ip(99), key_file=key
    )
    assert not ok and out.startswith(f"ssh root@{guests.ip(99)}:22: "), out
    assert "timed out" in out or "No route to host" in out, out
    assert seconds < 3
    ok, out, seconds = guests.check("hc1", 11, 4, type="command", command="sleep 30", key_file=key)
    assert not ok and "the command did not end within" in out, out
    assert seconds < 4


def test_the_guest_agent_check(guests: Guests) -> None:
    ok, out, _s = guests.check(
        "hc1", 11, 20, type="guest_agent", command="test -b /dev/vda && echo disk"
    )
    assert (ok, out) == (True, "guest agent: 'test -b /dev/vda && echo disk' exited 0: disk")
    ok, out, _s = guests.check("hc1", 11, 20, type="guest_agent", command="echo nope >&2; exit 4")
    assert (ok, out) == (False, "guest agent: 'echo nope >&2; exit 4' exited 4, not 0: nope")
    ok, out, _s = guests.check(
        "hc1", 11, 20, type="guest_agent", command="test -b /dev/vda", expect_rc=1
    )
    assert not ok and "exited 0, not 1" in out
    got = guests.provider.guest_exec("hc1", ["/bin/sh", "-c", "hostname; echo err >&2"], 20)
    assert got == {"rc": 0, "stdout": "hc1\n", "stderr": "err\n"}


def test_a_guest_whose_agent_does_not_answer_fails_within_the_timeout(guests: Guests) -> None:
    guests.boot("hc2", 12)
    key = str(guests.key_file)
    assert guests.check("hc2", 12, 20, type="guest_agent", command="true")[0]
    ok, out, _s = guests.check(
        "hc2",
        12,
        20,
        type="command",
        command="killall qemu-ga; sleep 0.5; ! pidof qemu-ga",
        key_file=key,
    )
    assert ok, out
    ok, out, seconds = guests.check("hc2", 12, 4, type="guest_agent", command="true")
    assert not ok and seconds < 4
    assert out.startswith(
        "guest agent: vm 'hc2': guest_exec: "
        "the guest agent did not answer guest-sync-delimited within "
    ), out
    assert out.endswith("(is qemu-ga running in the guest?)"), out
    guests.provider.power_off("hc2", 30)
    with pytest.raises(ProviderError, match="guest_exec: the VM is stopped, not running"):
        guests.provider.guest_exec("hc2", ["/bin/true"], 5)
    ok, out, _s = guests.check("hc2", 12, 5, type="guest_agent", command="true")
    assert not ok and out == "guest agent: vm 'hc2': guest_exec: the VM is stopped, not running"


def test_a_guest_without_a_key_has_no_ssh(guests: Guests) -> None:
    guests.boot("hc3", 13, ssh=False)
    ok, out, seconds = guests.check(
        "hc3", 13, 5, type="command", command="true", key_file=str(guests.key_file)
    )
    assert not ok and out == f"ssh root@{guests.ip(13)}:22: connection refused", out
    assert seconds < 5
    assert guests.check("hc3", 13, 20, type="guest_agent", command="true")[0]
