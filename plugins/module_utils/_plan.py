# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A recovery plan as data, and its validation (internal use only).

A plan is a mapping (YAML in inventory or vars): networks, then boot groups
in order, each with its servers. ``parse_plan(data)`` checks its shape and
returns a typed, normalised ``Plan`` (every default filled in);
``resolve_plan(plan, facts)`` checks it against what the nodes hold (the
source node's ``/v1/servers`` and ``/v1/volumes``, the recovery node's
``/v1/groups/{g}/checkpoints``) and fills in what only they know (a
server's protection group and volumes, the checkpoint ids). Every error is
one ``PlanError`` whose ``path`` names the bad key exactly, as
``plan.groups[1].servers[0].network``.

``plan_argspec()`` is the plan's format, once: the module's argument spec
(``recovery_plan``'s ``plan`` option) and the structural check here walk
the same table, and docs/recovery-plan.schema.json is tested against it.
Pure Python, no I/O: it runs on the controller or in a module alike.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import ipaddress
import re
from dataclasses import asdict, dataclass, field, replace

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError

PROVIDERS = ("qemu", "libvirt")
CHECK_TYPES = ("tcp", "http", "command", "guest_agent")
DISK_SOURCES = ("checkpoint", "replica")
CHECKPOINT_WORDS = ("latest", "oldest")
MIN_PREFIX = 6  # havend resolves an id prefix of 6 characters or more
MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# The keys each health check type uses, beyond type, timeout and interval.
CHECK_KEYS = {
    "tcp": ("host", "port"),
    "http": ("url", "status", "body_contains", "jmespath", "validate_certs"),
    "command": ("command", "host", "user", "ssh_port", "key_file", "expect_rc"),
    "guest_agent": ("command", "expect_rc"),
}
CHECK_REQUIRED = {"tcp": ("port",), "http": ("url",), "command": ("command",), "guest_agent": ("command",)}


class PlanError(HavenError):
    """A plan that is not valid: ``path`` is the bad key
    (``plan.groups[1].servers[0].network``), the message says why."""

    def __init__(self, path, message):
        super(PlanError, self).__init__("%s: %s" % (path, message), result={"bad_key": path})
        self.path = path
        self.reason = message


# The format ------------------------------------------------------------------


def _script_options():
    return dict(
        command=dict(type="str", required=True),
        timeout_seconds=dict(type="float", default=300.0),
    )


def _health_check_options():
    return dict(
        type=dict(type="str", required=True, choices=list(CHECK_TYPES)),
        timeout_seconds=dict(type="float", default=300.0),
        interval_seconds=dict(type="float", default=5.0),
        host=dict(type="str"),
        port=dict(type="int"),
        url=dict(type="str"),
        status=dict(type="int"),
        body_contains=dict(type="str"),
        jmespath=dict(type="str"),
        validate_certs=dict(type="bool"),
        command=dict(type="str"),
        user=dict(type="str"),
        ssh_port=dict(type="int"),
        key_file=dict(type="path"),
        expect_rc=dict(type="int"),
    )


def _server_options():
    return dict(
        name=dict(type="str", required=True),
        protection_group=dict(type="str"),
        volumes=dict(type="list", elements="str"),
        provider=dict(type="str", choices=list(PROVIDERS)),
        vcpus=dict(type="int", default=2),
        memory_mib=dict(type="int", default=2048),
        network=dict(type="str"),
        nics=dict(
            type="list",
            elements="dict",
            options=dict(network=dict(type="str", required=True), mac=dict(type="str"), ip=dict(type="str")),
        ),
        disks=dict(
            type="list",
            elements="dict",
            options=dict(
                volume=dict(type="str", required=True),
                source=dict(type="str", choices=list(DISK_SOURCES)),
                checkpoint=dict(type="str"),
                boot=dict(type="bool"),
            ),
        ),
        health_check=dict(type="dict", options=_health_check_options()),
        delay_seconds=dict(type="float", default=0.0),
    )


def plan_argspec():
    """The plan's keys as an Ansible argument spec (a fresh dict each call):
    the ``options`` of the module's ``plan`` option."""
    return dict(
        name=dict(type="str", required=True),
        description=dict(type="str"),
        provider=dict(type="str", default="qemu", choices=list(PROVIDERS)),
        checkpoint=dict(type="str", default="latest"),
        rto_target_seconds=dict(type="float"),
        rpo_target_seconds=dict(type="float"),
        networks=dict(
            type="dict",
            default={},
        ),
        groups=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                name=dict(type="str", required=True),
                servers=dict(type="list", elements="dict", required=True, options=_server_options()),
                parallel=dict(type="bool", default=True),
                timeout_seconds=dict(type="float", default=1800.0),
                delay_seconds=dict(type="float", default=0.0),
                pre=dict(type="list", elements="dict", options=_script_options()),
                post=dict(type="list", elements="dict", options=_script_options()),
            ),
        ),
    )


