#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: pit_export
short_description: Export a replica volume over NBD as of a checkpoint (point in time)
version_added: 0.1.0
description:
  - Opens (O(state=present)) or closes (O(state=absent)) a point-in-time export of a volume on a havend
    B(target) node, the replica as it was at a retained checkpoint, over NBD. Replication goes on meanwhile.
  - A writable export keeps its writes in a copy-on-write scratch file, dropped when it is closed; the
    replica is never written. This is what a drill boots from.
  - An export of the same volume at the same checkpoint and writability that is open already is returned
    as it is (C(changed=false)).
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
  volume:
    description:
      - The volume of the group. With O(state=absent) and no O(volume), every export of the group is closed.
    type: str
  checkpoint:
    description:
      - The checkpoint, by id, unique prefix of an id, V(latest) or V(oldest).
      - With O(state=absent), only the exports at this checkpoint are closed (all when not given).
    type: str
  writable:
    description:
      - Whether clients may write (to a copy-on-write layer, dropped at close).
    type: bool
    default: false
  state:
    description:
      - V(present) opens the export if it is not open; V(absent) closes the matching exports.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: A restore drill on the recovery site's node
  module_defaults:
    group/haven.dr.haven:  # every module of the collection; ca_path from HAVEN_CA_PATH
      url: "{{ haven_recovery_url }}"
      token: "{{ haven_recovery_token }}"
  block:
    - name: The database volume as of the latest checkpoint, writable (copy-on-write)
      haven.dr.pit_export:
        group: app
        volume: db
        writable: true
      register: db_view

    - name: Copy it out with nbdcopy
      ansible.builtin.command: nbdcopy {{ db_view.export.uri }} {{ restore_dir }}/db.img
      changed_when: true

  always:
    - name: Close every export of the group
      haven.dr.pit_export:
        group: app
        state: absent
"""

RETURN = r"""
export:
  description: The open export (null with O(state=absent), or in check mode before it exists).
  returned: success
  type: dict
  contains:
    export:
      description: Its NBD export name.
      returned: success
      type: str
      sample: app/db@3f9a2c01b7e4.4
    uri:
      description: Its NBD URI.
      returned: success
      type: str
      sample: nbd://10.20.0.5:10810/app/db@3f9a2c01b7e4.4
    size:
      description: The volume's size in bytes.
      returned: success
      type: int
      sample: 10737418240
    checkpoint:
      description: The id of the checkpoint it shows.
      returned: success
      type: str
      sample: 3f9a2c01b7e44d3e8f1a2b3c4d5e6f70
    writable:
      description: Whether it takes writes.
      returned: success
      type: bool
      sample: true
closed:
  description: The exports this task closed (or would close, in check mode).
  returned: success
  type: list
  elements: str
  sample: ["app/db@3f9a2c01b7e4.4"]
"""

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenNotFound
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule


def resolve_checkpoint(checkpoints, ref, group, url):
    """The id ``ref`` names among the group's retained checkpoints (oldest first)."""
    if not checkpoints:
        raise HavenNotFound("group %s retains no checkpoints yet" % group, url=url, status=404)
    if ref in (None, "latest"):
        return checkpoints[-1]["id"]
    if ref == "oldest":
        return checkpoints[0]["id"]
    matches = [c["id"] for c in checkpoints if c["id"].startswith(ref)]
    if len(matches) != 1:
        why = "is not retained" if not matches else "is ambiguous (%d match)" % len(matches)
        raise HavenNotFound("checkpoint %r of group %s %s" % (ref, group, why), url=url, status=404)
    return matches[0]


def _shown(export):
    keys = ("export", "uri", "size", "checkpoint", "writable")
    return dict((k, export.get(k)) for k in keys)


def run_module(haven):
    p = haven.params
    client = haven.client
    exports = [e for e in client.get("/v1/exports") if e["group"] == p["group"]]
    if p["state"] == "absent":
        wanted = None
        if p["checkpoint"]:
            checkpoints = client.get("/v1/groups/%s/checkpoints" % p["group"])
            wanted = resolve_checkpoint(checkpoints, p["checkpoint"], p["group"], client.url)
        closing = [
            e
            for e in exports
            if (p["volume"] is None or e["volume"] == p["volume"]) and (wanted is None or e["checkpoint"] == wanted)
        ]
        result = {"changed": bool(closing), "export": None, "closed": [e["export"] for e in closing]}
        if closing:
            result.update(haven.diff({"exports": result["closed"]}, {"exports": []}))
        if not haven.check_mode:
            for export in closing:
                client.delete("/v1/exports/%s" % export["export"])
        return result
    checkpoints = client.get("/v1/groups/%s/checkpoints" % p["group"])
    wanted = resolve_checkpoint(checkpoints, p["checkpoint"], p["group"], client.url)
    for export in exports:
        if export["volume"] == p["volume"] and export["checkpoint"] == wanted and export["writable"] == p["writable"]:
            return {"changed": False, "export": _shown(export), "closed": []}
    result = {"changed": True, "export": None, "closed": []}
    result.update(haven.diff({"export": None}, {"export": {"volume": p["volume"], "checkpoint": wanted}}))
    if haven.check_mode:
        return result
    opened = client.post(
        "/v1/exports",
        {"group": p["group"], "volume": p["volume"], "checkpoint": wanted, "writable": p["writable"]},
    )
    result["export"] = _shown(dict(opened, checkpoint=opened["checkpoint"]["id"]))
    return result


def main():
    haven = HavenModule(
        argument_spec=dict(
            group=dict(type="str", required=True),
            volume=dict(type="str"),
            checkpoint=dict(type="str"),
            writable=dict(type="bool", default=False),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ["volume"])],
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
