# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.haven.dr.plugins.module_utils._client import HavenClient
from ansible_collections.haven.dr.plugins.module_utils._errors import HavenTimeout
from ansible_collections.haven.dr.plugins.module_utils._waiter import describe_progress, wait, wait_operation


class Clock:
    """Time that moves only when the waiter sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_wait_returns_the_object_that_was_ready_and_the_time_it_took():
    clock, values = Clock(), iter([1, 2, 3, 4])
    ok, obj, elapsed = wait(lambda: next(values), lambda v: v >= 3, 10, 0.5, clock=clock, sleep=clock.sleep)
    assert (ok, obj, elapsed) == (True, 3, 1.0)


def test_wait_gives_up_with_the_last_object_seen():
    clock = Clock()
    ok, obj, elapsed = wait(lambda: "running", lambda v: False, 2, 0.75, clock=clock, sleep=clock.sleep)
    assert (ok, obj) == (False, "running") and elapsed == 2.0


def test_a_first_short_pause_doubles_up_to_the_interval():
    clock, pauses = Clock(), []

    def sleep(seconds):
        pauses.append(seconds)
        clock.sleep(seconds)

    ok, obj, elapsed = wait(lambda: clock.now, lambda v: v >= 3, 10, 1.0, clock=clock, sleep=sleep, first=0.125)
    assert ok and pauses == [0.125, 0.25, 0.5, 1.0, 1.0, 1.0] and elapsed == pytest.approx(3.875)


def test_progress_lines():
    assert describe_progress({"bytes_done": 25, "bytes_total": 100, "eta_seconds": 3}) == "25 of 100 bytes (25 %), ETA 3 s"
    assert describe_progress({"lag_bytes": 0, "lag_seconds": 0.5, "changed_bytes": None}) == "lag bytes 0, lag seconds 0.5"
    assert describe_progress(None) == "running"


def _operation(state, progress=None):
    return {"id": "op1", "kind": "failback", "target": "app", "state": state, "progress": progress}


def test_wait_operation_reports_progress_and_returns_the_result(havend):
    havend.script.on(
        "GET",
        "/v1/operations/op1",
        (200, _operation("running", {"bytes_done": 0, "bytes_total": 8192, "eta_seconds": None})),
        (200, _operation("running", {"bytes_done": 4096, "bytes_total": 8192, "eta_seconds": 1})),
        (200, dict(_operation("succeeded"), result={"pulled_bytes": 4096})),
    )
    clock, said = Clock(), []
    client = HavenClient(havend.url, token="t", sleep=clock.sleep)
    op, lines = wait_operation(client, {"id": "op1"}, 60, 1, said.append, clock, clock.sleep)
    assert op["result"] == {"pulled_bytes": 4096}
    assert lines == said
    assert [line.split(" after ")[0] for line in lines] == [
        "failback of app: 0 of 8192 bytes (0 %)",
        "failback of app: 4096 of 8192 bytes (50 %), ETA 1 s",
        "failback of app: succeeded",
    ]


def test_wait_operation_timeout_keeps_the_partial_result(havend):
    havend.script.on("GET", "/v1/operations/op1", (200, _operation("running", {"lag_bytes": 10})))
    clock = Clock()
    client = HavenClient(havend.url, token="t", sleep=clock.sleep)
    with pytest.raises(HavenTimeout) as raised:
        wait_operation(client, {"id": "op1", "kind": "failback", "group": "app"}, 3, 1, None, clock, clock.sleep)
    assert "still running after 3 s" in str(raised.value)
    assert raised.value.result["operation"]["state"] == "running"
    assert raised.value.result["progress_lines"] == ["failback of app: lag bytes 10 after 0 s"]
