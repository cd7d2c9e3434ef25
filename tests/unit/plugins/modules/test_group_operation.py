# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import group_operation


def run(capsys, **args):
    args.setdefault("token", "hvn_o_operate")
    args.setdefault("wait_interval", 0.01)
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            group_operation.main()
    return json.loads(capsys.readouterr().out)


def _group(state):
    return (200, {"name": "app", "state": state, "state_reason": "test"})


def test_failover_waits_and_returns_havends_figures(havend, capsys):
    s = havend.script
    s.on("GET", "/v1/groups/app", _group("protecting"), _group("failed_over"))
    s.on("POST", "/v1/groups/app/operations/failover", (202, {"id": "op1", "kind": "failover", "group": "app"}))
    s.on(
        "GET",
        "/v1/operations/op1",
        (200, {"id": "op1", "kind": "failover", "target": "app", "state": "running", "progress": {"lag_bytes": 4096}}),
        (200, {"id": "op1", "kind": "failover", "target": "app", "state": "succeeded", "result": {"lost_writes": 0}}),
    )
    result = run(capsys, url=havend.url, group="app", operation="failover", operation_timeout=60, _ansible_diff=True)
    assert result["changed"] and result["result"] == {"lost_writes": 0}
    assert (result["state_before"], result["state_after"]) == ("protecting", "failed_over")
    assert result["diff"] == {"before": {"state": "protecting"}, "after": {"state": "failed_over"}}
    assert [line.split(" after ")[0] for line in result["progress_lines"]] == [
        "failover of app: lag bytes 4096",
        "failover of app: succeeded",
    ]
    posted = [r for r in s.requests if r[0] == "POST"]
    assert posted[0][3] == {"timeout": 60.0}


def test_a_finished_operation_is_not_run_again(havend, capsys):
    havend.script.on("GET", "/v1/groups/app", _group("failed_over"))
    result = run(capsys, url=havend.url, group="app", operation="failover")
    assert not result["changed"] and result["state_after"] == "failed_over"
    assert [r[0] for r in havend.script.requests] == ["GET"]


def test_check_mode_starts_nothing(havend, capsys):
    havend.script.on("GET", "/v1/groups/app", _group("failed_over"))
    result = run(capsys, url=havend.url, group="app", operation="failback", _ansible_check_mode=True)
    assert result["changed"] and "operation" not in result
    assert [r[0] for r in havend.script.requests] == ["GET"]


def test_a_refusal_says_havends_reason(havend, capsys):
    havend.script.on("GET", "/v1/groups/app", _group("protecting"))
    havend.script.on(
        "POST",
        "/v1/groups/app/operations/reverse",
        (409, {"detail": "reverse is not possible while the group is protecting (replicating)"}),
    )
    result = run(capsys, url=havend.url, group="app", operation="reverse")
    assert result["failed"] and result["status"] == 409
    assert result["msg"].endswith("answered 409: reverse is not possible while the group is protecting (replicating)")


def test_a_failed_operation_fails_the_task_with_havends_error(havend, capsys):
    havend.script.on("GET", "/v1/groups/app", _group("failed_over"))
    havend.script.on("POST", "/v1/groups/app/operations/failback", (202, {"id": "op2", "kind": "failback"}))
    havend.script.on(
        "GET", "/v1/operations/op2", (200, {"id": "op2", "state": "failed", "error": "RemoteProtocolError: link down"})
    )
    result = run(capsys, url=havend.url, group="app", operation="failback")
    assert result["failed"] and "failback of group app failed: RemoteProtocolError: link down" in result["msg"]


def test_wait_false_returns_the_started_operation(havend, capsys):
    havend.script.on("GET", "/v1/groups/app", _group("protecting"))
    havend.script.on("POST", "/v1/groups/app/operations/promote", (202, {"id": "op3", "state": "running"}))
    result = run(capsys, url=havend.url, group="app", operation="promote", wait=False)
    assert result["changed"] and result["operation"] == {"id": "op3", "state": "running"}


@pytest.mark.parametrize(("operation", "missing"), [("rollback", "checkpoint"), ("resolve", "survivor")])
def test_required_arguments_are_named(havend, capsys, operation, missing):
    result = run(capsys, url=havend.url, group="app", operation=operation)
    assert result["failed"] and missing in result["msg"] and havend.script.requests == []
