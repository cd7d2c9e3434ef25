"""Stamped blocks: the ground truth for "the replica is a write-order prefix".

A writer fills volumes with *stamped blocks*, each saying which write put it
there, and records every write it issues in a :class:`WriteLog`. Reading the
volumes back (a replica, a source after a crash) then tells exactly which
writes landed, without trusting anything havend says about itself.

Stamp format (``block_size`` bytes, 4096 by default; all integers big-endian)::

    offset  size  field
         0     8  magic b"HVNSTAMP"
         8     8  seq         group sequence number of the write (1, 2, ...)
        16     4  volume      volume id within the consistency group
        20     8  block       block number within the volume (offset / block_size)
        28     8  generation  writer epoch (bump it when a new writer takes over)
        36     4  crc         CRC-32C of the whole block with this field zeroed
        40     -  filler      BLAKE2b-512 of bytes 0..36, repeated to the end

Every byte of the block depends on the header, so a block mixing two writes
(torn: half old, half new) or a stamp at the wrong place is always detected:
:func:`parse_block` raises :class:`StampError` for anything that is neither an
all-zero (never written) block nor a valid stamp.

Write-order prefix. A group's writes are numbered by one sequence across all
its volumes, and the writer issues a write only after the previous one was
acknowledged (QD1 across the group), so seq order is a real happens-before
order. The group's images are *the prefix S* when every block of every volume
holds exactly the last write to it with seq <= S, or its initial content
(zeros, or the ``initial`` images given) if there is none. A replica may lag
(any S is fine) but must never show a later write without every earlier one:
:func:`check_prefix` decides whether such an S exists and which.

Durability. A write is durable once acknowledged with FUA, or acknowledged
before a FLUSH on its volume's connection was sent and that FLUSH was
acknowledged. After a source crash every durable write must still be there or
be overwritten by a later write of the log: :func:`check_durable`.

Modules: ``blocks`` (the stamp format, ``Stamp``, ``WriteLog``), ``check``
(``check_prefix``, ``check_durable`` and their reports), ``writer``
(``StampWriter``). Nothing here writes to disk but a writer to its volumes.
"""

from havend.stamp.blocks import (
    DEFAULT_BLOCK_SIZE,
    HEADER,
    MAGIC,
    ConsistencyError,
    Stamp,
    StampError,
    WriteLog,
    make_block,
    parse_block,
)
from havend.stamp.check import (
    BlockProblem,
    DurabilityReport,
    PrefixReport,
    check_durable,
    check_prefix,
)
from havend.stamp.writer import StampWriter

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "HEADER",
    "MAGIC",
    "BlockProblem",
    "ConsistencyError",
    "DurabilityReport",
    "PrefixReport",
    "Stamp",
    "StampError",
    "StampWriter",
    "WriteLog",
    "check_durable",
    "check_prefix",
    "make_block",
    "parse_block",
]
