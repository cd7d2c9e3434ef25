# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What every module does the same way (internal use only): build the
``AnsibleModule`` from the shared options and its own, make the API client,
and turn the collection's errors into ``fail_json`` at the edge."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.haven.dr.plugins.module_utils._argspec import connection_argspec
from ansible_collections.haven.dr.plugins.module_utils._client import REQUESTS_IMPORT_ERROR, HavenClient
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError


class HavenModule:
    """An ``AnsibleModule`` with the connection options and a client."""

    def __init__(self, argument_spec, supports_check_mode=True, **kwargs):
        spec = connection_argspec()
        spec.update(argument_spec)
        self.module = AnsibleModule(argument_spec=spec, supports_check_mode=supports_check_mode, **kwargs)
        if REQUESTS_IMPORT_ERROR is not None:
            self.module.fail_json(msg=missing_required_lib("requests"), exception=REQUESTS_IMPORT_ERROR)
        self.params = self.module.params
        self._client = None

    @property
    def client(self):
        if self._client is None:
            p = self.params
            self._client = self.node_client(p["url"], p["token"], p["ca_path"])
        return self._client

    def node_client(self, url, token, ca_path, timeout=None, retries=None):
        """A client of a node, with the task's TLS options and its timeout and
        retries unless ``timeout`` / ``retries`` say otherwise."""
        p = self.params
        return HavenClient(
            url,
            token=token,
            ca_path=ca_path,
            validate_certs=p["validate_certs"],
            client_cert=p["client_cert"],
            client_key=p["client_key"],
            timeout=p["request_timeout"] if timeout is None else timeout,
            retries=p["retries"] if retries is None else retries,
        )

    def recovery_client(self):
        """The client of the recovery node (options ``recovery_url``,
        ``recovery_token``, ``recovery_ca_path``, default ``ca_path``), or
        None without ``recovery_url``."""
        p = self.params
        if not p.get("recovery_url"):
            return None
        return self.node_client(p["recovery_url"], p["recovery_token"], p["recovery_ca_path"] or p["ca_path"])

    @property
    def check_mode(self):
        return self.module.check_mode

    def diff(self, before, after):
        """``{diff: {before, after}}`` when the play asked for a diff."""
        return {"diff": {"before": before, "after": after}} if self.module._diff else {}

    def run(self, body):
        """``body(self)`` returns the result dict; the collection's errors end
        the module with one line naming the node and the cause."""
        try:
            result = body(self)
        except HavenError as exc:
            extra = dict(exc.result or {})
            if getattr(exc, "status", None) is not None:
                extra.update(status=exc.status, detail=exc.detail)
            self.module.fail_json(msg=str(exc), **extra)
        self.module.exit_json(**result)
