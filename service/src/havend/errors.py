"""The one exception hierarchy of havend.

Callers convert these to user-facing messages at the edge (CLI, API, NBD error
replies); inside, raise the most specific class that says who is at fault.
"""

from __future__ import annotations


class HavendError(Exception):
    """Base of every error havend raises on purpose."""


class ConfigError(HavendError):
    """The operator asked for something impossible (bad path, bad option)."""


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


class CheckpointError(HavendError):
    """A checkpoint, view or rollback cannot be made as asked (unknown id, a
    group in the wrong state, a hook that failed)."""


class ConflictError(CheckpointError):
    """The request clashes with what exists (a name taken, a state that forbids it)."""


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
