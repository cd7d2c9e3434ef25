#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: recovery_plan
short_description: Validate a recovery plan against the nodes and show what would boot where
version_added: 0.1.0
description:
  - Checks a recovery plan (ordered boot groups of protected servers, with their resources, networks, disks
    and health checks) and returns it normalised, every default filled in, with RV(boot_order) - per boot
    group, each server with where it would boot (provider, NICs, the point-in-time exports of its disks).
  - The plan is checked on its own first (keys, names unique, networks known, addresses, the health checks'
    keys), then against the B(source) node (O(url)) - every server a protected server there (the label of its
    volumes), its protection group and volumes there, no volume used by two servers - and, with
    O(recovery_url), against the B(recovery) node, which keeps the checkpoints each disk boots from.
  - A plan that is not valid fails with the path of the bad key, for example
    C(plan.groups[1].servers[0].network), in the message and in RV(bad_key).
  - Changes nothing and boots nothing, in check mode or not. Running a plan (drills, failover, failback) is
    not in the collection yet. The format, the validation rules and what running a plan does are in
    docs/recovery-plans.md; docs/recovery-plan.schema.json is its JSON schema.
  - Needs a token of the C(read) scope on both nodes.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.plan
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.info_module
options:
  recovery_url:
    description:
      - Base URL of the recovery site's node (the replication target), which keeps the checkpoints.
      - Without it the checkpoints the plan names are not checked (a warning says so) and RV(boot_order) has
        no checkpoint ids.
    type: str
  recovery_token:
    description:
      - Bearer token of the recovery node's API. Required with O(recovery_url).
    type: str
  recovery_ca_path:
    description:
      - CA certificate (PEM) of the recovery node's certificate, default O(ca_path). O(validate_certs),
        O(client_cert), O(client_key), O(request_timeout) and O(retries) apply to both nodes.
    type: path
notes:
  - The plan's format is also published as a JSON schema, docs/recovery-plan.schema.json, for editors and CI.
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here.
- name: Check the application's recovery plan against both sites
  haven.dr.recovery_plan:
    recovery_url: "{{ haven_recovery_url }}"  # the recovery site's node keeps the checkpoints
    recovery_token: "{{ haven_recovery_token }}"
    plan:
      name: app
      networks:
        dr-lan: {isolated: false, cidr: 10.20.0.0/24}
      groups:
        - name: database
          servers:
            - name: db1.example.com  # the label of its volumes (db and log of group app)
              vcpus: 4
              memory_mib: 8192
              nics:
                - {network: dr-lan, ip: 10.20.0.11/24}
              health_check: {type: tcp, port: 5432, timeout_seconds: 600}
  register: checked

- name: Show what would boot where
  ansible.builtin.debug:
    msg: "{{ item.name }} on {{ item.provider }}, disks {{ item.disks | map(attribute='export') | list }}"
  loop: "{{ checked.boot_order | map(attribute='servers') | flatten }}"
  loop_control:
    label: "{{ item.name }}"
"""

RETURN = r"""
plan:
  description:
    - The plan, normalised - every key of the format, defaults filled in, each server's protection group,
      volumes and disks as found on the source node. It is a valid plan itself.
  returned: success
  type: dict
  sample:
    name: app
    description: null
    provider: qemu
    checkpoint: latest
    networks: {"dr-lan": {"isolated": false, "cidr": "10.20.0.0/24", "gateway": null, "bridge": null}}
    groups:
      - name: database
        parallel: true
        timeout_seconds: 1800.0
        delay_seconds: 0.0
        pre: []
        post: []
        servers:
          - name: db1.example.com
            provider: qemu
            protection_group: app
            volumes: [db, log]
            vcpus: 4
            memory_mib: 8192
            nics: [{"network": "dr-lan", "mac": null, "ip": "10.20.0.11/24"}]
            disks:
              - {"volume": "db", "source": "checkpoint", "checkpoint": "latest", "boot": true}
              - {"volume": "log", "source": "checkpoint", "checkpoint": "latest", "boot": false}
            health_check: {"type": "tcp", "timeout_seconds": 600.0, "interval_seconds": 5.0, "host": "10.20.0.11", "port": 5432}
            delay_seconds: 0.0
