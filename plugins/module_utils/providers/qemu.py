# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The qemu provider, the embedded default (internal use only).

A VM is ``qemu-system-x86_64 -machine q35,accel=tcg`` booting a kernel and
initrd (a tiny guest of ``tools/guest_image.py`` by default), its disks NBD
exports (``-drive file=nbd://host:port/export,format=raw,if=virtio``), its
NICs tap devices on the bridge of a network, a QMP unix socket for status,
pause, resume and power, and a serial log. QEMU runs daemonized (its own
session), so it outlives the process that started it and a later one finds it.

Everything of a VM is in ``<state_dir>/vms/<name>/``: ``spec.json`` (what
create was given), ``qemu.pid``, ``qmp.sock``, ``serial.log`` (the guest's
console) and ``qemu.log`` (QEMU's own messages). A network is a network
namespace ``haven-<name>`` with a bridge ``br0``; a non-isolated one also has
a veth pair to the host (the host side holds the gateway address, the
namespace routes through it); an isolated one has nothing but the bridge, so
nothing in it reaches anything outside. The bridge holds the network's own
address (the last host of the subnet), from which health checks run inside
the network (:meth:`QemuProvider.network_command`). QEMU itself runs in the
host namespace, so its NBD connections to the target node are never part of
the guest's network; each tap is opened inside the network's namespace and
handed to QEMU as a file descriptor.

A server with ``options.image`` (a local qcow2 or raw image: a Debian guest of
``tools/debian_image.py``) boots from it: create makes ``root.qcow2`` in the
VM's directory, a copy-on-write overlay whose backing file is the image
(never written), the VM's first disk (``/dev/vda``, ``root=/dev/vda rw`` on the
kernel command line; its NBD disks follow as vdb, ...). The overlay lives as
long as the VM: power cycles keep what the guest wrote, destroy removes it.

Linux only; needs root (network namespaces, taps).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

from ansible_collections.haven.dr.plugins.module_utils.providers._base import (
    ABSENT,
    PAUSED,
    RUNNING,
    STOPPED,
    Provider,
    ProviderError,
    ProviderTimeout,
    vm_name,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._common import (
    NAME,
    Deadline,
    check_name,
    kernel_cmdline,
    mac_address,
    network_spec,
    normalize_nic,
    normalize_server,
    read_json,
    run_command,
    short_name,
    write_json,
)

_NAME = NAME
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
NETNS_PREFIX = "haven-"
QGA_PORT = "org.qemu.guest_agent.0"  # the virtio-serial port name qemu-ga opens
BRIDGE = "br0"
UPLINK = "uplink"


_Deadline = Deadline


_short = short_name


def tap_name(vm, index):
    return _short(vm, "t", 10) + str(index)


def veth_name(network):
    return _short(network, "hv-", 10)


def netns_name(network):
    return NETNS_PREFIX + network


def netns_exists(network):
    return os.path.exists("/run/netns/" + netns_name(network))


def _remove(path):
    """Whether ``path`` was there (and is gone now)."""
    try:
        os.unlink(path)
        return True
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False


# A network is a namespace of the whole host, a VM's state is its state_dir's: which
# state_dir made the namespace (a drill's, a failover's...) is written here, so that a
# run of another state_dir that wants the same network name is refused instead of
# tearing down networks that VMs of the first are using. /run goes with the namespaces.
OWNERS_DIR = "/run/haven-dr/networks"
CLAIM_GRACE = 120.0  # a claim younger than this is a network being made


_check_name = check_name


class _Qmp:
    """One QMP session over the VM's unix socket; every read bounded by the deadline."""

    def __init__(self, path, deadline):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        try:
            self.sock.settimeout(deadline.left(0.05))
            self.sock.connect(path)
            self._read()  # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self):
        while b"\n" not in self.buf:
            self.sock.settimeout(self.deadline.left(0.05))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line.decode())

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.settimeout(self.deadline.left(0.05))
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(
                    "QMP %s: %s" % (command, reply["error"].get("desc", reply["error"]))
                )
            # an event ("event": ...): skip

    def close(self):
        self.sock.close()


class _Qga:
    """One session with the QEMU guest agent over the VM's ``qga.sock`` (the
    chardev of its ``org.qemu.guest_agent.0`` port): JSON lines both ways,
    every read bounded by the deadline. ``sync`` first: a session another
    client left half way may still have answers in the pipe."""

    def __init__(self, path, deadline, name):
        self.deadline = deadline
        self.name = name
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(deadline.left(0.05))
            self.sock.connect(path)
        except socket.timeout:
            self.sock.close()
            raise ProviderTimeout(name, "guest_exec", "cannot connect to %s in time" % path)
        except OSError as exc:
            self.sock.close()
            raise ProviderError(name, "guest_exec", "cannot connect to %s: %s" % (path, exc))

    def _fill(self, command):
        self.sock.settimeout(max(0.01, self.deadline.left()))
        try:
            chunk = self.sock.recv(65536) if not self.deadline.expired() else None
        except socket.timeout:
            chunk = None
        except OSError as exc:
            raise ProviderError(self.name, "guest_exec", "the guest agent's socket: %s" % exc)
        if chunk is None:
            raise ProviderTimeout(
                self.name,
                "guest_exec",
                "the guest agent did not answer %s within %g s (is qemu-ga running in the guest?)"
                % (command, self.deadline.timeout),
            )
        if not chunk:
            raise ProviderError(self.name, "guest_exec", "QEMU closed the guest agent's socket")
        self.buf += chunk

    def _send(self, data, command):
        self.sock.settimeout(max(0.01, self.deadline.left()))
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise ProviderTimeout(
                self.name, "guest_exec", "cannot send %s to the guest agent in time" % command
            )
        except OSError as exc:
            raise ProviderError(self.name, "guest_exec", "the guest agent's socket: %s" % exc)

    def _message(self, command):
        """The next JSON object from the agent (lines that are not one are skipped)."""
        while True:
            while b"\n" not in self.buf:
                self._fill(command)
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.strip(b"\xff \r\t")
            if not line:
                continue
            try:
                message = json.loads(line.decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(message, dict):
                return message

    def sync(self):
        """guest-sync-delimited (the agent's answer follows a 0xFF byte; ours
        resets its parser first), guest-sync on an agent without it."""
        token = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        for command in ("guest-sync-delimited", "guest-sync"):
            request = {"execute": command, "arguments": {"id": token}}
            self._send(b"\xff" + json.dumps(request).encode() + b"\n", command)
            if command == "guest-sync-delimited":
                old_agent = False
                while b"\xff" not in self.buf:  # what comes before it is stale
                    lines = self.buf.split(b"\n")
                    self.buf = lines[-1]
                    if any(b'"CommandNotFound"' in line for line in lines[:-1]):
                        old_agent = True
                        break
                    self._fill(command)
                if old_agent:
                    continue  # guest-sync
                self.buf = self.buf.split(b"\xff", 1)[1]
            while True:
                message = self._message(command)
                if message.get("return") == token:
                    return
                error = message.get("error") or {}
                if error.get("class") == "CommandNotFound" and command == "guest-sync-delimited":
                    break  # an old agent: guest-sync
                if error:
                    raise ProviderError(
                        self.name, "guest_exec", "%s: %s" % (command, error.get("desc", error))
                    )
                # an answer left over from someone else's session: skip

    def execute(self, command, arguments):
        self._send(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n", command)
        message = self._message(command)
        if "error" in message:
            error = message["error"]
            raise ProviderError(
                self.name,
                "guest_exec",
                "%s: %s" % (command, error.get("desc", error) if isinstance(error, dict) else error),
            )
        if "return" not in message:
            raise ProviderError(
                self.name, "guest_exec", "%s: not an answer: %s" % (command, json.dumps(message)[:200])
            )
        return message["return"]

    def close(self):
        self.sock.close()


def exec_result(status):
    """``{"rc", "stdout", "stderr"}`` of a ``guest-exec-status`` answer once
    the process exited (None while it runs): outputs decoded from base64
    (UTF-8, bad bytes replaced), ``[truncated]`` after one the agent cut; a
    process killed by a signal has rc 128 + the signal, as a shell says."""
    if not isinstance(status, dict) or not status.get("exited"):
        return None
    rc = status.get("exitcode")
    if rc is None and status.get("signal") is not None:
        rc = 128 + int(status["signal"])
    out = {"rc": rc}
    for key, field in (("stdout", "out"), ("stderr", "err")):
        try:
            text = base64.b64decode(status.get(field + "-data") or "").decode("utf-8", "replace")
        except (TypeError, ValueError) as exc:
            text = "(%s-data is not base64: %s)" % (field, exc)
        if status.get(field + "-truncated"):
            text += "[truncated]"
        out[key] = text
    return out


def qga_exec(path, argv, deadline, name):
    """``argv`` run by the guest agent of ``path``: its exit status and outputs
    once it exited; ProviderTimeout when it has not by the deadline."""
    qga = _Qga(path, deadline, name)
    try:
        qga.sync()
        started = qga.execute(
            "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        )
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise ProviderError(name, "guest_exec", "guest-exec answered no pid: %r" % (started,))
        pause = 0.05
        while True:
            result = exec_result(qga.execute("guest-exec-status", {"pid": pid}))
            if result is not None:
                return result
            if deadline.left() <= pause:
                raise ProviderTimeout(
                    name,
                    "guest_exec",
                    "%s (pid %d in the guest) did not exit within %g s"
                    % (" ".join(argv), pid, deadline.timeout),
                )
            time.sleep(pause)
            pause = min(0.5, pause * 2)
    finally:
        qga.close()


def _open_tap(netns, ifname):
    """A file descriptor of the persistent tap ``ifname`` in ``netns``: the
    open happens in a thread that joined the namespace (setns is per thread)."""
    out = {}

    def work():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open("/run/netns/" + netns) as nsf:
                if libc.setns(nsf.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "setns(%s): %s" % (netns, os.strerror(err)))
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI)
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            out["fd"] = fd
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=work, name="haven-tap-open")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["fd"]


class QemuProvider(Provider):
    """VMs and networks of one ``state_dir``.

    ``image``: the default ``{"kernel": path, "initrd": path}`` of a server
    that names none (``server["options"]["kernel"]``/``["initrd"]``);
    ``qemu``: the binary; ``powerdown_grace``: the longest a clean (ACPI)
    shutdown may take before power_off stops the VM hard."""

    name = "qemu"

    def __init__(
        self, state_dir, image=None, qemu="qemu-system-x86_64", powerdown_grace=20.0, ip="ip"
    ):
        self.state_dir = os.path.abspath(state_dir)
        self.image = image or {}
        self.qemu = qemu
        self.powerdown_grace = powerdown_grace
        self.ip = ip

    # --- paths -----------------------------------------------------------

    def vm_dir(self, name):
        _check_name(name, "vm", "find")  # never a path outside state_dir
        return os.path.join(self.state_dir, "vms", name)

    def _path(self, name, leaf):
        return os.path.join(self.vm_dir(name), leaf)

    def _network_file(self, name):
        return os.path.join(self.state_dir, "networks", name + ".json")

    # --- helpers ---------------------------------------------------------

    def _run(self, argv, deadline, name, action, kind="vm", check=True):
        return run_command(argv, deadline, name, action, kind, check)

    _write_json = staticmethod(write_json)
    _read_json = staticmethod(read_json)

    def _spec(self, name):
        return self._read_json(self._path(name, "spec.json"))

    def pid(self, name):
        """The pid of the VM's QEMU if it runs (not a zombie, not a reused pid)."""
        try:
            with open(self._path(name, "qemu.pid")) as f:
                pid = int(f.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read()
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError):
            return None
        if state in ("Z", "X") or self._path(name, "qmp.sock").encode() not in cmdline:
            return None
        return pid

    def _qmp(self, name, deadline, action, command, arguments=None):
        """One QMP command, retried while QEMU is starting, until the deadline."""
        last = None
        while True:
            if self.pid(name) is None:
                raise ProviderError(
                    name, action, "QEMU is not running (see %s)" % self._path(name, "qemu.log")
                )
            try:
                qmp = _Qmp(self._path(name, "qmp.sock"), deadline)
                try:
                    return qmp.execute(command, arguments)
                finally:
                    qmp.close()
            except RuntimeError as exc:
                raise ProviderError(name, action, str(exc))
            except (OSError, EOFError, ValueError) as exc:
                last = exc
            if deadline.expired():
                raise ProviderTimeout(
                    name,
                    action,
                    "no answer from QMP (%s) within %.0f s: %s" % (command, deadline.timeout, last),
                )
            time.sleep(0.1)

    def _state(self, name, deadline, action):
        if not os.path.isdir(self.vm_dir(name)):
            return ABSENT, None
        if self.pid(name) is None:
            return STOPPED, None
        try:
            raw = self._qmp(name, deadline, action, "query-status")["status"]
        except ProviderError:
            if self.pid(name) is None:  # it went away meanwhile
                return STOPPED, None
            raise
        if raw in ("paused", "suspended"):
            return PAUSED, raw
        if raw in ("shutdown", "guest-panicked", "internal-error", "io-error"):
            return STOPPED, raw
        return RUNNING, raw

    def _wait_gone(self, name, deadline, action, what):
        while self.pid(name) is not None:
            if deadline.expired():
                raise ProviderTimeout(
                    name, action, "%s: QEMU still running after %.0f s" % (what, deadline.timeout)
                )
            time.sleep(0.1)

    def _kill(self, name, deadline, action):
        """QMP quit, then SIGKILL to QEMU's session; until it is gone."""
        pid = self.pid(name)
        if pid is None:
            return
        try:
            self._qmp(name, _Deadline(min(3.0, deadline.left(0.1))), action, "quit")
        except ProviderError:
            pass
        quit_by = _Deadline(min(3.0, deadline.left(0.1)))
        while self.pid(name) is not None and not quit_by.expired():
            time.sleep(0.05)
        pid = self.pid(name)
        if pid is not None:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._wait_gone(name, deadline, action, "after SIGKILL")

    def _remove_taps(self, name, spec, deadline, action):
        for index, nic in enumerate((spec or {}).get("nics", [])):
            network = nic["network"]
            if netns_exists(network) and self._other_owner(network) is None:  # never another's
                tap = tap_name(name, index)
                self._run(
                    [self.ip, "-n", netns_name(network), "link", "del", tap],
                    deadline,
                    name,
                    action,
                    check=False,
                )

    def _after_stop(self, name, deadline, action):
        self._remove_taps(name, self._spec(name), deadline, action)
        for leaf in ("qemu.pid", "qmp.sock", "qga.sock"):
            try:
                os.unlink(self._path(name, leaf))
            except OSError:
                pass

    # --- VMs -------------------------------------------------------------

    def _normalize(self, server, disks):
        spec = normalize_server(server, disks, self.image)
        image = spec["options"].get("image")
        if image is not None:
            if not isinstance(image, str) or not os.path.isfile(image):
                raise ProviderError(
                    spec["name"], "create", "options.image %r is not a local image file" % (image,)
                )
            spec["options"]["image"] = os.path.abspath(image)
        return spec

    def _root_disk(self, name, spec, deadline, action, fresh=False):
        """The VM's ``root.qcow2`` over ``options.image`` (made when missing,
        or ``fresh``: the image changed); None for a VM without one."""
        image = spec["options"].get("image")
        path = self._path(name, "root.qcow2")
        if image is None:
            return None
        if fresh or not os.path.exists(path):
            info = self._run(
                ["qemu-img", "info", "--output=json", image], deadline, name, action
            )
            try:
                fmt = json.loads(info.stdout.decode())["format"]
            except (ValueError, KeyError, TypeError):
                raise ProviderError(name, action, "qemu-img info %s: no format" % image)
            tmp = path + ".tmp"
            self._run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", image, tmp],
                deadline,
                name,
                action,
            )
            os.rename(tmp, path)
        return path

    def create(self, server, disks, timeout):
        spec = self._normalize(server, disks)
        name = spec["name"]
        deadline = _Deadline(timeout)
        old = self._spec(name)
        if old == spec:
            return False
        if old is not None:
            state, _raw = self._state(name, deadline, "create")
            if state in (RUNNING, PAUSED):
                raise ProviderError(
                    name, "create", "exists with another spec and is %s: power it off first" % state
                )
        os.makedirs(self.vm_dir(name), exist_ok=True)
        fresh = (old or {}).get("options", {}).get("image") != spec["options"].get("image")
        self._root_disk(name, spec, deadline, "create", fresh=fresh)
        self._write_json(self._path(name, "spec.json"), spec)
        return True

    def attach_network(self, name, nic, timeout):
        name = vm_name(name)
        deadline = _Deadline(timeout)
        spec = self._spec(name)
        if spec is None:
            raise ProviderError(name, "attach_network", "no such VM")
        entry = normalize_nic(nic, "attach_network")
        if entry in spec["nics"]:
            return False
        state, _raw = self._state(name, deadline, "attach_network")
        if state != STOPPED:
            raise ProviderError(
                name,
                "attach_network",
                "the VM is %s: NICs are attached while it is stopped (no hotplug yet)" % state,
            )
        spec["nics"].append(entry)
        self._write_json(self._path(name, "spec.json"), spec)
        return True

    def _cmdline(self, spec):
        if spec["options"].get("image"):  # the root filesystem is the first disk
            return "root=/dev/vda rw " + kernel_cmdline(spec)
        return kernel_cmdline(spec)

    mac = staticmethod(mac_address)

    def _log_tail(self, name, size=2000):
        """The end of ``name``'s qemu.log (what QEMU said before it gave up)."""
        try:
            with open(self._path(name, "qemu.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def power_on(self, name, timeout):
        name = vm_name(name)
        deadline = _Deadline(timeout)
        spec = self._spec(name)
        if spec is None:
            raise ProviderError(name, "power_on", "no such VM (create it first)")
        state, _raw = self._state(name, deadline, "power_on")
        if state == RUNNING:
            return False
        if state == PAUSED:
            self._qmp(name, deadline, "power_on", "cont")
            return True
        self._after_stop(name, deadline, "power_on")  # leftovers of a crash
        fds = []
        try:
            argv = [
                self.qemu,
                "-name",
                "guest=%s,process=haven-%s" % (name, name[:8]),
                "-machine",
                "q35,accel=tcg",
                "-m",
                str(spec["memory"]),
                "-smp",
                str(spec["cpus"]),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-kernel",
                spec["kernel"],
                "-initrd",
                spec["initrd"],
                "-append",
                self._cmdline(spec),
                "-serial",
                "file:" + self._path(name, "serial.log"),
                "-qmp",
                "unix:%s,server=on,wait=off" % self._path(name, "qmp.sock"),
                "-pidfile",
                self._path(name, "qemu.pid"),
                "-daemonize",
                # the guest agent's port (guest_exec), answered by qemu-ga in the guest
                "-chardev",
                "socket,id=qga0,path=%s,server=on,wait=off" % self._path(name, "qga.sock"),
                "-device",
                "virtio-serial-pci,id=vser0",
                "-device",
                "virtserialport,chardev=qga0,name=%s" % QGA_PORT,
            ]
            root = self._root_disk(name, spec, deadline, "power_on")
            if root is not None:
                argv += [
                    "-drive",
                    "file=%s,format=qcow2,if=virtio,cache=writeback,id=root"
                    % root.replace(",", ",,"),
                ]
            for index, disk in enumerate(spec["disks"]):
                drive = "file=%s,format=raw,if=virtio,cache=none,id=disk%d" % (
                    disk["uri"].replace(",", ",,"),
                    index,
                )
                if disk["readonly"]:
                    drive += ",readonly=on"
                argv += ["-drive", drive]
            for index, nic in enumerate(spec["nics"]):
                network = nic["network"]
                if not netns_exists(network):
                    raise ProviderError(
                        name,
                        "power_on",
                        "network %r does not exist (create_network first)" % network,
                    )
                other = self._other_owner(network)
                if other is not None:
                    raise ProviderError(
                        name,
                        "power_on",
                        "network %r is another run's (its state_dir %s)" % (network, other),
                    )
                netns, tap = netns_name(network), tap_name(name, index)
                self._run(
                    [self.ip, "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap"],
                    deadline,
                    name,
                    "power_on",
                )
                self._run(
                    [self.ip, "-n", netns, "link", "set", tap, "master", BRIDGE, "up"],
                    deadline,
                    name,
                    "power_on",
                )
                try:
                    fd = _open_tap(netns, tap)
                except OSError as exc:
                    raise ProviderError(
                        name, "power_on", "cannot open tap %s in %s: %s" % (tap, netns, exc)
                    )
                fds.append(fd)
                argv += [
                    "-netdev",
                    "tap,id=net%d,fd=%d,vhost=off" % (index, fd),
                    "-device",
                    "virtio-net-pci,netdev=net%d,mac=%s" % (index, self.mac(name, index)),
                ]
            with open(self._path(name, "serial.log"), "w"):
                pass  # a new boot, a new console log
            with open(self._path(name, "qemu.log"), "ab") as log:
                # its own session: on a timeout, everything it started goes too
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=fds,
                    start_new_session=True,
                )
            try:
                proc.wait(timeout=deadline.left(0.5))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
                self._kill(name, _Deadline(10), "power_on")
                raise ProviderTimeout(
                    name,
                    "power_on",
                    "QEMU did not start within %.0f s (its disks: %s; %s)"
                    % (
                        deadline.timeout,
                        ", ".join(d["uri"] for d in spec["disks"]) or "none",
                        self._log_tail(name) or "nothing in qemu.log",
                    ),
                )
            if proc.returncode != 0:
                tail = self._log_tail(name)
                raise ProviderError(
                    name, "power_on", "QEMU exited %d: %s" % (proc.returncode, tail)
                )
        except BaseException:
            self._after_stop(name, _Deadline(10), "power_on")
            raise
        finally:
            for fd in fds:
                os.close(fd)
        while True:
            state, raw = self._state(name, deadline, "power_on")
            if state == RUNNING:
                return True
            if state == STOPPED and self.pid(name) is None:
                raise ProviderError(
                    name,
                    "power_on",
                    "QEMU exited at once (status %s; see %s)" % (raw, self._path(name, "qemu.log")),
                )
            if deadline.expired():
                raise ProviderTimeout(
                    name,
                    "power_on",
                    "not running within %.0f s (status %s)" % (deadline.timeout, raw),
                )
            time.sleep(0.1)

    def power_off(self, name, timeout):
        name = vm_name(name)
        deadline = _Deadline(timeout)
        state, _raw = self._state(name, deadline, "power_off")
        if state == ABSENT:
            raise ProviderError(name, "power_off", "no such VM")
        if state == STOPPED:
            if self.pid(name) is not None:  # QEMU lingering after the guest stopped
                self._kill(name, deadline, "power_off")
            self._after_stop(name, deadline, "power_off")
            return False
        clean = False
        if state == RUNNING:
            try:
                self._qmp(name, deadline, "power_off", "system_powerdown")
                grace = _Deadline(min(self.powerdown_grace, deadline.left() / 2.0))
                while self.pid(name) is not None and not grace.expired():
                    time.sleep(0.1)
                clean = self.pid(name) is None
            except ProviderError:
                pass
        if not clean:
            self._kill(name, deadline, "power_off")
        self._after_stop(name, deadline, "power_off")
        self._write_json(self._path(name, "last_stop.json"), {"clean": clean, "time": time.time()})
        return True

    def pause(self, name, timeout):
        return self._switch(name, timeout, "pause", RUNNING, PAUSED, "stop")

    def resume(self, name, timeout):
        return self._switch(name, timeout, "resume", PAUSED, RUNNING, "cont")

    def _switch(self, name, timeout, action, before, after, command):
        """``action``: a VM in state ``before`` goes to ``after`` by the QMP
        ``command``; one there already is left as it is (False)."""
        name = vm_name(name)
        deadline = _Deadline(timeout)
        state, _raw = self._state(name, deadline, action)
        if state == after:
            return False
        if state != before:
            raise ProviderError(name, action, "the VM is %s, not %s" % (state, before))
        self._qmp(name, deadline, action, command)
        return True

    def status(self, name, timeout):
        name = vm_name(name)
        deadline = _Deadline(timeout)
        state, raw = self._state(name, deadline, "status")
        out = {"name": name, "state": state, "qemu_status": raw, "pid": self.pid(name)}
        if state != ABSENT:
            out["serial_log"] = self._path(name, "serial.log")
            spec = self._spec(name) or {}
            out["nics"] = [
                dict(nic, tap=tap_name(name, i), mac=self.mac(name, i))
                for i, nic in enumerate(spec.get("nics", []))
            ]
            out["disks"] = spec.get("disks", [])
            if (spec.get("options") or {}).get("image"):
                out["root_disk"] = self._path(name, "root.qcow2")
        return out

    def destroy(self, name, timeout):
        name = vm_name(name)
        deadline = _Deadline(timeout)
        if not os.path.isdir(self.vm_dir(name)):
            return False
        self._kill(name, deadline, "destroy")
        self._after_stop(name, deadline, "destroy")
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)
        return True

    def list(self, timeout):
        try:
            return sorted(os.listdir(os.path.join(self.state_dir, "vms")))
        except OSError:
            return []

    def guest_exec(self, name, argv, timeout):
        """``argv`` run in the running VM by its guest agent (qemu-ga on the
        ``org.qemu.guest_agent.0`` port, ``qga.sock`` here): ``{"rc",
        "stdout", "stderr"}``; ProviderTimeout when the agent does not answer
        or the process does not exit in time."""
        name = vm_name(name)
        deadline = _Deadline(timeout)
        argv = [str(a) for a in argv or []]
        if not argv:
            raise ProviderError(name, "guest_exec", "nothing to run (argv is empty)")
        state, _raw = self._state(name, deadline, "guest_exec")
        if state != RUNNING:
            raise ProviderError(name, "guest_exec", "the VM is %s, not running" % state)
        path = self._path(name, "qga.sock")
        if not os.path.exists(path):
            raise ProviderError(
                name,
                "guest_exec",
                "no guest agent socket %s (started by an older provider: power it off and on)" % path,
            )
        return qga_exec(path, argv, deadline, name)

    def serial_log(self, name):
        """What the guest wrote on its console so far."""
        try:
            with open(self._path(name, "serial.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # --- networks --------------------------------------------------------

    _network_spec = staticmethod(network_spec)

    def network(self, name):
        """The spec of an existing network, or None."""
        return self._read_json(self._network_file(name)) if netns_exists(name) else None

    def _owner_file(self, name):
        return os.path.join(OWNERS_DIR, netns_name(name) + ".json")

    def _other_owner(self, name):
        """The state_dir of another run that holds the network ``name``, else
        None (free, ours, or left by a run that is gone: then ours to take).
        Held: that state_dir is there and records the network and its namespace
        is there, or it claimed the name less than ``CLAIM_GRACE`` s ago (it is
        making it)."""
        path = self._owner_file(name)
        owner = self._read_json(path) or {}
        other = owner.get("state_dir")
        if not other or other == self.state_dir or not os.path.isdir(other):
            return None
        if netns_exists(name) and os.path.exists(os.path.join(other, "networks", name + ".json")):
            return other
        try:
            if time.time() - os.stat(path).st_mtime < CLAIM_GRACE:
                return other
        except OSError:
            pass
        return None

    def _claim(self, name, action):
        """The network name ours, or ProviderError naming the run that holds it
        (atomic: two runs claiming at once, one of them gets it)."""
        os.makedirs(OWNERS_DIR, exist_ok=True)
        path = self._owner_file(name)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        self._write_json(tmp, {"state_dir": self.state_dir, "network": name})
        try:
            os.link(tmp, path)  # fails if anyone has it
        except FileExistsError:
            other = self._other_owner(name)
            if other is not None:
                _remove(tmp)
                raise ProviderError(
                    name,
                    action,
                    "in use by another run (its state_dir %s: a drill, failover or failback "
                    "of the same networks?); one network name serves one run at a time on a "
                    "host: end that run (its cleanup destroys the network) or name the "
                    "networks apart" % other,
                    kind="network",
                )
            os.replace(tmp, path)  # ours already, or left by a run that is gone
        else:
            _remove(tmp)

    def create_network(self, network, timeout):
        spec = self._network_spec(network)
        name = spec["name"]
        deadline = _Deadline(timeout)
        os.makedirs(os.path.dirname(self._network_file(name)), exist_ok=True)
        self._claim(name, "create_network")  # after: its state_dir there says it is alive
        old = self.network(name)
        if old == spec:
            return False
        if old is not None or netns_exists(name):  # changed, or half made by a crash
            self.destroy_network(name, deadline.left(1))
        netns, prefix = netns_name(name), spec["cidr"].split("/")[1]
        steps = [
            [self.ip, "netns", "add", netns],
            [self.ip, "-n", netns, "link", "set", "lo", "up"],
            [self.ip, "-n", netns, "link", "add", BRIDGE, "type", "bridge"],
            [
                self.ip,
                "-n",
                netns,
                "addr",
                "add",
                "%s/%s" % (spec["address"], prefix),
                "dev",
                BRIDGE,
            ],
            [self.ip, "-n", netns, "link", "set", BRIDGE, "up"],
        ]
        if not spec["isolated"]:
            veth = veth_name(name)
            steps += [
                [
                    self.ip,
                    "link",
                    "add",
                    veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    UPLINK,
                    "netns",
                    netns,
                ],
                [self.ip, "addr", "add", "%s/%s" % (spec["gateway"], prefix), "dev", veth],
                [self.ip, "link", "set", veth, "up"],
                [self.ip, "-n", netns, "link", "set", UPLINK, "master", BRIDGE, "up"],
                [self.ip, "-n", netns, "route", "add", "default", "via", spec["gateway"]],
            ]
        try:
            for argv in steps:
                self._run(argv, deadline, name, "create_network", "network")
            self._write_json(self._network_file(name), spec)
        except BaseException:
            self.destroy_network(name, 10)
            raise
        return True

    def destroy_network(self, name, timeout):
        deadline = _Deadline(timeout)
        changed = False
        if self._other_owner(name) is not None:
            # another run's network of the same name: only our own record of it goes
            return _remove(self._network_file(name))
        veth = veth_name(name)
        if os.path.exists("/sys/class/net/" + veth):
            self._run(
                [self.ip, "link", "del", veth],
                deadline,
                name,
                "destroy_network",
                "network",
                check=False,
            )
            changed = True
        if netns_exists(name):
            self._run(
                [self.ip, "netns", "del", netns_name(name)],
                deadline,
                name,
                "destroy_network",
                "network",
            )
            changed = True
        _remove(self._owner_file(name))
        return _remove(self._network_file(name)) or changed

    def network_command(self, name, argv):
        """``argv`` run inside the network (from its own address): a health check."""
        return [self.ip, "netns", "exec", netns_name(name)] + list(argv)
