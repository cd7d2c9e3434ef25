#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: checkpoint
short_description: Take a checkpoint of a havend consistency group, or delete retained ones
version_added: 0.1.0
description:
  - Puts a checkpoint in the group's write order on its B(source) node. The target keeps it (up to the
    group's retention), so the group's volumes can be exported, booted (a drill) or rolled back as they were
    at that point.
  - With O(consistency=app), or V(auto) when the group has freeze and thaw hooks in the node's config file,
    the checkpoint is application-consistent, taken between the freeze and the thaw; else crash-consistent.
  - A checkpoint is an event, so the task is idempotent by O(label) only. It takes none when the group's
    latest checkpoint already carries O(label) (a play run twice takes one), unless O(force=true).
  - With O(state=absent) it deletes retained checkpoints instead, on the group's B(target) node (O(url) and
    O(token) of the recovery site's node, as for M(haven.dr.checkpoint_info)), where they are kept - every one
    that carries O(label), or the one O(checkpoint) names (both - that one if it carries O(label)). None
    matching is C(changed=false). A deleted checkpoint can no longer be exported, rolled back to or promoted
    to; every other one stays exactly as it was. Deleting one that an open point-in-time export shows fails.
  - The source node still counts a deleted checkpoint as the group's latest one, so O(state=present) with its
    label takes no new one unless O(force=true).
  - Needs a token of the C(operate) scope.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.changes
options:
  group:
    description:
      - The consistency group.
    type: str
    required: true
  label:
    description:
      - A label for the checkpoint (up to 200 characters), shown by M(haven.dr.checkpoint_info) and usable
        to find it again.
      - With O(state=absent), the label of the checkpoints to delete (all of them). O(state=absent) needs a
        label that is not empty or O(checkpoint).
    type: str
    default: ""
  checkpoint:
    description:
      - With O(state=absent), the checkpoint to delete, by id or a unique prefix of an id (6 characters or
        more). V(latest) and V(oldest) are refused - they would name another checkpoint at each run.
      - Not used with O(state=present).
    type: str
  state:
    description:
      - V(present) takes a checkpoint on the source node; V(absent) deletes retained checkpoints on the
        target node.
    type: str
    choices: [present, absent]
    default: present
  consistency:
    description:
      - V(app) requires the group's freeze and thaw hooks, V(crash) skips them, V(auto) uses them when the
        group has some.
      - Not used with O(state=absent).
    type: str
    choices: [auto, app, crash]
    default: auto
  force:
    description:
      - Take a checkpoint even when the group's latest one already carries O(label).
      - Not used with O(state=absent).
    type: bool
    default: false
attributes:
  diff_mode:
    support: partial
    details: With O(state=absent) - the checkpoints deleted, before and after. Taking one shows no diff.
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here.
- name: An application-consistent checkpoint before the upgrade
  haven.dr.checkpoint:
    group: app
    label: before-upgrade-2026-12
    consistency: app  # between the freeze and thaw hooks of the group (node's config file)
  register: before_upgrade

