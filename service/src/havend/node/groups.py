"""A source node's groups: opening them, made or changed through the API,
paused and resumed, deleted; and pairing the node with its target.

Writes, in the node's state directory: ``group-ids/<group name>`` (the
group's UUID, made once), and through the group's own packages its journal
and state under ``groups/<uuid>/`` (see ``havend.ship``, ``havend.journal``);
volume files the API asks to create, sparse, inside ``volume_dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import ssl
import uuid
from typing import Any

from havend.cdp.retention import RetentionPolicy
from havend.config import Endpoint, GroupConfig, group_from_dict
from havend.errors import CheckpointError, ConfigError, Conflict, HavendError
from havend.fsutil import write_atomic
from havend.journal import Journal
from havend.node.base import NodeBase
from havend.node.volumes import VolumesMixin
from havend.ship import Shipper, ShipperSettings, SourceGroup, group_dir
from havend.ship.members import open_slot_volume, read_slots
from havend.volume import FileVolume

log = logging.getLogger("havend")


def _source_group_id(state_dir: str, name: str) -> uuid.UUID:
    """The group's UUID, made once and kept under the state directory."""
    path = os.path.join(state_dir, "group-ids", name)
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return uuid.UUID(f.read().strip())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    group_id = uuid.uuid4()
    write_atomic(path, f"{group_id}\n".encode())
    return group_id


def open_source_group(state_dir: str, config: GroupConfig) -> SourceGroup:
    group_id = _source_group_id(state_dir, config.name)
    directory = os.path.join(group_dir(state_dir, group_id), "journal")
    if os.path.exists(os.path.join(directory, "superblock")):
        journal = Journal.open(directory)
    else:
        journal = Journal.create(
            directory,
            group_id,
            segment_size=config.segment_size,
            max_segments=config.max_segments,
        )
    journal.cache_bytes = config.cache_bytes
    slots = read_slots(group_dir(state_dir, group_id))
    if slots is None:  # a group older than live volume changes: its volumes are its slots
        volumes = [(v.name, FileVolume(v.path)) for v in config.volumes]
    else:  # the config's path of a volume wins (its file may have moved)
        paths = {v.name: v.path for v in config.volumes}
        slots = [
            s.but(path=paths[s.name]) if s.state != "removed" and s.name in paths else s
            for s in slots
        ]
        volumes = [(s.name, open_slot_volume(s)) for s in slots]
    group = SourceGroup(
        group_id,
        config.name,
        volumes,
        journal,
        mode=config.mode,
        rpo_seconds=config.rpo_seconds,
        background_sync_bytes=config.background_sync_bytes,
        slots=slots,
    )
    policy = config.checkpoints
    group.retention = RetentionPolicy(policy.retain, policy.max_age_seconds)
    group.attach_state(group_dir(state_dir, group_id))
    if slots is None:
        group.save_slots()
    group.load_fence()
    group.load_last_checkpoint()
    group.recover_reverse()  # before the replay: a whole staged round supersedes the journal
    replayed = group.replay()
    if replayed:
        log.info("group %s: replayed %d journal records into the volumes", config.name, replayed)
    return group


