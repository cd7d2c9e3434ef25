"""A promoted replica volume: writable over NBD, every change tracked and the
retained checkpoints kept exact (the undo log saves what a write overwrites)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence

from havend.cdp.undo import UndoLog
from havend.target.changes import ChangeMap
from havend.volume import FileVolume


class PromotedVolume:
    """The NBD server's volume interface over one replica volume of a promoted group."""

    def __init__(
        self,
        volumes: Sequence[FileVolume],
        index: int,
        name: str,
        undo: UndoLog,
        changes: ChangeMap,
        lock: threading.Lock,
    ) -> None:
        self.volumes = volumes
        self.index = index
        self.volume = volumes[index]
        self.name = name
        self.path = self.volume.path
        self.size = self.volume.size
        self.read_only = False
        self.undo = undo
        self.changes = changes
        self._lock = lock  # one per group: a change is tracked, saved, then made
        self.fenced = ""  # why writes are refused (a failback is taking the data home)
        # Reverse protection: the rounds' checkpoints (the old source pulls the
        # blocks changed between two of them, as of the newer).
        self.reverse: UndoLog | None = None

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def _change(self, offset: int, length: int, do: Callable[[], None]) -> None:
        with self._lock:
            if self.fenced:
                raise OSError(errno.EROFS, self.fenced)
            self.changes.mark(self.index, offset, length)  # durable before the change
            self.undo.preserve(self.volumes, None, [(self.index, offset, length)])
            if self.reverse is not None:
                self.reverse.preserve(self.volumes, None, [(self.index, offset, length)])
            do()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._change(offset, len(data), lambda: self.volume.write(offset, data))

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write(offset, data)
        self.flush()

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True) -> None:
        self._change(
            offset, length, lambda: self.volume.write_zeroes(offset, length, may_trim=may_trim)
        )

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def flush(self) -> None:
        self.volume.flush()
        self.changes.flush()

    def close(self) -> None:
        pass  # the group owns the file
