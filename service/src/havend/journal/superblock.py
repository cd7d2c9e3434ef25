"""The journal's A/B superblock: identity, tail and head hint, never half-written."""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
from dataclasses import dataclass

from crc32c import crc32c

from havend.errors import JournalCorruptError

MAGIC = b"HVNJSUPR"
VERSION = 1
SLOT_SIZE = 4096
# magic, version, crc, generation, group uuid, segment size, max segments, reserved,
# tail segment, tail seq, head segment, head offset, head seq
_SLOT = struct.Struct("<8sIIQ16sQIIQQQQQ")


@dataclass(frozen=True, slots=True)
class Superblock:
    generation: int
    group: uuid.UUID
    segment_size: int
    max_segments: int
    tail_segment: int
    tail_seq: int  # the oldest record still kept has this seq (or the next one written)
    head_segment: int
    head_offset: int
    head_seq: int  # last seq at (head_segment, head_offset); a hint for recovery

    def replace(self, **changes: int) -> Superblock:
        return dataclasses.replace(self, **changes)

    def encode(self) -> bytes:
        fields = (
            MAGIC,
            VERSION,
            0,
            self.generation,
            self.group.bytes,
            self.segment_size,
            self.max_segments,
            0,
            self.tail_segment,
            self.tail_seq,
            self.head_segment,
            self.head_offset,
            self.head_seq,
        )
        crc = crc32c(_SLOT.pack(*fields))
        slot = _SLOT.pack(*fields[:2], crc, *fields[3:])
        return slot + bytes(SLOT_SIZE - len(slot))


def _decode(slot: bytes) -> Superblock | None:
    if len(slot) < _SLOT.size:
        return None
    fields = list(_SLOT.unpack_from(slot))
    if fields[0] != MAGIC or fields[1] != VERSION:
        return None
    crc, fields[2] = fields[2], 0
    if crc32c(_SLOT.pack(*fields)) != crc:
        return None
    return Superblock(fields[3], uuid.UUID(bytes=fields[4]), fields[5], fields[6], *fields[8:])


def read_superblock(path: str) -> Superblock:
    """The newest valid slot; raises if neither slot is valid."""
    with open(path, "rb") as f:
        data = f.read(2 * SLOT_SIZE)
    slots = [_decode(data[:SLOT_SIZE]), _decode(data[SLOT_SIZE:])]
    valid = [s for s in slots if s is not None]
    if not valid:
        raise JournalCorruptError(f"journal superblock {path}: neither slot A nor B is valid")
    return max(valid, key=lambda s: s.generation)


def write_superblock(fd: int, block: Superblock) -> None:
    """Write ``block`` into the slot its generation selects, durably."""
    os.pwrite(fd, block.encode(), (block.generation % 2) * SLOT_SIZE)
    os.fdatasync(fd)
