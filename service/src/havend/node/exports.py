"""What a node exports over NBD besides the volumes it replicates:
point-in-time views of a target's checkpoints (writable ones through a
copy-on-write file ``<state_dir>/scratch/<export>.cow``, dropped at close),
promoted volumes, and the snapshots a failback or a split-brain resolution
kept of what it replaced (see ``havend.cdp.snapshot`` for their files); the
checkpoints a target retains, deleting one, and the drills' verifications of
them (kept in the state store)."""

from __future__ import annotations

import logging
import os
from typing import Any

from havend.cdp.snapshot import Snapshots
from havend.errors import CheckpointError, Conflict, NotFound
from havend.nbd.server import NBDServer
from havend.node.base import NodeBase

log = logging.getLogger("havend")


class ExportsMixin(NodeBase):
    def checkpoints(self, name: str) -> list[dict[str, Any]]:
        group = self._target_group(name)
        with group.undo.lock:
            return [c.to_dict() for c in group.undo.checkpoints]

    def verify(
        self,
        name: str,
        ref: str,
        passed: bool,
        plan: str = "",
        rto_seconds: float | None = None,
        report: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a drill's result for a retained checkpoint (id, unique
        prefix, latest or oldest) of a target group: the proof that the
        application recovered from it (``passed``), kept in the store."""
        group = self._target_group(name)
        if self.store is None:
            raise Conflict("verifications are kept by a node with the API on")
        checkpoint = group.resolve_checkpoint(ref)
        record = self.store.add_verification(
            group.name, checkpoint.to_dict(), passed, plan, rto_seconds, report or {}
        )
        log.warning(
            "group %s: checkpoint %s %s a drill%s",
            group.name,
            checkpoint.id,
            "passed" if passed else "failed",
            f" of plan {plan}" if plan else "",
        )
        return record

    def verifications(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The drills' results recorded for a target group, newest first."""
        group = self._target_group(name)
        return self.store.verifications(group.name, limit) if self.store is not None else []

    async def delete_checkpoint(self, name: str, ref: str) -> dict[str, Any]:
        """Delete a retained checkpoint (id, unique prefix, latest or oldest):
        no longer a view, rollback or promotion target. Returns it."""
        group = self._target_group(name)
        with group.undo.lock:
            if not group.undo.checkpoints:
                raise NotFound(f"checkpoint {ref!r} of group {name} is not retained (none is)")
        checkpoint = await group.delete_checkpoint(group.resolve_checkpoint(ref).id)
        return checkpoint.to_dict()

    def open_view(self, name: str, volume: str, ref: str, writable: bool) -> dict[str, Any]:
        group = self._target_group(name)
        checkpoint = group.resolve_checkpoint(ref)
        self._view_count += 1
        export = f"{name}/{volume}@{checkpoint.id[:12]}.{self._view_count}"
        scratch = None
        if writable:
            scratch_dir = os.path.join(self.config.state_dir, "scratch")
            os.makedirs(scratch_dir, exist_ok=True)
            scratch = os.path.join(scratch_dir, export.replace("/", "_") + ".cow")
        view = group.open_view(export, volume, checkpoint.id, scratch)
        assert self.views is not None
        self.views.add_export(export, view, f"{volume} of {name} at {checkpoint.id}")
        log.info("view %s opened (%s)", export, "writable" if writable else "read-only")
        return {
            "export": export,
            "uri": f"{self.addresses['views']}/{export}",
            "size": view.size,
            "writable": writable,
            "checkpoint": checkpoint.to_dict(),
        }

    def close_view(self, export: str) -> dict[str, Any]:
        groups = self.target.groups.values() if self.target is not None else ()
        for group in groups:
            if export in group.views:
                assert self.views is not None
                self.views.remove_export(export)
                written = group.views[export].written_bytes
                group.close_view(export)
                log.info("view %s closed", export)
                return {"export": export, "discarded_bytes": written}
        raise NotFound(f"no view {export!r} is open")

    def list_views(self) -> list[dict[str, Any]]:
        if self.target is None:  # a source node serves no point-in-time views
            return []
        return [
            {
                "export": export,
                "group": group.name,
                "volume": group.meta["volumes"][view.volume]["name"],
                "checkpoint": view.checkpoint.id,
                "writable": not view.read_only,
                "uri": f"{self.addresses['views']}/{export}",
                "size": view.size,
            }
            for group in self.target.groups.values()
            for export, view in group.views.items()
        ]

    def _export_promoted(self, group: Any) -> list[dict[str, Any]]:
        assert self.views is not None
        exports = []
        for member in group.promoted_volumes():
            if group.meta["volumes"][member.index].get("state") == "removed":
                continue
            export = f"{group.name}/{member.name}"
            if export not in self.views.volumes:
                self.views.add_export(export, member, f"{member.name} of {group.name} (promoted)")
            exports.append({"export": export, "uri": f"{self.addresses['views']}/{export}"})
        return exports

    def _unexport_promoted(self, group: Any) -> None:
        assert self.views is not None
        for volume in group.meta["volumes"]:
            self.views.remove_export(f"{group.name}/{volume['name']}")

    def _shelf(self, name: str) -> tuple[Snapshots, NBDServer, str]:
        """The group's snapshots, the NBD server and address that export them."""
        if self.source_groups:
            group = self._source_group(name)
            if group.fence is not None and group.fence.promoted is not None:
                raise CheckpointError(
                    f"group {name} is failed over: its failback snapshot is still being made"
                )
            assert group.state_dir is not None and self.nbd is not None
            directory, server, address = group.state_dir, self.nbd, self.addresses["nbd"]
            names = [m.name for m in group.volumes]
            volumes = [m.volume for m in group.volumes]
        else:
            group = self._target_group(name)
            assert self.views is not None
            directory, server, address = group.directory, self.views, self.addresses["views"]
            names = [v["name"] for v in group.meta["volumes"]]
            volumes = group.volumes
        shelf = self._snapshots.get(name)
        if shelf is None or shelf.directory != directory:
            shelf = self._snapshots[name] = Snapshots(directory, names, volumes)
        return shelf, server, address

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        return self._shelf(name)[0].list()

    def open_snapshot(self, name: str, volume: str, snapshot: str) -> dict[str, Any]:
        """Export a volume as the failback or resolution found it (read-only)."""
        shelf, server, address = self._shelf(name)
        view = shelf.open(snapshot, volume)
        self._view_count += 1
        export = f"{name}/{volume}@{snapshot}.{self._view_count}"
        server.add_export(export, view, f"{volume} of {name} before {snapshot}")
        self._snapshot_views[export] = (shelf, view)
        log.info("snapshot view %s opened", export)
        return {"export": export, "uri": f"{address}/{export}", "size": view.size}

    def close_snapshot(self, export: str) -> dict[str, Any]:
        if export not in self._snapshot_views:
            raise NotFound(f"no snapshot view {export!r} is open")
        shelf, view = self._snapshot_views.pop(export)
        server = self.nbd if self.source_groups else self.views
        assert server is not None
        server.remove_export(export)
        shelf.close(view)
        return {"export": export}

    def delete_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        result = self._shelf(name)[0].delete(snapshot)
        log.warning("group %s: snapshot %s deleted", name, snapshot)
        return result
