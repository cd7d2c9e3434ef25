# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The modules that boot a plan (drill, failover, failback): the recovery node and the guests.
    # Twin of plugins/module_utils/_recovery.py recovery_argspec().
    DOCUMENTATION = r"""
options:
  recovery_url:
    description:
      - Base URL of the recovery site's node (the replication target), which keeps the checkpoints and serves
        the exports the recovery servers boot from.
    type: str
    required: true
  recovery_token:
    description:
      - Bearer token of the recovery node's API, of the C(operate) scope.
    type: str
    required: true
  recovery_ca_path:
    description:
      - CA certificate (PEM) of the recovery node's certificate, default O(ca_path). O(validate_certs),
        O(client_cert), O(client_key), O(request_timeout) and O(retries) apply to both nodes.
    type: path
  call_timeout:
    description:
      - Bounds each provider call (create, power on, pause, destroy...) in seconds; the plan's group and health
        check timeouts bound the rest.
    type: float
    default: 300
  qemu:
    description:
      - The guests the servers boot on the qemu provider.
    type: dict
    default: {}
    suboptions:
      kernel:
        description:
          - The kernel the servers boot, default the newest tiny guest that C(tools/guest_image.py) built in
            C(~/.cache/haven-dr/guest/).
        type: path
      initrd:
        description:
          - The initrd with O(qemu.kernel).
        type: path
      servers:
        description:
          - Per server name, what its VM gets beyond the plan - C(role) (what a tiny guest runs, as
            C(tcp:5432), C(http:80:TEXT) or C(writer+tcp:5432); docs/providers.md), C(cmdline) (more kernel
            arguments), C(kernel) and C(initrd) (its own).
        type: dict
        default: {}
"""

    # failover and failback: where the protected servers run. Twin of _recovery.production_argspec().
    PRODUCTION = r"""
options:
  production:
    description:
      - Where the protected servers run - a planned M(haven.dr.failover) stops them there first (in reverse
        boot order, the web tier first, each with an ACPI power off that becomes a hard stop after its grace),
        M(haven.dr.failback) powers them on there again in plan order, gated by the plan's health checks at
        their own addresses.
      - Without it this task leaves them alone - a failover's fence refuses their writes, and after a failback
        they are yours to start.
    type: dict
    suboptions:
      state_dir:
        description:
          - The production provider's state directory (the servers must exist there - they are stopped and
            started, never defined).
        type: path
        required: true
      provider:
        description:
          - The production provider.
        type: str
        choices: [qemu, libvirt]
        default: qemu
"""
