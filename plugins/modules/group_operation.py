#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: group_operation
short_description: Fail a havend consistency group over, back, or roll it back, at the block level
version_added: 0.1.0
description:
  - Runs one of havend's block-level operations on a consistency group and, by default, waits for it to
    end, reporting its progress (bytes, ETA, lag).
  - V(failover) (source node) is a planned failover with RPO 0, V(promote) (target node) an unplanned one at
    the latest or a chosen checkpoint, V(failback) (source node) brings production home by shipping only
    what changed, V(reverse) runs a round of reverse protection, V(reclaim) resumes production on the
    source after the recovery side was lost too, V(resolve) ends a split brain keeping O(survivor)'s copy,
    V(rollback) (target node) makes a checkpoint the replica's latest point.
  - An operation whose end state the group is already in (a second V(failover) of a failed-over group)
    does nothing and reports C(changed=false). An operation havend refuses in the group's state fails with
    havend's reason.
  - This module boots no server, it moves the data. Recovery plans boot the servers in order.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - haven.dr.wait
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.changes
options:
  group:
    description:
      - The consistency group.
    type: str
    required: true
  operation:
    description:
      - The operation. V(failover), V(failback), V(reverse), V(reclaim) and V(resolve) run on the source node;
        V(promote) and V(rollback) on the target node.
    type: str
    required: true
    choices: [failover, promote, failback, reverse, reclaim, resolve, rollback]
  checkpoint:
    description:
      - The checkpoint to promote (default the latest consistent point) or to roll back to (required
        then), by its id, a unique prefix of it (6 characters at least), V(latest) or V(oldest).
    type: str
  survivor:
    description:
      - With O(operation=resolve), the copy that lives on. V(recovery) keeps the promoted side's; V(production)
        keeps the source's (the target keeps its own changes in a snapshot).
    type: str
    choices: [recovery, production]
  operation_timeout:
    description:
      - Seconds havend gives the operation (draining the journal, pulling the delta) before it gives up.
    type: float
    default: 3600
attributes:
  check_mode:
    support: full
    details: In check mode the group's state is read and nothing is started.
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here.
- name: Planned failover of the application's group (RPO 0)
  haven.dr.group_operation:
    group: app
    operation: failover
  register: failed_over

- name: Show the proof of RPO 0
  ansible.builtin.debug:
    msg: "final seq {{ failed_over.result.final_seq }}, lost writes {{ failed_over.result.lost_writes }}"

# Unplanned, on the recovery site's node (after the planned failover above there
# is nothing left to promote: the task reports ok and starts nothing).
- name: The source site is gone - promote the replica at a checkpoint
  haven.dr.group_operation:
    url: "{{ haven_recovery_url }}"
    token: "{{ haven_recovery_token }}"
    group: app
    operation: promote
    checkpoint: 3f9a2c  # its id, or a unique prefix of it; latest when not given

- name: Bring production home, moving only the blocks that changed
  haven.dr.group_operation:
    group: app
    operation: failback
    wait_timeout: 7200
"""

RETURN = r"""
state_before:
  description: The group's failover state before the task.
  returned: success
  type: str
  sample: protecting
state_after:
  description: The group's failover state after the task (in check mode, as before).
  returned: success
  type: str
  sample: failed_over
operation:
  description: havend's operation record (id, kind, state, times), when the task started one.
  returned: when an operation was started
  type: dict
  sample: {"id": "4c1f0e", "kind": "failover", "target": "app", "state": "succeeded"}
result:
  description:
    - havend's figures of the finished operation, for example C(final_seq), C(lost_writes) and
      C(drain_seconds) of a failover, C(pulled_bytes) and C(compared_bytes) of a failback.
  returned: when the task waited for a started operation
  type: dict
  sample: {"final_seq": 18233, "lost_writes": 0, "drain_seconds": 0.21, "promote_seconds": 0.05}
progress_lines:
  description: The progress seen while waiting, one line each time it changed.
  returned: when the task waited for a started operation
  type: list
  elements: str
  sample: ["failback of app: 4194304 of 8388608 bytes (50 %), ETA 2 s after 3 s"]
"""

from ansible_collections.haven.dr.plugins.module_utils._argspec import wait_argspec
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._waiter import wait_operation

# The state an operation leaves the group in, when running it again changes nothing.
DONE_STATE = {
    "failover": "failed_over",
    "promote": "failed_over",
    "failback": "protecting",
    "reclaim": "protecting",
}


def _already_done(operation, group):
    if operation in DONE_STATE:
        return group["state"] == DONE_STATE[operation]
    if operation == "resolve":
        return group["state"] != "error"  # no split brain (left) to resolve
    return False  # reverse and rollback make something new each time


def run_module(haven):
    p = haven.params
    client = haven.client
    group = client.get("/v1/groups/%s" % p["group"])
    before = group["state"]
    result = {"changed": False, "state_before": before, "state_after": before}
    if _already_done(p["operation"], group):
        return result
    result["changed"] = True
    diff = haven.diff({"state": before}, {"state": DONE_STATE.get(p["operation"], before)})
    if haven.check_mode:
        return dict(result, **diff)
    body = {"timeout": p["operation_timeout"]}
    if p["checkpoint"]:
        body["checkpoint"] = p["checkpoint"]
    if p["survivor"]:
        body["survivor"] = p["survivor"]
    started = client.post("/v1/groups/%s/operations/%s" % (p["group"], p["operation"]), body)
    result["operation"] = started
    if not p["wait"]:
        return dict(result, **diff)
    done, lines = wait_operation(
        client, started, p["wait_timeout"], p["wait_interval"], lambda line: haven.module.log("haven.dr: " + line)
    )
    result.update(operation=done, result=done.get("result"), progress_lines=lines)
    if done.get("state") != "succeeded":
        raise HavenError(
            "%s of group %s failed: %s" % (p["operation"], p["group"], done.get("error")), url=client.url
        )
    result["state_after"] = client.get("/v1/groups/%s" % p["group"])["state"]
    return dict(result, **haven.diff({"state": before}, {"state": result["state_after"]}))


def main():
    spec = dict(
        group=dict(type="str", required=True),
        operation=dict(
            type="str",
            required=True,
            choices=["failover", "promote", "failback", "reverse", "reclaim", "resolve", "rollback"],
        ),
        checkpoint=dict(type="str"),
        survivor=dict(type="str", choices=["recovery", "production"]),
        operation_timeout=dict(type="float", default=3600.0),
    )
    spec.update(wait_argspec())
    haven = HavenModule(
        argument_spec=spec,
        required_if=[("operation", "rollback", ["checkpoint"]), ("operation", "resolve", ["survivor"])],
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
