#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: checkpoint_info
short_description: The checkpoints a havend target node retains for a group
version_added: 0.1.0
description:
  - Lists the checkpoints of a consistency group that its B(target) node keeps, oldest first, optionally
    only those with a label, or newer than an age, or only the latest.
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
      - The consistency group.
    type: str
    required: true
  label:
    description:
      - Only the checkpoints with this label.
    type: str
  max_age_seconds:
    description:
      - Only the checkpoints taken at most this many seconds ago (by the clock of the machine running the task).
    type: float
  latest:
    description:
      - Only the newest checkpoint left after the filters (RV(checkpoints) holds one or none).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: On the recovery site's node, which keeps the checkpoints
  module_defaults:
    group/haven.dr.haven:  # every module of the collection; ca_path from HAVEN_CA_PATH
      url: "{{ haven_recovery_url }}"
      token: "{{ haven_recovery_token }}"
  block:
    - name: The newest checkpoint of the upgrade
      haven.dr.checkpoint_info:
        group: app
        label: before-upgrade-2026-12
        latest: true
      register: found

    - name: The checkpoints of the last hour
      haven.dr.checkpoint_info:
        group: app
        max_age_seconds: 3600
      register: recent

    - name: Fail when there was none
      ansible.builtin.assert:
        that: recent.checkpoints | length > 0
        fail_msg: "no checkpoint of app in the last hour (the target keeps {{ recent.retained }})"
"""

RETURN = r"""
checkpoints:
  description: The checkpoints kept, oldest first, after the filters.
  returned: success
  type: list
  elements: dict
  sample: [{"id": "3f9a2c01b7e44d3e8f1a2b3c4d5e6f70", "seq": 18233, "time": 1796289000.25, "label": "nightly", "consistency": "crash"}]
latest:
  description: The newest of RV(checkpoints), or null when there is none.
  returned: success
  type: dict
  sample: {"id": "3f9a2c01b7e44d3e8f1a2b3c4d5e6f70", "seq": 18233, "time": 1796289000.25, "label": "nightly", "consistency": "crash"}
retained:
  description: How many checkpoints the target keeps for the group in all, before the filters.
  returned: success
  type: int
  sample: 2048
"""

import time

from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule


def select(checkpoints, label=None, max_age_seconds=None, latest=False, now=None):
    """The checkpoints kept that pass the filters, oldest first."""
    now = time.time() if now is None else now
    chosen = [
        c
        for c in checkpoints
        if (label is None or c.get("label") == label)
        and (max_age_seconds is None or now - float(c.get("time", 0)) <= max_age_seconds)
    ]
    return chosen[-1:] if latest else chosen


def run_module(haven):
    p = haven.params
    kept = haven.client.get("/v1/groups/%s/checkpoints" % p["group"])
    chosen = select(kept, p["label"], p["max_age_seconds"], p["latest"])
    return {"changed": False, "checkpoints": chosen, "latest": chosen[-1] if chosen else None, "retained": len(kept)}


def main():
    haven = HavenModule(
        argument_spec=dict(
            group=dict(type="str", required=True),
            label=dict(type="str"),
            max_age_seconds=dict(type="float"),
            latest=dict(type="bool", default=False),
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
