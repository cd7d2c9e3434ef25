# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Conditions over a group's replication status, as users write them
(internal use only): ``lag_seconds <= 5``, ``state == protecting``,
``caught_up``. Parsed once (a bad one fails before any request), evaluated
as pure functions."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

OPERATORS = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:(<=|>=|==|!=|<|>)\s*([^\s<>=!].*?))?\s*$")


class ConditionError(ValueError):
    """A condition that cannot be read; the message names it."""


def _value(text):
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("null", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text.strip("'\"")


def parse(condition, fields):
    """``(field, operator, value)`` of ``condition``; ``fields`` are the names
    allowed. A bare field name means ``field == true``."""
    match = _CONDITION.match(condition or "")
    if match is None:
        raise ConditionError("cannot read the condition %r (write FIELD OP VALUE, e.g. lag_seconds <= 5)" % condition)
    field, operator, value = match.groups()
    if field not in fields:
        raise ConditionError("condition %r: no field %r (known: %s)" % (condition, field, ", ".join(sorted(fields))))
    if operator is None:
        return field, "==", True
    return field, operator, _value(value)


def holds(parsed, status):
    """Whether the parsed condition holds for ``status`` (a dict)."""
    field, operator, value = parsed
    actual = status.get(field)
    try:
        return bool(OPERATORS[operator](actual, value))
    except TypeError:  # e.g. None <= 5 while a value is not known yet
        return False


def describe(parsed):
    field, operator, value = parsed
    return "%s %s %s" % (field, operator, value)
