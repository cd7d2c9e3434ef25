#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: protected_server
short_description: A server of the protected site and its disks, in a havend consistency group
version_added: 0.1.0
description:
  - Makes sure the disks of a server of the protected site are volumes of a live consistency group on a
    havend B(source) node, labelled with the server's name (O(state=present)), or that none is any more
    (O(state=absent)). havend keeps the label; its API, M(haven.dr.replication_info) and the
    C(haven.dr.nodes) inventory list servers by it, so a play deals in servers rather than volume files.
  - A disk added to the group is captured at once and copied to the target while the group goes on
    replicating; O(wait) waits until the initial copy of every disk of the server is done.
  - Disks are identified by name. A disk the group has already is left as it is (its path and size are
    not compared, a warning says when they differ); a disk of this server that is no longer listed in
    O(disks) stops being replicated. Only volumes labelled with O(name) are ever removed.
  - Everything is checked before anything is changed; a disk name that another volume of the node holds,
    or disks of the server in another group, fail the task naming them.
  - The group must exist (M(haven.dr.protection_group) makes it), or O(create_group=true) makes it with the
    server's disks, and be one made through the API (the volumes of a group of the node's config file are changed
    in the file). havend refuses to change the volumes of a group while it is fenced or failed over.
  - Needs a token of the C(admin) scope.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - haven.dr.wait
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.changes
options:
  name:
    description:
      - The server's name, the label of its volumes (letters, digits, C(.), C(-), C(_)), for example its host
        name in the inventory.
    type: str
    required: true
  group:
    description:
      - The consistency group the server's disks are in. Required with O(state=present).
      - With O(state=absent), only the server's disks in this group are removed; without it, those of every
        group of the node.
    type: str
  disks:
    description:
      - The server's disks. Required with O(state=present); a disk of the server in O(group) that is not
        listed is removed from the group.
    type: list
    elements: dict
    suboptions:
      name:
        description:
          - The volume's name (unique on the node), also its NBD export name on the source node.
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
  state:
    description:
      - V(present), the listed disks replicated in O(group); V(absent), none of the server's disks replicated.
    type: str
    choices: [present, absent]
    default: present
  purge:
    description:
      - Whether the replica of a removed disk is deleted on the target node too. By default it is kept there.
    type: bool
    default: false
  create_group:
    description:
      - Whether a missing O(group) is made, with the server's disks and havend's default settings
        (M(haven.dr.protection_group) changes them later, without giving volumes). Servers of one group
        protected at the same time (one task, several hosts) each make it or add to it - the one whose create
        comes second adds its disks to the group the first one made.
      - By default a missing group fails the task.
    type: bool
    default: false
  wait:
    description:
      - Whether to wait until the initial copy of every disk of the server in O(group) has ended (state
        C(protected)), reporting the progress. Ignored with O(state=absent).
    type: bool
    default: true
attributes:
  diff_mode:
    details: The server's disks before and after (name, group, path, size).
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH
# here; changing a group's volumes needs a token of the admin scope.
- name: The CRM's consistency group, with the disk of its application server
  haven.dr.protection_group:
    name: crm
    volumes:
      - {name: crm-app, path: crm/app.img, size: 536870912, server: crm-app1.example.com}

- name: Its database server's disks in the same group (one write order), copied before the task returns
  haven.dr.protected_server:
    name: crm-db1.example.com
    group: crm
    disks:
      - {name: crm-db-data, path: crm/db-data.img, size: 1073741824}  # made, sparse, when missing
      - {name: crm-db-wal, path: crm/db-wal.img, size: 268435456}
    wait_timeout: 1800
  register: crm_db1

- name: A new group for a new application, made with its first server's disks
  haven.dr.protected_server:
    name: reports1.example.com
    group: reports
    create_group: true
    disks:
      - {name: reports-data, path: reports/data.img, size: 1073741824}

- name: Show where each disk is served (NBD)
  ansible.builtin.debug:
    msg: "{{ crm_db1.server.disks | map(attribute='uri') | list }}"

- name: The WAL disk is gone from the server - stop replicating it, its replica deleted too
  haven.dr.protected_server:
    name: crm-db1.example.com
    group: crm
    disks:
      - {name: crm-db-data, path: crm/db-data.img}
    purge: true

- name: The database server is decommissioned - none of its disks is replicated any more
  haven.dr.protected_server:
    name: crm-db1.example.com
    state: absent
"""

RETURN = r"""
server:
  description: The server after the task (in check mode, as before).
  returned: success
  type: dict
  contains:
    name:
      description: Its name.
      returned: success
      type: str
      sample: db2.example.com
    group:
      description: The group of its disks (null once it has none).
      returned: success
      type: str
      sample: app
    disks:
      description:
        - Its volumes as havend lists them (C(/v1/volumes)) - C(name), C(group), C(path), C(size),
          C(uri) (its NBD export), C(server), C(state) (C(syncing) while the initial copy runs, else
          C(protected)) and C(sync) (C(done_bytes), C(total_bytes), or null).
      returned: success
      type: list
      elements: dict
      sample: [{"name": "db2-data", "group": "app", "path": "/srv/havend/db2/data.img", "size": 8388608,
                "server": "db2.example.com", "state": "protected", "sync": null}]