- name: Wait until the recovery site keeps it (it travels in the group's write order)
  haven.dr.checkpoint_info:
    url: "{{ haven_recovery_url }}"
    token: "{{ haven_recovery_token }}"
    group: app
    label: before-upgrade-2026-12
    latest: true
  register: kept
  until: kept.latest is not none and kept.latest.id == before_upgrade.checkpoint.id
  retries: 60
  delay: 2

- name: Roll the replica back to it if the upgrade went wrong
  haven.dr.group_operation:
    url: "{{ haven_recovery_url }}"
    token: "{{ haven_recovery_token }}"
    group: app
    operation: rollback
    checkpoint: "{{ before_upgrade.checkpoint.id }}"
  when: upgrade_failed | default(false)

- name: A checkpoint for a test run only
  haven.dr.checkpoint:
    group: app
    label: scratch-test
    consistency: crash

- name: Once the recovery site keeps it, delete it there (every retained checkpoint labelled scratch-test)
  haven.dr.checkpoint:
    url: "{{ haven_recovery_url }}"  # the target node keeps the checkpoints
    token: "{{ haven_recovery_token }}"
    group: app
    label: scratch-test
    state: absent
  register: dropped
  until: dropped.deleted | length > 0
  retries: 60
  delay: 2
"""

RETURN = r"""
checkpoint:
  description: The checkpoint taken, or the group's latest one when none was taken (null in check mode before it exists).
  returned: with O(state=present)
  type: dict
  contains:
    id:
      description: Its id (32 hex digits); a unique prefix of it names it too.
      returned: success
      type: str
      sample: 3f9a2c01b7e44d3e8f1a2b3c4d5e6f70
    seq:
      description: Its place in the group's write order.
      returned: success
      type: int
      sample: 18233
    time:
      description: When it was taken (seconds since the epoch, the source node's clock).
      returned: success
      type: float
      sample: 1796289000.25
    label:
      description: Its label.
      returned: success
      type: str
      sample: before-upgrade-2026-12
    consistency:
      description: V(app) (between a freeze and a thaw) or V(crash).
      returned: success
      type: str
      sample: app
    frozen_seconds:
      description: How long the application was frozen, for an application-consistent one taken by this task.
      returned: when an application-consistent checkpoint was taken
      type: float
      sample: 0.12
deleted:
  description: The retained checkpoints this task deleted (or would delete, in check mode), oldest first.
  returned: with O(state=absent)
  type: list
  elements: dict
  contains:
    id:
      description: Its id (32 hex digits).
      returned: success
      type: str
      sample: 3f9a2c01b7e44d3e8f1a2b3c4d5e6f70
    seq:
      description: Its place in the group's write order.
      returned: success
      type: int
      sample: 18233
    time:
      description: When it was taken (seconds since the epoch, the source node's clock).
      returned: success
      type: float
      sample: 1796289000.25
    label:
      description: Its label.
      returned: success
      type: str
      sample: scratch-test
    consistency:
      description: V(app) (between a freeze and a thaw) or V(crash).
      returned: success
      type: str
      sample: crash
"""

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError, HavenNotFound
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule

APP = {"auto": None, "app": True, "crash": False}
SHOWN = ("id", "seq", "time", "label", "consistency")


def matching(checkpoints, label="", ref=None):
    """The retained checkpoints (oldest first) that O(state=absent) deletes:
    those of ``label`` (when not empty), the one ``ref`` names (an id or a
    unique prefix of 6+ characters; when given), both conditions when both are."""
    if ref is not None:
        if ref in ("latest", "oldest"):
            raise HavenError("checkpoint: %s names another checkpoint at each run; give its id or a prefix of it" % ref)
        exact = [c for c in checkpoints if c["id"] == ref]
        found = exact or ([c for c in checkpoints if c["id"].startswith(ref)] if len(ref) >= 6 else [])
        if len(found) > 1:
            raise HavenError("checkpoint: %r is a prefix of %d retained checkpoints" % (ref, len(found)))
        checkpoints = found
    return [dict((k, c.get(k)) for k in SHOWN) for c in checkpoints if not label or c.get("label") == label]


def absent(haven):
    p = haven.params
    if not p["label"] and not p["checkpoint"]:
        raise HavenError("state=absent needs a label (not empty) or a checkpoint")
    client = haven.client
    path = "/v1/groups/%s/checkpoints" % p["group"]
    chosen = matching(client.get(path), p["label"], p["checkpoint"])
    diff = haven.diff({"checkpoints": chosen}, {"checkpoints": []}) if chosen else {}
    if haven.check_mode:
        return dict({"changed": bool(chosen), "deleted": chosen}, **diff)
    deleted = []
    for checkpoint in chosen:
        try:
            client.delete("%s/%s" % (path, checkpoint["id"]))
        except HavenNotFound:  # dropped by retention meanwhile: gone all the same
            continue
        deleted.append(checkpoint)
    diff = haven.diff({"checkpoints": deleted}, {"checkpoints": []}) if deleted else {}
    return dict({"changed": bool(deleted), "deleted": deleted}, **diff)


def run_module(haven):
    p = haven.params
    if p["state"] == "absent":
        return absent(haven)
    if p["checkpoint"]:
        raise HavenError("checkpoint names one to delete: it is used with state=absent only")
    client = haven.client
    group = client.get("/v1/groups/%s" % p["group"])
    latest = group.get("last_checkpoint")
    if latest and latest.get("label") == p["label"] and p["label"] and not p["force"]:
        return {"changed": False, "checkpoint": latest}
    if haven.check_mode:
        return {"changed": True, "checkpoint": None}
    body = {"label": p["label"], "app": APP[p["consistency"]]}
    return {"changed": True, "checkpoint": client.post("/v1/groups/%s/checkpoints" % p["group"], body)}


def main():
    haven = HavenModule(
        argument_spec=dict(
            group=dict(type="str", required=True),
            label=dict(type="str", default=""),
            consistency=dict(type="str", choices=["auto", "app", "crash"], default="auto"),
            force=dict(type="bool", default=False),
            checkpoint=dict(type="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
