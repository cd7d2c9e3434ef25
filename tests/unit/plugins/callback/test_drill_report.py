# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""haven.dr.drill_report fed task results as ansible-playbook would: the files
it writes (JSON, JUnit XML, HTML) and the line it prints. A real play with a
browser: tests/service/test_drill_report.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json
import os
import xml.etree.ElementTree as ET

import pytest
from ansible.plugins.loader import callback_loader

from ansible_collections.haven.dr.plugins.plugin_utils import _drill_report

STARTED = 1767225600.5  # 2026-01-01T00:00:00.5Z
REPORT = {
    "kind": "drill",
    "mode": None,
    "plan": "shop",
    "passed": True,
    "started": STARTED,
    "ended": STARTED + 49.6,
    "seconds": 49.6,
    "rto_seconds": 21.4,
    "rto_target_seconds": 300,
    "rpo": {"app": {"seconds": 4.2, "writes": 0, "checkpoint": "a1b2c3d4e5f6"}},
    "rpo_target_seconds": 60,
    "timeline": [
        {"step": "export", "group": None, "server": None, "started": 0.01, "ended": 0.2, "seconds": 0.19, "outcome": "ok", "output": "app/db@a1b2"},
        {"step": "network", "group": None, "server": None, "started": 0.2, "ended": 0.3, "seconds": 0.1, "outcome": "ok", "output": ""},
        {"step": "create", "group": "db", "server": "db1", "started": 0.3, "ended": 0.5, "seconds": 0.2, "outcome": "ok", "output": ""},
        {"step": "power_on", "group": "db", "server": "db1", "started": 0.5, "ended": 1.0, "seconds": 0.5, "outcome": "ok", "output": ""},
        {
            "step": "health_check",
            "group": "db",
            "server": "db1",
            "started": 1.0,
            "ended": 21.4,
            "seconds": 20.4,
            "outcome": "ok",
            "output": "tcp 10.99.0.11:5432 accepted",
        },
    ],
    "teardown": [{"step": "destroy", "group": "db", "server": "db1", "seconds": 0.3, "outcome": "ok", "output": ""}],
    "failure": None,
    "servers": [{"name": "db1", "group": "db", "protection_group": "app"}],
    "bytes": None,
}
FAILED = dict(
    REPORT,
    passed=False,
    rto_seconds=None,
    timeline=REPORT["timeline"][:4]
    + [
        {
            "step": "health_check",
            "group": "db",
            "server": "db1",
            "started": 1.0,
            "ended": 26.0,
            "seconds": 25.0,
            "outcome": "timeout",
            "output": "tcp 10.99.0.11:5433 did not pass within its 25 s (21 tries); last: ConnectionRefusedError",
        },
    ],
    failure={
        "group": "db",
        "server": "db1",
        "step": "health_check",
        "check": "tcp 10.99.0.11:5433",
        "output": "tcp 10.99.0.11:5433 did not pass within its 25 s (21 tries); last: ConnectionRefusedError",
    },
)


class Display:
    def __init__(self):
        self.lines, self.warnings = [], []

    def display(self, msg, *args, **kwargs):
        self.lines.append(msg)

    def warning(self, msg, *args, **kwargs):
        self.warnings.append(msg)

    def __getattr__(self, name):  # v, vv, debug...
        return lambda *args, **kwargs: None


class Host:
    name = "localhost"


class Task:
    def get_name(self):
        return "drill shop"


class Result:
    """What a callback is given: the result dict, its host and task."""

    def __init__(self, data):
        self.result = data
        self._result = data
        self._host = Host()
        self._task = Task()


def make_callback(tmp_path, **options):
    plugin = callback_loader.get("haven.dr.drill_report")
    display = Display()
    plugin._display = display
    plugin.set_options(direct=dict({"output_dir": str(tmp_path / "reports")}, **options))
    return plugin, display


def run(plugin, *results, **kwargs):
    """Each result through on_ok (or on_failed when it failed), then the stats."""
    for data in results:
        if data.get("failed"):
            plugin.v2_runner_on_failed(Result(data), ignore_errors=kwargs.get("ignore_errors", False))
        else:
            plugin.v2_runner_on_ok(Result(data))
    plugin.v2_playbook_on_stats(None)


def files(tmp_path):
    directory = tmp_path / "reports"
    return sorted(os.listdir(str(directory))) if directory.exists() else []


def read(tmp_path, name):
    with open(str(tmp_path / "reports" / name), "rb") as stream:
        return stream.read()


