"""Checking images against a write log: the write-order prefix and durability."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from havend.stamp.blocks import (
    _READ_CHUNK,
    DEFAULT_BLOCK_SIZE,
    ConsistencyError,
    Image,
    Stamp,
    StampError,
    WriteLog,
    _check_block_size,
    _zeros,
    parse_block,
)


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