added:
  description: The disks added to the group (or that would be, in check mode).
  returned: success
  type: list
  elements: str
  sample: [db2-wal]
removed:
  description: The disks removed from their group (or that would be, in check mode).
  returned: success
  type: list
  elements: str
  sample: [db2-log]
progress_lines:
  description: The initial copy's progress seen while waiting, one line each time it changed.
  returned: when the task waited
  type: list
  elements: str
  sample: ["db2.example.com: db2-wal 2097152 of 4194304 bytes (50 %) after 1 s"]
"""

import posixpath

from ansible_collections.haven.dr.plugins.module_utils._argspec import wait_argspec
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenApiError, HavenError, HavenTimeout
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._waiter import wait


def _disk(volume, group=None):
    """What the diff shows of a disk."""
    keys = ("name", "group", "path", "size")
    return dict((k, volume.get(k, group if k == "group" else None)) for k in keys)


def _same_file(given, on_node):
    """Whether ``given`` (relative to volume_dir, or absolute) names the node's ``on_node``."""
    given = posixpath.normpath(given)
    return on_node == given or (not given.startswith("/") and (on_node or "").endswith("/" + given))


def plan(volumes, p):
    """(disks to add, volumes to remove, warnings) for the server's wanted
    state; every refusal raises before anything is changed."""
    mine = [v for v in volumes if v.get("server") == p["name"]]
    if p["state"] == "absent":
        return [], [v for v in mine if p["group"] is None or v.get("group") == p["group"]], []
    elsewhere = sorted(set(v.get("group") for v in mine if v.get("group") != p["group"]))
    if elsewhere:
        names = ", ".join(v["name"] for v in mine if v.get("group") != p["group"])
        raise HavenError(
            "server %s has disks in group %s too (%s): a server's disks share one group; remove them from it "
            "first (state=absent, group=%s)" % (p["name"], ", ".join(elsewhere), names, elsewhere[0])
        )
    listed = [d["name"] for d in p["disks"]]
    twice = sorted(set(n for n in listed if listed.count(n) > 1))
    if twice:
        raise HavenError("disks: %s listed more than once" % ", ".join(twice))
    have = dict((v["name"], v) for v in mine)
    taken = dict((v["name"], v) for v in volumes)
    add, warnings = [], []
    for disk in p["disks"]:
        current = have.get(disk["name"])
        if current is not None:
            if not _same_file(disk["path"], current.get("path")):
                warnings.append(
                    "disk %s of server %s is %s on the node, not %s: a disk's file is not changed (give the "
                    "new file a new name)" % (disk["name"], p["name"], current.get("path"), disk["path"])
                )
            continue
        other = taken.get(disk["name"])
        if other is not None:
            raise HavenError(
                "disk %s: the volume name is taken on this node (group %s, %s)"
                % (
                    disk["name"],
                    other.get("group"),
                    "server %s" % other["server"] if other.get("server") else "no server",
                )
            )
        add.append(disk)
    remove = [v for v in mine if v["name"] not in listed]
    return add, remove, warnings


def _synced(volume):
    return volume.get("state") != "syncing"


def _describe_sync(volume):
    sync = volume.get("sync") or {}
    total = sync.get("total_bytes")
    if total:
        done = sync.get("done_bytes") or 0
        return "%s %d of %d bytes (%.0f %%)" % (volume["name"], done, total, 100.0 * done / total)
    return "%s syncing" % volume["name"]


def _wait_synced(haven, fetch):
    p = haven.params
    lines = []

    def seen(disks, elapsed):
        pending = [_describe_sync(v) for v in disks if not _synced(v)]
        line = "%s: %s" % (p["name"], ", ".join(pending) if pending else "every disk protected")
        if not lines or lines[-1].split(" after ")[0] != line:
            lines.append("%s after %.0f s" % (line, elapsed))
            haven.module.log("haven.dr.protected_server: " + lines[-1])

    ok, disks, elapsed = wait(
        fetch, lambda disks: all(_synced(v) for v in disks), p["wait_timeout"], p["wait_interval"], seen
    )
    if not ok:
        raise HavenTimeout(
            "after %.0f s the initial copy of %s is not done: %s"
            % (elapsed, p["name"], ", ".join(_describe_sync(v) for v in disks if not _synced(v))),
            url=haven.client.url,
            result={"progress_lines": lines, "server": {"name": p["name"], "group": p["group"], "disks": disks}},
        )
    return disks, lines


