"""Two sites for failover tests: a source and a target, the link through a
fault proxy, a stamped writer on the source's exports, and the steps the
tests share (fail over with losses, a split brain, back to normal)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from nodes import app_group, start_pair, wait_caught_up
from waiting import wait_until

from havend import admin
from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog

MiB = 1 << 20
VOLUMES = ["db", "log"]
SIZES = [4 * MiB, 2 * MiB]
WAIT = 60
EPERM = 1


class Sites:
    """A source and a target, the link through a fault proxy."""

    def __init__(self, tmp: Path, **group: Any) -> None:
        self.tmp = tmp
        volumes = dict(zip(VOLUMES, SIZES, strict=True))
        self.pair = start_pair(tmp, [app_group(tmp, volumes, **group)], proxy=True, caught_up=WAIT)
        assert self.pair.proxy is not None
        self.target, self.source, self.proxy = self.pair.target, self.pair.source, self.pair.proxy
        self.log = WriteLog()
        self.clients: dict[int, NBDClient] = {}
        self.writer = self._writer(seed=1)

    def _writer(self, seed: int) -> StampWriter:
        nbd = int(self.source.address("nbd").rsplit(":", 1)[1])
        for client in self.clients.values():
            client.close()
        self.clients = {i: NBDClient.tcp("127.0.0.1", nbd, n) for i, n in enumerate(VOLUMES)}
        return StampWriter(self.clients, log=self.log, seed=seed, flush_every=16)

    def write(self, count: int) -> None:
        for _ in range(count):
            self.writer.step()

    def op(self, node: Any, op: str, **args: Any) -> Any:
        return admin.call(str(node.state_dir / "admin.sock"), op, **args)

    def promoted_images(self, uri_base: str) -> dict[int, bytes]:
        images = {}
        for i, name in enumerate(VOLUMES):
            with NBDClient.open(f"{uri_base}/app/{name}") as client:
                assert not client.read_only
                images[i] = client.read(0, client.size)
        return images

    def volume_images(self) -> dict[int, bytes]:
        return {i: (self.tmp / f"{n}.img").read_bytes() for i, n in enumerate(VOLUMES)}

    def replica_images(self) -> dict[int, bytes]:
        base = self.target.state_dir / "rep" / "app"
        return {i: (base / f"{n}.img").read_bytes() for i, n in enumerate(VOLUMES)}

    def wait_fenced(self, fenced: bool) -> None:
        wait_until(
            lambda: self.source.status()["groups"][0]["fence"],
            WAIT,
            f"the source {'fenced' if fenced else 'no longer fenced'}",
            until=lambda fence: bool(fence) == fenced,
            detail=lambda: self.source.log()[-1500:],
            interval=0.1,
        )

    def failed_over_with_losses(self, lost: int, recovery: int, seed: int) -> tuple[dict, dict]:
        """Cut the link, ``lost`` writes on the source, promote the target,
        ``recovery`` writes on the promoted side, heal, until the source is
        fenced; (the promotion record, what production holds now)."""
        wait_caught_up(self.source, self.target, timeout=WAIT)
        self.proxy.partition()
        self.write(lost)  # never reach the target
        promoted = self.op(self.target, "promote", group="app")
        views = self.target.address("views")
        clients = {i: NBDClient.open(f"{views}/app/{n}") for i, n in enumerate(VOLUMES)}
        try:
            writer = StampWriter(clients, log=WriteLog(), seed=seed, generation=2, flush_every=8)
            for _ in range(recovery):
                writer.step()
        finally:
            for client in clients.values():
                client.close()
        self.proxy.heal()
        self.wait_fenced(True)
        # Writes made before the promotion are a loss, not a split brain.
        assert "split_brain" not in self.source.status()["groups"][0]["fence"]
        return promoted, self.promoted_images(views)

    def split_brain(self, before: int, after: int, seed: int, how: str = "") -> dict:
        """Cut the link, ``before`` writes on the source, promote the target,
        writes on the promoted side, then ``after`` writes on the source (both
        sides live: a split brain; ``how``: "restart" kills and restarts the
        source before the link heals, "overflow" fills its journal), heal;
        the promotion record."""
        wait_caught_up(self.source, self.target, timeout=WAIT)
        self.proxy.partition()
        self.write(before)
        promoted = self.op(self.target, "promote", group="app")
        views = self.target.address("views")
        clients = {i: NBDClient.open(f"{views}/app/{n}") for i, n in enumerate(VOLUMES)}
        try:
            writer = StampWriter(clients, log=WriteLog(), seed=seed, generation=2, flush_every=8)
            for _ in range(30):
                writer.step()
        finally:
            for client in clients.values():
                client.close()
        # Apart by more than any error of the clock comparison (half a round trip).
        time.sleep(0.2)
        if how == "overflow":  # 64 MiB of journal: more than that, never acknowledged
            for i in range(20):
                self.clients[0].write(0, bytes([i]) * (4 * MiB))
        else:
            self.write(after)
        if how == "restart":
            self.source.kill()
            self.source.start()
            self.writer = self._writer(seed=seed + 50)  # clients of the new process
        self.proxy.heal()

        def both_know() -> tuple[dict, dict]:
            fence = self.source.status()["groups"][0]["fence"] or {}
            [group] = self.target.status()["groups"]
            return fence, group

        wait_until(
            both_know,
            WAIT,
            "both sides to know of the split brain",
            until=lambda seen: (
                (seen[0].get("split_brain") or {}).get("recovery") and seen[1]["split_brain"]
            ),
            detail=lambda: self.source.log()[-2000:],
            interval=0.1,
        )
        return promoted

    def back_to_normal(self, seed: int, writes: int) -> None:
        """The source takes writes again and replicates them: replica == source."""
        self.wait_fenced(False)
        self.writer = self._writer(seed=seed)
        self.writer.generation = 3
        self.write(writes)
        wait_caught_up(self.source, self.target, timeout=WAIT)
        assert self.replica_images() == self.volume_images()

    def kill_during(self, node: Any, op_node: Any, op: str, delay: float, **args: Any) -> None:
        """Run an admin op in a thread, kill -9 ``node`` after ``delay`` seconds,
        start it again (the kill may cut the op short: its error is expected)."""

        def call() -> None:
            with contextlib.suppress(admin.AdminError):
                self.op(op_node, op, **args)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(delay)
        node.kill()
        caller.join(60)
        node.start()

    def close(self) -> None:
        for client in self.clients.values():
            client.close(disconnect=False)
        self.pair.stop()
