"""A source node's volumes added to and removed from live groups (REST API,
and a config file's group whose volume list changed since the last start),
and the initial copy of each added volume (see ``havend.ship.members``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from havend.config import group_from_dict
from havend.errors import ConfigError, Conflict, HavendError, NotFound
from havend.members import REMOVED, SYNCING
from havend.node.base import NodeBase
from havend.ship import SourceGroup
from havend.volume import FileVolume

log = logging.getLogger("havend")

# Bytes of an added volume copied per turn of the copy (a worker thread).
COPY_TURN = 8 << 20


class VolumesMixin(NodeBase):
    def _volume_path(self, field: str, given: str) -> str:
        """``given`` taken inside the node's volume directory (a token must not
        make havend serve files outside it)."""
        assert self.config.volume_dir is not None
        home = os.path.realpath(self.config.volume_dir)
        if "\x00" in given:
            raise ConfigError(f"{field}: a NUL byte in a path")
        path = os.path.realpath(os.path.join(home, given))
        if not path.startswith(home + os.sep):
            raise ConfigError(f"{field}: {given!r} is outside this node's volume_dir ({home})")
        return path

    def _api_group(self, name: str) -> SourceGroup:
        group = self._source_group(name)
        if name not in self.api_groups or self.store is None:
            raise Conflict(
                f"group {name} is defined in the config file: change its volumes there "
                "(they change at the next start)"
            )
        return group

    async def add_volume(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Add a volume to a live group: served and captured at once, copied
        to the target in the background while the others replicate, kept
        across restarts. ``spec``: ``name``, ``path`` (inside ``volume_dir``),
        ``size`` (to create it, sparse, when missing), ``server``."""
        group = self._api_group(name)
        assert self.store is not None and self.nbd is not None
        volume_name = str(spec.get("name", ""))
        if any(m.name == volume_name for m in group.live_volumes()):
            raise Conflict(f"group {name} has a volume {volume_name!r} already")
        if volume_name in self.nbd.volumes:
            raise Conflict(f"volume name {volume_name!r} is taken on this node")
        path = self._volume_path("path", str(spec.get("path", "")))
        current = next(c for c in self.store.groups() if c["name"] == name)
        wanted = dict(current)
        wanted["volumes"] = [*current["volumes"], {k: v for k, v in spec.items() if v is not None}]
        wanted["volumes"][-1]["path"] = path
        group_config = group_from_dict(wanted)  # the whole group checked first
        if any(m.path == path for g in self.source_groups for m in g.live_volumes()):
            raise Conflict(f"{path} is a volume of a group already")
        size = spec.get("size")
        made = False
        if not os.path.exists(path):
            if not isinstance(size, int) or size <= 0 or size % 4096:
                raise ConfigError(
                    f"path: {path} does not exist; give its size (bytes, a multiple of 4096) "
                    "to create it"
                )
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            made = True
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        try:
            volume = FileVolume(path)
            try:
                member = await asyncio.get_running_loop().run_in_executor(
                    None, group.add_volume, volume_name, volume, spec.get("server")
                )
            except BaseException:
                volume.close()
                raise
        except (OSError, HavendError) as exc:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if isinstance(exc, HavendError):
                raise
            raise Conflict(f"volume {volume_name} cannot be added: {exc}") from None
        self.nbd.add_export(member.name, member, f"{member.name} of {group.name}")  # type: ignore[arg-type]
        self.store.update_group(name, wanted)
        self._keep_config(group, group_config)
        group.copy_wanted.set()
        return self._volume_status(group, member.index)

    async def remove_volume(self, name: str, volume: str, purge: bool = False) -> dict[str, Any]:
        """Stop replicating a volume of a live group: no longer served or
        captured; its replica on the target is kept unless ``purge``; the
        local file stays."""
        group = self._api_group(name)
        assert self.store is not None and self.nbd is not None
        if not any(m.name == volume for m in group.live_volumes()):
            raise NotFound(f"group {name} has no volume {volume!r}")
        current = next(c for c in self.store.groups() if c["name"] == name)
        wanted = dict(current)
        wanted["volumes"] = [v for v in current["volumes"] if v["name"] != volume]
        if not wanted["volumes"]:
            raise Conflict(f"volume {volume} is the last of group {name}: delete the group instead")
        group_config = group_from_dict(wanted)
        group.refuse_volume_changes()
        self.nbd.remove_export(volume)  # no client writes to it from here
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, group.remove_volume, volume, purge)
        except BaseException:
            member = next(m for m in group.live_volumes() if m.name == volume)
            self.nbd.add_export(member.name, member, f"{member.name} of {group.name}")  # type: ignore[arg-type]
            raise
        self.store.update_group(name, wanted)
        self._keep_config(group, group_config)
        return {"group": name, "volume": volume, "removed": True, "purged": purge}

    def _volume_status(self, group: SourceGroup, index: int) -> dict[str, Any]:
        """A volume of a source group as the API shows it."""
        slot = group.slots[index]
        member = group.volumes[index]
        state, done = group.copy_progress(index)
        return {
            "name": slot.name,
            "group": group.name,
            "index": index,
            "size": member.size,
            "path": member.path,
            "uri": f"{self.addresses.get('nbd')}/{member.name}",
            "writable": group.fence is None,
            "server": group.labels.get(slot.name, slot.server),
            "state": state,
            "sync": {"done_bytes": done, "total_bytes": slot.size} if state == SYNCING else None,
        }

    def _reconcile_volumes(self, group: SourceGroup, configured: list[Any]) -> None:
        """A group whose configured volumes differ from its slots (its config
        file changed while havend was down): add the new ones, remove those
        gone (their replicas kept)."""
        names = [v.name for v in configured]
        for spec in configured:
            if not any(s.name == spec.name and s.state != REMOVED for s in group.slots):
                group.add_volume(spec.name, FileVolume(spec.path), spec.server)
        for slot in list(group.slots):
            if slot.state != REMOVED and slot.name not in names:
                group.remove_volume(slot.name)

    async def _copier(self, group: SourceGroup) -> None:
        """The initial copy of the group's added volumes, while there is one."""
        loop = asyncio.get_running_loop()
        while True:
            if group.copying() is None:
                group.copy_wanted.clear()
                if group.copying() is None:
                    await group.copy_wanted.wait()
                continue
            try:
                more = await loop.run_in_executor(None, group.copy_some, COPY_TURN)
            except OSError as exc:  # the volume cannot be read: say so, try again
                log.error("group %s: copying an added volume failed: %s", group.name, exc)
                await asyncio.sleep(5)
                continue
            if more == "wait":  # until the target acknowledges more, or a while
                group.acked.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(group.acked.wait(), 0.5)
