"""Reading typed records back from their JSON objects, key by key.

The durable records of a failover (the source's fence, ``ship.records``;
the target's promotion records, ``target.records``) and the promotion
records both ends exchange (``link.promotion``) are frozen dataclasses with
``to_dict()``, the JSON object key for key and in the order havend has
always written it, and ``from_dict()``, which reads one through
:class:`Fields` and raises :class:`~havend.errors.MalformedRecord` naming
the first key that is missing or of the wrong type (a key of a part as
``part.key``). Keys a record does not know are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from havend.errors import MalformedRecord

T = TypeVar("T")
Kind = type | tuple[type, ...]


def _fits(value: Any, kind: Kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True  # a JSON number: 1 is a float as much as 1.0 (kept as it was)
    return isinstance(value, kinds)


class Fields:
    """The keys of one record's JSON object (``record``: what it is, for
    errors; ``prefix``: where it sits in the record, for a part)."""

    def __init__(self, record: str, body: Any, prefix: str = "") -> None:
        if not isinstance(body, dict):
            raise MalformedRecord(
                record, prefix.rstrip("."), f"is a {type(body).__name__}, not an object"
            )
        self.record = record
        self.body = body
        self.prefix = prefix

    def _error(self, key: str, why: str) -> MalformedRecord:
        return MalformedRecord(self.record, self.prefix + key, why)

    def required(self, key: str, kind: Kind) -> Any:
        """The value of ``key``, which must be there and of ``kind`` (not null)."""
        if key not in self.body:
            raise self._error(key, "is missing")
        return self._typed(key, kind)

    def optional(self, key: str, kind: Kind) -> Any:
        """The value of ``key`` when it is there and not null, else None."""
        return self._typed(key, kind) if self.body.get(key) is not None else None

    def _typed(self, key: str, kind: Kind) -> Any:
        value = self.body[key]
        if not _fits(value, kind):
            raise self._error(key, f"is a {type(value).__name__}")
        return value

    def part(self, key: str, read: Callable[[Fields], T]) -> T:
        """The record ``read`` makes of the object at ``key`` (required)."""
        if self.body.get(key) is None:
            raise self._error(key, "is missing")
        return read(Fields(self.record, self.body[key], f"{self.prefix}{key}."))

    def optional_part(self, key: str, read: Callable[[Fields], T]) -> T | None:
        """The record at ``key``, or None when it is absent or null."""
        if self.body.get(key) is None:
            return None
        return read(Fields(self.record, self.body[key], f"{self.prefix}{key}."))


def omit_none(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without its keys whose value is None (those a record writes only when set)."""
    return {k: v for k, v in body.items() if v is not None}
