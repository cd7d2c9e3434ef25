# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The collection's one exception hierarchy (internal use only).

Every error names the node it came from, so a module's ``fail_json(msg=...)``
says where and why in one line. Modules turn these into failures at their
edge (``_module.HavenModule.run``); nothing else catches them.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class HavenError(Exception):
    """Base of every error of the collection. ``url`` is the node's; ``result``
    what the task must still return although it failed (a partial result)."""

    def __init__(self, message, url=None, result=None):
        super(HavenError, self).__init__(message)
        self.message = message
        self.url = url
        self.result = result

    def __str__(self):
        if self.url:
            return "%s: %s" % (self.url, self.message)
        return self.message


class HavenConnectionError(HavenError):
    """The node could not be reached: refused, TLS, timeout, name resolution."""


class HavenApiError(HavenError):
    """The node answered with an error status; ``status`` and havend's ``detail``."""

    def __init__(self, message, url=None, status=None, detail=None):
        super(HavenApiError, self).__init__(message, url)
        self.status = status
        self.detail = detail


class HavenAuthError(HavenApiError):
    """401 (no valid token) or 403 (the token's scope is too narrow)."""


class HavenNotFound(HavenApiError):
    """404: the group, volume, checkpoint, export or operation does not exist."""


class HavenConflict(HavenApiError):
    """409: havend refuses it in the object's state (its reason is the message)."""


class HavenInvalid(HavenApiError):
    """422: havend found an argument invalid (the fields are named)."""


class HavenTimeout(HavenError):
    """A wait ran out of time; ``result`` is the last thing seen (kept for the caller)."""


_BY_STATUS = {401: HavenAuthError, 403: HavenAuthError, 404: HavenNotFound, 409: HavenConflict, 422: HavenInvalid}


def describe_detail(detail):
    """havend's ``detail`` as one line: a string as it is, a list of
    ``{field, error}`` as ``field: error; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "error" in item:
                field = item.get("field")
                parts.append("%s: %s" % (field, item["error"]) if field else str(item["error"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def api_error(status, detail, url, method, path):
    """The exception for an error answer of the node."""
    cls = _BY_STATUS.get(status, HavenApiError)
    text = describe_detail(detail) if detail is not None else "no detail"
    return cls("%s %s answered %d: %s" % (method, path, status, text), url=url, status=status, detail=detail)
