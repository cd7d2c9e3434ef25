# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: nodes
short_description: The servers havend protects, read from its nodes' APIs
version_added: 0.1.0
description:
  - Reads the protected servers (the C(server) label of havend volumes) of one or more havend source nodes
    and yields each as a host, with its protection group, state, lag, RPO compliance, volumes and node as
    host vars.
  - Makes an inventory group per protection group (C(haven_group_<name>)) and per state
    (C(haven_state_<state>)), and supports C(compose), C(keyed_groups) and C(groups) as the constructed
    plugin does.
  - A node that does not answer is reported once, with the reason; the servers of the other nodes are
    still listed.
  - The inventory file must end in C(haven.yml) or C(haven.yaml).
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: The name of this plugin.
    type: str
    required: true
    choices: [haven.dr.nodes]
  nodes:
    description:
      - The source nodes to read, each a dictionary with C(url) and optionally C(token), C(ca_path) and
        C(validate_certs) (default true).
      - A node without C(token) uses O(token).
    type: list
    elements: dict
    required: true
  token:
    description:
      - The bearer token (C(read) scope is enough) of the nodes that do not give their own.
    type: str
    env:
      - name: HAVEN_TOKEN
  ca_path:
    description:
      - The CA certificate of the nodes that do not give their own C(ca_path).
    type: path
    env:
      - name: HAVEN_CA_PATH
  request_timeout:
    description: Seconds to wait for each node's answer.
    type: float
    default: 10
  strict_nodes:
    description:
      - Fail the whole inventory when a node does not answer, instead of reporting it and going on.
    type: bool
    default: false
"""

EXAMPLES = r"""
# inventory/haven.yml
plugin: haven.dr.nodes
nodes:
  - url: https://src1.example.com:8443
  - url: https://src2.example.com:8443
    token: "{{ lookup('ansible.builtin.env', 'HAVEN_SRC2_TOKEN') }}"
ca_path: /etc/havend/ca.pem
keyed_groups:
  - key: haven_rpo_ok | ternary('rpo_met', 'rpo_breached')
    separator: ""
groups:
  lagging: haven_lag_seconds > 30
compose:
  ansible_host: inventory_hostname
"""

from ansible.errors import AnsibleError
from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from ansible_collections.haven.dr.plugins.module_utils._client import REQUESTS_IMPORT_ERROR, HavenClient
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError


def _safe(name):
    return "".join(c if c.isalnum() else "_" for c in name)


def host_vars(server, node_url):
    """What a protected server's host carries (``haven_`` prefixed)."""
    return {
        "haven_node": server.get("node"),
        "haven_node_url": node_url,
        "haven_groups": server.get("groups", []),
        "haven_group": (server.get("groups") or [None])[0],
        "haven_state": server.get("state"),
        "haven_lag_seconds": server.get("lag_seconds"),
        "haven_rpo_ok": server.get("rpo_ok"),
        "haven_volumes": server.get("volumes", []),
    }


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "haven.dr.nodes"

    def verify_file(self, path):
        return super(InventoryModule, self).verify_file(path) and path.endswith(("haven.yml", "haven.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super(InventoryModule, self).parse(inventory, loader, path, cache)
        self._read_config_data(path)
        if REQUESTS_IMPORT_ERROR is not None:
            raise AnsibleError("the haven.dr.nodes inventory needs the Python library requests")
        key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        read = None
        if use_cache:
            try:
                read = self._cache[key]
            except KeyError:
                read = None
        if read is None:
            read = self._read_nodes()
            # Never cache a node's failure: it would hide its servers until the cache expires.
            if self.get_option("cache") and all(entry[2] is None for entry in read):
                self._cache[key] = read
        self._populate(read)

    def _read_nodes(self):
        """``[(url, servers or None, error or None)]`` for every node."""
        out = []
        for index, node in enumerate(self.get_option("nodes")):
            if not isinstance(node, dict) or not node.get("url"):
                raise AnsibleError("nodes[%d]: a dictionary with a url is required" % index)
            templar = getattr(self, "templar", None)
            if templar is not None:
                node = templar.template(node)
            url = node["url"]
            try:
                client = HavenClient(
                    url,
                    token=node.get("token") or self.get_option("token"),
                    ca_path=node.get("ca_path") or self.get_option("ca_path"),
                    validate_certs=node.get("validate_certs", True),
                    timeout=self.get_option("request_timeout"),
                    retries=1,
                )
                out.append((url, client.get("/v1/servers"), None))
            except HavenError as exc:
                if self.get_option("strict_nodes"):
                    raise AnsibleError(to_native(exc))
                out.append((url, None, to_native(exc)))
        return out

    def _populate(self, read):
        strict = self.get_option("strict")
        for url, servers, error in read:
            if error is not None:
                self.display.warning("haven.dr.nodes: %s (its servers are left out)" % error)
                continue
            for server in servers:
                host = server["name"]
                self.inventory.add_host(host)
                variables = host_vars(server, url)
                for name, value in variables.items():
                    self.inventory.set_variable(host, name, value)
                for group in server.get("groups", []):
                    parent = self.inventory.add_group("haven_group_%s" % _safe(group))
                    self.inventory.add_child(parent, host)
                if server.get("state"):
                    parent = self.inventory.add_group("haven_state_%s" % _safe(server["state"]))
                    self.inventory.add_child(parent, host)
                self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
                self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
                self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
