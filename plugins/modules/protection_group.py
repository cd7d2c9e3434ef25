#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: protection_group
short_description: Consistency groups of a havend source node, their volumes and replication settings
version_added: 0.1.0
description:
  - Makes sure a consistency group exists on a havend B(source) node with the given volumes and settings
    (O(state=present)), is paused (O(state=paused), writes are still journaled), or does not exist
    (O(state=absent), its volumes and journal stay on disk).
  - All the volumes of a group share one write order, so a multi-tier application (a database and its
    log, an application server) is replicated as one consistent whole.
  - Only the settings given are compared and changed. Volumes are identified by name. A volume new in
    O(volumes) is added to the live group (served at once, its contents copied to the target while the other
    volumes keep replicating; C(state=syncing) in the node's C(/v1/volumes) until the target holds it
    whole); a volume missing from O(volumes) is removed (no longer replicated; its replica on the target is kept unless
    O(purge=true)). New volumes are added before old ones are removed. M(haven.dr.protected_server) does the
    same a server's disks at a time, and can wait for the copies.
  - Groups defined in the node's config file are read but changed in the file, not by this module.
  - Needs a token of the C(admin) scope (C(operate) for pausing and resuming only).
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.changes
options:
  name:
    description:
      - The group's name (letters, digits, C(.), C(_), C(-); up to 64 characters).
    type: str
    required: true
  state:
    description:
      - V(present), replicating; V(paused), shipping stopped by an operator; V(absent), not replicated.
    type: str
    choices: [present, paused, absent]
    default: present
  volumes:
    description:
      - The group's volumes. Required to create the group.
    type: list
    elements: dict
    suboptions:
      name:
        description: The volume's name, also its NBD export name on the source node.
        type: str
        required: true
      path:
        description:
          - Its file, inside the node's C(volume_dir) (relative to it, or absolute within it).
        type: str
        required: true
      size:
        description:
          - Bytes (a multiple of 4096). When given and the file does not exist, it is made, sparse.
        type: int
      server:
        description:
          - The protected server this volume is a disk of (a label; the C(haven.dr.nodes) inventory lists servers).
        type: str
  purge:
    description:
      - Whether the replica of a volume removed from O(volumes) is deleted on the target node too. By default
        it is kept there.
    type: bool
    default: false
  mode:
    description:
      - V(async) ships writes as they come; V(sync) makes every flush wait for the target (RPO 0).
    type: str
    choices: [async, sync]
  rpo_seconds:
    description: The recovery point objective; the lag beyond it is reported as a breach.
    type: float
  compression_level:
    description: zstd level of the shipped batches (0 is off).
    type: int
  bandwidth_limit:
    description: Bytes per second on the wire (0 is unlimited).
    type: int
  reverse_interval_seconds:
    description: While failed over, pull the recovery side's changes back this often (0 is off).
    type: float
  journal:
    description:
      - The group's journal. Set when the group is made; a different value for a live group fails.
    type: dict
    suboptions:
      segment_size:
        description: Bytes per journal segment.
        type: int
      max_segments:
        description: Segments at most; a full journal switches to tracking changed regions.
        type: int
  checkpoints:
    description: The checkpoint policy.
    type: dict
    suboptions:
      interval_seconds:
        description: Seconds between periodic checkpoints (0 is only on demand).
        type: float
      retain:
        description: Checkpoints the target keeps.
        type: int
      max_age_seconds:
        description: Seconds a checkpoint is kept at most (0 is no limit).
        type: float
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH
# here; making, changing and deleting a group needs a token of the admin scope.
- name: The three tiers of the shop, one write order, RPO 15 s
  haven.dr.protection_group:
    name: shop
    rpo_seconds: 15
    checkpoints:
      interval_seconds: 300
      retain: 2048
    volumes:  # made, sparse, inside the node's volume_dir when missing
      - {name: shop-db, path: shop/db.img, size: 68719476736, server: db1}
      - {name: shop-app, path: shop/app.img, size: 17179869184, server: app1}
      - {name: shop-web, path: shop/web.img, size: 8589934592, server: web1}