def network_options():
    """The keys of one network (``plan.networks`` maps a name to these)."""
    return dict(
        isolated=dict(type="bool", default=True),
        cidr=dict(type="str"),
        gateway=dict(type="str"),
        bridge=dict(type="str"),
    )


# The typed plan --------------------------------------------------------------


@dataclass
class Network:
    name: str
    isolated: bool = True
    cidr: object = None  # str
    gateway: object = None
    bridge: object = None


@dataclass
class Nic:
    network: str
    mac: object = None
    ip: object = None  # "10.20.0.11/24" or "10.20.0.11"

    @property
    def address(self):
        """The IP address without its prefix, or None."""
        return str(ipaddress.ip_interface(self.ip).ip) if self.ip else None


@dataclass
class Disk:
    volume: str
    source: str = "checkpoint"
    checkpoint: object = None  # as written (latest, oldest, an id or prefix); None for a replica
    boot: bool = False
    checkpoint_id: object = None  # filled by resolve_plan


@dataclass
class HealthCheck:
    type: str
    timeout_seconds: float = 300.0
    interval_seconds: float = 5.0
    host: object = None
    port: object = None
    url: object = None
    status: object = None
    body_contains: object = None
    jmespath: object = None
    validate_certs: object = None
    command: object = None
    user: object = None
    ssh_port: object = None
    key_file: object = None
    expect_rc: object = None

    def describe(self):
        """One line naming the check, for reports."""
        if self.type == "tcp":
            return "tcp %s:%s" % (self.host, self.port)
        if self.type == "http":
            extra = (" and %s" % self.jmespath) if self.jmespath else ""
            return "http %s answers %s%s" % (self.url, self.status, extra)
        where = "over ssh to %s" % self.host if self.type == "command" else "through the guest agent"
        return "command %r %s exits %s" % (self.command, where, self.expect_rc)


@dataclass
class Script:
    command: str
    timeout_seconds: float = 300.0


@dataclass
class Server:
    name: str
    path: str  # plan.groups[i].servers[j], for messages
    provider: str = "qemu"
    protection_group: object = None
    volumes: object = None  # list of volume names; None until resolve_plan
    vcpus: int = 2
    memory_mib: int = 2048
    nics: list = field(default_factory=list)
    disks: object = None  # list of Disk; None (one per volume) until resolve_plan
    health_check: object = None  # HealthCheck, or None: up once powered on
    delay_seconds: float = 0.0


@dataclass
class Group:
    name: str
    path: str
    servers: list
    parallel: bool = True
    timeout_seconds: float = 1800.0
    delay_seconds: float = 0.0
    pre: list = field(default_factory=list)
    post: list = field(default_factory=list)


