# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: drill_report
type: aggregate
short_description: Writes the report of every drill, failover and failback as JSON, JUnit XML and HTML
version_added: 0.1.0
description:
  - Picks up the C(haven_report) that M(haven.dr.drill) (and the failover and failback modules) return, also when
    the task failed and in each item of a loop. A task result is recognised by that key, not by its module.
  - Writes, per report and as soon as the task ends, C(<plan>-<kind>-<UTC start time>.json), C(.xml) (JUnit, a
    testsuite per report, a testcase per step, the RTO and RPO targets and the result) and C(.html) (one
    self-contained page, no script or external resource - the timeline of every step with a bar chart, the servers'
    boots and health checks, RTO and RPO against the plan's targets, the teardown and the failure) into O(output_dir).
  - At the end of the run, prints one line per report with its kind, plan, PASSED or FAILED (and why), the RTO and
    the RPO of each protection group against their targets, the number of steps and the path of its page (see the
    examples).
  - A report passes when its C(passed) is true and every target it gives is met (RTO when C(rto_target_seconds) is
    given, the RPO of every protection group when C(rpo_target_seconds) is given). A target whose measurement is
    missing is not met. The line and the files say which target was missed.
  - It does not change the outcome of the play.
  - A result hidden by C(no_log) carries no report and is not written.
author:
  - haven.dr maintainers (@haven-dr)
requirements:
  - enable in configuration (C(callbacks_enabled = haven.dr.drill_report) or C(ANSIBLE_CALLBACKS_ENABLED))
options:
  output_dir:
    description:
      - The directory the reports are written to, made when missing.
      - A relative path is relative to the directory C(ansible-playbook) runs in (to the configuration file's for the
        C(ini) setting).
    type: path
    default: ./drill-reports
    env:
      - name: HAVEN_DRILL_REPORT_DIR
    ini:
      - section: haven_dr_drill_report
        key: output_dir
  formats:
    description:
      - The files written per report.
    type: list
    elements: str
    choices: [json, junit, html]
    default: [json, junit, html]
    env:
      - name: HAVEN_DRILL_REPORT_FORMATS
    ini:
      - section: haven_dr_drill_report
        key: formats
"""

EXAMPLES = r"""
# ansible.cfg
# [defaults]
# callbacks_enabled = haven.dr.drill_report
# [haven_dr_drill_report]
# output_dir = /var/lib/haven/drill-reports
# formats = junit,html

# or for one run:
# ANSIBLE_CALLBACKS_ENABLED=haven.dr.drill_report HAVEN_DRILL_REPORT_DIR=reports ansible-playbook drill.yml

# the line printed per report at the end of the run:
# haven.dr drill shop: PASSED  RTO 21.4 s (target 300 s)  RPO app 4.2 s (target 60 s)  12 steps  -> drill-reports/shop-drill-20261203T101500Z.html
"""

import os
import tempfile
import time

from ansible.plugins.callback import CallbackBase

from ansible_collections.haven.dr.plugins.plugin_utils._drill_report import (
    RecoveryReport,
    file_stem,
    find_reports,
    render_html,
    render_json,
    render_junit,
    summary_line,
)

EXTENSIONS = (("json", ".json"), ("junit", ".xml"), ("html", ".html"))


def _write(path, data):
    """``data`` (bytes) to ``path`` whole or not at all: a temporary file beside it, renamed."""
    handle, temporary = tempfile.mkstemp(prefix=".drill-report-", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class CallbackModule(CallbackBase):
    """Writes each ``haven_report`` as it arrives; one summary line per report at the end."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "haven.dr.drill_report"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display=None):
        super(CallbackModule, self).__init__(display=display)
        self._reports = []  # (RecoveryReport, the path shown in its line or None)
        self._stems = set()

    def v2_runner_on_ok(self, result):
        self._collect(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._collect(result)

    def v2_playbook_on_stats(self, stats):
        for report, path in self._reports:
            self._display.display(summary_line(report, path))

    def _collect(self, result):
        data = getattr(result, "result", None)  # ansible-core 2.19; _result before
        if not isinstance(data, dict):
            data = getattr(result, "_result", None)
        host = getattr(getattr(result, "_host", None), "name", None)
        task = result._task.get_name() if hasattr(getattr(result, "_task", None), "get_name") else None
        for raw in find_reports(data):
            report = RecoveryReport(raw, host=host, task=task)
            self._reports.append((report, self._save(report)))

    def _save(self, report):
        """The report's files; the path to show (the HTML page's when written), None when nothing could be."""
        formats = [f for f in (self.get_option("formats") or []) if f]
        directory = self.get_option("output_dir") or "./drill-reports"
        when = report.started if report.started is not None else time.time()
        try:
            stem = file_stem(report, when)
        except (OverflowError, OSError, ValueError):
            stem = file_stem(report, time.time())
        unique, count = stem, 1
        while unique in self._stems or any(os.path.exists(os.path.join(directory, unique + ext)) for name, ext in EXTENSIONS if name in formats):
            count += 1
            unique = "%s-%d" % (stem, count)
        self._stems.add(unique)
        renderers = {
            "json": lambda: render_json(report).encode("utf-8"),
            "junit": lambda: render_junit(report),
            "html": lambda: render_html(report).encode("utf-8"),
        }
        shown = None
        try:
            os.makedirs(directory, exist_ok=True)
            for name, ext in EXTENSIONS:
                if name not in formats:
                    continue
                path = os.path.join(directory, unique + ext)
                _write(path, renderers[name]())
                if shown is None or name == "html":
                    shown = path
        except (OSError, ValueError) as error:
            self._display.warning("haven.dr.drill_report: cannot write the report of %s to %s: %s" % (report.title(), directory, error))
        return _shown(shown)


def _shown(path):
    """``path`` relative to the current directory when inside it, else as it is."""
    if path is None:
        return None
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith(os.pardir) else relative
