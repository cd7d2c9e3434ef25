"""The in-guest capture of roles/protected_server (``protected_server_capture:
in_guest``) by ``ansible-playbook`` over ssh against the Debian guest
(tools/debian_image.py, with mdadm and nbd-client baked in) under TCG: the
guest's disk becomes an md RAID1 whose second leg is ``nbd-client`` to the
source node's export, write-mostly with a write-behind bitmap, and what the
guest writes through ``/dev/md/<disk>`` reaches the target's replica, byte
for byte. The disk already holds an ext4 filesystem with room at its end: it
is kept (mounted through md afterwards, its file intact) and copied by md's
resync. A run in check mode changes nothing; a second run changes nothing;
after a reboot the array and its NBD leg come back (haven-nbd@.service, the
bitmap) and a write reaches the replica again; ``state: absent`` takes the
NBD leg away and unregisters the disk while md goes on serving the local leg
(and changes nothing run again). Bad input (a device that does not exist, a
filesystem that reaches the end of its device) fails naming the disks and
changes nothing.

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
import signal
import ssl
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
from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider
from conftest import require_tool
from nodes import (
    NodeProcess,
    free_port,
    make_tls,
    make_token,
    source_node,
    subnet,
    target_node,
    wait_caught_up,
)
from plays import in_session
from test_debian_guest import SSH_UP, _keypair, _record, power_off, run, wait_ssh
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
debian = guest.debian  # the fixture of the cached image
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
    provider: Any = None


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
            lambda: (
                proc.poll() is None
                and subprocess.run(
                    ["nbdinfo", "--size", uri], capture_output=True, timeout=30
                ).returncode
                == 0
            ),
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
    done = in_session(
        [str(binary), "-i", str(site.inventory), str(playbook), *extra],
        env=_ansible_env(site.tmp),
        cwd=site.tmp,
        timeout=PLAYBOOK,
    )
    (site.tmp / f"{playbook.stem}-{time.monotonic_ns()}.log").write_text(done.stdout + done.stderr)
    return done


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
                    "changed_when": False,  # the test's, not the role's: not in the recap's count
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
    net, prefix = "i" + secrets.token_hex(4), subnet()
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
                verify=ssl.create_default_context(cafile=ca),
                timeout=60,
            )
        )
        made = api.post(
            "/v1/groups",
            json={
                "name": "app",
                "journal": {"segment_size": MiB, "max_segments": 64},
                "volumes": [
                    {"name": "anchor", "path": "anchor.img", "size": MiB, "server": "other"}
                ],
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
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null'\n"
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        )
        yield Site(tmp, net, prefix, ip, key, source, target, api, variables, inventory)


@pytest.fixture(scope="module")
def site(debian: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One guest for the module's tests (in order: the bad input changes
    nothing, then the capture)."""
    for tool in ("qemu-nbd", "nbdinfo", "mkfs.ext4"):
        require_tool(tool)
    tmp = tmp_path_factory.mktemp("in-guest")
    prov = get_provider("qemu", state_dir=str(tmp / "qemu"), powerdown_grace=guest.POWER_OFF)
    try:
        with in_guest_site(prov, debian, tmp) as made:
            made.provider = prov
            yield made
    finally:
        for name in prov.list(10):
            prov.destroy(name, 30)
        networks = tmp / "qemu" / "networks"
        for spec in networks.glob("*.json") if networks.exists() else []:
            prov.destroy_network(spec.stem, 10)


def _ssh(site: Site, command: str, timeout: float = 120) -> str:
    client = wait_ssh(site.provider, "g1", site.ip, site.key)
    try:
        rc, out = run(client, command, timeout)
    finally:
        client.close()
    assert rc == 0, f"{command!r} exited {rc}:\n{out[-3000:]}"
    return out


def _volumes(site: Site) -> dict[str, dict[str, Any]]:
    got = site.api.get("/v1/volumes", params={"server": "g1"})
    assert got.status_code == 200, got.text
    return {v["name"]: v for v in got.json()}


def _sha(path: Path, size: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size) if size is not None else f.read()).hexdigest()


def _facts(site: Site, name: str) -> dict[str, Any]:
    return json.loads((site.tmp / f"{name}.facts.json").read_text())


def _replica(site: Site) -> Path:
    return site.target.state_dir / "rep" / "app" / "g1-data.img"


