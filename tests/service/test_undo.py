"""The CDP undo log: checkpoint contents from saved blocks, across reopen,
retention, rollback, torn tails and damage."""

from __future__ import annotations

import fcntl
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from havend.cdp import Checkpoint, UndoLog
from havend.cdp import undo as undo_module
from havend.cdp.undo import ALIGN, BLOCK
from havend.cdp.view import PointInTimeView
from havend.errors import CheckpointError, NotFound, UndoCorruptError, VolumeError
from havend.volume import FileVolume

SIZES = [12 << 20, 100 * 1024 + 1000]  # the second ends in a partial block


class Group:
    """Replica volumes driven the way the applier drives them, with a model:
    the volumes' bytes at every checkpoint taken."""

    def __init__(self, tmp: Path, seed: int = 0) -> None:
        self.tmp = tmp
        self.paths = []
        for i, size in enumerate(SIZES):
            path = tmp / f"v{i}.img"
            path.write_bytes(bytes(size))
            self.paths.append(path)
        self.volumes = [FileVolume(str(p)) for p in self.paths]
        self.undo = UndoLog(str(tmp / "cdp"), SIZES, segment_bytes=64 * 1024)
        self.rng = random.Random(seed)
        self.seq = 0
        self.expected: dict[str, list[bytes]] = {}  # checkpoint id -> volumes' bytes

    def images(self) -> list[bytes]:
        return [p.read_bytes() for p in self.paths]

    def write(self, volume: int, offset: int, data: bytes) -> None:
        self.seq += 1
        self.undo.preserve(self.volumes, self.seq, [(volume, offset, len(data))])
        self.volumes[volume].write(offset, data)

    def random_writes(self, count: int) -> None:
        for _ in range(count):
            volume = self.rng.randrange(len(SIZES))
            size = SIZES[volume]
            length = self.rng.choice([1, 512, BLOCK, 3 * BLOCK + 17, 20_000])
            offset = self.rng.randrange(0, size - length)
            # Some zeroes: they are saved as a flag.
            data = bytes(length) if self.rng.random() < 0.1 else self.rng.randbytes(length)
            self.write(volume, offset, data)

    def checkpoint(self, label: str = "") -> Checkpoint:
        self.seq += 1
        cp = Checkpoint.new(label)
        cp = Checkpoint(cp.id, self.seq, cp.time, cp.label, cp.consistency)
        assert self.undo.add_checkpoint(cp)
        self.expected[cp.id] = self.images()
        return cp

    def check_all(self) -> int:
        checked = 0
        for cp in self.undo.checkpoints:
            for volume, size in enumerate(SIZES):
                got = self.undo.read(self.volumes, volume, cp.seq, 0, size)
                assert got == self.expected[cp.id][volume], f"checkpoint {cp.label} volume {volume}"
                # and unaligned pieces
                offset = self.rng.randrange(size - 1)
                length = self.rng.randrange(1, size - offset + 1)
                part = self.undo.read(self.volumes, volume, cp.seq, offset, length)
                assert part == self.expected[cp.id][volume][offset : offset + length]
            checked += 1
        return checked

    def reopen(self) -> None:
        self.undo.close()
        self.undo = UndoLog(str(self.tmp / "cdp"), SIZES, segment_bytes=64 * 1024)


@pytest.fixture
def group(tmp_path: Path) -> Group:
    return Group(tmp_path)


def test_every_checkpoint_reads_back_as_it_was(group: Group) -> None:
    group.random_writes(20)  # before any checkpoint: nothing is saved
    assert group.undo.used_bytes == 0
    for i in range(12):
        group.checkpoint(f"c{i}")
        group.random_writes(group.rng.randrange(0, 25))
    assert group.check_all() == 12
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == [f"c{i}" for i in range(12)]
    assert group.check_all() == 12
    # A redo after a crash (the same writes again) saves nothing twice.
    before = group.undo.used_bytes
    group.seq -= 1
    group.write(0, 0, b"again")
    assert group.undo.used_bytes == before or group.check_all() == 12


