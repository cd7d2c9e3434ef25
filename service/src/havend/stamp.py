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
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crc32c import crc32c

from havend.errors import HavendError
from havend.nbd.client import NBDClient

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


# Checks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockProblem:
    """One block that breaks a check: what it holds and what it should hold."""

    volume: int
    block: int
    reason: str
    found: Stamp | None  # None: initial content, or unreadable (see reason)
    expected: Stamp | None  # None: initial content (no write to it up to the prefix)
    detail: str = ""

    def __str__(self) -> str:
        found = str(self.found) if self.found else "initial content"
        expected = str(self.expected) if self.expected else "initial content"
        text = f"volume {self.volume} block {self.block}: {self.reason}"
        if "torn" not in self.reason:
            text += f"; found {found}, expected {expected}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, slots=True)
class PrefixReport:
    """Verdict of :func:`check_prefix`.

    When ``ok``, the images are exactly the prefix ``seq`` of the log, and
    equally every prefix from ``min_seq`` (the newest write present) to
    ``seq``: no write of the log lies between the two. When not ``ok``,
    ``problem`` is the first offending block in (volume, block) order and
    ``problems`` counts them all.
    """

    ok: bool
    seq: int | None
    min_seq: int | None
    blocks: int
    stamped: int
    problem: BlockProblem | None
    problems: int

    def __str__(self) -> str:
        if self.ok:
            return f"prefix {self.seq} (from {self.min_seq}) over {self.blocks} blocks"
        return f"not a write-order prefix: {self.problem} [{self.problems} offending blocks]"

    def expect(self) -> int:
        """``seq``, or raise :class:`ConsistencyError` describing the offending block."""
        if not self.ok:
            raise ConsistencyError(str(self))
        assert self.seq is not None
        return self.seq


@dataclass(frozen=True, slots=True)
class DurabilityReport:
    """Verdict of :func:`check_durable`: ``checked`` blocks had a durable write."""

    ok: bool
    checked: int
    problem: BlockProblem | None
    problems: int

    def __str__(self) -> str:
        if self.ok:
            return f"all durable writes present ({self.checked} blocks)"
        return f"durable writes lost: {self.problem} [{self.problems} offending blocks]"

    def expect(self) -> None:
        if not self.ok:
            raise ConsistencyError(str(self))


