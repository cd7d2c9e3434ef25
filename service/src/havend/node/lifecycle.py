"""A node's lifecycle: starting its servers and groups, stopping them cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from havend import __version__
from havend.config import Endpoint, NodeConfig
from havend.errors import HavendError
from havend.nbd.server import NBDServer
from havend.node.base import NodeBase
from havend.node.exports import ExportsMixin
from havend.node.failover import FailoverMixin
from havend.node.groups import GroupsMixin
from havend.node.status import StatusMixin
from havend.target import TargetNode

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


class Node(GroupsMixin, StatusMixin, ExportsMixin, FailoverMixin, NodeBase):
    """One havend node: its groups, the servers that export and replicate them,
    and its status. The API, the admin socket and the operations layer are
    built around it by the composition root (``havend.cli``); the node never
    calls them."""

    async def start(self) -> None:
        """Open the groups and start serving (NBD, replication, views); the
        status reports start with :meth:`start_reports`, once every server of
        the process is up."""
        config = self.config
        os.makedirs(config.state_dir, exist_ok=True)
        server_ctx, client_ctx = _ssl_contexts(config)
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
                planned = group.records.promoting is not None and group.records.promoting.planned
                if planned and not group.promoted:  # a planned failover cut short: finish it
                    log.warning("group %s: finishing an interrupted planned failover", group.name)
                    try:
                        await group.promote(planned=True)
                    except HavendError as exc:  # stays on hold; the node serves the rest
                        log.error("group %s: cannot finish the failover: %s", group.name, exc)
                if group.promoted:  # still failed over after a restart: serve it
                    self._export_promoted(group)

    def start_reports(self) -> None:
        """Write ``status.json`` and the progress lines from now on (see
        :meth:`_report`), and say that the node is up."""
        config = self.config
        self._tasks.append(asyncio.get_running_loop().create_task(self._report()))
        log.info(
            "havend %s node %s (%s) up: %s%s",
            __version__,
            config.name,
            config.role,
            ", ".join(f"{k} {v}" for k, v in self.addresses.items()),
            "" if config.tls else " [insecure plaintext]",
        )

    async def stop(self) -> None:
        """Stop serving and shipping, sync and close every group."""
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
