# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""QEMU over QMP, for the modules that run on a hypervisor (internal use
only): a QMP session over a VM's unix socket (standard library only), a
VM's disks as ``query-block`` lists them, NBD export URIs, and the block
job and NBD node that ``qemu_mirror`` names after a disk."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import re
import socket
import stat

from ansible.module_utils.six.moves.urllib.parse import parse_qs, unquote, urlsplit

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError

JOB_PREFIX = "haven-mirror-"
NODE_PREFIX = "haven-nbd-"
NODE_NAME_MAX = 31  # QEMU's node names are at most 31 characters
ENDED = ("concluded", "null")
PAUSED = ("paused", "standby")


class QmpCommandError(HavenError):
    """QEMU answered a command with an error; ``desc`` is QEMU's text."""

    def __init__(self, command, desc, klass=None):
        super(QmpCommandError, self).__init__("QMP %s: %s" % (command, desc))
        self.command = command
        self.desc = desc
        self.klass = klass


class Qmp(object):
    """One QMP session over a unix socket: the greeting checked, capabilities
    negotiated, every read bounded by ``timeout``; events are kept."""

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.events = []
        self.buf = b""
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise HavenError(
                "no QMP socket at %s (%s): is the VM running with -qmp unix:%s,server=on,wait=off?"
                % (path, exc.strerror, path)
            )
        if not stat.S_ISSOCK(mode):
            raise HavenError("%s is not a unix socket, so not a QMP socket" % path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except socket.error as exc:
                raise HavenError("cannot connect to the QMP socket %s: %s (is the VM still running?)" % (path, exc))
            try:
                greeting = self._read("greeting")
            except HavenError as exc:
                raise HavenError(
                    "%s: no QMP greeting (%s): not a QMP socket, or another client holds the VM's QMP connection"
                    % (path, exc.message)
                )
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise HavenError("%s is not a QMP socket: it greeted with %s" % (path, json.dumps(greeting)[:200]))
            self.version = (greeting["QMP"].get("version") or {}).get("qemu")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self, what):
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise HavenError("no answer to %s within %.0f s" % (what, self.timeout))
            except socket.error as exc:
                raise HavenError("QMP connection lost waiting for %s: %s" % (what, exc))
            if not chunk:
                raise HavenError("QMP connection closed waiting for %s" % what)
            self.buf += chunk
            if len(self.buf) > 16 << 20:
                raise HavenError("QMP: a line of more than 16 MiB waiting for %s" % what)
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line.decode("utf-8"))
        except ValueError:
            raise HavenError("not QMP (JSON lines) waiting for %s: %r" % (what, line[:120]))

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode("utf-8") + b"\n")
        except socket.error as exc:
            raise HavenError("QMP connection lost sending %s: %s" % (command, exc))
        while True:
            reply = self._read(command)
            if not isinstance(reply, dict):
                continue
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                error = reply["error"] or {}
                raise QmpCommandError(command, error.get("desc", json.dumps(error)), error.get("class"))
            if "event" in reply:
                self.events.append(reply)

    def close(self):
        self.sock.close()


class Session(object):
    """Opens a QMP session for each ``run`` (the socket serves one client at a
    time: others, a provider's status, get their turn between two polls)."""

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout

    def run(self, body):
        qmp = Qmp(self.path, self.timeout)
        try:
            return body(qmp)
        finally:
            qmp.close()


# ---------------------------------------------------------------- the disk


def _qdev_id(qdev):
    """``vda`` of ``/machine/peripheral/vda/virtio-backend``; an id as it is."""
    if not qdev:
        return None
    if qdev.startswith("/machine/peripheral/"):
        return qdev[len("/machine/peripheral/"):].split("/")[0]
    if qdev.startswith("/"):
        return None  # an anonymous device: its QOM path only
    return qdev


def disk_key(block):
    """What names the disk's job and node: its device id, else its drive, else its node."""
    inserted = block.get("inserted") or {}
    return _qdev_id(block.get("qdev")) or block.get("device") or inserted.get("node-name") or block.get("qdev")


def disk_names(block):
    inserted = block.get("inserted") or {}
    names = [block.get("device"), block.get("qdev"), _qdev_id(block.get("qdev")), inserted.get("node-name")]
    return [n for n in names if n]


def describe_disk(block):
    inserted = block.get("inserted")
    extra = []
    if block.get("device") and block.get("device") != disk_key(block):
        extra.append("drive %s" % block["device"])
    if inserted:
        extra.append("node %s" % inserted.get("node-name"))
        image = inserted.get("image") or {}
        extra.append("%s %s" % (inserted.get("drv"), inserted.get("file")))
        if image.get("virtual-size") is not None:
            extra.append("%d bytes" % image["virtual-size"])
    else:
        extra.append("no medium")
    return "%s (%s)" % (disk_key(block), ", ".join(extra))


def disk_info(block):
    inserted = block.get("inserted") or {}
    image = inserted.get("image") or {}
    return {
        "device": disk_key(block),
        "qdev": block.get("qdev") or None,
        "drive": block.get("device") or None,
        "node_name": inserted.get("node-name"),
        "file": inserted.get("file"),
        "format": inserted.get("drv"),
        "virtual_size": image.get("virtual-size"),
    }