def _blocks(image: Image, block_size: int) -> Iterator[tuple[int, bytes]]:
    """(block number, bytes) of every whole block of ``image``, read in big chunks."""
    chunk = max(_READ_CHUNK // block_size, 1) * block_size
    if isinstance(image, str | os.PathLike):
        with open(image, "rb", buffering=0) as f:
            base = 0
            while data := f.read(chunk):
                for i in range(0, len(data) - block_size + 1, block_size):
                    yield base + i // block_size, data[i : i + block_size]
                base += len(data) // block_size
                if len(data) % block_size:
                    return  # a partial last block is not a block
        return
    view = memoryview(image).cast("B")
    for i in range(0, len(view) - block_size + 1, block_size):
        yield i // block_size, bytes(view[i : i + block_size])


def _image_blocks(image: Image, block_size: int) -> int:
    if isinstance(image, str | os.PathLike):
        return Path(image).stat().st_size // block_size
    return memoryview(image).nbytes // block_size


def _read_state(
    image: Image,
    initial: Image | None,
    block_size: int,
    wanted: set[int] | None,
) -> Iterator[tuple[int, Stamp | StampError | None]]:
    """(block, what it holds) for every block (or the ``wanted`` ones).

    What it holds: None for initial content, the stamp, or the StampError.
    """
    blocks = _blocks(image, block_size)
    initials = _blocks(initial, block_size) if initial is not None else None
    zero = _zeros(block_size)
    for number, data in blocks:
        first = next(initials, (0, zero))[1] if initials is not None else zero
        if wanted is not None and number not in wanted:
            continue
        if data == first:
            yield number, None
            continue
        try:
            yield number, parse_block(data)
        except StampError as exc:
            yield number, exc


def _last_at_or_before(seqs: Sequence[int], s: int) -> int | None:
    i = bisect.bisect_right(seqs, s)
    return seqs[i - 1] if i else None


def check_prefix(
    log: WriteLog,
    images: Mapping[int, Image],
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    initial: Mapping[int, Image] | None = None,
) -> PrefixReport:
    """Decide whether ``images`` (volume id -> image) are one write-order prefix of ``log``.

    Reads every block of every image once, in big chunks. ``initial`` gives
    the content of volumes before the first write (default: zeros). Every
    volume the log wrote to must be in ``images``.
    """
    _check_block_size(block_size)
    missing = log.volumes - set(images)
    if missing:
        raise ValueError(f"no image for volumes {sorted(missing)} the log wrote to")
    initial = initial or {}
    inf = log.last_seq
    lo, hi = 0, inf  # the prefixes S consistent with every block read so far
    blocks = stamped = 0
    # Blocks that are fine for some S: (volume, block, their own S interval).
    intervals: list[tuple[int, int, int, int]] = []
    hard: list[BlockProblem] = []  # blocks that are wrong for every S
    for volume in sorted(images):
        n_blocks = _image_blocks(images[volume], block_size)
        for key in log._history:
            if key[0] == volume and key[1] >= n_blocks:
                hard.append(
                    BlockProblem(volume, key[1], "written beyond the end of the image", None, None)
                )
        for number, held in _read_state(images[volume], initial.get(volume), block_size, None):
            blocks += 1
            seqs = log.history(volume, number)
            if isinstance(held, StampError):
                hard.append(BlockProblem(volume, number, f"torn or corrupt: {held}", None, None))
                continue
            if held is None:
                b_lo, b_hi = 0, (seqs[0] - 1 if seqs else inf)
            else:
                stamped += 1
                problem = _foreign(log, volume, number, held)
                if problem is not None:
                    hard.append(problem)
                    continue
                i = seqs.index(held.seq)
                b_lo, b_hi = held.seq, (seqs[i + 1] - 1 if i + 1 < len(seqs) else inf)
            if b_lo > lo:
                lo = b_lo
            if b_hi < hi:
                hi = b_hi
            if seqs:
                intervals.append((volume, number, b_lo, b_hi))
    if not hard and lo <= hi:
        return PrefixReport(True, hi, lo, blocks, stamped, None, 0)
    # Not a prefix: judge every block against S = lo, the newest write present.
    for volume, number, b_lo, b_hi in intervals:
        if b_lo <= lo <= b_hi:
            continue
        seqs = log.history(volume, number)
        found_seq = b_lo if b_lo else None
        expected = _last_at_or_before(seqs, lo)
        hard.append(
            BlockProblem(
                volume,
                number,
                "not a write-order prefix",
                log.get(found_seq) if found_seq else None,
                log.get(expected) if expected else None,
                f"other blocks hold writes up to seq {lo}",
            )
        )
    hard.sort(key=lambda p: (p.volume, p.block))
    return PrefixReport(False, None, None, blocks, stamped, hard[0], len(hard))


def _foreign(log: WriteLog, volume: int, block: int, held: Stamp) -> BlockProblem | None:
    """A problem if ``held`` is not a write of ``log`` to this very block."""
    if (held.volume, held.block) != (volume, block):
        return BlockProblem(volume, block, "stamp of another block (misdirected write)", held, None)
    recorded = log._by_seq.get(held.seq)
    if recorded is None:
        return BlockProblem(volume, block, "stamp of a write the log never issued", held, None)
    if recorded != held:
        return BlockProblem(volume, block, "stamp does not match the log", held, recorded)
    return None


def check_durable(
    log: WriteLog,
    images: Mapping[int, Image],
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    initial: Mapping[int, Image] | None = None,
) -> DurabilityReport:
    """Check that every durable write is present, or overwritten by a later write of the log.

    For source-crash tests: a later write need not be acknowledged, since it
    may have landed before the crash.
    """
    _check_block_size(block_size)
    initial = initial or {}
    need: dict[int, dict[int, int]] = {}  # volume -> block -> newest durable seq
    for stamp in log:
        if log.is_durable(stamp.seq):
            need.setdefault(stamp.volume, {})[stamp.block] = stamp.seq
    missing = set(need) - set(images)
    if missing:
        raise ValueError(f"no image for volumes {sorted(missing)} with durable writes")
    problems: list[BlockProblem] = []
    checked = 0
    for volume in sorted(need):
        wanted = need[volume]
        seen: set[int] = set()
        for number, held in _read_state(
            images[volume], initial.get(volume), block_size, set(wanted)
        ):
            seen.add(number)
            checked += 1
            durable = log.get(wanted[number])
            if isinstance(held, StampError):
                problems.append(
                    BlockProblem(volume, number, f"torn or corrupt: {held}", None, durable)
                )
            elif held is None:
                problems.append(BlockProblem(volume, number, "durable write lost", None, durable))
            elif (problem := _foreign(log, volume, number, held)) is not None:
                problems.append(problem)
            elif held.seq < durable.seq:
                problems.append(
                    BlockProblem(volume, number, "durable write lost", held, durable, "older write")
                )
        for number in sorted(set(wanted) - seen):
            problems.append(
                BlockProblem(
                    volume,
                    number,
                    "written beyond the end of the image",
                    None,
                    log.get(wanted[number]),
                )
            )
    problems.sort(key=lambda p: (p.volume, p.block))
    return DurabilityReport(not problems, checked, problems[0] if problems else None, len(problems))


# The writer ---------------------------------------------------------------


class StampWriter:
    """Writes stamped blocks through NBD and records every write in a :class:`WriteLog`.

    ``clients`` maps volume ids to one connected :class:`NBDClient` each. The
    writer is QD1 across the whole group, on purpose: a write is issued only
    after the previous one (to any volume) was acknowledged, so seq order is a
    happens-before order and any image that is not a prefix is a bug, never a
    race of the writer. Every ``flush_every`` writes it FLUSHes every volume;
    every ``fua_every``-th write carries FUA.

    ``pattern`` "random" picks a volume and a block with a ``random.Random(seed)``;
    "sequential" goes round-robin over the volumes and walks each from block 0,
    wrapping. ``blocks`` limits writes to the first blocks of each volume
    (more overwrites). A failed write raises (the error of the client) and
    stays in the log as issued, not acknowledged.
    """

    def __init__(
        self,
        clients: Mapping[int, NBDClient],
        *,
        log: WriteLog | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        generation: int = 1,
        seed: int = 0,
        pattern: Literal["random", "sequential"] = "random",
        blocks: int | None = None,
        flush_every: int | None = 64,
        fua_every: int | None = None,
    ) -> None:
        _check_block_size(block_size)
        if not clients:
            raise ValueError("a StampWriter needs at least one volume")
        if pattern not in ("random", "sequential"):
            raise ValueError(f"unknown pattern {pattern!r}")
        self.clients = dict(clients)
        self.log = log if log is not None else WriteLog()
        self.block_size = block_size
        self.generation = generation
        self.pattern = pattern
        self.flush_every = flush_every
        self.fua_every = fua_every
        self._rng = random.Random(seed)
        self._volumes = sorted(self.clients)
        self._n_blocks: dict[int, int] = {}
        for volume, client in self.clients.items():
            n = client.size // block_size
            if blocks is not None:
                n = min(n, blocks)
            if n < 1:
                raise ValueError(f"volume {volume} has no whole block of {block_size} bytes")
            self._n_blocks[volume] = n
        self._cursor = dict.fromkeys(self._volumes, 0)
        self._turn = 0
        self._since_flush = 0
        self.writes = 0

    def next_target(self) -> tuple[int, int]:
        """(volume, block) of the next write of the pattern."""
        if self.pattern == "random":
            volume = self._rng.choice(self._volumes)
            return volume, self._rng.randrange(self._n_blocks[volume])
        volume = self._volumes[self._turn % len(self._volumes)]
        self._turn += 1
        block = self._cursor[volume]
        self._cursor[volume] = (block + 1) % self._n_blocks[volume]
        return volume, block

    def write(self, volume: int, block: int, *, fua: bool = False) -> Stamp:
        """Issue one stamped write, wait for its acknowledgement, record both."""
        stamp = self.log.issue(volume, block, self.generation)
        data = make_block(stamp.seq, volume, block, self.generation, self.block_size)
        self.clients[volume].write(block * self.block_size, data, fua=fua)
        self.log.ack(stamp.seq, fua=fua)
        self.writes += 1
        self._since_flush += 1
        return stamp

    def flush(self, volumes: Iterable[int] | None = None) -> None:
        """FLUSH each volume (all by default) and record what became durable."""
        for volume in self._volumes if volumes is None else volumes:
            token = self.log.flush_sent(volume)
            self.clients[volume].flush()
            self.log.flush_acked(volume, token)
        if volumes is None:
            self._since_flush = 0

    def step(self) -> Stamp:
        """One write of the pattern, then the periodic FLUSH if it is due."""
        volume, block = self.next_target()
        fua = self.fua_every is not None and (self.writes + 1) % self.fua_every == 0
        stamp = self.write(volume, block, fua=fua)
        if self.flush_every and self._since_flush >= self.flush_every:
            self.flush()
        return stamp

    def run(
        self,
        count: int | None = None,
        *,
        seconds: float | None = None,
        stop: threading.Event | None = None,
        final_flush: bool = True,
    ) -> int:
        """Write until ``count`` writes, ``seconds`` elapsed or ``stop`` is set.

        Returns the number of writes done. At least one bound is required.
        ``final_flush`` FLUSHes every volume at the end, so that every write of
        the run is durable.
        """
        if count is None and seconds is None and stop is None:
            raise ValueError("run() needs count, seconds or stop: it must end")
        deadline = time.monotonic() + seconds if seconds is not None else None
        done = 0
        while count is None or done < count:
            if stop is not None and stop.is_set():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.step()
            done += 1
        if final_flush:
            self.flush()
        return done
