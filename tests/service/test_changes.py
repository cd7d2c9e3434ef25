"""The promoted side's change map: exact after a flush, a superset after a crash."""

from __future__ import annotations

import os
from pathlib import Path

from havend.target.changes import BLOCK, EXTENT, ChangeMap

SIZES = [3 * EXTENT + 1000, EXTENT]


def test_marked_blocks_come_back_as_runs_after_a_flush(tmp_path: Path) -> None:
    changes = ChangeMap(str(tmp_path), SIZES)
    changes.mark(0, 100, 10)  # inside block 0
    changes.mark(0, BLOCK, 2 * BLOCK)  # blocks 1-2: one run with block 0
    changes.mark(0, 3 * EXTENT + 500, 500)  # the partial last block
    changes.mark(1, EXTENT - 1, 1)
    assert changes.changed_bytes() == 5 * BLOCK
    changes.close()
    again = ChangeMap(str(tmp_path), SIZES)
    assert again.ranges(0) == [(0, 3 * BLOCK), (3 * EXTENT, 1000)]
    assert again.ranges(1) == [(EXTENT - BLOCK, BLOCK)]
    assert again.changed_bytes() == 5 * BLOCK


def test_after_a_crash_whole_active_extents_count(tmp_path: Path) -> None:
    changes = ChangeMap(str(tmp_path), SIZES)
    changes.mark(0, 0, BLOCK)
    changes.flush()  # block 0 exact on disk, the activity log emptied
    changes.mark(0, EXTENT + 5 * BLOCK, BLOCK)  # logged extent 1, bitmap not written
    assert os.path.getsize(tmp_path / "changes.active") > 0
    # kill -9 here: nothing else reaches the disk
    again = ChangeMap(str(tmp_path), SIZES)
    assert again.ranges(0) == [(0, BLOCK), (EXTENT, EXTENT)]
    assert os.path.getsize(tmp_path / "changes.active") == 0  # folded in and flushed
    assert again.ranges(1) == []
