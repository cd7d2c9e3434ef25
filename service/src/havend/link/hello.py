"""The records of a session's opening: the source's ``HELLO`` and the
target's ``WELCOME`` (their keys are in ``link.wire``'s docstring).

``to_body()`` gives the frame's JSON object, key for key and in the order
both ends have always sent; ``from_body()`` reads a peer's and raises
:class:`MalformedFrame` (a :class:`RemoteProtocolError`) naming the first
key that is missing or of the wrong type.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from havend.cdp.retention import RetentionPolicy
from havend.errors import Invalid, RemoteProtocolError
from havend.members import STATES


class MalformedFrame(RemoteProtocolError):
    """A peer's HELLO or WELCOME with a key missing or of the wrong type."""

    def __init__(self, frame: str, key: str, why: str) -> None:
        super().__init__(f"{frame}: {key!r} {why}")
        self.frame = frame
        self.key = key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required(frame: str, body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise MalformedFrame(frame, key, "is missing")
    return _typed(frame, body, key, kind)


def _optional(frame: str, body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    return _typed(frame, body, key, kind) if body.get(key) is not None else None


def _typed(frame: str, body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body[key]
    if kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise MalformedFrame(frame, key, f"is a {type(value).__name__}")
    return value


@dataclass(frozen=True)
class HelloVolume:
    """One of the group's volumes, as the source declares it."""

    name: str
    size: int
    state: str = "protected"  # syncing, protected or removed (see havend.members)
    purge: bool = False  # removed, and its replica deleted
    server: str | None = None  # the protected server it is a disk of (a label)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "size": self.size}
        if self.state != "protected":
            body["state"] = self.state
        if self.purge:
            body["purge"] = True
        if self.server is not None:
            body["server"] = self.server
        return body


@dataclass(frozen=True)
class Hello:
    """The source's opening of a session: its group and, for a session of its
    own, what it is for (``failback``, ``reverse``, ``resolve``), and its part
    of a split brain (``split_brain``)."""

    version: int
    node: str
    group: uuid.UUID
    name: str
    mode: str
    volumes: tuple[HelloVolume, ...]
    retention: RetentionPolicy | None = None
    split_brain: dict[str, Any] | None = None
    failback: dict[str, Any] | None = None
    reverse: dict[str, Any] | None = None
    resolve: dict[str, Any] | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": self.version,
            "node": self.node,
            "group": str(self.group),
            "name": self.name,
            "mode": self.mode,
            "volumes": [v.to_dict() for v in self.volumes],
        }
        if self.retention is not None:
            body["retention"] = self.retention.to_dict()
        for key in ("split_brain", "failback", "reverse", "resolve"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body

    def volume_dicts(self) -> list[dict[str, Any]]:
        """The volumes as the target's group records take them."""
        return [v.to_dict() for v in self.volumes]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Hello:
        f = "HELLO"
        raw_group = _required(f, body, "group", str)
        try:
            group = uuid.UUID(raw_group)
        except ValueError:
            raise MalformedFrame(f, "group", "is not a UUID") from None
        name = _required(f, body, "name", str)
        volumes = []
        for entry in _required(f, body, "volumes", list):
            if not isinstance(entry, dict):
                raise MalformedFrame(f, "volumes", f"holds a {type(entry).__name__}")
            state = _optional(f, entry, "state", str) or "protected"
            if state not in STATES:
                raise MalformedFrame(f, "volumes", f"holds a volume in state {state!r}")
            volumes.append(
                HelloVolume(
                    _required(f, entry, "name", str),
                    _required(f, entry, "size", int),
                    state,
                    bool(_optional(f, entry, "purge", bool)),
                    _optional(f, entry, "server", str),
                )
            )
        retention = None
        if "retention" in body and body["retention"] is not None:
            try:
                retention = RetentionPolicy.from_dict(body["retention"])
            except Invalid as exc:
                raise MalformedFrame(f, "retention", f"is not a policy ({exc})") from None
        return cls(
            version=_required(f, body, "version", int),
            node=_required(f, body, "node", str),
            group=group,
            name=name,
            mode=_required(f, body, "mode", str),
            volumes=tuple(volumes),
            retention=retention,
            split_brain=_optional(f, body, "split_brain", dict),
            failback=_optional(f, body, "failback", dict),
            reverse=_optional(f, body, "reverse", dict),
            resolve=_optional(f, body, "resolve", dict),
        )


@dataclass(frozen=True)
class Welcome:
    """The target's answer to a HELLO it admits. The steady session's has
    ``durable_seq``, ``state`` and ``generation`` (and, for a failback,
    ``failback`` with ``applied_seq`` and ``changed``; when it asked for one the
    target finished already, ``failback_done``); a resolution's has
    ``resolve``, a reverse round's ``reverse``, ``checkpoint`` and
    ``incremental``, both with ``changed`` and ``applied_seq``."""

    node: str
    durable_seq: int | None = None
    state: str | None = None
    generation: str | None = None
    failback: bool = False
    resolve: bool = False
    reverse: bool = False
    checkpoint: dict[str, Any] | None = None
    incremental: bool | None = None
    applied_seq: int | None = None
    changed: list[Any] | None = None
    answers_failback: bool = False  # the HELLO asked for a failback: failback_done says
    failback_done: dict[str, Any] | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"node": self.node}
        if not (self.resolve or self.reverse):
            body |= {
                "durable_seq": self.durable_seq,
                "state": self.state,
                "generation": self.generation,
            }
        if self.failback:
            body |= {"failback": True, "applied_seq": self.applied_seq, "changed": self.changed}
        if self.resolve:
            body |= {"resolve": True, "changed": self.changed, "applied_seq": self.applied_seq}
        if self.reverse:
            body |= {
                "reverse": True,
                "checkpoint": self.checkpoint,
                "incremental": self.incremental,
                "changed": self.changed,
                "applied_seq": self.applied_seq,
            }
        if self.answers_failback:
            body["failback_done"] = self.failback_done
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Welcome:
        f = "WELCOME"
        failback = _optional(f, body, "failback", bool) or False
        resolve = _optional(f, body, "resolve", bool) or False
        reverse = _optional(f, body, "reverse", bool) or False
        steady = not (resolve or reverse)
        delta = failback or resolve or reverse
        return cls(
            node=_required(f, body, "node", str),
            durable_seq=_required(f, body, "durable_seq", int) if steady else None,
            state=_optional(f, body, "state", str),
            generation=_optional(f, body, "generation", str),
            failback=failback,
            resolve=resolve,
            reverse=reverse,
            checkpoint=_required(f, body, "checkpoint", dict) if reverse else None,
            incremental=_required(f, body, "incremental", bool) if reverse else None,
            applied_seq=_required(f, body, "applied_seq", int) if delta else None,
            changed=_required(f, body, "changed", list) if delta else None,
            answers_failback="failback_done" in body,
            failback_done=_optional(f, body, "failback_done", dict),
        )
