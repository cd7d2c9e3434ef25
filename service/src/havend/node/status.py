"""What a node says about itself: its status (``<state_dir>/status.json``,
rewritten every ``status_period`` seconds), progress lines in the log,
throughput, volumes and peers."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any

from havend import __version__
from havend.fsutil import write_atomic
from havend.node.base import NodeBase
from havend.process import human_bytes

log = logging.getLogger("havend")


class StatusMixin(NodeBase):
    def status(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        if self.source_groups:
            groups = [dataclasses.asdict(g.status()) for g in self.source_groups]
        elif self.target is not None:
            groups = [dataclasses.asdict(g.status()) for g in self.target.groups.values()]
        for group in groups:
            moved = group.get("shipped_bytes", group.get("applied_bytes", 0))
            group["throughput_bytes_per_s"] = round(self._throughput(group["group"], moved))
            if group["name"] in self._group_configs:  # a source group: what it was set to
                group["settings"] = self.group_settings(group["name"])
            elif self.target is not None:  # a replica: the last drill that recovered from it
                group["last_verified"] = self.last_verified(group["name"])
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

    def last_verified(self, name: str) -> dict[str, Any] | None:
        """The newest checkpoint of a target group a drill recovered from,
        with its age (now less the checkpoint's time), or None."""
        if self.store is None:
            return None
        found = self.store.last_verified(name)
        if found is None:
            return None
        return found | {"age_seconds": round(time.time() - found["checkpoint"]["time"], 3)}

    def group_settings(self, name: str) -> dict[str, Any]:
        """A source group's settings as ``POST /v1/groups`` takes them, and
        where they are defined (``api`` or ``config``: the file's are
        changed in the file). Hooks run commands: only whether there are any."""
        config = self._group_configs[name]
        policy = config.checkpoints
        return {
            "defined_in": "api" if name in self.api_groups else "config",
            "mode": config.mode,
            "rpo_seconds": config.rpo_seconds,
            "compression_level": config.compression_level,
            "bandwidth_limit": config.bandwidth_limit,
            "reverse_interval_seconds": config.reverse_interval_seconds,
            "journal": {
                "segment_size": config.segment_size,
                "max_segments": config.max_segments,
                "cache_bytes": config.cache_bytes,
                "background_sync_bytes": config.background_sync_bytes,
            },
            "checkpoints": {
                "interval_seconds": policy.interval_seconds,
                "retain": policy.retain,
                "max_age_seconds": policy.max_age_seconds,
                "hooks": policy.hooks is not None,
            },
            "volumes": [
                {"name": v.name, "path": v.path, "server": v.server} for v in config.volumes
            ],
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
        """Every volume of every group: size, file, the NBD URI serving it, and
        the protected server it is a disk of (source node; None without one)."""
        out: list[dict[str, Any]] = []
        for group in self.source_groups:
            out += [self._volume_status(group, m.index) for m in group.live_volumes()]
        if self.target is not None:
            for tgroup in self.target.groups.values():
                for index, spec in tgroup.live_specs():
                    promoted = tgroup.promoted is not None
                    out.append(
                        {
                            "name": spec["name"],
                            "group": tgroup.name,
                            "index": index,
                            "size": spec["size"],
                            "path": spec["path"],
                            "uri": f"{self.addresses.get('views')}/{tgroup.name}/{spec['name']}"
                            if promoted
                            else None,
                            "writable": promoted,
                            "server": spec.get("server"),
                            "state": spec.get("state", "protected"),
                            "sync": None,
                        }
                    )
        return out

    def servers(self) -> list[dict[str, Any]]:
        """The protected servers: each volume label, with its group and volumes."""
        found: dict[str, dict[str, Any]] = {}
        for volume in self.volumes():
            if volume["server"] is None:
                continue
            server = found.setdefault(
                volume["server"], {"name": volume["server"], "groups": [], "volumes": []}
            )
            if volume["group"] not in server["groups"]:
                server["groups"].append(volume["group"])
            server["volumes"].append(
                {k: volume[k] for k in ("name", "group", "size", "uri", "writable")}
            )
        return sorted(found.values(), key=lambda s: s["name"])

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
        """Write status.json every ``status_period``, hand the status to the
        listeners, and log progress lines every ``status_interval``; a tick that
        fails (any exception: a status made while a group changes, a listener)
        is logged and the next one runs: the reports never stop for good."""
        path = os.path.join(self.config.state_dir, "status.json")
        last_line = 0.0
        failing = False  # the traceback once, while ticks keep failing
        while True:
            try:
                last_line = self._report_tick(path, last_line)
                failing = False
            except Exception:
                log.error("the status report failed; the next runs", exc_info=not failing)
                failing = True
            await asyncio.sleep(self.config.status_period)

    def _report_tick(self, path: str, last_line: float) -> float:
        """One report; returns when the progress lines were last logged."""
        status = self.status()
        # A view of the node, rewritten often: atomic, but not worth an fsync.
        try:
            write_atomic(path, json.dumps(status, indent=1).encode(), durable=False)
        except OSError as exc:  # a full disk must not stop the reports for good
            log.error("cannot write %s: %s", path, exc)
        for listener in self.status_listeners:  # e.g. each group's state history
            try:
                listener(status)
            except Exception as exc:  # the database is full or gone: say it, go on
                log.error("cannot record group states: %s", exc)
        now = time.monotonic()
        if now - last_line >= self.config.status_interval:
            last_line = now
            for group in status["groups"]:
                log.info("%s", self._progress_line(group))
        return last_line

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
