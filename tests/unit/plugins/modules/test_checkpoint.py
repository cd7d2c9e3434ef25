# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import checkpoint, checkpoint_info

KEPT = [
    {"id": "a1", "seq": 10, "time": 1000.0, "label": "nightly"},
    {"id": "b2", "seq": 20, "time": 2000.0, "label": "before-upgrade"},
    {"id": "c3", "seq": 30, "time": 3000.0, "label": "nightly"},
]


@pytest.mark.parametrize(
    ("kwargs", "ids"),
    [
        ({}, ["a1", "b2", "c3"]),
        ({"label": "nightly"}, ["a1", "c3"]),
        ({"label": "nightly", "latest": True}, ["c3"]),
        ({"max_age_seconds": 1500}, ["b2", "c3"]),
        ({"label": "none"}, []),
        ({"label": "none", "latest": True}, []),
    ],
)
def test_select(kwargs, ids):
    assert [c["id"] for c in checkpoint_info.select(KEPT, now=3500.0, **kwargs)] == ids


def run(capsys, module, **args):
    args.setdefault("token", "hvn_o_operate")
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


def test_a_label_already_on_the_latest_checkpoint_takes_none(havend, capsys):
    latest = {"id": "b2", "seq": 20, "label": "before-upgrade", "consistency": "crash"}
    havend.script.on("GET", "/v1/groups/app", (200, {"name": "app", "last_checkpoint": latest}))
    result = run(capsys, checkpoint, url=havend.url, group="app", label="before-upgrade")
    assert not result["changed"] and result["checkpoint"] == latest
    assert [r[0] for r in havend.script.requests] == ["GET"]


@pytest.mark.parametrize(("consistency", "app"), [("auto", None), ("app", True), ("crash", False)])
def test_a_checkpoint_is_taken_with_the_consistency_asked(havend, capsys, consistency, app):
    havend.script.on("GET", "/v1/groups/app", (200, {"name": "app", "last_checkpoint": None}))
    havend.script.on("POST", "/v1/groups/app/checkpoints", (201, {"id": "d4", "label": "x"}))
    result = run(capsys, checkpoint, url=havend.url, group="app", label="x", consistency=consistency)
    assert result["changed"] and result["checkpoint"]["id"] == "d4"
    assert havend.script.requests[-1][3] == {"label": "x", "app": app}


def test_force_and_check_mode(havend, capsys):
    latest = {"id": "b2", "label": "x"}
    havend.script.on("GET", "/v1/groups/app", (200, {"name": "app", "last_checkpoint": latest}))
    checked = run(capsys, checkpoint, url=havend.url, group="app", label="x", force=True, _ansible_check_mode=True)
    assert checked["changed"] and checked["checkpoint"] is None
    assert [r[0] for r in havend.script.requests] == ["GET"]
