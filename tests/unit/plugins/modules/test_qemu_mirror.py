# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""haven.dr.qemu_mirror against a fake QEMU on a real unix socket: the QMP
greeting, qmp_capabilities, the block commands it uses and their errors, a
mirror job that copies, becomes ready, pauses on an export error or fails."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import shutil
import socket
import tempfile
import threading

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.module_utils import _qmp
from ansible_collections.haven.dr.plugins.modules import qemu_mirror, qemu_mirror_info

SIZE = 64 << 20
EXPORT = "nbd://127.0.0.1:10809/db1-vda"


class FakeQemu:
    """QEMU's QMP as far as the module uses it: one disk (device vda, drive
    drive0, node disk0), NBD nodes that open when their export is in
    ``exports``, mirror jobs that copy half of the disk per look and then are
    ready. ``commands`` is every command received, in order."""

    def __init__(self, path, greeting=None):
        self.path = path
        self.greeting = greeting
        self.blocks = [
            {
                "device": "drive0",
                "qdev": "/machine/peripheral/vda/virtio-backend",
                "io-status": "ok",
                "inserted": {
                    "node-name": "disk0",
                    "drv": "qcow2",
                    "file": "/vms/db1/vda.qcow2",
                    "image": {"virtual-size": SIZE, "filename": "/vms/db1/vda.qcow2", "format": "qcow2"},
                },
            },
            {"device": "ide0-cd0", "qdev": "/machine/unattached/device[20]", "io-status": "ok"},
        ]
        self.exports = {("127.0.0.1", "10809", "db1-vda"): SIZE, ("127.0.0.1", "10809", "other"): SIZE}
        self.jobs = {}
        self.nodes = {}
        self.commands = []
        self.on_look = None  # a function (job) run at each query-block-jobs
        self.copying = True  # whether a running job copies at each look
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def changes(self):
        return [c for c, _a in self.commands if not c.startswith("query-") and c != "qmp_capabilities"]

    def serve(self):
        while True:
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self.session(conn)
                except OSError:
                    pass

    def session(self, conn):
        if self.greeting is not None:
            conn.sendall(self.greeting)
            return
        conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}).encode() + b"\n")
        buf = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line.decode())
                command, args = request["execute"], request.get("arguments") or {}
                self.commands.append((command, args))
                conn.sendall(json.dumps({"event": "SOMETHING", "data": {}}).encode() + b"\n")  # events interleave
                try:
                    reply = {"return": self.answer(command, args)}
                except ValueError as exc:
                    reply = {"error": {"class": "GenericError", "desc": str(exc)}}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def answer(self, command, args):
        if command == "qmp_capabilities":
            return {}
        if command == "query-block":
            return self.blocks
        if command == "query-block-jobs":
            for job in self.jobs.values():
                self.step(job)
            return [dict(j) for j in self.jobs.values()]
        if command == "query-named-block-nodes":
            return [dict(n) for n in self.nodes.values()] + [{"node-name": "disk0", "drv": "qcow2", "file": "/vms/db1/vda.qcow2"}]
        if command == "blockdev-add":
            server = args["server"]
            key = (server.get("host"), server.get("port"), args["export"])
            if key[:2] != ("127.0.0.1", "10809"):
                raise ValueError("Failed to connect to '%s:%s': Connection refused" % key[:2])
            if key not in self.exports:
                raise ValueError("Requested export not available")
            name = args["node-name"]
            if name in self.nodes:
                raise ValueError("node-name=%s is conflicting with a device id" % name)
            uri = "nbd://%s:%s/%s" % key
            self.nodes[name] = {"node-name": name, "drv": "nbd", "file": uri, "image": {"virtual-size": self.exports[key]}}
            return {}
        if command == "blockdev-mirror":
            if args["device"] not in ("drive0", "disk0"):
                raise ValueError("Cannot find device='%s' nor node-name='%s'" % (args["device"], args["device"]))
            if self.jobs:
                raise ValueError("Node 'disk0' is busy: block device is in use by block job: mirror")
            self.jobs[args["job-id"]] = {
                "device": args["job-id"],
                "type": "mirror",
                "len": SIZE,
                "offset": 0,
                "status": "running",
                "ready": False,
                "io-status": "ok",
                "paused": False,
                "busy": True,
                "auto-dismiss": args.get("auto-dismiss", True),
                "_target": args["target"],
            }
            return {}
        if command == "block-job-cancel":
            job = self.job(args["device"])
            job.update(status="concluded", error=None if job["ready"] and not args.get("force") else "Operation canceled")
            return {}
        if command == "block-job-resume":
            job = self.job(args["device"])
            if job["status"] not in ("paused", "standby"):
                raise ValueError("Job '%s' is not paused" % args["device"])
            job.update(status="ready" if job["ready"] else "running", paused=False)
            job["io-status"] = "ok"
            return {}
        if command == "job-dismiss":
            job = self.job(args["id"])
            if job["status"] != "concluded":
                raise ValueError("Job '%s' in state '%s' cannot accept command verb 'dismiss'" % (args["id"], job["status"]))
            del self.jobs[args["id"]]
            return {}
        if command == "blockdev-del":
            name = args["node-name"]
            if name not in self.nodes:
                raise ValueError("Failed to find node with node-name='%s'" % name)
            if [j for j in self.jobs.values() if j.get("_target") == name]:
                raise ValueError("Node %s is in use" % name)
            del self.nodes[name]
            return {}
        raise ValueError("The command %s has not been found" % command)

    def job(self, job_id):
        if job_id not in self.jobs:
            raise ValueError("Job ID '%s' not found" % job_id)
        return self.jobs[job_id]

    def step(self, job):
        if self.on_look is not None:
            self.on_look(job)
        if job["status"] == "ready":
            job["offset"] = job["len"]  # the guest's writes on the export as they come
        if job["status"] == "running" and self.copying:
            job["offset"] = min(job["len"], job["offset"] + SIZE // 2)
            if job["offset"] == job["len"]:
                job.update(status="ready", ready=True)

    def close(self):
        self.listener.close()


@pytest.fixture
def qemu(monkeypatch):
    # the fake's exports are not served: reaching them is taken for granted unless a test says otherwise
    monkeypatch.setattr(qemu_mirror, "unreachable", lambda server, timeout: None)
    where = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")  # short: a unix socket path is at most 107 bytes
    fake = FakeQemu(os.path.join(where, "qmp.sock"))
    yield fake
    fake.close()
    shutil.rmtree(where, ignore_errors=True)


def run(capsys, module=qemu_mirror, **args):
    args.setdefault("device", "vda")
    if module is qemu_mirror:
        args.setdefault("wait_interval", 0.01)
    args.setdefault("qmp_timeout", 5)
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


def test_present_starts_a_write_blocking_mirror_left_ready_and_again_changes_nothing(qemu, capsys):
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT, _ansible_diff=True)
    assert result["changed"] and result["action"] == "started", result
    assert result["disk"]["virtual_size"] == SIZE and result["disk"]["device"] == "vda"
    assert result["disk"]["drive"] == "drive0" and result["disk"]["node_name"] == "disk0"
    mirror = result["mirror"]
    assert mirror["job"] == "haven-mirror-vda" and mirror["node"] == "haven-nbd-vda"
    assert mirror["status"] == "ready" and mirror["bytes"] == mirror["total"] == SIZE and mirror["export"] == EXPORT
    assert result["diff"] == {
        "before": {"mirror": None},
        "after": {"mirror": {"job": "haven-mirror-vda", "export": EXPORT, "status": "ready"}},
    }
    assert "ready" in result["progress_lines"][-1] and len(result["progress_lines"]) >= 2
    added = dict(qemu.commands)["blockdev-add"]
    assert added == {
        "driver": "nbd",
        "node-name": "haven-nbd-vda",
        "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"},
        "export": "db1-vda",
        "reconnect-delay": 5,
    }
    mirrored = dict(qemu.commands)["blockdev-mirror"]
    assert mirrored == {
        "job-id": "haven-mirror-vda",
        "device": "drive0",
        "target": "haven-nbd-vda",
        "sync": "full",
        "copy-mode": "write-blocking",
        "on-source-error": "report",
        "on-target-error": "stop",
        "auto-dismiss": False,
    }
    assert qemu.changes() == ["blockdev-add", "blockdev-mirror"]
    again = run(capsys, qmp_socket=qemu.path, device="drive0", export="nbd://127.0.0.1/db1-vda", _ansible_diff=True)
    assert not again["changed"] and again["action"] == "none" and "diff" not in again
    assert again["mirror"]["status"] == "ready"
    assert qemu.changes() == ["blockdev-add", "blockdev-mirror"]


