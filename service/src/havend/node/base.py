"""What every part of a node shares: its configuration, its groups and the
servers that export their volumes (see :class:`havend.node.Node`)."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from typing import Any

from havend.cdp.snapshot import Snapshots
from havend.config import Endpoint, GroupConfig, NodeConfig
from havend.errors import NotFound
from havend.nbd.server import NBDServer
from havend.ship import Shipper, SourceGroup
from havend.state import StateStore
from havend.target import TargetNode

StatusListener = Callable[[dict[str, Any]], None]


class NodeBase:
    """The node's state; each concern of the node is a mixin over it."""

    def __init__(self, config: NodeConfig, store: StateStore | None = None) -> None:
        self.config = config
        # Groups made, pairing and pauses through the API live in the store
        # (None: a node without the API keeps only its config file's groups).
        self.store = store
        self.started = time.time()
        self.source_groups: list[SourceGroup] = []
        self.target: TargetNode | None = None
        self.nbd: NBDServer | None = None
        self.views: NBDServer | None = None  # target: point-in-time views
        self.addresses: dict[str, str] = {}
        # Called with every status the node makes (the operations layer records
        # state changes with it); wired by the composition root (havend.cli).
        self.status_listeners: list[StatusListener] = []
        self._view_count = 0
        self._tasks: list[asyncio.Future[Any]] = []
        self._commits: set[asyncio.Task[None]] = set()  # checkpoint markers' (see checkpoint)
        self._shippers: list[Shipper] = []
        self._snapshots: dict[str, Snapshots] = {}  # per group name
        self._snapshot_views: dict[str, tuple[Snapshots, Any]] = {}  # export -> (shelf, view)
        # (monotonic time, bytes) samples of each group's shipped or applied bytes
        self._rates: dict[str, collections.deque[tuple[float, int]]] = {}
        self._client_ctx: ssl.SSLContext | None = None
        self._group_tasks: dict[str, list[asyncio.Future[Any]]] = {}
        self._group_configs: dict[str, GroupConfig] = {}  # config file's and API's
        self.api_groups: set[str] = set()  # created through the API (not the config file)
        self.target_endpoint: Endpoint | None = None  # where sources ship (config or paired)

    def _keep_config(self, group: SourceGroup, config: GroupConfig) -> None:
        """A source group's settings as now in force, and its volumes' server
        labels (shown by the API, sent to the target in every HELLO)."""
        self._group_configs[group.name] = config
        group.labels = {v.name: v.server for v in config.volumes}

    def _source_group(self, name: str) -> SourceGroup:
        for group in self.source_groups:
            if group.name == name:
                return group
        raise NotFound(f"no group {name!r} on this node")

    def _target_group(self, name: str) -> Any:
        if self.target is None:
            raise NotFound(f"no group {name!r} on this node")
        return self.target.group_named(name)

    def _shipper(self, name: str) -> Shipper:
        group = self._source_group(name)
        return next(s for s in self._shippers if s.group is group)

    def _group_config(self, name: str) -> GroupConfig:
        return self._group_configs[name]
