"""Stamped blocks and the write log (the format is in ``havend.stamp``)."""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from crc32c import crc32c

from havend.errors import HavendError

MAGIC = b"HVNSTAMP"
HEADER = struct.Struct(">8sQIQQI")  # magic, seq, volume, block, generation, crc
_CRC_OFFSET = 36
_ZERO_CRC = bytes(4)
DEFAULT_BLOCK_SIZE = 4096
# Images are read this many bytes at a time (rounded down to whole blocks).
_READ_CHUNK = 8 << 20

BytesLike = bytes | bytearray | memoryview | mmap.mmap
Image = BytesLike | str | os.PathLike[str]
"""A volume image: its bytes, or the path of a file holding them."""


class StampError(HavendError):
    """A block is neither all zeros nor a valid stamp: torn, corrupt or foreign."""


class ConsistencyError(AssertionError):
    """A check of images against a write log failed (an assertion of a test)."""


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """One write: the header of the stamped block it put on the volume."""

    seq: int
    volume: int
    block: int
    generation: int = 1

    def __str__(self) -> str:
        return f"seq {self.seq} (volume {self.volume} block {self.block} gen {self.generation})"


def _check_block_size(block_size: int) -> None:
    if block_size < HEADER.size + 8:
        raise ValueError(f"block size {block_size} is too small for a stamp")


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    return bytes(n)


def make_block(
    seq: int, volume: int, block: int, generation: int = 1, block_size: int = DEFAULT_BLOCK_SIZE
) -> bytes:
    """The stamped block for one write; the same arguments always give the same bytes."""
    _check_block_size(block_size)
    head = HEADER.pack(MAGIC, seq, volume, block, generation, 0)[:_CRC_OFFSET]
    seed = hashlib.blake2b(head).digest()  # 64 bytes
    tail = block_size - HEADER.size
    filler = (seed * (tail // len(seed) + 1))[:tail]
    crc = crc32c(filler, crc32c(_ZERO_CRC, crc32c(head)))
    return head + struct.pack(">I", crc) + filler


def parse_block(data: BytesLike) -> Stamp | None:
    """The stamp in ``data`` (one whole block), or None if it is all zeros.

    Raises :class:`StampError` for anything else, saying what is wrong.
    """
    data = bytes(data)
    if len(data) < HEADER.size + 8:
        raise StampError(f"a block of {len(data)} bytes cannot hold a stamp")
    if data == _zeros(len(data)):
        return None
    magic, seq, volume, block, generation, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StampError(f"neither zero nor a stamp (starts with {data[:16].hex()})")
    actual = crc32c(data[HEADER.size :], crc32c(_ZERO_CRC, crc32c(data[:_CRC_OFFSET])))
    stamp = Stamp(seq, volume, block, generation)
    if actual != crc:
        raise StampError(
            f"torn or corrupt block claiming {stamp}: crc {actual:#010x} != {crc:#010x}"
        )
    if data != make_block(seq, volume, block, generation, len(data)):
        raise StampError(f"block claiming {stamp} has the wrong filler")
    return stamp


# The writer's record ------------------------------------------------------


class WriteLog:
    """Every write a writer issued, in group seq order, and what became of it.

    A write is *issued* (:meth:`issue`, before it is sent), then maybe
    *acknowledged* (:meth:`ack`), then maybe *durable* (FUA, or covered by an
    acknowledged FLUSH: :meth:`flush_sent` then :meth:`flush_acked`). An issued
    write that was never acknowledged may or may not have reached the volume;
    the checks allow both. Append-only, not thread-safe.
    """

    def __init__(self) -> None:
        self._writes: list[Stamp] = []
        self._by_seq: dict[int, Stamp] = {}
        self._history: dict[tuple[int, int], list[int]] = {}  # (volume, block) -> seqs
        self._acked: set[int] = set()
        self._durable: set[int] = set()
        self._acked_order: dict[int, list[int]] = {}  # volume -> seqs in ack order

    def __len__(self) -> int:
        return len(self._writes)

    def __iter__(self) -> Iterator[Stamp]:
        return iter(self._writes)

    @property
    def writes(self) -> Sequence[Stamp]:
        """All writes, in seq order (a live view: do not modify)."""
        return self._writes

    @property
    def last_seq(self) -> int:
        """The seq of the last write issued; 0 before the first."""
        return self._writes[-1].seq if self._writes else 0

    @property
    def volumes(self) -> set[int]:
        return {volume for volume, _ in self._history}

    def get(self, seq: int) -> Stamp:
        return self._by_seq[seq]

    def issue(
        self, volume: int, block: int, generation: int = 1, *, seq: int | None = None
    ) -> Stamp:
        """Record a write about to be sent; its seq is ``last_seq + 1`` unless given (larger)."""
        if seq is None:
            seq = self.last_seq + 1
        elif seq <= self.last_seq:
            raise ValueError(f"seq {seq} is not after the last seq {self.last_seq}")
        stamp = Stamp(seq, volume, block, generation)
        self._writes.append(stamp)
        self._by_seq[seq] = stamp
        self._history.setdefault((volume, block), []).append(seq)
        return stamp

    def ack(self, seq: int, *, fua: bool = False) -> None:
        """The write was acknowledged (with FUA: and is durable)."""
        stamp = self._by_seq[seq]
        if seq in self._acked:
            raise ValueError(f"seq {seq} acknowledged twice")
        self._acked.add(seq)
        self._acked_order.setdefault(stamp.volume, []).append(seq)
        if fua:
            self._durable.add(seq)

    def flush_sent(self, volume: int) -> int:
        """A FLUSH is about to be sent on ``volume``: returns the token for :meth:`flush_acked`."""
        return len(self._acked_order.get(volume, ()))

    def flush_acked(self, volume: int, token: int) -> None:
        """The FLUSH sent with ``token`` succeeded: writes acknowledged before it are durable."""
        self._durable.update(self._acked_order.get(volume, [])[:token])

    def is_acked(self, seq: int) -> bool:
        return seq in self._acked

    def is_durable(self, seq: int) -> bool:
        return seq in self._durable

    @property
    def last_acked_seq(self) -> int:
        return max(self._acked, default=0)

    @property
    def last_durable_seq(self) -> int:
        return max(self._durable, default=0)

    def history(self, volume: int, block: int) -> Sequence[int]:
        """Seqs of the writes to one block, ascending."""
        return self._history.get((volume, block), ())
