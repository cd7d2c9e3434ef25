#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: replication_info
short_description: Replication state, lag and RPO compliance of havend consistency groups
version_added: 0.1.0
description:
  - Reads the replication status of one or every consistency group of a havend node. On a source node, the
    lag in seconds and bytes, throughput, journal fill and whether the RPO is met; on a target node, what
    was received and applied, and the checkpoints kept.
  - With O(wait_for), waits until every condition holds for every group read (for example the initial
    sync done and the lag within 5 seconds), reporting progress as it goes; fails when O(wait_timeout)
    runs out, returning what it saw last.
  - Changes nothing on the node.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.info_module
options:
  group:
    description:
      - The consistency group to read. All of the node's groups when not given.
    type: str
  wait_for:
    description:
      - Conditions that must all hold, each written C(FIELD OP VALUE) with OP one of C(<=), C(<), C(>=), C(>),
        C(==), C(!=), or a bare boolean field such as C(caught_up).
      - FIELD is a key of RV(groups), for example C(lag_seconds), C(lag_bytes), C(state), C(rpo_ok),
        C(caught_up), C(journal_fill_percent), C(applied_seq).
    type: list
    elements: str
    default: []
  wait_timeout:
    description:
      - Seconds to wait for O(wait_for).
    type: float
    default: 300
  wait_interval:
    description:
      - Seconds between two reads while waiting.
    type: float
    default: 1
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here.
- name: Wait for the initial sync of the group, then for the lag to be within the RPO
  haven.dr.replication_info:
    group: app
    wait_for:
      - caught_up
      - lag_seconds <= 5
    wait_timeout: 1800
  register: app

- name: Report the RPO compliance of every group
  haven.dr.replication_info:
  register: everything

- name: Show the groups that breach their RPO
  ansible.builtin.debug:
    msg: "{{ everything.groups | rejectattr('rpo_ok') | map(attribute='name') | list }}"
"""

RETURN = r"""
groups:
  description: The groups read, each with havend's status and the figures derived from it.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The group's name.
      returned: always
      type: str
      sample: app
    state:
      description: Its failover state (C(protecting), C(testing), C(failing_over), C(failed_over), C(failing_back), C(paused), C(error)).
      returned: always
      type: str
      sample: protecting
    state_reason:
      description: Why it is in that state.
      returned: always
      type: str
      sample: replicating
    lag_seconds:
      description: Age of the oldest write not yet on the target (source node).
      returned: on a source node
      type: float
      sample: 0.4
    lag_bytes:
      description: Bytes written and not yet on the target, a resync's included (source node).
      returned: on a source node
      type: int
      sample: 1048576
    rpo_seconds:
      description: The group's RPO target (source node).
      returned: on a source node
      type: float
      sample: 30
    rpo_ok:
      description: Whether the lag is within the RPO (source node).
      returned: on a source node
      type: bool
      sample: true
    caught_up:
      description: Connected, no resync running, and every journaled write acknowledged by the target (source node).
      returned: on a source node
      type: bool
      sample: true
    journal_fill_percent:
      description: How full the group's journal is (source node); at 100 havend tracks changed regions instead.
      returned: on a source node
      type: float
      sample: 2.5
    throughput_bytes_per_s:
      description: Bytes shipped (source) or applied (target) per second over the last seconds.
      returned: always
      type: int
      sample: 52428800
    resync:
      description: The running resync (C(running) true; bytes done and total, ETA) or the last one, or null.
      returned: on a source node
      type: dict
      sample: {"reason": "new replica", "running": true, "done_bytes": 4194304, "total_bytes": 8388608, "eta_seconds": 2.1}
waited_seconds:
  description: How long the task waited for O(wait_for).
  returned: when O(wait_for) is given
  type: float
  sample: 3.2
progress_lines:
  description: What the task saw while waiting, one line each time it changed.
  returned: when O(wait_for) is given
  type: list
  elements: str
  sample: ["app: caught_up false, lag_seconds 12.1 (resync 50 %)", "app: caught_up true, lag_seconds 0.1"]
"""

from ansible_collections.haven.dr.plugins.module_utils._conditions import ConditionError, describe, holds, parse
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenTimeout
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._waiter import wait

FIELDS = (
    "name", "state", "state_reason", "connected", "lag_seconds", "lag_bytes", "lag_records", "rpo_seconds", "rpo_ok",
    "caught_up", "journal_fill_percent", "throughput_bytes_per_s", "paused", "last_seq", "acked_seq",
    "received_seq", "applied_seq", "durable_seq", "mode",
)


def derived(group):
    """havend's status of a group with the figures users ask about."""
    out = dict(group)
    if "lag_seconds" in group:  # a source node's group
        capacity = group.get("journal_capacity") or 0
        out["journal_fill_percent"] = round(100.0 * group.get("journal_used", 0) / capacity, 2) if capacity else 0.0
        resyncing = bool((group.get("resync") or {}).get("running"))
        out["caught_up"] = bool(group.get("connected") and not resyncing and group.get("lag_records") == 0)
    return out


def _line(group, conditions):
    parts = ["%s %s" % (field, group.get(field)) for field, dummy, dummy2 in conditions]
    resync = group.get("resync") or {}
    if resync.get("running") and resync.get("total_bytes"):
        parts.append("resync %.0f %%" % (100.0 * resync.get("done_bytes", 0) / resync["total_bytes"]))
    return "%s: %s" % (group.get("name"), ", ".join(parts))


def run_module(haven):
    p = haven.params
    try:
        conditions = [parse(c, FIELDS) for c in p["wait_for"]]
    except ConditionError as exc:
        haven.module.fail_json(msg="wait_for: %s" % exc)
    client = haven.client

    def fetch():
        if p["group"]:
            return [derived(client.get("/v1/groups/%s" % p["group"]))]
        return [derived(g) for g in client.get("/v1/groups")]

    if not conditions:
        return {"changed": False, "groups": fetch()}
    lines = []

    def seen(groups, elapsed):
        line = "; ".join(_line(g, conditions) for g in groups)
        if not lines or lines[-1] != line:
            lines.append(line)
            haven.module.log("haven.dr.replication_info: %s" % line)

    ok, groups, elapsed = wait(
        fetch,
        lambda groups: all(holds(c, g) for c in conditions for g in groups),
        p["wait_timeout"],
        p["wait_interval"],
        seen,
    )
    result = {"changed": False, "groups": groups, "waited_seconds": round(elapsed, 3), "progress_lines": lines}
    if not ok:
        missing = sorted(
            set("%s (%s)" % (describe(c), g.get("name")) for c in conditions for g in groups if not holds(c, g))
        )
        raise HavenTimeout(
            "after %.0f s these conditions still do not hold: %s" % (elapsed, ", ".join(missing)),
            url=client.url,
            result=result,
        )
    return result


def main():
    haven = HavenModule(
        argument_spec=dict(
            group=dict(type="str"),
            wait_for=dict(type="list", elements="str", default=[]),
            wait_timeout=dict(type="float", default=300.0),
            wait_interval=dict(type="float", default=1.0),
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
