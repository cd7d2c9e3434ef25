"""The group journal: appends, group commit, segments, release, and crash recovery."""

from __future__ import annotations

import os
import random
import threading
import uuid
from pathlib import Path

import pytest

from havend.errors import JournalCorruptError, JournalError
from havend.journal import Journal, JournalFull, Kind
from havend.journal.record import RECORD_HEADER, SEGMENT_HEADER_SIZE, record_size
from havend.journal.superblock import SLOT_SIZE

SEG = 64 * 1024
GROUP = uuid.UUID("00000000-0000-4000-8000-000000000001")


def payload(seq: int, size: int = 1000) -> bytes:
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def new_journal(path: Path, **kw: int) -> Journal:
    return Journal.create(
        path,
        GROUP,
        segment_size=kw.get("segment_size", SEG),
        max_segments=kw.get("max_segments", 8),
    )


def fill(journal: Journal, count: int, size: int = 1000, sync: bool = True) -> list[int]:
    seqs = [
        journal.append(Kind.WRITE, seq % 3, seq * 4096, payload(seq, size))
        for seq in range(journal.last_seq + 1, journal.last_seq + 1 + count)
    ]
    if sync:
        journal.sync()
    return seqs


def all_records(journal: Journal, after: int = 0) -> list:
    out = []
    while batch := journal.read(after, max_bytes=16 * 1024):
        out += batch
        after = batch[-1].seq
    return out


def test_append_sync_read(tmp_path: Path) -> None:
    with new_journal(tmp_path) as journal:
        assert journal.append(Kind.WRITE, 0, 4096, b"a" * 4096) == 1
        assert journal.append(Kind.ZERO, 1, 0, length=1 << 20) == 2
        assert journal.append(Kind.TRIM, 1, 8192, length=4096) == 3
        assert journal.read(0) == []  # nothing durable yet: nothing to ship
        assert journal.sync() == 3
        first, zero, trim = journal.read(0)
        assert (first.seq, first.kind, first.volume, first.offset, first.data) == (
            1,
            Kind.WRITE,
            0,
            4096,
            b"a" * 4096,
        )
        assert (zero.kind, zero.length, zero.data) == (Kind.ZERO, 1 << 20, b"")
        assert (trim.kind, trim.offset, trim.length) == (Kind.TRIM, 8192, 4096)
        assert [r.seq for r in journal.read(1)] == [2, 3]
        assert first.durable == 0 and trim.durable == 0


def test_reopen_continues_the_sequence(tmp_path: Path) -> None:
    with new_journal(tmp_path) as journal:
        fill(journal, 10)
    with Journal.open(tmp_path) as journal:
        assert journal.last_seq == journal.durable_seq == 10
        assert journal.group == GROUP
        assert journal.append(Kind.WRITE, 0, 0, b"x" * 8) == 11
        journal.sync()
        assert [r.seq for r in all_records(journal)] == list(range(1, 12))