def _body(disk, server):
    return {"name": disk["name"], "path": disk["path"], "size": disk.get("size"), "server": server}


def _create_group(client, p, add, done):
    """Makes the group with the disks to add; the disks still to add (none,
    or all of them when another task made the group first: 409)."""
    try:
        client.post("/v1/groups", {"name": p["group"], "volumes": [_body(d, p["name"]) for d in add]})
    except HavenApiError as exc:
        if exc.status != 409 or client.get_or_none("/v1/groups/%s" % p["group"]) is None:
            raise
        taken = set(v["name"] for v in client.get("/v1/volumes", params={"group": p["group"]}))
        clash = sorted(taken & set(d["name"] for d in add))
        if clash:  # another server made it with a disk of the same name: not ours
            raise HavenError(
                "group %s was made meanwhile, with %s: the volume name is taken" % (p["group"], ", ".join(clash)),
                url=client.url,
            )
        return add
    done["added"].extend(d["name"] for d in add)
    return []


def run_module(haven):
    p = haven.params
    client = haven.client
    groups = {}
    create = False
    if p["state"] == "present":
        groups[p["group"]] = client.get_or_none("/v1/groups/%s" % p["group"])
        if groups[p["group"]] is None:
            if not p["create_group"]:
                raise HavenError(
                    "group %s does not exist on this node: make it first (haven.dr.protection_group), or "
                    "create_group=true" % p["group"],
                    url=client.url,
                )
            create = True
    volumes = client.get("/v1/volumes")
    add, remove, warnings = plan(volumes, p)
    changing = sorted(set([p["group"]] if add else []) | set(v["group"] for v in remove))
    for name in changing:  # refused by havend anyway: say so before changing anything, in check mode too
        if name not in groups:
            groups[name] = client.get_or_none("/v1/groups/%s" % name)
        if ((groups[name] or {}).get("settings") or {}).get("defined_in") == "config":
            raise HavenError(
                "group %s is defined in the node's config file: its volumes are changed there, not through the "
                "API" % name,
                url=client.url,
            )
    for warning in warnings:
        haven.module.warn(warning)
    before = [v for v in volumes if v.get("server") == p["name"]]

    def shown(disks):
        groups = sorted(set(d.get("group") for d in disks if d.get("group")))
        group = p["group"] if p["state"] == "present" else (groups[0] if len(groups) == 1 else None)
        return {"name": p["name"], "group": group if disks else None, "disks": disks}

    result = {
        "changed": bool(add or remove),
        "server": shown(before),
        "added": [d["name"] for d in add],
        "removed": [v["name"] for v in remove],
    }
    removed_names = result["removed"]
    after = [_disk(v) for v in before if v["name"] not in removed_names] + [_disk(d, p["group"]) for d in add]
    if result["changed"]:
        result.update(haven.diff(shown([_disk(v) for v in before]), shown(after)))
    if haven.check_mode:
        return result
    done = {"added": [], "removed": []}
    if create:
        add = _create_group(client, p, add, done)
    try:
        for disk in add:  # added first: the server's data is never less protected midway
            client.post("/v1/groups/%s/volumes" % p["group"], _body(disk, p["name"]))
            done["added"].append(disk["name"])
        for volume in remove:
            purge = "true" if p["purge"] else "false"
            client.delete("/v1/groups/%s/volumes/%s?purge=%s" % (volume["group"], volume["name"], purge))
            done["removed"].append(volume["name"])
    except HavenError as exc:  # say what was done before the failure
        failed = HavenApiError(
            "%s (added before it: %s; removed: %s)"
            % (exc.message, ", ".join(done["added"]) or "none", ", ".join(done["removed"]) or "none"),
            url=exc.url,
            status=getattr(exc, "status", None),
            detail=getattr(exc, "detail", None),
        )
        failed.result = dict(result, changed=bool(done["added"] or done["removed"]), **done)
        raise failed

    def fetch():
        query = {"group": p["group"], "server": p["name"]} if p["state"] == "present" else {"server": p["name"]}
        return client.get("/v1/volumes", params=query)

    if p["state"] == "present" and p["wait"]:
        disks, lines = _wait_synced(haven, fetch)
        result["progress_lines"] = lines
    else:
        disks = fetch()
    result["server"] = shown(disks)
    return result


def main():
    disk = dict(
        name=dict(type="str", required=True),
        path=dict(type="str", required=True),
        size=dict(type="int"),
    )
    spec = dict(
        name=dict(type="str", required=True),
        group=dict(type="str"),
        disks=dict(type="list", elements="dict", options=disk),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        purge=dict(type="bool", default=False),
        create_group=dict(type="bool", default=False),
    )
    spec.update(wait_argspec())
    haven = HavenModule(argument_spec=spec, required_if=[("state", "present", ["group", "disks"])])
    haven.run(run_module)


if __name__ == "__main__":
    main()
