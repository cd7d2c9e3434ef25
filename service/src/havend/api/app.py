"""The node's REST API (FastAPI), served by havend's own event loop.

Why FastAPI: the request and response bodies are pydantic models, so every
bad body is a 422 naming the field, and the OpenAPI schema (``/openapi.json``,
``docs/api/openapi.json``) is the code's own; uvicorn runs inside the node's
asyncio loop (no second process, no thread).

Every route needs a bearer token (401 without one, 403 when its scope is too
narrow: read < operate < admin). Every request that changes state, allowed
or not, lands in the audit log. Long operations (failover, failback...)
answer 202 with an operation to poll, with progress (bytes, ETA).

Every state change goes through the operations layer (``havend.operations``:
which role, which state, one at a time per group), as the admin socket's do;
its errors are answered by class (``havend.errors.status_code``: 404, 409,
422), never by their text.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from havend import __version__
from havend.api.metrics import render_metrics
from havend.api.models import (
    NAME,
    SERVER,
    CheckpointRequest,
    ExportRequest,
    GroupRequest,
    GroupUpdate,
    OperationRequest,
    PeerRequest,
    Problem,
    TokenRequest,
    VerificationRequest,
    VolumeSpec,
)
from havend.errors import Busy, Conflict, HavendError, Invalid, status_code
from havend.node import Node
from havend.operations import Operations
from havend.state import SCOPES, StateStore, Token

log = logging.getLogger("havend.api")


def schema() -> dict[str, Any]:
    """The OpenAPI schema (``havend api-schema``; docs/api/openapi.json)."""
    return create_app(None, None, None).openapi()  # type: ignore[arg-type]


def create_app(node: Node, operations: Operations, store: StateStore) -> FastAPI:
    app = FastAPI(
        title="havend node API",
        version=__version__,
        description=__doc__,
        responses={
            400: {"model": Problem, "description": "not JSON"},
            401: {"model": Problem, "description": "no valid bearer token"},
            403: {"model": Problem, "description": "the token's scope is too narrow"},
            404: {"model": Problem, "description": "no such group, export or operation"},
            409: {"model": Problem, "description": "not possible in the group's state"},
            422: {"model": Problem, "description": "invalid request: the fields named"},
        },
        openapi_url=None,  # served below, behind a token like every route
        docs_url=None,
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False)

    def authorize(needed: str) -> Callable[..., Awaitable[Token]]:
        async def check(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        ) -> Token:
            token = store.check_token(credentials.credentials) if credentials else None
            mutating = request.method not in ("GET", "HEAD")
            if token is None:
                if mutating:
                    _audit_denied(request, "anonymous", 401)
                raise HTTPException(
                    401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
                )
            if not token.allows(needed):
                if mutating:
                    _audit_denied(request, _actor(token), 403)
                raise HTTPException(403, f"this token's scope is {token.scope}, {needed} needed")
            return token

        return check

    def _audit_denied(request: Request, actor: str, status: int) -> None:
        store.audit(
            actor,
            f"{request.method} {request.url.path}",
            request.url.path,
            {},
            status,
            {"error": "denied"},
        )

    read, operate, admin = (Depends(authorize(s)) for s in SCOPES)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "error": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(HavendError)
    async def refused(request: Request, exc: HavendError) -> JSONResponse:
        code = status_code(exc)
        detail: Any = str(exc)
        if isinstance(exc, Invalid):
            detail = [{"field": exc.field, "error": str(exc)}]
        # refused before anything was done, for a moment: the client may ask again
        headers = {"Retry-After": "1"} if isinstance(exc, Busy) else None
        return JSONResponse({"detail": detail}, status_code=code, headers=headers)

    # None only when the app is built for its schema (``schema()``), never serving.
    _group_status = operations.group_status if operations is not None else None
    _described = operations.describe if operations is not None else None

    async def _run(kind: str, group: str, args: dict[str, Any]) -> Any:
        return await operations.run(kind, group, args)

    async def _act(
        token: Token,
        action: str,
        target: str,
        body: Any,
        fn: Callable[[], Awaitable[Any]],
        status: int = 200,
    ) -> Any:
        """Run a state change, audited whatever its outcome."""
        actor = _actor(token)
        try:
            result = await fn()
        except HTTPException as exc:
            store.audit(actor, action, target, body, exc.status_code, {"error": exc.detail})
            raise
        except HavendError as exc:  # answered by the handler above, by class
            store.audit(actor, action, target, body, status_code(exc), {"error": str(exc)})
            raise
        store.audit(actor, action, target, body, status, _redact(result))
        return result

    # Node -------------------------------------------------------------------

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: Token = read) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/node", summary="this node: version, role, health, capacity")
    async def get_node(_: Token = read) -> dict[str, Any]:
        status = node.status()
        disk = shutil.disk_usage(node.config.state_dir)
        groups = [_described(g) for g in status["groups"]]
        unhealthy = [g["name"] for g in groups if g["state"] == "error"]
        return {
            "name": status["node"],
            "role": status["role"],
            "version": status["version"],
            "uptime_s": status["uptime_s"],
            "addresses": status["addresses"],
            "health": "degraded" if unhealthy else "ok",
            "unhealthy_groups": unhealthy,
            "capacity": {"state_dir_total_bytes": disk.total, "state_dir_free_bytes": disk.free},
            "groups": len(groups),
        }

    @app.get("/v1/groups", summary="consistency groups, their replication and failover state")
    async def list_groups(_: Token = read) -> list[dict[str, Any]]:
        return [_described(g) for g in node.status()["groups"]]

    @app.post(
        "/v1/groups",
        status_code=201,
        summary="create a consistency group and start replicating it (source node)",
    )
    async def create_group(body: GroupRequest, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            return _described(await _run("group_create", "", body.model_dump()))

        return await _act(token, "group_create", body.name, body.model_dump(), run, 201)

    @app.delete(
        "/v1/groups/{group}",
        summary="stop replicating a group made through the API",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def delete_group(group: str, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("group_delete", group, {})

        return await _act(token, "group_delete", group, {}, run)

    @app.post(
        "/v1/groups/{group}/volumes",
        status_code=201,
        summary="add a volume to a live group: captured at once, copied while the others "
        "replicate (source node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def add_volume(group: str, body: VolumeSpec, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("volume_add", group, body.model_dump())

        return await _act(token, "volume_add", group, body.model_dump(), run, 201)

    @app.delete(
        "/v1/groups/{group}/volumes/{volume}",
        summary="stop replicating a volume of a live group (its replica is kept unless purge)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def remove_volume(
        group: str,
        volume: str,
        purge: bool = Query(False, description="delete the volume's replica on the target too"),
        token: Token = admin,
    ) -> dict[str, Any]:
        args = {"volume": volume, "purge": purge}

        async def run() -> Any:
            return await _run("volume_remove", group, args)

        return await _act(token, "volume_remove", f"{group}/{volume}", args, run)

    @app.patch(
        "/v1/groups/{group}",
        summary="change a group's settings in place (source node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def update_group(group: str, body: GroupUpdate, token: Token = admin) -> dict[str, Any]:
        changes = body.model_dump(exclude_none=True)
        if "checkpoints" in changes:
            changes["checkpoints"] = {
                k: v for k, v in changes["checkpoints"].items() if v is not None
            }

        async def run() -> Any:
            return _described(await _run("group_update", group, changes))

        return await _act(token, "group_update", group, changes, run)

    @app.post(
        "/v1/groups/{group}/pause",
        summary="stop shipping (writes are still journaled)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def pause_group(group: str, token: Token = operate) -> dict[str, Any]:
        return await _act(token, "pause", group, {}, lambda: _toggle(group, "pause"))

    @app.post(
        "/v1/groups/{group}/resume",
        summary="ship again what was journaled meanwhile",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def resume_group(group: str, token: Token = operate) -> dict[str, Any]:
        return await _act(token, "resume", group, {}, lambda: _toggle(group, "resume"))

    async def _toggle(group: str, kind: str) -> dict[str, Any]:
        return _described(await _run(kind, group, {}))

    @app.post(
        "/v1/peers",
        summary="pair this source node with its target (TLS checked first)",
        responses={409: {"model": Problem}},
    )
    async def pair(body: PeerRequest, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("pair", "", body.model_dump())

        return await _act(token, "pair", f"{body.host}:{body.port}", body.model_dump(), run)

    @app.get("/v1/volumes", summary="every volume of every group, and where it is served")
    async def list_volumes(
        group: str | None = Query(None, pattern=NAME, description="only this group's"),
        server: str | None = Query(None, pattern=SERVER, description="only this server's"),
        _: Token = read,
    ) -> list[dict[str, Any]]:
        return [
            v
            for v in node.volumes()
            if (group is None or v["group"] == group) and (server is None or v["server"] == server)
        ]

    @app.get(
        "/v1/servers",
        summary="the protected servers (volume labels), their groups, volumes and state",
    )
    async def list_servers(_: Token = read) -> list[dict[str, Any]]:
        states = {g["name"]: g for g in map(_described, node.status()["groups"])}
        out = []
        for server in node.servers():
            groups = [states[g] for g in server["groups"] if g in states]
            out.append(
                server
                | {
                    "node": node.config.name,
                    "state": groups[0]["state"] if len(groups) == 1 else "mixed",
                    "lag_seconds": max((g.get("lag_seconds") or 0 for g in groups), default=0),
                    "rpo_ok": all(g.get("rpo_ok", True) for g in groups),
                }
            )
        return out

    @app.get("/v1/peers", summary="the other side of replication, and this node's certificate")
    async def list_peers(_: Token = read) -> dict[str, Any]:
        return node.peers()

    @app.get("/v1/groups/{group}", summary="one group", responses={404: {"model": Problem}})
    async def get_group(group: str, _: Token = read) -> dict[str, Any]:
        return _group_status(group)

    @app.get(
        "/v1/groups/{group}/history",
        summary="the group's failover states over time",
        responses={404: {"model": Problem}},
    )
    async def group_history(group: str, _: Token = read) -> list[dict[str, Any]]:
        _group_status(group)
        return store.state_history(group)

    # Checkpoints and point-in-time exports -------------------------------------

    @app.get(
        "/v1/groups/{group}/checkpoints",
        summary="retained checkpoints (target node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def list_checkpoints(group: str, _: Token = read) -> list[dict[str, Any]]:
        _group_status(group)
        if node.config.role != "target":
            raise Conflict("checkpoints are kept on the target node: ask it")
        return node.checkpoints(group)

    @app.post(
        "/v1/groups/{group}/checkpoints",
        status_code=201,
        summary="take a checkpoint (source node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def create_checkpoint(
        group: str, body: CheckpointRequest, token: Token = operate
    ) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("checkpoint", group, body.model_dump())

        return await _act(token, "checkpoint", group, body.model_dump(), run, 201)

    @app.delete(
        "/v1/groups/{group}/checkpoints/{checkpoint}",
        summary="delete a retained checkpoint: id, unique prefix (6+), latest or oldest "
        "(target node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def delete_checkpoint(
        group: str, checkpoint: str, token: Token = operate
    ) -> dict[str, Any]:
        args = {"checkpoint": checkpoint}

        async def run() -> Any:
            return await _run("checkpoint_delete", group, args)

        return await _act(token, "checkpoint_delete", group, args, run)

    @app.post(
        "/v1/groups/{group}/verifications",
        status_code=201,
        summary="record a drill's result for a retained checkpoint (target node): the "
        "group's last verified recoverable checkpoint",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def add_verification(
        group: str, body: VerificationRequest, token: Token = operate
    ) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("verify", group, body.model_dump())

        return await _act(token, "verify", group, body.model_dump(), run, 201)

    @app.get(
        "/v1/groups/{group}/verifications",
        summary="the drills' results recorded for a group, newest first (target node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def list_verifications(
        group: str, limit: int = Query(100, ge=1, le=10000), _: Token = read
    ) -> list[dict[str, Any]]:
        if node.config.role != "target":
            raise Conflict("drills' results are kept on the target node: ask it")
        return node.verifications(group, limit)

    @app.get("/v1/exports", summary="open point-in-time exports (target node)")
    async def list_exports(_: Token = read) -> list[dict[str, Any]]:
        return node.list_views()

    @app.post(
        "/v1/exports",
        status_code=201,
        summary="export a volume as of a checkpoint over NBD (target node)",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def open_export(body: ExportRequest, token: Token = operate) -> dict[str, Any]:
        async def run() -> Any:
            return await _run("export_open", body.group, body.model_dump())

        return await _act(token, "export_open", body.group, body.model_dump(), run, 201)

    @app.delete(
        "/v1/exports/{export:path}",
        summary="close an export (its writes are dropped)",
        responses={404: {"model": Problem}},
    )
    async def close_export(export: str, token: Token = operate) -> dict[str, Any]:
        async def run() -> Any:
            if export not in {v["export"] for v in node.list_views()}:
                raise HTTPException(404, f"no export {export!r} is open")
            return await _run("export_close", "", {"export": export})

        return await _act(token, "export_close", export, {}, run)

    # Failover operations ----------------------------------------------------------

    @app.post(
        "/v1/groups/{group}/operations/{kind}",
        status_code=202,
        summary="start a failover operation; poll /v1/operations/{id}",
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def start_operation(
        group: str,
        kind: Literal[
            "failover", "failback", "resolve", "reverse", "reclaim", "promote", "rollback"
        ],
        body: OperationRequest,
        token: Token = operate,
    ) -> dict[str, Any]:
        async def run() -> Any:
            return operations.start(kind, group, body.model_dump(), _actor(token))

        return await _act(token, kind, group, body.model_dump(), run, 202)

    @app.get(
        "/v1/operations/{op_id}",
        summary="an operation: state, progress, result",
        responses={404: {"model": Problem}},
    )
    async def get_operation(op_id: str, _: Token = read) -> dict[str, Any]:
        op = store.operation(op_id)
        if op is None:
            raise HTTPException(404, f"no operation {op_id!r}")
        if op["state"] == "running":
            op["progress"] = operations.progress(op["target"])
        return op

    # Audit, tokens, metrics -------------------------------------------------------

    @app.get("/v1/audit", summary="the audit log (append-only), oldest first")
    async def audit(
        after: int = Query(0, ge=0, le=1 << 62),
        limit: int = Query(100, ge=1, le=1000),
        _: Token = admin,
    ) -> list[dict[str, Any]]:
        return store.audit_entries(after, limit)

    @app.get("/v1/tokens", summary="API tokens (never their secrets)")
    async def list_tokens(_: Token = admin) -> list[dict[str, Any]]:
        return store.tokens()

    @app.post("/v1/tokens", status_code=201, summary="a new token; its secret is shown once")
    async def create_token(body: TokenRequest, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            made, secret = store.create_token(body.name, body.scope)
            return {"id": made.id, "name": made.name, "scope": made.scope, "token": secret}

        return await _act(token, "token_create", body.name, body.model_dump(), run, 201)

    @app.delete(
        "/v1/tokens/{token_id}", summary="revoke a token", responses={404: {"model": Problem}}
    )
    async def revoke_token(token_id: str, token: Token = admin) -> dict[str, Any]:
        async def run() -> Any:
            if not store.revoke_token(token_id):
                raise HTTPException(404, f"no active token {token_id!r}")
            return {"id": token_id, "revoked": True}

        return await _act(token, "token_revoke", token_id, {}, run)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(_: Token = read) -> PlainTextResponse:
        content, media_type = render_metrics(node)
        return PlainTextResponse(content, media_type=media_type)

    app.state.started = time.time()
    return app


def _actor(token: Token) -> str:
    return f"{token.name} ({token.id})"


def _redact(result: Any) -> Any:
    """What the audit log keeps of a result: never a token's secret."""
    if isinstance(result, dict) and "token" in result:
        return result | {"token": "(shown once to the caller)"}
    return result