boot_order:
  description: The boot groups in order, each with its servers and where each would boot.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The group's name.
      returned: success
      type: str
      sample: database
    parallel:
      description: Whether its servers boot at the same time.
      returned: success
      type: bool
      sample: true
    timeout_seconds:
      description: The time the whole group has.
      returned: success
      type: float
      sample: 1800.0
    servers:
      description: Its servers, in the plan's order.
      returned: success
      type: list
      elements: dict
      contains:
        name:
          description: The protected server.
          returned: success
          type: str
          sample: db1.example.com
        protection_group:
          description: The consistency group of its volumes.
          returned: success
          type: str
          sample: app
        provider:
          description: What boots it.
          returned: success
          type: str
          sample: qemu
        vcpus:
          description: Virtual CPUs.
          returned: success
          type: int
          sample: 4
        memory_mib:
          description: Memory, in MiB.
          returned: success
          type: int
          sample: 8192
        nics:
          description: Its NICs, each with its network's C(isolated) and C(bridge).
          returned: success
          type: list
          elements: dict
          sample: [{"network": "dr-lan", "isolated": false, "bridge": null, "mac": null, "ip": "10.20.0.11/24"}]
        disks:
          description:
            - Its disks, the boot disk first. C(export) is the NBD export of the recovery node it would boot from,
              C(<group>/<volume>@<checkpoint id, 12 digits>) for a point-in-time export (opened when the
              server boots) or C(<group>/<volume>) for the promoted replica; null when the checkpoint was not
              resolved (no O(recovery_url)).
          returned: success
          type: list
          elements: dict
          sample:
            - {"volume": "db", "boot": true, "source": "checkpoint", "checkpoint": "latest",
               "checkpoint_id": "3f9a2c01b7e44d3e8f1a2b3c4d5e6f70", "export": "app/db@3f9a2c01b7e4"}
        health_check:
          description: Its health check in one line, or null without one.
          returned: success
          type: str
          sample: tcp 10.20.0.11:5432
        delay_seconds:
          description: The wait after power-on, before the first check.
          returned: success
          type: float
          sample: 0.0
bad_key:
  description: The path of the bad key, when the plan is not valid.
  returned: failure
  type: str
  sample: plan.groups[1].servers[0].network
"""

from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule
from ansible_collections.haven.dr.plugins.module_utils._plan import parse_plan, plan_argspec, resolve_plan


class PlanCheck:
    """A plan, read against the source node and (optionally) the recovery node."""

    def __init__(self, haven):
        self.haven = haven
        self.params = haven.params
        self.source = haven.client
        self.recovery = haven.recovery_client()

    def facts(self, plan):
        """What the nodes hold that the plan names."""
        servers = self.source.get("/v1/servers")
        facts = {"node": self.source.url, "servers": servers, "volumes": self.source.get("/v1/volumes")}
        if self.recovery is not None:
            known = dict((s["name"], s.get("groups") or []) for s in servers)
            names = set()
            for server in plan.servers():
                names.update([server.protection_group] if server.protection_group else known.get(server.name, []))
            facts["checkpoints"] = dict(
                (g, self.recovery.get_or_none("/v1/groups/%s/checkpoints" % g)) for g in sorted(names)
            )
        return facts

    def run(self):
        plan = parse_plan(self.params["plan"])
        resolved, warnings = resolve_plan(plan, self.facts(plan))
        for warning in warnings:
            self.haven.module.warn(warning)
        return {"changed": False, "plan": resolved.to_dict(), "boot_order": boot_order(resolved)}


def boot_order(plan):
    """Per group, each server and where it would boot."""
    out = []
    for group in plan.groups:
        servers = []
        for server in group.servers:
            disks = sorted(server.disks, key=lambda d: not d.boot)
            servers.append(
                {
                    "name": server.name,
                    "protection_group": server.protection_group,
                    "provider": server.provider,
                    "vcpus": server.vcpus,
                    "memory_mib": server.memory_mib,
                    "nics": [
                        {
                            "network": n.network,
                            "isolated": plan.networks[n.network].isolated,
                            "bridge": plan.networks[n.network].bridge,
                            "mac": n.mac,
                            "ip": n.ip,
                        }
                        for n in server.nics
                    ],
                    "disks": [_disk(server, d) for d in disks],
                    "health_check": server.health_check.describe() if server.health_check else None,
                    "delay_seconds": server.delay_seconds,
                }
            )
        out.append(
            {"name": group.name, "parallel": group.parallel, "timeout_seconds": group.timeout_seconds, "servers": servers}
        )
    return out


def _disk(server, disk):
    if disk.source == "replica":
        export = "%s/%s" % (server.protection_group, disk.volume)
    elif disk.checkpoint_id:
        export = "%s/%s@%s" % (server.protection_group, disk.volume, disk.checkpoint_id[:12])
    else:
        export = None
    return {
        "volume": disk.volume,
        "boot": disk.boot,
        "source": disk.source,
        "checkpoint": disk.checkpoint,
        "checkpoint_id": disk.checkpoint_id,
        "export": export,
    }


def run_module(haven):
    return PlanCheck(haven).run()


def main():
    spec = dict(
        recovery_url=dict(type="str"),
        recovery_token=dict(type="str", no_log=True),
        recovery_ca_path=dict(type="path"),
        plan=dict(type="dict", required=True, options=plan_argspec()),
    )
    haven = HavenModule(argument_spec=spec, required_together=[("recovery_url", "recovery_token")])
    haven.run(run_module)


if __name__ == "__main__":
    main()
