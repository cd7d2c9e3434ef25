"""A group's volumes as they change while it replicates: the slots both sides
keep, and the VOLUME journal records that put each change in the group's
one write order.

A volume is a *slot* of its group, numbered in the order volumes were added:
journal records name their volume by that number, so a number is never
reused. A removed volume keeps its slot (``state: removed``) and a volume
added later gets a new one, whatever its name.

A volume added to a live group is copied to the target through the journal
(``ship.members``): its slot is ``syncing`` until the copy is done, when a
``synced`` marker follows the copy's last record; from that marker on, the
replica of the volume is a write-order prefix like the others. The markers
(``Kind.VOLUME``, payload JSON):

- ``{"event": "added", "name", "size", "server"}``: the target makes the slot's
  replica (sparse, zeroed) before it takes the records that follow;
- ``{"event": "synced"}``: the volume's copy is complete here;
- ``{"event": "removed", "purge"}``: no record of the volume follows; the
  target detaches its replica, and deletes it with ``purge``.

The record's ``volume`` field is the slot. Every HELLO lists the slots too
(``link.hello``), so a marker lost with a journal overflow (its records
replaced by a region resync) is made good there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from havend.errors import Invalid

SYNCING = "syncing"
PROTECTED = "protected"
REMOVED = "removed"
STATES = (SYNCING, PROTECTED, REMOVED)
EVENTS = ("added", "synced", "removed")


@dataclass(frozen=True, slots=True)
class Slot:
    """One volume of a group (on the source: ``members.json`` of the group's
    state directory, a list in slot order)."""

    index: int
    name: str
    path: str
    size: int
    state: str = PROTECTED
    copied: int = 0  # bytes of a syncing volume journaled so far (from the start)
    server: str | None = None
    purge: bool = False  # removed: and its replica deleted on the target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: Any) -> Slot:
        if not isinstance(body, dict):
            raise Invalid(f"a volume slot is a JSON object, not {type(body).__name__}")
        try:
            slot = cls(
                index=_int(body, "index"),
                name=str(body["name"]),
                path=str(body["path"]),
                size=_int(body, "size"),
                state=str(body.get("state", PROTECTED)),
                copied=_int(body, "copied", 0),
                server=None if body.get("server") is None else str(body["server"]),
                purge=bool(body.get("purge", False)),
            )
        except KeyError as exc:
            raise Invalid(f"a volume slot has no {exc.args[0]!r}", field=exc.args[0]) from None
        if slot.state not in STATES:
            raise Invalid(f"volume slot {slot.name}: unknown state {slot.state!r}", field="state")
        return slot

    def but(self, **changes: Any) -> Slot:
        return replace(self, **changes)


def _int(body: dict[str, Any], key: str, default: int | None = None) -> int:
    value = body.get(key, default) if default is not None else body[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid(f"a volume slot's {key!r} is not a count: {value!r}", field=key)
    return value


def load_slots(text: str) -> list[Slot]:
    """``members.json``'s slots, checked: numbered 0, 1, 2... in order, live
    names unique."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise Invalid(f"members.json is not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise Invalid("members.json is not a list of volume slots")
    slots = [Slot.from_dict(entry) for entry in raw]
    for i, slot in enumerate(slots):
        if slot.index != i:
            raise Invalid(f"members.json: slot {i} says it is slot {slot.index}")
    live = [s.name for s in slots if s.state != REMOVED]
    if len(set(live)) != len(live):
        raise Invalid("members.json names a live volume twice")
    return slots


def dump_slots(slots: list[Slot]) -> bytes:
    return json.dumps([s.to_dict() for s in slots], indent=2).encode()


@dataclass(frozen=True, slots=True)
class VolumeEvent:
    """What a ``Kind.VOLUME`` record says about its slot."""

    event: str
    name: str = ""
    size: int = 0
    purge: bool = False
    server: str | None = None  # added: the protected server it is a disk of

    def payload(self) -> bytes:
        body: dict[str, Any] = {"event": self.event}
        if self.event == "added":
            body |= {"name": self.name, "size": self.size, "server": self.server}
        if self.event == "removed":
            body["purge"] = self.purge
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, payload: bytes | bytearray | memoryview) -> VolumeEvent:
        try:
            body = json.loads(bytes(payload))
        except ValueError as exc:
            raise Invalid(f"a VOLUME record's payload is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("event") not in EVENTS:
            raise Invalid(f"a VOLUME record with an unknown event: {body!r}")
        event = body["event"]
        if event == "added":
            name, size = body.get("name"), body.get("size")
            if not isinstance(name, str) or not name or not isinstance(size, int) or size < 0:
                raise Invalid(f"a VOLUME 'added' record without a name and size: {body!r}")
            server = body.get("server")
            return cls(event, name, size, server=server if isinstance(server, str) else None)
        return cls(event, purge=bool(body.get("purge", False)))