def _replica_equals_the_guest(site: Site, why: str) -> tuple[int, str]:
    """Until the target's replica of g1-data holds what the guest reads from
    /dev/md/g1-data (its whole data area): (bytes compared, their sha256)."""
    size = int(_ssh(site, "blockdev --getsize64 /dev/md/g1-data").strip())
    expected = _ssh(
        site, "dd if=/dev/md/g1-data bs=1M iflag=direct status=none | sha256sum", 300
    ).split()[0]

    def equal() -> bool:
        wait_caught_up(site.source, site.target, timeout=COPY)
        return _replica(site).exists() and _sha(_replica(site), size) == expected

    wait_until(equal, COPY, why, interval=2)
    return size, expected


@pytest.mark.timeout(SSH_UP + PLAYBOOK + 600)
def test_bad_disks_fail_naming_them_and_change_nothing(site: Site) -> None:
    full_before = _sha(site.tmp / "vdc.raw")
    play = _play(
        site,
        "bad",
        [
            {"name": "g1-missing", "path": "g1/missing.img", "device": "/dev/vdz"},
            {"name": "g1-full", "path": "g1/full.img", "device": "/dev/vdc"},
        ],
    )
    out = ansible_playbook(site, play)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "disk g1-missing: /dev/vdz does not exist on this server" in out.stdout, out.stdout[
        -3000:
    ]
    assert (
        "disk g1-full: /dev/vdc holds a filesystem (ext4) of 16777216 bytes that reaches into the "
        "last MiB of the 16777216-byte device" in out.stdout
    ), out.stdout[-3000:]
    assert _recap(out.stdout)["changed"] == 0, out.stdout[-3000:]
    assert _volumes(site) == {}
    checked = _ssh(
        site,
        "cat /proc/mdstat 2>/dev/null | grep -c '^md' || true; "
        "ls /sys/block/nbd*/pid 2>/dev/null | wc -l; "
        "test -e /etc/haven-dr && echo records || echo none",
    )
    assert checked.split() == ["0", "0", "none"], checked
    assert _sha(site.tmp / "vdc.raw") == full_before