def test_a_passed_drill_is_written_as_json_junit_and_html_and_summed_up(tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))  # the line shows the path relative to here
    plugin, display = make_callback(tmp_path)
    run(plugin, {"changed": True, "passed": True, "haven_report": copy.deepcopy(REPORT)})
    stem = "shop-drill-20260101T000000Z"
    assert files(tmp_path) == [stem + ".html", stem + ".json", stem + ".xml"]
    assert display.lines == ["haven.dr drill shop: PASSED  RTO 21.4 s (target 300 s)  RPO app 4.2 s (target 60 s)  5 steps  -> reports/%s.html" % stem]
    assert display.warnings == []

    data = json.loads(read(tmp_path, stem + ".json").decode("utf-8"))
    assert data["report"] == REPORT  # round-trips
    assert data["host"] == "localhost" and data["task"] == "drill shop"
    assert data["verdict"]["passed"] is True and data["verdict"]["missed"] == []
    assert data["verdict"]["rto"] == {"seconds": 21.4, "target_seconds": 300, "met": True}
    assert data["verdict"]["rpo"]["groups"] == {"app": {"seconds": 4.2, "met": True}}

    suites = ET.fromstring(read(tmp_path, stem + ".xml"))
    assert suites.tag == "testsuites" and len(suites) == 1
    suite = suites[0]
    cases = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert cases == [
        ("shop", "export"),
        ("shop", "network"),
        ("shop.db.db1", "create"),
        ("shop.db.db1", "power_on"),
        ("shop.db.db1", "health_check"),
        ("shop.db.db1", "teardown destroy"),
        ("shop", "rto target"),
        ("shop", "rpo target"),
        ("shop", "drill"),
    ]
    assert suite.get("tests") == "9" and suite.get("failures") == "0" and suite.get("skipped") == "0"
    assert suite.find("testcase[@name='health_check']").get("time") == "20.400"
    assert suite.find("testcase[@name='health_check']/system-out").text == "tcp 10.99.0.11:5432 accepted"
    assert suite.get("timestamp") == "2026-01-01T00:00:00"

    page = read(tmp_path, stem + ".html").decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert 'id="verdict">PASSED<' in page and ">FAILED<" not in page
    assert "21.4 s" in page and "300 s" in page and "4.2 s" in page and "60 s" in page
    for step in REPORT["timeline"]:
        assert ">%s<" % step["step"] in page
    assert ">db1<" in page and "teardown" in page.lower() and 'class="bar ok"' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page and "src=" not in page
    assert 'class="failure"' not in page


def test_a_failed_drill_names_its_failure_everywhere(tmp_path):
    plugin, display = make_callback(tmp_path)
    run(plugin, {"failed": True, "msg": "drill of plan shop failed", "haven_report": copy.deepcopy(FAILED)}, ignore_errors=True)
    stem = "shop-drill-20260101T000000Z"
    line = display.lines[0]
    assert line.startswith("haven.dr drill shop: FAILED (the drill failed at db1 tcp 10.99.0.11:5433; RTO not measured (target 300 s))")
    assert "RTO not measured (target 300 s)" in line and "RPO app 4.2 s (target 60 s)" in line

    data = json.loads(read(tmp_path, stem + ".json").decode("utf-8"))
    assert data["report"] == FAILED and data["verdict"]["passed"] is False
    assert data["verdict"]["rto"]["met"] is False

    suite = ET.fromstring(read(tmp_path, stem + ".xml"))[0]
    failure = suite.find("testcase[@name='health_check']/failure")
    assert failure.get("type") == "timeout" and "did not pass within its 25 s" in failure.text
    assert suite.find("testcase[@name='rto target']/failure").get("message") == "RTO not measured (target 300 s)"
    assert suite.find("testcase[@name='drill']/failure").text.startswith("group: db\nserver: db1\nstep: health_check")
    assert suite.find("testcase[@name='rpo target']/failure") is None
    assert suite.get("failures") == "3"

    page = read(tmp_path, stem + ".html").decode("utf-8")
    assert 'id="verdict">FAILED<' in page and 'class="failure"' in page
    assert "tcp 10.99.0.11:5433" in page and "MISSED" in page and 'class="bar timeout"' in page


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"rto_seconds": 400.25}, "RTO 400.25 s over its target 300 s"),
        ({"rpo": {"app": {"seconds": 4.2}, "db": {"seconds": 75}}}, "RPO of db 75 s over its target 60 s"),
        ({"rpo": {"app": {"seconds": None}}}, "RPO of app not measured over its target 60 s"),
        ({"rpo": {}}, "RPO not measured (target 60 s)"),
    ],
)
def test_a_passed_run_that_missed_a_target_fails_saying_which(tmp_path, change, reason):
    plugin, display = make_callback(tmp_path)
    run(plugin, {"haven_report": dict(REPORT, **change)})
    assert display.lines[0].startswith("haven.dr drill shop: FAILED (%s)" % reason)
    stem = "shop-drill-20260101T000000Z"
    data = json.loads(read(tmp_path, stem + ".json").decode("utf-8"))
    assert data["verdict"]["missed"] == [reason]
    suite = ET.fromstring(read(tmp_path, stem + ".xml"))[0]
    name = "rto target" if "RTO" in reason else "rpo target"
    assert suite.find("testcase[@name='%s']/failure" % name).get("message") == reason
    assert suite.find("testcase[@name='drill']/failure") is None  # the run itself passed
    assert 'id="verdict">FAILED<' in read(tmp_path, stem + ".html").decode("utf-8")


