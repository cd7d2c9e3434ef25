"""The operations layer: one set of guards for the REST API, the admin socket
and the CLI (role, failover state, one operation at a time per group), and
errors answered by their class, never by their text."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from nodes import app_group, make_token, start_pair
from waiting import wait_until

from havend import admin
from havend.admin import node_handlers
from havend.api.app import create_app
from havend.errors import Busy, Conflict, HavendError, Invalid, NotFound, status_code
from havend.operations import OPERATIONS, Operations
from havend.state import open_store

MiB = 1 << 20
HAVEND = [sys.executable, "-m", "havend"]
WAIT = 60


# In process: a node whose operations wait until the test lets them finish ----


class _Config:
    def __init__(self, role: str) -> None:
        self.role = role


class FakeNode:
    """The parts of a node the operations layer calls, with a failover that
    runs until ``release`` is set and other operations that raise what the
    test says."""

    def __init__(self, role: str = "source") -> None:
        self.config = _Config(role)
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls: list[str] = []
        self.raises: BaseException | None = None
        self.group: dict[str, Any] = {"name": "app", "fence": None, "connected": True}

    def status(self) -> dict[str, Any]:
        return {"groups": [dict(self.group)]}

    def refusal(self, kind: str, name: str) -> str | None:
        return None

    async def failover(self, name: str, timeout: float) -> dict[str, Any]:
        self.calls.append("failover")
        self.entered.set()
        await self.release.wait()
        return {"group": name, "final_seq": 7}

    async def reverse(self, name: str, timeout: float) -> dict[str, Any]:
        self.calls.append("reverse")
        self.entered.set()
        await self.release.wait()
        return {"group": name, "pulled_bytes": 4096}

    async def failback(self, name: str, timeout: float) -> dict[str, Any]:
        self.calls.append("failback")
        return {"group": name}

    async def checkpoint(self, name: str, label: str, app: bool | None) -> dict[str, Any]:
        self.calls.append("checkpoint")
        if self.raises is not None:
            raise self.raises
        return {"group": name, "label": label}

    def pause(self, name: str) -> dict[str, Any]:
        self.calls.append("pause")
        self.group["paused"] = True
        return dict(self.group)


def test_one_exclusive_operation_at_a_time_whoever_asks() -> None:
    async def scenario() -> None:
        node = FakeNode()
        node.group["fence"] = {"promoted": {"generation": "g1"}}  # failed over
        operations = Operations(node, None)  # type: ignore[arg-type]
        handlers = node_handlers(node, operations)  # type: ignore[arg-type]
        running = asyncio.ensure_future(handlers["reverse"]({"op": "reverse", "group": "app"}))
        await asyncio.wait_for(node.entered.wait(), 5)
        # Allowed in this state, but the group is taken: refused, whoever asks.
        with pytest.raises(Busy, match="reverse is running on app"):  # a Conflict, for a moment
            await handlers["failback"]({"op": "failback", "group": "app"})
        with pytest.raises(Conflict, match="reverse is running on app"):
            await operations.run("failback", "app", {})
        assert node.calls == ["reverse"]
        node.release.set()
        assert await asyncio.wait_for(running, 5) == {"group": "app", "pulled_bytes": 4096}
        assert operations.running == {}
        assert await operations.run("failback", "app", {}) == {"group": "app"}

    asyncio.run(scenario())


class FakeTarget(FakeNode):
    """A target whose rollback runs until ``release``, and views to open."""

    def __init__(self) -> None:
        super().__init__("target")
        self.group = {"name": "app", "connected": True, "state": "consistent"}

    async def rollback(self, name: str, ref: str) -> dict[str, Any]:
        self.calls.append("rollback")
        self.entered.set()
        await self.release.wait()
        return {"group": name, "checkpoint": ref}

    def open_view(self, name: str, volume: str, ref: str, writable: bool) -> dict[str, Any]:
        self.calls.append("open_view")
        if volume == "explode":
            raise ValueError("a bug of the node, not a bad argument")
        return {"export": f"{name}/{volume}@{ref}"}


def test_nothing_starts_on_a_group_an_exclusive_operation_holds() -> None:
    """A view opened during a rollback would show blocks being rewritten:
    refused while it runs, opened once it is done; and an error of the node
    itself is not turned into a 'bad arguments' answer."""

    async def scenario() -> None:
        node = FakeTarget()
        operations = Operations(node, None)  # type: ignore[arg-type]
        handlers = node_handlers(node, operations)  # type: ignore[arg-type]
        rollback = {"op": "rollback", "group": "app", "checkpoint": "c1"}
        running = asyncio.ensure_future(handlers["rollback"](rollback))
        await asyncio.wait_for(node.entered.wait(), 5)
        view = {"op": "view_open", "group": "app", "volume": "db", "checkpoint": "c1"}
        with pytest.raises(Conflict, match="rollback is running on app"):
            await handlers["view_open"](view)
        assert node.calls == ["rollback"]
        node.release.set()
        await asyncio.wait_for(running, 5)
        assert await handlers["view_open"](view) == {"export": "app/db@c1"}
        with pytest.raises(ValueError, match="a bug of the node"):
            await operations.run("export_open", "app", {"volume": "explode"})
        with pytest.raises(Invalid, match="bad arguments for checkpoint"):
            operations.node.config.role = "source"
            await operations.run("checkpoint", "app", {"app": "yes"})

    asyncio.run(scenario())


def test_a_running_failover_is_a_state_every_caller_sees() -> None:
    async def scenario() -> None:
        node = FakeNode()
        operations = Operations(node, None)  # type: ignore[arg-type]
        handlers = node_handlers(node, operations)  # type: ignore[arg-type]
        running = asyncio.ensure_future(handlers["failover"]({"op": "failover", "group": "app"}))
        await asyncio.wait_for(node.entered.wait(), 5)
        assert operations.group_status("app")["state"] == "failing_over"
        refused = "not possible while the group is failing_over"
        with pytest.raises(Conflict, match=f"failover is {refused}"):
            await operations.run("failover", "app", {})
        with pytest.raises(Conflict, match=f"checkpoint is {refused}"):
            await handlers["checkpoint"]({"op": "checkpoint", "group": "app"})
        with pytest.raises(Conflict, match=f"pause is {refused}"):
            await operations.run("pause", "app", {})
        assert node.calls == ["failover"]
        node.release.set()
        assert await asyncio.wait_for(running, 5) == {"group": "app", "final_seq": 7}
        assert operations.running == {}
        assert await operations.run("checkpoint", "app", {"label": "after"}) == {
            "group": "app",
            "label": "after",
        }

    asyncio.run(scenario())


def test_guards_by_role_state_and_arguments() -> None:
    async def scenario() -> None:
        node = FakeNode()
        operations = Operations(node, None)  # type: ignore[arg-type]
        with pytest.raises(NotFound, match="no group 'nope'"):
            await operations.run("failover", "nope", {})
        with pytest.raises(Conflict, match="promote runs on the target node"):
            await operations.run("promote", "app", {})
        with pytest.raises(
            Conflict, match="failback is not possible while the group is protecting"
        ):
            await operations.run("failback", "app", {})
        node.group["fence"] = {"split_brain": {"generation": "g"}}
        with pytest.raises(Invalid, match="survivor is required") as missing:
            await operations.run("resolve", "app", {})
        assert missing.value.field == "survivor"
        with pytest.raises(NotFound, match="no operation 'explode'"):
            await operations.run("explode", "app", {})
        assert node.calls == []

    asyncio.run(scenario())


def test_every_failover_operation_is_exclusive_and_guarded_by_state() -> None:
    for name in ("failover", "failback", "resolve", "reverse", "reclaim", "promote", "rollback"):
        spec = OPERATIONS[name]
        assert spec.exclusive and spec.background and spec.allowed, name
        assert spec.role in ("source", "target"), name


def test_errors_are_answered_by_their_class() -> None:
    assert status_code(NotFound("group app has no volume 'x'")) == 404
    assert status_code(Conflict("no group here, but a clash")) == 409
    assert status_code(Invalid("label: too long", "label")) == 422
    assert status_code(HavendError("anything else")) == 409


def test_the_api_maps_errors_by_class_not_by_text(tmp_path: Path) -> None:
    """Before: a message without "no group"/"no view" was a 409 whatever it
    meant (e.g. "has no volume"); now the class decides."""
    node = FakeNode()
    store = open_store(str(tmp_path))
    try:
        _, secret = store.create_token("t", "admin")
        operations = Operations(node, store)  # type: ignore[arg-type]
        app = create_app(node, operations, store)  # type: ignore[arg-type]
        client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
        for error, code in (
            (NotFound("group app has no volume 'x'"), 404),
            (Conflict("no group is in the way, but the state is"), 409),
            (Invalid("label: too long", "label"), 422),
            (Busy("volume_add is running on app"), 409),
        ):
            node.raises = error
            answer = client.post("/v1/groups/app/checkpoints", json={"label": "x"})
            assert answer.status_code == code, answer.text
            # only a group busy for a moment says when to ask again
            assert answer.headers.get("Retry-After") == ("1" if isinstance(error, Busy) else None)
            if code == 422:
                assert answer.json()["detail"] == [{"field": "label", "error": "label: too long"}]
            else:
                assert answer.json()["detail"] == str(error)
        assert client.post("/v1/groups/nope/checkpoints", json={}).status_code == 404
        audited = [(e["action"], e["status"]) for e in store.audit_entries()]
        assert audited == [("checkpoint", code) for code in (404, 409, 422, 409, 404)]
    finally:
        store.close()


# Real processes: the admin socket cannot start what the API refuses ----------


def test_the_admin_socket_cannot_fail_over_a_paused_group(tmp_path: Path) -> None:
    """The bug: the state guards lived in the HTTP layer only, so a planned
    failover through the admin socket of a group an operator had paused
    fenced it (writes refused) until the drain timed out."""
    pair = start_pair(tmp_path, [app_group(tmp_path, {"db": MiB})], api="source", caught_up=WAIT)
    source = pair.source
    try:
        headers = {"Authorization": f"Bearer {make_token(source, 'ops', 'admin')}"}
        with httpx.Client(base_url=source.address("api"), headers=headers, timeout=60) as api:
            assert api.post("/v1/groups/app/pause").json()["state"] == "paused"
            with pytest.raises(admin.AdminError, match="not possible while the group is paused"):
                admin.call(str(source.state_dir / "admin.sock"), "failover", group="app", timeout=3)
            refused = api.post("/v1/groups/app/operations/failover", json={"timeout": 3})
            assert refused.status_code == 409
            assert "not possible while the group is paused" in refused.json()["detail"]
            status = api.get("/v1/groups/app").json()
            assert status["fence"] is None and status["state"] == "paused", status
            history = [h["state"] for h in api.get("/v1/groups/app/history").json()]
            assert "failing_over" not in history, history
            assert api.post("/v1/groups/app/resume").json()["state"] == "protecting"
    finally:
        pair.stop()


def test_a_volume_that_does_not_exist_is_404_from_a_real_node(tmp_path: Path) -> None:
    """Before: the API chose 404 by the words "no group"/"no view" in the
    message, so "group app has no volume 'nope'" answered 409."""
    pair = start_pair(tmp_path, [app_group(tmp_path, {"db": MiB})], api=True, caught_up=WAIT)
    try:
        source, target = pair.source, pair.target
        src = {"Authorization": f"Bearer {make_token(source, 'ops', 'admin')}"}
        tgt = {"Authorization": f"Bearer {make_token(target, 'ops', 'admin')}"}
        with (
            httpx.Client(base_url=source.address("api"), headers=src, timeout=60) as s,
            httpx.Client(base_url=target.address("api"), headers=tgt, timeout=60) as t,
        ):
            made = s.post("/v1/groups/app/checkpoints", json={"label": "x"})
            assert made.status_code == 201, made.text
            wait_until(
                lambda: [c["id"] for c in t.get("/v1/groups/app/checkpoints").json()],
                WAIT,
                "the checkpoint on the target",
                until=lambda ids: made.json()["id"] in ids,
            )
            missing = t.post("/v1/exports", json={"group": "app", "volume": "nope"})
            assert missing.status_code == 404, missing.text
            assert "has no volume 'nope'" in missing.json()["detail"]
            unknown = t.post(
                "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": "f" * 32}
            )
            assert unknown.status_code == 404 and "is not retained" in unknown.json()["detail"]
            audit = [(e["action"], e["status"]) for e in t.get("/v1/audit").json()]
            assert ("export_open", 404) in audit
    finally:
        pair.stop()
