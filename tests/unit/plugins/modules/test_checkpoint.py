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


RETAINED = [
    {"id": "a1" * 16, "seq": 10, "time": 1000.0, "label": "nightly", "consistency": "crash"},
    {"id": "b2" * 16, "seq": 20, "time": 2000.0, "label": "scratch", "consistency": "crash"},
    {"id": "c3" * 16, "seq": 30, "time": 3000.0, "label": "nightly", "consistency": "app"},
    {"id": "c3c3c3c4" + "0" * 24, "seq": 40, "time": 4000.0, "label": "scratch", "consistency": "crash"},
]


@pytest.mark.parametrize(
    ("label", "ref", "seqs"),
    [
        ("nightly", None, [10, 30]),
        ("scratch", None, [20, 40]),
        ("none", None, []),
        ("", "b2" * 16, [20]),
        ("", "b2b2b2", [20]),
        ("", "b2b2", []),  # a prefix is 6 characters or more
        ("", "ffffff", []),
        ("nightly", "b2b2b2", []),  # both: that one if it has the label
        ("scratch", "b2b2b2", [20]),
        ("", "c3c3c3c3", [30]),
    ],
)
def test_matching(label, ref, seqs):
    assert [c["seq"] for c in checkpoint.matching(RETAINED, label, ref)] == seqs


@pytest.mark.parametrize(("ref", "why"), [("c3c3c3", "prefix of 2"), ("latest", "each run"), ("oldest", "each run")])
def test_matching_refuses_what_is_not_one_id(ref, why):
    with pytest.raises(checkpoint.HavenError, match=why):
        checkpoint.matching(RETAINED, "", ref)


def _retained(havend):
    havend.script.on("GET", "/v1/groups/app/checkpoints", (200, RETAINED))
    for c in RETAINED:
        havend.script.on("DELETE", "/v1/groups/app/checkpoints/%s" % c["id"], (200, c))


def test_absent_deletes_every_checkpoint_of_the_label_with_a_diff(havend, capsys):
    _retained(havend)
    result = run(capsys, checkpoint, url=havend.url, group="app", label="nightly", state="absent", _ansible_diff=True)
    assert result["changed"] and [c["seq"] for c in result["deleted"]] == [10, 30]
    assert "checkpoint" not in result
    assert result["diff"] == {"before": {"checkpoints": result["deleted"]}, "after": {"checkpoints": []}}
    deletes = [r[1] for r in havend.script.requests if r[0] == "DELETE"]
    assert deletes == ["/v1/groups/app/checkpoints/" + "a1" * 16, "/v1/groups/app/checkpoints/" + "c3" * 16]


def test_absent_by_prefix_in_check_mode_deletes_nothing(havend, capsys):
    _retained(havend)
    result = run(
        capsys, checkpoint, url=havend.url, group="app", checkpoint="b2b2b2", state="absent", _ansible_check_mode=True
    )
    assert result["changed"] and [c["id"] for c in result["deleted"]] == ["b2" * 16]
    assert [r[0] for r in havend.script.requests] == ["GET"]


def test_absent_with_nothing_matching_is_not_changed(havend, capsys):
    _retained(havend)
    result = run(capsys, checkpoint, url=havend.url, group="app", label="gone", state="absent", _ansible_diff=True)
    assert not result["changed"] and result["deleted"] == [] and "diff" not in result
    assert [r[0] for r in havend.script.requests] == ["GET"]


def test_absent_counts_one_dropped_meanwhile_as_gone(havend, capsys):
    _retained(havend)
    havend.script.on("DELETE", "/v1/groups/app/checkpoints/" + "a1" * 16, (404, {"detail": "not retained"}))
    result = run(capsys, checkpoint, url=havend.url, group="app", label="nightly", state="absent")
    assert result["changed"] and [c["seq"] for c in result["deleted"]] == [30]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"state": "absent"}, "needs a label"),
        ({"state": "absent", "checkpoint": "oldest"}, "each run"),
        ({"state": "absent", "checkpoint": "c3c3c3"}, "prefix of 2"),
        ({"checkpoint": "b2b2b2"}, "state=absent only"),
    ],
)
def test_absent_bad_input_fails_and_deletes_nothing(havend, capsys, args, why):
    _retained(havend)
    havend.script.on("GET", "/v1/groups/app", (200, {"name": "app", "last_checkpoint": None}))
    result = run(capsys, checkpoint, url=havend.url, group="app", **args)
    assert result["failed"] and why in result["msg"]
    assert "DELETE" not in [r[0] for r in havend.script.requests]


def test_absent_on_the_source_node_says_where_checkpoints_are(havend, capsys):
    detail = "checkpoints are kept on the target node: ask it"
    havend.script.on("GET", "/v1/groups/app/checkpoints", (409, {"detail": detail}))
    result = run(capsys, checkpoint, url=havend.url, group="app", label="nightly", state="absent")
    assert result["failed"] and result["status"] == 409 and "target node" in result["msg"]
