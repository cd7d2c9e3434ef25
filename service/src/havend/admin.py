"""The node's local admin socket: operations before (and under) the REST API.

``<state_dir>/admin.sock``, a UNIX socket only root (mode 0600) can use. One
JSON object per line each way: ``{"op": NAME, ...arguments}`` is answered by
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": MESSAGE}``. A
malformed request gets an error answer and the connection stays usable.

Every request that changes something goes through the operations layer
(``havend.operations``), with the same guards as the REST API's; the
``havend`` CLI's node commands are requests on this socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from havend.errors import HavendError
from havend.node import Node
from havend.operations import Operations

log = logging.getLogger("havend.admin")

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AdminError(HavendError):
    """An admin request failed (the message is the answer's error)."""


class AdminServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_answer(False, f"request longer than {MAX_REQUEST} bytes"))
                    break
                if not line:
                    break
                writer.write(await self._handle(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
        except ValueError:
            return _answer(False, "the request is not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _answer(False, 'the request must be a JSON object with an "op"')
        handler = self.handlers.get(request["op"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _answer(False, f"unknown op {request['op']!r} (this node knows: {known})")
        try:
            result = await handler(request)
        except (HavendError, OSError) as exc:
            return _answer(False, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return _answer(False, f"bad arguments for {request['op']}: {exc!r}")
        except Exception as exc:  # one bad request must not end the node
            log.exception("admin %s failed", request["op"])
            return _answer(False, f"{type(exc).__name__}: {exc}")
        return _answer(True, result)


def node_handlers(node: Node, operations: Operations) -> dict[str, Handler]:
    """The requests a node answers on its socket (those of its role)."""

    def operation(kind: str) -> Handler:
        async def handle(request: dict[str, Any]) -> Any:
            args = {k: v for k, v in request.items() if k not in ("op", "group")}
            group = str(request["group"]) if "group" in request else ""
            return await operations.run(kind, group, args)

        return handle

    def reading(read: Callable[[dict[str, Any]], Any]) -> Handler:
        async def handle(request: dict[str, Any]) -> Any:
            return read(request)

        return handle

    handlers: dict[str, Handler] = {
        "status": reading(lambda r: node.status()),
        "snapshots": reading(lambda r: node.list_snapshots(str(r["group"]))),
        "snapshot_open": operation("snapshot_open"),
        "snapshot_close": operation("snapshot_close"),
        "snapshot_delete": operation("snapshot_delete"),
    }
    if node.config.role == "source":
        for kind in ("checkpoint", "failover", "failback", "reverse", "reclaim", "resolve"):
            handlers[kind] = operation(kind)
    else:
        handlers |= {
            "checkpoints": reading(lambda r: node.checkpoints(str(r["group"]))),
            "views": reading(lambda r: node.list_views()),
            "view_open": operation("export_open"),
            "view_close": operation("export_close"),
            "checkpoint_delete": operation("checkpoint_delete"),
            "rollback": operation("rollback"),
            "promote": operation("promote"),
        }
    return handlers


def _answer(ok: bool, value: Any) -> bytes:
    body = {"ok": True, "result": value} if ok else {"ok": False, "error": value}
    return json.dumps(body).encode() + b"\n"


def call(path: str, op: str, timeout: float = 600, **arguments: Any) -> Any:
    """One request to a node's admin socket (blocking); raises AdminError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise AdminError(f"no admin socket at {path}: is havend running there?") from None
    except OSError as exc:
        raise AdminError(f"admin socket {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"admin socket {path} gave no answer to {op}") from None
    if not answer.get("ok"):
        raise AdminError(str(answer.get("error")))
    return answer.get("result")
