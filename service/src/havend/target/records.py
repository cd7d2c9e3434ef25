"""The target group's promotion records as typed records: in ``group.json``.

``promoting`` (:class:`Promoting`: a promotion under way, durably before
anything changes), ``promoted`` (the target's
:class:`~havend.link.promotion.Promoted`), ``hold`` (why the old source's
records are refused: a string), ``split_brain`` (:class:`TargetSplitBrain`),
``split_brain_resolved`` (:class:`Resolution`, for the recovery side) and the
``history`` (:class:`HistoryEvent`: promotions, split brains, resolutions,
failbacks, rollbacks). :class:`PromotionMeta` holds them all and puts them
back into ``group.json``'s object, each key where it was.

``to_dict()`` gives each record's JSON object, key for key and in the order
havend has always written it; ``from_dict()`` raises
:class:`~havend.errors.MalformedRecord` naming the first key missing or of
the wrong type (see ``havend.records``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from havend.link.promotion import LossWindow, Promoted, RecoverySide
from havend.records import Fields, omit_none


@dataclass(frozen=True)
class Promoting:
    """A promotion under way: at which retained checkpoint (None: the latest
    consistent point), the generation before it, planned or not."""

    checkpoint: str | None
    previous_generation: str | None
    planned: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "previous_generation": self.previous_generation,
            "planned": self.planned,
        }

    @classmethod
    def read(cls, f: Fields) -> Promoting:
        return cls(
            checkpoint=f.optional("checkpoint", str),
            previous_generation=f.optional("previous_generation", str),
            planned=f.required("planned", bool),
        )


@dataclass(frozen=True)
class TargetSplitBrain:
    """This side's record of a split brain: when the old source reported it,
    the promoted generation, what the old source wrote after the promotion
    (with its ``node``) and what this side changed since."""

    detected: float
    generation: str
    production: LossWindow
    recovery: RecoverySide

    def to_dict(self) -> dict[str, Any]:
        return {
            "detected": self.detected,
            "generation": self.generation,
            "production": self.production.to_dict(),
            "recovery": self.recovery.to_dict(),
        }

    @classmethod
    def from_dict(cls, body: Any, record: str = "split brain") -> TargetSplitBrain:
        return cls.read(Fields(record, body))

    @classmethod
    def read(cls, f: Fields) -> TargetSplitBrain:
        return cls(
            detected=f.required("detected", float),
            generation=f.required("generation", str),
            production=f.part("production", LossWindow.read),
            recovery=f.part("recovery", RecoverySide.read),
        )


@dataclass(frozen=True)
class Resolution:
    """A split brain resolved: when, for which side (``recovery`` or
    ``production``), of which promoted generation, its record; for the old
    source's side also the snapshot of what this side held where the resync
    replaced it, and the replica's new generation."""

    time: float
    survivor: str
    generation: str
    split_brain: TargetSplitBrain | None
    snapshot: dict[str, Any] | None = None  # survivor production only
    replica_generation: str | None = None  # survivor production only

    def to_dict(self) -> dict[str, Any]:
        split = self.split_brain.to_dict() if self.split_brain is not None else None
        return {
            "time": self.time,
            "survivor": self.survivor,
            "generation": self.generation,
            "split_brain": split,
        } | omit_none({"snapshot": self.snapshot, "replica_generation": self.replica_generation})

    @classmethod
    def read(cls, f: Fields) -> Resolution:
        return cls(
            time=f.required("time", float),
            survivor=f.required("survivor", str),
            generation=f.required("generation", str),
            split_brain=f.optional_part("split_brain", TargetSplitBrain.read),
            snapshot=f.optional("snapshot", dict),
            replica_generation=f.optional("replica_generation", str),
        )


@dataclass(frozen=True)
class Failback:
    """A failback done: when, the seq records resumed after, the promotion it
    ended, the replica's new generation."""

    time: float
    resume_seq: int
    promoted: Promoted | None
    replica_generation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        promoted = self.promoted.to_dict() if self.promoted is not None else None
        body = {"time": self.time, "resume_seq": self.resume_seq, "promoted": promoted}
        return body | omit_none({"replica_generation": self.replica_generation})

    @classmethod
    def read(cls, f: Fields) -> Failback:
        return cls(
            time=f.required("time", float),
            resume_seq=f.required("resume_seq", int),
            promoted=f.optional_part("promoted", Promoted.read),
            replica_generation=f.optional("replica_generation", str),
        )


