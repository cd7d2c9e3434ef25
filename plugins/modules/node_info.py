#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node_info
short_description: What a havend replication node is and how it is doing
version_added: 0.1.0
description:
  - Reads from a havend node's REST API its version, role (source or target), health, capacity,
    addresses and replication peers.
  - Changes nothing on the node.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.info_module
"""

EXAMPLES = r"""
- name: Read the source node (url, token and ca_path from HAVEN_URL, HAVEN_TOKEN, HAVEN_CA_PATH)
  haven.dr.node_info:
  register: src1

- name: Fail when the node reports a group in error
  ansible.builtin.assert:
    that: src1.node.health == 'ok'
    fail_msg: "unhealthy groups: {{ src1.node.unhealthy_groups }}"

- name: The recovery site's node, its connection in the task's environment
  haven.dr.node_info:
  environment:
    HAVEN_URL: "{{ haven_recovery_url }}"
    HAVEN_TOKEN: "{{ haven_recovery_token }}"
  register: tgt1

- name: The same, given once for every module of the collection in a block
  module_defaults:
    group/haven.dr.haven:
      url: "{{ haven_recovery_url }}"
      token: "{{ haven_recovery_token }}"
  block:
    - name: Its peers, the source nodes replicating to it
      haven.dr.node_info:
      register: recovery
"""

RETURN = r"""
node:
  description: The node.
  returned: success
  type: dict
  contains:
    name:
      description: The node's name (its config file's C(node.name)).
      returned: success
      type: str
      sample: src1
    role:
      description: V(source) (the protected site's replication node) or V(target) (the recovery site's).
      returned: success
      type: str
      sample: source
    version:
      description: havend's version.
      returned: success
      type: str
      sample: 0.1.0
    uptime_s:
      description: Seconds since havend started.
      returned: success
      type: float
      sample: 3605.2
    health:
      description: V(ok), or V(degraded) when a group is in the C(error) state (split brain, applier stopped).
      returned: success
      type: str
      sample: ok
    unhealthy_groups:
      description: The groups in the C(error) state.
      returned: success
      type: list
      elements: str
      sample: []
    groups:
      description: How many consistency groups the node holds.
      returned: success
      type: int
      sample: 2
    addresses:
      description: Where the node serves (C(nbd), C(replication), C(views), C(api)), by kind.
      returned: success
      type: dict
      sample: {"nbd": "nbd://10.0.0.5:10809", "api": "https://10.0.0.5:8443"}
    capacity:
      description: Space of the node's state directory, in bytes.
      returned: success
      type: dict
      sample: {"state_dir_total_bytes": 107374182400, "state_dir_free_bytes": 53687091200}
peers:
  description: The other side of replication, and this node's certificate.
  returned: success
  type: dict
  contains:
    tls:
      description: Whether the node speaks TLS.
      returned: success
      type: bool
      sample: true
    certificate:
      description: The node's certificate (subject, issuer, expiry), or null without TLS.
      returned: success
      type: dict
      sample: {"subject_cn": "src1", "not_after": "2027-12-03T08:00:00Z"}
    peers:
      description:
        - On a source node, its target (host, port, server name) and the link of each group.
        - On a target node, each source node and its groups' links.
      returned: success
      type: list
      elements: dict
      sample: [{"role": "target", "host": "10.0.1.5", "port": 10900, "server_name": "tgt1", "groups": {"app": true}}]
"""

from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule


def run_module(haven):
    client = haven.client
    return {"changed": False, "node": client.get("/v1/node"), "peers": client.get("/v1/peers")}


def main():
    haven = HavenModule(argument_spec={})
    haven.run(run_module)


if __name__ == "__main__":
    main()
