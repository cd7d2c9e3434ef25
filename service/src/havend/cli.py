"""The ``havend`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from havend import __version__
from havend.certs import add_parser as add_certs_parser
from havend.config import NodeConfig
from havend.errors import ConfigError, HavendError
from havend.nbd.server import NBDServer
from havend.process import human_bytes, until_stopped
from havend.volume import FileVolume

log = logging.getLogger("havend")


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise HavendError("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


async def _nbd_serve(args: argparse.Namespace) -> None:
    volume = FileVolume(args.path, read_only=args.read_only)
    name = args.name if args.name is not None else Path(args.path).stem
    server = NBDServer(
        {name: volume},
        default=name,
        descriptions={name: args.description or ""},
        inline_io_limit=args.inline_io_limit,
    )
    try:
        if args.socket:
            where = f"nbd+unix:///{name}?socket={await server.listen_unix(args.socket)}"
        else:
            host, port = await server.listen_tcp(args.bind, args.port)
            where = f"nbd://{host}:{port}/{name}"
    except OSError as exc:
        await server.close()
        volume.close()
        target = args.socket or f"{args.bind}:{args.port}"
        raise ConfigError(f"cannot listen on {target}: {exc.strerror or exc}") from exc
    mode = "read-only" if args.read_only else "read-write"
    loop = asyncio.get_running_loop()
    log.info(
        "serving %s (%s, %s) on %s [loop %s]",
        volume.path,
        human_bytes(volume.size),
        mode,
        where,
        type(loop).__module__.split(".")[0],
    )
    try:
        await until_stopped()
        log.info("stopping: finishing in-flight requests and syncing %s", volume.path)
    finally:
        await server.close()
        volume.close()
        if args.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket)


async def _run_node(args: argparse.Namespace) -> None:
    from havend import config

    await serve_node(config.load(args.config))


async def serve_node(config: NodeConfig) -> None:
    """``havend run``, the composition root: the state store, the node, the
    operations layer over them, the admin socket and the REST API over that,
    wired here and nowhere else; served until SIGINT/SIGTERM."""
    from havend.admin import SOCKET_NAME, AdminServer, node_handlers
    from havend.api.server import ApiServer
    from havend.node import Node
    from havend.operations import Operations
    from havend.state import open_store

    store = open_store(config.state_dir) if config.api is not None else None
    if store is not None and (abandoned := store.abandon_running()):
        log.warning("%d operations of the previous run never finished: marked failed", abandoned)
    node = Node(config, store)
    operations = Operations(node, store)
    node.status_listeners.append(operations.observe)  # state changes into the history
    admin = AdminServer(
        os.path.join(config.state_dir, SOCKET_NAME), node_handlers(node, operations)
    )
    api = ApiServer(node, operations, store, config.tls) if store is not None else None

    async def stop() -> None:
        if api is not None:
            await api.close()
        await admin.close()
        await operations.close()
        await node.stop()
        if store is not None:
            store.close()

    try:
        await node.start()
        await admin.start()
        if api is not None and config.api is not None:
            host, port = await api.start(config.api.host, config.api.port)
            node.addresses["api"] = f"{'https' if config.tls else 'http'}://{host}:{port}"
        node.start_reports()
    except OSError as exc:
        await stop()
        raise ConfigError(f"cannot start node {config.name}: {exc}") from exc
    except BaseException:
        await stop()
        raise
    try:
        await until_stopped()
        log.info("stopping node %s", config.name)
    finally:
        await stop()


def _admin_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    from havend import config
    from havend.admin import SOCKET_NAME

    return os.path.join(config.load(args.config).state_dir, SOCKET_NAME)


async def _admin(args: argparse.Namespace) -> None:
    """One admin request; the answer is printed as JSON."""
    from havend import admin

    request = args.request(args)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(
        None, lambda: admin.call(_admin_socket(args), request.pop("op"), **request)
    )
    print(json.dumps(result, indent=2))


def _add_admin_parsers(sub: argparse._SubParsersAction) -> None:
    def command(parser: argparse.ArgumentParser, request: Callable[..., dict]) -> None:
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the node's config (finds its admin socket)")
        where.add_argument("--socket", help="the node's admin socket")
        parser.set_defaults(run=_admin, request=request)

    status = sub.add_parser("status", help="a running node's status (JSON)")
    command(status, lambda a: {"op": "status"})

    checkpoint = sub.add_parser("checkpoint", help="take, list or delete checkpoints of a group")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create",
        help="take a checkpoint now (source node)",
        description="Put a checkpoint in the group's sequence; with freeze/thaw hooks "
        "configured it is application-consistent unless --crash is given.",
    )
    create.add_argument("--group", required=True)
    create.add_argument("--label", default="")
    create.add_argument("--crash", action="store_true", help="skip the freeze/thaw hooks")
    command(
        create,
        lambda a: {
            "op": "checkpoint",
            "group": a.group,
            "label": a.label,
            "app": False if a.crash else None,
        },
    )
    listing = actions.add_parser("list", help="retained checkpoints (target node)")
    listing.add_argument("--group", required=True)
    command(listing, lambda a: {"op": "checkpoints", "group": a.group})
    deleting = actions.add_parser(
        "delete",
        help="delete a retained checkpoint (target node)",
        description="It is no longer a view, rollback or promotion target; the other "
        "checkpoints read back as they were.",
    )
    deleting.add_argument("--group", required=True)
    deleting.add_argument("--checkpoint", required=True, help="id, unique prefix, latest or oldest")
    command(
        deleting,
        lambda a: {"op": "checkpoint_delete", "group": a.group, "checkpoint": a.checkpoint},
    )

    view = sub.add_parser("view", help="point-in-time views over NBD (target node)")
    actions = view.add_subparsers(dest="action", required=True)
    opening = actions.add_parser("open", help="export a volume as of a checkpoint")
    opening.add_argument("--group", required=True)
    opening.add_argument("--volume", required=True)
    opening.add_argument(
        "--checkpoint", default="latest", help="id, unique prefix, latest or oldest"
    )
    opening.add_argument(
        "--writable", action="store_true", help="writes go to a scratch file, dropped at close"
    )
    command(
        opening,
        lambda a: {
            "op": "view_open",
            "group": a.group,
            "volume": a.volume,
            "checkpoint": a.checkpoint,
            "writable": a.writable,
        },
    )
    closing = actions.add_parser("close", help="stop exporting a view, drop its writes")
    closing.add_argument("export")
    command(closing, lambda a: {"op": "view_close", "export": a.export})
    listing = actions.add_parser("list", help="open views")
    command(listing, lambda a: {"op": "views"})

    snapshot = sub.add_parser(
        "snapshot",
        help="what a failback or a split-brain resolution replaced, kept as a snapshot",
    )
    actions = snapshot.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the group's snapshots")
    listing.add_argument("--group", required=True)
    command(listing, lambda a: {"op": "snapshots", "group": a.group})
    opening = actions.add_parser(
        "open", help="export a volume read-only over NBD as the snapshot kept it"
    )
    opening.add_argument("--group", required=True)
    opening.add_argument("--volume", required=True)
    opening.add_argument("--snapshot", required=True, help="a name from snapshot list")
    command(
        opening,
        lambda a: {
            "op": "snapshot_open",
            "group": a.group,
            "volume": a.volume,
            "snapshot": a.snapshot,
        },
    )
    closing = actions.add_parser("close", help="stop exporting a snapshot view")
    closing.add_argument("export")
    command(closing, lambda a: {"op": "snapshot_close", "export": a.export})
    deleting = actions.add_parser("delete", help="free a snapshot's space")
    deleting.add_argument("--group", required=True)
    deleting.add_argument("--snapshot", required=True)
    command(
        deleting,
        lambda a: {"op": "snapshot_delete", "group": a.group, "snapshot": a.snapshot},
    )

    group = sub.add_parser("group", help="failover of a consistency group")
    actions = group.add_subparsers(dest="action", required=True)
    failover = actions.add_parser(
        "failover",
        help="planned failover (source node): drain, final checkpoint, promote the target",
        description="Refuse new writes, ship every acknowledged write, take a final "
        "checkpoint and have the target promote itself there: no write is lost.",
    )
    failover.add_argument("--group", required=True)
    failover.add_argument("--timeout", type=float, default=300, help="seconds to drain")
    command(failover, lambda a: {"op": "failover", "group": a.group, "timeout": a.timeout})
    failback = actions.add_parser(
        "failback",
        help="bring production home (source node) after a failover",
        description="Pull back only the blocks that differ among those changed on either "
        "side since the promotion (this side's unshipped writes are saved first as a "
        "snapshot), make the target a replica again and resume replication.",
    )
    failback.add_argument("--group", required=True)
    failback.add_argument("--timeout", type=float, default=3600)
    command(failback, lambda a: {"op": "failback", "group": a.group, "timeout": a.timeout})
    reverse = actions.add_parser(
        "reverse",
        help="a round of reverse protection now (source node, failed over)",
        description="Pull what the promoted side changed since the last round, as of a "
        "new checkpoint of it, into this side's volumes (staged first, so a crash keeps "
        "the previous round). Runs by itself every reverse_interval_seconds when set.",
    )
    reverse.add_argument("--group", required=True)
    reverse.add_argument("--timeout", type=float, default=3600)
    command(reverse, lambda a: {"op": "reverse", "group": a.group, "timeout": a.timeout})
    reclaim = actions.add_parser(
        "reclaim",
        help="the recovery side is lost too: production resumes here (source node)",
        description="After a round of reverse protection, make this side's volumes live "
        "again as of that round. The recovery side's later writes are not here; if it "
        "comes back, the split brain is reported and resolved by your choice.",
    )
    reclaim.add_argument("--group", required=True)
    command(reclaim, lambda a: {"op": "reclaim", "group": a.group})
    resolve = actions.add_parser(
        "resolve",
        help="end a split brain (source node): choose the side whose writes survive",
        description="Both sides took writes (the target was promoted while this side "
        "kept writing): both are fenced until this command. --survivor recovery keeps "
        "the promoted side's copy (this side stays failed over; fail back later, its "
        "writes are kept in the failback snapshot); --survivor production keeps this "
        "side's (the target saves its changes in a snapshot, becomes a replica again and "
        "the blocks either side changed are resynced from here).",
    )
    resolve.add_argument("--group", required=True)
    resolve.add_argument("--survivor", required=True, choices=["recovery", "production"])
    resolve.add_argument("--timeout", type=float, default=3600)
    command(
        resolve,
        lambda a: {
            "op": "resolve",
            "group": a.group,
            "survivor": a.survivor,
            "timeout": a.timeout,
        },
    )
    promote = actions.add_parser(
        "promote",
        help="unplanned failover (target node): the replica becomes the live copy",
        description="Promote the replica at its latest consistent point, or at a retained "
        "checkpoint; its volumes become writable NBD exports, changes are tracked for "
        "failback, and the old source's records are refused.",
    )
    promote.add_argument("--group", required=True)
    promote.add_argument("--checkpoint", help="id, unique prefix, latest or oldest")
    command(promote, lambda a: {"op": "promote", "group": a.group, "checkpoint": a.checkpoint})

    rollback = sub.add_parser(
        "rollback",
        help="make a checkpoint the replica's latest point (target node)",
        description="Rewrite the replica as it was at the checkpoint; newer checkpoints "
        "are dropped and the source's records are refused from then on (new generation).",
    )
    rollback.add_argument("--group", required=True)
    rollback.add_argument("--checkpoint", required=True)
    command(rollback, lambda a: {"op": "rollback", "group": a.group, "checkpoint": a.checkpoint})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="havend", description="haven.dr block replication service"
    )
    parser.add_argument("--version", action="version", version=f"havend {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("HAVEND_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("HAVEND_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="json: one object per line (time, level, logger, pid, message)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "nbd-serve",
        help="serve a file-backed volume over NBD",
        description="Serve a file or block device as an NBD export until SIGINT/SIGTERM.",
    )
    serve.add_argument("path", help="file or block device to serve")
    serve.add_argument("--name", help="export name (default: the file name without extension)")
    serve.add_argument("--description", help="export description shown by NBD_OPT_LIST")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=10809, help="TCP port (0 picks a free one)")
    where.add_argument("--socket", help="serve on this UNIX socket instead of TCP")
    serve.add_argument("--bind", default="127.0.0.1", help="TCP address to listen on")
    serve.add_argument("--read-only", action="store_true", help="refuse writes with EPERM")
    serve.add_argument(
        "--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="event loop"
    )
    serve.add_argument(
        "--inline-io-limit",
        type=int,
        default=256 * 1024,
        help="transfers up to this many bytes run on the event loop, larger ones in threads",
    )
    serve.set_defaults(run=_nbd_serve)

    run = sub.add_parser(
        "run",
        help="run a replication node (source or target) from a config file",
        description="Run a source or target node as its YAML config says (see havend.config).",
    )
    run.add_argument("--config", required=True, help="node configuration (YAML)")
    run.add_argument(
        "--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="event loop"
    )
    run.set_defaults(run=_run_node)
    add_certs_parser(sub)
    _add_admin_parsers(sub)
    _add_token_parser(sub)
    api_schema = sub.add_parser("api-schema", help="print the REST API's OpenAPI schema")
    api_schema.set_defaults(run=_api_schema)
    return parser


async def _api_schema(args: argparse.Namespace) -> None:
    from havend.api.app import schema

    print(json.dumps(schema(), indent=2, sort_keys=True))


def _add_token_parser(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser(
        "token",
        help="REST API bearer tokens of a node (read < operate < admin)",
        description="Tokens are kept hashed in the node's database (<state_dir>/havend.db); "
        "a new token's secret is printed once. Works while the node runs.",
    )
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new token (its secret printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, choices=["read", "operate", "admin"])
    listing = actions.add_parser("list", help="tokens, never their secrets")
    revoke = actions.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id")
    for parser in (create, listing, revoke):
        parser.add_argument("--config", required=True, help="the node's config")
        parser.set_defaults(run=_token)


async def _token(args: argparse.Namespace) -> None:
    from havend.config import load
    from havend.state import open_store

    store = open_store(load(args.config).state_dir)
    try:
        if args.action == "create":
            made, secret = store.create_token(args.name, args.scope)
            store.audit(
                "cli", "token_create", made.name, {"scope": made.scope}, 201, {"id": made.id}
            )
            print(
                json.dumps(
                    {"id": made.id, "name": made.name, "scope": made.scope, "token": secret},
                    indent=2,
                )
            )
        elif args.action == "list":
            print(json.dumps(store.tokens(), indent=2))
        else:
            if not store.revoke_token(args.id):
                raise HavendError(f"no active token {args.id!r}")
            store.audit("cli", "token_revoke", args.id, {}, 200, {"revoked": True})
            print(json.dumps({"id": args.id, "revoked": True}))
    finally:
        store.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message (and the
    exception, if any), for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s havend[%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        with asyncio.Runner(loop_factory=_loop_factory(getattr(args, "loop", "auto"))) as runner:
            runner.run(args.run(args))
    except HavendError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
