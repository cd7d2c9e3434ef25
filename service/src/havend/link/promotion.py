"""The records both ends keep and exchange about a promotion of the target.

:class:`Promoted` is the target's promotion record (``group.json``'s
``promoted``; the PROMOTED frame's body, with ``rewritten_bytes`` and
``seconds``; a REFUSED frame's ``promoted``) and the source keeps it in its
fence. :class:`LossWindow` counts journaled writes after a seq: what a
failover lost on the source, or its part of a split brain (which the target
records with the source's ``node``). :class:`RecoverySide` is the target's
part of a split brain, which the source records too.

``to_dict()`` gives the JSON object, key for key and in the order havend has
always written it; ``from_dict()`` raises :class:`~havend.errors.MalformedRecord`
naming the first key missing or of the wrong type (see ``havend.records``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from havend.records import Fields, omit_none


@dataclass(frozen=True)
class Promoted:
    """The target's promotion: when, at which seq (and that record's time),
    planned or not, at which retained checkpoint (None: the latest
    consistent point), and the generations before and after it."""

    time: float
    planned: bool
    applied_seq: int
    applied_time: float
    checkpoint: dict[str, Any] | None  # Checkpoint.to_dict() of the one promoted
    previous_generation: str | None
    generation: str
    rewritten_bytes: int | None = None  # the PROMOTED answer's only
    seconds: float | None = None  # the PROMOTED answer's only

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "planned": self.planned,
            "applied_seq": self.applied_seq,
            "applied_time": self.applied_time,
            "checkpoint": self.checkpoint,
            "previous_generation": self.previous_generation,
            "generation": self.generation,
        } | omit_none({"rewritten_bytes": self.rewritten_bytes, "seconds": self.seconds})

    @classmethod
    def from_dict(cls, body: Any, record: str = "promotion record") -> Promoted:
        return cls.read(Fields(record, body))

    @classmethod
    def read(cls, f: Fields) -> Promoted:
        return cls(
            time=f.required("time", float),
            planned=f.required("planned", bool),
            applied_seq=f.required("applied_seq", int),
            applied_time=f.required("applied_time", float),
            checkpoint=f.optional("checkpoint", dict),
            previous_generation=f.optional("previous_generation", str),
            generation=f.required("generation", str),
            rewritten_bytes=f.optional("rewritten_bytes", int),
            seconds=f.optional("seconds", float),
        )


@dataclass(frozen=True)
class LossWindow:
    """Journaled writes after a seq: how many, their bytes, seqs and times
    (None without any), the bytes written by region while the journal was
    full; for a split brain also the 4 KiB blocks they touched, and on the
    target the source node that wrote them."""

    records: int
    bytes: int
    first_seq: int | None
    last_seq: int | None
    first_time: float | None
    last_time: float | None
    regions_bytes: int
    blocks: int | None = None  # a split brain's only
    node: str | None = None  # the target's record of a split brain only

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"node": self.node} if self.node is not None else {}
        body |= {
            "records": self.records,
            "bytes": self.bytes,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "regions_bytes": self.regions_bytes,
        }
        if self.blocks is not None:
            body["blocks"] = self.blocks
        return body

    @classmethod
    def from_dict(cls, body: Any, record: str = "loss window") -> LossWindow:
        return cls.read(Fields(record, body))

    @classmethod
    def read(cls, f: Fields) -> LossWindow:
        return cls(
            records=f.required("records", int),
            bytes=f.required("bytes", int),
            first_seq=f.optional("first_seq", int),
            last_seq=f.optional("last_seq", int),
            first_time=f.optional("first_time", float),
            last_time=f.optional("last_time", float),
            regions_bytes=f.required("regions_bytes", int),
            blocks=f.optional("blocks", int),
            node=f.optional("node", str),
        )


@dataclass(frozen=True)
class RecoverySide:
    """The promoted side's part of a split brain: since when (its promotion),
    its newest write, and what it changed since (bytes, 4 KiB blocks,
    ranges)."""

    since: float
    last_write_time: float | None
    changed_bytes: int
    changed_blocks: int
    ranges: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "last_write_time": self.last_write_time,
            "changed_bytes": self.changed_bytes,
            "changed_blocks": self.changed_blocks,
            "ranges": self.ranges,
        }

    @classmethod
    def from_dict(cls, body: Any, record: str = "recovery side") -> RecoverySide:
        return cls.read(Fields(record, body))

    @classmethod
    def read(cls, f: Fields) -> RecoverySide:
        return cls(
            since=f.required("since", float),
            last_write_time=f.optional("last_write_time", float),
            changed_bytes=f.required("changed_bytes", int),
            changed_blocks=f.required("changed_blocks", int),
            ranges=f.required("ranges", int),
        )
