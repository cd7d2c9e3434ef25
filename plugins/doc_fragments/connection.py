# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The twin of plugins/module_utils/_argspec.py connection_argspec(): change both together.
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of the havend node's REST API, for example C(https://src1.example.com:8443).
      - If not given, the value of the E(HAVEN_URL) environment variable is used.
    type: str
    required: true
  token:
    description:
      - Bearer token of the node's API (C(havend token create)), of a scope wide enough for the task
        (C(read) < C(operate) < C(admin)).
      - If not given, the value of the E(HAVEN_TOKEN) environment variable is used.
    type: str
    required: true
  ca_path:
    description:
      - CA certificate (PEM) that signed the node's certificate, the deployment CA of C(havend certs).
      - If not given, the value of E(HAVEN_CA_PATH) is used, else the system's trust store.
    type: path
  validate_certs:
    description:
      - Whether the node's TLS certificate is verified. Only turn this off against a test node.
      - If not given, the value of E(HAVEN_VALIDATE_CERTS) is used.
    type: bool
    default: true
  client_cert:
    description:
      - Client certificate (PEM) for mutual TLS, when the node asks for one.
    type: path
  client_key:
    description:
      - Private key of O(client_cert), if it is not in the same file.
    type: path
  request_timeout:
    description:
      - Seconds to wait for each answer of the node (connecting has 10 seconds).
    type: float
    default: 30
  retries:
    description:
      - How many times a request is sent again, with exponential back-off, after a connection that
        was never made, or, for a request that only reads, after a 502, 503 or 504. A request that
        may have reached the node is never sent again.
      - Apart from these, a request the node refused because another operation held the group for a
        moment (409 with C(Retry-After), for example two servers of one group protected at once) is sent
        again after the seconds the node says, for up to 60 seconds in all.
    type: int
    default: 3
requirements:
  - requests
"""
