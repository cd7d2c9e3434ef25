# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The real health checks against real local sockets, HTTP and ssh servers.
The probe path (a check run inside a network) is run through ``env`` as the
prefix, standing in for ``ip netns exec haven-<network>``."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import hashlib
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import paramiko
import pytest

from ansible_collections.haven.dr.plugins.module_utils import _health
from ansible_collections.haven.dr.plugins.module_utils._health import Checker, in_server_network
from ansible_collections.haven.dr.plugins.module_utils._plan import parse_plan
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import PlanRun
from ansible_collections.haven.dr.plugins.module_utils.providers._base import ProviderTimeout

HERE = None
INSIDE = ["env"]  # a prefix that runs the probe as a separate process


def where(prefix):
    return lambda server, check: prefix


def check_of(**keys):
    plan = parse_plan(
        {
            "name": "p",
            "networks": {"lan": {"cidr": "127.0.0.0/8"}},
            "groups": [
                {"name": "g", "servers": [{"name": "s1", "nics": [{"network": "lan", "ip": "127.0.0.1/8"}], "health_check": keys}]}
            ],
        }
    )
    server = plan.groups[0].servers[0]
    return plan, server, server.health_check


class Handler(BaseHTTPRequestHandler):
    routes = {
        "/ok": (200, "hello drill"),
        "/json": (200, json.dumps({"status": "up", "database": {"connected": True}})),
        "/down": (200, json.dumps({"status": "down", "database": {"connected": False}})),
        "/missing": (404, "no such page"),
        "/text": (200, "not json"),
    }

    def do_GET(self):  # noqa: N802 - the http.server name
        if self.path == "/slow":
            time.sleep(3)
        status, body = self.routes.get(self.path, (200, "slow"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.daemon = True
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_tcp_passes_on_a_listening_port_and_fails_with_the_error(prefix, listening, closed_port):
    plan, server, check = check_of(type="tcp", port=listening)
    ok, output = Checker(where(prefix)).check(server, check, 5)
    assert ok, output
    assert output == "connected to 127.0.0.1:%d" % listening
    plan, server, check = check_of(type="tcp", port=closed_port)
    ok, output = Checker(where(prefix)).check(server, check, 5)
    assert not ok
    assert output.startswith("127.0.0.1:%d: " % closed_port)
    assert "refused" in output.lower()


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_http_status_and_body(prefix, web):
    checker = Checker(where(prefix))
    plan, server, check = check_of(type="http", url=web + "/ok", body_contains="drill")
    assert checker.check(server, check, 5) == (True, "%s/ok answered 200" % web)
    plan, server, check = check_of(type="http", url=web + "/ok", body_contains="production")
    ok, output = checker.check(server, check, 5)
    assert not ok and "does not contain 'production'" in output and "hello drill" in output
    plan, server, check = check_of(type="http", url=web + "/missing")
    ok, output = checker.check(server, check, 5)
    assert not ok and "answered 404, not 200" in output
    plan, server, check = check_of(type="http", url=web + "/missing", status=404)
    assert checker.check(server, check, 5)[0]


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_each_try_is_bounded_by_the_timeout(prefix, web):
    plan, server, check = check_of(type="http", url=web + "/slow")
    started = time.monotonic()
    ok, output = Checker(where(prefix)).check(server, check, 1.5)
    assert not ok and output
    assert time.monotonic() - started < 2.9


def test_http_nothing_listening(closed_port):
    plan, server, check = check_of(type="http", url="http://127.0.0.1:%d/" % closed_port)
    for prefix in (HERE, INSIDE):
        ok, output = Checker(where(prefix)).check(server, check, 5)
        assert not ok and "refused" in output.lower(), output


class FakeJmespath:
    """Enough of jmespath for these expressions (it may not be installed)."""

    @staticmethod
    def search(expression, data):
        if expression == "status == 'up' && database.connected":
            return data.get("status") == "up" and data["database"]["connected"]
        raise ValueError("unknown expression %r" % expression)


def test_http_jmespath_over_the_json_body(web, monkeypatch):
    monkeypatch.setattr(_health, "jmespath", FakeJmespath)
    expression = "status == 'up' && database.connected"
    plan, server, check = check_of(type="http", url=web + "/json", jmespath=expression)
    assert Checker().check(server, check, 5)[0]
    plan, server, check = check_of(type="http", url=web + "/down", jmespath=expression)
    ok, output = Checker(where(INSIDE)).check(server, check, 5)
    assert not ok and "is false" in output
    plan, server, check = check_of(type="http", url=web + "/text", jmespath=expression)
    ok, output = Checker().check(server, check, 5)
    assert not ok and "not JSON" in output


def test_http_jmespath_without_the_library_names_the_option(web, monkeypatch):
    monkeypatch.setattr(_health, "jmespath", None)
    plan, server, check = check_of(type="http", url=web + "/json", jmespath="status")
    ok, output = Checker().check(server, check, 5)
    assert not ok
    assert "jmespath option" in output and "pip install jmespath" in output


class SSHServer(paramiko.ServerInterface):
    """One real ssh server on loopback (paramiko's): public key auth with
    ``allowed`` only, exec requests run by ``sh -c`` here."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.command = None
        self.event = threading.Event()

    def check_auth_publickey(self, username, key):
        if username == "root" and key.asbytes() == self.allowed.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return "publickey"

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        self.command = command
        self.event.set()
        return True


@pytest.fixture(scope="module")
def host_key():
    return paramiko.RSAKey.generate(1024)


@pytest.fixture
def keys(tmp_path):
    """Two client keys on disk: ``good`` (the server's) and ``other``."""
    paths = {}
    for name in ("good", "other"):
        key = paramiko.RSAKey.generate(1024)
        path = str(tmp_path / name)
        key.write_private_key_file(path)
        paths[name] = (path, key)
    locked = paramiko.RSAKey.generate(1024)
    locked.write_private_key_file(str(tmp_path / "locked"), password="secret")
    paths["locked"] = (str(tmp_path / "locked"), locked)
    return paths


@pytest.fixture
def sshd(host_key, keys):
    """The port of a real ssh server that lets the ``good`` key in as root."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()
    threads = []

    def session(conn):
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        server = SSHServer(keys["good"][1])
        try:
            transport.start_server(server=server)
            chan = transport.accept(10)
            if chan is None or not server.event.wait(10):
                return
            done = subprocess.run(["sh", "-c", server.command.decode()], capture_output=True, timeout=30, check=False)
            chan.sendall(done.stdout)
            chan.sendall_stderr(done.stderr)
            chan.send_exit_status(done.returncode)
            chan.close()
        except (paramiko.SSHException, EOFError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            time.sleep(0.1)
            transport.close()

    def serve():
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=session, args=(conn,))
            thread.daemon = True
            thread.start()
            threads.append(thread)

    thread = threading.Thread(target=serve)
    thread.daemon = True
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def fingerprint(key):
    return "ssh-rsa SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_command_runs_over_ssh_exit_status_output_and_host_key(prefix, sshd, keys, host_key):
    checker = Checker(where(prefix))
    target = "ssh root@127.0.0.1:%d" % sshd
    seen = "%s (host key %s)" % (target, fingerprint(host_key))
    plan, server, check = check_of(type="command", command="echo up; echo err >&2", ssh_port=sshd, key_file=keys["good"][0])
    assert checker.check(server, check, 10) == (True, "%s: 'echo up; echo err >&2' exited 0: up\nerr" % seen)
    plan, server, check = check_of(type="command", command="echo no; exit 3", ssh_port=sshd, key_file=keys["good"][0])
    assert checker.check(server, check, 10) == (False, "%s: 'echo no; exit 3' exited 3, not 0: no" % seen)
    plan, server, check = check_of(type="command", command="exit 3", expect_rc=3, ssh_port=sshd, key_file=keys["good"][0])
    assert checker.check(server, check, 10) == (True, "%s: 'exit 3' exited 3" % seen)


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_ssh_errors_are_precise(prefix, sshd, keys, closed_port, tmp_path):
    checker = Checker(where(prefix))
    target = "ssh root@127.0.0.1:%d" % sshd

    def output(**keys_):
        plan, server, check = check_of(type="command", command="true", **keys_)
        ok, out = checker.check(server, check, 10)
        assert not ok
        return out

    out = output(ssh_port=sshd, key_file=keys["other"][0])
    assert out.startswith(target + ": authentication failed (the key file %s)" % keys["other"][0]), out
    out = output(ssh_port=sshd, key_file=keys["locked"][0])
    assert out == target + ": the key file %s needs a passphrase (none is asked for)" % keys["locked"][0]
    missing = str(tmp_path / "missing")
    out = output(ssh_port=sshd, key_file=missing)
    assert out.startswith(target + ": cannot read the key file %s: " % missing), out
    (tmp_path / "junk").write_text("not a key\n")
    out = output(ssh_port=sshd, key_file=str(tmp_path / "junk"))
    assert out.startswith(target + ": the key file %s is not a private key" % (tmp_path / "junk")), out
    out = output(ssh_port=closed_port, key_file=keys["good"][0])
    assert out == "ssh root@127.0.0.1:%d: connection refused" % closed_port


@pytest.mark.parametrize("prefix", [HERE, INSIDE], ids=["here", "inside"])
def test_ssh_is_bounded_by_the_timeout(prefix, sshd, keys, listening):
    checker = Checker(where(prefix))
    plan, server, check = check_of(type="command", command="true", ssh_port=listening, key_file=keys["good"][0])
    started = time.monotonic()
    ok, out = checker.check(server, check, 2)
    assert time.monotonic() - started < 2.5
    assert not ok and out.startswith("ssh root@127.0.0.1:%d: no ssh answer within " % listening), out
    plan, server, check = check_of(type="command", command="sleep 10", ssh_port=sshd, key_file=keys["good"][0])
    started = time.monotonic()
    ok, out = checker.check(server, check, 3)
    assert time.monotonic() - started < 3.5
    assert not ok and out.startswith("ssh root@127.0.0.1:%d: the command did not end within " % sshd), out


def test_ssh_without_paramiko_says_so(tmp_path, sshd, keys):
    (tmp_path / "paramiko.py").write_text("raise ImportError('no paramiko here')\n")
    plan, server, check = check_of(type="command", command="true", ssh_port=sshd, key_file=keys["good"][0])
    ok, out = Checker(where(["env", "PYTHONPATH=%s" % tmp_path])).check(server, check, 10)
    assert not ok and "needs the Python library paramiko" in out and "pip install paramiko" in out


class AgentProvider:
    """A provider whose guest agent answers as the test says."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def guest_exec(self, name, argv, timeout):
        self.calls.append((getattr(name, "name", name), argv, timeout))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_guest_agent_runs_sh_c_through_the_provider():
    plan, server, check = check_of(type="guest_agent", command="test -b /dev/vda")
    provider = AgentProvider({"rc": 0, "stdout": "fine\n", "stderr": ""})
    assert Checker(providers={"qemu": provider}).check(server, check, 5) == (
        True,
        "guest agent: 'test -b /dev/vda' exited 0: fine",
    )
    assert provider.calls[0][:2] == ("s1", ["/bin/sh", "-c", "test -b /dev/vda"])
    assert 0 < provider.calls[0][2] <= 5
    provider.answer = {"rc": 1, "stdout": "", "stderr": "no disk\n"}
    assert Checker(providers=provider).check(server, check, 5) == (
        False,
        "guest agent: 'test -b /dev/vda' exited 1, not 0: no disk",
    )
    provider.answer = ProviderTimeout("s1", "guest_exec", "the guest agent did not answer guest-sync-delimited within 4.4 s")
    ok, out = Checker(in_server_network(plan, {"qemu": provider})).check(server, check, 5)
    assert not ok and out == "guest agent: vm 's1': guest_exec: the guest agent did not answer guest-sync-delimited within 4.4 s"


def test_guest_agent_without_a_provider_says_so():
    plan, server, check = check_of(type="guest_agent", command="true")
    ok, output = Checker().check(server, check, 5)
    assert not ok and "guest_agent checks run through the server's provider" in output


def test_a_probe_that_cannot_run_says_so(listening):
    plan, server, check = check_of(type="tcp", port=listening)
    ok, output = Checker(where(["/nonexistent/netns-exec"])).check(server, check, 5)
    assert not ok and "cannot run the probe" in output
    ok, output = Checker(where(["sh", "-c", "echo broken >&2; exit 1", "x"])).check(server, check, 5)
    assert not ok and "the probe failed (exit 1): broken" in output


class NetnsProvider:
    def __init__(self):
        self.asked = []

    def network_command(self, name, argv):
        self.asked.append(name)
        return ["env"] + list(argv)


def test_in_server_network_picks_the_nic_of_the_checks_host():
    plan = parse_plan(
        {
            "name": "p",
            "networks": {"a": {"cidr": "10.1.0.0/24"}, "b": {"cidr": "10.2.0.0/24"}},
            "groups": [
                {
                    "name": "g",
                    "servers": [
                        {
                            "name": "s1",
                            "nics": [{"network": "a", "ip": "10.1.0.5/24"}, {"network": "b", "ip": "10.2.0.5/24"}],
                            "health_check": {"type": "tcp", "host": "10.2.0.5", "port": 1},
                        },
                        {"name": "s2", "health_check": {"type": "http", "url": "http://10.9.0.1/"}},
                        {"name": "s3", "network": "a", "health_check": {"type": "http", "url": "http://10.2.0.7:80/x"}},
                    ],
                }
            ],
        }
    )
    provider = NetnsProvider()
    where_ = in_server_network(plan, {"qemu": provider})
    s1, s2, s3 = plan.groups[0].servers
    assert where_(s1, s1.health_check) == ["env"] and provider.asked == ["b"]
    assert where_(s2, s2.health_check) is None  # no NIC: here
    assert where_(s3, s3.health_check) == ["env"] and provider.asked == ["b", "a"]  # its only NIC
    assert in_server_network(plan, object())(s1, s1.health_check) is None  # no network_command


class UpProvider:
    """A provider whose VMs are nothing: the checks are real."""

    def __getattr__(self, name):
        return lambda *args: True

    def status(self, name, timeout):
        return {"state": "absent"}


def test_the_engine_with_real_checks_reports_the_last_error(listening, closed_port):
    plan = parse_plan(
        {
            "name": "p",
            "networks": {"lan": {"cidr": "127.0.0.0/8"}},
            "groups": [
                {
                    "name": "g",
                    "timeout_seconds": 30,
                    "servers": [
                        {
                            "name": "up",
                            "nics": [{"network": "lan", "ip": "127.0.0.1/8"}],
                            "health_check": {"type": "tcp", "port": listening, "interval_seconds": 0.1},
                        },
                        {
                            "name": "down",
                            "nics": [{"network": "lan", "ip": "127.0.0.2/8"}],
                            "health_check": {
                                "type": "tcp",
                                "host": "127.0.0.1",
                                "port": closed_port,
                                "timeout_seconds": 1,
                                "interval_seconds": 0.2,
                            },
                        },
                    ],
                }
            ],
        }
    )
    started = time.monotonic()
    result = PlanRun(plan, UpProvider(), Checker(where(INSIDE))).run()
    assert time.monotonic() - started < 10
    assert not result["ok"]
    failed = result["failed"]
    assert failed["server"] == "down" and failed["step"] == "health_check"
    assert failed["check"] == "tcp 127.0.0.1:%d" % closed_port
    assert "did not pass within its 1 s" in failed["output"] and "refused" in failed["output"].lower()
