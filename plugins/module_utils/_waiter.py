# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""One way to wait for a node (internal use only).

``wait(fetch, ready, ...)`` polls until ``ready(obj)`` holds or the time is
up: it returns ``(ok, obj, elapsed)`` and never raises on a timeout, so the
caller decides (and keeps the partial result). ``wait_operation`` is that
for havend's long operations (``/v1/operations/{id}``), with their progress
(bytes done, total, ETA) reported as it goes.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenTimeout


def wait(fetch, ready, timeout, interval=1.0, on_poll=None, clock=time.monotonic, sleep=time.sleep, first=None):
    """Poll ``fetch()`` every ``interval`` seconds until ``ready(obj)``;
    ``on_poll(obj, elapsed)`` sees every poll. ``first``: the first pause,
    doubled at each poll up to ``interval`` (a short operation is seen ending
    at once, a long one is polled every ``interval``). (ok, last obj, seconds)."""
    started = clock()
    pause = first or interval
    while True:
        obj = fetch()
        elapsed = clock() - started
        if on_poll is not None:
            on_poll(obj, elapsed)
        if ready(obj):
            return True, obj, elapsed
        if elapsed >= timeout:
            return False, obj, elapsed
        sleep(min(pause, max(0.0, timeout - elapsed)))
        pause = min(interval, pause * 2)


def operation_done(op):
    return isinstance(op, dict) and op.get("state") != "running"


def describe_progress(progress):
    """One line of an operation's progress: bytes and ETA, or lag."""
    if not progress:
        return "running"
    if progress.get("bytes_total"):
        done, total = progress.get("bytes_done") or 0, progress["bytes_total"]
        eta = progress.get("eta_seconds")
        line = "%d of %d bytes (%.0f %%)" % (done, total, 100.0 * done / total)
        return line + (", ETA %.0f s" % eta if eta is not None else "")
    parts = []
    for key in ("lag_bytes", "lag_seconds", "changed_bytes"):
        if progress.get(key) is not None:
            parts.append("%s %s" % (key.replace("_", " "), progress[key]))
    return ", ".join(parts) or "running"


def wait_operation(client, op, timeout, interval=1.0, log=None, clock=time.monotonic, sleep=time.sleep, first=None):
    """Wait for a havend operation to end; (its record, the progress lines
    seen). A timeout raises ``HavenTimeout`` with the last record."""
    lines = []

    def seen(obj, elapsed):
        line = "%s of %s: %s after %.0f s" % (
            obj.get("kind"),
            obj.get("target"),
            describe_progress(obj.get("progress")) if obj.get("state") == "running" else obj.get("state"),
            elapsed,
        )
        if not lines or lines[-1].split(" after ")[0] != line.split(" after ")[0]:
            lines.append(line)
            if log is not None:
                log(line)

    ok, last, elapsed = wait(
        lambda: client.get("/v1/operations/%s" % op["id"]),
        operation_done,
        timeout,
        interval,
        seen,
        clock,
        sleep,
        first,
    )
    if not ok:
        raise HavenTimeout(
            "operation %s (%s of %s) still running after %.0f s" % (op["id"], op.get("kind"), op.get("group"), elapsed),
            url=client.url,
            result={"operation": last, "progress_lines": lines},
        )
    return last, lines
