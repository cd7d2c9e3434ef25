# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The report of a drill, failover or failback, rendered (internal use only).

The modules ``haven.dr.drill``, ``failover`` and ``failback`` return a dict
``haven_report`` (also when they fail). ``find_reports(result)`` yields the
ones in a task result (top level, and in a loop's ``results[]``);
``RecoveryReport(raw)`` reads one, tolerating any key missing, None or of
an odd type except that a report is a dict; ``verdict`` is measured against
the plan's targets: the report passes when ``passed`` is true and every
known target is met (a target whose measurement is missing is not met).

``render_json``, ``render_junit`` and ``render_html`` give the three files,
``summary_line`` the one line printed at the end of the run, ``file_stem``
a safe file name. Pure: no I/O. The callback ``haven.dr.drill_report``
writes the files.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import html
import json
import math
import re
import xml.etree.ElementTree as ET

FORMAT = "haven.dr.drill_report/1"
OUTCOMES = ("ok", "failed", "timeout", "skipped")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# XML 1.0 forbids these characters even escaped; ElementTree would write them and fail to read them back
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def find_reports(result):
    """The ``haven_report`` dicts of a task result: its own, then each loop item's."""
    if not isinstance(result, dict):
        return []
    found = []
    if isinstance(result.get("haven_report"), dict):
        found.append(result["haven_report"])
    items = result.get("results")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("haven_report"), dict):
                found.append(item["haven_report"])
    return found


def number(value):
    """A finite float from a number or numeric text; None for anything else (bools too)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        made = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return made if math.isfinite(made) else None


def text(value):
    """A string for display: '' for None, JSON for containers."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(jsonable(value), sort_keys=True)
    return str(value)