def test_without_targets_a_passed_run_passes_and_says_there_was_none(tmp_path):
    plugin, display = make_callback(tmp_path)
    run(
        plugin,
        {
            "haven_report": {
                "kind": "failback",
                "plan": "shop",
                "passed": True,
                "started": STARTED,
                "rto_seconds": 3,
                "bytes": {"shipped": 123, "changed": 100, "volumes": 4194304},
            }
        },
    )
    assert display.lines[0].startswith("haven.dr failback shop: PASSED  RTO 3 s (no target)  0 steps  -> ")
    suite = ET.fromstring(read(tmp_path, "shop-failback-20260101T000000Z.xml"))[0]
    assert suite.find("testcase[@name='rto target']/skipped").get("message") == "no RTO target"
    assert suite.find("testcase[@name='rpo target']/skipped").get("message") == "no RPO target"
    page = read(tmp_path, "shop-failback-20260101T000000Z.html").decode("utf-8")
    assert "4194304" in page and "no target" in page and 'id="verdict">PASSED<' in page


def test_the_reports_of_a_loop_are_each_written(tmp_path):
    plugin, display = make_callback(tmp_path)
    loop = {
        "changed": True,
        "results": [
            {"item": "a", "haven_report": dict(REPORT, plan="a")},
            {"item": "skipped", "skipped": True},
            {"item": "b", "failed": True, "haven_report": dict(FAILED, plan="b", kind="failover", mode="planned")},
            "not a dict",
            {"item": "c", "haven_report": "not a dict either"},
        ],
    }
    run(plugin, loop)
    assert len(display.lines) == 2
    assert display.lines[0].startswith("haven.dr drill a: PASSED")
    assert display.lines[1].startswith("haven.dr failover (planned) b: FAILED (the failover failed at db1")
    assert [f for f in files(tmp_path) if f.endswith(".json")] == ["a-drill-20260101T000000Z.json", "b-failover-20260101T000000Z.json"]


def test_results_without_a_report_write_nothing(tmp_path):
    plugin, display = make_callback(tmp_path)
    run(plugin, {"changed": False}, {"ansible_facts": {"haven_report": REPORT}}, {"haven_report": None}, {"failed": True, "msg": "x"})
    assert display.lines == [] and files(tmp_path) == []


