"""A resync never leaves the target without a consistent point to fail over to
(issue 16): a second journal overflow while the replica is still catching up
from the first one once made the replica take the blocks directly, with no
consistent point kept until the second resync was over.

Driven in-process on a TargetGroup, as its link would: each overflow is a
SYNC_BEGIN at the source's resume seq, SYNC_DATA of the regions (as the source
holds them), SYNC_END at the source's last seq; records are BATCHes."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from havend.journal import Journal, Kind, Record
from havend.target.group import TargetGroup

BLOCK = 4096
SIZE = 64 * BLOCK


class Source:
    """The source's volume and journal, as far as the test needs them."""

    def __init__(self, tmp_path: Path) -> None:
        self.image = bytearray(SIZE)
        self.images = {0: bytes(self.image)}  # seq -> the volume after it
        self.journal = Journal.create(tmp_path / "src", uuid.uuid4(), segment_size=1 << 20)

    def write(self, count: int) -> list[Record]:
        """``count`` writes of one block each; their records."""
        first = self.journal.last_seq
        for _ in range(count):
            block = int.from_bytes(os.urandom(2), "little") % (SIZE // BLOCK)
            data = os.urandom(BLOCK)
            seq = self.journal.append(Kind.WRITE, 0, block * BLOCK, data)
            self.image[block * BLOCK : (block + 1) * BLOCK] = data
            self.images[seq] = bytes(self.image)
        return self.journal.read(first, 16 << 20, durable_only=False)

    def close(self) -> None:
        self.journal.close()


async def _deliver(group: TargetGroup, records: list[Record]) -> None:
    """A batch arrives and its commit runs; wait until the applier took it."""
    group.receive(records)
    group.journal.sync()
    group.new_records.set()
    for _ in range(500):
        if group.applied_seq >= group.journal.durable_seq:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"applier stuck at {group.applied_seq} of {group.journal.durable_seq}")


def _resync_blocks(group: TargetGroup, image: bytes, blocks: range) -> None:
    for block in blocks:
        group.write_block(0, block * BLOCK, image[block * BLOCK : (block + 1) * BLOCK])


def _new_group(tmp_path: Path) -> TargetGroup:
    """A target group of one volume, as a new source's first HELLO makes it."""
    return TargetGroup.create(
        str(tmp_path / "state"),
        str(tmp_path / "rep"),
        uuid.uuid4(),
        "g",
        [{"name": "v", "size": SIZE}],
    )


def _replica(group: TargetGroup) -> bytes:
    return group.volumes[0].read(0, SIZE)


def test_a_second_overflow_while_catching_up_keeps_a_consistent_point(tmp_path: Path) -> None:
    source = Source(tmp_path)

    async def scenario() -> None:
        group = _new_group(tmp_path)
        applier = asyncio.ensure_future(group.applier())
        try:
            # A new replica, then records up to seq 10: consistent there.
            await group.begin_resync(0)
            group.end_resync(0)
            await _deliver(group, source.write(10))
            assert group.state == "consistent" and group.applied_seq == 10
            assert _replica(group) == source.images[10]

            # First overflow: records 11-15 travel as regions; writes 16-20 go on
            # during the pass, and only 16-17 arrive before the second overflow.
            source.write(5)
            await group.begin_resync(15)
            assert group.state == "staging"
            _resync_blocks(group, source.images[15], range(SIZE // BLOCK))
            during = source.write(5)
            group.end_resync(20)
            assert group.state == "catching_up"
            await _deliver(group, during[:2])
            assert group.state == "catching_up" and group.applied_seq == 17

            # Second overflow: records 18-25 travel as regions; the link breaks
            # half way through the pass.
            source.write(5)
            await group.begin_resync(25)
            _resync_blocks(group, source.images[25], range(0, SIZE // BLOCK, 2))

            # The source is lost: fail over. The replica is the source as of
            # seq 10, the last point it was consistent at: a write-order prefix.
            promoted = await group.promote()
            assert promoted["applied_seq"] == 10
            assert _replica(group) == source.images[10]
            assert group.state == "consistent"
            assert not os.path.exists(os.path.join(group.directory, "resync-base"))
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)
            group.close()

    try:
        asyncio.run(scenario())
    finally:
        source.close()


def test_the_kept_point_goes_once_the_replica_is_consistent_again(tmp_path: Path) -> None:
    """A staged resync whose records all arrive: consistent at the source's seq,
    and nothing kept any more (what the resync base costs ends with it)."""
    source = Source(tmp_path)

    async def scenario() -> None:
        group = _new_group(tmp_path)
        applier = asyncio.ensure_future(group.applier())
        try:
            await group.begin_resync(0)
            group.end_resync(0)
            await _deliver(group, source.write(10))
            source.write(5)
            await group.begin_resync(15)
            _resync_blocks(group, source.images[15], range(SIZE // BLOCK))
            during = source.write(5)
            group.end_resync(20)
            base = os.path.join(group.directory, "resync-base")
            assert os.path.isdir(base)  # away from seq 10 until 20 is applied
            await _deliver(group, during)
            assert group.state == "consistent" and group.applied_seq == 20
            assert _replica(group) == source.images[20]
            for _ in range(500):
                if not os.path.exists(base):
                    break
                await asyncio.sleep(0.01)
            assert not os.path.exists(base)
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)
            group.close()

    try:
        asyncio.run(scenario())
    finally:
        source.close()
