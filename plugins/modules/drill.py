#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: drill
short_description: Run a recovery drill - boot a recovery plan from a checkpoint in an isolated network, check it, tear it down
version_added: 0.1.0
description:
  - Proves that a checkpoint recovers the application, while production keeps running and replicating.
  - Checks the plan against the B(source) node (O(url)) and the B(recovery) node (O(recovery_url)), as
    M(haven.dr.recovery_plan) does; opens one writable copy-on-write point-in-time export per disk on the
    recovery node (the replica is never written); boots the plan's groups in order on the qemu provider, each
    server's NICs on the plan's networks (isolated ones only - nothing in them reaches production); runs each
    server's health check inside its network; then tears everything down (the VMs, the networks, the
    exports), also after a failure, and records the result on the recovery node (C(POST
    /v1/groups/{group}/verifications)) - a passed drill makes its checkpoint the group's C(last_verified).
  - Returns the per-step timeline, the measured RTO (the start of the boot to the last health check passed)
    and the RPO (the checkpoint's age when the drill started - the data a failover to it would lose).
  - A drill that fails (a server's health check never passes, a boot step fails) ends within the plan's
    timeouts and fails the task with RV(failure) naming the server, the step, the check and its last output;
    everything else of the result is there too.
  - The qemu provider needs root and Linux (network namespaces, taps) and C(qemu-system-x86_64) on the host
    the module runs on, which must reach the recovery node's NBD exports; the libvirt provider a libvirtd
    (C(qemu:///system)) and Debian's C(python3-libvirt) there (docs/providers.md).
  - Needs a token of the C(read) scope on the source node and of the C(operate) scope on the recovery node.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.plan
  - haven.dr.recovery
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
attributes:
  check_mode:
    support: full
    details: In check mode the plan is checked against both nodes and RV(would_boot) says what would boot from
      which checkpoint; nothing is opened, booted or recorded.
  diff_mode:
    support: none
options:
  checkpoint:
    description:
      - The point every disk boots from unless the plan's disk names its own - V(latest), V(oldest), a
        checkpoint id or a unique prefix of one (6 characters or more), as the recovery node keeps them.
      - Default O(plan.checkpoint) (itself V(latest) by default).
    type: str
  state_dir:
    description:
      - Where the provider keeps the drill's VMs and networks (a retry finds them there). Default
        C(~/.cache/haven-dr/drills/<plan name>).
    type: path
  cleanup:
    description:
      - Whether everything the drill made is torn down at its end, whatever its outcome (the VMs, the networks,
        the exports). V(false) leaves them for a look (the recovery node's group stays C(testing) while its
        exports are open); the next drill of the plan with the same O(state_dir) continues from them.
    type: bool
    default: true
  record:
    description:
      - Whether the result (passed or not, the RTO and a summary report) is posted to the recovery node as a
        verification of each protection group's checkpoint.
    type: bool
    default: true
notes:
  - The plan's format and what running it does are in docs/recovery-plans.md (its Drills section for this
    module); the provider in docs/providers.md.
  - In a drill every disk of O(plan) boots from a checkpoint (a V(replica) disk is refused) and every NIC is on
    an isolated network.
seealso:
  - module: haven.dr.recovery_plan
  - module: haven.dr.pit_export
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here.
- name: Drill the database from the latest checkpoint, in an isolated network
  haven.dr.drill:
    recovery_url: "{{ haven_recovery_url }}"
    recovery_token: "{{ haven_recovery_token }}"  # operate scope
    plan:
      name: app-drill
      networks:
        drill-lan: {isolated: true, cidr: 10.99.0.0/24}
      groups:
        - name: database
          timeout_seconds: 300
          servers:
            - name: db1.example.com  # the label of its volumes (db and log of group app)
              vcpus: 1
              memory_mib: 256
              nics:
                - {network: drill-lan, ip: 10.99.0.11/24}
              health_check: {type: tcp, port: 5432, timeout_seconds: 240, interval_seconds: 2}
    qemu:
      servers:
        db1.example.com: {role: "tcp:5432"}  # what the tiny test guest runs
  register: drill

- name: Show the measured RTO and RPO
  ansible.builtin.debug:
    msg: "passed={{ drill.passed }} RTO {{ drill.rto_seconds }} s, RPO {{ drill.rpo.app.seconds }} s"
"""

RETURN = r"""
passed:
  description: Whether every server booted and passed its health check.
  returned: always
  type: bool
  sample: true
rto_seconds:
  description: The measured RTO - the drill's start (opening the exports) to the last health check passed, in
    seconds. Null when it failed.
  returned: always
  type: float
  sample: 21.4
timeline:
  description:
    - Every step of the run, in order - C(step) (network, create, power_on, delay, health_check, pre, post),
      C(group), C(server), C(started) and C(ended) (seconds since the drill started), C(seconds), C(outcome)
      (ok, failed, timeout, skipped) and C(output); the drill's own first steps are C(export) (one per disk).
  returned: always
  type: list
  elements: dict
  sample:
    - {"step": "create", "group": "database", "server": "db1", "started": 0.01, "ended": 0.02, "seconds": 0.01,
       "outcome": "ok", "output": ""}
teardown:
  description: The teardown's steps (power_off, destroy, destroy_network, close_export), as RV(timeline).
  returned: always
  type: list
  elements: dict
checkpoint:
  description: Per protection group, the checkpoint its disks booted from (C(id), C(seq), C(time), C(label)).
  returned: always
  type: dict
  sample: {"app": {"id": "3f9a2c01b7e44d3e8f1a2b3c4d5e6f70", "seq": 118, "time": 1767225600.5, "label": ""}}
rpo:
  description:
    - Per protection group, the data-loss window a failover to that checkpoint would have - C(seconds), its
      age when the drill started, and C(checkpoint), its id.
  returned: always
  type: dict
  sample: {"app": {"checkpoint": "3f9a2c01b7e44d3e8f1a2b3c4d5e6f70", "seconds": 42.7}}
exports:
  description: The point-in-time exports the drill opened (C(export), C(uri), C(group), C(volume), C(server)).
  returned: success
  type: list
  elements: dict
verification:
  description: Per protection group, the recovery node's record of the drill (null with O(record=false)).
  returned: always
  type: dict
  sample: {"app": {"id": 7, "group": "app", "passed": true, "plan": "app-drill", "rto_seconds": 21.4}}
failure:
  description:
    - Null when the drill passed; else the first failure - C(group), C(server), C(step), C(check) (the health
      check, as C(tcp 10.99.0.11:5432)) and C(output) (its last output).
  returned: always
  type: dict
  sample: {"group": "database", "server": "db1", "step": "health_check", "check": "tcp 10.99.0.11:5432",
           "output": "tcp 10.99.0.11:5432 did not pass within its 240 s (80 tries); last: connection refused"}
cleaned_up:
  description: Whether nothing the drill made is left (false with O(cleanup=false) or when a teardown step
    failed; RV(left) says what is).
  returned: always
  type: bool
left:
  description: What the teardown could not remove or was told to keep - C(state) (the provider's VMs and
    networks) and C(exports).
  returned: always
  type: dict
would_boot:
  description: In check mode, per server, its group, protection group and the checkpoint id of each disk.
  returned: check_mode
  type: list
  elements: dict
seconds:
  description: How long the whole drill took, teardown included.
  returned: always
  type: float
haven_report:
  description:
    - The run as the C(haven.dr.drill_report) callback reads it - C(kind) (drill), C(plan), C(passed),
      C(started) and C(ended) (epoch seconds), C(rto_seconds) and the plan's C(rto_target_seconds), C(rpo) per
      protection group (C(seconds), C(writes), C(checkpoint)) and the plan's C(rpo_target_seconds),
      C(timeline), C(teardown), C(failure) and C(servers) (each with its boot group and protection group).
  returned: always
  type: dict
"""

import os
import time

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._health import Checker, in_server_network
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._plan import PlanError, plan_argspec
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import PlanRun, PlanState, cleanup
from ansible_collections.haven.dr.plugins.module_utils._recovery import (
    Steps,
    cache_dir,
    check_plan,
    engine_failed,
    failure_of,
    finish,
    haven_report,
    make_providers,
    recovery_argspec,
    would_boot,
)


class Drill:
    """One drill of a plan."""

    def __init__(self, haven):
        self.haven = haven
        self.params = haven.params
        self.source = haven.client
        self.recovery = haven.recovery_client()  # recovery_url is required here
        self.exports = []
        self.teardown = []

    # --- before anything boots ------------------------------------------------

    def plan(self):
        resolved, warnings, checkpoints = check_plan(
            self.params["plan"], self.source, self.recovery, checkpoint=self.params["checkpoint"]
        )
        for server in resolved.servers():
            for i, disk in enumerate(server.disks):
                if disk.source != "checkpoint":
                    raise PlanError(
                        "%s.disks[%d].source" % (server.path, i),
                        "a drill boots from checkpoints only: the replica itself is never used",
                    )
            for i, nic in enumerate(server.nics):
                if not resolved.networks[nic.network].isolated:
                    raise PlanError(
                        "%s.nics[%d].network" % (server.path, i),
                        "network %s is not isolated: a drill runs in isolated networks only" % nic.network,
                    )
        return resolved, warnings, checkpoints

    @staticmethod
    def points(plan, checkpoints, started):
        """Per protection group, its checkpoint and its age at ``started`` (wall clock)."""
        point, rpo = {}, {}
        for server in plan.servers():
            group = server.protection_group
            for disk in server.disks:
                found = [c for c in checkpoints.get(group) or [] if c["id"] == disk.checkpoint_id]
                if found and group not in point:
                    c = found[0]
                    point[group] = {"id": c["id"], "seq": c.get("seq"), "time": c.get("time"), "label": c.get("label")}
                    age = started - float(c["time"]) if c.get("time") is not None else None
                    rpo[group] = {"checkpoint": c["id"], "seconds": round(age, 3) if age is not None else None}
        return point, rpo

    def state_dir(self, plan):
        return os.path.abspath(self.params["state_dir"] or cache_dir("drills", plan.name))

    # --- the drill --------------------------------------------------------------

    def open_exports(self, plan, steps):
        """One writable export per disk, boot disk first: {server name: [uri]};
        each an ``export`` step of ``steps``."""
        disks = {}
        for server in plan.servers():
            uris = []
            for disk in sorted(server.disks, key=lambda d: not d.boot):
                opened = steps.run(
                    "export",
                    lambda d=disk, s=server: self.recovery.post(
                        "/v1/exports",
                        {"group": s.protection_group, "volume": d.volume, "checkpoint": d.checkpoint_id, "writable": True},
                    ),
                    server=server.name,
                    output=lambda o: o["export"],
                )
                self.exports.append(
                    {
                        "export": opened["export"],
                        "uri": opened["uri"],
                        "group": server.protection_group,
                        "volume": disk.volume,
                        "server": server.name,
                    }
                )
                uris.append(opened["uri"])
            disks[server.name] = uris
        return disks

    def close_exports(self):
        left = []
        for export in reversed(self.exports):
            started = time.time()
            try:
                self.recovery.delete("/v1/exports/%s" % export["export"])
                outcome, output = "ok", export["export"]
            except HavenError as exc:
                if getattr(exc, "status", None) == 404:
                    outcome, output = "ok", "%s: gone already" % export["export"]
                else:
                    outcome, output = "failed", "%s: %s" % (export["export"], exc)
                    left.append(export)
            self.teardown.append(
                {
                    "step": "close_export",
                    "group": export["group"],
                    "server": export["server"],
                    "seconds": round(time.time() - started, 6),
                    "outcome": outcome,
                    "output": output,
                }
            )
        self.exports = list(reversed(left))

    def record(self, plan, point, passed, rto, report):
        out = {}
        for group in sorted(point):
            out[group] = self.recovery.post(
                "/v1/groups/%s/verifications" % group,
                {
                    "checkpoint": point[group]["id"],
                    "passed": passed,
                    "plan": plan.name,
                    "rto_seconds": rto,
                    "report": report,
                },
            )
        return out

    def run(self):
        p = self.params
        started_wall = time.time()
        steps = Steps(time.monotonic())
        plan, warnings, checkpoints = self.plan()
        for warning in warnings:
            self.haven.module.warn(warning)
        point, rpo = self.points(plan, checkpoints, started_wall)
        result = {
            "changed": False,
            "passed": False,
            "rto_seconds": None,
            "timeline": [],
            "teardown": [],
            "checkpoint": point,
            "rpo": rpo,
            "verification": None,
            "failure": None,
            "exports": [],
            "cleaned_up": True,
            "left": {"state": None, "exports": []},
        }
        if self.haven.check_mode:
            result["would_boot"] = would_boot(plan)
            result["changed"] = True
            result["seconds"] = round(steps.now(), 3)
            return result
        providers = make_providers(plan, self.state_dir(plan), p["qemu"])
        state = PlanState()
        outcome = None
        result["changed"] = True
        try:
            try:
                disks = self.open_exports(plan, steps)
            except HavenError as exc:
                outcome = engine_failed(failure_of(exc, "export"))
            else:
                result["exports"] = list(self.exports)
                run = PlanRun(
                    plan,
                    providers,
                    Checker(in_server_network(plan, providers)),
                    disks=lambda server: disks[server.name],
                    call_timeout=p["call_timeout"],
                )
                offset = steps.now()
                outcome = steps.add_run(run.run(state), offset)
        finally:
            if p["cleanup"]:
                undone = cleanup(plan, providers, state, call_timeout=p["call_timeout"])
                self.teardown.extend(undone["timeline"])
                for error in undone["errors"]:
                    self.haven.module.warn("drill teardown: %s: %s" % (error["server"] or "network", error["output"]))
                self.close_exports()
        result["teardown"] = self.teardown
        result["timeline"] = steps.steps
        result["passed"] = bool(outcome["ok"])
        result["rto_seconds"] = outcome["rto_seconds"] if outcome["ok"] else None
        result["failure"] = outcome["failed"]
        left_state = state.to_dict()
        result["left"] = {"state": left_state, "exports": list(self.exports)}
        result["cleaned_up"] = not (left_state["created"] or left_state["networks"] or self.exports)
        report = {
            "passed": result["passed"],
            "rto_seconds": result["rto_seconds"],
            "rpo": rpo,
            "failure": result["failure"],
            "servers": [s.name for s in plan.servers()],
            "steps": [dict((k, step.get(k)) for k in ("step", "server", "seconds", "outcome")) for step in result["timeline"]][:200],
            "cleaned_up": result["cleaned_up"],
        }
        if p["record"] and point:
            result["verification"] = self.record(plan, point, result["passed"], result["rto_seconds"], report)
        result["seconds"] = round(steps.now(), 3)
        result["haven_report"] = haven_report("drill", plan, result, started_wall)
        return result


def run_module(haven):
    return finish(haven, Drill(haven).run(), "drill")


def main():
    spec = recovery_argspec()
    spec.update(
        plan=dict(type="dict", required=True, options=plan_argspec()),
        checkpoint=dict(type="str"),
        state_dir=dict(type="path"),
        cleanup=dict(type="bool", default=True),
        record=dict(type="bool", default=True),
    )
    haven = HavenModule(argument_spec=spec)
    haven.run(run_module)


if __name__ == "__main__":
    main()