def test_a_block_is_saved_once_per_epoch(group: Group) -> None:
    group.checkpoint()
    group.write(0, 0, b"a" * BLOCK)
    used = group.undo.used_bytes
    for _ in range(5):
        group.write(0, 0, b"b" * BLOCK)  # the same block again in the same epoch
    assert group.undo.used_bytes == used
    group.checkpoint()
    group.write(0, 0, b"c" * BLOCK)
    assert group.undo.used_bytes > used
    assert group.check_all() == 2


def test_retention_keeps_the_newest_and_reclaims_files(group: Group) -> None:
    for i in range(40):
        group.checkpoint(f"c{i}")
        group.random_writes(8)
    used = group.undo.used_bytes
    dropped = group.undo.expire(retain=10)
    assert [c.label for c in dropped] == [f"c{i}" for i in range(30)]
    assert [c.label for c in group.undo.checkpoints] == [f"c{i}" for i in range(30, 40)]
    assert group.undo.used_bytes < used  # whole files of old epochs deleted
    assert group.check_all() == 10
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == [f"c{i}" for i in range(30, 40)]
    assert group.check_all() == 10
    with pytest.raises(CheckpointError, match="no checkpoint"):
        group.undo.get(dropped[0].id)


def test_retention_by_age_and_never_under_an_open_view(group: Group) -> None:
    old = [group.checkpoint(f"old{i}") for i in range(3)]
    group.random_writes(10)
    view = PointInTimeView(group.undo, group.volumes, 0, old[1])
    try:
        dropped = group.undo.expire(retain=1, max_age=60, now=old[-1].time + 3600)
        assert [c.label for c in dropped] == ["old0"]  # old1 is pinned by the view
        assert view.read(0, SIZES[0]) == group.expected[old[1].id][0]
    finally:
        view.close()
    assert [c.label for c in group.undo.expire(retain=1)] == ["old1"]


def test_rollback_makes_a_checkpoint_the_latest(group: Group) -> None:
    cps = []
    for i in range(6):
        cps.append(group.checkpoint(f"c{i}"))
        group.random_writes(15)
    _, rewritten = group.undo.rollback(group.volumes, cps[2].id)
    assert rewritten > 0
    assert group.images() == group.expected[cps[2].id]
    assert [c.label for c in group.undo.checkpoints] == ["c0", "c1", "c2"]
    assert group.check_all() == 3
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == ["c0", "c1", "c2"]
    assert group.check_all() == 3
    group.seq += 100  # later writes go on in new epochs
    group.random_writes(10)
    group.checkpoint("after")
    group.random_writes(10)
    assert group.check_all() == 4


def test_rollback_refused_while_views_are_open(group: Group) -> None:
    cp = group.checkpoint()
    group.random_writes(5)
    view = PointInTimeView(group.undo, group.volumes, 0, cp)
    with pytest.raises(CheckpointError, match="close the 1 open views"):
        group.undo.rollback(group.volumes, cp.id)
    view.close()


def test_an_interrupted_rollback_is_finished_at_open(group: Group) -> None:
    cps = [group.checkpoint("c0")]
    group.random_writes(30)
    cps.append(group.checkpoint("c1"))
    group.random_writes(30)
    # As if havend died after writing some of the old blocks back.
    group.undo._write_state(rolling_back_to=cps[0].seq)
    for key in list(group.undo._index)[:5]:
        volume, block = key >> 48, key & 0xFFFF_FFFF_FFFF
        old = group.expected[cps[0].id][volume][block * BLOCK : (block + 1) * BLOCK]
        group.volumes[volume].write(block * BLOCK, old)
    group.reopen()
    assert group.undo.finish_rollback(group.volumes) == cps[0].seq
    assert group.images() == group.expected[cps[0].id]
    assert [c.label for c in group.undo.checkpoints] == ["c0"]


def test_a_torn_tail_is_cut(group: Group) -> None:
    group.checkpoint()
    group.random_writes(10)
    good = group.undo.used_bytes
    active = group.undo._active.path
    with open(active, "ab") as f:
        f.write(b"HUL1" + os.urandom(100))  # an entry that never finished
    group.reopen()
    assert group.undo.used_bytes == good
    assert group.check_all() == 1


