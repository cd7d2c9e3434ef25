#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: checkpoint
short_description: Take a checkpoint of a havend consistency group
version_added: 0.1.0
description:
  - Puts a checkpoint in the group's write order on its B(source) node. The target keeps it (up to the
    group's retention), so the group's volumes can be exported, booted (a drill) or rolled back as they were
    at that point.
  - With O(consistency=app), or V(auto) when the group has freeze and thaw hooks in the node's config file,
    the checkpoint is application-consistent, taken between the freeze and the thaw; else crash-consistent.
  - A checkpoint is an event, so the task is idempotent by O(label) only. It takes none when the group's
    latest checkpoint already carries O(label) (a play run twice takes one), unless O(force=true).
    havend does not delete single checkpoints; retention drops the oldest.
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
    type: str
    default: ""
  consistency:
    description:
      - V(app) requires the group's freeze and thaw hooks, V(crash) skips them, V(auto) uses them when the
        group has some.
    type: str
    choices: [auto, app, crash]
    default: auto
  force:
    description:
      - Take a checkpoint even when the group's latest one already carries O(label).
    type: bool
    default: false
attributes:
  diff_mode:
    support: none
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
"""

RETURN = r"""
checkpoint:
  description: The checkpoint taken, or the group's latest one when none was taken (null in check mode before it exists).
  returned: success
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
"""

from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule

APP = {"auto": None, "app": True, "crash": False}


def run_module(haven):
    p = haven.params
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
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
