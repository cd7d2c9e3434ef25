"""Bit-per-unit maps of volume ranges (dirty regions, changed blocks)."""

from __future__ import annotations


def mark_range(bits: bytearray, first_bit: int, offset: int, length: int, unit: int) -> int:
    """Set the bits of the units that ``length`` bytes at ``offset`` touch (a
    volume whose unit 0 is bit ``first_bit``); returns how many were clear."""
    newly = 0
    for unit_index in range(offset // unit, (offset + max(length, 1) - 1) // unit + 1):
        bit = first_bit + unit_index
        mask = 1 << (bit & 7)
        if not bits[bit >> 3] & mask:
            bits[bit >> 3] |= mask
            newly += 1
    return newly


def set_runs(
    bits: bytes | bytearray, first_bit: int, size: int, unit: int
) -> list[tuple[int, int]]:
    """(offset, length) runs of set units of a volume of ``size`` bytes, clipped to it."""
    runs: list[tuple[int, int]] = []
    for unit_index in range((size + unit - 1) // unit):
        bit = first_bit + unit_index
        if bits[bit >> 3] & (1 << (bit & 7)):
            start = unit_index * unit
            length = min(unit, size - start)
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((start, length))
    return runs
