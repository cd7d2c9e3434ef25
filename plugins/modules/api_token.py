#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: api_token
short_description: Create and revoke the bearer tokens of a havend node's API
version_added: 0.1.0
description:
  - Makes sure a token of a given name and scope exists on a havend node (O(state=present)), or that
    no active token of that name is left (O(state=absent)).
  - havend keeps only a hash of each token, so a token's secret is returned once, by the task that
    creates it. Register the result with C(no_log) and store the secret in a vault.
  - Tokens are identified by O(name). A token of that name with another scope is revoked and a new
    one is made; O(rotate=true) makes a new one even when the scope is right.
  - Needs a token of the C(admin) scope.
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
      - The token's name (letters, digits, C(.), C(_), C(-); up to 64 characters).
    type: str
    required: true
  scope:
    description:
      - What the token may do. V(read) reads; V(operate) also takes checkpoints, opens exports and runs
        failover operations; V(admin) also manages groups, pairing, tokens and the audit log.
      - Required when O(state=present).
    type: str
    choices: [read, operate, admin]
  state:
    description:
      - V(present) makes sure an active token of this name and scope exists; V(absent) revokes every
        active token of this name.
    type: str
    choices: [present, absent]
    default: present
  rotate:
    description:
      - With O(state=present), revoke the active tokens of this name and make a new one even if one of
        the right scope exists.
    type: bool
    default: false
"""

EXAMPLES = r"""
# url, token and ca_path come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH here (as an AWX
# credential injects them); managing tokens needs a token of the admin scope.
- name: A read-only token for the monitoring
  haven.dr.api_token:
    name: prometheus
    scope: read
  register: made
  no_log: true

- name: Keep the new secret (returned only by the task that made it)
  ansible.builtin.copy:
    content: "{{ made.token }}"
    dest: "{{ prometheus_config_dir }}/havend.token"
    mode: "0600"
  when: made.token is not none
  no_log: true

- name: Run again, it makes none (changed=false, no secret)
  haven.dr.api_token:
    name: prometheus
    scope: read
  register: again

- name: A new secret for it, the old one revoked (say, every 90 days)
  haven.dr.api_token:
    name: prometheus
    scope: read
    rotate: true
  register: rotated
  no_log: true

- name: Keep the new secret
  ansible.builtin.copy:
    content: "{{ rotated.token }}"
    dest: "{{ prometheus_config_dir }}/havend.token"
    mode: "0600"
  no_log: true

- name: Revoke it
  haven.dr.api_token:
    name: prometheus
    state: absent
"""

RETURN = r"""
token:
  description:
    - The new token's secret, when this task made one; null otherwise (havend shows a secret once).
  returned: success
  type: str
  sample: hvn_0a1b2c3d4e5f_9vS0...
id:
  description: The id of the active token of this name (null once revoked, or in check mode before it exists).
  returned: success
  type: str
  sample: 0a1b2c3d4e5f
scope:
  description: The scope of the active token.
  returned: success
  type: str
  sample: read
revoked:
  description: The ids of the tokens this task revoked (or would revoke, in check mode).
  returned: success
  type: list
  elements: str
  sample: ["9f8e7d6c5b4a"]
"""

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._module import HavenModule


def _state(tokens):
    """What the diff shows of the active tokens of one name (never a secret)."""
    return {"tokens": [{"id": t["id"], "scope": t["scope"]} for t in tokens]}


def _token_id(secret):
    """The id inside a token's secret (``hvn_<id>_<random>``)."""
    parts = (secret or "").split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "hvn" else None


def run_module(haven):
    p = haven.params
    client = haven.client
    active = [t for t in client.get("/v1/tokens") if t["name"] == p["name"] and t.get("revoked") is None]
    if p["state"] == "absent":
        keep, revoke = None, active
    else:
        keep = None if p["rotate"] else next((t for t in active if t["scope"] == p["scope"]), None)
        revoke = [t for t in active if t is not keep]
    make = p["state"] == "present" and keep is None
    changed = make or bool(revoke)
    result = {
        "changed": changed,
        "token": None,
        "id": keep["id"] if keep else None,
        "scope": keep["scope"] if keep else (p["scope"] if make else None),
        "revoked": [t["id"] for t in revoke],
    }
    after = [keep] if keep else []
    if make:
        after.append({"id": "(new)", "scope": p["scope"]})
    if haven.check_mode or not changed:
        return dict(result, **haven.diff(_state(active), _state(after)))
    if make:  # before revoking: the token this task runs with may be among the old ones
        made = client.post("/v1/tokens", {"name": p["name"], "scope": p["scope"]})
        result.update(token=made["token"], id=made["id"], scope=made["scope"])
        after[-1] = {"id": made["id"], "scope": made["scope"]}
    own = _token_id(p["token"])
    try:
        for token in sorted(revoke, key=lambda t: t["id"] == own):  # our own token last
            client.delete("/v1/tokens/%s" % token["id"])
    except HavenError as exc:  # the new secret exists once: never lose it with the failure
        raise HavenError(
            "made token %s but revoking the old ones failed: %s" % (result["id"], exc.message),
            url=exc.url,
            result=dict(result, changed=True),
        )
    return dict(result, **haven.diff(_state(active), _state(after)))


def main():
    haven = HavenModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            scope=dict(type="str", choices=["read", "operate", "admin"]),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            rotate=dict(type="bool", default=False),
        ),
        required_if=[("state", "present", ["scope"])],
    )
    haven.run(run_module)


if __name__ == "__main__":
    main()