def jsonable(value):
    """``value`` as plain JSON data: keys as text, non-finite numbers as None, other objects as text."""
    if isinstance(value, dict):
        return dict((str(k), jsonable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def seconds_text(value):
    """``21.4``, ``300``, ``0.01``: at most two decimals, no trailing zeros; ``-`` when unknown."""
    if value is None:
        return "-"
    shown = "%.2f" % value
    return shown.rstrip("0").rstrip(".") if "." in shown else shown


def utc_text(epoch):
    if epoch is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "-"


class Step:
    """One step of a timeline or the teardown."""

    def __init__(self, raw):
        raw = raw if isinstance(raw, dict) else {"step": raw}
        self.step = text(raw.get("step")) or "step"
        self.group = text(raw.get("group")) or None
        self.server = text(raw.get("server")) or None
        self.started = number(raw.get("started"))
        self.ended = number(raw.get("ended"))
        self.seconds = number(raw.get("seconds"))
        if self.seconds is None and self.started is not None and self.ended is not None:
            self.seconds = max(self.ended - self.started, 0.0)
        self.outcome = text(raw.get("outcome")) or "ok"
        self.output = text(raw.get("output"))

    @property
    def failed(self):
        return self.outcome in ("failed", "timeout")

    def where(self):
        """``db/db1``, ``db``, or '' for a step of the whole run."""
        return "/".join(p for p in (self.group, self.server) if p)


class Target:
    """A measurement against its target: ``met`` is None when there is no target."""

    def __init__(self, name, measured, target, met, reason):
        self.name, self.measured, self.target, self.met, self.reason = name, measured, target, met, reason


class RecoveryReport:
    """One ``haven_report``, read tolerantly; ``host`` and ``task`` say where it came from."""

    def __init__(self, raw, host=None, task=None):
        self.raw = raw
        self.host = text(host) or None
        self.task = text(task) or None
        self.kind = text(raw.get("kind")) or "report"
        self.mode = text(raw.get("mode")) or None
        self.plan = text(raw.get("plan")) or "plan"
        self.passed = raw.get("passed") is True
        self.started = number(raw.get("started"))
        self.ended = number(raw.get("ended"))
        self.seconds = number(raw.get("seconds"))
        if self.seconds is None and self.started is not None and self.ended is not None:
            self.seconds = max(self.ended - self.started, 0.0)
        self.rto = number(raw.get("rto_seconds"))
        self.rto_target = number(raw.get("rto_target_seconds"))
        self.rpo_target = number(raw.get("rpo_target_seconds"))
        self.rpo = {}
        rpo = raw.get("rpo")
        if isinstance(rpo, dict):
            for group in sorted(rpo, key=text):
                entry = rpo[group] if isinstance(rpo[group], dict) else {"seconds": rpo[group]}
                self.rpo[text(group)] = {
                    "seconds": number(entry.get("seconds")),
                    "writes": entry.get("writes") if isinstance(entry.get("writes"), int) else None,
                    "checkpoint": text(entry.get("checkpoint")) or None,
                }
        self.timeline = [Step(s) for s in _listed(raw.get("timeline"))]
        self.teardown = [Step(s) for s in _listed(raw.get("teardown"))]
        failure = raw.get("failure")
        self.failure = dict((k, text(v)) for k, v in failure.items()) if isinstance(failure, dict) else None
        self.servers = [s for s in _listed(raw.get("servers")) if isinstance(s, dict)]
        self.bytes = raw.get("bytes") if isinstance(raw.get("bytes"), dict) else None
        self.targets = [self._rto_target(), self._rpo_target()]

    def _rto_target(self):
        if self.rto_target is None:
            return Target("rto", self.rto, None, None, "no RTO target")
        if self.rto is None:
            return Target("rto", None, self.rto_target, False, "RTO not measured (target %s s)" % seconds_text(self.rto_target))
        if self.rto <= self.rto_target:
            return Target("rto", self.rto, self.rto_target, True, "RTO %s s within %s s" % (seconds_text(self.rto), seconds_text(self.rto_target)))
        return Target("rto", self.rto, self.rto_target, False, "RTO %s s over its target %s s" % (seconds_text(self.rto), seconds_text(self.rto_target)))

    def _rpo_target(self):
        if self.rpo_target is None:
            return Target("rpo", None, None, None, "no RPO target")
        if not self.rpo:
            return Target("rpo", None, self.rpo_target, False, "RPO not measured (target %s s)" % seconds_text(self.rpo_target))
        over = []
        for group, entry in self.rpo.items():
            if entry["seconds"] is None:
                over.append("RPO of %s not measured" % group)
            elif entry["seconds"] > self.rpo_target:
                over.append("RPO of %s %s s" % (group, seconds_text(entry["seconds"])))
        worst = max([e["seconds"] for e in self.rpo.values() if e["seconds"] is not None] or [None], key=lambda v: -1 if v is None else v)
        if over:
            return Target("rpo", worst, self.rpo_target, False, "%s over its target %s s" % (", ".join(over), seconds_text(self.rpo_target)))
        return Target("rpo", worst, self.rpo_target, True, "RPO %s s within %s s" % (seconds_text(worst), seconds_text(self.rpo_target)))

    def group_met(self, entry):
        """A group's RPO against the target: None without a target, False when not measured."""
        if self.rpo_target is None:
            return None
        return entry["seconds"] is not None and entry["seconds"] <= self.rpo_target

    @property
    def missed(self):
        """Why the report does not pass, one reason each: the run itself, then each missed target."""
        reasons = []
        if not self.passed:
            reasons.append("the %s failed%s" % (self.kind, self._failed_where()))
        reasons.extend(t.reason for t in self.targets if t.met is False)
        return reasons

    @property
    def ok(self):
        return not self.missed

    @property
    def verdict(self):
        return "PASSED" if self.ok else "FAILED"

    def title(self):
        return "%s%s %s" % (self.kind, " (%s)" % self.mode if self.mode else "", self.plan)

    def _failed_where(self):
        failure = self.failure or {}
        where = [failure.get(k) for k in ("server", "group") if failure.get(k)][:1]
        if failure.get("check"):
            where.append(failure["check"])
        elif failure.get("step"):
            where.append(failure["step"])
        return (" at " + " ".join(where)) if where else ""

    def span(self):
        """The seconds the Gantt bars are drawn over: the run, or its last step's end."""
        ends = [s.ended for s in self.timeline if s.ended is not None]
        return max([self.seconds or 0.0, self.rto or 0.0] + ends) or 1.0

    def server_rows(self):
        """Per server: its group, protection group, and its boot steps and health check from the timeline."""
        names = [text(s.get("name")) for s in self.servers if s.get("name") is not None]
        names += [s.server for s in self.timeline if s.server and s.server not in names]
        rows = []
        for name in dict.fromkeys(names):
            known = next((s for s in self.servers if text(s.get("name")) == name), {})
            steps = [s for s in self.timeline if s.server == name]
            checks = [s for s in steps if s.step == "health_check"]
            powered = [s for s in steps if s.step == "power_on"]
            rows.append(
                {
                    "name": name,
                    "group": text(known.get("group")) or next((s.group for s in steps if s.group), None),
                    "protection_group": text(known.get("protection_group")) or None,
                    "power_on": powered[-1] if powered else None,
                    "health_check": checks[-1] if checks else None,
                }
            )
        return rows

    def to_data(self):
        """The JSON file's content: the report as given, where it came from, and the verdict."""
        return {
            "format": FORMAT,
            "host": self.host,
            "task": self.task,
            "verdict": {
                "passed": self.ok,
                "missed": self.missed,
                "rto": {"seconds": self.rto, "target_seconds": self.rto_target, "met": self.targets[0].met},
                "rpo": {
                    "groups": dict((g, {"seconds": e["seconds"], "met": self.group_met(e)}) for g, e in self.rpo.items()),
                    "target_seconds": self.rpo_target,
                    "met": self.targets[1].met,
                },
            },
            "report": jsonable(self.raw),
        }


def _listed(value):
    return value if isinstance(value, list) else []


def file_stem(report, when):
    """``<plan>-<kind>-<UTC timestamp>`` from characters safe in any file name; ``when`` is epoch seconds."""

    def safe(value, fallback):
        cleaned = _UNSAFE_NAME.sub("_", value).strip("._")[:64]
        return cleaned or fallback

    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return "%s-%s-%s" % (safe(report.plan, "plan"), safe(report.kind, "report"), stamp)


def render_json(report):
    return json.dumps(report.to_data(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _xml_text(value):
    return _XML_ILLEGAL.sub("\ufffd", text(value))


def render_junit(report):
    """JUnit XML (bytes): a testsuite per report, a testcase per step (classname
    ``<plan>.<group>.<server>``), then ``rto target``, ``rpo target`` and the result."""
    suite = ET.Element("testsuite", name=_xml_text("haven.dr %s" % report.title()))
    cases = []

    def case(classname, name, seconds=None, failure=None, skipped=None, output=None):
        element = ET.SubElement(suite, "testcase", classname=_xml_text(classname), name=_xml_text(name))
        element.set("time", "%.3f" % (seconds or 0.0))
        if failure is not None:
            ET.SubElement(element, "failure", message=_xml_text(failure[0]), type=_xml_text(failure[1])).text = _xml_text(failure[2])
        elif skipped is not None:
            ET.SubElement(element, "skipped", message=_xml_text(skipped))
        if output:
            ET.SubElement(element, "system-out").text = _xml_text(output)
        cases.append((failure is not None, skipped is not None))

    properties = ET.SubElement(suite, "properties")
    for key, value in (
        ("kind", report.kind),
        ("mode", report.mode),
        ("plan", report.plan),
        ("host", report.host),
        ("passed", report.passed),
        ("rto_seconds", report.rto),
        ("rto_target_seconds", report.rto_target),
        ("rpo_target_seconds", report.rpo_target),
    ):
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=_xml_text(value if not isinstance(value, bool) else str(value).lower()))
    for prefix, steps in (("", report.timeline), ("teardown ", report.teardown)):
        for step in steps:
            classname = ".".join(p for p in (report.plan, step.group, step.server) if p)
            name = prefix + step.step
            if step.failed:
                message = step.output.strip().splitlines()[-1][:200] if step.output.strip() else step.outcome
                case(classname, name, step.seconds, failure=(message, step.outcome, step.output))
            elif step.outcome == "skipped":
                case(classname, name, step.seconds, skipped="skipped", output=step.output)
            else:
                case(classname, name, step.seconds, output=step.output)
    for target in report.targets:
        name = "%s target" % target.name
        if target.met is None:
            case(report.plan, name, skipped=target.reason)
        elif target.met:
            case(report.plan, name, output=target.reason)
        else:
            case(report.plan, name, failure=(target.reason, "missed", target.reason))
    if report.passed:
        case(report.plan, report.kind, report.seconds, output="passed")
    else:
        failure = report.failure or {}
        detail = "\n".join("%s: %s" % (k, failure[k]) for k in ("group", "server", "step", "check", "output") if failure.get(k))
        case(report.plan, report.kind, report.seconds, failure=(report.missed[0], "failed", detail or report.missed[0]))
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for f, s in cases if f)))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(1 for f, s in cases if s)))
    suite.set("time", "%.3f" % (report.seconds or 0.0))
    if report.started is not None:
        suite.set("timestamp", datetime.datetime.fromtimestamp(report.started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    if report.host:
        suite.set("hostname", _xml_text(report.host))
    root = ET.Element("testsuites", name="haven.dr", tests=suite.get("tests"), failures=suite.get("failures"), errors="0")
    root.set("time", suite.get("time"))
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.verdict{display:inline-block;padding:4px 14px;border-radius:4px;color:#fff;font-weight:700;letter-spacing:.05em}
.PASSED{background:#1d7f3a}.FAILED{background:#b3261e}
.meta{color:#566070;margin:6px 0 0}
table{border-collapse:collapse;width:100%;margin:4px 0}th,td{border:1px solid #d5d9e0;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.met{color:#1d7f3a;font-weight:700}.missed{color:#b3261e;font-weight:700}.none{color:#566070}
.o-ok{color:#1d7f3a}.o-failed,.o-timeout{color:#b3261e;font-weight:700}.o-skipped{color:#566070}
tr.failed td{background:#fdecea}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.3 ui-monospace,monospace;max-height:12em;overflow:auto}
.gantt{position:relative;height:14px;min-width:240px;background:#f6f7f9}
.bar{position:absolute;top:2px;height:10px;border-radius:2px;background:#3b7bd8}
.bar.failed,.bar.timeout{background:#b3261e}.bar.skipped{background:#9aa3b0}.bar.ok{background:#2e8b57}
.rto{position:absolute;top:0;bottom:0;width:2px;background:#1d2330}
.failure{border:2px solid #b3261e;background:#fdecea;padding:8px 12px;border-radius:4px;margin:16px 0}
.failure h2{margin-top:0;border:none;color:#b3261e}
.reasons{margin:8px 0 0;padding-left:20px;color:#b3261e}
"""


def _e(value):
    return html.escape(_XML_ILLEGAL.sub("\ufffd", text(value)), quote=True)


def _target_cell(target, measured_text):
    if target.met is None:
        return '<td class="n">%s</td><td class="n none">none</td><td class="none">no target</td>' % _e(measured_text)
    cls = "met" if target.met else "missed"
    return '<td class="n">%s</td><td class="n">%s s</td><td class="%s">%s</td>' % (
        _e(measured_text),
        _e(seconds_text(target.target)),
        cls,
        "met" if target.met else "MISSED",
    )


def _step_rows(steps, span, rto, bars):
    rows = []
    for index, step in enumerate(steps, 1):
        cells = [
            '<td class="n">%d</td>' % index,
            "<td>%s</td>" % _e(step.step),
            "<td>%s</td>" % _e(step.group or ""),
            "<td>%s</td>" % _e(step.server or ""),
            '<td class="n">%s</td>' % _e(seconds_text(step.started)),
            '<td class="n">%s</td>' % _e(seconds_text(step.ended)),
            '<td class="n">%s</td>' % _e(seconds_text(step.seconds)),
            '<td class="o-%s">%s</td>' % (_e(_css_word(step.outcome)), _e(step.outcome)),
        ]
        if bars:
            gantt = ""
            if step.started is not None:
                left = min(max(step.started / span * 100.0, 0.0), 100.0)
                width = min(max(((step.ended if step.ended is not None else step.started) - step.started) / span * 100.0, 0.4), 100.0 - left)
                gantt = '<div class="bar %s" style="left:%.2f%%;width:%.2f%%"></div>' % (_e(_css_word(step.outcome)), left, max(width, 0.4))
            if rto is not None:
                gantt += '<div class="rto" style="left:%.2f%%"></div>' % min(max(rto / span * 100.0, 0.0), 99.6)
            cells.append('<td><div class="gantt">%s</div></td>' % gantt)
        cells.append("<td><pre>%s</pre></td>" % _e(step.output))
        rows.append('<tr class="%s">%s</tr>' % ("failed" if step.failed else "", "".join(cells)))
    return "\n".join(rows)


def _css_word(value):
    return value if value in OUTCOMES else "other"


def _step_table(steps, span, rto, bars):
    if not steps:
        return '<p class="none">No steps.</p>'
    head = ["#", "step", "group", "server", "start s", "end s", "seconds", "outcome"] + (["timeline"] if bars else []) + ["output"]
    return "<table><thead><tr>%s</tr></thead><tbody>\n%s\n</tbody></table>" % ("".join("<th>%s</th>" % h for h in head), _step_rows(steps, span, rto, bars))


def render_html(report):
    """One self-contained page (inline CSS, no script, no external resource); every string escaped."""
    rto_target, rpo_target = report.targets
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>haven.dr %s: %s</title>" % (_e(report.title()), report.verdict),
        "<style>%s</style></head><body>" % _CSS,
        '<h1>haven.dr %s <span class="verdict %s" id="verdict">%s</span></h1>' % (_e(report.title()), report.verdict, report.verdict),
        '<p class="meta">plan <b>%s</b> &middot; kind <b>%s</b> &middot; mode <b>%s</b> &middot; host <b>%s</b> &middot; task <b>%s</b></p>'
        % (_e(report.plan), _e(report.kind), _e(report.mode or "-"), _e(report.host or "-"), _e(report.task or "-")),
        '<p class="meta">started %s &middot; ended %s &middot; took %s s &middot; the %s itself %s</p>'
        % (
            _e(utc_text(report.started)),
            _e(utc_text(report.ended)),
            _e(seconds_text(report.seconds)),
            _e(report.kind),
            '<span class="met">passed</span>' if report.passed else '<span class="missed">failed</span>',
        ),
    ]
    if report.missed:
        parts.append('<ul class="reasons">%s</ul>' % "".join("<li>%s</li>" % _e(r) for r in report.missed))
    if report.failure:
        parts.append(
            '<div class="failure"><h2>Failure</h2><table>%s</table></div>'
            % "".join(
                "<tr><th>%s</th><td>%s</td></tr>" % (_e(k), "<pre>%s</pre>" % _e(report.failure[k]) if k == "output" else _e(report.failure[k]))
                for k in ("group", "server", "step", "check", "output")
                if report.failure.get(k)
            )
        )
    parts.append("<h2>Targets</h2><table><thead><tr><th>objective</th><th>measured</th><th>target</th><th>result</th></tr></thead><tbody>")
    parts.append('<tr id="rto"><td>RTO</td>%s</tr>' % _target_cell(rto_target, "%s s" % seconds_text(report.rto) if report.rto is not None else "not measured"))
    if report.rpo:
        for group, entry in report.rpo.items():
            shown = Target("rpo", entry["seconds"], report.rpo_target, report.group_met(entry), "")
            extra = []
            if entry["writes"] is not None:
                extra.append("%d writes" % entry["writes"])
            if entry["checkpoint"]:
                extra.append("checkpoint %s" % entry["checkpoint"])
            parts.append(
                "<tr><td>RPO %s%s</td>%s</tr>"
                % (
                    _e(group),
                    " <small>(%s)</small>" % _e(", ".join(extra)) if extra else "",
                    _target_cell(shown, "%s s" % seconds_text(entry["seconds"]) if entry["seconds"] is not None else "not measured"),
                )
            )
    else:
        parts.append("<tr><td>RPO</td>%s</tr>" % _target_cell(rpo_target, "not measured"))
    parts.append("</tbody></table>")
    if report.bytes:
        parts.append(
            "<h2>Data</h2><table><tbody>%s</tbody></table>"
            % "".join('<tr><th>%s bytes</th><td class="n">%s</td></tr>' % (_e(k), _e(report.bytes[k])) for k in sorted(report.bytes, key=text))
        )
    rows = report.server_rows()
    if rows:
        parts.append(
            "<h2>Servers</h2><table><thead><tr><th>server</th><th>group</th><th>protection group</th>"
            "<th>power on at s</th><th>power on</th><th>health check passed at s</th><th>health check</th></tr></thead><tbody>"
        )
        for row in rows:
            power, check = row["power_on"], row["health_check"]
            parts.append(
                '<tr><td>%s</td><td>%s</td><td>%s</td><td class="n">%s</td><td class="o-%s">%s</td>'
                '<td class="n">%s</td><td class="o-%s">%s</td></tr>'
                % (
                    _e(row["name"]),
                    _e(row["group"] or ""),
                    _e(row["protection_group"] or ""),
                    _e(seconds_text(power.started) if power else "-"),
                    _e(_css_word(power.outcome) if power else "other"),
                    _e(power.outcome if power else "-"),
                    _e(seconds_text(check.ended) if check and check.outcome == "ok" else "-"),
                    _e(_css_word(check.outcome) if check else "other"),
                    _e(check.outcome if check else "no check"),
                )
            )
        parts.append("</tbody></table>")
    span = report.span()
    parts.append('<h2>Timeline</h2><p class="meta">Seconds from the start; the bars span %s s, the dark line is the RTO.</p>' % _e(seconds_text(span)))
    parts.append(_step_table(report.timeline, span, report.rto, True))
    parts.append("<h2>Teardown</h2>")
    parts.append(_step_table(report.teardown, span, None, any(s.started is not None for s in report.teardown)))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def summary_line(report, path=None):
    """``haven.dr drill shop: PASSED  RTO 21.4 s (target 300 s)  RPO app 4.2 s (target 60 s)  12 steps  -> <path>``"""
    verdict = report.verdict if report.ok else "FAILED (%s)" % "; ".join(report.missed)
    target = " (target %s s)" % seconds_text(report.rto_target) if report.rto_target is not None else " (no target)"
    parts = [
        "haven.dr %s: %s" % (report.title(), verdict),
        "RTO %s%s" % ("%s s" % seconds_text(report.rto) if report.rto is not None else "not measured", target),
    ]
    rpo_target = " (target %s s)" % seconds_text(report.rpo_target) if report.rpo_target is not None else " (no target)"
    if report.rpo:
        parts.append(
            "RPO %s%s"
            % (", ".join("%s %s" % (g, "%s s" % seconds_text(e["seconds"]) if e["seconds"] is not None else "-") for g, e in report.rpo.items()), rpo_target)
        )
    elif report.rpo_target is not None:
        parts.append("RPO -%s" % rpo_target)
    parts.append("%d step%s" % (len(report.timeline), "" if len(report.timeline) == 1 else "s"))
    line = "  ".join(parts)
    return line + ("  -> %s" % path if path else "")
