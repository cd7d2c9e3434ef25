# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.haven.dr.plugins.module_utils._conditions import ConditionError, describe, holds, parse

FIELDS = ("lag_seconds", "state", "caught_up", "applied_seq")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("lag_seconds <= 5", ("lag_seconds", "<=", 5)),
        ("lag_seconds<0.5", ("lag_seconds", "<", 0.5)),
        ("state == protecting", ("state", "==", "protecting")),
        ("state != 'failed_over'", ("state", "!=", "failed_over")),
        ("caught_up", ("caught_up", "==", True)),
        ("caught_up == false", ("caught_up", "==", False)),
        ("applied_seq >= 100", ("applied_seq", ">=", 100)),
    ],
)
def test_parse(text, parsed):
    assert parse(text, FIELDS) == parsed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("lag_seconds ~ 5", "cannot read the condition"),
        ("", "cannot read the condition"),
        ("colour == red", "no field 'colour'"),
        ("lag_seconds <=", "cannot read the condition"),
    ],
)
def test_a_bad_condition_names_itself(text, says):
    with pytest.raises(ConditionError, match=says):
        parse(text, FIELDS)


def test_holds():
    status = {"lag_seconds": 3.2, "state": "protecting", "caught_up": True, "applied_seq": None}
    assert holds(parse("lag_seconds <= 5", FIELDS), status)
    assert not holds(parse("lag_seconds < 3", FIELDS), status)
    assert holds(parse("state == protecting", FIELDS), status)
    assert holds(parse("caught_up", FIELDS), status)
    assert not holds(parse("applied_seq >= 1", FIELDS), status)  # not known yet: not true
    assert describe(parse("lag_seconds <= 5", FIELDS)) == "lag_seconds <= 5"
