"""The staged-block file: blocks received for a volume group, written aside
first and applied once all of them are there (a target's staged resync, a
source's round of reverse protection), so that a crash part way leaves the
volumes as they were, or finishes applying a whole file.

Format: entries one after the other, each ``u16 volume | u64 offset | u32
length`` (little-endian) followed by ``length`` bytes of data; no header. A
file is only applied once its writer made it durable and recorded that
elsewhere (the group's ``sync.json`` or ``reverse.staged``), so a torn last
entry is never read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

_ENTRY = struct.Struct("<HQI")


def stage(staging: BinaryIO, volume: int, offset: int, data: bytes | memoryview) -> None:
    """Append one block to a staging file."""
    staging.write(_ENTRY.pack(volume, offset, len(data)))
    staging.write(data)


def staged(staging: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(volume, offset, data) of every block of a staging file, in order."""
    while header := staging.read(_ENTRY.size):
        if len(header) < _ENTRY.size:
            raise ValueError("a staging file ends inside an entry header")
        volume, offset, length = _ENTRY.unpack(header)
        data = staging.read(length)
        if len(data) < length:
            raise ValueError("a staging file ends inside an entry")
        yield volume, offset, data
