"""The one exception hierarchy of havend.

Callers convert these to user-facing messages at the edge (CLI, API, NBD error
replies); inside, raise the most specific class that says who is at fault.

Three classes say what a request ran into, whatever part of havend raised it;
the edges map them by class, never by message text (the REST API: 404, 409
and 422, in ``havend.api.app``):

``NotFound``   the group, volume, checkpoint, view or operation asked for does
               not exist here
``Conflict``   it exists, but its state forbids the request (an illegal
               transition, another operation running, a name taken)
``Invalid``    the request itself is wrong (a bad argument or setting)

Any other ``HavendError`` that reaches an edge is a conflict too: the request
was understood and could not be carried out as things are.
"""

from __future__ import annotations


class HavendError(Exception):
    """Base of every error havend raises on purpose."""


class NotFound(HavendError):
    """The object a request names does not exist on this node."""


class Conflict(HavendError):
    """The object exists but its state forbids the request (illegal transition, busy)."""


class Busy(Conflict):
    """Another operation holds the group for a moment: the request was refused
    before anything was done, and may be sent again (the API answers 409 with
    ``Retry-After``)."""


class Invalid(HavendError):
    """The request is malformed or asks for something impossible (a bad argument).
    ``field`` names the argument at fault when one is ("" when none is)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ConfigError(Invalid):
    """The operator asked for something impossible (bad path, bad option); the
    message starts with the path of the bad key (``groups[0].volumes: ...``),
    which is its ``field``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, message.split(":", 1)[0] if ":" in message else "")


class ProtocolError(HavendError):
    """A wire protocol was violated."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: drop that one connection, keep serving the rest."""


class LocalProtocolError(ProtocolError):
    """havend itself tried something the protocol forbids: a bug in havend."""


class VolumeError(HavendError):
    """A volume could not be opened or used."""


class JournalError(HavendError):
    """A journal could not be created, opened or appended to."""


class JournalCorruptError(JournalError):
    """Journal data failed its checks: reported, never applied."""


class CheckpointError(Conflict):
    """A checkpoint, view, failover or rollback cannot be made as asked (a group
    in the wrong state, a hook that failed)."""


class UndoCorruptError(HavendError):
    """The CDP undo log failed its checks: the history before the damage is dropped."""


class CertificateError(HavendError):
    """TLS material could not be created, read or used (bad name, existing CA, bad PEM)."""


class NBDClientError(HavendError):
    """An NBD server refused a request or the handshake.

    ``error`` is the NBD error code of the reply (``havend.nbd.constants.Error``,
    e.g. 28 for ENOSPC); 0 when the refusal came in the handshake, where the
    message names the option reply instead.
    """

    def __init__(self, message: str, error: int = 0) -> None:
        super().__init__(message)
        self.error = error


def status_code(exc: BaseException) -> int:
    """The HTTP status a request that raised ``exc`` is answered with, and the
    audit log records: by class, whatever the message says."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Invalid):
        return 422
    return 409


class MalformedRecord(HavendError):
    """A durable record (``fence.json``, the promotion records of ``group.json``)
    or one a peer sent, with a key missing or of the wrong type: ``record`` is
    the record, ``key`` the key at fault (``promoted.generation`` for a key of
    one of its parts)."""

    def __init__(self, record: str, key: str, why: str) -> None:
        super().__init__(f"{record}: {key!r} {why}" if key else f"{record} {why}")
        self.record = record
        self.key = key
