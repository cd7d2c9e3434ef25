# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The qemu provider's guest agent client (guest_exec) against a scripted
agent on a real unix socket: the sync, guest-exec, the status polls, the
answers parsed, and an agent that does not answer bounded by the deadline."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import json
import os
import socket
import threading
import time

import pytest

from ansible_collections.haven.dr.plugins.module_utils.providers._base import ProviderError, ProviderTimeout
from ansible_collections.haven.dr.plugins.module_utils.providers.qemu import _Deadline, exec_result, qga_exec


def b64(text):
    return base64.b64encode(text.encode()).decode()


def test_exec_result_decodes_outputs_signals_and_truncation():
    assert exec_result({"exited": False}) is None
    assert exec_result(None) is None
    assert exec_result({"exited": True, "exitcode": 0, "out-data": b64("up\n")}) == {"rc": 0, "stdout": "up\n", "stderr": ""}
    got = exec_result({"exited": True, "exitcode": 2, "err-data": b64("bad"), "err-truncated": True})
    assert got == {"rc": 2, "stdout": "", "stderr": "bad[truncated]"}
    assert exec_result({"exited": True, "signal": 9})["rc"] == 137
    assert exec_result({"exited": True, "exitcode": 0, "out-data": "@@not base64"})["stdout"].startswith("(out-data is not base64")


class Agent:
    """A scripted qemu-ga on a unix socket: answers guest-sync(-delimited)
    with the 0xFF it owes, guest-exec with pid 42, guest-exec-status
    ``running`` times with exited false, then ``status``."""

    def __init__(self, path, status=None, running=2, junk=b"", delimited=True, silent=False, exec_error=None):
        self.status = status or {"exited": True, "exitcode": 0, "out-data": b64("fine\n")}
        self.running = running
        self.junk = junk
        self.delimited = delimited
        self.silent = silent
        self.exec_error = exec_error
        self.requests = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def serve(self):
        conn, _addr = self.listener.accept()
        with conn:
            buf = b""
            if self.junk:
                conn.sendall(self.junk)  # what an earlier session left in the pipe
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    request = json.loads(line.lstrip(b"\xff").decode())
                    self.requests.append(request)
                    if self.silent:
                        continue
                    conn.sendall(self.answer(request))

    def answer(self, request):
        command = request["execute"]
        if command == "guest-sync-delimited":
            if not self.delimited:
                return b'{"error": {"class": "CommandNotFound", "desc": "not here"}}\n'
            return b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
        if command == "guest-sync":
            return json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
        if command == "guest-exec":
            if self.exec_error:
                return json.dumps({"error": {"class": "GenericError", "desc": self.exec_error}}).encode() + b"\n"
            return b'{"return": {"pid": 42}}\n'
        if command == "guest-exec-status":
            if self.running > 0:
                self.running -= 1
                return b'{"return": {"exited": false}}\n'
            return json.dumps({"return": self.status}).encode() + b"\n"
        return b'{"error": {"class": "CommandNotFound", "desc": "?"}}\n'

    def close(self):
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def sock_path(tmp_path):
    path = str(tmp_path / "qga.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_guest_exec_syncs_runs_and_polls_until_exited(sock_path):
    agent = Agent(sock_path, junk=b'{"return": {"exited": false}}\n{"return": 7}\n', running=2)
    try:
        got = qga_exec(sock_path, ["/bin/sh", "-c", "test -b /dev/vda"], _Deadline(5), "db1")
    finally:
        agent.close()
    assert got == {"rc": 0, "stdout": "fine\n", "stderr": ""}
    commands = [r["execute"] for r in agent.requests]
    assert commands == ["guest-sync-delimited", "guest-exec"] + ["guest-exec-status"] * 3
    assert agent.requests[1]["arguments"] == {"path": "/bin/sh", "arg": ["-c", "test -b /dev/vda"], "capture-output": True}
    assert agent.requests[2]["arguments"] == {"pid": 42}


def test_an_agent_without_guest_sync_delimited_is_synced_with_guest_sync(sock_path):
    agent = Agent(sock_path, delimited=False, running=0, status={"exited": True, "exitcode": 3})
    try:
        got = qga_exec(sock_path, ["/bin/sh", "-c", "exit 3"], _Deadline(5), "db1")
    finally:
        agent.close()
    assert got["rc"] == 3
    assert [r["execute"] for r in agent.requests][:3] == ["guest-sync-delimited", "guest-sync", "guest-exec"]


def test_an_agent_that_does_not_answer_times_out_naming_it(sock_path):
    agent = Agent(sock_path, silent=True)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderTimeout) as err:
            qga_exec(sock_path, ["/bin/sh", "-c", "true"], _Deadline(1), "db1")
    finally:
        agent.close()
    assert time.monotonic() - started < 2
    assert str(err.value) == (
        "vm 'db1': guest_exec: the guest agent did not answer guest-sync-delimited within 1 s (is qemu-ga running in the guest?)"
    )


def test_a_process_that_does_not_exit_times_out_with_its_pid(sock_path):
    agent = Agent(sock_path, running=10**6)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderTimeout) as err:
            qga_exec(sock_path, ["/bin/sh", "-c", "sleep 100"], _Deadline(1), "db1")
    finally:
        agent.close()
    assert time.monotonic() - started < 2
    assert "/bin/sh -c sleep 100 (pid 42 in the guest) did not exit within 1 s" in str(err.value)


def test_errors_of_the_agent_and_of_the_socket_name_the_vm(sock_path, tmp_path):
    agent = Agent(sock_path, exec_error="Failed to execute child process")
    try:
        with pytest.raises(ProviderError) as err:
            qga_exec(sock_path, ["/nonexistent"], _Deadline(5), "db1")
    finally:
        agent.close()
    assert str(err.value) == "vm 'db1': guest_exec: guest-exec: Failed to execute child process"
    with pytest.raises(ProviderError) as err:
        qga_exec(str(tmp_path / "none.sock"), ["/bin/true"], _Deadline(5), "db1")
    assert str(err.value).startswith("vm 'db1': guest_exec: cannot connect to %s: " % (tmp_path / "none.sock"))
