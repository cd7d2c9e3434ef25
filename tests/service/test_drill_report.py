"""haven.dr.drill_report in a real ``ansible-playbook`` run: a stand-in module
(``library/haven_report_standin.py``, for the drill, failover and failback
modules) returns the ``haven_report`` it is given, in a plain task, a failed
one and a loop; the callback's files are read back (JSON, JUnit XML) and its
HTML page is rendered by headless Chromium (the DOM it built, a screenshot)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import yaml
from conftest import require_tool
from plays import ROOT, ansible, ansible_env

STARTED = 1767225600.5  # 2026-01-01T00:00:00.5Z
STEM = "shop-drill-20260101T000000Z"
WIDTH, HEIGHT = 1200, 2000
PASSED_GREEN = (0x1D, 0x7F, 0x3A)  # the verdict badge's colours in the page's CSS
FAILED_RED = (0xB3, 0x26, 0x1E)

STANDIN = """#!/usr/bin/python
# Stands in for haven.dr.drill, failover and failback: returns the report it is given.
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec={"report": {"type": "raw", "required": True}, "fail": {"type": "bool"}}
    )
    report = module.params["report"]
    if module.params["fail"]:
        module.fail_json(msg="the %s failed" % report["kind"], haven_report=report)
    module.exit_json(changed=True, passed=report["passed"], haven_report=report)


if __name__ == "__main__":
    main()
"""


def step(
    name: str, group: str | None, server: str | None, started: float, ended: float, **kw: Any
) -> dict[str, Any]:
    return {
        "step": name,
        "group": group,
        "server": server,
        "started": started,
        "ended": ended,
        "seconds": round(ended - started, 3),
        "outcome": kw.get("outcome", "ok"),
        "output": kw.get("output", ""),
    }


DRILL: dict[str, Any] = {
    "kind": "drill",
    "mode": None,
    "plan": "shop",
    "passed": True,
    "started": STARTED,
    "ended": STARTED + 49.6,
    "seconds": 49.6,
    "rto_seconds": 21.4,
    "rto_target_seconds": 300,
    "rpo": {
        "app": {"seconds": 4.2, "writes": 0, "checkpoint": "a1b2c3d4e5f6"},
        "db": {"seconds": 1.5, "writes": 3, "checkpoint": "0f1e2d3c4b5a"},
    },
    "rpo_target_seconds": 60,
    "timeline": [
        step(
            "export",
            None,
            None,
            0.01,
            0.2,
            output="app/db@a1b2c3d4e5f6.1 <script>alert(1)</script>",
        ),
        step("network", None, None, 0.2, 0.3),
        step("pre", "db", None, 0.3, 0.4, output="dr-announce start"),
        step("create", "db", "db1", 0.4, 0.6),
        step("power_on", "db", "db1", 0.6, 1.0),
        step("health_check", "db", "db1", 1.0, 9.5, output="tcp 10.99.0.11:5432 accepted"),
        step("create", "app", "app1", 9.6, 9.8),
        step("power_on", "app", "app1", 9.8, 10.2),
        step("delay", "app", "app1", 10.2, 12.2),
        step("health_check", "app", "app1", 12.2, 21.4, output="http 200 Ünïcode ✓"),
    ],
    "teardown": [
        {"step": "stop", "group": "app", "server": "app1", "seconds": 0.4, "outcome": "ok"},
        {"step": "destroy", "group": "db", "server": "db1", "seconds": 0.3, "outcome": "ok"},
    ],
    "failure": None,
    "servers": [
        {"name": "db1", "group": "db", "protection_group": "db"},
        {"name": "app1", "group": "app", "protection_group": "app"},
    ],
    "bytes": None,
}
FAILOVER: dict[str, Any] = {
    "kind": "failover",
    "mode": "unplanned",
    "plan": "shop",
    "passed": False,
    "started": STARTED + 100,
    "rto_seconds": None,
    "rto_target_seconds": 300,
    "timeline": [
        step("promote", "db", None, 0.0, 1.2),
        step("power_on", "db", "db1", 1.2, 1.5),
        step(
            "health_check",
            "db",
            "db1",
            1.5,
            26.5,
            outcome="timeout",
            output="tcp 10.20.0.11:5432 did not pass within its 25 s",
        ),
    ],
    "failure": {
        "group": "db",
        "server": "db1",
        "step": "health_check",
        "check": "tcp 10.20.0.11:5432",
        "output": "tcp 10.20.0.11:5432 did not pass within its 25 s",
    },
}
FAILBACKS = [
    {
        "kind": "failback",
        "plan": f"site-{n}",
        "passed": True,
        "started": STARTED + 200,
        "seconds": 3,
    }
    for n in (1, 2)
]


def run_play(tmp: Path) -> subprocess.CompletedProcess[str]:
    collections = tmp / "collections" / "ansible_collections" / "haven"
    collections.mkdir(parents=True)
    (collections / "dr").symlink_to(ROOT)
    (tmp / "library").mkdir()
    (tmp / "library" / "haven_report_standin.py").write_text(STANDIN)
    tasks = [
        {"name": "drill shop", "haven_report_standin": {"report": DRILL}},
        {
            "name": "failover shop",
            "haven_report_standin": {"report": FAILOVER, "fail": True},
            "ignore_errors": True,
        },
        {
            "name": "failbacks",
            "haven_report_standin": {"report": "{{ item }}"},
            "loop": FAILBACKS,
        },
    ]
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": tasks}]
    (tmp / "play.yml").write_text(yaml.safe_dump(play, allow_unicode=True))
    env = ansible_env(tmp, HAVEN_DRILL_REPORT_DIR=str(tmp / "drill-reports"))
    env |= {
        "ANSIBLE_CALLBACKS_ENABLED": "haven.dr.drill_report",
        "ANSIBLE_LIBRARY": str(tmp / "library"),
    }
    done = ansible(
        tmp,
        "ansible-playbook",
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        "play.yml",
        env=env,
        timeout=240,
    )
    (tmp / "play.log").write_text(done.stdout + done.stderr)
    return done


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium with a profile of its own (runs side by side do not share one)."""
    browser = require_tool("chromium")
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )


def png_pixels(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """Width, height and the distinct RGB colours of an 8-bit RGB(A) PNG, decoded here."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, chunks, idat = 8, {}, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = body
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + guess) & 0xFF
        colours.update(tuple(line[i : i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colours


def render(tmp: Path, page: Path) -> tuple[str, set[tuple[int, ...]]]:
    """The DOM Chromium built from ``page`` and the colours of its screenshot."""
    dom = chromium(tmp, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-3000:]
    shot = tmp / (page.stem + ".png")
    done = chromium(tmp, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr.decode(errors="replace")[-3000:]
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) > 20, len(colours)  # text, tables and bars, not one colour
    return dom.stdout.decode(), colours


def test_a_play_writes_each_report_and_chromium_renders_its_page(tmp_path: Path) -> None:
    done = run_play(tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("haven.dr ")]
    assert lines == [
        "haven.dr drill shop: PASSED  RTO 21.4 s (target 300 s)  RPO app 4.2 s, db 1.5 s "
        f"(target 60 s)  10 steps  -> drill-reports/{STEM}.html",
        "haven.dr failover (unplanned) shop: FAILED (the failover failed at db1 "
        "tcp 10.20.0.11:5432; RTO not measured (target 300 s))  RTO not measured (target 300 s)  "
        "3 steps  -> drill-reports/shop-failover-20260101T000140Z.html",
        "haven.dr failback site-1: PASSED  RTO not measured (no target)  0 steps  "
        "-> drill-reports/site-1-failback-20260101T000320Z.html",
        "haven.dr failback site-2: PASSED  RTO not measured (no target)  0 steps  "
        "-> drill-reports/site-2-failback-20260101T000320Z.html",
    ], done.stdout[-4000:]
    reports = tmp_path / "drill-reports"
    assert len(list(reports.iterdir())) == 12

    data = json.loads((reports / f"{STEM}.json").read_text())
    assert data["report"] == DRILL  # round-trips through the module, ansible and the file
    assert data["verdict"]["passed"] is True and data["task"] == "drill shop"
    failed = json.loads((reports / "shop-failover-20260101T000140Z.json").read_text())
    assert failed["report"] == FAILOVER and failed["verdict"]["passed"] is False

    suite = ET.parse(reports / f"{STEM}.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    cases = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert ("shop.db.db1", "health_check") in cases and ("shop.app.app1", "delay") in cases
    assert cases[-3:] == [("shop", "rto target"), ("shop", "rpo target"), ("shop", "drill")]
    suite = ET.parse(reports / "shop-failover-20260101T000140Z.xml").getroot().find("testsuite")
    assert suite is not None
    failure = suite.find("testcase[@name='health_check']/failure")
    assert failure is not None and failure.get("type") == "timeout"

    dom, colours = render(tmp_path, reports / f"{STEM}.html")
    for entry in DRILL["timeline"]:
        assert f">{entry['step']}<" in dom, entry
        assert entry["server"] is None or f">{entry['server']}<" in dom, entry
    assert "21.4 s" in dom and "300 s" in dom and ">PASSED<" in dom and ">FAILED<" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom
    assert "Ünïcode ✓" in dom
    assert PASSED_GREEN in colours

    dom, colours = render(tmp_path, reports / "shop-failover-20260101T000140Z.html")
    assert ">FAILED<" in dom and "tcp 10.20.0.11:5432" in dom and "not measured" in dom
    for entry in FAILOVER["timeline"]:
        assert f">{entry['step']}<" in dom, entry
    assert FAILED_RED in colours