def test_damage_drops_only_the_checkpoints_recorded_before_it(group: Group) -> None:
    for i in range(6):
        group.checkpoint(f"c{i}")
        group.random_writes(20)
    files = sorted((group.tmp / "cdp").glob("undo-*.log"))
    assert len(files) >= 4
    victim = files[1]
    with open(victim, "r+b") as f:
        f.seek(2)
        f.write(b"XX")  # the first entry's magic
    group.reopen()
    assert "damaged" in group.undo.damaged and str(victim) in group.undo.damaged
    kept = [c.label for c in group.undo.checkpoints]
    assert kept and kept == [f"c{i}" for i in range(6 - len(kept), 6)]
    assert group.check_all() == len(kept)


def test_a_damaged_saved_block_is_an_error_never_wrong_data(group: Group) -> None:
    group.write(0, 0, b"o" * BLOCK)
    cp = group.checkpoint()
    group.write(0, 0, b"n" * BLOCK)
    ((_, (_, segment, where, _, _)),) = [
        (k, v[0]) for k, v in group.undo._index.items() if v[0][2] >= 0
    ]
    path = group.undo._segments[segment].path
    with open(path, "r+b") as f:
        f.seek(where + 10)
        f.write(b"!")
    with pytest.raises(UndoCorruptError, match="fails its CRC"):
        group.undo.read(group.volumes, 0, cp.seq, 0, BLOCK)


def test_a_writable_view_keeps_its_writes_to_itself(group: Group) -> None:
    cp = group.checkpoint()
    group.random_writes(10)
    scratch = group.tmp / "scratch.img"
    view = PointInTimeView(group.undo, group.volumes, 1, cp, scratch=str(scratch))
    expected = bytearray(group.expected[cp.id][1])
    replica = group.paths[1].read_bytes()
    view.write(100, b"x" * 5000)  # partial blocks at both ends
    expected[100:5100] = b"x" * 5000
    view.write_zeroes(SIZES[1] - 3000, 3000)
    expected[SIZES[1] - 3000 :] = bytes(3000)
    group.random_writes(10)  # replication goes on under the view
    assert view.read(0, SIZES[1]) == expected
    assert group.paths[1].read_bytes() != expected
    view.close()
    assert not scratch.exists()
    del replica
    ro = PointInTimeView(group.undo, group.volumes, 1, cp)
    with pytest.raises(VolumeError, match="read-only"):
        ro.write(0, b"x")
    ro.close()


def test_one_write_over_thousands_of_blocks(group: Group) -> None:
    """A 10 MiB write saves 2,560 blocks: more than one entry, more pieces than
    one pwritev may take."""
    group.write(0, 0, group.rng.randbytes(10 << 20))
    cp = group.checkpoint()
    group.write(0, 4096, group.rng.randbytes(10 << 20))
    assert group.undo.saved_blocks == 2560
    assert group.check_all() == 1
    group.reopen()
    assert group.check_all() == 1
    assert cp.id == group.undo.checkpoints[0].id


