"""Every state-changing operation of a node, once: who runs it, from which
states, and how it is carried out.

The REST API, the admin socket and the CLI (through the admin socket) all
look an operation up here and run it through :class:`havend.operations.Operations`,
so a rule written here holds for every caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from havend.node import Node

# (node, group name or "", arguments) -> the operation to await. Calling it only
# reads the arguments (a bad one raises KeyError/TypeError/ValueError there);
# the node's work happens when it is awaited.
Executor = Callable[["Node", str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """``role``: the node that runs it ("any": either). ``on_group``: it names
    an existing group (404 otherwise), whose state must be in ``allowed``
    (None: any state). ``exclusive``: it holds its group while it runs, and
    no other exclusive operation may start on that group meanwhile.
    ``background``: the REST API answers 202 with an operation to poll.
    ``requires``: arguments that must be given (422 otherwise)."""

    name: str
    role: str
    summary: str
    run: Executor
    on_group: bool = True
    allowed: tuple[str, ...] | None = None
    exclusive: bool = False
    background: bool = False
    requires: tuple[str, ...] = ()
    wrong_role: str = ""  # the refusal on the other node (default: "<name> runs on ...")

    def role_refusal(self) -> str:
        return self.wrong_role or f"{self.name} runs on the {self.role} node of the group"


def _timeout(args: dict[str, Any], default: float) -> float:
    value = args.get("timeout")
    return default if value is None else float(value)


def _optional(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    return None if value is None or value == "" else str(value)


async def _later(fn: Callable[..., Any], *args: Any) -> Any:
    """A synchronous node method as an operation to await."""
    return fn(*args)


def _checkpoint(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    app = a.get("app")
    if app is not None and not isinstance(app, bool):
        raise TypeError(f"app must be true, false or null, not {app!r}")
    return node.checkpoint(group, str(a.get("label") or ""), app)


def _failover(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.failover(group, _timeout(a, 300))


def _failback(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.failback(group, _timeout(a, 3600))


def _reverse(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.reverse(group, _timeout(a, 3600))


def _reclaim(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.reclaim, group)


def _resolve(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.resolve(group, str(a["survivor"]), _timeout(a, 3600))


def _promote(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.promote(group, _optional(a, "checkpoint"))


def _rollback(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.rollback(group, str(a["checkpoint"]))


def _pause(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.pause, group)


def _resume(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.resume, group)


def _checkpoint_delete(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.delete_checkpoint(group, str(a["checkpoint"]))


def _verify(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    rto = a.get("rto_seconds")
    return _later(
        node.verify,
        group,
        str(a["checkpoint"]),
        bool(a["passed"]),
        str(a.get("plan") or ""),
        None if rto is None else float(rto),
        dict(a.get("report") or {}),
    )


def _export_open(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    checkpoint = str(a.get("checkpoint") or "latest")
    volume, writable = str(a["volume"]), bool(a.get("writable", False))
    return _later(node.open_view, group, volume, checkpoint, writable)


def _export_close(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.close_view, str(a["export"]))


def _snapshot_open(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.open_snapshot, group, str(a["volume"]), str(a["snapshot"]))


def _snapshot_close(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.close_snapshot, str(a["export"]))


def _snapshot_delete(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return _later(node.delete_snapshot, group, str(a["snapshot"]))


def _group_create(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.create_group(a)


def _group_update(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.update_group(group, a)


def _group_delete(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.delete_group(group)


def _volume_add(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.add_volume(group, a)


def _volume_remove(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.remove_volume(group, str(a["volume"]), bool(a.get("purge", False)))


def _pair(node: Node, group: str, a: dict[str, Any]) -> Awaitable[Any]:
    return node.pair(str(a["host"]), int(a["port"]), _optional(a, "server_name"))


# The failover operations: long, one at a time per group, from the states of
# the failover state machine (havend.operations.machine).
_FAILOVER = dict(exclusive=True, background=True)

OPERATIONS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        OperationSpec(
            "failover",
            "source",
            "planned failover: drain, promote the target",
            _failover,
            allowed=("protecting",),
            **_FAILOVER,
        ),
        OperationSpec(
            "failback",
            "source",
            "bring production home after a failover",
            _failback,
            allowed=("failed_over",),
            **_FAILOVER,
        ),
        OperationSpec(
            "resolve",
            "source",
            "end a split brain (survivor required)",
            _resolve,
            allowed=("error",),
            requires=("survivor",),
            **_FAILOVER,
        ),
        OperationSpec(
            "reverse",
            "source",
            "a round of reverse protection now",
            _reverse,
            allowed=("failed_over",),
            **_FAILOVER,
        ),
        OperationSpec(
            "reclaim",
            "source",
            "resume production here after a second disaster",
            _reclaim,
            allowed=("failed_over",),
            **_FAILOVER,
        ),
        OperationSpec(
            "promote",
            "target",
            "unplanned failover: promote the replica",
            _promote,
            allowed=("protecting", "testing"),
            **_FAILOVER,
        ),
        OperationSpec(
            "rollback",
            "target",
            "make a checkpoint the replica's latest point",
            _rollback,
            allowed=("protecting",),
            requires=("checkpoint",),
            **_FAILOVER,
        ),
        OperationSpec(
            "pause",
            "source",
            "stop shipping (writes are still journaled)",
            _pause,
            allowed=("protecting",),
            exclusive=True,
            wrong_role="pause acts on the source node of the group",
        ),
        OperationSpec(
            "resume",
            "source",
            "ship again what was journaled meanwhile",
            _resume,
            allowed=("paused",),
            exclusive=True,
            wrong_role="resume acts on the source node of the group",
        ),
        OperationSpec(
            "checkpoint",
            "source",
            "take a checkpoint",
            _checkpoint,
            # Not while fenced (a marker after a failover's final checkpoint
            # would be counted as a lost write) nor while a failover runs.
            allowed=("protecting", "paused"),
            wrong_role="checkpoints are taken on the source node",
        ),
        OperationSpec(
            "checkpoint_delete",
            "target",
            "delete a retained checkpoint",
            _checkpoint_delete,
            exclusive=True,
            requires=("checkpoint",),
            wrong_role="checkpoints are kept on the target node",
        ),
        OperationSpec(
            "verify",
            "target",
            "record a drill's result for a retained checkpoint",
            _verify,
            requires=("checkpoint", "passed"),
            wrong_role="drills' results are kept on the target node",
        ),
        OperationSpec(
            "export_open",
            "target",
            "export a volume as of a checkpoint over NBD",
            _export_open,
            requires=("volume",),
            wrong_role="point-in-time exports are served by the target node",
        ),
        OperationSpec(
            "export_close",
            "any",
            "close a point-in-time export (its writes are dropped)",
            _export_close,
            on_group=False,
            requires=("export",),
        ),
        OperationSpec(
            "snapshot_open",
            "any",
            "export a failback or resolution snapshot read-only",
            _snapshot_open,
            requires=("volume", "snapshot"),
        ),
        OperationSpec(
            "snapshot_close",
            "any",
            "stop exporting a snapshot",
            _snapshot_close,
            on_group=False,
            requires=("export",),
        ),
        OperationSpec(
            "snapshot_delete",
            "any",
            "free a snapshot's space",
            _snapshot_delete,
            requires=("snapshot",),
            exclusive=True,
        ),
        OperationSpec(
            "group_create",
            "source",
            "create a consistency group and start replicating it",
            _group_create,
            on_group=False,
            wrong_role="groups are created on the source node; the target makes its replica "
            "when the source connects",
        ),
        OperationSpec(
            "group_update",
            "source",
            "change a group's settings in place",
            _group_update,
            exclusive=True,
            wrong_role="a group's settings are changed on its source node",
        ),
        OperationSpec(
            "group_delete",
            "source",
            "stop replicating a group made through the API",
            _group_delete,
            exclusive=True,
            wrong_role="groups are deleted on their source node",
        ),
        OperationSpec(
            "volume_add",
            "source",
            "add a volume to a live group (copied while the others replicate)",
            _volume_add,
            allowed=("protecting", "paused"),
            exclusive=True,
            requires=("name", "path"),
            wrong_role="volumes are added on their group's source node",
        ),
        OperationSpec(
            "volume_remove",
            "source",
            "stop replicating a volume of a live group",
            _volume_remove,
            allowed=("protecting", "paused"),
            exclusive=True,
            requires=("volume",),
            wrong_role="volumes are removed on their group's source node",
        ),
        OperationSpec(
            "pair",
            "source",
            "pair this source node with its target",
            _pair,
            on_group=False,
            requires=("host", "port"),
            wrong_role="the source node pairs with its target, not the reverse",
        ),
    )
}

# The kinds ``POST /v1/groups/{group}/operations/{kind}`` starts.
FAILOVER_KINDS = tuple(name for name, spec in OPERATIONS.items() if spec.background)
