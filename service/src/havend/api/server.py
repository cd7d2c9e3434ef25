"""Serving the REST API from the node's own event loop (uvicorn, HTTPS with
the node's certificate; client certificates are checked when offered)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from havend.api.app import create_app
from havend.api.state import StateStore

if TYPE_CHECKING:
    from havend.node import Node

DB_NAME = "havend.db"


def open_store(state_dir: str) -> StateStore:
    """The node's state database (made and migrated on first use)."""
    return StateStore(os.path.join(state_dir, DB_NAME))


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # havend handles SIGINT/SIGTERM itself
        yield


class ApiServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        assert node.store is not None  # opened by the node first (its groups are in it)
        self.store: StateStore = node.store
        abandoned = self.store.abandon_running()
        if abandoned:
            logging.getLogger("havend.api").warning(
                "%d operations of the previous run never finished: marked failed", abandoned
            )
        self.app = create_app(node, self.store)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        tls = self.node.config.tls
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.ca if tls else None,
            ssl_cert_reqs=ssl.CERT_OPTIONAL if tls else ssl.CERT_NONE,
            timeout_graceful_shutdown=5,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):  # uvicorn says when it listens
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # its error
        bound = sock.getsockname()
        return bound[0], bound[1]

    def observe(self, groups: list[dict]) -> None:
        """Record the state of each group when it changed (the node calls this
        with every status it makes)."""
        for group in groups:
            self.app.state.describe(group)

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self.store.close()