@pytest.mark.timeout(SSH_UP * 2 + PLAYBOOK * 5 + COPY * 3 + 900)  # 5 plays, 3 copies
def test_in_guest_writes_reach_the_target_byte_for_byte(site: Site) -> None:
    disks = [{"name": "g1-data", "path": "g1/data.img", "device": "/dev/vdb"}]
    play = _play(site, "present", disks)
    # md's copy capped at 500 KiB/s (about 2 min for the 64 MiB), long enough for the role's
    # wait to see it run and report its progress (shown, not asserted: it depends on speed)
    _ssh(
        site,
        "modprobe md_mod && echo 100 > /proc/sys/dev/raid/speed_limit_min && "
        "echo 500 > /proc/sys/dev/raid/speed_limit_max",
    )
    # check mode: says what it would change, changes nothing
    checked = _ok(ansible_playbook(site, play, "--check"))
    assert _recap(checked)["changed"] > 0, checked[-5000:]
    assert _volumes(site) == {}
    nothing = _ssh(
        site,
        "cat /proc/mdstat | grep -c '^md' || true; ls /sys/block/nbd*/pid 2>/dev/null | wc -l; "
        "ls /etc/haven-dr /etc/modules-load.d/haven-dr-nbd.conf 2>/dev/null | wc -l",
    )
    assert nothing.split() == ["0", "0", "0"], nothing

    started = time.monotonic()
    first = _ok(ansible_playbook(site, play))
    _record("in_guest_first_run_s", time.monotonic() - started)
    assert _recap(first)["changed"] > 0
    assert "every NBD leg in sync" in first, first[-5000:]
    progress = first.split("Its progress]")[1].split("TASK [")[0]
    print(f"in guest: the role's progress lines:{progress}")
    facts = _facts(site, "present")
    assert facts["md"] == {"g1-data": "/dev/md/g1-data"}
    assert facts["nbd"] == {"g1-data": "/dev/nbd0"}
    assert facts["exports"]["g1-data"].startswith(f"nbd://{site.prefix}.1:")
    volume = _volumes(site)["g1-data"]
    assert (volume["size"], volume["state"], volume["group"]) == (DISK, "protected", "app"), volume

    # the array: raid1, metadata 1.0, a bitmap, the NBD leg write-mostly with write-behind
    detail = _ssh(site, "mdadm --detail /dev/md/g1-data")
    for expected in (
        "Raid Level : raid1",
        "Version : 1.0",
        "Intent Bitmap : Internal",
        "State : clean",
    ):
        assert expected in detail, detail
    legs = [line.split()[-1] for line in detail.splitlines() if "active sync" in line]
    assert sorted(legs) == ["/dev/nbd0", "/dev/vdb"], detail
    assert "writemostly" in next(line for line in detail.splitlines() if "/dev/nbd0" in line), (
        detail
    )
    md = _ssh(site, "basename $(readlink -f /dev/md/g1-data)").strip()
    assert _ssh(site, f"cat /sys/block/{md}/md/bitmap/backlog").strip() == "512"
    boot = _ssh(
        site,
        "systemctl is-enabled haven-nbd@g1-data.service; grep -c '^ARRAY /dev/md/g1-data ' "
        "/etc/mdadm/mdadm.conf; cat /etc/modules-load.d/haven-dr-nbd.conf",
    )
    assert boot.split()[:2] == ["enabled", "1"] and "nbd" in boot.split()[2:], boot
    # the filesystem that was on the disk, kept: mounted through md now
    mount = "mkdir -p /mnt/d && mount /dev/md/g1-data /mnt/d && cat /mnt/d/hello.txt; umount /mnt/d"
    assert _ssh(site, mount) == HELLO

    # a pattern written through md (direct I/O, fsync) reaches the target's replica
    pattern = os.urandom(PATTERN)
    client = wait_ssh(site.provider, "g1", site.ip, site.key)
    try:
        with client.open_sftp() as sftp, sftp.open("/root/pattern", "wb") as f:
            f.write(pattern)
    finally:
        client.close()
    _ssh(
        site,
        f"dd if=/root/pattern of=/dev/md/g1-data bs=1M seek={PATTERN_AT // MiB} oflag=direct "
        "conv=fsync status=none",
    )
    started = time.monotonic()
    size, digest = _replica_equals_the_guest(site, "the guest's writes to reach the target")
    _record("in_guest_replica_equal_s", time.monotonic() - started)
    with open(_replica(site), "rb") as f:
        f.seek(PATTERN_AT)
        assert f.read(PATTERN) == pattern
    assert _sha(site.tmp / "vdb.raw", size) == digest  # the local leg: the same bytes
    print(
        f"in guest: {size} bytes of /dev/md/g1-data equal on the target's replica ({digest[:16]})"
    )

    started = time.monotonic()
    again = _ok(ansible_playbook(site, play))
    _record("in_guest_second_run_s", time.monotonic() - started)
    assert _recap(again)["changed"] == 0, again[-5000:]

    # a reboot: the array assembles, the unit connects the NBD leg and puts it back
    started = time.monotonic()
    power_off(site.provider, "g1")
    assert site.provider.power_on("g1", 60)
    wait_ssh(site.provider, "g1", site.ip, site.key).close()

    def both_legs() -> bool:
        client = wait_ssh(site.provider, "g1", site.ip, site.key)
        try:
            _rc, out = run(client, "cat /proc/mdstat")
        finally:
            client.close()
        return "[UU]" in out and "nbd0[" in out

    wait_until(both_legs, COPY, "both legs of /dev/md/g1-data after a reboot", interval=5)
    _record("in_guest_reboot_to_both_legs_s", time.monotonic() - started)
    late = os.urandom(512 * 1024)
    client = wait_ssh(site.provider, "g1", site.ip, site.key)
    try:
        with client.open_sftp() as sftp, sftp.open("/root/late", "wb") as f:
            f.write(late)
    finally:
        client.close()
    _ssh(
        site,
        "dd if=/root/late of=/dev/md/g1-data bs=512K seek=125 oflag=direct conv=fsync status=none",
    )
    _replica_equals_the_guest(site, "a write after the reboot to reach the target")
    with open(_replica(site), "rb") as f:
        f.seek(125 * 512 * 1024)
        assert f.read(len(late)) == late

    # absent: the NBD leg taken out, the disk unregistered; md goes on, on vdb alone
    gone = _ok(ansible_playbook(site, _play(site, "absent", [], state="absent")))
    assert _recap(gone)["changed"] > 0
    assert _volumes(site) == {}
    assert _facts(site, "absent")["md"] == {"g1-data": "/dev/md/g1-data"}
    after = _ssh(
        site,
        "cat /proc/mdstat; ls /sys/block/nbd0/pid 2>/dev/null | wc -l; "
        "systemctl is-enabled haven-nbd@g1-data.service || true; "
        "test -e /etc/haven-dr/in_guest/g1-data.env && echo record || echo no-record",
    )
    assert "[1/1] [U]" in after and "nbd0" not in after.split("unused")[0], after
    assert after.split()[-3:] == ["0", "disabled", "no-record"], after
    _ssh(
        site,
        "dd if=/root/late of=/dev/md/g1-data bs=512K seek=120 oflag=direct conv=fsync status=none",
    )
    assert _ssh(site, mount) == HELLO
    again = _ok(ansible_playbook(site, _play(site, "absent-again", [], state="absent")))
    assert _recap(again)["changed"] == 0, again[-5000:]