- name: Pause shipping during the maintenance window (writes are journaled)
  haven.dr.protection_group:
    name: shop
    state: paused

- name: Resume after it (what was journaled meanwhile is shipped)
  haven.dr.protection_group:
    name: shop
    state: present

- name: The database gets a disk for its logs, copied while the other tiers keep replicating
  haven.dr.protection_group:
    name: shop
    volumes:
      - {name: shop-db, path: shop/db.img, server: db1}
      - {name: shop-db-log, path: shop/db-log.img, size: 268435456, server: db1}
      - {name: shop-app, path: shop/app.img, server: app1}
      - {name: shop-web, path: shop/web.img, server: web1}

- name: The web tier moves out - it is no longer replicated, and its replica is deleted
  haven.dr.protection_group:
    name: shop
    purge: true
    volumes:
      - {name: shop-db, path: shop/db.img, server: db1}
      - {name: shop-db-log, path: shop/db-log.img, server: db1}
      - {name: shop-app, path: shop/app.img, server: app1}

- name: The shop is retired - stop replicating it (its volumes and journal stay on disk)
  haven.dr.protection_group:
    name: shop
    state: absent
"""

RETURN = r"""
group:
  description: The group after the task (null once absent, or in check mode before it exists).
  returned: success
  type: dict
  contains:
    name:
      description: Its name.
      returned: success
      type: str
      sample: shop
    state:
      description: Its failover state.
      returned: success
      type: str
      sample: protecting
    settings:
      description: Its settings, as this module takes them, and where they are defined (C(api) or C(config)).
      returned: success
      type: dict
      sample: {"defined_in": "api", "mode": "async", "rpo_seconds": 15.0, "volumes": [{"name": "shop-db", "server": "db1"}]}
changes:
  description: What the task changed (or would change, in check mode), by setting.
  returned: success
  type: list
  elements: str
  sample: ["rpo_seconds", "checkpoints.interval_seconds"]
