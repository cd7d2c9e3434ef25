# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
# ruff: noqa: UP031 - %-formatting, like the collection's modules that run on managed hosts
"""haven.dr protected_server, in_guest: wait for md's copy of the NBD legs.

Run by the role on the protected server (``ansible.builtin.script``). The
argument is base64 of JSON ``{"arrays": {NAME: "/dev/md/NAME"}, "legs": {NAME:
"/dev/nbdN"}, "timeout": S, "interval": S}``. Until every array has its NBD
leg in sync (``sync_action`` idle, not degraded, the leg ``in_sync``), or the
timeout, it reads ``/sys/block/mdX/md/sync_completed`` and keeps a progress
line each time it moved by 5 % or more (a long copy gives 20 lines, not one a
poll). Prints JSON ``{"done", "elapsed", "progress_lines",
"pending"}``; never fails itself (the role does, with the lines).
"""

import base64
import json
import os
import sys
import time


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def state(name, md_path, leg):
    md = os.path.basename(os.path.realpath(md_path))
    base = "/sys/block/%s/md" % md
    if not os.path.isdir(base):
        return False, "%s: %s is not running" % (name, md_path), None
    action = read(base + "/sync_action")
    leg_state = read("%s/dev-%s/state" % (base, os.path.basename(leg)))
    degraded = read(base + "/degraded")
    if action == "idle" and degraded == "0" and "in_sync" in leg_state.split(","):
        return True, "%s: %s in sync" % (name, leg), None
    done = read(base + "/sync_completed")  # "done / total" in sectors, or "none"
    if "/" in done:
        a, b = (int(x) for x in done.split("/"))
        percent = 100.0 * a / b if b else 0.0
        line = "%s: %s %s %d of %d bytes (%.0f %%)" % (name, action, leg, a * 512, b * 512, percent)
        return False, line, "%s %s %d" % (name, action, percent // 5)
    line = "%s: %s %s (leg %s, degraded %s)" % (name, action, leg, leg_state or "absent", degraded)
    return False, line, line


def main():
    args = json.loads(base64.b64decode(sys.argv[1]).decode())
    started = time.monotonic()
    lines = []
    last = "start"
    while True:
        elapsed = time.monotonic() - started
        seen = [state(n, md, args["legs"][n]) for n, md in sorted(args["arrays"].items())]
        pending = [line for ok, line, _key in seen if not ok]
        summary = "; ".join(pending) if pending else "every NBD leg in sync"
        key = [k for ok, _line, k in seen if not ok]
        if key != last:
            lines.append("%s after %.0f s" % (summary, elapsed))
            last = key
        if not pending or elapsed >= args["timeout"]:
            break
        time.sleep(min(args.get("interval", 5), max(0.0, args["timeout"] - elapsed)) or 0.1)
    print(
        json.dumps(
            {
                "done": not pending,
                "elapsed": round(elapsed, 1),
                "progress_lines": lines,
                "pending": pending,
            }
        )
    )


if __name__ == "__main__":
    main()