def test_options_reach_qemu(qemu, capsys):
    run(capsys, qmp_socket=qemu.path, export=EXPORT, copy_mode="background", on_target_error="report",
        reconnect_delay=0, speed=1048576, wait=False)
    commands = dict(qemu.commands)
    assert "reconnect-delay" not in commands["blockdev-add"]
    mirror = commands["blockdev-mirror"]
    assert mirror["copy-mode"] == "background" and mirror["on-target-error"] == "report" and mirror["speed"] == 1048576


def test_check_mode_changes_nothing(qemu, capsys):
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT, _ansible_check_mode=True, _ansible_diff=True)
    assert result["changed"] and result["action"] == "started" and result["mirror"] is None
    assert result["diff"]["before"] == {"mirror": None}
    assert qemu.changes() == []
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    gone = run(capsys, qmp_socket=qemu.path, state="absent", _ansible_check_mode=True)
    assert gone["changed"] and gone["action"] == "cancelled" and gone["mirror"]["status"] == "ready"
    assert qemu.changes() == ["blockdev-add", "blockdev-mirror"]


def test_another_export_fails_naming_it_unless_force(qemu, capsys):
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    other = "nbd://127.0.0.1:10809/other"
    refused = run(capsys, qmp_socket=qemu.path, export=other)
    assert refused["failed"] and "mirrored to %s by job haven-mirror-vda" % EXPORT in refused["msg"]
    assert "force=true" in refused["msg"]
    assert qemu.changes() == ["blockdev-add", "blockdev-mirror"]
    replaced = run(capsys, qmp_socket=qemu.path, export=other, force=True)
    assert replaced["changed"] and replaced["action"] == "replaced" and replaced["mirror"]["export"] == other
    assert qemu.changes()[2:] == ["block-job-cancel", "job-dismiss", "blockdev-del", "blockdev-add", "blockdev-mirror"]
    assert [a for c, a in qemu.commands if c == "block-job-cancel"] == [{"device": "haven-mirror-vda", "force": True}]


