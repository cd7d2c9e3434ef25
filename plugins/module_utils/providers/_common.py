# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the qemu and libvirt providers share (internal use only).

The deadline of a call, name checks, a server's normalized spec (what
``spec.json`` holds), the tiny guest's kernel command line, MAC addresses
derived from the VM's name, a network's normalized spec, commands bounded
by the deadline and small JSON files written atomically.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import time

from ansible_collections.haven.dr.plugins.module_utils.providers._base import (
    ProviderError,
    ProviderTimeout,
    disk_uri,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")


class Deadline:
    """The end of one call's ``timeout`` (seconds)."""

    def __init__(self, timeout):
        self.timeout = float(timeout)
        self.end = time.monotonic() + self.timeout

    def left(self, floor=0.0):
        return max(floor, self.end - time.monotonic())

    def expired(self):
        return time.monotonic() >= self.end


def short_name(name, prefix, width=10):
    """A device name of at most 15 characters, from a hash of ``name``."""
    return prefix + hashlib.sha1(name.encode()).hexdigest()[:width]


def check_name(name, kind, action):
    if not isinstance(name, str) or not NAME.match(name):
        raise ProviderError(
            str(name),
            action,
            "names are 1-48 of a-z 0-9 _ . - (starting with a letter or digit)",
            kind,
        )


def run_command(argv, deadline, name, action, kind="vm", check=True):
    """``argv`` run to its end within ``deadline``; a failure (``check``) or
    running out of time raises naming ``name`` and ``action``."""
    try:
        proc = subprocess.run(  # the exit status is looked at below
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=deadline.left(0.5),
        )
    except subprocess.TimeoutExpired:
        raise ProviderTimeout(
            name,
            action,
            "%s did not finish within %.0f s" % (" ".join(argv), deadline.timeout),
            kind,
        )
    except OSError as exc:
        raise ProviderError(name, action, "cannot run %s: %s" % (argv[0], exc), kind)
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise ProviderError(
            name,
            action,
            "%s failed (exit %d): %s" % (" ".join(argv), proc.returncode, err),
            kind,
        )
    return proc


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.rename(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def normalize_nic(nic, action):
    """``{"network", "ip", "gateway"}`` of a NIC given as a dict or a network name."""
    if isinstance(nic, str):
        nic = {"network": nic}
    check_name(nic.get("network"), "network", action)
    return {"network": nic["network"], "ip": nic.get("ip"), "gateway": nic.get("gateway")}


def normalize_server(server, disks, image):
    """The spec of ``server`` on ``disks`` (what ``spec.json`` holds); the
    kernel and initrd are the server's options or else ``image``'s."""
    name = server.get("name")
    check_name(name, "vm", "create")
    options = dict(server.get("options") or {})
    kernel = options.pop("kernel", None) or image.get("kernel")
    initrd = options.pop("initrd", None) or image.get("initrd")
    if not kernel or not initrd:
        raise ProviderError(
            name, "create", "no kernel/initrd: give the provider an image or the server options"
        )
    key = options.get("ssh_key")
    if key is not None and (
        not isinstance(key, str) or len(key.strip().splitlines()) != 1 or " " not in key.strip()
    ):
        raise ProviderError(
            name, "create", "options.ssh_key is one authorized_keys line (ssh-ed25519 AAAA...)"
        )
    nics = [normalize_nic(nic, "create") for nic in server.get("nics") or []]
    norm_disks = []
    for disk in disks or []:
        uri, readonly = disk_uri(disk)
        if not re.match(r"^nbd(\+unix)?://", uri or ""):
            raise ProviderError(
                name, "create", "disk %r is not an NBD URI (nbd://host:port/export)" % (uri,)
            )
        norm_disks.append({"uri": uri, "readonly": readonly})
    return {
        "name": name,
        "memory": int(server.get("memory", 256)),
        "cpus": int(server.get("cpus", 1)),
        "role": server.get("role") or "idle",
        "nics": nics,
        "disks": norm_disks,
        "kernel": os.path.abspath(kernel),
        "initrd": os.path.abspath(initrd),
        "cmdline": options.pop("cmdline", ""),
        "options": options,
    }


def kernel_cmdline(spec):
    """The kernel command line of a VM: the console, and the tiny guest's
    ``haven.*`` arguments (its name, role, first NIC's address and gateway)."""
    args = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "haven.name=" + spec["name"],
        "haven.role=" + spec["role"],
    ]
    if spec["nics"]:
        first = spec["nics"][0]
        if first.get("ip"):
            args.append("haven.ip=" + first["ip"])
        if first.get("gateway"):
            args.append("haven.gw=" + first["gateway"])
    if spec["options"].get("ssh_key"):  # root's authorized key for the guest's dropbear
        key = spec["options"]["ssh_key"].strip().encode()
        args.append("haven.ssh_key=" + base64.b64encode(key).decode())
    if spec["cmdline"]:
        args.append(spec["cmdline"])
    return " ".join(args)


def mac_address(name, index):
    """The MAC of NIC ``index`` of VM ``name`` (stable, locally administered range of QEMU)."""
    digest = hashlib.sha1(("%s/%d" % (name, index)).encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (digest[0], digest[1], digest[2])


def network_spec(network):
    """The normalized spec of a network dict: name, cidr, isolated, gateway, address."""
    if isinstance(network, str):
        raise ProviderError(
            network, "create_network", "a network is a dict with name and cidr", "network"
        )
    name = network.get("name")
    check_name(name, "network", "create_network")
    try:
        net = ipaddress.ip_network(network.get("cidr", ""), strict=False)
    except ValueError as exc:
        raise ProviderError(name, "create_network", "cidr: %s" % exc, "network")
    if net.version != 4 or net.prefixlen > 30:
        raise ProviderError(
            name, "create_network", "cidr: an IPv4 network of at least 4 addresses", "network"
        )
    hosts = list(net.hosts()) if net.num_addresses <= 65536 else None
    gateway = network.get("gateway") or str(hosts[0] if hosts else net.network_address + 1)
    address = network.get("address") or str(hosts[-1] if hosts else net.broadcast_address - 1)
    return {
        "name": name,
        "cidr": str(net),
        "isolated": bool(network.get("isolated", True)),
        "gateway": gateway,
        "address": address,
    }
