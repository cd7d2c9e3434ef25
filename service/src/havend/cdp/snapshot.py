"""The snapshots of a losing side: what a failback (the old source's unshipped
writes) or a split brain resolved for production (the recovery side's
writes) replaced, kept as an undo log with one checkpoint (see
``undo.snapshot_ranges``) and exported read-only over NBD on request.

A snapshot view reads the group's volumes as they are now and lays the saved
blocks over them: every block the failback or resolution replaced reads as
it was before, the others as they are now.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

from havend.cdp.undo import UndoLog, Volume
from havend.cdp.view import PointInTimeView
from havend.errors import CheckpointError, NotFound

_NAME = re.compile(r"^(failback|split-brain)-[0-9a-f-]{36}$")


class Snapshots:
    """The snapshots kept under one group's directory, and their open views."""

    def __init__(self, directory: str, names: Sequence[str], volumes: Sequence[Volume]) -> None:
        self.directory = directory
        self.names = list(names)  # volume names, in group order
        self.volumes = volumes
        self._open: dict[str, tuple[UndoLog, list[PointInTimeView]]] = {}

    def _path(self, name: str) -> str:
        if not _NAME.match(name) or not os.path.isdir(os.path.join(self.directory, name)):
            raise NotFound(f"no snapshot {name!r} (havend snapshot list)")
        return os.path.join(self.directory, name)

    def list(self) -> list[dict[str, Any]]:
        out = []
        entries = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
        for entry in entries:
            if not _NAME.match(entry):
                continue
            undo = self._log(entry)
            try:
                status = undo.status()
                checkpoint = status["oldest"]
                out.append(
                    {
                        "name": entry,
                        "kind": entry.split("-")[0],
                        "checkpoint": checkpoint,
                        "bytes": status["undo_bytes"],
                        "views_open": len(self._open.get(entry, (None, []))[1]),
                    }
                )
            finally:
                if entry not in self._open:
                    undo.close()
        return out

    def _log(self, name: str) -> UndoLog:
        if name in self._open:
            return self._open[name][0]
        return UndoLog(self._path(name), [v.size for v in self.volumes])

    def open(self, name: str, volume: str) -> PointInTimeView:
        if volume not in self.names:
            raise NotFound(f"no volume {volume!r} in this group")
        undo = self._log(name)
        if not undo.checkpoints:
            if name not in self._open:
                undo.close()
            raise CheckpointError(f"snapshot {name} holds no checkpoint")
        view = PointInTimeView(
            undo, self.volumes, self.names.index(volume), undo.checkpoints[0], name=name
        )
        self._open.setdefault(name, (undo, []))[1].append(view)
        return view

    def close(self, view: PointInTimeView) -> None:
        for name, (undo, views) in list(self._open.items()):
            if view in views:
                views.remove(view)
                view.close()
                if not views:
                    undo.close()
                    del self._open[name]
                return

    def delete(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        if name in self._open:
            raise CheckpointError(f"snapshot {name} has open views: close them first")
        size = sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if os.path.isfile(os.path.join(path, f))
        )
        shutil.rmtree(path)
        return {"name": name, "freed_bytes": size}

    def is_open(self, name: str) -> bool:
        return name in self._open
