# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the drill, failover and failback modules share (internal use only):
the plan checked against the nodes, the providers a plan's servers boot on,
the steps a module takes around the plan engine (in the engine's timeline
format), the engine's state kept across runs, and the report every run
returns as ``haven_report`` (the ``haven.dr.drill_report`` callback's input).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import json
import os
import time
from dataclasses import replace

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._plan import Network, Nic, PlanError, parse_plan, resolve_plan
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import PlanState
from ansible_collections.haven.dr.plugins.module_utils._waiter import wait_operation
from ansible_collections.haven.dr.plugins.module_utils.providers._base import ProviderError


def cache_dir(*parts):
    """``~/.cache/haven-dr/<parts>`` (``$XDG_CACHE_HOME`` when set), as tools/guest_image.py has it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ.get("HOME") or "/root", ".cache")
    return os.path.join(base, "haven-dr", *parts)


def newest_guest(cache=None):
    """The newest tiny guest ``tools/guest_image.py`` built: ``{kernel, initrd}`` or None."""
    found = []
    for where in glob.glob(os.path.join(cache or cache_dir("guest"), "*")):
        kernel, initrd = os.path.join(where, "vmlinuz"), os.path.join(where, "initrd.gz")
        if os.path.isfile(kernel) and os.path.isfile(initrd):
            found.append((os.path.getmtime(initrd), kernel, initrd))
    if not found:
        return None
    found.sort()
    return {"kernel": found[-1][1], "initrd": found[-1][2]}


def recovery_argspec():
    """The options of every module that boots a plan: the recovery node, the
    provider calls' bound and the guests (doc fragment ``haven.dr.recovery``)."""
    return dict(
        recovery_url=dict(type="str", required=True),
        recovery_token=dict(type="str", required=True, no_log=True),
        recovery_ca_path=dict(type="path"),
        call_timeout=dict(type="float", default=300.0),
        qemu=dict(
            type="dict",
            default={},
            options=dict(
                kernel=dict(type="path"),
                initrd=dict(type="path"),
                servers=dict(type="dict", default={}),
            ),
        ),
    )


class GuestProvider:
    """A provider, each server's spec given what ``qemu.servers`` says of it
    (``role``, ``cmdline``, ``kernel``, ``initrd``)."""

    def __init__(self, provider, servers):
        self.provider = provider
        self.servers = servers or {}

    def create(self, server, disks, timeout):
        server = dict(server)
        extra = dict(self.servers.get(server["name"]) or {})
        if "role" in extra:
            server["role"] = extra.pop("role")
        options = dict(server.get("options") or {})
        options.update(extra)
        server["options"] = options
        return self.provider.create(server, disks, timeout)

    def __getattr__(self, name):
        return getattr(self.provider, name)


def production_argspec():
    """Where the protected servers run (doc fragment ``haven.dr.recovery.production``)."""
    return dict(
        type="dict",
        options=dict(
            state_dir=dict(type="path", required=True),
            provider=dict(type="str", default="qemu", choices=["qemu", "libvirt"]),
        ),
    )


def finish(haven, result, what):
    """A run that did not pass fails the task, naming where and what, with
    the whole result; else the result."""
    if not result["passed"] and not haven.check_mode:
        failure = result["failure"] or {}
        where = failure.get("server") or failure.get("group") or "the %s" % what
        haven.module.fail_json(
            msg="%s of plan %s failed: %s at %s: %s"
            % (what, haven.params["plan"]["name"], where, failure.get("check") or failure.get("step"), failure.get("output")),
            **result
        )
    return result


def guest_image(guest):
    """The kernel and initrd the servers boot: the ``qemu`` option's, else the newest tiny guest."""
    guest = guest or {}
    if guest.get("kernel") or guest.get("initrd"):
        return {"kernel": guest.get("kernel"), "initrd": guest.get("initrd")}
    return newest_guest()


def make_providers(plan, state_dir, guest):
    """``{kind: provider}`` for every provider the plan's servers use, each
    keeping its VMs and networks under ``state_dir/<kind>``."""
    from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

    image = guest_image(guest)
    out = {}
    for kind in sorted(set(s.provider for s in plan.servers())):
        made = get_provider(kind, state_dir=os.path.join(state_dir, kind), image=image)
        out[kind] = GuestProvider(made, (guest or {}).get("servers"))
    return out


def check_plan(data, source, recovery, replica=False, checkpoint=None):
    """The plan (module option ``plan``) parsed and resolved against the
    nodes: ``(plan, warnings, checkpoints)``. The servers and volumes come
    from ``source`` (the source node's client), or from ``recovery`` when
    ``source`` is None (the source is gone: the recovery node knows the
    servers' labels too). ``replica``: every disk boots from the promoted
    replica (failover, failback); else the checkpoints are resolved on the
    recovery node. ``checkpoint``: the point disks boot from unless they say."""
    data = dict(data)
    if checkpoint:
        data["checkpoint"] = checkpoint
    plan = parse_plan(data)
    facts_node = source if source is not None else recovery
    servers = facts_node.get("/v1/servers")
    known = dict((s["name"], s.get("groups") or []) for s in servers)
    names = set()
    for server in plan.servers():
        names.update([server.protection_group] if server.protection_group else known.get(server.name, []))
    checkpoints = None
    if not replica and recovery is not None:
        checkpoints = dict((g, recovery.get_or_none("/v1/groups/%s/checkpoints" % g)) for g in sorted(names))
    facts = {"node": facts_node.url, "servers": servers, "volumes": facts_node.get("/v1/volumes")}
    if checkpoints is not None:
        facts["checkpoints"] = checkpoints
    resolved, warnings = resolve_plan(plan, facts, replica=replica)
    from ansible_collections.haven.dr.plugins.module_utils.providers import KINDS

    for server in resolved.servers():
        if server.provider not in KINDS:
            raise PlanError(
                server.path + ".provider",
                "provider %s is not one this collection runs (%s)" % (server.provider, ", ".join(KINDS)),
            )
    return resolved, warnings, checkpoints or {}


def protection_groups(plan):
    """The plan's protection groups, in the order their servers first boot."""
    out = []
    for server in plan.servers():
        if server.protection_group not in out:
            out.append(server.protection_group)
    return out


class Steps:
    """The module's own steps (the engine keeps its own), as the engine's
    timeline has them: seconds since ``origin`` (monotonic)."""

    def __init__(self, origin, clock=time.monotonic):
        self.origin = origin
        self.clock = clock
        self.steps = []

    def now(self):
        return self.clock() - self.origin

    def record(self, step, began, outcome, output="", group=None, server=None):
        ended = self.now()
        self.steps.append(
            {
                "step": step,
                "group": group,
                "server": server,
                "started": round(began, 6),
                "ended": round(ended, 6),
                "seconds": round(ended - began, 6),
                "outcome": outcome,
                "output": output,
            }
        )

    def run(self, step, func, group=None, server=None, output=None):
        """``func()`` as a step: ok with ``output`` (or what ``output(value)``
        says), failed with the error (raised again)."""
        began = self.now()
        try:
            value = func()
        except Exception as exc:  # pylint: disable=broad-except
            outcome = "timeout" if "within" in str(exc) and isinstance(exc, ProviderError) else "failed"
            self.record(step, began, outcome, "%s" % exc, group, server)
            raise
        text = output(value) if callable(output) else (output or "")
        self.record(step, began, "ok", text, group, server)
        return value

    def add_run(self, outcome, offset):
        """The engine's timeline of ``outcome``, shifted to this origin (its
        run started ``offset`` seconds after it); the RTO too."""
        for step in outcome["timeline"]:
            step["started"] = round(step["started"] + offset, 6)
            step["ended"] = round(step["ended"] + offset, 6)
            self.steps.append(step)
        if outcome.get("rto_seconds") is not None:
            outcome["rto_seconds"] = round(outcome["rto_seconds"] + offset, 6)
        return outcome


def load_state(path):
    """The engine's ``PlanState`` an earlier run left in ``path`` (empty when none)."""
    try:
        with open(path) as f:
            return PlanState.from_dict(json.load(f))
    except (OSError, ValueError):
        return PlanState()


def save_state(path, state):
    """``state`` into ``path`` (atomically; removed when nothing is left)."""
    data = state.to_dict()
    if not (data["created"] or data["networks"]):
        if os.path.exists(path):
            os.unlink(path)
        return
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def failure_of(exc, step, group=None, server=None):
    """An engine-shaped failure record of an error outside the engine."""
    return {"group": group, "server": server, "step": step, "check": None, "output": "%s" % exc}


def engine_failed(outcome):
    """An engine result of a run that never started (its failure given)."""
    return {"ok": False, "failed": outcome, "timeline": [], "state": PlanState(), "rto_seconds": None}


def haven_report(kind, plan, result, started_wall, mode=None, bytes_=None):
    """What every run returns as ``haven_report``: the drill report
    callback's input (docs/recovery-plans.md, "Drill reports")."""
    ended = time.time()
    return {
        "kind": kind,
        "mode": mode,
        "plan": plan.name,
        "passed": bool(result.get("passed")),
        "started": round(started_wall, 3),
        "ended": round(ended, 3),
        "seconds": round(ended - started_wall, 3),
        "rto_seconds": result.get("rto_seconds"),
        "rto_target_seconds": plan.rto_target_seconds,
        "rpo": dict(
            (g, {"seconds": r.get("seconds"), "writes": r.get("writes"), "checkpoint": r.get("checkpoint")})
            for g, r in (result.get("rpo") or {}).items()
        ),
        "rpo_target_seconds": plan.rpo_target_seconds,
        "timeline": list(result.get("timeline") or []),
        "teardown": list(result.get("teardown") or []),
        "failure": result.get("failure"),
        "servers": [
            {"name": s.name, "group": g.name, "protection_group": s.protection_group}
            for g in plan.groups
            for s in g.servers
        ],
        "bytes": bytes_,
    }


def would_boot(plan):
    """Per server, what would boot (check mode of every module)."""
    return [
        {
            "group": g.name,
            "server": s.name,
            "provider": s.provider,
            "protection_group": s.protection_group,
            "nics": [{"network": n.network, "ip": n.ip} for n in s.nics],
            "disks": [
                {"volume": d.volume, "boot": d.boot, "source": d.source, "checkpoint_id": d.checkpoint_id}
                for d in s.disks
            ],
            "health_check": s.health_check.describe() if s.health_check else None,
        }
        for g in plan.groups
        for s in g.servers
    ]


def run_operation(client, group, operation, body, timeout, log=None):
    """havend's ``operation`` of ``group`` on ``client``'s node, waited for
    (``timeout`` is havend's, the wait a little longer): its result. A failed
    operation raises with havend's error (a split brain's report among them)."""
    body = dict(body or {}, timeout=timeout)
    try:
        started = client.post("/v1/groups/%s/operations/%s" % (group, operation), body)
    except HavenError as exc:  # refused (409): the error as havend says it, and the advice
        exc.message = _with_advice(exc.message)
        raise
    done, lines = wait_operation(client, started, timeout + 30, 1.0, log, first=0.02)
    if done.get("state") != "succeeded":
        message = "%s of group %s failed: %s" % (operation, group, done.get("error"))
        raise HavenError(_with_advice(message), url=client.url)
    return dict(done.get("result") or {}, progress_lines=lines)


SPLIT_BRAIN_ADVICE = (
    "nothing was merged: choose the copy that lives on with haven.dr.group_operation operation=resolve "
    "survivor=recovery or survivor=production (docs/failover.md, Split brain), then run this again"
)


def _with_advice(message):
    """The error of an operation havend refused or failed, with what to do
    about a split brain when that is why."""
    if "split brain" in (message or "").lower():
        return "%s - %s" % (message, SPLIT_BRAIN_ADVICE)
    return message


def promoted_disks(recovery, plan):
    """``{server name: [uri]}``, boot disk first: the recovery node's writable
    exports of the promoted volumes (``/v1/volumes``)."""
    uris = {}
    for volume in recovery.get("/v1/volumes"):
        uris[(volume["group"], volume["name"])] = volume.get("uri") if volume.get("writable") else None
    out = {}
    for server in plan.servers():
        out[server.name] = []
        for disk in sorted(server.disks, key=lambda d: not d.boot):
            uri = uris.get((server.protection_group, disk.volume))
            if not uri:
                raise HavenError(
                    "volume %s of group %s is not promoted on the recovery node: no export to boot %s from"
                    % (disk.volume, server.protection_group, server.name),
                    url=recovery.url,
                )
            out[server.name].append(uri)
    return out


class ExistingServers:
    """A production provider for a failback: the protected servers exist
    (they are powered on, never defined or replaced here)."""

    def __init__(self, provider):
        self.provider = provider
        self.started = []  # the servers it powered on (the others ran already)

    def power_on(self, name, timeout):
        changed = self.provider.power_on(name, timeout)
        if changed:
            self.started.append(getattr(name, "name", name))
        return changed

    def create(self, server, disks, timeout):
        state = self.provider.status(server["name"], timeout)["state"]
        if state == "absent":
            raise ProviderError(
                server["name"],
                "create",
                "not in the production provider's state: a failback powers the protected servers on, "
                "it does not define them",
            )
        return False

    def create_network(self, network, timeout):
        return False  # production's own, as it is

    def destroy_network(self, name, timeout):
        return False

    def __getattr__(self, name):
        return getattr(self.provider, name)


def production_plan(plan, provider, timeout):
    """``plan`` with each server's NICs and networks the production server's
    own (``provider.status``: its NICs; ``provider.network``: their networks),
    and each health check's host, when it is the plan's address, the
    production address: what a failback boots and checks."""
    networks = {}
    groups = []
    for group in plan.groups:
        servers = []
        for server in group.servers:
            status = provider.status(server.name, timeout)
            if status["state"] == "absent":
                raise PlanError(
                    server.path + ".name",
                    "%s is not in the production provider's state (%s): nothing to bring home to"
                    % (server.name, getattr(provider, "state_dir", "?")),
                )
            nics = [Nic(network=n["network"], ip=n.get("ip")) for n in status.get("nics") or []]
            for nic in nics:
                if nic.network not in networks:
                    spec = provider.network(nic.network) if hasattr(provider, "network") else None
                    spec = spec or {}
                    networks[nic.network] = Network(
                        name=nic.network,
                        isolated=bool(spec.get("isolated", False)),
                        cidr=spec.get("cidr"),
                        gateway=spec.get("gateway"),
                        bridge=spec.get("bridge"),
                    )
            servers.append(replace(server, nics=nics, health_check=_at_home(server, nics)))
        groups.append(replace(group, servers=servers))
    return replace(plan, groups=groups, networks=networks)


def _at_home(server, nics):
    check = server.health_check
    if check is None:
        return None
    away = [n.address for n in server.nics if n.ip]
    home = nics[0].address if nics and nics[0].ip else None
    if home is None:
        return check
    changes = {}
    if check.host is None or check.host in away:
        if check.type in ("tcp", "command"):
            changes["host"] = home
    if check.url:
        for address in away:
            if "//%s" % address in check.url:
                changes["url"] = check.url.replace("//%s" % address, "//%s" % home, 1)
    return replace(check, **changes)
