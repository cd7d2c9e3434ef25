"""Checkpoints: what a CHECKPOINT journal record says."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from havend.errors import CheckpointError
from havend.journal.record import Kind, Record

CONSISTENCY = ("crash", "app")
MAX_LABEL = 200


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A point of a group's sequence: the volumes as after every write with a
    smaller seq. ``time`` is the source's clock when it was taken."""

    id: str
    seq: int
    time: float
    label: str = ""
    consistency: str = "crash"  # "app": taken between a freeze and a thaw hook

    def payload(self) -> bytes:
        body = {"id": self.id, "time": self.time, "label": self.label}
        return json.dumps(body | {"consistency": self.consistency}).encode()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def new(cls, label: str = "", consistency: str = "crash") -> Checkpoint:
        """A checkpoint to be appended (its seq is the record's)."""
        if consistency not in CONSISTENCY:
            raise CheckpointError(f"consistency must be one of {', '.join(CONSISTENCY)}")
        if len(label) > MAX_LABEL:
            raise CheckpointError(f"label longer than {MAX_LABEL} characters")
        return cls(uuid.uuid4().hex, 0, time.time(), label, consistency)

    @classmethod
    def from_record(cls, record: Record) -> Checkpoint:
        if record.kind != Kind.CHECKPOINT:
            raise ValueError(f"record {record.seq} is not a checkpoint")
        return cls.from_payload(record.seq, bytes(record.data))

    @classmethod
    def from_payload(cls, seq: int, payload: bytes) -> Checkpoint:
        try:
            body = json.loads(payload)
            return cls(
                str(body["id"]),
                seq,
                float(body["time"]),
                str(body.get("label", "")),
                str(body.get("consistency", "crash")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint record {seq} is malformed: {exc}") from None