@dataclass(frozen=True)
class Rollback:
    """A rollback: to which checkpoint (``Checkpoint.to_dict()``), from which generation."""

    rollback_to: dict[str, Any]
    previous_generation: str

    def to_dict(self) -> dict[str, Any]:
        return {"rollback_to": self.rollback_to, "previous_generation": self.previous_generation}

    @classmethod
    def read(cls, f: Fields) -> Rollback:
        return cls(
            rollback_to=f.required("rollback_to", dict),
            previous_generation=f.required("previous_generation", str),
        )


Event = Promoted | TargetSplitBrain | Resolution | Failback | Rollback
# The history's events by their key: {key: record}.
_EVENTS: dict[str, Callable[[Fields], Any]] = {
    "promoted": Promoted.read,
    "split_brain": TargetSplitBrain.read,
    "split_brain_resolved": Resolution.read,
    "failback": Failback.read,
}


@dataclass(frozen=True)
class HistoryEvent:
    """One entry of the history: ``{kind: record}`` (a rollback's entry is
    its record's two keys, kind ``rollback_to``). An entry of a kind not
    known here is kept as it was (``raw``)."""

    kind: str
    record: Event | None
    raw: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.record is None:
            assert self.raw is not None
            return self.raw
        if isinstance(self.record, Rollback):
            return self.record.to_dict()
        return {self.kind: self.record.to_dict()}

    @classmethod
    def read(cls, f: Fields) -> HistoryEvent:
        if "rollback_to" in f.body:
            return cls("rollback_to", Rollback.read(f))
        if len(f.body) == 1:
            (kind,) = f.body
            if kind in _EVENTS:
                return cls(kind, f.part(kind, _EVENTS[kind]))
        return cls("", None, dict(f.body))


@dataclass
class PromotionMeta:
    """The promotion records of a target group (None, "" or empty when it has
    none), read from and put back into ``group.json``'s object."""

    promoting: Promoting | None = None
    promoted: Promoted | None = None
    hold: str = ""
    split_brain: TargetSplitBrain | None = None
    split_brain_resolved: Resolution | None = None
    history: list[HistoryEvent] = field(default_factory=list)

    def record(self, kind: str, record: Event) -> None:
        """Add an event to the history."""
        self.history.append(HistoryEvent(kind, record))

    def events(self, kind: str) -> list[Any]:
        """The history's records of ``kind``, newest first."""
        return [e.record for e in reversed(self.history) if e.kind == kind]

    @classmethod
    def from_meta(cls, meta: dict[str, Any], record: str = "group.json") -> PromotionMeta:
        f = Fields(record, meta)
        history = f.optional("history", list) or []
        return cls(
            promoting=f.optional_part("promoting", Promoting.read),
            promoted=f.optional_part("promoted", Promoted.read),
            hold=f.optional("hold", str) or "",
            split_brain=f.optional_part("split_brain", TargetSplitBrain.read),
            split_brain_resolved=f.optional_part("split_brain_resolved", Resolution.read),
            history=[
                HistoryEvent.read(Fields(record, entry, f"history[{i}]."))
                for i, entry in enumerate(history)
            ],
        )

    def into_meta(self, meta: dict[str, Any]) -> None:
        """Put the records into ``meta`` (``group.json``'s object): a key kept
        where it is, a new one last, one without a record removed."""
        records: dict[str, Any] = {
            "promoting": self.promoting.to_dict() if self.promoting is not None else None,
            "promoted": self.promoted.to_dict() if self.promoted is not None else None,
            "hold": self.hold or None,
            "split_brain": self.split_brain.to_dict() if self.split_brain is not None else None,
            "split_brain_resolved": self.split_brain_resolved.to_dict()
            if self.split_brain_resolved is not None
            else None,
            "history": [e.to_dict() for e in self.history]
            if self.history or "history" in meta
            else None,
        }
        for key, value in records.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
