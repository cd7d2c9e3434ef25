"""Running the operations of the table: the guards every caller passes.

Before an operation runs: the group it names exists (:class:`NotFound`), it
runs on this node's role and the group's state allows it (:class:`Conflict`),
its required arguments are given (:class:`Invalid`), and no other exclusive
operation holds the group (:class:`Busy`, a :class:`Conflict` worth retrying). Then it runs in the
foreground (:meth:`Operations.run`: the admin socket, the API's short
requests) or as a background operation kept in the state store, to poll
(:meth:`Operations.start`: the API's failover operations).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from havend.errors import Busy, Conflict, Invalid, NotFound
from havend.node import Node
from havend.operations import machine
from havend.operations.table import OPERATIONS, OperationSpec
from havend.state import StateStore

log = logging.getLogger("havend.operations")


class Operations:
    """The one way a node's state is changed from outside (one per node)."""

    def __init__(self, node: Node, store: StateStore | None) -> None:
        self.node = node
        self.store = store
        self.running: dict[str, str] = {}  # group -> the exclusive operation holding it
        self._tasks: set[asyncio.Task[None]] = set()

    # Groups and their states ----------------------------------------------------

    def _status_of(self, name: str) -> dict[str, Any] | None:
        """The node's status of one group (None: no such group)."""
        return next((g for g in self.node.status()["groups"] if g["name"] == name), None)

    def group_status(self, name: str) -> dict[str, Any]:
        """The group's status with its failover state; NotFound if there is none."""
        group = self._status_of(name)
        if group is None:
            raise NotFound(f"no group {name!r} on this node")
        return self.describe(group)

    def describe(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group's status with its state and why; a change of state is
        recorded in the store's history."""
        role = self.node.config.role
        state, reason = machine.state_of(role, group, self.running.get(group["name"]))
        if self.store is not None:
            self.store.record_state(group["name"], state, group.get("generation"), reason)
        return group | {"state": state, "state_reason": reason}

    def observe(self, status: dict[str, Any]) -> None:
        """The node's status tick: every change of a group's state, in its history."""
        for group in status["groups"]:
            self.describe(group)

    # Guards ---------------------------------------------------------------------

    def check(self, kind: str, group: str, args: dict[str, Any]) -> OperationSpec:
        """The operation's spec if it may start now; else why not, by class."""
        spec = OPERATIONS.get(kind)
        if spec is None:
            raise NotFound(f"no operation {kind!r} (known: {', '.join(sorted(OPERATIONS))})")
        status = self.group_status(group) if spec.on_group else None
        if spec.role != "any" and self.node.config.role != spec.role:
            raise Conflict(spec.role_refusal())
        if status is not None and spec.allowed is not None and status["state"] not in spec.allowed:
            why = (
                f"{kind} is not possible while the group is {status['state']} "
                f"({status['state_reason']}); it starts from {' or '.join(spec.allowed)}"
            )
            specific = self.node.refusal(kind, group)  # the data plane's own words, if any
            raise Conflict(f"{specific}; {why}" if specific else why)
        for name in spec.requires:
            if args.get(name) is None:
                raise Invalid(f"bad arguments for {kind}: {name} is required", name)
        # Nothing starts on a group an exclusive operation holds (a view opened
        # during a rollback would show blocks being rewritten).
        holder = self.running.get(group) if spec.on_group else None
        if holder is not None:
            raise Busy(f"{holder} is running on {group}")
        return spec

    # Running ------------------------------------------------------------------

    async def run(self, kind: str, group: str, args: dict[str, Any]) -> Any:
        """Check, then carry the operation out and return its result."""
        spec = self.check(kind, group, args)
        if not spec.exclusive:
            return await self._execute(spec, group, args)
        self.running[group] = kind
        try:
            return await self._execute(spec, group, args)
        finally:
            self.running.pop(group, None)

    def start(self, kind: str, group: str, args: dict[str, Any], actor: str) -> dict[str, Any]:
        """Check, then run the operation in the background, kept in the store;
        the operation to poll (``/v1/operations/{id}``)."""
        if self.store is None:
            raise Conflict("background operations need the node's state store (the API)")
        spec = self.check(kind, group, args)
        store = self.store
        op_id = store.start_operation(kind, group, actor, args)
        if spec.exclusive:
            self.running[group] = kind

        async def operate() -> None:
            try:
                result = await self._execute(spec, group, args)
            except Exception as exc:  # the operation failed: say why, keep serving
                log.warning("operation %s (%s of %s) failed: %s", op_id, kind, group, exc)
                store.finish_operation(op_id, error=f"{type(exc).__name__}: {exc}")
            else:
                store.finish_operation(op_id, result=result)
            finally:
                if spec.exclusive:
                    self.running.pop(group, None)

        task = asyncio.get_running_loop().create_task(operate())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"id": op_id, "kind": kind, "group": group, "state": "running"}

    async def _execute(self, spec: OperationSpec, group: str, args: dict[str, Any]) -> Any:
        try:
            work = spec.run(self.node, group, args)  # reads the arguments only
        except (KeyError, TypeError, ValueError) as exc:  # an argument of the wrong kind
            raise Invalid(f"bad arguments for {spec.name}: {exc!r}") from None
        return await work  # the node's own errors, whatever they are, as they are

    def progress(self, name: str) -> dict[str, Any] | None:
        """What a running operation on the group has done so far (bytes, ETA, lag)."""
        group = self._status_of(name)
        if group is None:
            return None
        resync = group.get("resync") or {}
        if resync.get("running"):
            return {
                "bytes_done": resync["done_bytes"],
                "bytes_total": resync["total_bytes"],
                "eta_seconds": resync["eta_seconds"],
            }
        return {
            "lag_bytes": group.get("lag_bytes"),
            "lag_seconds": group.get("lag_seconds"),
            "changed_bytes": group.get("changed_bytes"),
        }

    async def close(self) -> None:
        """At node stop: the background operations end with the node (a restart
        marks them failed, see StateStore.abandon_running)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