def test_a_job_paused_on_an_export_error_is_resumed(qemu, capsys):
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    qemu.jobs["haven-mirror-vda"].update({"status": "standby", "paused": True, "io-status": "failed", "len": SIZE + 8192})
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["changed"] and result["action"] == "resumed"
    assert qemu.changes()[2:] == ["block-job-resume"]
    assert result["mirror"]["io_status"] == "ok" and result["mirror"]["bytes"] == SIZE + 8192


def test_a_resumed_job_that_fails_again_is_replaced_by_a_new_full_copy(qemu, capsys, monkeypatch):
    monkeypatch.setattr(qemu_mirror, "RESUME_PROBE_SECONDS", 0.2)
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    qemu.jobs["haven-mirror-vda"].update({"status": "standby", "paused": True, "io-status": "failed"})

    def fail_again(job):  # the first connection is dead: every resume of its job fails at once
        if [c for c, _a in qemu.commands].count("blockdev-add") == 1 and job["status"] == "ready":
            job.update({"status": "standby", "paused": True, "io-status": "failed"})

    qemu.on_look = fail_again
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result.get("changed") and result["action"] == "restarted", result
    assert result["mirror"]["status"] == "ready" and result["mirror"]["io_status"] == "ok"
    assert "failed again at once" in json.dumps(result["warnings"])
    changes = qemu.changes()[2:]
    assert changes[0] == "block-job-resume" and changes[-5:] == [
        "block-job-cancel", "job-dismiss", "blockdev-del", "blockdev-add", "blockdev-mirror"]


def test_a_paused_job_is_kept_while_the_export_cannot_be_reached(qemu, capsys, monkeypatch):
    monkeypatch.setattr(qemu_mirror, "RESUME_PROBE_SECONDS", 0.2)
    monkeypatch.setattr(qemu_mirror, "unreachable", lambda server, timeout: "[Errno 111] Connection refused")
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    qemu.on_look = lambda j: j.update({"status": "standby", "paused": True, "io-status": "failed"})
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["failed"] and "cannot reach the export %s" % EXPORT in result["msg"]
    assert "is left as it is" in result["msg"]
    assert "haven-mirror-vda" in qemu.jobs and "blockdev-del" not in qemu.changes()


def test_a_job_that_ended_is_started_again_with_a_warning(qemu, capsys):
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    qemu.jobs["haven-mirror-vda"].update({"status": "concluded", "error": "Input/output error"})
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["changed"] and result["action"] == "restarted" and result["mirror"]["status"] == "ready"
    assert "Input/output error" in json.dumps(result["warnings"])
    assert qemu.changes()[2:] == ["job-dismiss", "blockdev-del", "blockdev-add", "blockdev-mirror"]


def test_a_job_failing_while_waited_for_fails_with_its_error(qemu, capsys):
    qemu.on_look = lambda j: j.update({"status": "concluded", "error": "Input/output error"}) if j["offset"] else None
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["failed"] and result["msg"] == "the mirror of vda to %s failed: Input/output error" % EXPORT
    assert result["changed"] and result["action"] == "started" and result["progress_lines"]


