"""``havend run``: one process serving a node's role, many groups and volumes.

A *source* node opens each group's journal (replaying it into the local copies
after a crash), serves every member volume as an NBD export named after it,
commits journal records in groups and ships them to the target. A *target*
node listens for sources and keeps their replicas. Both write
``<state_dir>/status.json`` every ``status_period`` seconds and log a progress line per group
every ``status_interval`` seconds (lag in seconds and bytes, throughput).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import ssl
import time
import uuid
from typing import Any

from havend import __version__
from havend.admin import SOCKET_NAME, AdminServer
from havend.cdp.hooks import SSHTarget, app_consistent
from havend.cdp.snapshot import Snapshots
from havend.config import Endpoint, GroupConfig, NodeConfig, group_from_dict
from havend.errors import CheckpointError, ConfigError, Conflict, HavendError
from havend.fsutil import write_atomic
from havend.journal import Journal
from havend.nbd.server import NBDServer
from havend.process import human_bytes, until_stopped
from havend.ship.shipper import FailoverRefused, Shipper, ShipperSettings
from havend.ship.source import SourceGroup, group_dir
from havend.target.server import TargetNode
from havend.volume import FileVolume

log = logging.getLogger("havend")


def _ssl_contexts(config: NodeConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if config.tls is None:
        return None, None
    from havend import certs

    tls = config.tls
    return (
        certs.server_context(tls.cert, tls.key, tls.ca),
        certs.client_context(tls.cert, tls.key, tls.ca),
    )


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
    volumes = [(v.name, FileVolume(v.path)) for v in config.volumes]
    group = SourceGroup(
        group_id,
        config.name,
        volumes,
        journal,
        mode=config.mode,
        rpo_seconds=config.rpo_seconds,
        background_sync_bytes=config.background_sync_bytes,
    )
    policy = config.checkpoints
    group.retention = {"count": policy.retain, "max_age_seconds": policy.max_age_seconds}
    group.attach_state(group_dir(state_dir, group_id))
    group.load_fence()
    group.recover_reverse()  # before the replay: a whole staged round supersedes the journal
    replayed = group.replay()
    if replayed:
        log.info("group %s: replayed %d journal records into the volumes", config.name, replayed)
    return group


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.started = time.time()
        self.source_groups: list[SourceGroup] = []
        self.target: TargetNode | None = None
        self.nbd: NBDServer | None = None
        self.views: NBDServer | None = None  # target: point-in-time views
        self.admin: AdminServer | None = None
        self.api: Any = None  # havend.api.server.ApiServer, when configured
        self.addresses: dict[str, str] = {}
        self._view_count = 0
        self._tasks: list[asyncio.Future[Any]] = []
        self._commits: set[asyncio.Task[None]] = set()  # checkpoint markers' (see checkpoint)
        self._shippers: list[Shipper] = []
        self._snapshots: dict[str, Snapshots] = {}  # per group name
        self._snapshot_views: dict[str, tuple[Snapshots, Any]] = {}  # export -> (shelf, view)
        # (monotonic time, bytes) samples of each group's shipped or applied bytes
        self._rates: dict[str, collections.deque[tuple[float, int]]] = {}
        self.store: Any = None  # havend.api.state.StateStore, with the API
        self._client_ctx: ssl.SSLContext | None = None
        self._group_tasks: dict[str, list[asyncio.Future[Any]]] = {}
        self._group_configs: dict[str, GroupConfig] = {}  # config file's and API's
        self.api_groups: set[str] = set()  # created through the API (not the config file)
        self.target_endpoint: Endpoint | None = None  # where sources ship (config or paired)

    async def start(self) -> None:
        config = self.config
        os.makedirs(config.state_dir, exist_ok=True)
        server_ctx, client_ctx = _ssl_contexts(config)
        loop = asyncio.get_running_loop()
        if config.api is not None:
            from havend.api.server import open_store

            self.store = open_store(config.state_dir)
        if config.role == "source":
            assert config.nbd is not None
            self._client_ctx = client_ctx
            paired = self.store.setting("target") if self.store is not None else None
            self.target_endpoint = Endpoint(**paired) if paired else config.target
            self.nbd = NBDServer({})
            for group_config in self._configured_groups():
                self._start_group(group_config)
            host, port = await self.nbd.listen_tcp(config.nbd.host, config.nbd.port)
            self.addresses["nbd"] = f"nbd://{host}:{port}"
        else:
            assert config.listen is not None and config.replica_dir is not None
            self.target = TargetNode(config.name, config.state_dir, config.replica_dir)
            self.target.on_promoted = self._export_promoted
            self.target.on_demoted = self._unexport_promoted
            host, port = await self.target.start(config.listen.host, config.listen.port, server_ctx)
            self.addresses["replication"] = f"{host}:{port}"
            assert config.views is not None
            self.views = NBDServer({})
            host, port = await self.views.listen_tcp(config.views.host, config.views.port)
            self.addresses["views"] = f"nbd://{host}:{port}"
            for group in self.target.groups.values():
                planned = (group.meta.get("promoting") or {}).get("planned")
                if planned and not group.promoted:  # a planned failover cut short: finish it
                    log.warning("group %s: finishing an interrupted planned failover", group.name)
                    try:
                        await group.promote(planned=True)
                    except CheckpointError as exc:  # stays on hold; the node serves the rest
                        log.error("group %s: cannot finish the failover: %s", group.name, exc)
                if group.promoted:  # still failed over after a restart: serve it
                    self._export_promoted(group)
        self.admin = AdminServer(
            os.path.join(config.state_dir, SOCKET_NAME), self._admin_handlers()
        )
        await self.admin.start()
        if config.api is not None:
            from havend.api.server import ApiServer

            self.api = ApiServer(self)
            host, port = await self.api.start(config.api.host, config.api.port)
            scheme = "https" if config.tls else "http"
            self.addresses["api"] = f"{scheme}://{host}:{port}"
        self._tasks.append(loop.create_task(self._report()))
        log.info(
            "havend %s node %s (%s) up: %s%s",
            __version__,
            config.name,
            config.role,
            ", ".join(f"{k} {v}" for k, v in self.addresses.items()),
            "" if config.tls else " [insecure plaintext]",
        )

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
        if group_config.checkpoints.interval_seconds:
            tasks.append(loop.create_task(self._periodic(group, group_config)))
        self.source_groups.append(group)
        self._shippers.append(shipper)
        self._group_tasks[group.name] = tasks
        self._group_configs[group.name] = group_config
        self._tasks.extend(tasks)
        for member in group.volumes:
            self.nbd.add_export(member.name, member, f"{member.name} of {group.name}")  # type: ignore[arg-type]
        return group

    async def create_group(self, data: dict[str, Any]) -> dict[str, Any]:
        """A new source group from its settings (those of the config file's
        groups; volumes with ``size`` are created, sparse, when missing),
        replicated at once and kept across restarts (REST API)."""
        if self.config.role != "source" or self.store is None:
            raise CheckpointError("groups are created on a source node with the API on")
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
            raise CheckpointError("a source node pairs with its target, with the API on")
        ctx = self._client_ctx
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=(server_name or host) if ctx else None
                ),
                timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise Conflict(
                f"cannot pair with {host}:{port}: {type(exc).__name__}: {exc}"
            ) from None
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
        new = group_from_dict(merged)
        old = self._group_configs[name]
        group.mode = new.mode
        group.rpo_seconds = new.rpo_seconds
        policy = new.checkpoints
        group.retention = {"count": policy.retain, "max_age_seconds": policy.max_age_seconds}
        self._shipper(name).reconfigure(
            compression_level=new.compression_level,
            bandwidth_limit=new.bandwidth_limit,
            reverse_interval=new.reverse_interval_seconds,
        )
        if policy.interval_seconds != old.checkpoints.interval_seconds:
            tasks = self._group_tasks[name]
            for task in tasks[1:]:  # the periodic checkpoints
                task.cancel()
                self._tasks.remove(task)
            del tasks[1:]
            if policy.interval_seconds:
                task = asyncio.get_running_loop().create_task(self._periodic(group, new))
                tasks.append(task)
                self._tasks.append(task)
        self._group_configs[name] = new
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
            raise Conflict(f"group {name} is fenced ({group.fence['reason']}): not now")
        shipper = self._shipper(name)
        shipper.stop()
        for task in self._group_tasks.pop(name, []):
            task.cancel()
            self._tasks.remove(task)
            with contextlib.suppress(BaseException):
                await task
        await shipper.join()
        assert self.nbd is not None
        for member in group.volumes:
            self.nbd.remove_export(member.name)
        self.source_groups.remove(group)
        self._shippers.remove(shipper)
        await asyncio.get_running_loop().run_in_executor(None, group.close)
        self.store.delete_group(name)
        self.api_groups.discard(name)
        del self._group_configs[name]
        log.warning("group %s deleted (its volumes and journal stay on disk)", name)
        return {"group": name, "deleted": True}

    def status(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        if self.source_groups:
            groups = [dataclasses.asdict(g.status()) for g in self.source_groups]
        elif self.target is not None:
            groups = [dataclasses.asdict(g.status()) for g in self.target.groups.values()]
        for group in groups:
            moved = group.get("shipped_bytes", group.get("applied_bytes", 0))
            group["throughput_bytes_per_s"] = round(self._throughput(group["group"], moved))
        return {
            "node": self.config.name,
            "role": self.config.role,
            "version": __version__,
            "pid": os.getpid(),
            "addresses": self.addresses,
            "time": time.time(),
            "uptime_s": round(time.time() - self.started, 1),
            "groups": groups,
        }

    def _throughput(self, key: str, total: int, window: float = 5.0) -> float:
        """Bytes per second over about the last ``window`` seconds."""
        samples = self._rates.setdefault(key, collections.deque())
        now = time.monotonic()
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.popleft()
        then, before = samples[0]
        return (total - before) / (now - then) if now > then and total >= before else 0.0

    def volumes(self) -> list[dict[str, Any]]:
        """Every volume of every group: size, file, and the NBD URI serving it."""
        out: list[dict[str, Any]] = []
        for group in self.source_groups:
            for member in group.volumes:
                out.append(
                    {
                        "name": member.name,
                        "group": group.name,
                        "size": member.size,
                        "path": member.path,
                        "uri": f"{self.addresses.get('nbd')}/{member.name}",
                        "writable": group.fence is None,
                    }
                )
        if self.target is not None:
            for tgroup in self.target.groups.values():
                for spec in tgroup.meta["volumes"]:
                    promoted = tgroup.promoted is not None
                    out.append(
                        {
                            "name": spec["name"],
                            "group": tgroup.name,
                            "size": spec["size"],
                            "path": spec["path"],
                            "uri": f"{self.addresses.get('views')}/{tgroup.name}/{spec['name']}"
                            if promoted
                            else None,
                            "writable": promoted,
                        }
                    )
        return out

    def peers(self) -> dict[str, Any]:
        """The replication peer(s) and this node's certificate."""
        from havend import certs

        config = self.config
        identity = certs.describe(config.tls.cert) if config.tls else None
        if self.target is None:
            target = self.target_endpoint
            peers = (
                [
                    {
                        "role": "target",
                        "host": target.host,
                        "port": target.port,
                        "server_name": target.server_name or target.host,
                        "groups": {g.name: g.connected for g in self.source_groups},
                    }
                ]
                if target is not None
                else []
            )
        else:
            by_node: dict[str, dict[str, bool]] = {}
            for tgroup in self.target.groups.values():
                by_node.setdefault(tgroup.peer or "unknown", {})[tgroup.name] = tgroup.connected
            peers = [{"role": "source", "node": n, "groups": g} for n, g in by_node.items()]
        return {
            "node": config.name,
            "certificate": identity,
            "tls": config.tls is not None,
            "peers": peers,
        }

    async def _report(self) -> None:
        path = os.path.join(self.config.state_dir, "status.json")
        last_line = 0.0
        while True:
            status = self.status()
            # A view of the node, rewritten often: atomic, but not worth an fsync.
            try:
                write_atomic(path, json.dumps(status, indent=1).encode(), durable=False)
            except OSError as exc:  # a full disk must not stop the reports for good
                log.error("cannot write %s: %s", path, exc)
            if self.api is not None:  # every change of a group's state, in its history
                try:
                    self.api.observe(status["groups"])
                except Exception as exc:  # the database is full or gone: say it, go on
                    log.error("cannot record group states: %s", exc)
            now = time.monotonic()
            if now - last_line >= self.config.status_interval:
                last_line = now
                for group in status["groups"]:
                    log.info("%s", self._progress_line(group))
            await asyncio.sleep(self.config.status_period)

    @staticmethod
    def _progress_line(group: dict[str, Any]) -> str:
        if "lag_seconds" not in group:  # target
            return (
                f"group {group['name']}: received seq {group['received_seq']}, applied "
                f"{group['applied_seq']}, {'connected' if group['connected'] else 'waiting'}"
            )
        rate = group["throughput_bytes_per_s"]
        eta = group["lag_bytes"] / rate if rate > 0 else None
        return (
            f"group {group['name']}: seq {group['last_seq']} acked {group['acked_seq']}, "
            f"lag {group['lag_seconds']:.1f} s / {human_bytes(group['lag_bytes'])}"
            f"{f' (ETA {eta:.0f} s)' if eta is not None else ''}, "
            f"{human_bytes(rate)}/s, RPO {'met' if group['rpo_ok'] else 'BREACHED'}"
            f"{'' if group['connected'] else ', link down: ' + (group['last_error'] or '-')}"
        )

    # Checkpoints, views, rollback (admin socket; the REST API calls the same) --

    def _admin_handlers(self) -> dict[str, Any]:
        async def status(_: dict[str, Any]) -> Any:
            return self.status()

        handlers: dict[str, Any] = {
            "status": status,
            "snapshots": lambda r: self._async(self.list_snapshots, str(r["group"])),
            "snapshot_open": lambda r: self._async(
                self.open_snapshot, str(r["group"]), str(r["volume"]), str(r["snapshot"])
            ),
            "snapshot_close": lambda r: self._async(self.close_snapshot, str(r["export"])),
            "snapshot_delete": lambda r: self._async(
                self.delete_snapshot, str(r["group"]), str(r["snapshot"])
            ),
        }
        if self.config.role == "source":
            handlers["checkpoint"] = lambda r: self.checkpoint(
                str(r["group"]), str(r.get("label", "")), r.get("app")
            )
            handlers["failover"] = lambda r: self.failover(
                str(r["group"]), float(r.get("timeout", 300))
            )
            handlers["failback"] = lambda r: self.failback(
                str(r["group"]), float(r.get("timeout", 3600))
            )
            handlers["reverse"] = lambda r: self.reverse(
                str(r["group"]), float(r.get("timeout", 3600))
            )
            handlers["reclaim"] = lambda r: self._async(self.reclaim, str(r["group"]))
            handlers["resolve"] = lambda r: self.resolve(
                str(r["group"]), str(r["survivor"]), float(r.get("timeout", 3600))
            )
        else:
            handlers["checkpoints"] = lambda r: self._async(self.checkpoints, str(r["group"]))
            handlers["view_open"] = lambda r: self._async(
                self.open_view,
                str(r["group"]),
                str(r["volume"]),
                str(r["checkpoint"]),
                bool(r.get("writable", False)),
            )
            handlers["view_close"] = lambda r: self._async(self.close_view, str(r["export"]))
            handlers["views"] = lambda r: self._async(self.list_views)
            handlers["rollback"] = lambda r: self.rollback(str(r["group"]), str(r["checkpoint"]))
            handlers["promote"] = lambda r: self.promote(
                str(r["group"]), str(r["checkpoint"]) if r.get("checkpoint") else None
            )
        return handlers

    @staticmethod
    async def _async(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def _source_group(self, name: str) -> SourceGroup:
        for group in self.source_groups:
            if group.name == name:
                return group
        raise CheckpointError(f"no group {name!r} on this node")

    def _group_config(self, name: str) -> GroupConfig:
        return self._group_configs[name]

    async def checkpoint(self, name: str, label: str = "", app: bool | None = None) -> Any:
        """Take a checkpoint of a source group: application-consistent through its
        hooks when it has some (unless ``app`` is False), else crash-consistent."""
        group = self._source_group(name)
        hooks = self._group_config(name).checkpoints.hooks
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        if app and hooks is None:
            raise CheckpointError(f"group {name} has no freeze/thaw hooks configured")
        if hooks is not None and app is not False:
            ssh = None
            if hooks.ssh is not None:
                s = hooks.ssh
                ssh = SSHTarget(s.host, s.user, s.key_file, s.known_hosts, s.port)
            result = await app_consistent(
                hooks.pre,
                hooks.post,
                hooks.timeout_seconds,
                lambda: group.create_checkpoint(label, "app"),
                ssh,
            )
            assert result.checkpoint is not None
            answer = result.checkpoint.to_dict() | {
                "frozen_seconds": round(result.freeze_seconds, 3),
                "thaw_error": result.thaw_error,
            }
        else:
            answer = group.create_checkpoint(label, "crash").to_dict()  # microseconds

        # The marker reaches stable storage in the background, soon after.
        def committed(task: asyncio.Task[None]) -> None:
            self._commits.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "group %s: committing checkpoint %s: %s", name, answer["id"], task.exception()
                )

        commit = loop.create_task(group.commit_through(answer["seq"]))
        self._commits.add(commit)
        commit.add_done_callback(committed)
        answer["group"] = name
        answer["took_seconds"] = round(time.monotonic() - started, 4)
        log.info(
            "group %s: checkpoint %s at seq %d (%s%s)",
            name,
            answer["id"],
            answer["seq"],
            answer["consistency"],
            f", {label}" if label else "",
        )
        return answer

    async def failover(self, name: str, timeout: float = 300) -> dict[str, Any]:
        """Planned failover: refuse new writes, drain the journal to the target,
        take a final checkpoint, and have the target promote itself at exactly
        the last acknowledged write (RPO 0, proven by the seqs)."""
        group = self._source_group(name)
        if group.fence is not None:
            raise CheckpointError(f"group {name} is fenced already: {group.fence['reason']}")
        shipper = self._shipper(name)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        # Marked with this process: a restart that finds it knows the failover
        # was cut short (and lifts it once the target shows it was not promoted).
        fence = {"reason": "planned failover in progress", "pid": os.getpid(), "stage": "draining"}
        group.set_fence(fence)
        log.warning("group %s: planned failover: writes refused from now on, draining", name)
        try:
            await loop.run_in_executor(None, group.commit)
            final = group.create_checkpoint("failover", "crash")
            await asyncio.wait_for(group.wait_acked(final.seq), timeout)
            drained = time.monotonic()
            log.info("group %s: drained to seq %d; the target promotes itself", name, final.seq)
            # From here the target may promote itself even if we never hear it: stay
            # fenced on failure; the next connection tells (see Shipper._ship).
            group.set_fence(fence | {"stage": "promoting", "final_seq": final.seq})
            promoted = await shipper.request_failover(final.seq, timeout)
        except BaseException as exc:  # not failed over: the group is live again here
            refused = isinstance(exc, FailoverRefused)
            if group.fence and group.fence.get("stage") == "promoting" and not refused:
                raise CheckpointError(
                    f"group {name}: asked the target to promote itself at seq {final.seq} and "
                    f"did not hear back ({exc}); the group stays fenced until the link tells "
                    "whether it was promoted"
                ) from None
            group.set_fence(None)
            if isinstance(exc, TimeoutError):
                raise CheckpointError(
                    f"group {name}: the target did not take everything within {timeout:g} s; "
                    "writes are accepted again"
                ) from None
            raise
        if int(promoted.get("applied_seq", -1)) != final.seq:
            log.error(
                "group %s: promoted at %s, not at %d", name, promoted.get("applied_seq"), final.seq
            )
        fence = group.promoted_elsewhere(promoted)
        done = time.monotonic()
        log.warning(
            "group %s: failed over to the target at seq %d (RPO 0): drain %.3f s, promote %.3f s",
            name,
            final.seq,
            drained - started,
            done - drained,
        )
        return {
            "group": name,
            "final_seq": final.seq,
            "last_acknowledged_seq": group.acked_seq,
            "target_applied_seq": promoted.get("applied_seq"),
            "lost_writes": fence["lost"]["records"],
            "final_checkpoint": final.to_dict(),
            "generation": promoted.get("generation"),
            "drain_seconds": round(drained - started, 4),
            "promote_seconds": round(done - drained, 4),
        }

    async def _periodic(self, group: SourceGroup, config: GroupConfig) -> None:
        interval = config.checkpoints.interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.checkpoint(group.name, "periodic")
            except CheckpointError as exc:
                log.warning("group %s: periodic checkpoint skipped: %s", group.name, exc)

    def _target_group(self, name: str) -> Any:
        assert self.target is not None
        return self.target.group_named(name)

    def checkpoints(self, name: str) -> list[dict[str, Any]]:
        group = self._target_group(name)
        with group.undo.lock:
            return [c.to_dict() for c in group.undo.checkpoints]

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
        assert self.target is not None and self.views is not None
        for group in self.target.groups.values():
            if export in group.views:
                self.views.remove_export(export)
                written = group.views[export].written_bytes
                group.close_view(export)
                log.info("view %s closed", export)
                return {"export": export, "discarded_bytes": written}
        raise CheckpointError(f"no view {export!r} is open")

    def list_views(self) -> list[dict[str, Any]]:
        assert self.target is not None
        return [
            {
                "export": export,
                "group": group.name,
                "volume": group.meta["volumes"][view.volume]["name"],
                "checkpoint": view.checkpoint.id,
                "writable": not view.read_only,
            }
            for group in self.target.groups.values()
            for export, view in group.views.items()
        ]

    def _export_promoted(self, group: Any) -> list[dict[str, Any]]:
        assert self.views is not None
        exports = []
        for member in group.promoted_volumes():
            export = f"{group.name}/{member.name}"
            if export not in self.views.volumes:
                self.views.add_export(export, member, f"{member.name} of {group.name} (promoted)")
            exports.append({"export": export, "uri": f"{self.addresses['views']}/{export}"})
        return exports

    def _unexport_promoted(self, group: Any) -> None:
        assert self.views is not None
        for volume in group.meta["volumes"]:
            self.views.remove_export(f"{group.name}/{volume['name']}")

    def _shipper(self, name: str) -> Shipper:
        group = self._source_group(name)
        return next(s for s in self._shippers if s.group is group)

    # Snapshots of a losing side (failback, split brain) ------------------------

    def _shelf(self, name: str) -> tuple[Snapshots, NBDServer, str]:
        """The group's snapshots, the NBD server and address that export them."""
        if self.source_groups:
            group = self._source_group(name)
            if (group.fence or {}).get("promoted"):
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
            raise CheckpointError(f"no snapshot view {export!r} is open")
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

    async def failback(self, name: str, timeout: float = 3600) -> dict[str, Any]:
        """Bring production home after a failover (source node): see Shipper.failback."""
        return await self._shipper(name).failback(timeout)

    async def reverse(self, name: str, timeout: float = 3600) -> dict[str, Any]:
        """A round of reverse protection now (source node, failed over)."""
        return await self._shipper(name).reverse_round(timeout)

    def reclaim(self, name: str) -> dict[str, Any]:
        """Production resumes here at the last reverse round (source node)."""
        return self._source_group(name).reclaim()

    async def resolve(self, name: str, survivor: str, timeout: float = 3600) -> dict[str, Any]:
        """End a split brain with the side that survives (source node): see Shipper.resolve."""
        return await self._shipper(name).resolve(survivor, timeout)

    async def promote(self, name: str, ref: str | None = None) -> dict[str, Any]:
        """Unplanned failover: the group's replica becomes the live copy (at its
        latest consistent point, or at a retained checkpoint)."""
        group = self._target_group(name)
        assert self.target is not None
        self.target.drop_link(group)
        result = await group.promote(checkpoint=ref)
        return result | {"exports": self._export_promoted(group)}

    async def rollback(self, name: str, ref: str) -> dict[str, Any]:
        group = self._target_group(name)
        checkpoint = group.resolve_checkpoint(ref)
        assert self.target is not None
        result = await group.rollback(checkpoint.id)
        self.target.drop_link(group)
        return result

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.close()
        if self.admin is not None:
            await self.admin.close()
        for shipper in self._shippers:
            shipper.stop()
        if self.nbd is not None:
            await self.nbd.close()
        if self.views is not None:
            await self.views.close()
        for task in [*self._tasks, *self._commits]:  # the groups' close syncs their journals
            task.cancel()
        await asyncio.gather(*self._tasks, *self._commits, return_exceptions=True)
        for shipper in self._shippers:  # before the groups close under them
            await shipper.join()
        loop = asyncio.get_running_loop()
        for group in self.source_groups:
            await loop.run_in_executor(None, group.close)
        if self.target is not None:
            await self.target.close()


async def run(config: NodeConfig) -> None:
    node = Node(config)
    try:
        await node.start()
    except OSError as exc:
        await node.stop()
        raise ConfigError(f"cannot start node {config.name}: {exc}") from exc
    try:
        await until_stopped()
        log.info("stopping node %s", config.name)
    finally:
        await node.stop()
