"""The undo log's on-disk format (see ``havend.cdp.undo``), integers little-endian.

On-disk format, in the group's ``cdp/`` directory (integers little-endian):

``undo-<index, 16 hex digits>.log``
    Entries appended one after the other; a new file once one passes
    ``segment_bytes``. An entry::

        magic "HUL1" | u32 crc32c (of the rest of the header, the table and,
        for checkpoint and rollback entries, the data) | u8 type | u8 flags
        | 2 pad | u64 epoch | u64 time ns | u32 count | u32 data length
        count x (u16 volume | u16 flags | u32 length | u64 block | u32 crc32c)
        data (the blocks not flagged zero, in table order; or a JSON body)
        with entry flag 1 (aligned): zeroes up to the next multiple of 4 KiB

    Entries are aligned and written with O_DIRECT from one reused buffer: the
    saved blocks are read back only by views and rollbacks, and putting them
    in the page cache cost more CPU than anything else the undo log does (new
    pages, then their write-back). Where the file system refuses O_DIRECT
    they go through the page cache, in the same format. Files written before
    entries were aligned are read as they are; appends then go to a new file.

    Types: 1 blocks (the table says which; flag 1: all zeroes, no data),
    2 checkpoint (epoch = its seq; JSON id, time, label, consistency),
    3 rollback (epoch = the checkpoint seq made latest again).

``state.json``
    ``{"oldest_seq"}``: checkpoints below it were reclaimed (their entries
    may still sit in a file shared with newer epochs); ``"rolling_back_to"``
    while a rollback is being carried out (finished at the next open);
    ``"forgotten"`` (id -> seq), the checkpoints deleted one by one whose
    checkpoint entries are still in the files (skipped at open; pruned once
    below ``oldest_seq``).

"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from crc32c import crc32c

BLOCK = 4096
SEGMENT_BYTES = 64 << 20
# Blocks per entry: bounds the memory of one preserve step.
ENTRY_BLOCKS = 2048
_HEADER = struct.Struct("<4sIBB2xQQII")
_SLOT = struct.Struct("<HHIQI")
MAGIC = b"HUL1"
T_BLOCKS, T_CHECKPOINT, T_ROLLBACK = 1, 2, 3
FLAG_ZERO = 1
# Entry flag: zeroes follow the entry up to the next multiple of ALIGN, where
# the next entry starts (entries written with O_DIRECT).
ENTRY_ALIGNED = 1
ALIGN = 4096
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CRC = crc32c(_ZERO_BLOCK)
_SEGMENT_NAME = re.compile(r"^undo-([0-9a-f]{16})\.log$")
# Index keys: volume << 48 | block number.
_VOLUME_SHIFT = 48


class Volume(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


@dataclass(slots=True)
class _Segment:
    index: int
    path: str
    fd: int
    size: int
    max_epoch: int  # newest epoch with an entry here (-1: none)
    direct_fd: int = -1  # the same file opened with O_DIRECT, for appending


def _close(segment: _Segment) -> None:
    for fd in (segment.fd, segment.direct_fd):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# Where a saved block is: (epoch, segment, offset of its data or -1 for zeroes,
# length, crc32c). Tuples sort by epoch first, for bisect.
Saved = tuple[int, int, int, int, int]
# A block of an entry being written: (volume, block, all zeroes, length, crc32c).
_Slot = tuple[int, int, bool, int, int]


def _key(volume: int, block: int) -> int:
    return volume << _VOLUME_SHIFT | block


def _is_zero(data: memoryview, crc: int) -> bool:
    """All zeroes? The CRC rules out nearly every block at no cost (comparing
    a memoryview element by element is slow); a short last block is compared."""
    if len(data) == BLOCK:
        return crc == _ZERO_CRC and data.tobytes() == _ZERO_BLOCK
    return not data.tobytes().strip(b"\0")


def _runs(blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(volume, first block, count) of consecutive blocks, from sorted (volume, block)."""
    run_volume, run_first, run_count = -1, 0, 0
    for volume, block in blocks:
        if volume == run_volume and block == run_first + run_count:
            run_count += 1
            continue
        if run_count:
            yield run_volume, run_first, run_count
        run_volume, run_first, run_count = volume, block, 1
    if run_count:
        yield run_volume, run_first, run_count
