"""Reverse protection on the source: while failed over, rounds pull the
recovery side's changes into the (fenced) volumes, each as of one of its
checkpoints, staged in a file first, so that a crash mid-way leaves the
volumes at the previous round's point, or finishes applying this one at the
next start.

Files, in the group's state directory: ``reverse.staging`` (the round's
blocks, see ``havend.staging``) and ``reverse.staged`` (present once a round
is staged whole: the round's record, applied at start if need be).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, BinaryIO

from havend.fsutil import write_atomic
from havend.ship.records import Fence, ReverseRound
from havend.staging import stage, staged

if TYPE_CHECKING:
    from havend.ship.source import SourceGroup

log = logging.getLogger("havend.source")


class ReverseStaging:
    """SourceGroup's part: staging and applying reverse rounds."""

    def _reverse_paths(self: SourceGroup) -> tuple[str, str]:
        assert self.state_dir is not None
        return (
            os.path.join(self.state_dir, "reverse.staging"),
            os.path.join(self.state_dir, "reverse.staged"),
        )

    def reverse_staging(self: SourceGroup) -> BinaryIO:
        """An empty staging file for a round's blocks (see :meth:`stage`)."""
        staging, marker = self._reverse_paths()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        return open(staging, "wb")  # the round closes it

    @staticmethod
    def stage(staging: BinaryIO, volume: int, offset: int, data: bytes) -> None:
        stage(staging, volume, offset, data)

    def apply_reverse(self: SourceGroup, staging: BinaryIO, round_: ReverseRound) -> None:
        """Every block of a round is staged: make that durable, then write them
        into the volumes and record the round in the fence."""
        staging.flush()
        os.fdatasync(staging.fileno())
        staging.close()
        _, marker = self._reverse_paths()
        write_atomic(marker, json.dumps(round_.to_dict()).encode())
        self._apply_staged(round_)

    def recover_reverse(self: SourceGroup) -> None:
        """At start: finish applying a round that was staged whole before a crash."""
        if not self.state_dir:
            return
        staging, marker = self._reverse_paths()
        try:
            with open(marker) as f:
                round_ = ReverseRound.from_dict(json.load(f), record=marker)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)  # a round cut short: the volumes never saw it
            return
        log.warning("group %s: finishing reverse round %s", self.name, round_.checkpoint)
        self._apply_staged(round_)

    def _apply_staged(self: SourceGroup, round_: ReverseRound) -> None:
        staging, marker = self._reverse_paths()
        with self.lock:
            # The journal's records are superseded: never replayed over these blocks.
            self._sync_volumes(self.journal.last_seq)
            with open(staging, "rb") as f:
                for volume, offset, data in staged(f):
                    self.volumes[volume].volume.write(offset, data)
            for member in self.volumes:
                member.volume.flush()
        fence = self.fence or Fence("")  # (a round runs only while failed over: fenced)
        done = (fence.reverse.rounds or 0) if fence.reverse is not None else 0
        self.set_fence(replace(fence, reverse=replace(round_, rounds=done + 1)))
        os.unlink(marker)
        os.unlink(staging)