def test_a_job_paused_on_an_error_while_waited_for_fails_saying_so(qemu, capsys):
    qemu.on_look = lambda j: j.update({"status": "paused", "paused": True, "io-status": "failed"}) if j["offset"] else None
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["failed"] and "paused on a write error to the export (io-status failed)" in result["msg"]
    assert "next run resumes" in result["msg"]


def test_a_wait_that_runs_out_returns_what_it_saw(qemu, capsys):
    qemu.copying = False
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT, wait_timeout=0.1)
    assert result["failed"] and "is not ready: running, 0 of %d bytes (0 %%)" % SIZE in result["msg"]
    assert result["mirror"]["status"] == "running" and result["progress_lines"] and result["changed"]


def test_absent_cancels_the_job_and_removes_the_node(qemu, capsys):
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    result = run(capsys, qmp_socket=qemu.path, state="absent", _ansible_diff=True)
    assert result["changed"] and result["action"] == "cancelled" and result["mirror"] is None
    assert result["diff"]["before"]["mirror"]["job"] == "haven-mirror-vda"
    assert result["diff"]["after"] == {"mirror": None}
    assert qemu.changes()[2:] == ["block-job-cancel", "job-dismiss", "blockdev-del"]
    assert dict(qemu.commands)["block-job-cancel"] == {"device": "haven-mirror-vda", "force": False}
    assert qemu.jobs == {} and qemu.nodes == {}
    again = run(capsys, qmp_socket=qemu.path, state="absent")
    assert not again["changed"] and again["action"] == "none"


def test_absent_removes_a_leftover_node(qemu, capsys):
    qemu.nodes["haven-nbd-vda"] = {"node-name": "haven-nbd-vda", "drv": "nbd", "file": EXPORT}
    result = run(capsys, qmp_socket=qemu.path, state="absent")
    assert result["changed"] and result["action"] == "removed" and qemu.nodes == {}


def test_absent_of_a_vm_that_is_not_running_changes_nothing(capsys):
    result = run(capsys, qmp_socket="/nonexistent/qmp.sock", state="absent")
    assert not result["changed"] and "the VM is not running" in json.dumps(result["warnings"])


def test_info_reports_the_disk_and_its_mirror_and_changes_nothing(qemu, capsys):
    result = run(capsys, qemu_mirror_info, qmp_socket=qemu.path, device="disk0")
    assert not result["changed"] and result["mirror"] is None
    assert result["disk"] == {
        "device": "vda",
        "qdev": "/machine/peripheral/vda/virtio-backend",
        "drive": "drive0",
        "node_name": "disk0",
        "file": "/vms/db1/vda.qcow2",
        "format": "qcow2",
        "virtual_size": SIZE,
    }
    assert qemu.changes() == []
    run(capsys, qmp_socket=qemu.path, export=EXPORT)
    mirrored = run(capsys, qemu_mirror_info, qmp_socket=qemu.path, device="drive0")
    assert mirrored["mirror"]["job"] == "haven-mirror-vda" and mirrored["mirror"]["export"] == EXPORT
    assert mirrored["mirror"]["status"] == "ready" and qemu.changes() == ["blockdev-add", "blockdev-mirror"]
    unknown = run(capsys, qemu_mirror_info, qmp_socket=qemu.path, device="vdz")
    assert unknown["failed"] and unknown["msg"].startswith("device vdz is not a disk of this VM; its disks: vda")


def test_an_unknown_device_fails_listing_the_disks(qemu, capsys):
    result = run(capsys, qmp_socket=qemu.path, device="vdz", export=EXPORT)
    assert result["failed"]
    assert result["msg"] == (
        "device vdz is not a disk of this VM; its disks: vda (drive drive0, node disk0, qcow2 /vms/db1/vda.qcow2, "
        "67108864 bytes), ide0-cd0 (no medium)"
    )
    assert qemu.changes() == []
    empty = run(capsys, qmp_socket=qemu.path, device="ide0-cd0", export=EXPORT)
    assert empty["failed"] and "has no medium" in empty["msg"]


def test_an_unreachable_export_fails_with_qemus_error_and_leaves_nothing(qemu, capsys):
    result = run(capsys, qmp_socket=qemu.path, export="nbd://127.0.0.1:1/db1-vda")
    assert result["failed"]
    assert result["msg"] == (
        "cannot open the export nbd://127.0.0.1:1/db1-vda from QEMU: Failed to connect to '127.0.0.1:1': Connection refused"
    )
    unknown = run(capsys, qmp_socket=qemu.path, export="nbd://127.0.0.1:10809/nope")
    assert unknown["failed"] and unknown["msg"].endswith("Requested export not available")
    assert qemu.nodes == {} and qemu.jobs == {}


