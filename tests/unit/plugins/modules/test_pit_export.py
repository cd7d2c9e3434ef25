# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenNotFound
from ansible_collections.haven.dr.plugins.modules import pit_export

CHECKPOINTS = [{"id": "aaaa1111"}, {"id": "aaaa2222"}, {"id": "bbbb3333"}]


@pytest.mark.parametrize(
    ("ref", "resolved"), [(None, "bbbb3333"), ("latest", "bbbb3333"), ("oldest", "aaaa1111"), ("bbbb", "bbbb3333")]
)
def test_resolve_checkpoint(ref, resolved):
    assert pit_export.resolve_checkpoint(CHECKPOINTS, ref, "app", "u") == resolved


@pytest.mark.parametrize(("ref", "says"), [("aaaa", "is ambiguous"), ("ffff", "is not retained")])
def test_an_unknown_checkpoint_is_not_found(ref, says):
    with pytest.raises(HavenNotFound, match=says):
        pit_export.resolve_checkpoint(CHECKPOINTS, ref, "app", "u")


def test_a_group_without_checkpoints_says_so():
    with pytest.raises(HavenNotFound, match="retains no checkpoints yet"):
        pit_export.resolve_checkpoint([], "latest", "app", "u")


def run(capsys, **args):
    args.setdefault("token", "hvn_o_operate")
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            pit_export.main()
    return json.loads(capsys.readouterr().out)


OPEN = {"export": "app/db@bbbb3333.1", "group": "app", "volume": "db", "checkpoint": "bbbb3333", "writable": False}


def test_an_open_export_is_returned_as_it_is(havend, capsys):
    havend.script.on("GET", "/v1/exports", (200, [dict(OPEN, uri="nbd://h/app/db@bbbb3333.1", size=4096)]))
    havend.script.on("GET", "/v1/groups/app/checkpoints", (200, CHECKPOINTS))
    result = run(capsys, url=havend.url, group="app", volume="db")
    assert not result["changed"] and result["export"]["uri"] == "nbd://h/app/db@bbbb3333.1"


def test_absent_closes_only_the_matching_exports(havend, capsys):
    other = dict(OPEN, export="app/log@aaaa1111.2", volume="log", checkpoint="aaaa1111")
    havend.script.on("GET", "/v1/exports", (200, [OPEN, other]))
    havend.script.on("GET", "/v1/groups/app/checkpoints", (200, CHECKPOINTS))
    havend.script.on("DELETE", "/v1/exports/app/db@bbbb3333.1", (200, {"export": OPEN["export"]}))
    result = run(capsys, url=havend.url, group="app", checkpoint="latest", state="absent")
    assert result["changed"] and result["closed"] == ["app/db@bbbb3333.1"]
    assert [r[:2] for r in havend.script.requests if r[0] == "DELETE"] == [("DELETE", "/v1/exports/app/db@bbbb3333.1")]


def test_present_needs_a_volume(havend, capsys):
    result = run(capsys, url=havend.url, group="app")
    assert result["failed"] and "volume" in result["msg"] and havend.script.requests == []