def find_disk(blocks, device):
    """The ``query-block`` entry of ``device``; an unknown one fails listing those there are."""
    for block in blocks:
        if device in disk_names(block):
            if not block.get("inserted"):
                raise HavenError("device %s has no medium: nothing to mirror" % device)
            return block
    there = ", ".join(describe_disk(b) for b in blocks) or "none"
    raise HavenError("device %s is not a disk of this VM; its disks: %s" % (device, there))


def _safe(key):
    """``key`` as the end of a QEMU id, short enough for a node name."""
    room = NODE_NAME_MAX - len(NODE_PREFIX)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", key)
    if safe != key or len(safe) > room:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:6]
        safe = "%s-%s" % (safe[: room - 7], digest)
    return safe


def names_of(block):
    """(job id, NBD node name) of a disk."""
    safe = _safe(disk_key(block))
    return JOB_PREFIX + safe, NODE_PREFIX + safe


# ---------------------------------------------------------------- exports


def parse_export(uri):
    """(server dict for blockdev-add, export name) of an NBD URI."""
    if uri.startswith("json:"):  # how QEMU may show a node it cannot write as a URI
        try:
            opts = json.loads(uri[5:])
        except ValueError:
            raise HavenError("export %s: not an NBD URI" % uri)
        server = opts.get("server") or {}
        if server.get("type") == "inet":
            server = {"type": "inet", "host": server.get("host"), "port": str(server.get("port") or "10809")}
        elif server.get("type") == "unix":
            server = {"type": "unix", "path": server.get("path")}
        return server, opts.get("export") or ""
    parts = urlsplit(uri)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise HavenError("export %s: no host (nbd://HOST[:PORT]/NAME)" % uri)
        try:
            port = parts.port
        except ValueError:
            raise HavenError("export %s: the port is not a number" % uri)
        return {"type": "inet", "host": parts.hostname, "port": str(port or 10809)}, export
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets:
            raise HavenError("export %s: no socket (nbd+unix:///NAME?socket=PATH)" % uri)
        return {"type": "unix", "path": sockets[0]}, export
    raise HavenError("export %s: not an NBD URI (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)" % uri)


def export_uri(server, export):
    """The canonical URI of (server, export), to compare and to show."""
    if server.get("type") == "unix":
        return "nbd+unix:///%s?socket=%s" % (export, server.get("path"))
    host = server.get("host") or ""
    if ":" in host:
        host = "[%s]" % host
    return "nbd://%s:%s/%s" % (host, server.get("port"), export)


def canonical(uri):
    return export_uri(*parse_export(uri))


def unreachable(server, timeout):
    """Why the export's server cannot be connected to from here (the
    hypervisor, as QEMU would), or None when it can."""
    try:
        if server.get("type") == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = server.get("path")
        else:
            infos = socket.getaddrinfo(server.get("host"), int(server.get("port")), 0, socket.SOCK_STREAM)
            family, kind, proto, _name, address = infos[0]
            sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        finally:
            sock.close()
    except (socket.error, ValueError) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- the job


def job_view(job, node, export=None, eta=None):
    if job is None:
        return None
    total, done = job.get("len") or 0, job.get("offset") or 0
    return {
        "job": job.get("device"),
        "node": node,
        "export": export,
        "status": job.get("status"),
        "ready": bool(job.get("ready")),
        "io_status": job.get("io-status"),
        "bytes": done,
        "total": total,
        "eta_seconds": eta,
        "error": job.get("error"),
    }


def in_step(job, background):
    """Ready, no error, nothing left to copy (a background job: ready is enough)."""
    if job is None or job.get("status") != "ready" or job.get("io-status", "ok") != "ok":
        return False
    return background or (job.get("offset") or 0) >= (job.get("len") or 0)


def failed_paused(job):
    return job is not None and job.get("status") in PAUSED and job.get("io-status", "ok") != "ok"


def describe_job(job, elapsed=None, eta=None):
    total, done = job.get("len") or 0, job.get("offset") or 0
    line = "%s" % job.get("status")
    if total:
        line += ", %d of %d bytes (%.0f %%)" % (done, total, 100.0 * done / total)
    if eta is not None:
        line += ", ETA %.0f s" % eta
    if job.get("io-status", "ok") != "ok":
        line += ", io-status %s" % job["io-status"]
    if elapsed is not None:
        line += " after %.0f s" % elapsed
    return line


def look(qmp, device):
    """(disk, its mirror job or None, its NBD node or None) as QEMU has them now."""
    block = find_disk(qmp.execute("query-block"), device)
    job_id, node_name = names_of(block)
    jobs = [j for j in qmp.execute("query-block-jobs") if j.get("device") == job_id]
    nodes = [n for n in qmp.execute("query-named-block-nodes") if n.get("node-name") == node_name]
    return block, (jobs[0] if jobs else None), (nodes[0] if nodes else None)


def node_export(node):
    """The export an NBD node reads and writes (canonical URI), None without a node."""
    if node is None:
        return None
    try:
        return canonical(node.get("file") or "")
    except HavenError:
        return node.get("file")
