"""Per-block xxh3 hashes: how two copies of a volume find where they differ."""

from __future__ import annotations

import xxhash

from havend.volume import FileVolume


def block_hashes(data: bytes | memoryview, granularity: int) -> list[int]:
    """xxh3-64 of each ``granularity``-sized block of ``data`` (the last may be shorter)."""
    view = memoryview(data)
    digest = xxhash.xxh3_64_intdigest
    return [digest(view[i : i + granularity]) for i in range(0, len(view), granularity)]


def hash_ranges(volume: FileVolume, ranges: list[tuple[int, int]], granularity: int) -> list[int]:
    """Hashes of every block of every range, in order; ranges are read whole."""
    out: list[int] = []
    for offset, length in ranges:
        if offset + length > volume.size:
            raise ValueError(f"range {offset}+{length} is beyond the volume ({volume.size})")
        out += block_hashes(volume.read(offset, length), granularity)
    return out


def differing_runs(ours: list[int], theirs: list[int], granularity: int) -> list[tuple[int, int]]:
    """(start, length) byte runs, relative to the first block, where hashes differ."""
    runs: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a == b:
            continue
        start = i * granularity
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + granularity)
        else:
            runs.append((start, granularity))
    return runs
