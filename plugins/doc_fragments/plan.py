# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The twin of plugins/module_utils/_plan.py plan_argspec(): change both together.
    DOCUMENTATION = r"""
options:
  plan:
    description:
      - The recovery plan.
    type: dict
    required: true
    suboptions:
      name:
        description:
          - The plan's name.
        type: str
        required: true
      description:
        description:
          - What the plan is for.
        type: str
      provider:
        description:
          - What boots the servers that do not name their O(plan.groups[].servers[].provider).
        type: str
        choices: [qemu, libvirt]
        default: qemu
      checkpoint:
        description:
          - The point the disks boot from, unless a disk names its own - V(latest), V(oldest), a checkpoint id
            or a unique prefix of one (6 characters or more), as the recovery node keeps them.
        type: str
        default: latest
      rto_target_seconds:
        description:
          - The recovery time objective - how long the plan may take from the start of a drill, failover or
            failback to its last health check passed. A run reports its measured RTO against it (and the drill
            report marks a run over it as missed).
        type: float
      rpo_target_seconds:
        description:
          - The recovery point objective - how much data, in seconds of writes, a recovery may lose. A run
            reports each protection group's measured data-loss window against it.
        type: float
      networks:
        description:
          - The recovery site's networks the servers' NICs are on, by name. Each one a mapping of
            C(isolated) (bool, default V(true) - no route out, as a drill needs), C(cidr) (the NICs' addresses
            must be in it), C(gateway) and C(bridge) (the host bridge a provider attaches the NICs to).
        type: dict
        default: {}
      groups:
        description:
          - The boot groups, in boot order. A group boots when the one before it is up (every server of it
            passed its health check, its post scripts ran).
        type: list
        elements: dict
        required: true
        suboptions:
          name:
            description:
              - The group's name, unique in the plan.
            type: str
            required: true
          servers:
            description:
              - The servers of the group (one at least).
            type: list
            elements: dict
            required: true
            suboptions:
              name:
                description:
                  - The protected server, the C(server) label of its volumes on the source node (C(/v1/servers)).
                  - A server may be in one group of a plan only.
                type: str
                required: true
              protection_group:
                description:
                  - The consistency group of its volumes. Required only when the server has volumes in
                    several groups.
                type: str
              volumes:
                description:
                  - Its volumes in that group, default every volume labelled with its name.
                  - A volume may be used by one server of a plan only.
                type: list
                elements: str
              provider:
                description:
                  - What boots it, default O(plan.provider).
                type: str
                choices: [qemu, libvirt]
              vcpus:
                description:
                  - Virtual CPUs.
                type: int
                default: 2
              memory_mib:
                description:
                  - Memory, in MiB.
                type: int
                default: 2048
              network:
                description:
                  - One NIC on this network (a name of O(plan.networks)), instead of O(plan.groups[].servers[].nics).
                type: str
              nics:
                description:
                  - Its NICs, in order.
                type: list
                elements: dict
                suboptions:
                  network:
                    description:
                      - A name of O(plan.networks).
                    type: str
                    required: true
                  mac:
                    description:
                      - Its MAC address, C(xx:xx:xx:xx:xx:xx), unique in the plan. Default the provider's.
                    type: str
                  ip:
                    description:
                      - Its address, with or without a prefix (C(10.20.0.11/24)), in the network's C(cidr), unique
                        in the plan. The default host of a V(tcp) or V(command) health check.
                    type: str
              disks:
                description:
                  - Its disks, default one per volume from O(plan.checkpoint), booting from the first.
                type: list
                elements: dict
                suboptions:
                  volume:
                    description:
                      - One of the server's volumes.
                    type: str
                    required: true
                  source:
                    description:
                      - V(checkpoint) boots from a copy-on-write point-in-time export (the replica is never
                        written), V(replica) from the promoted replica itself (after a failover). Default
                        V(checkpoint).
                    type: str
                    choices: [checkpoint, replica]
                  checkpoint:
                    description:
                      - With O(plan.groups[].servers[].disks[].source=checkpoint), the point, as O(plan.checkpoint)
                        (its default).
                    type: str
                  boot:
                    description:
                      - Whether it boots from this disk (one disk at most; default the first).
                    type: bool
              health_check:
                description:
                  - How to tell that it is up. Without one the server counts as up once powered on (a warning
                    says so).
                  - A key its O(plan.groups[].servers[].health_check.type) does not use is an error.
                type: dict
                suboptions:
                  type:
                    description:
                      - V(tcp) (a port accepts a connection), V(http) (the answer's status, and its body or a
                        JMESPath expression over its JSON body), V(command) (a command over ssh, with paramiko
                        when it runs), V(guest_agent) (a command through the QEMU guest agent).
                    type: str
                    required: true
                    choices: [tcp, http, command, guest_agent]
                  timeout_seconds:
                    description:
                      - The check must pass within this, from power-on and the server's delay.
                    type: float
                    default: 300
                  interval_seconds:
                    description:
                      - Seconds between tries.
                    type: float
                    default: 5
                  host:
                    description:
                      - V(tcp) and V(command) - the host to reach, default the first NIC's ip.
                    type: str
                  port:
                    description:
                      - V(tcp) - the port (required).
                    type: int
                  url:
                    description:
                      - V(http) - the URL (required).
                    type: str
                  status:
                    description:
                      - V(http) - the status expected, default 200.
                    type: int
                  body_contains:
                    description:
                      - V(http) - a text the body must contain.
                    type: str
                  jmespath:
                    description:
                      - V(http) - a JMESPath expression over the JSON body that must be true.
                    type: str
                  validate_certs:
                    description:
                      - V(http) - whether an https URL's certificate is verified, default V(true).
                    type: bool
                  command:
                    description:
                      - V(command) and V(guest_agent) - the command (required).
                    type: str
                  user:
                    description:
                      - V(command) - the ssh user, default C(root).
                    type: str
                  ssh_port:
                    description:
                      - V(command) - the ssh port, default 22.
                    type: int
                  key_file:
                    description:
                      - V(command) - the ssh private key.
                    type: path
                  expect_rc:
                    description:
                      - V(command) and V(guest_agent) - the exit status expected, default 0.
                    type: int
              delay_seconds:
                description:
                  - Seconds to wait after power-on, before the first health check.
                type: float
                default: 0
          parallel:
            description:
              - Whether the group's servers boot at the same time; V(false) boots them one after the other, in
                order.
            type: bool
            default: true
          timeout_seconds:
            description:
              - Bounds the whole group - its scripts, boots and health checks.
            type: float
            default: 1800
          delay_seconds:
            description:
              - Seconds to wait once the group is up, before the next group.
            type: float
            default: 0
          pre:
            description:
              - Scripts run in order before the group's servers boot.
            type: list
            elements: dict
            suboptions:
              command:
                description:
                  - The command.
                type: str
                required: true
              timeout_seconds:
                description:
                  - Seconds it may take.
                type: float
                default: 300
          post:
            description:
              - Scripts run in order once every server of the group passed its health check.
            type: list
            elements: dict
            suboptions:
              command:
                description:
                  - The command.
                type: str
                required: true
              timeout_seconds:
                description:
                  - Seconds it may take.
                type: float
                default: 300
"""