"""

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule

SETTINGS = ("mode", "rpo_seconds", "compression_level", "bandwidth_limit", "reverse_interval_seconds")
POLICY = ("interval_seconds", "retain", "max_age_seconds")
JOURNAL = ("segment_size", "max_segments")


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def differences(current, p):
    """(changes for PATCH, their names, volumes to add, volume names to remove);
    what cannot change on a live group (its journal, a volume's label, a
    config file's volume list) raises, before anything changes."""
    settings = current.get("settings") or {}
    patch, names = {}, []
    for key in SETTINGS:
        if p[key] is not None and _number(settings.get(key)) != _number(p[key]):
            patch[key] = p[key]
            names.append(key)
    wanted = p["checkpoints"] or {}
    have = settings.get("checkpoints") or {}
    policy = dict((k, wanted[k]) for k in POLICY if wanted.get(k) is not None and _number(have.get(k)) != _number(wanted[k]))
    if policy:
        patch["checkpoints"] = policy
        names += ["checkpoints.%s" % k for k in sorted(policy)]
    journal = p["journal"] or {}
    for key in JOURNAL:
        if journal.get(key) is not None and (settings.get("journal") or {}).get(key) != journal[key]:
            raise HavenError(
                "group %s: journal.%s is %s on the node; a live group's journal cannot be changed "
                "(make a new group)" % (p["name"], key, (settings.get("journal") or {}).get(key))
            )
    add, remove = [], []
    if p["volumes"] is not None:
        existing = dict((v["name"], v) for v in settings.get("volumes") or [])
        wanted_names = [v["name"] for v in p["volumes"]]
        add = [v for v in p["volumes"] if v["name"] not in existing]
        remove = [name for name in existing if name not in wanted_names]
        if not wanted_names:
            raise HavenError("group %s: volumes is empty; a group has one volume at least (state=absent deletes it)" % p["name"])
        if (add or remove) and settings.get("defined_in") == "config":
            change = ["+" + v["name"] for v in add] + ["-" + n for n in remove]
            raise HavenError(
                "group %s is defined in the node's config file: its volumes (%s) are changed there, not "
                "through the API" % (p["name"], ", ".join(change))
            )
        for volume in p["volumes"]:
            have_server = (existing.get(volume["name"]) or {}).get("server")
            if volume["name"] in existing and volume.get("server") is not None and have_server != volume["server"]:
                raise HavenError(
                    "group %s: volume %s is labelled %r on the node; relabelling a volume is not supported "
                    "(make a new group)" % (p["name"], volume["name"], have_server)
                )
        names += ["volumes +%s" % v["name"] for v in add] + ["volumes -%s" % n for n in remove]
    return patch, names, add, remove


def _volume_body(volume):
    return dict((k, v) for k, v in volume.items() if v is not None)


def _create_body(p):
    body = {"name": p["name"], "volumes": [_volume_body(v) for v in p["volumes"]]}
    for key in SETTINGS:
        if p[key] is not None:
            body[key] = p[key]
    for key, fields in (("checkpoints", POLICY), ("journal", JOURNAL)):
        given = dict((k, v) for k, v in (p[key] or {}).items() if k in fields and v is not None)
        if given:
            body[key] = given
    return body


def _shown(group):
    if group is None:
        return None
    return {"name": group.get("name"), "state": group.get("state"), "settings": group.get("settings")}


def run_module(haven):
    p = haven.params
    client = haven.client
    path = "/v1/groups/%s" % p["name"]
    current = client.get_or_none(path)
    if p["state"] == "absent":
        result = {"changed": current is not None, "group": None, "changes": ["deleted"] if current else []}
        if current is not None:
            result.update(haven.diff({"group": _shown(current)}, {"group": None}))
            if not haven.check_mode:
                client.delete(path)
        return result
    if current is None:
        if not p["volumes"]:
            raise HavenError("group %s does not exist: volumes are required to make it" % p["name"])
        changes = ["created"] + (["paused"] if p["state"] == "paused" else [])
        result = {"changed": True, "group": None, "changes": changes}
        result.update(haven.diff({"group": None}, {"group": _create_body(p)}))
        if haven.check_mode:
            return result
        client.post("/v1/groups", _create_body(p))
        if p["state"] == "paused":
            client.post(path + "/pause")
        result["group"] = _shown(client.get(path))
        return result
    patch, changes, add, remove = differences(current, p)
    toggle = None
    if p["state"] == "paused" and not current.get("paused"):
        toggle = "pause"
    elif p["state"] == "present" and current.get("paused"):
        toggle = "resume"
    if toggle:
        changes.append("paused" if toggle == "pause" else "resumed")
    result = {"changed": bool(changes), "group": _shown(current), "changes": changes}
    if not changes:
        return result
    before = _shown(current)
    if haven.check_mode:
        return dict(result, **haven.diff(before, dict(before, changes=changes)))
    if patch:
        client.patch(path, patch)
    for volume in add:  # before the removals: the group never runs out of volumes
        client.post(path + "/volumes", _volume_body(volume))
    for name in remove:
        client.delete("%s/volumes/%s?purge=%s" % (path, name, "true" if p["purge"] else "false"))
    if toggle:
        client.post("%s/%s" % (path, toggle))
    after = _shown(client.get(path))
    result["group"] = after
    return dict(result, **haven.diff(before, after))


def main():
    volume = dict(
        name=dict(type="str", required=True),
        path=dict(type="str", required=True),
        size=dict(type="int"),
        server=dict(type="str"),
    )
    haven = HavenModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "paused", "absent"], default="present"),
            volumes=dict(type="list", elements="dict", options=volume),
            purge=dict(type="bool", default=False),
            mode=dict(type="str", choices=["async", "sync"]),
            rpo_seconds=dict(type="float"),
            compression_level=dict(type="int"),
            bandwidth_limit=dict(type="int"),
            reverse_interval_seconds=dict(type="float"),
            journal=dict(type="dict", options=dict(segment_size=dict(type="int"), max_segments=dict(type="int"))),
            checkpoints=dict(
                type="dict",
                options=dict(
                    interval_seconds=dict(type="float"),
                    retain=dict(type="int"),
                    max_age_seconds=dict(type="float"),
                ),
            ),
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
