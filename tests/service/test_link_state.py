"""What a group's status and its links say is true of the replica (issue 16).

Unit tests of the source's status and of the target's per-link state; the
end-to-end ones run real nodes (see nodes.py)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from havend.journal import Journal
from havend.ship.shipper import ResyncProgress
from havend.ship.source import SourceGroup
from havend.volume import FileVolume

MiB = 1 << 20


def _source_group(tmp_path: Path) -> SourceGroup:
    image = tmp_path / "v.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    journal = Journal.create(tmp_path / "journal", uuid.uuid4(), segment_size=MiB)
    return SourceGroup(uuid.uuid4(), "g", [("v", FileVolume(str(image)))], journal)


def test_status_never_reports_lag_zero_while_a_resync_runs(tmp_path: Path) -> None:
    """Every block compared, nothing sent, SYNC_DONE not back yet: the target is
    not caught up, so neither lag figure may read 0 (an RPO alert reads them)."""
    group = _source_group(tmp_path)
    try:
        assert group.status().lag_bytes == 0
        group.resync = ResyncProgress(
            "journal overflow", 4 * MiB, done_bytes=4 * MiB, started=time.monotonic() - 1
        )
        status = group.status()
        assert status.resync is not None and status.resync["running"]
        assert status.lag_bytes > 0
        assert status.lag_seconds > 0
        group.last_resync, group.resync = group.resync, None
        status = group.status()
        assert status.resync is not None and not status.resync["running"]
        assert status.lag_bytes == 0 and status.lag_seconds == 0
    finally:
        group.close()