def test_zero_blocks_inside_a_run_are_flags_and_a_short_last_block_is_kept(group: Group) -> None:
    """One write over blocks that alternate between data and zeroes, up to the
    partial block at a volume's end: only the data is written to the log, and
    every block (the zero ones and the short one too) reads back as it was."""
    size = SIZES[1]
    blocks = -(-size // BLOCK)
    old = bytearray(size)
    for block in range(blocks):
        if block % 3:  # two blocks of data, then one of zeroes
            old[block * BLOCK : (block + 1) * BLOCK] = group.rng.randbytes(BLOCK)[
                : len(old[block * BLOCK : (block + 1) * BLOCK])
            ]
    group.volumes[1].write(0, bytes(old))
    cp = group.checkpoint()
    used = group.undo.used_bytes
    group.write(1, 0, group.rng.randbytes(size))
    data_blocks = sum(1 for block in range(blocks) if block % 3)
    assert group.undo.saved_blocks == blocks
    last_len = size - (blocks - 1) * BLOCK
    saved = (data_blocks - 1) * BLOCK + last_len if (blocks - 1) % 3 else data_blocks * BLOCK
    assert group.undo.used_bytes - used >= saved  # data and its table, no zero block
    # (and the padding that aligns entries for O_DIRECT)
    assert group.undo.used_bytes - used < saved + (blocks + 2) * 64 + 2 * ALIGN
    assert group.undo.read(group.volumes, 1, cp.seq, 0, size) == bytes(old)
    group.reopen()
    assert group.check_all() == 1


def test_a_failed_entry_write_saves_nothing_and_a_retry_saves_it_all(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries of one preserve are written by a helper thread while the next is
    read: when one of them cannot be written (a full disk), the call fails,
    nothing is indexed, and the same preserve later keeps every block."""
    group.volumes[0].write(0, group.rng.randbytes(10 << 20))
    old = group.images()[0]
    cp = group.checkpoint()
    real = {"pwritev": os.pwritev, "pwrite": os.pwrite}  # through the page cache, or direct
    calls = 0

    def full_disk(name: str) -> Callable[..., int]:
        def write(fd: int, data: Any, offset: int) -> int:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OSError(28, "No space left on device")
            return real[name](fd, data, offset)

        return write

    for name in real:
        monkeypatch.setattr(os, name, full_disk(name))
    change = [(0, 0, 10 << 20)]  # 2,560 blocks: two entries
    with pytest.raises(OSError, match="No space"):
        group.undo.preserve(group.volumes, group.seq + 1, change)
    assert group.undo.saved_blocks == 0
    for name, call in real.items():
        monkeypatch.setattr(os, name, call)
    group.undo.preserve(group.volumes, group.seq + 1, change)
    assert group.undo.saved_blocks == 2560
    group.volumes[0].write(0, group.rng.randbytes(10 << 20))
    assert group.undo.read(group.volumes, 0, cp.seq, 0, 10 << 20) == old[: 10 << 20]
    group.reopen()
    assert group.check_all() == 1


def test_entries_written_before_they_were_aligned_are_read_and_appends_go_to_a_new_file(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An undo log from before entries were aligned for O_DIRECT (packed one
    after the other) keeps every checkpoint; new entries start a new file."""
    monkeypatch.setattr(undo_module, "ENTRY_ALIGNED", 0)
    monkeypatch.setattr(undo_module, "_aligned", lambda n: n)
    group.undo.direct = False
    group.random_writes(5)
    for i in range(3):
        group.checkpoint(f"old{i}")
        group.random_writes(8)
    assert group.undo.used_bytes % ALIGN  # packed
    monkeypatch.undo()
    group.reopen()
    assert group.check_all() == 3
    assert group.undo._active.size == 0  # a new file: appends start aligned
    group.checkpoint("new")
    group.random_writes(8)
    assert group.undo.direct and group.undo._active.size % ALIGN == 0
    group.reopen()
    assert group.check_all() == 4


@pytest.mark.parametrize("where", ["open", "write"])
def test_without_o_direct_entries_go_through_the_page_cache(
    group: Group, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A file system that refuses O_DIRECT (tmpfs) at open, or at the first
    write: the same entries are written through the page cache."""
    real_open, real_pwrite = os.open, os.pwrite

    def no_direct_open(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def no_direct_pwrite(fd: int, data: Any, offset: int) -> int:
        if os.get_blocking(fd) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    if where == "open":
        monkeypatch.setattr(os, "open", no_direct_open)
    else:
        monkeypatch.setattr(os, "pwrite", no_direct_pwrite)
    for i in range(4):
        group.checkpoint(f"c{i}")
        group.random_writes(10)
    assert not group.undo.direct
    assert group.check_all() == 4
    group.reopen()
    assert group.check_all() == 4


# Deleting one checkpoint (forget) ---------------------------------------------


def _state(group: Group) -> dict[str, Any]:
    return json.loads((group.tmp / "cdp" / "state.json").read_text())


def _view_reads(group: Group, cp: Checkpoint) -> None:
    for volume, size in enumerate(SIZES):
        view = PointInTimeView(group.undo, group.volumes, volume, cp)
        try:
            assert view.read(0, size) == group.expected[cp.id][volume], cp.label
        finally:
            view.close()


def test_forgetting_a_middle_checkpoint_keeps_the_others_exact(group: Group) -> None:
    cps = []
    for i in range(6):
        cps.append(group.checkpoint(f"c{i}"))
        group.random_writes(20)
    used = group.undo.used_bytes
    assert group.undo.forget(cps[2].id) == cps[2]
    assert group.undo.used_bytes == used  # c1 still reads what c2's epoch saved
    assert [c.label for c in group.undo.checkpoints] == ["c0", "c1", "c3", "c4", "c5"]
    assert group.check_all() == 5
    _view_reads(group, cps[1])  # the older one and the newer one, byte-exact
    _view_reads(group, cps[3])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        group.undo.get(cps[2].id)
    # The newest forgotten too: later writes belong to c4's epoch.
    group.undo.forget(cps[5].id)
    group.random_writes(20)
    assert group.check_all() == 4
    group.checkpoint("c6")
    group.random_writes(20)
    assert group.check_all() == 5
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == ["c0", "c1", "c3", "c4", "c6"]
    assert group.check_all() == 5
    # Rolled back to the older one, then to c0: exact, and c1's forgotten
    # neighbours are no longer recorded once below or past the timeline.
    _, rewritten = group.undo.rollback(group.volumes, cps[1].id)
    assert rewritten > 0 and group.images() == group.expected[cps[1].id]
    assert [c.label for c in group.undo.checkpoints] == ["c0", "c1"]
    assert "forgotten" not in _state(group)  # c2 and c5 were after c1
    assert group.check_all() == 2


def test_forgetting_the_oldest_frees_its_files(group: Group) -> None:
    cps = [group.checkpoint("c0")]
    group.random_writes(60)  # several 64 KiB files of c0's epoch alone
    cps.append(group.checkpoint("c1"))
    group.random_writes(60)
    cps.append(group.checkpoint("c2"))
    group.random_writes(20)
    used = group.undo.used_bytes
    group.undo.forget(cps[1].id)  # a middle one: nothing freed
    assert group.undo.used_bytes == used
    assert _state(group)["forgotten"] == {cps[1].id: cps[1].seq}
    group.undo.forget(cps[0].id)  # the oldest: c0's and c1's epochs are no longer read
    assert group.undo.used_bytes < used
    assert [c.label for c in group.undo.checkpoints] == ["c2"]
    state = _state(group)
    assert state["oldest_seq"] == cps[2].seq and "forgotten" not in state  # pruned
    assert group.check_all() == 1
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == ["c2"]
    assert group.check_all() == 1
    group.undo.forget(cps[2].id)  # the last one
    assert group.undo.checkpoints == []
    group.random_writes(10)  # nothing to save for
    group.checkpoint("c3")
    group.random_writes(10)
    assert group.check_all() == 1


def test_a_forgotten_checkpoint_stays_forgotten(group: Group) -> None:
    cps = [group.checkpoint(f"c{i}") for i in range(3)]
    group.random_writes(10)
    group.undo.forget(cps[1].id)
    group.undo.forget(cps[2].id)
    group.reopen()
    assert [c.label for c in group.undo.checkpoints] == ["c0"]
    # The applier meeting its record again (a redo after a crash) keeps it deleted.
    assert not group.undo.add_checkpoint(cps[2])
    assert [c.label for c in group.undo.checkpoints] == ["c0"]
    assert group.check_all() == 1
    # Retention past them prunes the record.
    group.checkpoint("c3")
    group.undo.expire(retain=1)
    assert "forgotten" not in _state(group)
    assert [c.label for c in group.undo.checkpoints] == ["c3"]


def test_forgetting_is_refused_under_an_open_view_and_for_an_unknown_one(group: Group) -> None:
    cps = [group.checkpoint(f"c{i}") for i in range(2)]
    group.random_writes(10)
    view = PointInTimeView(group.undo, group.volumes, 0, cps[0])
    try:
        with pytest.raises(CheckpointError, match="1 open views"):
            group.undo.forget(cps[0].id)
    finally:
        view.close()
    with pytest.raises(NotFound):
        group.undo.forget("f" * 32)
    group.undo.forget(cps[0].id)
    with pytest.raises(NotFound):
        group.undo.forget(cps[0].id)
    assert group.check_all() == 1
