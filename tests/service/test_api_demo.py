"""``make demo-api`` keeps working: it runs to the end, exits 0 and leaves nothing
running (no process, no network namespace)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _leftovers() -> tuple[str, str]:
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    havends = "\n".join(
        line
        for line in procs.splitlines()
        if "demo-api/src1.yaml" in line or "demo-api/tgt1.yaml" in line
    )
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return havends, "\n".join(n for n in netns.splitlines() if n.startswith("hvdemo-"))


def test_the_demo_runs_to_the_end_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "api_demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("initial sync", "point-in-time export", "RPO 0", "failback", "back to normal"):
        assert step in out, out
    assert "replica == source, byte for byte" in out
    assert _leftovers() == ("", "")


def test_the_demo_cleans_up_after_ctrl_c() -> None:
    import signal
    import time

    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "api_demo.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert demo.stdout is not None
    for line in demo.stdout:  # interrupted while it writes
        if "group app" in line:
            time.sleep(1)
            demo.send_signal(signal.SIGINT)
            break
    out, _ = demo.communicate(timeout=120)
    assert demo.returncode == 130, out
    assert "interrupted: stopping everything" in out
    assert _leftovers() == ("", "")
