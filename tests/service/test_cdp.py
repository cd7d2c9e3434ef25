"""Continuous data protection end to end: real source and target havend
processes over mutual TLS, a stamped-block writer through NBD, checkpoints
taken through the admin socket, and every view read back with real NBD
clients (havend's and libnbd's nbdcopy) and checked against the write log."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from nodes import NodeProcess, app_group, free_port, start_pair, wait_caught_up
from waiting import wait_until

from havend import admin
from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog, check_prefix

MiB = 1 << 20
VOLUMES = ["db", "log"]
SIZES = [4 * MiB, 2 * MiB]
WAIT = 60


class Site:
    """A source and a target node, one group of two volumes, a stamped writer."""

    def __init__(self, tmp: Path, **checkpoints: Any) -> None:
        self.tmp = tmp
        group = app_group(
            tmp,
            dict(zip(VOLUMES, SIZES, strict=True)),
            **({"checkpoints": checkpoints} if checkpoints else {}),
        )
        self.pair = start_pair(tmp, [group], tls=True, caught_up=WAIT)
        self.target, self.source = self.pair.target, self.pair.source
        nbd = self.source.address("nbd").rsplit(":", 1)[1]
        self.clients = {i: NBDClient.tcp("127.0.0.1", int(nbd), n) for i, n in enumerate(VOLUMES)}
        self.log = WriteLog()
        self.writer = StampWriter(self.clients, log=self.log, seed=7, flush_every=32)

    def write(self, count: int) -> int:
        for _ in range(count):
            self.writer.step()
        return self.log.last_seq

    def source_op(self, op: str, **args: Any) -> Any:
        return admin.call(str(self.source.state_dir / "admin.sock"), op, **args)

    def target_op(self, op: str, **args: Any) -> Any:
        return admin.call(str(self.target.state_dir / "admin.sock"), op, **args)

    def checkpoint(self, label: str = "") -> tuple[dict, int]:
        """A checkpoint now; the writer is QD1 in this thread, so it holds exactly
        the writes logged so far."""
        return self.source_op("checkpoint", group="app", label=label), self.log.last_seq

    def caught_up(self) -> None:
        wait_caught_up(self.source, self.target, timeout=WAIT)

    def read_view(self, checkpoint: str, volume: int, *, tool: str = "havend") -> bytes:
        view = self.target_op(
            "view_open", group="app", volume=VOLUMES[volume], checkpoint=checkpoint
        )
        try:
            if tool == "nbdcopy":
                out = self.tmp / f"view-{volume}.img"
                subprocess.run(
                    [require_tool("nbdcopy"), view["uri"], str(out)],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                return out.read_bytes()
            with NBDClient.open(view["uri"]) as client:
                assert client.read_only and client.size == SIZES[volume]
                return client.read(0, client.size)
        finally:
            self.target_op("view_close", export=view["export"])

    def check_view(self, checkpoint: str, expected_seq: int, tool: str = "havend") -> None:
        images = {i: self.read_view(checkpoint, i, tool=tool) for i in range(len(VOLUMES))}
        report = check_prefix(self.log, images)
        assert report.ok, f"checkpoint {checkpoint}: {report}"
        assert report.min_seq <= expected_seq <= report.seq, (
            f"checkpoint {checkpoint} should hold writes 1..{expected_seq}: {report}"
        )

    def checkpoints(self) -> list[dict]:
        return self.target_op("checkpoints", group="app")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.pair.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_every_checkpoint_view_holds_the_source_as_it_was(site: Site) -> None:
    taken = []
    for i in range(10):
        site.write(40)
        taken.append(site.checkpoint(f"c{i}"))
    site.write(40)
    site.caught_up()
    listed = site.checkpoints()
    assert [c["label"] for c in listed] == [f"c{i}" for i in range(10)]
    assert [c["id"] for c in listed] == [c["id"] for c, _ in taken]
    assert all(c["consistency"] == "crash" for c in listed)
    for n, (cp, seq) in enumerate(taken):
        site.check_view(cp["id"], seq, tool="nbdcopy" if n % 3 == 0 else "havend")
    # The status says what is kept and what it costs.
    [group] = site.target.status()["groups"]
    assert group["cdp"]["checkpoints"] == 10 and group["cdp"]["undo_bytes"] > 0
    # After a restart of the target every view is still exact.
    site.target.stop()
    site.target.start()
    site.caught_up()
    for cp, seq in taken:
        site.check_view(cp["id"][:8], seq)  # a unique prefix will do


def test_a_view_stays_exact_while_replication_goes_on(site: Site) -> None:
    site.write(100)
    cp, seq = site.checkpoint("under-load")
    site.caught_up()
    view = site.target_op("view_open", group="app", volume="db", checkpoint=cp["id"])
    first = None
    with NBDClient.open(view["uri"]) as client:
        for _ in range(5):
            site.write(60)  # more writes replicate to the replica under the view
            image = client.read(0, client.size)
            first = first or image
            assert image == first
    site.target_op("view_close", export=view["export"])
    site.caught_up()
    report = check_prefix(site.log, {0: first, 1: site.read_view(cp["id"], 1)})
    assert report.ok and report.min_seq <= seq <= report.seq, report


def test_a_writable_view_is_thrown_away(site: Site) -> None:
    site.write(50)
    cp, seq = site.checkpoint()
    site.caught_up()
    replica = site.target.state_dir / "rep" / "app" / "db.img"
    before = replica.read_bytes()
    view = site.target_op("view_open", group="app", volume="db", checkpoint="latest", writable=True)
    with NBDClient.open(view["uri"]) as client:
        assert not client.read_only
        client.write(12345, b"drill data" * 1000)
        client.flush()
        assert client.read(12345, 10000) == b"drill data" * 1000
    assert replica.read_bytes() == before  # the replica never saw it
    closed = site.target_op("view_close", export=view["export"])
    assert closed["discarded_bytes"] > 0
    assert not list((site.target.state_dir / "scratch").iterdir())
    site.check_view(cp["id"], seq)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    site = Site(tmp_path, retain=4)
    try:
        taken = []
        for i in range(9):
            site.write(30)
            taken.append(site.checkpoint(f"c{i}"))
        site.caught_up()
        assert [c["label"] for c in site.checkpoints()] == ["c5", "c6", "c7", "c8"]
        for cp, seq in taken[5:]:
            site.check_view(cp["id"], seq)
        with pytest.raises(admin.AdminError, match="is not retained"):
            site.target_op("view_open", group="app", volume="db", checkpoint=taken[0][0]["id"])
    finally:
        site.close()


def test_rollback_makes_a_checkpoint_the_latest_and_holds_the_source(site: Site) -> None:
    taken = []
    for i in range(4):
        site.write(50)
        taken.append(site.checkpoint(f"c{i}"))
    site.write(50)  # "the infection"
    site.caught_up()
    cp, seq = taken[1]
    result = site.target_op("rollback", group="app", checkpoint=cp["id"])
    assert result["checkpoint"]["id"] == cp["id"] and result["rewritten_bytes"] > 0
    assert result["generation"] != result["previous_generation"]
    replica = {
        i: (site.target.state_dir / "rep" / "app" / f"{n}.img").read_bytes()
        for i, n in enumerate(VOLUMES)
    }
    report = check_prefix(site.log, replica)
    assert report.ok and report.min_seq <= seq <= report.seq, report
    assert [c["label"] for c in site.checkpoints()] == ["c0", "c1"]
    site.write(20)  # the source goes on; the target refuses its records
    wait_until(
        lambda: site.source.status(),
        WAIT,
        "the source to report that the target rolled back",
        until=lambda status: "rolled back" in status["groups"][0]["last_error"],
        interval=0.1,
    )
    # The node's live status (status.json is a periodic snapshot, and the
    # source can hear of the rollback before the target's next one).
    [group] = site.target_op("status")["groups"]
    assert group["hold"].startswith("rolled back to checkpoint")
    assert check_prefix(site.log, replica).ok  # and nothing more was applied
    site.target.stop()  # the hold survives a restart
    site.target.start()
    assert site.target.status()["groups"][0]["hold"]


def test_bad_requests_get_clear_errors_and_change_nothing(site: Site) -> None:
    site.write(20)
    cp, _ = site.checkpoint()
    site.caught_up()
    cases = [
        ("view_open", {"group": "nope", "volume": "db", "checkpoint": "latest"}, "no group"),
        ("view_open", {"group": "app", "volume": "nope", "checkpoint": "latest"}, "no volume"),
        ("view_open", {"group": "app", "volume": "db", "checkpoint": "abc"}, "is not retained"),
        ("view_close", {"export": "app/db@x"}, "no view"),
        ("rollback", {"group": "app", "checkpoint": "0" * 32}, "is not retained"),
        ("explode", {}, "unknown op"),
        ("view_open", {"group": "app"}, "bad arguments"),
    ]
    for op, args, error in cases:
        with pytest.raises(admin.AdminError, match=error):
            site.target_op(op, **args)
    view = site.target_op("view_open", group="app", volume="db", checkpoint=cp["id"])
    with pytest.raises(admin.AdminError, match="close the 1 open views"):
        site.target_op("rollback", group="app", checkpoint=cp["id"])
    site.target_op("view_close", export=view["export"])
    with pytest.raises(admin.AdminError, match="no group 'nope'"):
        site.target_op("checkpoints", group="nope")
    with pytest.raises(admin.AdminError, match="unknown op 'rollback'"):
        site.source_op("rollback", group="app", checkpoint="x")
    with pytest.raises(admin.AdminError, match="no freeze/thaw hooks"):
        site.source_op("checkpoint", group="app", app=True)
    # A garbage line on the socket: an error answer, and the node goes on.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(site.target.state_dir / "admin.sock"))
        sock.sendall(b"{not json\n")
        assert json.loads(sock.recv(4096))["error"] == "the request is not JSON"
    assert len(site.checkpoints()) == 1


def test_the_command_line_drives_the_same(site: Site) -> None:
    def havend(node: NodeProcess, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "havend", *args, "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    site.write(30)
    cp = havend(site.source, "checkpoint", "create", "--group", "app", "--label", "cli")
    site.caught_up()
    [listed] = havend(site.target, "checkpoint", "list", "--group", "app")
    assert listed["id"] == cp["id"] and listed["label"] == "cli"
    view = havend(site.target, "view", "open", "--group", "app", "--volume", "log")
    assert view["checkpoint"]["id"] == cp["id"]
    assert [v["export"] for v in havend(site.target, "view", "list")] == [view["export"]]
    havend(site.target, "view", "close", view["export"])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "havend",
            "view",
            "close",
            "nope",
            "--config",
            str(site.target.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "no view 'nope' is open" in done.stderr


def test_application_consistent_checkpoints_always_thaw(tmp_path: Path) -> None:
    trace = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {trace}\n'
        'if [ "$1" = freeze ] && [ -e "$0.fail" ]; then echo "cannot freeze /srv"; exit 3; fi\n'
        'if [ "$1" = freeze ] && [ -e "$0.hang" ]; then sleep 30; fi\n'
    )
    hook.chmod(0o755)
    site = Site(
        tmp_path,
        hooks={"pre": [str(hook), "freeze"], "post": [str(hook), "thaw"], "timeout_seconds": 2},
    )
    try:
        site.write(20)
        cp, seq = site.checkpoint("app")
        assert cp["consistency"] == "app" and cp["thaw_error"] == ""
        assert trace.read_text().split() == ["freeze", "thaw"]
        Path(f"{hook}.fail").touch()
        with pytest.raises(admin.AdminError, match="freeze hook exited with 3: cannot freeze"):
            site.checkpoint("refused")
        assert trace.read_text().split()[-2:] == ["freeze", "thaw"]
        os.unlink(f"{hook}.fail")
        Path(f"{hook}.hang").touch()
        started = time.monotonic()
        with pytest.raises(admin.AdminError, match="timed out after 2 s"):
            site.checkpoint("hung")
        assert time.monotonic() - started < 15
        assert trace.read_text().split()[-2:] == ["freeze", "thaw"]
        os.unlink(f"{hook}.hang")
        crash = site.source_op("checkpoint", group="app", app=False)
        assert crash["consistency"] == "crash"
        site.caught_up()
        assert [c["consistency"] for c in site.checkpoints()] == ["app", "crash"]
        site.check_view(cp["id"], seq)
    finally:
        site.close()


def test_periodic_checkpoints(tmp_path: Path) -> None:
    site = Site(tmp_path, interval_seconds=1)
    try:
        stop = threading.Event()
        site.write(10)

        def three_checkpoints() -> int:
            taken = len(site.checkpoints())
            if taken < 3:
                site.write(5)
            return taken

        wait_until(
            three_checkpoints,
            WAIT,
            "three periodic checkpoints (writing meanwhile)",
            until=lambda taken: taken >= 3,
            detail=lambda: site.source.log()[-2000:],
            interval=0.2,
        )
        stop.set()
        assert {c["label"] for c in site.checkpoints()} == {"periodic"}
    finally:
        site.close()


def test_2048_checkpoints_are_retained_in_one_group(site: Site) -> None:
    """More checkpoints than the default retention, a write between each: the
    newest 2,048 are kept (across a restart), and the oldest, the newest and a
    sample between read back exactly."""
    taken = []
    for i in range(2060):
        site.write(1)
        taken.append(site.checkpoint(f"c{i}"))
    site.caught_up()
    listed = site.checkpoints()
    assert len(listed) == 2048
    assert listed[0]["label"] == "c12" and listed[-1]["label"] == "c2059"
    site.target.stop()
    site.target.start()
    site.caught_up()
    assert [c["id"] for c in site.checkpoints()] == [c["id"] for c in listed]
    for n in (12, 13, 500, 1337, 2058, 2059):
        cp, seq = taken[n]
        site.check_view(cp["id"], seq)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_target_killed_at_random_moments_keeps_every_checkpoint_exact(
    site: Site, seed: int
) -> None:
    """kill -9 of the target while records and checkpoints are being applied
    (undo entries half written, the replica half updated, a checkpoint just
    recorded): after each restart every retained checkpoint is still exact.
    The writer does not wait for the target, so the source's journal may fill
    meanwhile: checkpoints are then refused (clearly) until the resync that
    follows, which overwrites replica blocks under the retained checkpoints."""
    import random

    rng = random.Random(seed)
    taken, refused = [], 0
    for _ in range(6):
        delay = rng.uniform(0.05, 0.6)
        killer = threading.Timer(delay, site.target.kill)
        killer.start()
        deadline = time.monotonic() + delay + 0.3
        while time.monotonic() < deadline:
            site.write(rng.randrange(1, 20))
            try:
                taken.append(site.checkpoint())
            except admin.AdminError as exc:
                assert "checkpoints resume once the resync is done" in str(exc)
                refused += 1
        killer.join()
        site.target.start()
    site.write(10)
    site.caught_up()
    # Checkpoints still in the journal when it overflowed are lost, and said so.
    listed = site.source.status()["groups"][0]["lost_checkpoints"]  # the newest 100
    lost = set(re.findall(r"([0-9a-f]{32}) \(seq \d+\)", site.source.log()))
    assert refused == 0 or lost, "an overflow happened: its lost checkpoints are logged"
    assert set(listed) <= lost and len(listed) == min(100, len(lost))
    retained = {c["id"] for c in site.checkpoints()}
    assert retained == {cp["id"] for cp, _ in taken} - lost
    kept = [(cp, seq) for cp, seq in taken if cp["id"] in retained]
    assert len(kept) > 10
    for cp, seq in kept[:: max(1, len(kept) // 12)] + kept[-1:]:
        site.check_view(cp["id"], seq)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real OpenSSH server on 127.0.0.1 standing for the protected server:
    its own host key, root logs in with a key made here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def keypair(path: Path) -> str:
        key = ed25519.Ed25519PrivateKey.generate()
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
        return public.decode()

    d = tmp_path / "sshd"
    d.mkdir()
    host_public = keypair(d / "host_key")
    user_public = keypair(d / "user_key")
    (d / "authorized_keys").write_text(user_public + "\n")
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public}\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    proc = subprocess.Popen(
        [require_tool("sshd"), "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "sshd.log", "wb"),  # noqa: SIM115 - the child owns it
    )
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            assert proc.poll() is None, (d / "sshd.log").read_text()
            return False

        wait_until(listening, 10, f"sshd to listen on port {port}")
        yield {
            "host": "127.0.0.1",
            "port": port,
            "user": "root",
            "key_file": str(d / "user_key"),
            "known_hosts": str(d / "known_hosts"),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def test_hooks_over_ssh_freeze_and_thaw_the_protected_server(
    tmp_path: Path, sshd: dict[str, Any]
) -> None:
    """The hooks run on "the protected server" through SSH (paramiko against a
    real sshd): freeze and thaw land there; a failing freeze is reported with
    its output and still thawed; an unknown host key is refused, not trusted."""
    trace = tmp_path / "remote.log"
    freeze = ["sh", "-c", f'echo "freeze $SSH_CONNECTION" >> {trace}; test ! -e {trace}.fail']
    thaw = ["sh", "-c", f"echo thaw >> {trace}"]
    site = Site(tmp_path, hooks={"pre": freeze, "post": thaw, "ssh": sshd, "timeout_seconds": 10})
    try:
        site.write(20)
        cp, seq = site.checkpoint("over ssh")
        assert cp["consistency"] == "app" and not cp["thaw_error"]
        lines = trace.read_text().splitlines()
        assert lines[0].startswith("freeze 127.0.0.1") and lines[1] == "thaw"
        Path(f"{trace}.fail").touch()
        with pytest.raises(admin.AdminError, match=r"freeze hook exited with 1 on 127\.0\.0\.1"):
            site.checkpoint("refused")
        assert trace.read_text().splitlines()[-1] == "thaw"
        site.caught_up()
        assert [c["label"] for c in site.checkpoints()] == ["over ssh"]
        site.check_view(cp["id"], seq)
    finally:
        site.close()
    # The same server under a host key we were never told about: refused.
    Path(sshd["known_hosts"]).write_text("")
    other = tmp_path / "other"
    other.mkdir()
    site = Site(other, hooks={"pre": freeze, "post": thaw, "ssh": sshd})
    try:
        with pytest.raises(
            admin.AdminError, match=r"freeze hook: ssh root@127\.0\.0\.1: .*not found"
        ):
            site.checkpoint("untrusted")
    finally:
        site.close()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"checkpoints": {"retain": 0}}, r"checkpoints\.retain: at least 1"),
        (
            {"checkpoints": {"interval_seconds": 0.5}},
            r"checkpoints\.interval_seconds: 0 \(off\) or at least 1",
        ),
        (
            {"checkpoints": {"max_age_seconds": -1}},
            r"checkpoints\.max_age_seconds: 0 \(no limit\) or more",
        ),
        (
            {"checkpoints": {"hooks": {"pre": ["true"]}}},
            r"checkpoints\.hooks\.post: pre and post go together",
        ),
        (
            {"checkpoints": {"hooks": {"pre": "fsfreeze -f /srv", "post": ["x"]}}},
            r"hooks\.pre: a command as a list",
        ),
        (
            {"checkpoints": {"hooks": {"pre": ["a"], "post": ["b"], "timeout_seconds": 0}}},
            r"timeout_seconds",
        ),
        (
            {"checkpoints": {"hooks": {"pre": ["a"], "post": ["b"], "ssh": {"host": "db1"}}}},
            r"ssh\.key_file: required",
        ),
        ({"reverse_interval_seconds": 0.5}, r"groups\[0\]\.reverse_interval_seconds: 0 \(off\)"),
        ({"reverse_interval_seconds": "often"}, r"groups\[0\]\.reverse_interval_seconds"),
        (
            {"journal": {"background_sync_bytes": -1}},
            r"groups\[0\]\.journal\.background_sync_bytes: 0 \(off\) or more bytes",
        ),
    ],
)
def test_bad_group_policies_are_refused_naming_the_field(
    fields: dict[str, Any], error: str
) -> None:
    from havend import config
    from havend.errors import ConfigError

    node = {
        "node": {"name": "src1", "role": "source", "state_dir": "/tmp/x"},
        "insecure_plaintext": True,
        "source": {
            "target": {"host": "127.0.0.1", "port": 1},
            "groups": [
                {
                    "name": "app",
                    "volumes": [{"name": "db", "path": "/x"}],
                }
                | fields
            ],
        },
    }
    with pytest.raises(ConfigError, match=error):
        config.parse(node)