def test_odd_values_are_escaped_and_tolerated(tmp_path):
    odd = {
        "kind": "drill<script>",
        "mode": 7,
        "plan": "../../etc/pass wd <script>alert('x')</script> ✓",
        "passed": "yes",  # not True: not passed
        "started": "soon",
        "ended": None,
        "seconds": float("nan"),
        "rto_seconds": "12.5",  # numeric text counts
        "rto_target_seconds": True,  # not a number
        "rpo": {"<b>g</b>": 3, "h": {"seconds": "x", "writes": "many"}, 5: None},
        "rpo_target_seconds": None,
        "timeline": [
            None,
            "just text",
            {
                "step": "<script>alert(1)</script>",
                "server": "ü-ñ",
                "outcome": "weird",
                "output": "a\x00b\x1bc </pre><script>alert(2)</script> ✓",
                "started": -5,
                "ended": 1e9,
            },
            {"step": "health_check", "server": None, "outcome": "failed", "output": None, "started": "0.5", "ended": 0.1},
        ],
        "teardown": "nope",
        "failure": {"server": "<i>db1</i>", "output": "<script>alert(3)</script>", "check": None},
        "servers": [None, {"name": None}, {"name": "<s>"}],
        "bytes": {"shipped": "<img src=x>"},
    }
    plugin, display = make_callback(tmp_path)
    run(plugin, {"failed": True, "haven_report": odd})
    names = files(tmp_path)
    assert len(names) == 3 and all("/" not in n and " " not in n and "<" not in n for n in names)
    assert all(n.startswith("etc_pass_wd_script_alert_x_") for n in names), names
    stem = names[0].rsplit(".", 1)[0]
    assert display.lines[0].startswith("haven.dr drill<script> (7) ../../etc/pass wd <script>alert('x')</script> ✓: FAILED (the drill<script> failed at")
    assert "RTO 12.5 s (no target)" in display.lines[0] and display.warnings == []

    page = read(tmp_path, stem + ".html").decode("utf-8")
    assert "<script" not in page and "<img" not in page and "<i>" not in page and "<b>g" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert "ü-ñ" in page and "✓" in page and "\x00" not in page and "\x1b" not in page

    suite = ET.fromstring(read(tmp_path, stem + ".xml"))[0]  # parses: control characters replaced
    out = suite.findall("testcase")[2].find("system-out").text
    assert out.startswith("a\ufffdb\ufffdc </pre><script>alert(2)</script>")
    assert [c.get("name") for c in suite.iter("testcase")][:4] == ["step", "just text", "<script>alert(1)</script>", "health_check"]

    data = json.loads(read(tmp_path, stem + ".json").decode("utf-8"))
    assert data["report"]["seconds"] is None and data["report"]["rpo"]["5"] is None  # NaN and a number key made JSON
    assert data["verdict"]["rto"] == {"seconds": 12.5, "target_seconds": None, "met": None}


def test_a_report_of_only_kind_plan_and_passed(tmp_path):
    plugin, display = make_callback(tmp_path)
    run(plugin, {"haven_report": {"kind": "drill", "plan": "p", "passed": True}})
    assert display.lines[0].startswith("haven.dr drill p: PASSED  RTO not measured (no target)  0 steps  -> ")
    assert len(files(tmp_path)) == 3


def test_only_the_formats_asked_for_and_names_never_overwrite(tmp_path):
    plugin, display = make_callback(tmp_path, formats=["html"])
    run(plugin, {"haven_report": REPORT}, {"haven_report": REPORT})
    assert files(tmp_path) == ["shop-drill-20260101T000000Z-2.html", "shop-drill-20260101T000000Z.html"]
    plugin, display = make_callback(tmp_path, formats=["json"])  # a later run, same directory
    run(plugin, {"haven_report": REPORT})
    assert "shop-drill-20260101T000000Z.json" in files(tmp_path)
    assert display.lines[0].endswith("shop-drill-20260101T000000Z.json")


def test_a_directory_that_cannot_be_written_warns_and_still_sums_up(tmp_path):
    blocker = tmp_path / "reports"
    blocker.write_text("a file, not a directory")
    plugin, display = make_callback(tmp_path)
    run(plugin, {"haven_report": REPORT})
    assert len(display.warnings) == 1 and "cannot write the report of drill shop" in display.warnings[0]
    assert display.lines == ["haven.dr drill shop: PASSED  RTO 21.4 s (target 300 s)  RPO app 4.2 s (target 60 s)  5 steps"]


def test_the_options_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HAVEN_DRILL_REPORT_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("HAVEN_DRILL_REPORT_FORMATS", "junit")
    plugin = callback_loader.get("haven.dr.drill_report")
    plugin._display = Display()
    plugin.set_options()
    run(plugin, {"haven_report": REPORT})
    assert os.listdir(str(tmp_path / "from-env")) == ["shop-drill-20260101T000000Z.xml"]


@pytest.mark.parametrize(
    "value, shown",
    [(21.4, "21.4"), (300, "300"), (300.0, "300"), (0.004, "0"), (0.015, "0.01"), (1234.567, "1234.57"), (None, "-")],
)
def test_seconds_are_shown_short(value, shown):
    assert _drill_report.seconds_text(value) == shown


@pytest.mark.parametrize("value, made", [(1, 1.0), ("2.5", 2.5), (True, None), (None, None), ("x", None), (float("inf"), None), ([1], None)])
def test_numbers_are_read_tolerantly(value, made):
    assert _drill_report.number(value) == made