@dataclass
class Plan:
    name: str
    groups: list
    networks: dict = field(default_factory=dict)
    description: object = None
    provider: str = "qemu"
    checkpoint: str = "latest"
    rto_target_seconds: object = None  # what the business needs; a run is measured against it
    rpo_target_seconds: object = None

    def servers(self):
        """Every server, in boot order."""
        return [s for g in self.groups for s in g.servers]

    def to_dict(self):
        """The normalised plan as plain data (the module returns it): the
        same keys as the plan's format, every default filled in."""
        out = {
            "name": self.name,
            "description": self.description,
            "provider": self.provider,
            "checkpoint": self.checkpoint,
            "rto_target_seconds": self.rto_target_seconds,
            "rpo_target_seconds": self.rpo_target_seconds,
            "networks": dict((n, _without(asdict(net), "name")) for n, net in self.networks.items()),
            "groups": [],
        }
        for group in self.groups:
            g = _without(asdict(group), "path")
            g["servers"] = [_server_dict(s) for s in group.servers]
            out["groups"].append(g)
        return out


def _without(d, *keys):
    return dict((k, v) for k, v in d.items() if k not in keys)


def _server_dict(server):
    d = _without(asdict(server), "path")
    if server.disks is not None:  # the resolved id is boot_order's, not the plan's
        d["disks"] = [_without(disk, "checkpoint_id") for disk in d["disks"]]
    if server.health_check is not None:
        hc = server.health_check
        keep = ("type", "timeout_seconds", "interval_seconds") + CHECK_KEYS[hc.type]
        d["health_check"] = dict((k, v) for k, v in asdict(hc).items() if k in keep)
    return d


# Shape: the argspec table, walked ----------------------------------------------


