# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The libvirt provider (internal use only).

The same interface as the qemu provider, with libvirt (``libvirt-python``,
``qemu:///system`` by default) running the VMs: a persistent domain
``haven-<hash of the state dir>-<name>`` of type ``qemu`` (TCG), booting
the kernel and initrd of a tiny guest (``tools/guest_image.py``) with the
same kernel command line as the qemu provider, its disks NBD network disks,
its serial console in a file, its NICs on libvirt networks.

A network is a libvirt network ``haven-<hash>-<name>`` with its own bridge.
An isolated one has no ``<forward>`` and no ``<ip>``: the host has no address
on its bridge, so nothing on it reaches the host or anything beyond, and the
host does not reach it. A non-isolated one is a NAT network (``<forward
mode='nat'/>``) whose bridge holds the gateway. Either way the network's own
address (the last host of the subnet) is in a network namespace of the same
name as the libvirt network, joined to the bridge by a veth pair: health checks
run there (:meth:`LibvirtProvider.network_command`), where a guest of the
network would be.

Everything of a VM this provider keeps itself is in
``<state_dir>/vms/<name>/``: ``spec.json`` (what create was given; a second
create compares with it), ``serial.log`` (the guest's console) and
``last_stop.json``; networks in ``<state_dir>/networks/<name>.json``.

Every libvirt call runs in a worker thread joined with the call's deadline,
so a daemon that does not answer makes a :class:`ProviderTimeout`, not a hang.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import os
import shutil
import threading
import time
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import quoteattr

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

#: where Debian's python3-libvirt lives (built for /usr/bin/python3)
DEBIAN_DIST = "/usr/lib/python3/dist-packages"


def _import_libvirt(dist=DEBIAN_DIST):
    """The ``libvirt`` module: the interpreter's own, else Debian's
    python3-libvirt loaded from ``dist`` (a venv made from Debian's python
    does not see it; only ``libvirtmod`` and ``libvirt`` are loaded from
    there, nothing else of dist-packages), else None."""
    try:
        import libvirt  # pylint: disable=import-outside-toplevel

        return libvirt
    except ImportError:
        pass
    try:
        import importlib.machinery  # pylint: disable=import-outside-toplevel
        import importlib.util  # pylint: disable=import-outside-toplevel
        import sys  # pylint: disable=import-outside-toplevel

        ext = [
            os.path.join(dist, "libvirtmod" + suffix)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        ]
        ext = [path for path in ext if os.path.exists(path)]
        if not ext or not os.path.exists(os.path.join(dist, "libvirt.py")):
            return None
        loaded = {}
        for mod, path in (("libvirtmod", ext[0]), ("libvirt", os.path.join(dist, "libvirt.py"))):
            spec = importlib.util.spec_from_file_location(mod, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod]
                raise
            loaded[mod] = module
        return loaded["libvirt"]
    except (ImportError, OSError):
        return None


libvirt_module = _import_libvirt()  # None: a clear ProviderError at the first call
if libvirt_module is not None:
    # libvirt prints every error on stderr by default; they are raised instead
    libvirt_module.registerErrorHandler(lambda ctx, err: None, None)

PROBE = "probe"  # the network's own end of the veth, in its namespace

# virDomainState (libvirt-domain.h), spelled as virsh does
_RAW_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}
_STATE_OF = {
    "nostate": RUNNING,
    "running": RUNNING,
    "blocked": RUNNING,
    "shutdown": RUNNING,  # being shut down: still running
    "paused": PAUSED,
    "pmsuspended": PAUSED,
    "shutoff": STOPPED,
    "crashed": STOPPED,
}
_VIR_ERR_NO_DOMAIN = 42
_VIR_ERR_NO_NETWORK = 43
_VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN = 1
_VIR_DOMAIN_UNDEFINE_NVRAM = 4


def _attr(value):
    return quoteattr(str(value))


def _text(value):
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nbd_source(uri):
    """The ``<source>`` of an NBD disk from ``nbd://host[:port]/export`` or
    ``nbd+unix:///export?socket=/path``."""
    parts = urlsplit(uri)
    export = parts.path[1:] if parts.path.startswith("/") else parts.path
    name = " name=%s" % _attr(export) if export else ""
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets:
            raise ValueError("%r has no ?socket=" % uri)
        host = "<host transport='unix' socket=%s/>" % _attr(sockets[0])
    elif parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError("%r has no host" % uri)
        host = "<host name=%s port=%s/>" % (_attr(parts.hostname), _attr(parts.port or 10809))
    else:
        raise ValueError("%r is not an NBD URI" % uri)
    return "<source protocol='nbd'%s>%s</source>" % (name, host)


class LibvirtProvider(Provider):
    """VMs and networks of one ``state_dir`` in the libvirt at ``uri``.

    ``image``: the default ``{"kernel": path, "initrd": path}`` of a server
    that names none; ``powerdown_grace``: the longest a clean (ACPI) shutdown
    may take before power_off destroys the domain; ``run_as``: the DAC label
    QEMU runs with (``+0:+0``, root like the qemu provider, so the kernel,
    initrd and console log may be anywhere root reads; None: libvirt's
    default user, then they must be readable by it); ``emulator``: the QEMU
    binary (None: libvirt's choice)."""

    name = "libvirt"

    def __init__(
        self,
        state_dir,
        uri="qemu:///system",
        image=None,
        powerdown_grace=20.0,
        run_as="+0:+0",
        emulator=None,
        ip="ip",
    ):
        self.state_dir = os.path.abspath(state_dir)
        self.uri = uri
        self.image = image or {}
        self.powerdown_grace = powerdown_grace
        self.run_as = run_as
        self.emulator = emulator
        self.ip = ip
        #: what every libvirt object of this state dir is called by
        self.prefix = "haven-%s-" % hashlib.sha1(self.state_dir.encode()).hexdigest()[:8]
        self._conn = None
        self._lock = threading.Lock()

    # --- names and paths -------------------------------------------------

    def domain_name(self, name):
        """The libvirt domain of VM ``name``."""
        return self.prefix + name

    def network_name(self, network):
        """The libvirt network (and the probe's network namespace) of ``network``."""
        return self.prefix + network

    def bridge_name(self, network):
        return short_name(self.network_name(network), "hvb", 10)

    def veth_name(self, network):
        """The bridge's end of the probe's veth pair."""
        return short_name(self.network_name(network), "hvp", 10)

    def vm_dir(self, name):
        check_name(name, "vm", "find")  # never a path outside state_dir
        return os.path.join(self.state_dir, "vms", name)

    def _path(self, name, leaf):
        return os.path.join(self.vm_dir(name), leaf)

    def _network_file(self, name):
        return os.path.join(self.state_dir, "networks", name + ".json")

    def _spec(self, name):
        return read_json(self._path(name, "spec.json"))

    # --- libvirt, bounded ------------------------------------------------

    def _bounded(self, deadline, name, action, what, func, kind="vm"):
        """``func()`` in a worker thread joined with ``deadline``: a libvirt
        that does not answer is a ProviderTimeout, its errors ProviderErrors."""
        out = {}

        def work():
            try:
                out["value"] = func()
            except BaseException as exc:  # handed to the caller's thread
                out["error"] = exc

        thread = threading.Thread(target=work, name="haven-libvirt", daemon=True)
        thread.start()
        thread.join(deadline.left(0.05))
        if thread.is_alive():
            raise ProviderTimeout(
                name,
                action,
                "libvirt (%s) did not answer %s within %.0f s" % (self.uri, what, deadline.timeout),
                kind,
            )
        if "error" in out:
            exc = out["error"]
            if libvirt_module is not None and isinstance(exc, libvirt_module.libvirtError):
                raise ProviderError(name, action, "libvirt %s: %s" % (what, exc), kind)
            raise exc
        return out.get("value")

    def _connection(self, deadline, name, action, kind="vm"):
        if libvirt_module is None:
            raise ProviderError(
                name,
                action,
                "the libvirt provider needs libvirt-python (Debian: python3-libvirt)",
                kind,
            )
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                alive = self._bounded(deadline, name, action, "isAlive", conn.isAlive, kind)
            except ProviderTimeout:
                raise
            except ProviderError:
                alive = False
            if alive:
                return conn
        conn = self._bounded(
            deadline,
            name,
            action,
            "open(%s)" % self.uri,
            lambda: libvirt_module.open(self.uri),
            kind,
        )
        with self._lock:
            self._conn = conn
        return conn

    def _lookup_domain(self, name, deadline, action):
        """The domain of VM ``name``, or None."""
        conn = self._connection(deadline, name, action)
        dom_name = self.domain_name(name)

        def lookup():
            try:
                return conn.lookupByName(dom_name)
            except libvirt_module.libvirtError as exc:
                if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return self._bounded(deadline, name, action, "lookupByName(%s)" % dom_name, lookup)

    def _lookup_network(self, name, deadline, action, kind="network"):
        conn = self._connection(deadline, name, action, kind)
        net_name = self.network_name(name)

        def lookup():
            try:
                return conn.networkLookupByName(net_name)
            except libvirt_module.libvirtError as exc:
                if exc.get_error_code() == _VIR_ERR_NO_NETWORK:
                    return None
                raise

        return self._bounded(
            deadline, name, action, "networkLookupByName(%s)" % net_name, lookup, kind
        )

    def _raw_state(self, dom, name, deadline, action):
        def read():
            try:
                return dom.state()[0]
            except libvirt_module.libvirtError as exc:
                if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
                    return None
                raise

        code = self._bounded(deadline, name, action, "state", read)
        return None if code is None else _RAW_STATES.get(code, "nostate")

    def _state(self, name, deadline, action):
        """(state, raw libvirt state, domain) of VM ``name``."""
        if self._spec(name) is None:
            return ABSENT, None, None
        dom = self._lookup_domain(name, deadline, action)
        if dom is None:
            return STOPPED, None, None  # known here, not defined (yet) in libvirt
        raw = self._raw_state(dom, name, deadline, action)
        if raw is None:
            return STOPPED, None, None
        return _STATE_OF[raw], raw, dom

    # --- VMs -------------------------------------------------------------

    def domain_xml(self, spec, uuid=None):
        """The libvirt domain of ``spec`` (``uuid``: of the domain it redefines)."""
        name = spec["name"]
        disks = []
        for index, disk in enumerate(spec["disks"]):
            try:
                source = nbd_source(disk["uri"])
            except ValueError as exc:
                raise ProviderError(name, "create", str(exc))
            disks.append(
                "<disk type='network' device='disk'>"
                "<driver name='qemu' type='raw' cache='none'/>%s"
                "<target dev='vd%s' bus='virtio'/>%s</disk>"
                % (source, chr(ord("a") + index), "<readonly/>" if disk["readonly"] else "")
            )
        nics = []
        for index, nic in enumerate(spec["nics"]):
            nics.append(
                "<interface type='network'><source network=%s/><mac address=%s/>"
                "<model type='virtio'/></interface>"
                % (_attr(self.network_name(nic["network"])), _attr(mac_address(name, index)))
            )
        emulator = "<emulator>%s</emulator>" % _text(self.emulator) if self.emulator else ""
        seclabel = ""
        if self.run_as:
            seclabel = (
                "<seclabel type='static' model='dac' relabel='no'><label>%s</label></seclabel>"
                % _text(self.run_as)
            )
        return (
            "<domain type='qemu'>"
            "<name>%(dom)s</name>%(uuid)s"
            "<title>haven.dr %(name)s</title>"
            "<description>haven.dr VM %(name)s of %(state_dir)s</description>"
            "<memory unit='MiB'>%(memory)d</memory>"
            "<vcpu>%(cpus)d</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type>"
            "<kernel>%(kernel)s</kernel><initrd>%(initrd)s</initrd>"
            "<cmdline>%(cmdline)s</cmdline></os>"
            "<features><acpi/></features>"
            "<clock offset='utc'/>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            "<on_crash>destroy</on_crash>"
            "<devices>%(emulator)s%(disks)s%(nics)s"
            "<serial type='file'><source path=%(serial)s append='off'/>"
            "<target port='0'/></serial>"
            "<controller type='usb' model='none'/>"
            "<memballoon model='none'/>"
            "</devices>%(seclabel)s</domain>"
            % {
                "dom": _text(self.domain_name(name)),
                "uuid": "<uuid>%s</uuid>" % _text(uuid) if uuid else "",
                "name": _text(name),
                "state_dir": _text(self.state_dir),
                "memory": spec["memory"],
                "cpus": spec["cpus"],
                "kernel": _text(spec["kernel"]),
                "initrd": _text(spec["initrd"]),
                "cmdline": _text(kernel_cmdline(spec)),
                "emulator": emulator,
                "disks": "".join(disks),
                "nics": "".join(nics),
                "serial": _attr(self._path(name, "serial.log")),
                "seclabel": seclabel,
            }
        )

    def _define(self, spec, deadline, action):
        """Define (or redefine: the same UUID) the domain of ``spec``."""
        dom = self._lookup_domain(spec["name"], deadline, action)
        uuid = None
        if dom is not None:
            uuid = self._bounded(deadline, spec["name"], action, "UUIDString", dom.UUIDString)
        xml = self.domain_xml(spec, uuid)
        conn = self._connection(deadline, spec["name"], action)
        self._bounded(deadline, spec["name"], action, "defineXML", lambda: conn.defineXML(xml))

    def create(self, server, disks, timeout):
        spec = normalize_server(server, disks, self.image)
        name = spec["name"]
        if spec["options"].get("image") is not None:
            raise ProviderError(
                name, "create", "options.image (a local root disk image) is the qemu provider's only"
            )
        deadline = Deadline(timeout)
        old = self._spec(name)
        if old is not None:
            state, _raw, dom = self._state(name, deadline, "create")
            if old == spec and dom is not None:
                return False
            if old != spec and state in (RUNNING, PAUSED):
                raise ProviderError(
                    name, "create", "exists with another spec and is %s: power it off first" % state
                )
        else:
            self._connection(deadline, name, "create")  # no libvirt: fail before writing
        os.makedirs(self.vm_dir(name), exist_ok=True)
        self._define(spec, deadline, "create")
        write_json(self._path(name, "spec.json"), spec)
        return True

    def attach_network(self, name, nic, timeout):
        name = vm_name(name)
        deadline = Deadline(timeout)
        spec = self._spec(name)
        if spec is None:
            raise ProviderError(name, "attach_network", "no such VM")
        entry = normalize_nic(nic, "attach_network")
        if entry in spec["nics"]:
            return False
        state, _raw, _dom = self._state(name, deadline, "attach_network")
        if state != STOPPED:
            raise ProviderError(
                name,
                "attach_network",
                "the VM is %s: NICs are attached while it is stopped (no hotplug yet)" % state,
            )
        spec["nics"].append(entry)
        self._define(spec, deadline, "attach_network")
        write_json(self._path(name, "spec.json"), spec)
        return True

    def power_on(self, name, timeout):
        name = vm_name(name)
        deadline = Deadline(timeout)
        spec = self._spec(name)
        if spec is None:
            raise ProviderError(name, "power_on", "no such VM (create it first)")
        state, raw, dom = self._state(name, deadline, "power_on")
        if state == RUNNING:
            return False
        if state == PAUSED:
            self._bounded(deadline, name, "power_on", "resume", dom.resume)
            return True
        for nic in spec["nics"]:
            net = self._lookup_network(nic["network"], deadline, "power_on", "vm")
            if net is None or self.network(nic["network"]) is None:
                raise ProviderError(
                    name,
                    "power_on",
                    "network %r does not exist (create_network first)" % nic["network"],
                )
        if dom is None:  # undefined behind our back: define it again
            self._define(spec, deadline, "power_on")
            dom = self._lookup_domain(name, deadline, "power_on")
        with open(self._path(name, "serial.log"), "w"):
            pass  # a new boot, a new console log
        try:
            self._bounded(deadline, name, "power_on", "create (start)", dom.create)
        except ProviderTimeout:
            self._hard_stop(name, Deadline(10), "power_on")
            raise
        while True:
            state, raw, dom = self._state(name, deadline, "power_on")
            if state == RUNNING:
                return True
            if state == STOPPED:
                raise ProviderError(
                    name,
                    "power_on",
                    "the domain stopped at once (state %s; see /var/log/libvirt/qemu/%s.log)"
                    % (raw, self.domain_name(name)),
                )
            if deadline.expired():
                raise ProviderTimeout(
                    name,
                    "power_on",
                    "not running within %.0f s (state %s)" % (deadline.timeout, raw),
                )
            time.sleep(0.1)

    def _hard_stop(self, name, deadline, action):
        """virDomainDestroy if the domain is active, until it is shut off."""
        dom = self._lookup_domain(name, deadline, action)
        if dom is None:
            return

        def destroy():
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt_module.libvirtError as exc:
                if exc.get_error_code() != _VIR_ERR_NO_DOMAIN and dom.isActive():
                    raise

        self._bounded(deadline, name, action, "destroy", destroy)
        self._wait_stopped(name, dom, deadline, action, "after destroy")

    def _wait_stopped(self, name, dom, deadline, action, what):
        while True:
            raw = self._raw_state(dom, name, deadline, action)
            if raw is None or _STATE_OF[raw] == STOPPED:
                return
            if deadline.expired():
                raise ProviderTimeout(
                    name, action, "%s: still %s after %.0f s" % (what, raw, deadline.timeout)
                )
            time.sleep(0.1)

    def power_off(self, name, timeout):
        name = vm_name(name)
        deadline = Deadline(timeout)
        state, _raw, dom = self._state(name, deadline, "power_off")
        if state == ABSENT:
            raise ProviderError(name, "power_off", "no such VM")
        if state == STOPPED:
            return False
        clean = False
        if state == RUNNING:
            try:
                self._bounded(
                    deadline,
                    name,
                    "power_off",
                    "shutdown (ACPI power button)",
                    lambda: dom.shutdownFlags(_VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
                )
                grace = Deadline(min(self.powerdown_grace, deadline.left() / 2.0))
                while not grace.expired():
                    raw = self._raw_state(dom, name, deadline, "power_off")
                    if raw is None or _STATE_OF[raw] == STOPPED:
                        clean = True
                        break
                    time.sleep(0.1)
            except ProviderTimeout:
                raise
            except ProviderError:
                pass
        if not clean:
            self._hard_stop(name, deadline, "power_off")
        write_json(self._path(name, "last_stop.json"), {"clean": clean, "time": time.time()})
        return True

    def pause(self, name, timeout):
        return self._switch(name, timeout, "pause", RUNNING, PAUSED, "suspend")

    def resume(self, name, timeout):
        return self._switch(name, timeout, "resume", PAUSED, RUNNING, "resume")

    def _switch(self, name, timeout, action, before, after, method):
        """``action``: a VM in state ``before`` goes to ``after`` by the
        domain's ``method``; one there already is left as it is (False)."""
        name = vm_name(name)
        deadline = Deadline(timeout)
        state, _raw, dom = self._state(name, deadline, action)
        if state == after:
            return False
        if state != before:
            raise ProviderError(name, action, "the VM is %s, not %s" % (state, before))
        self._bounded(deadline, name, action, method, getattr(dom, method))
        return True

    def pid(self, name):
        """The pid of the VM's QEMU (libvirt's pid file) if it runs, else None."""
        try:
            with open("/run/libvirt/qemu/%s.pid" % self.domain_name(name)) as f:
                pid = int(f.read().strip())
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return None
        if state in ("Z", "X") or ("guest=%s," % self.domain_name(name)).encode() not in cmdline:
            return None
        return pid

    def status(self, name, timeout):
        name = vm_name(name)
        deadline = Deadline(timeout)
        state, raw, _dom = self._state(name, deadline, "status")
        out = {
            "name": name,
            "state": state,
            "qemu_status": raw,
            "pid": self.pid(name) if state in (RUNNING, PAUSED) else None,
        }
        if state != ABSENT:
            out["serial_log"] = self._path(name, "serial.log")
            spec = self._spec(name) or {}
            out["nics"] = [
                dict(nic, mac=mac_address(name, i)) for i, nic in enumerate(spec.get("nics", []))
            ]
            out["disks"] = spec.get("disks", [])
            out["domain"] = self.domain_name(name)
        return out

    def destroy(self, name, timeout):
        name = vm_name(name)
        deadline = Deadline(timeout)
        known = os.path.isdir(self.vm_dir(name))
        if libvirt_module is None and not known:
            return False
        dom = self._lookup_domain(name, deadline, "destroy")
        if dom is None and not known:
            return False
        if dom is not None:
            self._hard_stop(name, deadline, "destroy")

            def undefine():
                try:
                    dom.undefineFlags(_VIR_DOMAIN_UNDEFINE_NVRAM)
                except libvirt_module.libvirtError as exc:
                    if exc.get_error_code() != _VIR_ERR_NO_DOMAIN:
                        raise

            self._bounded(deadline, name, "destroy", "undefine", undefine)
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)
        return True

    def list(self, timeout):
        """The VMs of this state dir: those with a state dir entry and the
        libvirt domains of its prefix (left by a crash between the two)."""
        deadline = Deadline(timeout)
        try:
            names = set(os.listdir(os.path.join(self.state_dir, "vms")))
        except OSError:
            names = set()
        if libvirt_module is not None:
            conn = self._connection(deadline, self.state_dir, "list", "state dir")
            domains = self._bounded(
                deadline, self.state_dir, "list", "listAllDomains", conn.listAllDomains, "state dir"
            )
            for dom in domains or []:
                dom_name = dom.name()
                if dom_name.startswith(self.prefix):
                    names.add(dom_name[len(self.prefix) :])
        return sorted(names)

    def serial_log(self, name):
        """What the guest wrote on its console so far."""
        try:
            with open(self._path(name, "serial.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # --- networks --------------------------------------------------------

    def network_xml(self, spec):
        name = spec["name"]
        prefix = spec["cidr"].split("/")[1]
        forward = ip = ""
        if not spec["isolated"]:
            forward = "<forward mode='nat'/>"
            ip = "<dns enable='no'/><ip address=%s prefix=%s/>" % (
                _attr(spec["gateway"]),
                _attr(prefix),
            )
        return (
            "<network><name>%s</name>%s<bridge name=%s stp='off' delay='0'/>%s</network>"
            % (_text(self.network_name(name)), forward, _attr(self.bridge_name(name)), ip)
        )

    def _netns_exists(self, name):
        return os.path.exists("/run/netns/" + self.network_name(name))

    def network(self, name):
        """The spec of an existing network (its file and its probe namespace), or None."""
        if not self._netns_exists(name):
            return None
        return read_json(self._network_file(name))

    def create_network(self, network, timeout):
        spec = network_spec(network)
        name = spec["name"]
        deadline = Deadline(timeout)
        old = self.network(name)
        net = self._lookup_network(name, deadline, "create_network")
        if old == spec and net is not None:
            active = self._bounded(
                deadline, name, "create_network", "isActive", net.isActive, "network"
            )
            if active:
                return False
        if old is not None or net is not None or self._netns_exists(name):
            self.destroy_network(name, deadline.left(1))  # changed, or half made by a crash
        os.makedirs(os.path.dirname(self._network_file(name)), exist_ok=True)
        conn = self._connection(deadline, name, "create_network", "network")
        xml = self.network_xml(spec)
        try:
            net = self._bounded(
                deadline,
                name,
                "create_network",
                "networkDefineXML",
                lambda: conn.networkDefineXML(xml),
                "network",
            )
            self._bounded(deadline, name, "create_network", "create (start)", net.create, "network")
            netns, veth, prefix = self.network_name(name), self.veth_name(name), spec["cidr"].split("/")[1]
            steps = [
                [self.ip, "netns", "add", netns],
                [self.ip, "-n", netns, "link", "set", "lo", "up"],
                [self.ip, "link", "add", veth, "type", "veth", "peer", "name", PROBE, "netns", netns],
                [self.ip, "link", "set", veth, "master", self.bridge_name(name), "up"],
                [self.ip, "-n", netns, "addr", "add", "%s/%s" % (spec["address"], prefix), "dev", PROBE],
                [self.ip, "-n", netns, "link", "set", PROBE, "up"],
            ]
            if not spec["isolated"]:
                steps.append([self.ip, "-n", netns, "route", "add", "default", "via", spec["gateway"]])
            for argv in steps:
                run_command(argv, deadline, name, "create_network", "network")
            write_json(self._network_file(name), spec)
        except BaseException:
            self.destroy_network(name, 10)
            raise
        return True

    def destroy_network(self, name, timeout):
        deadline = Deadline(timeout)
        changed = False
        veth = self.veth_name(name)
        if os.path.exists("/sys/class/net/" + veth):
            run_command([self.ip, "link", "del", veth], deadline, name, "destroy_network", "network", check=False)
            changed = True
        if self._netns_exists(name):
            run_command(
                [self.ip, "netns", "del", self.network_name(name)],
                deadline,
                name,
                "destroy_network",
                "network",
            )
            changed = True
        if libvirt_module is not None:
            net = self._lookup_network(name, deadline, "destroy_network")
            if net is not None:

                def remove():
                    try:
                        if net.isActive():
                            net.destroy()
                        net.undefine()
                    except libvirt_module.libvirtError as exc:
                        if exc.get_error_code() != _VIR_ERR_NO_NETWORK:
                            raise

                self._bounded(deadline, name, "destroy_network", "destroy", remove, "network")
                changed = True
        try:
            os.unlink(self._network_file(name))
            changed = True
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return changed

    def network_command(self, name, argv):
        """``argv`` run inside the network (from its own address): a health check."""
        return [self.ip, "netns", "exec", self.network_name(name)] + list(argv)
