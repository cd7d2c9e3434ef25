#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node_pair
short_description: Pair a havend source node with its target node
version_added: 0.1.0
description:
  - Makes a source node replicate to the given target node. havend first makes a TLS handshake with the
    target (its certificate must come from the deployment CA and carry O(server_name)), then every
    group of the source ships there, and the pairing survives restarts.
  - Nothing is done when the source is already paired with that target.
  - Runs against the B(source) node's API (O(url)), with a token of the C(admin) scope.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - haven.dr.connection
  - ansible.builtin.action_common_attributes
  - haven.dr.attributes
  - haven.dr.attributes.changes
options:
  target_host:
    description:
      - Address of the target node's replication listener, as the source node reaches it.
    type: str
    required: true
  target_port:
    description:
      - Port of the target node's replication listener.
    type: int
    required: true
  server_name:
    description:
      - The name the target's certificate must carry. Defaults to O(target_host).
    type: str
"""

EXAMPLES = r"""
- name: Replicate this source node (HAVEN_URL, HAVEN_TOKEN, HAVEN_CA_PATH) to the recovery site's node
  haven.dr.node_pair:
    target_host: "{{ haven_recovery_listen_host }}"  # the target's replication listener (target.listen)
    target_port: "{{ haven_recovery_listen_port }}"
    server_name: tgt1  # the name in the target's certificate
"""

RETURN = r"""
target:
  description: The target the source node replicates to, after the task.
  returned: success
  type: dict
  contains:
    host:
      description: Its address.
      returned: success
      type: str
      sample: 10.20.0.5
    port:
      description: Its replication port.
      returned: success
      type: int
      sample: 10900
    server_name:
      description: The name its certificate carries.
      returned: success
      type: str
      sample: tgt1
    certificate:
      description: The target's certificate as the handshake showed it, when this task paired the nodes.
      returned: when changed and not in check mode, with TLS
      type: dict
      sample: {"subject_cn": "tgt1", "issuer_cn": "haven.dr deployment CA"}
"""

from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule


def _current(peers):
    for peer in peers.get("peers") or []:
        if peer.get("role") == "target":
            return {"host": peer["host"], "port": peer["port"], "server_name": peer["server_name"]}
    return None


def run_module(haven):
    p = haven.params
    client = haven.client
    before = _current(client.get("/v1/peers"))
    wanted = {"host": p["target_host"], "port": p["target_port"], "server_name": p["server_name"] or p["target_host"]}
    changed = before != wanted
    result = {"changed": changed, "target": wanted if changed else before}
    if changed and not haven.check_mode:
        body = {"host": wanted["host"], "port": wanted["port"]}
        if p["server_name"]:
            body["server_name"] = p["server_name"]
        result["target"] = client.post("/v1/peers", body)
    return dict(result, **(haven.diff({"target": before}, {"target": wanted}) if changed else {}))


def main():
    haven = HavenModule(
        argument_spec=dict(
            target_host=dict(type="str", required=True),
            target_port=dict(type="int", required=True),
            server_name=dict(type="str"),
        )
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
