#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: failback
short_description: Bring a failed-over application home - ship back only what changed, boot production in plan order
version_added: 0.1.0
description:
  - Ends a failover made by M(haven.dr.failover). The recovery servers are paused (their disks stop changing),
    each protection group is failed back by the source node (havend's failback - only the blocks written on the
    recovery side since the promotion, and the source's own writes that never reached it, are compared and
    shipped, never a full resync; what the source held in them is saved first as a snapshot), the recovery
    servers are destroyed, and the protected servers are powered on again at the production site in plan
    order, each boot group gated by the plan's health checks, run against the production servers' own
    addresses. Replication then runs again in the original direction (each group C(protecting)).
  - Returns the per-step timeline (C(pause), C(failback), the teardown, then the production boot), the
    measured RTO of the way home (the task's start to the last production health check passed), per group the
    bytes shipped against the volumes' size, and C(haven_report) for the C(haven.dr.drill_report) callback.
  - The protected servers must exist in the production provider's state (O(production)) - a failback powers
    them on, it never defines one; without O(production) they are left for you to start. A server's health
    check is the plan's, its host (and an C(http) check's URL host, when it is the plan's address) the
    production server's own address.
  - Nothing hangs - every API call has O(request_timeout), every failback O(operation_timeout), every provider
    call O(call_timeout), the plan's groups and checks their own timeouts. A failure fails the task naming the
    group or server, step and output; running it again continues (a group failed back already is not failed
    back again; servers that passed their checks are not booted again).
  - Needs a token of the C(operate) scope on both nodes.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.plan
  - haven.dr.recovery
  - haven.dr.recovery.production
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
attributes:
  check_mode:
    support: full
    details: In check mode the plan is checked against the nodes and RV(would_boot) lists the production servers
      that would be powered on; nothing is paused, shipped or booted.
  diff_mode:
    support: full
    details: The diff is each protection group's state, before and after.
options:
  operation_timeout:
    description:
      - Seconds havend gives each group's failback (comparing and pulling the changed blocks) before it gives
        up; the task waits that long and a little more.
    type: float
    default: 3600
  state_dir:
    description:
      - Where M(haven.dr.failover) left the recovery servers (its O(haven.dr.failover#module:state_dir)).
        Default C(~/.cache/haven-dr/failovers/<plan name>).
    type: path
notes:
  - What running it does is in docs/recovery-plans.md (its Failback section); the block-level failback in
    docs/failover.md.
seealso:
  - module: haven.dr.failover
  - module: haven.dr.group_operation
"""

EXAMPLES = r"""
# url, token and ca_path of the source (production) node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH.
- name: Bring the shop home
  haven.dr.failback:
    recovery_url: "{{ haven_recovery_url }}"
    recovery_token: "{{ haven_recovery_token }}"  # operate scope
    production:
      state_dir: "{{ haven_production_state_dir }}"
    plan: "{{ shop_plan }}"
  register: home

- name: How much went over the wire, against the volumes' size
  ansible.builtin.debug:
    msg: "{{ home.bytes.shipped }} of {{ home.bytes.volumes }} bytes shipped; RTO home {{ home.rto_seconds }} s"
"""

RETURN = r"""
passed:
  description: Whether every group failed back and every production server powered on and passed its check.
  returned: always
  type: bool
rto_seconds:
  description: The task's start to the last production health check passed (without O(production), to the end of
    the teardown), in seconds. Null when it failed.
  returned: always
  type: float
groups:
  description: Per protection group, havend's failback answer (C(changed_on_target_bytes),
    C(unshipped_here_bytes), C(compared_bytes), C(pulled_bytes), C(wire_bytes), C(snapshot), C(resume_seq)...),
    null for a group failed back already.
  returned: always
  type: dict
bytes:
  description:
    - Totals over the plan's groups - C(changed) (written on the recovery side since the promotion plus the
      source's unshipped writes), C(shipped) (the blocks pulled), C(wire) (the bytes on the wire), C(volumes)
      (the size of every volume of the groups) and C(ratio) (C(shipped) / C(changed)).
  returned: always
  type: dict
  sample: {"changed": 1048576, "shipped": 1048576, "wire": 1102345, "volumes": 21474836480, "ratio": 1.0}
rpo:
  description: Per protection group - a failback loses no write (C(writes) 0, C(seconds) 0); what the source
    held that the recovery side overwrote is in the snapshot named in RV(groups).
  returned: always
  type: dict
timeline:
  description: Every step, as M(haven.dr.failover) returns them - C(pause), C(failback), then the production
    boot (C(network), C(create) - an existing server, C(power_on), C(health_check)...).
  returned: always
  type: list
  elements: dict
teardown:
  description: The recovery servers' teardown (power_off, destroy, destroy_network).
  returned: always
  type: list
  elements: dict
failure:
  description: Null when it passed; else the first failure - C(group), C(server), C(step), C(check), C(output).
  returned: always
  type: dict
would_boot:
  description: In check mode, the production servers in boot order.
  returned: check_mode
  type: list
  elements: dict
seconds:
  description: How long the task took.
  returned: always
  type: float
haven_report:
  description: The run as the C(haven.dr.drill_report) callback reads it (C(kind) failback, C(bytes) among it).
  returned: always
  type: dict
"""

import os
import time

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._health import Checker, in_server_network
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._plan import plan_argspec
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import PlanRun, PlanState, cleanup
from ansible_collections.haven.dr.plugins.module_utils._recovery import (
    ExistingServers,
    Steps,
    cache_dir,
    check_plan,
    engine_failed,
    failure_of,
    finish,
    haven_report,
    load_state,
    make_providers,
    production_plan,
    protection_groups,
    production_argspec,
    recovery_argspec,
    run_operation,
    save_state,
)
from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

FAILED_OVER = "failed_over"
PROTECTING = "protecting"


class Failback:
    """One failback of a plan."""

    def __init__(self, haven):
        self.haven = haven
        self.params = haven.params
        self.source = haven.client
        self.recovery = haven.recovery_client()
        self.steps = Steps(time.monotonic())
        self.groups = {}
        self.paused = []  # the recovery servers this run paused

    def log(self, line):
        self.haven.module.log("haven.dr failback: " + line)

    def pause(self, plan, providers, state):
        """The recovery servers that run, paused: their disks stop changing."""
        for server in reversed(plan.servers()):
            if server.name not in state.running:
                continue
            provider = providers[server.provider]
            self.steps.run(
                "pause",
                lambda s=server, pr=provider: pr.pause(s.name, self.params["call_timeout"]),
                server=server.name,
                output=lambda changed: "paused" if changed else "paused already",
            )
            self.paused.append(server)

    def resume(self, providers, groups):
        """After a failback that did not happen (refused, failed, a split
        brain): the recovery servers it paused run again, where their groups
        are still failed over - the application stays up where it is."""
        states = dict((g, self.source.get_or_none("/v1/groups/%s" % g)) for g in groups)
        for server in reversed(self.paused):
            state = (states.get(server.protection_group) or {}).get("state")
            if state != FAILED_OVER:
                continue
            provider = providers[server.provider]
            try:
                self.steps.run(
                    "resume",
                    lambda s=server, pr=provider: pr.resume(s.name, self.params["call_timeout"]),
                    server=server.name,
                    output="running again: its group is still failed over",
                )
            except Exception:  # pylint: disable=broad-except
                continue  # recorded as a failed step; the failure reported is the first one

    def fail_back(self, group, before):
        if before == PROTECTING:
            self.groups[group] = None
            self.steps.record("failback", self.steps.now(), "skipped", "protecting already", group=group)
            return
        done = self.steps.run(
            "failback",
            lambda: run_operation(self.source, group, "failback", {}, self.params["operation_timeout"], self.log),
            group=group,
            output=lambda r: "%s of %s changed bytes pulled, %s on the wire, in %s s"
            % (r.get("pulled_bytes"), changed_bytes(r), r.get("wire_bytes"), r.get("seconds")),
        )
        self.groups[group] = done

    def totals(self, groups):
        sizes = sum(v.get("size") or 0 for v in self.source.get("/v1/volumes") if v.get("group") in groups)
        done = [r for r in self.groups.values() if r]
        changed = sum(changed_bytes(r) for r in done)
        shipped = sum(r.get("pulled_bytes") or 0 for r in done)
        return {
            "changed": changed,
            "shipped": shipped,
            "wire": sum(r.get("wire_bytes") or 0 for r in done),
            "compared": sum(r.get("compared_bytes") or 0 for r in done),
            "volumes": sizes,
            "ratio": round(float(shipped) / changed, 4) if changed else None,
        }

    def run(self):
        p = self.params
        started_wall = time.time()
        plan, warnings = check_plan(p["plan"], self.source, self.recovery, replica=True)[:2]
        for warning in warnings:
            self.haven.module.warn(warning)
        groups = protection_groups(plan)
        before = dict((g, self.source.get("/v1/groups/%s" % g)["state"]) for g in groups)
        home = None
        if p["production"]:
            production = get_provider(p["production"]["provider"], state_dir=p["production"]["state_dir"])
            home = production_plan(plan, production, p["call_timeout"])
        else:
            self.haven.module.warn(
                "the protected servers are not powered on by this task (no production option): "
                "once the groups are failed back, they are yours to start"
            )
        result = {
            "changed": False,
            "passed": False,
            "rto_seconds": None,
            "groups": self.groups,
            "bytes": None,
            "rpo": dict((g, {"writes": 0, "seconds": 0.0, "checkpoint": None}) for g in groups),
            "timeline": self.steps.steps,
            "teardown": [],
            "failure": None,
        }
        if self.haven.check_mode:
            result["would_boot"] = [
                {"group": g.name, "server": s.name, "nics": [{"network": n.network, "ip": n.ip} for n in s.nics]}
                for g in (home.groups if home else [])
                for s in g.servers
            ]
            result["changed"] = any(state != PROTECTING for state in before.values())
            result.update(self.haven.diff({"groups": before}, {"groups": dict((g, PROTECTING) for g in groups)}))
            result["seconds"] = round(self.steps.now(), 3)
            return result
        state_dir = os.path.abspath(p["state_dir"] or cache_dir("failovers", plan.name))
        state_file = os.path.join(state_dir, "plan-state.json")
        state = load_state(state_file)
        providers = make_providers(plan, state_dir, p["qemu"])
        outcome = None
        existing = ExistingServers(production) if home is not None else None
        try:
            self.pause(plan, providers, state)
            for group in groups:
                self.fail_back(group, before[group])
        except HavenError as exc:
            last = self.steps.steps[-1] if self.steps.steps else {}
            outcome = engine_failed(failure_of(exc, last.get("step") or "failback", last.get("group"), last.get("server")))
            try:
                self.resume(providers, groups)
            except HavenError as also:  # the source gone as well: they stay paused, said so
                self.haven.module.warn("the paused recovery servers were not resumed: %s" % also)
        else:
            offset = self.steps.now()
            undone = cleanup(plan, providers, state, call_timeout=p["call_timeout"])
            for step in undone["timeline"]:
                step["started"] = round(step["started"] + offset, 6)
                step["ended"] = round(step["ended"] + offset, 6)
            result["teardown"] = undone["timeline"]
            for error in undone["errors"]:
                self.haven.module.warn("recovery teardown: %s: %s" % (error["server"] or "network", error["output"]))
            save_state(state_file, state)
            if home is None:  # the groups are home: production is the user's to start
                outcome = {"ok": True, "failed": None, "timeline": [], "rto_seconds": round(self.steps.now(), 6)}
            else:
                kinds = dict((s.provider, existing) for s in home.servers())
                run = PlanRun(home, kinds, Checker(in_server_network(home, kinds)), call_timeout=p["call_timeout"])
                offset = self.steps.now()  # before the run: its times are from its own start
                outcome = self.steps.add_run(run.run(PlanState()), offset)
        finally:
            save_state(state_file, state)
        after = dict((g, self.source.get("/v1/groups/%s" % g)["state"]) for g in groups)
        result["changed"] = before != after or bool(self.paused) or bool(existing and existing.started)
        result.update(self.haven.diff({"groups": before}, {"groups": after}))
        result["bytes"] = self.totals(groups)
        result["passed"] = bool(outcome["ok"])
        result["rto_seconds"] = outcome["rto_seconds"] if outcome["ok"] else None
        result["failure"] = outcome["failed"]
        result["seconds"] = round(self.steps.now(), 3)
        result["haven_report"] = haven_report("failback", plan, result, started_wall, bytes_=result["bytes"])
        return result


def changed_bytes(done):
    return (done.get("changed_on_target_bytes") or 0) + (done.get("unshipped_here_bytes") or 0)


def run_module(haven):
    return finish(haven, Failback(haven).run(), "failback")


def main():
    spec = recovery_argspec()
    spec.update(
        plan=dict(type="dict", required=True, options=plan_argspec()),
        operation_timeout=dict(type="float", default=3600.0),
        state_dir=dict(type="path"),
        production=production_argspec(),
    )
    haven = HavenModule(argument_spec=spec)
    haven.run(run_module)


if __name__ == "__main__":
    main()
