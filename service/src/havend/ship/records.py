"""The source group's fence as a typed record: ``fence.json``.

A :class:`Fence` says why the group's writes are refused: a planned failover
in progress (``pid``, ``stage``: ``draining``, then ``promoting`` with
``final_seq``), or the target's promotion (``promoted``, the target's
:class:`~havend.link.promotion.Promoted`) with what never reached it
(``lost``), the latest round of reverse protection (``reverse``), this
side's part of a split brain (``split_brain``) or, once one was resolved for
the recovery side, that record (``split_brain_resolved``).

``to_dict()`` is ``fence.json``'s object, key for key and in the order
havend has always written it (a key only when set); ``from_dict()`` reads
one and raises :class:`~havend.errors.MalformedRecord` naming the first key
missing or of the wrong type (see ``havend.records``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from havend.link.promotion import LossWindow, Promoted, RecoverySide
from havend.records import Fields, omit_none


@dataclass(frozen=True)
class ReverseRound:
    """A round of reverse protection, applied here: the recovery side's
    checkpoint (id, its time) the volumes now hold, whether only what changed
    since the previous round was pulled, the bytes compared, pulled and on
    the wire, when and how long; in the fence, ``rounds`` so far."""

    checkpoint: str
    checkpoint_time: float
    incremental: bool
    compared_bytes: int
    pulled_bytes: int
    wire_bytes: int
    time: float
    seconds: float
    rounds: int | None = None  # the fence's (reverse.staged has none)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "checkpoint": self.checkpoint,
            "checkpoint_time": self.checkpoint_time,
            "incremental": self.incremental,
            "compared_bytes": self.compared_bytes,
            "pulled_bytes": self.pulled_bytes,
            "wire_bytes": self.wire_bytes,
            "time": self.time,
            "seconds": self.seconds,
        }
        return body | omit_none({"rounds": self.rounds})

    @classmethod
    def from_dict(cls, body: Any, record: str = "reverse round") -> ReverseRound:
        return cls.read(Fields(record, body))

    @classmethod
    def read(cls, f: Fields) -> ReverseRound:
        return cls(
            checkpoint=f.required("checkpoint", str),
            checkpoint_time=f.required("checkpoint_time", float),
            incremental=f.required("incremental", bool),
            compared_bytes=f.required("compared_bytes", int),
            pulled_bytes=f.required("pulled_bytes", int),
            wire_bytes=f.required("wire_bytes", int),
            time=f.required("time", float),
            seconds=f.required("seconds", float),
            rounds=f.optional("rounds", int),
        )


@dataclass(frozen=True)
class SourceSplitBrain:
    """This side's record of a split brain: when it was found, the promoted
    generation, this clock's time of the promotion (``since``) and how it was
    measured (the target's clock offset, the round trip), this side's writes
    since (``production``) and, once the target recorded it, its part
    (``recovery``); resolved, the ``survivor``."""

    detected: float
    generation: str | None
    since: float
    clock_offset_s: float
    round_trip_s: float
    production: LossWindow
    recovery: RecoverySide | None = None  # filled in once the target recorded it
    survivor: str | None = None  # split_brain_resolved only

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "detected": self.detected,
            "generation": self.generation,
            "since": self.since,
            "clock_offset_s": self.clock_offset_s,
            "round_trip_s": self.round_trip_s,
            "production": self.production.to_dict(),
            "recovery": self.recovery.to_dict() if self.recovery is not None else None,
        }
        return body | omit_none({"survivor": self.survivor})

    @classmethod
    def read(cls, f: Fields) -> SourceSplitBrain:
        return cls(
            detected=f.required("detected", float),
            generation=f.optional("generation", str),
            since=f.required("since", float),
            clock_offset_s=f.required("clock_offset_s", float),
            round_trip_s=f.required("round_trip_s", float),
            production=f.part("production", LossWindow.read),
            recovery=f.optional_part("recovery", RecoverySide.read),
            survivor=f.optional("survivor", str),
        )


@dataclass(frozen=True)
class Fence:
    """Why the group's writes are refused (see the module's docstring); every
    part but ``reason`` is None when it does not apply."""

    reason: str
    pid: int | None = None  # the process of a planned failover in progress
    stage: str | None = None  # a planned failover's: draining, then promoting
    final_seq: int | None = None  # promoting: the seq the target promotes at
    promoted: Promoted | None = None
    lost: LossWindow | None = None  # what never reached the target
    split_brain: SourceSplitBrain | None = None
    split_brain_resolved: SourceSplitBrain | None = None  # for the recovery side
    reverse: ReverseRound | None = None  # the latest round

    @property
    def generation(self) -> str | None:
        """The promoted generation, once the target is promoted."""
        return self.promoted.generation if self.promoted is not None else None

    def to_dict(self) -> dict[str, Any]:
        parts = (self.promoted, self.lost, self.split_brain, self.split_brain_resolved)
        promoted, lost, split, resolved = (p.to_dict() if p is not None else None for p in parts)
        return {"reason": self.reason} | omit_none(
            {
                "pid": self.pid,
                "stage": self.stage,
                "final_seq": self.final_seq,
                "promoted": promoted,
                "lost": lost,
                "split_brain": split,
                "split_brain_resolved": resolved,
                "reverse": self.reverse.to_dict() if self.reverse is not None else None,
            }
        )

    @classmethod
    def from_dict(cls, body: Any, record: str = "fence") -> Fence:
        f = Fields(record, body)
        return cls(
            reason=f.required("reason", str),
            pid=f.optional("pid", int),
            stage=f.optional("stage", str),
            final_seq=f.optional("final_seq", int),
            promoted=f.optional_part("promoted", Promoted.read),
            lost=f.optional_part("lost", LossWindow.read),
            split_brain=f.optional_part("split_brain", SourceSplitBrain.read),
            split_brain_resolved=f.optional_part("split_brain_resolved", SourceSplitBrain.read),
            reverse=f.optional_part("reverse", ReverseRound.read),
        )
