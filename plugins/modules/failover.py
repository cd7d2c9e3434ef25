#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: failover
short_description: Fail a whole application over to the recovery site - promote its protection groups, boot the plan
version_added: 0.1.0
description:
  - Moves production to the recovery site. The plan's protection groups are failed over at the block level and
    its servers boot on the recovery site in plan order, each boot group gated by its health checks, from the
    promoted replicas (the recovery node's writable exports C(<group>/<volume>)).
  - B(Planned) (O(mode=planned)) - both sites are up. The protected servers are stopped first (O(production)),
    then each protection group is failed over by the source node - fenced (writes refused), drained, a final
    checkpoint, the target promoted at exactly that point - so nothing is lost; RV(rpo) proves it per group
    with havend's sequence numbers (C(writes=0), C(final_seq) equal to the target's applied seq).
  - B(Unplanned) (O(mode=unplanned)) - the protected site is gone. The recovery node promotes each group at its
    latest consistent point or at O(checkpoint), without the source node (which is asked only with a short
    timeout, to refuse a forced failover of a group it still protects unless O(force)); RV(rpo) reports the
    data-loss window as far as the recovery node knows it - from the promoted point to when it last heard
    the source.
  - Returns the per-step timeline (C(stop), C(failover) or C(promote), then the plan's C(network), C(create),
    C(power_on), C(health_check)...), the measured RTO (the task's start to the last health check passed) and
    C(haven_report) for the C(haven.dr.drill_report) callback.
  - Nothing hangs - every API call has O(request_timeout), every havend operation O(operation_timeout), every
    provider call O(call_timeout), the plan's groups and checks their own timeouts. A failure stops the run,
    fails the task naming the server, step and check with their last output, and leaves what booted as it is
    (the recovery servers are production now); running the task again continues - groups already failed over
    are not failed over again, servers that passed their check are not booted again.
  - A split brain (the source took writes after the promotion) stops the run with havend's report; resolve it
    with M(haven.dr.group_operation) O(haven.dr.group_operation#module:operation=resolve) - nothing is merged
    silently.
  - Needs a token of the C(operate) scope on both nodes (the source node's only in planned mode).
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
    details: In check mode the plan is checked against the nodes and RV(would_boot) says what would boot; nothing
      is stopped, failed over or booted.
  diff_mode:
    support: full
    details: The diff is each protection group's state, before and after.
options:
  mode:
    description:
      - V(planned) - both sites up, zero data loss. V(unplanned) - the source is gone, a known loss.
    type: str
    required: true
    choices: [planned, unplanned]
  checkpoint:
    description:
      - With O(mode=unplanned), the point each protection group is promoted at - a checkpoint id or a unique
        prefix of one, or V(latest) (the latest retained checkpoint). Default its latest consistent point
        (every write that arrived).
    type: str
  force:
    description:
      - With O(mode=unplanned), promote even a group that the source node still says it protects (it answered
        within O(source_timeout)); its writes after the promotion make a split brain. Without it such a
        failover is refused - a planned one loses nothing.
    type: bool
    default: false
  source_timeout:
    description:
      - With O(mode=unplanned), how long the source node is given to answer before it counts as gone.
    type: float
    default: 5
  operation_timeout:
    description:
      - Seconds havend gives each group's failover (draining the journal, the final checkpoint, the promotion)
        or promotion before it gives up; the task waits that long and a little more.
    type: float
    default: 600
  state_dir:
    description:
      - Where the providers keep the recovery servers and their networks (a retry, and M(haven.dr.failback),
        find them there). Default C(~/.cache/haven-dr/failovers/<plan name>).
    type: path
notes:
  - The plan's format and what running it does are in docs/recovery-plans.md (its Failover section for this
    module); the providers in docs/providers.md; the block-level failover in docs/failover.md.
  - In a failover every disk boots from the promoted replica; a disk that names its own checkpoint is an error
    (the point is the promotion's).
seealso:
  - module: haven.dr.failback
  - module: haven.dr.drill
  - module: haven.dr.group_operation
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here;
# shop_plan is a recovery plan (docs/recovery-plans.md) in the inventory's vars.
- name: Planned failover of the shop - stop production, fail over without loss, boot the plan
  haven.dr.failover:
    mode: planned
    recovery_url: "{{ haven_recovery_url }}"
    recovery_token: "{{ haven_recovery_token }}"  # operate scope
    production:
      state_dir: "{{ haven_production_state_dir }}"  # where the protected servers run (qemu provider)
    plan: "{{ shop_plan }}"
    qemu:
      servers:
        db1.example.com: {role: "tcp:5432"}  # what the tiny test guest runs
  register: moved

- name: The measured RTO, and the proof that nothing was lost
  ansible.builtin.debug:
    msg: "RTO {{ moved.rto_seconds }} s; lost writes {{ moved.rpo | dict2items | map(attribute='value.writes') | list }}"

# Run again (or after a disaster, with the source gone): what is failed over already is not done twice.
- name: The protected site is gone - promote at the latest point and boot
  haven.dr.failover:
    mode: unplanned
    recovery_url: "{{ haven_recovery_url }}"
    recovery_token: "{{ haven_recovery_token }}"
    plan: "{{ shop_plan }}"
    qemu:
      servers:
        db1.example.com: {role: "tcp:5432"}
  register: forced
"""

RETURN = r"""
passed:
  description: Whether every group was failed over and every server booted and passed its health check.
  returned: always
  type: bool
  sample: true
mode:
  description: O(mode).
  returned: always
  type: str
rto_seconds:
  description: The measured RTO - the task's start to the last health check passed, in seconds. Null when it
    failed.
  returned: always
  type: float
  sample: 38.2
rpo:
  description:
    - Per protection group, what the failover lost - C(writes) (planned - 0, havend's C(lost_writes); unplanned -
      null, only the source can count them when it returns), C(seconds) (planned - 0; unplanned - the loss
      window, from the promoted point to when the recovery node last heard the source), C(from_seq),
      C(from_time), C(last_heard), C(final_seq) and C(target_applied_seq) (planned), C(checkpoint) (the point
      promoted at, if one was chosen).
  returned: always
  type: dict
  sample: {"shop": {"writes": 0, "seconds": 0.0, "final_seq": 4711, "target_applied_seq": 4711}}
groups:
  description: Per protection group, havend's answer of its failover or promotion (null when it was failed over
    already).
  returned: always
  type: dict
timeline:
  description:
    - Every step, in order - C(source) (unplanned - did the source answer), C(stop) (a production server),
      C(failover) or C(promote) (a protection group), C(exports), then the plan's steps (network, create,
      power_on, delay, health_check, pre, post) and C(verify) (the recovery node still serves the promoted
      groups), each with C(group),
      C(server), C(started) and C(ended) (seconds since the task started), C(seconds), C(outcome) (ok, failed,
      timeout, skipped) and C(output).
  returned: always
  type: list
  elements: dict
failure:
  description: Null when it passed; else the first failure - C(group), C(server), C(step), C(check), C(output).
  returned: always
  type: dict
left:
  description: What the providers run now (C(created), C(running), C(healthy), C(networks)), as a retry and
    M(haven.dr.failback) find it in O(state_dir).
  returned: always
  type: dict
would_boot:
  description: In check mode, per server, its boot group, provider, protection group and disks.
  returned: check_mode
  type: list
  elements: dict
seconds:
  description: How long the task took.
  returned: always
  type: float
haven_report:
  description:
    - The run as the C(haven.dr.drill_report) callback reads it (C(kind) failover, C(mode), C(plan), C(passed),
      C(rto_seconds) and the plan's target, C(rpo) per group and the plan's target, C(timeline), C(failure),
      C(servers)).
  returned: always
  type: dict
"""

import os
import time

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenApiError, HavenError
from ansible_collections.haven.dr.plugins.module_utils._health import Checker, in_server_network
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._plan import plan_argspec
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import PlanRun
from ansible_collections.haven.dr.plugins.module_utils._recovery import (
    Steps,
    cache_dir,
    check_plan,
    engine_failed,
    failure_of,
    finish,
    haven_report,
    load_state,
    make_providers,
    promoted_disks,
    protection_groups,
    production_argspec,
    recovery_argspec,
    run_operation,
    save_state,
    would_boot,
)
from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

FAILED_OVER = "failed_over"


class Failover:
    """One failover of a plan."""

    def __init__(self, haven):
        self.haven = haven
        self.params = haven.params
        self.recovery = haven.recovery_client()
        self.steps = Steps(time.monotonic())
        self.groups = {}
        self.rpo = {}
        self.stopped = []  # the production servers this run powered off

    def log(self, line):
        self.haven.module.log("haven.dr failover: " + line)

    def source(self):
        """The source node's client: the task's in planned mode; in unplanned
        mode one that gives up after ``source_timeout`` without retrying, or
        None when the node does not answer."""
        p = self.params
        if p["mode"] == "planned":
            return self.haven.client
        probe = self.haven.node_client(p["url"], p["token"], p["ca_path"], timeout=p["source_timeout"], retries=0)
        began = self.steps.now()
        try:
            probe.get("/v1/node")
        except HavenApiError as exc:  # it answers, but not to us: it may well be writing
            if not p["force"]:
                self.steps.record("source", began, "failed", "%s" % exc)
                raise HavenError(
                    "the source node answers (%s) but cannot be asked whether it still protects the plan's "
                    "groups: give its token (read scope), or force" % exc.message,
                    url=probe.url,
                )
            self.steps.record("source", began, "ok", "the source node answers but refused: %s (forced)" % exc)
            return None
        except HavenError as exc:
            self.steps.record("source", began, "ok", "the source node is gone: %s" % exc)
            return None
        self.steps.record("source", began, "ok", "the source node answers")
        return probe

    # --- the block level ------------------------------------------------------

    def stop_production(self, plan):
        production = self.params["production"]
        if not production:
            self.haven.module.warn(
                "production servers are not stopped by this task (no production option): "
                "their writes are refused from the fence on"
            )
            return
        provider = get_provider(production["provider"], state_dir=production["state_dir"])
        timeout = self.params["call_timeout"]
        for server in reversed(plan.servers()):  # the web tier first

            def stop(name=server.name):
                state = provider.status(name, timeout)["state"]
                if state == "absent":
                    return "%s: not in the production provider's state" % name
                if state == "stopped":
                    return "%s: stopped already" % name
                provider.power_off(name, timeout)
                self.stopped.append(name)
                return "%s: powered off (was %s)" % (name, state)

            self.steps.run("stop", stop, server=server.name, output=lambda text: text)

    def fail_over(self, group, source):
        """One protection group failed over (planned) or promoted (unplanned):
        its (state before, state after)."""
        p = self.params
        planned = p["mode"] == "planned"
        node = source if planned else self.recovery
        step = "failover" if planned else "promote"
        before = node.get("/v1/groups/%s" % group)["state"]
        if before == FAILED_OVER:
            self.groups[group] = None
            self.steps.record(step, self.steps.now(), "skipped", "failed over already", group=group)
            return before, before
        body = {}
        if not planned and p["checkpoint"]:
            body["checkpoint"] = p["checkpoint"]

        def operate():
            if not planned and source is not None and not p["force"]:
                seen = source.get_or_none("/v1/groups/%s" % group)
                if seen is not None and seen.get("state") == "protecting":
                    raise HavenError(
                        "group %s: the source node answers and protects it, and a promotion now makes a split "
                        "brain at its next write: fail over with mode planned (no loss), or force" % group,
                        url=source.url,
                    )
            return run_operation(node, group, step, body, p["operation_timeout"], self.log)

        done = self.steps.run(step, operate, group=group, output=lambda r: describe(r, planned))
        self.groups[group] = done
        if planned:
            self.rpo[group] = {
                "writes": done.get("lost_writes"),
                "seconds": 0.0 if done.get("lost_writes") == 0 else None,
                "final_seq": done.get("final_seq"),
                "target_applied_seq": done.get("target_applied_seq"),
                "checkpoint": (done.get("final_checkpoint") or {}).get("id"),
            }
        else:
            window = done.get("loss_window") or {}
            self.rpo[group] = {
                "writes": None,
                "seconds": window.get("seconds"),
                "from_seq": window.get("from_seq"),
                "from_time": window.get("from_time"),
                "last_heard": window.get("last_heard"),
                "checkpoint": (done.get("checkpoint") or {}).get("id"),
            }
        return before, FAILED_OVER

    def verify(self, groups, outcome):
        """After the boot: the recovery node still serves the promoted
        groups (the recovered servers' disks). A node that died during the
        boot fails the run here, not silently."""

        def serving():
            for group in groups:
                state = self.recovery.get("/v1/groups/%s" % group)["state"]
                if state != FAILED_OVER:
                    raise HavenError("group %s is %s on the recovery node, not failed over" % (group, state), url=self.recovery.url)
            return len(groups)

        try:
            self.steps.run("verify", serving, output=lambda n: "the recovery node serves the %d promoted group(s)" % n)
        except HavenError as exc:
            return dict(engine_failed(failure_of(exc, "verify")), timeline=outcome["timeline"], state=outcome["state"])
        return outcome

    # --- the run --------------------------------------------------------------

    def run(self):
        p = self.params
        started_wall = time.time()
        source = self.source()
        plan, warnings = check_plan(p["plan"], source, self.recovery, replica=True)[:2]
        for warning in warnings:
            self.haven.module.warn(warning)
        groups = protection_groups(plan)
        result = {
            "changed": False,
            "passed": False,
            "mode": p["mode"],
            "rto_seconds": None,
            "rpo": self.rpo,
            "groups": self.groups,
            "timeline": self.steps.steps,
            "failure": None,
            "left": None,
        }
        if self.haven.check_mode:
            result.update(changed=True, would_boot=would_boot(plan), seconds=round(self.steps.now(), 3))
            return result
        state_dir = os.path.abspath(p["state_dir"] or cache_dir("failovers", plan.name))
        state_file = os.path.join(state_dir, "plan-state.json")
        state = load_state(state_file)
        providers = make_providers(plan, state_dir, p["qemu"])
        before, after = {}, {}
        outcome = None
        try:
            if p["mode"] == "planned":
                self.stop_production(plan)
            for group in groups:
                before[group], after[group] = self.fail_over(group, source)
            disks = self.steps.run("exports", lambda: promoted_disks(self.recovery, plan), output=describe_disks)
        except HavenError as exc:
            last = self.steps.steps[-1] if self.steps.steps else {}
            outcome = engine_failed(failure_of(exc, last.get("step") or "failover", last.get("group"), last.get("server")))
        else:
            run = PlanRun(
                plan,
                providers,
                Checker(in_server_network(plan, providers)),
                disks=lambda server: disks[server.name],
                call_timeout=p["call_timeout"],
            )
            offset = self.steps.now()  # before the run: its times are from its own start
            outcome = self.steps.add_run(run.run(state), offset)
            if outcome["ok"]:
                outcome = self.verify(groups, outcome)
        finally:
            save_state(state_file, state)
        result["changed"] = bool(
            self.stopped
            or any(v is not None for v in self.groups.values())
            or [s for s in self.steps.steps if s["step"] in ("create", "power_on") and s["outcome"] == "ok"]
        )
        result.update(self.haven.diff({"groups": before}, {"groups": after}))
        result["passed"] = bool(outcome["ok"])
        result["rto_seconds"] = outcome["rto_seconds"] if outcome["ok"] else None
        result["failure"] = outcome["failed"]
        result["left"] = state.to_dict()
        result["seconds"] = round(self.steps.now(), 3)
        result["haven_report"] = haven_report("failover", plan, result, started_wall, mode=p["mode"])
        return result


def describe(done, planned):
    if planned:
        return "final seq %s, lost writes %s, drained in %s s, promoted in %s s" % (
            done.get("final_seq"),
            done.get("lost_writes"),
            done.get("drain_seconds"),
            done.get("promote_seconds"),
        )
    window = done.get("loss_window") or {}
    return "promoted at seq %s; loss window %s s" % (done.get("applied_seq"), window.get("seconds"))


def describe_disks(disks):
    return ", ".join("%s: %s" % (name, " ".join(uris)) for name, uris in sorted(disks.items()))


def run_module(haven):
    return finish(haven, Failover(haven).run(), "%s failover" % haven.params["mode"])


def main():
    spec = recovery_argspec()
    spec.update(
        plan=dict(type="dict", required=True, options=plan_argspec()),
        mode=dict(type="str", required=True, choices=["planned", "unplanned"]),
        checkpoint=dict(type="str"),
        force=dict(type="bool", default=False),
        source_timeout=dict(type="float", default=5.0),
        operation_timeout=dict(type="float", default=600.0),
        state_dir=dict(type="path"),
        production=production_argspec(),
    )
    haven = HavenModule(argument_spec=spec)
    haven.run(run_module)


if __name__ == "__main__":
    main()