class GroupsMixin(VolumesMixin, NodeBase):
    def _configured_groups(self) -> list[GroupConfig]:
        """The config file's groups, then those created through the API."""
        groups = list(self.config.groups)
        if self.store is not None:
            for data in self.store.groups():
                try:
                    group = group_from_dict(data)
                except ConfigError as exc:  # written by an older havend? say it, serve the rest
                    log.error("a group created through the API cannot be opened: %s", exc)
                    continue
                if any(g.name == group.name for g in groups):
                    log.error("group %s is in the config file too: the file wins", group.name)
                    continue
                groups.append(group)
                self.api_groups.add(group.name)
        return groups

    def _start_group(self, group_config: GroupConfig) -> SourceGroup:
        """Open a source group, export its volumes and start shipping it."""
        config = self.config
        assert self.nbd is not None
        loop = asyncio.get_running_loop()
        group = open_source_group(config.state_dir, group_config)
        group.bind(loop)
        try:
            self._reconcile_volumes(group, group_config.volumes)
        except HavendError as exc:  # e.g. fenced: the volumes change once it protects again
            log.error("group %s: its volumes cannot change now: %s", group.name, exc)
        target = self.target_endpoint or Endpoint("", 0)  # none yet: waits to be paired
        settings = ShipperSettings(
            host=target.host,
            port=target.port,
            server_name=target.server_name,
            compression_level=group_config.compression_level,
            bandwidth_limit=group_config.bandwidth_limit,
            ack_timeout=config.link_timeout,
            reverse_interval=group_config.reverse_interval_seconds,
        )
        shipper = Shipper(group, settings, self._client_ctx, config.name)
        if self.store is not None and self.store.setting(f"paused:{group.name}"):
            shipper.paused = True
            group.paused = True
        tasks: list[asyncio.Future[Any]] = [shipper.start_thread()]
        tasks.append(loop.create_task(self._copier(group)))
        if group_config.checkpoints.interval_seconds:
            tasks.append(loop.create_task(self._periodic(group, group_config)))
        self.source_groups.append(group)
        self._shippers.append(shipper)
        self._group_tasks[group.name] = tasks
        self._keep_config(group, group_config)
        self._tasks.extend(tasks)
        for member in group.live_volumes():
            self.nbd.add_export(member.name, member, f"{member.name} of {group.name}")  # type: ignore[arg-type]
        return group

    async def create_group(self, data: dict[str, Any]) -> dict[str, Any]:
        """A new source group from its settings (those of the config file's
        groups; volumes with ``size`` are created, sparse, when missing),
        replicated at once and kept across restarts (REST API)."""
        if self.config.role != "source" or self.store is None:
            raise Conflict("groups are created on a source node with the API on")
        # A token must not make havend serve or write files outside its volume
        # directory: paths are taken inside it.
        assert self.config.volume_dir is not None
        home = os.path.realpath(self.config.volume_dir)
        data = dict(data)
        data["volumes"] = [dict(v) for v in data.get("volumes") or []]
        for i, spec in enumerate(data["volumes"]):
            given = str(spec.get("path", ""))
            if "\x00" in given:
                raise ConfigError(f"volumes[{i}].path: a NUL byte in a path")
            path = os.path.realpath(os.path.join(home, given))
            if not path.startswith(home + os.sep):
                raise ConfigError(
                    f"volumes[{i}].path: {spec.get('path')!r} is outside this node's "
                    f"volume_dir ({home})"
                )
            spec["path"] = path
        group_config = group_from_dict(data)
        if any(g.name == group_config.name for g in self.source_groups):
            raise Conflict(f"group {group_config.name!r} exists already")
        assert self.nbd is not None
        names = [v.name for v in group_config.volumes]
        taken = [n for n in names if n in self.nbd.volumes]
        if taken:
            raise Conflict(f"volume name {taken[0]!r} is taken on this node")
        for i, (volume, spec) in enumerate(zip(group_config.volumes, data["volumes"], strict=True)):
            size = spec.get("size")
            if not os.path.exists(volume.path) and (
                not isinstance(size, int) or size <= 0 or size % 4096
            ):
                raise ConfigError(
                    f"volumes[{i}].path: {volume.path} does not exist; give its size (bytes, "
                    "a multiple of 4096) to create it"
                )
        state = os.path.join(self.config.state_dir, "group-ids", group_config.name)
        had_state = os.path.exists(state)
        made: list[str] = []
        try:
            for volume, spec in zip(group_config.volumes, data["volumes"], strict=True):
                if not os.path.exists(volume.path):
                    os.makedirs(os.path.dirname(volume.path), exist_ok=True)
                    fd = os.open(volume.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    made.append(volume.path)
                    try:
                        os.ftruncate(fd, int(spec["size"]))
                    finally:
                        os.close(fd)
            group = self._start_group(group_config)
        except (OSError, HavendError) as exc:  # nothing of it is left behind
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if not had_state:
                with contextlib.suppress(OSError, ValueError):
                    shutil.rmtree(
                        group_dir(
                            self.config.state_dir,
                            _source_group_id(self.config.state_dir, group_config.name),
                        ),
                        ignore_errors=True,
                    )
                    os.unlink(state)
            if isinstance(exc, HavendError):
                raise
            raise Conflict(
                f"group {group_config.name} cannot be created: {exc.strerror or exc}"
            ) from None
        self.store.save_group(group_config.name, data)
        self.api_groups.add(group_config.name)
        log.info("group %s created with %d volumes", group.name, len(group.volumes))
        return dataclasses.asdict(group.status())

    async def pair(
        self, host: str, port: int, server_name: str | None, timeout: float = 10
    ) -> dict[str, Any]:
        """Make ``host:port`` this source node's target: a TLS handshake with it
        first (its certificate must come from the deployment CA and name
        ``server_name``), then every group ships there; kept across restarts."""
        if self.config.role != "source" or self.store is None:
            raise Conflict("a source node pairs with its target, with the API on")
        ctx = self._client_ctx
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=(server_name or host) if ctx else None
                ),
                timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise Conflict(f"cannot pair with {host}:{port}: {type(exc).__name__}: {exc}") from None
        identity = None
        if ctx is not None:
            from havend import certs

            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            identity = certs.describe_der(der)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        endpoint = {"host": host, "port": port, "server_name": server_name}
        self.store.set_setting("target", endpoint)
        self.target_endpoint = Endpoint(**endpoint)
        for shipper in self._shippers:
            shipper.reconfigure(host=host, port=port, server_name=server_name)
        log.warning(
            "paired with the target %s:%d (%s)",
            host,
            port,
            (identity or {}).get("subject_cn", "no TLS"),
        )
        return {
            "host": host,
            "port": port,
            "server_name": server_name or host,
            "certificate": identity,
        }

    async def update_group(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a group's settings in place (REST API; groups made through it):
        mode, RPO, compression, bandwidth cap, checkpoint policy, reverse
        protection. Retention reaches the target at the next connection."""
        group = self._source_group(name)
        if name not in self.api_groups:
            raise Conflict(f"group {name} is defined in the config file: edit it there")
        assert self.store is not None
        current = next(c for c in self.store.groups() if c["name"] == name)
        merged = current | {k: v for k, v in changes.items() if k != "checkpoints"}
        if "checkpoints" in changes:
            merged["checkpoints"] = (current.get("checkpoints") or {}) | changes["checkpoints"]
        new = group_from_dict(merged)  # everything checked before anything changes
        old = self._group_configs[name]
        policy = new.checkpoints
        retention = RetentionPolicy(policy.retain, policy.max_age_seconds)
        group.mode = new.mode
        group.rpo_seconds = new.rpo_seconds
        group.retention = retention
        self._shipper(name).reconfigure(
            compression_level=new.compression_level,
            bandwidth_limit=new.bandwidth_limit,
            reverse_interval=new.reverse_interval_seconds,
        )
        if policy.interval_seconds != old.checkpoints.interval_seconds:
            tasks = self._group_tasks[name]
            for task in tasks[2:]:  # the periodic checkpoints (after the shipper, the copy)
                task.cancel()
                self._tasks.remove(task)
            del tasks[2:]
            if policy.interval_seconds:
                task = asyncio.get_running_loop().create_task(self._periodic(group, new))
                tasks.append(task)
                self._tasks.append(task)
        self._keep_config(group, new)
        self.store.update_group(name, merged)
        log.info("group %s: settings changed: %s", name, ", ".join(sorted(changes)))
        return dataclasses.asdict(group.status())

    def pause(self, name: str) -> dict[str, Any]:
        """Stop shipping a group (its writes are still journaled) until resumed."""
        return self._set_paused(name, True)

    def resume(self, name: str) -> dict[str, Any]:
        return self._set_paused(name, False)

    def _set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        """Pause or resume a group's shipping; kept across restarts."""
        group = self._source_group(name)
        shipper = self._shipper(name)
        if paused:
            shipper.pause()
        else:
            shipper.resume()
        group.paused = paused
        if self.store is not None:
            self.store.set_setting(f"paused:{name}", True if paused else None)
        log.warning(
            "group %s: replication %s", name, "paused by an operator" if paused else "resumed"
        )
        return dataclasses.asdict(group.status())

    async def delete_group(self, name: str) -> dict[str, Any]:
        """Stop replicating a group created through the API and forget it (its
        volumes and journal stay on disk)."""
        group = self._source_group(name)
        if name not in self.api_groups:
            raise Conflict(f"group {name} is defined in the config file: edit it there")
        if group.fence is not None:
            raise Conflict(f"group {name} is fenced ({group.fence.reason}): not now")
        shipper = self._shipper(name)
        shipper.stop()
        for task in self._group_tasks.pop(name, []):
            task.cancel()
            self._tasks.remove(task)
            with contextlib.suppress(BaseException):
                await task
        await shipper.join()
        assert self.nbd is not None
        for member in group.live_volumes():
            self.nbd.remove_export(member.name)
        self.source_groups.remove(group)
        self._shippers.remove(shipper)
        await asyncio.get_running_loop().run_in_executor(None, group.close)
        self.store.delete_group(name)
        self.api_groups.discard(name)
        del self._group_configs[name]
        log.warning("group %s deleted (its volumes and journal stay on disk)", name)
        return {"group": name, "deleted": True}

    async def _periodic(self, group: SourceGroup, config: GroupConfig) -> None:
        interval = config.checkpoints.interval_seconds
        while True:
            await asyncio.sleep(interval)
            if group.fence is not None:  # failing over or failed over: no marker after the last
                continue
            try:
                await self.checkpoint(group.name, "periodic")
            except CheckpointError as exc:
                log.warning("group %s: periodic checkpoint skipped: %s", group.name, exc)
