"""A replica group's volumes as the source adds and removes them (see
``havend.members``): the replica of an added volume is made when its
``added`` marker arrives (or the HELLO lists it), it is complete from its
``synced`` marker on, and a removed one is detached (deleted with
``purge``) at its ``removed`` marker (or when the HELLO says so).

``group.json``'s ``volumes`` keep it, per slot: ``state`` (``syncing`` until
the copy is complete, ``removed`` once detached; absent: complete),
``synced_seq`` (the marker's seq: a point before it lacks the volume) and
``purged`` (its replica deleted). A promotion to a point where a volume is
not complete is refused, naming it: handing out a half-copied disk as a
recovered server's would be worse than saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from havend.errors import Invalid, RemoteProtocolError
from havend.journal.record import Record
from havend.members import REMOVED, SYNCING, VolumeEvent
from havend.volume import DiscardVolume, FileVolume

if TYPE_CHECKING:
    from havend.target.group import TargetGroup

log = logging.getLogger("havend.target")


def open_replica(spec: dict[str, Any]) -> FileVolume:
    """A slot's replica volume (a purged one: nothing)."""
    if spec.get("purged"):
        return DiscardVolume(spec["path"], int(spec["size"]))
    return FileVolume(spec["path"])


def make_replica(path: str, size: int) -> None:
    """A sparse, zeroed replica file of ``size`` bytes (a leftover of a
    creation cut short is made again)."""
    with open(path, "wb") as f:
        f.truncate(size)


class ReplicaMembers:
    """TargetGroup's part: its volumes added and removed by the source."""

    def live_specs(self: TargetGroup) -> list[tuple[int, dict[str, Any]]]:
        """(slot, spec) of the volumes not removed."""
        return [(i, v) for i, v in enumerate(self.meta["volumes"]) if v.get("state") != REMOVED]

    def check_volumes(self: TargetGroup, volumes: list[dict]) -> str | None:
        """Take the source's slots (its HELLO's volumes): why they do not fit
        this replica, or None, once the new ones are made and the removed
        ones detached."""
        mine = self.meta["volumes"]
        if len(volumes) < len(mine):
            return (
                f"volumes differ: replica has {len(mine)} volume slots, the source sent "
                f"{len(volumes)}"
            )
        for i, (spec, theirs) in enumerate(zip(mine, volumes, strict=False)):
            if (spec["name"], spec["size"]) != (theirs.get("name"), theirs.get("size")):
                return (
                    f"volumes differ: slot {i} is {spec['name']} of {spec['size']} bytes here, "
                    f"{theirs.get('name')} of {theirs.get('size')} bytes at the source"
                )
        for i, theirs in enumerate(volumes):
            if i >= len(mine):
                self.ensure_volume(
                    i, str(theirs["name"]), int(theirs["size"]), theirs.get("server")
                )
            if mine[i].get("server") != theirs.get("server"):  # a label, kept for the API
                with self._members_lock:
                    mine[i]["server"] = theirs.get("server")
                    self._write_meta()
            if theirs.get("state") == REMOVED and mine[i].get("state") != REMOVED:
                self.detach_volume(i, bool(theirs.get("purge")))
        self.declared = [dict(v) for v in volumes]
        return None

    def ensure_volume(
        self: TargetGroup, index: int, name: str, size: int, server: str | None = None
    ) -> None:
        """Slot ``index`` exists with this name and size (made, sparse and
        syncing, when it is the next one; ``server``: its label)."""
        with self._members_lock:
            specs = self.meta["volumes"]
            if index < len(specs):
                if (specs[index]["name"], specs[index]["size"]) != (name, size):
                    raise RemoteProtocolError(
                        f"group {self.name}: slot {index} is {specs[index]['name']} here, "
                        f"not {name}"
                    )
                return
            if index != len(specs):
                raise RemoteProtocolError(
                    f"group {self.name}: volume slot {index} added after slot {len(specs) - 1}"
                )
            if not name or "/" in name or name.startswith(".") or size < 0:
                raise RemoteProtocolError(f"group {self.name}: bad volume {name!r} ({size})")
            home = os.path.dirname(specs[0]["path"])
            taken = {os.path.basename(v["path"]) for v in specs}
            base = f"{name}.img" if f"{name}.img" not in taken else f"{name}.{index}.img"
            path = os.path.join(home, base)
            make_replica(path, size)
            volume = FileVolume(path)
            self.undo.sizes.append(size)
            if self._base is not None:
                self._base.sizes.append(size)
            spec = {"name": name, "size": size, "path": path, "state": SYNCING}
            if server is not None:
                spec["server"] = server
            specs.append(spec)
            self._write_meta()
            self.volumes.append(volume)
        log.warning("group %s: volume %s added (%d bytes): copying", self.name, name, size)

    def detach_volume(self: TargetGroup, index: int, purge: bool) -> None:
        """The source removed slot ``index``: no record of it comes any more.
        Its replica is kept where it is, or deleted (``purge``)."""
        with self._members_lock:
            spec = self.meta["volumes"][index]
            if spec.get("state") == REMOVED and (spec.get("purged") or not purge):
                return
            spec["state"] = REMOVED
            if purge:
                volume = self.volumes[index]
                self.volumes[index] = DiscardVolume(spec["path"], int(spec["size"]))
                volume.close()
                spec["purged"] = True
            self._write_meta()
            if purge:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec["path"])
        log.warning(
            "group %s: volume %s removed by the source; its replica %s",
            self.name,
            spec["name"],
            "is deleted" if purge else f"stays at {spec['path']}",
        )

    def volume_synced(self: TargetGroup, index: int, seq: int) -> None:
        """The copy of slot ``index`` is complete at ``seq``."""
        with self._members_lock:
            spec = self.meta["volumes"][index]
            if spec.get("state") != SYNCING:
                return
            del spec["state"]
            spec["synced_seq"] = seq
            self._write_meta()
        log.warning("group %s: volume %s complete from seq %d", self.name, spec["name"], seq)

    def received_volume_event(self: TargetGroup, record: Record) -> None:
        """A VOLUME record arriving (before it is journaled here): an added
        volume's replica is made now, before the records that fill it."""
        try:
            event = VolumeEvent.from_payload(record.data)
        except Invalid as exc:
            raise RemoteProtocolError(f"group {self.name}: record {record.seq}: {exc}") from None
        if event.event == "added":
            self.ensure_volume(record.volume, event.name, event.size, event.server)

    def apply_volume_event(self: TargetGroup, record: Record) -> None:
        """A VOLUME record in the write order (the applier)."""
        try:
            event = VolumeEvent.from_payload(record.data)
        except Invalid as exc:  # checked when it arrived: a damaged journal here
            log.error("group %s: record %d: %s; skipped", self.name, record.seq, exc)
            return
        if event.event == "synced":
            self.volume_synced(record.volume, record.seq)
        elif event.event == "removed":
            self.detach_volume(record.volume, event.purge)

    def resync_completed(self: TargetGroup, seq: int) -> None:
        """A resync made the replica equal to the source (SYNC_END): the
        volumes the source called protected in this session's HELLO are
        complete from here, whatever marker an overflow lost."""
        for i, declared in enumerate(getattr(self, "declared", None) or []):
            if declared.get("state", "protected") == "protected" and i < len(self.volumes):
                self.volume_synced(i, seq)

    def incomplete_at(self: TargetGroup, seq: int) -> list[str]:
        """The live volumes whose replica is not complete at ``seq``."""
        return [
            v["name"]
            for _, v in self.live_specs()
            if v.get("state") == SYNCING or int(v.get("synced_seq", 0)) > seq
        ]
