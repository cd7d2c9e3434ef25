# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Options every module shares, defined once (internal use only).

Each function returns a fresh dict (a module may change its copy); each
has a documentation twin in ``plugins/doc_fragments/`` (``connection``,
``wait``): change both together.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.basic import env_fallback


def connection_argspec():
    """How to reach a node's API (doc fragment ``haven.dr.connection``)."""
    return dict(
        url=dict(type="str", required=True, fallback=(env_fallback, ["HAVEN_URL"])),
        token=dict(type="str", required=True, no_log=True, fallback=(env_fallback, ["HAVEN_TOKEN"])),
        ca_path=dict(type="path", fallback=(env_fallback, ["HAVEN_CA_PATH"])),
        validate_certs=dict(type="bool", default=True, fallback=(env_fallback, ["HAVEN_VALIDATE_CERTS"])),
        client_cert=dict(type="path"),
        client_key=dict(type="path", no_log=False),
        request_timeout=dict(type="float", default=30.0),
        retries=dict(type="int", default=3),
    )


def wait_argspec():
    """Waiting for long operations (doc fragment ``haven.dr.wait``)."""
    return dict(
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="float", default=3600.0),
        wait_interval=dict(type="float", default=1.0),
    )