def test_an_export_of_another_size_is_refused_and_its_node_removed(qemu, capsys):
    qemu.exports[("127.0.0.1", "10809", "small")] = SIZE // 2
    result = run(capsys, qmp_socket=qemu.path, export="nbd://127.0.0.1:10809/small")
    assert result["failed"] and "has %d bytes, the disk vda %d" % (SIZE // 2, SIZE) in result["msg"]
    assert qemu.nodes == {} and qemu.changes() == ["blockdev-add", "blockdev-del"]


def test_a_device_busy_with_another_job_fails_naming_the_jobs(qemu, capsys):
    qemu.jobs["backup0"] = {"device": "backup0", "type": "backup", "status": "running", "len": SIZE * 99, "offset": 0,
                            "ready": False, "io-status": "ok"}
    result = run(capsys, qmp_socket=qemu.path, export=EXPORT)
    assert result["failed"] and "block device is in use by block job" in result["msg"]
    assert "the VM's block jobs: backup0 (backup, running)" in result["msg"]
    assert "haven-nbd-vda" not in qemu.nodes


def test_no_socket_and_not_a_qmp_socket(qemu, capsys, tmp_path):
    missing = run(capsys, qmp_socket=str(tmp_path / "none.sock"), export=EXPORT)
    assert missing["failed"] and missing["msg"].startswith("no QMP socket at %s" % (tmp_path / "none.sock"))
    plain = tmp_path / "file"
    plain.write_text("")
    not_socket = run(capsys, qmp_socket=str(plain), export=EXPORT)
    assert not_socket["failed"] and "is not a unix socket" in not_socket["msg"]
    where = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    try:
        other = FakeQemu(os.path.join(where, "other.sock"), greeting=b'{"hello": "world"}\n')
        result = run(capsys, qmp_socket=other.path, export=EXPORT)
        assert result["failed"] and "is not a QMP socket: it greeted with {\"hello\": \"world\"}" in result["msg"]
        other.close()
        silent = FakeQemu(os.path.join(where, "silent.sock"), greeting=b"")
        result = run(capsys, qmp_socket=silent.path, export=EXPORT, qmp_timeout=0.2)
        assert result["failed"] and "no QMP greeting" in result["msg"]
        silent.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_bad_export_uris_fail_before_qemu_is_asked(qemu, capsys):
    for uri, why in (("http://x/y", "not an NBD URI"), ("nbd:///x", "no host"), ("nbd+unix:///x", "no socket")):
        result = run(capsys, qmp_socket=qemu.path, export=uri)
        assert result["failed"] and why in result["msg"]
    assert qemu.commands == []


@pytest.mark.parametrize(
    ("uri", "server", "export", "canonical"),
    [
        ("nbd://src1:10809/db", {"type": "inet", "host": "src1", "port": "10809"}, "db", "nbd://src1:10809/db"),
        ("nbd://src1/db", {"type": "inet", "host": "src1", "port": "10809"}, "db", "nbd://src1:10809/db"),
        ("nbd://[::1]:10900/db", {"type": "inet", "host": "::1", "port": "10900"}, "db", "nbd://[::1]:10900/db"),
        ("nbd+unix:///db?socket=/run/h.sock", {"type": "unix", "path": "/run/h.sock"}, "db",
         "nbd+unix:///db?socket=/run/h.sock"),
        ('json:{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1"}, "export": "e"}',
         {"type": "inet", "host": "h", "port": "1"}, "e", "nbd://h:1/e"),
    ],
)
def test_parse_export(uri, server, export, canonical):
    assert _qmp.parse_export(uri) == (server, export)
    assert _qmp.canonical(uri) == canonical


def test_names_fit_qemus_limits():
    long_block = {"device": "", "qdev": "/machine/peripheral/a-very-long-device-id-indeed/virtio-backend"}
    job, node = _qmp.names_of(long_block)
    assert len(node) <= 31 and node.startswith("haven-nbd-a-very") and job.startswith("haven-mirror-a-very")
    job2, node2 = _qmp.names_of({"device": "", "qdev": "/machine/peripheral/a-very-long-device-id-indeed2/x"})
    assert node2 != node
    anon = {"device": "", "qdev": "/machine/peripheral-anon/device[3]/virtio-backend", "inserted": {"node-name": "#block1"}}
    job, node = _qmp.names_of(anon)
    assert _qmp.disk_key(anon) == "#block1" and node.startswith("haven-nbd--block1-") and len(node) <= 31