def _typed(value, kind, path):
    if kind in ("str", "path"):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise PlanError(path, "must be a string, not %s" % _kind(value))
        return str(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(path, "must be an integer, not %s" % _kind(value))
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(path, "must be a number, not %s" % _kind(value))
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise PlanError(path, "must be true or false, not %s" % _kind(value))
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise PlanError(path, "must be a mapping, not %s" % _kind(value))
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise PlanError(path, "must be a list, not %s" % _kind(value))
        return value
    raise ValueError("unknown type %s in the plan's spec" % kind)  # our bug


def _kind(value):
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def check_shape(value, options, path):
    """``value`` checked against an argspec's ``options``: unknown keys,
    required ones, types, choices; returns it with every key, defaults in."""
    value = _typed(value, "dict", path)
    unknown = sorted(k for k in value if k not in options)
    if unknown:
        raise PlanError("%s.%s" % (path, unknown[0]), "unknown key (known: %s)" % ", ".join(sorted(options)))
    out = {}
    for key, spec in options.items():
        where = "%s.%s" % (path, key)
        item = value.get(key)
        if item is None:
            if spec.get("required"):
                raise PlanError(where, "required")
            out[key] = copy.deepcopy(spec.get("default"))
            continue
        item = _typed(item, spec["type"], where)
        if spec["type"] == "list":
            kind = spec.get("elements", "str")
            items = []
            for index, element in enumerate(item):
                at = "%s[%d]" % (where, index)
                if kind == "dict" and "options" in spec:
                    items.append(check_shape(element, spec["options"], at))
                else:
                    items.append(_typed(element, kind, at))
            item = items
        elif spec["type"] == "dict" and "options" in spec:
            item = check_shape(item, spec["options"], where)
        if "choices" in spec and item not in spec["choices"]:
            raise PlanError(where, "%r is not one of %s" % (item, ", ".join(spec["choices"])))
        out[key] = item
    return out


# Parsing: the shape, then what a plan alone can tell ---------------------------


def parse_plan(data, path="plan"):
    """A ``Plan`` from its mapping, or a ``PlanError`` naming the bad key.
    Checks everything that needs no node: the shape, names unique, networks
    known, addresses, the health checks' keys, one boot disk."""
    raw = check_shape(data, plan_argspec(), path)
    networks = {}
    for name, net in sorted(raw["networks"].items()):
        networks[name] = _parse_network(name, net, "%s.networks.%s" % (path, name))
    if not raw["groups"]:
        raise PlanError(path + ".groups", "a plan needs at least one boot group")
    plan = Plan(
        name=raw["name"],
        description=raw["description"],
        provider=raw["provider"],
        checkpoint=raw["checkpoint"],
        rto_target_seconds=_target(raw, "rto_target_seconds", path),
        rpo_target_seconds=_target(raw, "rpo_target_seconds", path),
        networks=networks,
        groups=[],
    )
    seen_groups, seen_servers, seen_ips, seen_macs = {}, {}, {}, {}
    for gi, g in enumerate(raw["groups"]):
        gpath = "%s.groups[%d]" % (path, gi)
        if g["name"] in seen_groups:
            raise PlanError(gpath + ".name", "group %s is already %s" % (g["name"], seen_groups[g["name"]]))
        seen_groups[g["name"]] = gpath
        if not g["servers"]:
            raise PlanError(gpath + ".servers", "boot group %s has no server" % g["name"])
        for key in ("timeout_seconds",):
            if g[key] <= 0:
                raise PlanError("%s.%s" % (gpath, key), "must be more than 0")
        if g["delay_seconds"] < 0:
            raise PlanError(gpath + ".delay_seconds", "must not be negative")
        group = Group(
            name=g["name"],
            path=gpath,
            servers=[],
            parallel=g["parallel"],
            timeout_seconds=g["timeout_seconds"],
            delay_seconds=g["delay_seconds"],
            pre=[_parse_script(s, "%s.pre[%d]" % (gpath, i)) for i, s in enumerate(g["pre"] or [])],
            post=[_parse_script(s, "%s.post[%d]" % (gpath, i)) for i, s in enumerate(g["post"] or [])],
        )
        for si, s in enumerate(g["servers"]):
            spath = "%s.servers[%d]" % (gpath, si)
            if s["name"] in seen_servers:
                raise PlanError(
                    spath + ".name", "server %s is listed already, at %s" % (s["name"], seen_servers[s["name"]])
                )
            seen_servers[s["name"]] = spath
            server = _parse_server(plan, s, spath)
            for ni, nic in enumerate(server.nics):
                _claim(seen_ips, (nic.network, nic.address), "%s.nics[%d].ip" % (spath, ni), "address %s" % nic.address)
                _claim(seen_macs, nic.mac and nic.mac.lower(), "%s.nics[%d].mac" % (spath, ni), "MAC %s" % nic.mac)
            group.servers.append(server)
        plan.groups.append(group)
    return plan


def _claim(seen, key, path, what):
    if key is None or (isinstance(key, tuple) and key[1] is None):
        return
    if key in seen:
        raise PlanError(path, "%s is used already, at %s" % (what, seen[key]))
    seen[key] = path


def _parse_network(name, net, path):
    net = check_shape(net if net is not None else {}, network_options(), path)
    if net["cidr"] is not None:
        try:
            ipaddress.ip_network(net["cidr"], strict=False)
        except ValueError as exc:
            raise PlanError(path + ".cidr", "not a network: %s" % exc)
    if net["gateway"] is not None:
        _address_in(net["gateway"], net["cidr"], path + ".gateway", name)
    return Network(name=name, **net)


def _address_in(text, cidr, path, network):
    try:
        address = ipaddress.ip_interface(text).ip
    except ValueError as exc:
        raise PlanError(path, "not an IP address: %s" % exc)
    if cidr is not None and address not in ipaddress.ip_network(cidr, strict=False):
        raise PlanError(path, "%s is not in network %s (%s)" % (address, network, cidr))


def _parse_script(s, path):
    if s["timeout_seconds"] <= 0:
        raise PlanError(path + ".timeout_seconds", "must be more than 0")
    if not s["command"].strip():
        raise PlanError(path + ".command", "empty")
    return Script(command=s["command"], timeout_seconds=s["timeout_seconds"])


def _parse_server(plan, s, path):
    for key in ("vcpus", "memory_mib"):
        if s[key] < 1:
            raise PlanError("%s.%s" % (path, key), "must be 1 or more")
    if s["delay_seconds"] < 0:
        raise PlanError(path + ".delay_seconds", "must not be negative")
    if s["network"] is not None and s["nics"] is not None:
        raise PlanError(path + ".network", "give network (one NIC) or nics, not both")
    nics_raw = [{"network": s["network"], "mac": None, "ip": None}] if s["network"] is not None else s["nics"] or []
    nics = []
    for ni, n in enumerate(nics_raw):
        npath = path + ".network" if s["network"] is not None else "%s.nics[%d]" % (path, ni)
        key = npath if s["network"] is not None else npath + ".network"
        if n["network"] not in plan.networks:
            known = ", ".join(sorted(plan.networks)) or "none"
            raise PlanError(key, "no network %r in plan.networks (known: %s)" % (n["network"], known))
        if n["mac"] is not None and not MAC.match(n["mac"]):
            raise PlanError(npath + ".mac", "not a MAC address (xx:xx:xx:xx:xx:xx): %r" % n["mac"])
        if n["ip"] is not None:
            _address_in(n["ip"], plan.networks[n["network"]].cidr, npath + ".ip", n["network"])
        nics.append(Nic(network=n["network"], mac=n["mac"], ip=n["ip"]))
    volumes = s["volumes"]
    if volumes is not None:
        if not volumes:
            raise PlanError(path + ".volumes", "empty: leave it out for the server's volumes on the node")
        _unique(volumes, path + ".volumes", "volume")
    disks = None
    if s["disks"] is not None:
        disks = [_parse_disk(plan, d, "%s.disks[%d]" % (path, i)) for i, d in enumerate(s["disks"])]
        if not disks:
            raise PlanError(path + ".disks", "empty: leave it out for one disk per volume")
        _unique([d.volume for d in disks], path + ".disks", "volume", suffix=".volume")
        boots = [i for i, d in enumerate(disks) if d.boot]
        if len(boots) > 1:
            raise PlanError(
                "%s.disks[%d].boot" % (path, boots[1]), "a server boots from one disk (disks[%d] already)" % boots[0]
            )
        if not boots:
            disks[0].boot = True
        if volumes is not None:
            for i, d in enumerate(disks):
                if d.volume not in volumes:
                    raise PlanError("%s.disks[%d].volume" % (path, i), "%s is not in the server's volumes" % d.volume)
    check = None
    if s["health_check"] is not None:
        check = _parse_check(s["health_check"], nics, path + ".health_check")
    return Server(
        name=s["name"],
        path=path,
        provider=s["provider"] or plan.provider,
        protection_group=s["protection_group"],
        volumes=list(volumes) if volumes is not None else None,
        vcpus=s["vcpus"],
        memory_mib=s["memory_mib"],
        nics=nics,
        disks=disks,
        health_check=check,
        delay_seconds=s["delay_seconds"],
    )


def _unique(names, path, what, suffix=""):
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            raise PlanError(
                "%s[%d]%s" % (path, i, suffix), "%s %s is listed already, at [%d]" % (what, name, seen[name])
            )
        seen[name] = i


def _parse_disk(plan, d, path):
    source = d["source"] or "checkpoint"
    if source == "replica":
        if d["checkpoint"] is not None:
            raise PlanError(path + ".checkpoint", "a disk from the replica has no checkpoint")
        checkpoint = None
    else:
        checkpoint = d["checkpoint"] if d["checkpoint"] is not None else plan.checkpoint
        _checkpoint_ref(checkpoint, path + ".checkpoint")
    return Disk(volume=d["volume"], source=source, checkpoint=checkpoint, boot=bool(d["boot"]))


def _target(raw, key, path):
    value = raw[key]
    if value is not None and value <= 0:
        raise PlanError("%s.%s" % (path, key), "must be more than 0 seconds, not %s" % value)
    return value


def _checkpoint_ref(ref, path):
    if ref not in CHECKPOINT_WORDS and len(ref) < MIN_PREFIX:
        raise PlanError(path, "%r: latest, oldest, an id or a prefix of %d characters or more" % (ref, MIN_PREFIX))


def _parse_check(c, nics, path):
    kind = c["type"]
    allowed = CHECK_KEYS[kind]
    for key in sorted(c):
        if key not in ("type", "timeout_seconds", "interval_seconds") + allowed and c[key] is not None:
            raise PlanError("%s.%s" % (path, key), "not used by a %s check (it uses %s)" % (kind, ", ".join(allowed)))
    for key in CHECK_REQUIRED[kind]:
        if c[key] is None:
            raise PlanError("%s.%s" % (path, key), "required by a %s check" % kind)
    if c["timeout_seconds"] <= 0:
        raise PlanError(path + ".timeout_seconds", "must be more than 0")
    if c["interval_seconds"] <= 0:
        raise PlanError(path + ".interval_seconds", "must be more than 0")
    values = dict(c)
    if kind in ("tcp", "command") and values["host"] is None:
        addresses = [n.address for n in nics if n.address]
        if not addresses:
            raise PlanError(path + ".host", "required: the server has no NIC with an ip to check")
        values["host"] = addresses[0]
    for key in ("port", "ssh_port"):
        if values[key] is not None and not 0 < values[key] < 65536:
            raise PlanError("%s.%s" % (path, key), "not a port: %d" % values[key])
    if kind == "http":
        if not re.match(r"^https?://", values["url"]):
            raise PlanError(path + ".url", "must start with http:// or https://")
        values["status"] = values["status"] if values["status"] is not None else 200
        values["validate_certs"] = values["validate_certs"] if values["validate_certs"] is not None else True
    if kind == "command":
        values["user"] = values["user"] or "root"
        values["ssh_port"] = values["ssh_port"] or 22
    if kind in ("command", "guest_agent"):
        values["expect_rc"] = values["expect_rc"] if values["expect_rc"] is not None else 0
    return HealthCheck(**values)


# Against the nodes ---------------------------------------------------------------


def resolve_plan(plan, facts, replica=False):
    """``plan`` checked against the nodes and completed: returns
    ``(plan, warnings)``, a new ``Plan`` with each server's protection group,
    volumes and disks filled in and each disk's ``checkpoint_id`` resolved.

    ``facts``: ``servers`` and ``volumes`` as the source node's
    ``/v1/servers`` and ``/v1/volumes`` answer; ``checkpoints``, a mapping
    group -> the recovery node's ``/v1/groups/{g}/checkpoints`` (None for a
    group that node does not hold), or no ``checkpoints`` at all when the
    recovery node was not asked (the checkpoints are then not checked and a
    warning says so). ``node``: a name for messages.

    ``replica``: every disk boots from the promoted replica (a failover: the
    point is the promotion's); a disk that names another checkpoint than the
    plan's is an error, and no checkpoint is checked.
    """
    node = facts.get("node") or "the source node"
    servers = dict((s["name"], s) for s in facts.get("servers") or [])
    volumes = {}
    for v in facts.get("volumes") or []:
        volumes.setdefault(v["group"], {})[v["name"]] = v
    groups = set(volumes) | set(g for s in servers.values() for g in s.get("groups") or [])
    checkpoints = facts.get("checkpoints")
    warnings = []
    if checkpoints is None and not replica:
        warnings.append("the recovery node was not asked: the checkpoints of the plan are not checked")
    used = {}
    out_groups = []
    for group in plan.groups:
        out_servers = []
        for server in group.servers:
            out_servers.append(
                _resolve_server(plan, server, node, servers, volumes, groups, checkpoints, used, warnings, replica)
            )
        out_groups.append(replace(group, servers=out_servers))
    _warn_mixed_points(out_groups, warnings)
    return replace(plan, groups=out_groups), warnings


def _resolve_server(plan, server, node, servers, volumes, groups, checkpoints, used, warnings, replica=False):
    path = server.path
    known = servers.get(server.name)
    if known is None:
        raise PlanError(
            path + ".name",
            "no protected server %r on %s (volumes labelled with it; known: %s)"
            % (server.name, node, ", ".join(sorted(servers)) or "none"),
        )
    own = known.get("groups") or []
    group = server.protection_group
    if group is None:
        if len(own) != 1:
            raise PlanError(
                path + ".protection_group", "required: %s has volumes in groups %s" % (server.name, ", ".join(own))
            )
        group = own[0]
    elif group not in groups:
        raise PlanError(
            path + ".protection_group",
            "no protection group %r on %s (known: %s)" % (group, node, ", ".join(sorted(groups)) or "none"),
        )
    elif group not in own:
        raise PlanError(
            path + ".protection_group",
            "%s has no volume in group %s (its groups: %s)" % (server.name, group, ", ".join(own)),
        )
    in_group = volumes.get(group, {})
    labelled = [v["name"] for v in known.get("volumes") or [] if v.get("group") == group]
    names = server.volumes if server.volumes is not None else labelled
    for i, name in enumerate(names):
        where = "%s.volumes[%d]" % (path, i) if server.volumes is not None else path + ".volumes"
        volume = in_group.get(name)
        if volume is None:
            raise PlanError(where, "no volume %r in group %s on %s" % (name, group, node))
        owner = volume.get("server")
        if owner not in (None, server.name):
            warnings.append("%s: volume %s of group %s is labelled as a disk of %s" % (where, name, group, owner))
        if (group, name) in used:
            raise PlanError(where, "volume %s of group %s is used already, by %s" % (name, group, used[(group, name)]))
        used[(group, name)] = path
        if volume.get("state") == "syncing":
            warnings.append(
                "%s: volume %s of group %s is still syncing: its replica is not whole yet" % (where, name, group)
            )
    if server.disks is not None:
        disks = [replace(d) for d in server.disks]
        for i, d in enumerate(disks):
            if d.volume not in names:
                raise PlanError(
                    "%s.disks[%d].volume" % (path, i),
                    "%s is not one of the server's volumes (%s)" % (d.volume, ", ".join(names)),
                )
    else:
        disks = [Disk(volume=n, checkpoint=plan.checkpoint, boot=i == 0) for i, n in enumerate(names)]
    if replica:
        for i, d in enumerate(disks):
            if d.source == "checkpoint" and d.checkpoint != plan.checkpoint:
                raise PlanError(
                    "%s.disks[%d].checkpoint" % (path, i),
                    "a failover boots the promoted replica: the point is the promotion's (the module's "
                    "checkpoint option), not a disk's own",
                )
            disks[i] = replace(d, source="replica", checkpoint=None)
    for i, d in enumerate(disks):
        if d.source == "checkpoint" and checkpoints is not None:
            d.checkpoint_id = _resolve_checkpoint(
                checkpoints, group, d.checkpoint, "%s.disks[%d].checkpoint" % (path, i), server
            )
    if server.health_check is None:
        warnings.append("%s: %s has no health check: it counts as up once powered on" % (path, server.name))
    return replace(server, protection_group=group, volumes=list(names), disks=disks)


def _resolve_checkpoint(checkpoints, group, ref, path, server):
    if server.disks is None:
        path = server.path + ".disks"  # the disks were not written: name the server's
    kept = checkpoints.get(group)
    if kept is None:
        raise PlanError(server.path + ".protection_group", "group %s is not on the recovery node" % group)
    if not kept:
        raise PlanError(path, "group %s retains no checkpoint on the recovery node" % group)
    if ref == "latest":
        return kept[-1]["id"]
    if ref == "oldest":
        return kept[0]["id"]
    found = [c for c in kept if c["id"] == ref] or [c for c in kept if c["id"].startswith(ref)]
    if len(found) > 1:
        raise PlanError(path, "checkpoint %r of group %s is ambiguous (%d match)" % (ref, group, len(found)))
    if not found:
        raise PlanError(path, "checkpoint %r of group %s is not retained on the recovery node" % (ref, group))
    return found[0]["id"]


def _warn_mixed_points(groups, warnings):
    """Disks of one protection group booted from different points are not
    consistent with each other: say so."""
    points = {}
    for group in groups:
        for server in group.servers:
            for d in server.disks:
                point = d.checkpoint_id or d.checkpoint if d.source == "checkpoint" else "replica"
                points.setdefault(server.protection_group, set()).add(point)
    for name in sorted(points):
        if len(points[name]) > 1:
            warnings.append(
                "protection group %s is booted from %d different points (%s): its volumes are not consistent with each other"
                % (name, len(points[name]), ", ".join(sorted(points[name])))
            )
