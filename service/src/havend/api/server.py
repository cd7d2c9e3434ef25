"""Serving the REST API from the node's own event loop (uvicorn, HTTPS with
the node's certificate; client certificates are checked when offered)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from havend.api.app import create_app
from havend.config import TLSConfig
from havend.node import Node
from havend.operations import Operations
from havend.state import StateStore


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # havend handles SIGINT/SIGTERM itself
        yield


class ApiServer:
    """The API of one node, over its operations layer and state store (both
    owned by the composition root, ``havend.cli``)."""

    def __init__(
        self, node: Node, operations: Operations, store: StateStore, tls: TLSConfig | None
    ) -> None:
        self.tls = tls
        self.app = create_app(node, operations, store)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        tls = self.tls
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

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
