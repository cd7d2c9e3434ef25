"""The stamped writer: stamped blocks through NBD, every write in a WriteLog."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Literal

from havend.nbd.client import NBDClient
from havend.stamp.blocks import (
    DEFAULT_BLOCK_SIZE,
    Stamp,
    WriteLog,
    _check_block_size,
    make_block,
)


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