def test_segments_roll_and_read_across_them_after_a_crash(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    fill(journal, 300)  # ~300 KB over 64 KiB segments
    assert len(os.listdir(tmp_path)) > 4
    # no close(): a crash. The head hint points at the last segment started.
    reopened = Journal.open(tmp_path)
    assert reopened.last_seq == 300
    records = all_records(reopened)
    assert [r.seq for r in records] == list(range(1, 301))
    assert all(r.data == payload(r.seq) for r in records)


def test_full_journal_refuses_then_release_makes_room(tmp_path: Path) -> None:
    journal = new_journal(tmp_path, max_segments=3)
    with pytest.raises(JournalFull, match="is full"):
        fill(journal, 1000)
    last = journal.last_seq
    journal.sync()
    freed = journal.release_through(100)
    assert freed >= SEG
    assert journal.tail_seq <= 101
    fill(journal, 20)
    with pytest.raises(JournalError, match="was released"):
        journal.read(0)
    journal.close()
    with Journal.open(tmp_path) as again:
        assert again.tail_seq == journal.tail_seq
        assert again.last_seq == last + 20
        assert [r.seq for r in all_records(again, again.tail_seq - 1)] == list(
            range(again.tail_seq, last + 21)
        )


def test_release_never_drops_unacknowledged_records(tmp_path: Path) -> None:
    with new_journal(tmp_path) as journal:
        fill(journal, 200)
        journal.release_through(0)
        assert journal.read(0)[0].seq == 1
        journal.release_through(journal.last_seq)  # the active segment stays
        assert journal.read(journal.tail_seq - 1)[0].seq == journal.tail_seq


def record_offsets(path: Path, count: int, size: int = 1000) -> list[int]:
    """Offsets of the first ``count`` records in a single-segment journal."""
    return [SEGMENT_HEADER_SIZE + i * record_size(size) for i in range(count)]


def segment0(path: Path) -> Path:
    return path / f"seg-{0:016x}.log"


def garble(path: Path, offset: int, length: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_torn_tail_is_cut_and_appends_resume(tmp_path: Path) -> None:
    journal = Journal.create(tmp_path, GROUP, segment_size=1 << 20)
    fill(journal, 10)
    fill(journal, 5, sync=False)  # never synced: never acknowledged
    garble(segment0(tmp_path), record_offsets(tmp_path, 14)[13] + RECORD_HEADER.size + 10)
    again = Journal.open(tmp_path)  # crash, restart
    assert again.last_seq == 13
    assert again.recovered.torn_bytes > 0
    assert again.append(Kind.WRITE, 0, 0, payload(14)) == 14
    again.sync()
    assert [r.seq for r in all_records(again)] == list(range(1, 15))
    assert all_records(again)[-1].data == payload(14)


def test_out_of_order_writeback_is_a_torn_tail_not_corruption(tmp_path: Path) -> None:
    journal = Journal.create(tmp_path, GROUP, segment_size=1 << 20)
    fill(journal, 10)
    fill(journal, 10, sync=False)  # 11..20 carry durable=10
    garble(segment0(tmp_path), record_offsets(tmp_path, 13)[12] + 4)  # seq 13 lost, 14+ fine
    again = Journal.open(tmp_path)
    assert again.last_seq == 12
    assert [r.seq for r in all_records(again)] == list(range(1, 13))


def test_damaged_acknowledged_record_is_corruption_on_recovery(tmp_path: Path) -> None:
    journal = Journal.create(tmp_path, GROUP, segment_size=1 << 20)
    fill(journal, 10)
    fill(journal, 10)  # 11..20 durable, 21.. below prove it
    fill(journal, 3)
    garble(segment0(tmp_path), record_offsets(tmp_path, 15)[14] + RECORD_HEADER.size + 1)
    with pytest.raises(JournalCorruptError, match=r"record seq 15 is damaged.*resync"):
        Journal.open(tmp_path)


def test_damage_behind_the_head_hint_is_caught_when_read(tmp_path: Path) -> None:
    with Journal.create(tmp_path, GROUP, segment_size=1 << 20) as journal:
        fill(journal, 20)
    garble(segment0(tmp_path), record_offsets(tmp_path, 8)[7] + RECORD_HEADER.size + 100)
    with Journal.open(tmp_path) as again:  # close() left the head hint at the end
        assert [r.seq for r in again.read(0, max_bytes=6 * 1024)] == list(range(1, 7))
        with pytest.raises(JournalCorruptError, match="record seq 8 is damaged"):
            again.read(6)


def test_a_whole_record_out_of_sequence_is_refused_when_read(tmp_path: Path) -> None:
    """A record can be whole (its CRC right) and still not belong where it is:
    a block the disk wrote to the wrong place, a stale copy of a segment, a
    record duplicated. read() checks that each seq is the previous one plus
    one and refuses the record otherwise (JournalCorruptError, nothing of it
    returned): without that, seq 9 read where seq 8 belongs would be returned
    as the next record, seq 8 would be lost without a word, seq 9 returned
    twice, and the shipper would send the target a history that never was."""
    with Journal.create(tmp_path, GROUP, segment_size=1 << 20) as journal:
        fill(journal, 20)
    seg = segment0(tmp_path)
    offsets = record_offsets(tmp_path, 9)
    ninth = seg.read_bytes()[offsets[8] : offsets[8] + record_size(1000)]
    with open(seg, "r+b") as f:  # seq 9's record, whole, where seq 8's was
        f.seek(offsets[7])
        f.write(ninth)
    with Journal.open(tmp_path) as again:  # close() left the head hint at the end
        assert [r.seq for r in again.read(0, max_bytes=6 * 1024)] == list(range(1, 7))
        with pytest.raises(JournalCorruptError, match=r"seq 9 where 8 belongs"):
            again.read(6)
        with pytest.raises(JournalCorruptError, match=r"seq 9 where 8 belongs"):
            again.read(0, max_bytes=1 << 20)  # one read over it: refused, not cut short


def test_superblock_falls_back_to_the_other_slot(tmp_path: Path) -> None:
    with new_journal(tmp_path) as journal:
        fill(journal, 100)  # rolls: several superblock generations
    sb = tmp_path / "superblock"
    data = bytearray(sb.read_bytes())
    generations = [int.from_bytes(data[s + 16 : s + 24], "little") for s in (0, SLOT_SIZE)]
    newest = generations.index(max(generations))
    garble(sb, newest * SLOT_SIZE + 30)
    with Journal.open(tmp_path) as again:  # older slot: an older head hint, same journal
        assert again.last_seq == 100
    garble(sb, 40)  # closing rewrote the damaged slot; now damage both
    garble(sb, SLOT_SIZE + 40)
    with pytest.raises(JournalCorruptError, match="neither slot A nor B"):
        Journal.open(tmp_path)


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="segment size"):
        Journal.create(tmp_path / "a", GROUP, segment_size=1000)
    with pytest.raises(JournalError, match="holds no journal"):
        Journal.open(tmp_path)
    with new_journal(tmp_path / "b") as journal, pytest.raises(JournalError, match="does not fit"):
        journal.append(Kind.WRITE, 0, 0, bytes(SEG))
    with pytest.raises(JournalError, match="already holds a journal"):
        new_journal(tmp_path / "b")


def test_group_commit_from_another_thread(tmp_path: Path) -> None:
    journal = Journal.create(tmp_path, GROUP, segment_size=1 << 20, max_segments=16)
    stop = threading.Event()
    durable: list[int] = []

    def committer() -> None:
        while not stop.is_set():
            durable.append(journal.sync())

    thread = threading.Thread(target=committer)
    thread.start()
    try:
        fill(journal, 3000, size=500, sync=False)
    finally:
        stop.set()
        thread.join(timeout=30)
    journal.sync()
    assert durable == sorted(durable)  # durability only moves forward
    records = all_records(journal)
    assert [r.seq for r in records] == list(range(1, 3001))
    assert all(r.data == payload(r.seq, 500) for r in records)


def test_a_release_waits_for_a_sync_that_holds_its_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FLUSH's sync and a release after an ACK run in two threads: the
    release must not close a segment's descriptor the sync is about to
    fdatasync (that failed the FLUSH with EBADF, or synced another file)."""
    journal = new_journal(tmp_path, max_segments=8)
    fill(journal, 200, sync=False)  # several dirty segments
    assert len(list(tmp_path.glob("seg-*.log"))) > 2
    entered, go_on = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        if threading.current_thread() is syncing:  # the release's own syncs go on
            entered.set()
            assert go_on.wait(10)
        real(fd)

    errors: list[BaseException] = []

    def flush() -> None:
        try:
            journal.sync()
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    syncing = threading.Thread(target=flush)
    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)

    syncing.start()
    assert entered.wait(10)
    releasing = threading.Thread(target=journal.release_through, args=(150,))
    releasing.start()
    releasing.join(0.3)
    assert releasing.is_alive()  # waits for the sync instead of closing its files
    go_on.set()
    syncing.join(10)
    releasing.join(10)
    monkeypatch.setattr(os, "fdatasync", real)
    assert not errors, errors
    assert journal.durable_seq == 200
    assert journal.tail_seq > 1  # the release happened once the sync was done
    journal.close()
    with Journal.open(tmp_path) as again:
        assert [r.seq for r in all_records(again, again.tail_seq - 1)][-1] == 200


def test_a_release_writes_its_superblock_without_stopping_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release's superblock fdatasync can take long on a busy disk: appends
    and ``releasable`` (asked by an event loop at every ACK) go on meanwhile
    (only a roll into a new segment, which writes a superblock of its own,
    waits for it)."""
    journal = new_journal(tmp_path, max_segments=16)
    fill(journal, 200)
    import havend.journal.journal as module

    real = module.write_superblock
    entered, go_on = threading.Event(), threading.Event()

    def slow(fd: int, block: object) -> None:
        if threading.current_thread() is releasing:
            entered.set()
            assert go_on.wait(10)
        real(fd, block)

    monkeypatch.setattr(module, "write_superblock", slow)
    releasing = threading.Thread(target=journal.release_through, args=(150,))
    releasing.start()
    assert entered.wait(10)
    room = (journal.segment_size - journal._active.write_pos) // record_size(1000)
    others = threading.Thread(target=lambda: (journal.releasable(150), fill(journal, min(room, 5))))
    others.start()
    others.join(5)
    stalled = others.is_alive()
    go_on.set()
    releasing.join(10)
    others.join(10)
    assert room > 0 and not stalled  # not held up by the write in progress
    assert journal.tail_seq > 1
    fill(journal, 100)
    last, tail = journal.last_seq, journal.tail_seq
    journal.close()
    with Journal.open(tmp_path) as again:
        assert (again.tail_seq, again.last_seq) == (tail, last)
        assert [r.seq for r in all_records(again, tail - 1)] == list(range(tail, last + 1))


def test_a_superblock_older_than_the_one_written_is_not_written_over_it(
    tmp_path: Path,
) -> None:
    """A release writes its superblock after dropping the lock: a roll may write
    a newer one first (it carries the release's change too), and the late,
    older one must not replace it."""
    journal = new_journal(tmp_path, max_segments=16)
    fill(journal, 200)
    with journal._lock:
        stale = journal._change_block(tail_seq=journal.tail_seq)
        newer = journal._change_block(tail_seq=journal.tail_seq)
    journal._store_block(newer)
    on_disk = (tmp_path / "superblock").read_bytes()
    journal._store_block(stale)
    assert (tmp_path / "superblock").read_bytes() == on_disk
    journal.close()


@pytest.mark.parametrize("seed", range(60))
def test_random_crashes_never_lose_a_durable_record(tmp_path: Path, seed: int) -> None:
    """Crash at a random moment: bytes past the last fdatasync may be lost, torn or
    garbled; every record up to the durable seq survives, in order, intact."""
    rng = random.Random(seed)
    journal = Journal.create(tmp_path, GROUP, segment_size=SEG, max_segments=64)
    sizes = {}
    for _ in range(rng.randint(1, 6)):
        for _ in range(rng.randint(1, 60)):
            size = rng.choice([8, 512, 4096, 9000])
            seq = journal.append(Kind.WRITE, 0, 0, payload(journal.last_seq + 1, size))
            sizes[seq] = size
        if rng.random() < 0.7:
            journal.sync()
    durable = journal.durable_seq
    # Everything after the last durable position may be intact, torn or gone,
    # in that segment and in every later one (rolls do not sync).
    first, synced_end, _ = journal._durable_pos
    for segment in sorted(journal._segments.values(), key=lambda s: s.index):
        if segment.index < first:
            continue
        start = synced_end if segment.index == first else SEGMENT_HEADER_SIZE
        if start >= segment.write_pos:
            continue
        cut = rng.randint(start, segment.write_pos)
        damage = rng.choice(["zero", "garble", "keep", "keep"])
        with open(segment.path, "r+b") as f:
            f.seek(cut)
            if damage == "zero":
                f.write(bytes(segment.write_pos - cut))
            elif damage == "garble":
                f.write(os.urandom(segment.write_pos - cut))
    again = Journal.open(tmp_path)
    assert again.last_seq >= durable
    records = all_records(again)
    assert [r.seq for r in records] == list(range(1, again.last_seq + 1))
    assert all(r.data == payload(r.seq, sizes[r.seq]) for r in records)
    # and the journal takes new writes after recovery
    seq = again.append(Kind.WRITE, 0, 0, b"after")
    again.sync()
    assert again.read(seq - 1)[0].data == b"after"


@pytest.mark.parametrize("cache_bytes", [0, 3000, 20_000, 1 << 30])
def test_reads_are_the_same_from_memory_and_from_the_segments(
    tmp_path: Path, cache_bytes: int
) -> None:
    """The newest records are kept in memory (the shipper and the applier read
    right behind the writer). Whatever the cache holds, each read returns the
    same records as a fresh journal reading only the files, across segment
    rolls, readers that fall behind the cache and catch up again, and releases."""
    rng = random.Random(cache_bytes)
    with new_journal(tmp_path / "j", max_segments=64) as journal:
        journal.cache_bytes = cache_bytes
        after, seen = 0, []
        for _ in range(60):
            fill(journal, rng.randrange(1, 12), size=rng.choice([0, 8, 1000, 5000]))
            while rng.random() < 0.7 and (batch := journal.read(after, rng.choice([1, 9000]))):
                seen += batch
                after = batch[-1].seq
            if rng.random() < 0.1:
                journal.release_through(after)
        seen += all_records(journal, after)
        assert journal._tail_bytes <= max(cache_bytes, 5000)
        assert [r.seq for r in seen] == list(range(1, journal.last_seq + 1))
        tail = journal.tail_seq
    with Journal.open(tmp_path / "j") as again:  # nothing in memory: all from the files
        assert again.read(tail - 1, 1 << 30) == [r for r in seen if r.seq >= tail]
    assert [bytes(r.data) for r in seen] == [payload(r.seq, len(r.data)) for r in seen]


def test_an_owned_payload_is_kept_without_a_copy_and_others_are_copied(tmp_path: Path) -> None:
    with new_journal(tmp_path) as journal:
        mine = bytearray(b"m" * 4096)
        theirs = bytearray(b"t" * 4096)
        journal.append(Kind.WRITE, 0, 0, memoryview(mine), owned=True)
        journal.append(Kind.WRITE, 0, 4096, theirs)
        theirs[:] = b"x" * 4096  # the caller reuses its buffer: the record must not change
        journal.sync()
        first, second = journal.read(0)
        assert isinstance(first.data, memoryview) and first.data.obj is mine
        assert second.data == b"t" * 4096


def test_records_read_back_from_memory_carry_their_header_as_written(tmp_path: Path) -> None:
    """What the shipper reads right behind the writer (from memory) carries
    the header and CRC written to the segment: it is sent as it is, its CRC
    not computed a second time."""
    with new_journal(tmp_path) as journal:
        fill(journal, 3)
        records = journal.read(0)
        segment = segment0(tmp_path).read_bytes()
        pos = SEGMENT_HEADER_SIZE
        for record in records:
            assert record.header == segment[pos : pos + RECORD_HEADER.size]
            pos += record.size
