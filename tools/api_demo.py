"""``make demo-api``: havend end to end through its REST API, in about a minute.

A protected site and a cloud, each a network namespace (loopback ports when
namespaces cannot be made), a source havend in the first, a target havend in
the second, TLS between them and on their REST APIs. Everything is driven
through the REST API: a consistency group of two volumes, its initial sync
(live progress), a stamped writer through NBD, periodic checkpoints, a
point-in-time export checked block by block, a planned failover (RPO 0 by
the sequence numbers), writes on the recovery side, failback (the delta, not
the volumes), and replication back to normal. It prints a summary and leaves
nothing running, also after Ctrl-C.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from demo_sites import Live, Network, Node, run_demo, say

from havend import certs
from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog, check_prefix

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".build" / "demo-api"
VOLUMES = {"db": 64 * MiB, "log": 32 * MiB}
PREFILL = 48 * MiB  # data the database volume holds before it is protected


class Demo:
    def __init__(self) -> None:
        self.net = Network()
        self.nodes: list[Node] = []
        self.rows: list[tuple[str, str, str]] = []
        self.t0 = time.monotonic()

    def step(self, name: str, started: float, result: str) -> None:
        self.rows.append((name, f"{time.monotonic() - started:6.2f} s", result))
        say(f"  ✓ {name}: {result}")

    def run(self) -> None:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        say("haven.dr demo: a protected site and a recovery site on this machine\n")
        started = time.monotonic()
        how = self.net.up()
        a = self.net.addr
        certs.init_ca(WORK / "ca", "haven-demo-ca")
        tls = {}
        for name, ips in (
            ("src1", [a["site"], "127.0.0.1"]),
            ("tgt1", [a["cloud"], a["link"], "127.0.0.1"]),
        ):
            files = certs.issue(WORK / "ca", WORK / "pki", name, [name, *ips])
            tls[name] = {"cert": str(files.cert), "key": str(files.key), "ca": str(files.ca)}
        self.ca = ssl.create_default_context(cafile=tls["src1"]["ca"])
        target = Node(
            "tgt1",
            {
                "node": {"name": "tgt1", "role": "target", "state_dir": str(WORK / "tgt1")},
                "tls": tls["tgt1"],
                "target": {
                    "listen": {"host": a["link"], "port": 0},  # the source reads it from the status
                    "replica_dir": str(WORK / "tgt1" / "replicas"),
                    "nbd": {"host": a["cloud"], "port": 0},
                },
                "api": {"host": a["cloud"], "port": 0},
                "status_period": 0.2,
            },
            self.net.prefix("cloud"),
            WORK,
        )
        self.nodes.append(target)
        target.start()
        repl_host, repl_port = target.status()["addresses"]["replication"].rsplit(":", 1)
        source = Node(
            "src1",
            {
                "node": {"name": "src1", "role": "source", "state_dir": str(WORK / "src1")},
                "tls": tls["src1"],
                "source": {  # no target: it is paired through the API below
                    "nbd": {"host": a["site"], "port": 0},
                    "link_timeout": 10,
                    "volume_dir": str(WORK / "site-disks"),
                },
                "api": {"host": a["site"], "port": 0},
                "status_period": 0.2,
            },
            self.net.prefix("site"),
            WORK,
        )
        self.nodes.append(source)
        source.start()
        src = httpx.Client(
            base_url=source.status()["addresses"]["api"],
            verify=self.ca,
            headers={"Authorization": f"Bearer {source.token()}"},
            timeout=120,
        )
        tgt = httpx.Client(
            base_url=target.status()["addresses"]["api"],
            verify=self.ca,
            headers={"Authorization": f"Bearer {target.token()}"},
            timeout=120,
        )
        paired = src.post(
            "/v1/peers", json={"host": repl_host, "port": int(repl_port), "server_name": "tgt1"}
        )
        if paired.status_code != 200:
            raise RuntimeError(f"pairing: {paired.status_code} {paired.text}")
        fingerprint = paired.json()["certificate"]["fingerprint_sha256"]
        self.step(
            "two sites, paired",
            started,
            f"{how}; TLS 1.3 between the nodes (target certificate {fingerprint[:23]}...) "
            "and on both APIs",
        )

        # A group of two volumes; the database already holds data.
        started = time.monotonic()
        paths = {n: WORK / "site-disks" / f"{n}.img" for n in VOLUMES}
        paths["db"].parent.mkdir(parents=True)
        with open(paths["db"], "wb") as f:
            f.truncate(VOLUMES["db"])
            block = hashlib.sha256(b"prefill").digest() * (MiB // 32)
            for i in range(PREFILL // MiB):
                f.write(block[:-8] + i.to_bytes(8, "little"))
        body = {
            "name": "app",
            "rpo_seconds": 5,
            "checkpoints": {"interval_seconds": 2, "retain": 2048},
            "volumes": [
                {"name": "db", "path": str(paths["db"])},
                {"name": "log", "path": str(paths["log"]), "size": VOLUMES["log"]},
            ],
        }
        made = src.post("/v1/groups", json=body)
        if made.status_code != 201:
            raise RuntimeError(f"creating the group: {made.status_code} {made.text}")
        initial = {i: paths[n].read_bytes() for i, n in enumerate(VOLUMES)}
        self.wait(
            src,
            "initial sync",
            lambda g: (
                g["state"] == "protecting"
                and g["connected"]
                and g["lag_bytes"] == 0
                and g["resync"]
                and not g["resync"]["running"]
            ),
        )
        group = src.get("/v1/groups/app").json()
        self.step(
            "group app: db + log",
            started,
            f"initial sync compared {_mib(group['resync']['total_bytes'])}, "
            f"sent {_mib(group['resync']['sent_bytes'])}",
        )

        # A stamped writer through NBD, periodic checkpoints meanwhile.
        started = time.monotonic()
        nbd = source.status()["addresses"]["nbd"]
        clients = {i: NBDClient.open(f"{nbd}/{n}") for i, n in enumerate(VOLUMES)}
        log = WriteLog()
        writer = StampWriter(clients, log=log, seed=2026, flush_every=32)
        lags = []
        live = Live()
        until = time.monotonic() + 5
        while time.monotonic() < until:
            for _ in range(100):
                writer.step()
            lags.append(src.get("/v1/groups/app").json()["lag_seconds"])
            live.show(f"    writing: {len(log)} stamped writes, lag {lags[-1]:.3f} s")
        live.done()
        self.wait(src, "catching up", lambda g: g["lag_bytes"] == 0)
        checkpoints = tgt.get("/v1/groups/app/checkpoints").json()
        self.step(
            "writes and checkpoints",
            started,
            f"{len(log)} writes, max lag {max(lags):.3f} s, {len(checkpoints)} periodic "
            "checkpoints on the target",
        )

        # A point-in-time export of the newest checkpoint, checked block by block.
        started = time.monotonic()
        newest = checkpoints[-1]
        images, exports = {}, []
        for i, name in enumerate(VOLUMES):
            export = tgt.post(
                "/v1/exports", json={"group": "app", "volume": name, "checkpoint": newest["id"]}
            )
            export.raise_for_status()
            exports.append(export.json()["export"])
            with NBDClient.open(export.json()["uri"]) as view:
                images[i] = view.read(0, view.size)
        report = check_prefix(log, images, initial=initial)
        for export in exports:
            tgt.delete(f"/v1/exports/{export}").raise_for_status()
        if not report.ok:
            raise RuntimeError(f"the checkpoint view is not a write-order prefix: {report}")
        self.step(
            "point-in-time export",
            started,
            f"checkpoint {newest['id'][:12]} = the first {report.seq} of {len(log)} "
            "writes, exactly",
        )

        # Planned failover: RPO 0.
        started = time.monotonic()
        result = self.operate(src, "failover")
        if (
            not result["final_seq"]
            == result["last_acknowledged_seq"]
            == result["target_applied_seq"]
        ):
            raise RuntimeError(f"failover lost writes: {result}")
        for client in clients.values():
            client.close()
        views = target.status()["addresses"]["views"]
        promoted = {i: NBDClient.open(f"{views}/app/{n}") for i, n in enumerate(VOLUMES)}
        images = {i: c.read(0, c.size) for i, c in promoted.items()}
        report = check_prefix(log, images, initial=initial)
        if not (report.ok and report.seq == log.last_seq):
            raise RuntimeError(f"the promoted volumes lack acknowledged writes: {report}")
        self.step(
            "planned failover",
            started,
            f"RPO 0: final seq {result['final_seq']} = last acknowledged = applied on the "
            f"target, all {len(log)} writes there (drain {result['drain_seconds']:.2f} s, promote "
            f"{result['promote_seconds']:.2f} s); both sides "
            f"{src.get('/v1/groups/app').json()['state']}/"
            f"{tgt.get('/v1/groups/app').json()['state']}",
        )

        # Recovery servers write on the promoted volumes.
        started = time.monotonic()
        recovery = StampWriter(promoted, log=WriteLog(), seed=7, generation=2, flush_every=32)
        for _ in range(1500):
            recovery.step()
        for client in promoted.values():
            client.close()
        changed = tgt.get("/v1/groups/app").json()["changed_bytes"]
        self.step(
            "writes at the recovery site",
            started,
            f"1500 writes, {_mib(changed)} changed since the promotion",
        )

        # Failback: only the delta travels.
        started = time.monotonic()
        result = self.operate(src, "failback")
        total = sum(VOLUMES.values())
        self.step(
            "failback",
            started,
            f"pulled {_mib(result['pulled_bytes'])} of {_mib(total)} "
            f"({100 * result['pulled_bytes'] / total:.1f} %), no full copy",
        )

        # Back to normal: replicating from the site again.
        started = time.monotonic()
        clients = {i: NBDClient.open(f"{nbd}/{n}") for i, n in enumerate(VOLUMES)}
        writer = StampWriter(clients, log=WriteLog(), seed=9, generation=3, flush_every=32)
        for _ in range(500):
            writer.step()
        for client in clients.values():
            client.close()
        self.wait(
            src,
            "replicating",
            lambda g: g["state"] == "protecting" and g["lag_bytes"] == 0 and g["connected"],
        )
        replicas = WORK / "tgt1" / "replicas" / "app"
        same = all(_sha(paths[n]) == _sha(replicas / f"{n}.img") for n in VOLUMES)
        if not same:
            raise RuntimeError("the replica differs from the source after failback")
        self.step(
            "back to normal",
            started,
            "replicating from the site again; replica == source, byte for byte",
        )
        audit = len(src.get("/v1/audit").json()) + len(tgt.get("/v1/audit").json())
        self.summary(audit)

    def operate(self, client: httpx.Client, kind: str) -> dict[str, Any]:
        started = client.post(f"/v1/groups/app/operations/{kind}", json={"timeout": 120})
        started.raise_for_status()
        while True:
            op = client.get(f"/v1/operations/{started.json()['id']}").json()
            if op["state"] == "succeeded":
                return op["result"]
            if op["state"] == "failed":
                raise RuntimeError(f"{kind} failed: {op['error']}")
            time.sleep(0.1)

    def wait(self, client: httpx.Client, what: str, done: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        live = Live()
        while True:
            group = client.get("/v1/groups/app").json()
            if done(group):
                live.done()
                return
            resync = group.get("resync") or {}
            if resync.get("running"):
                eta = resync.get("eta_seconds")
                line = (
                    f"    {what}: {_mib(resync['done_bytes'])} of "
                    f"{_mib(resync['total_bytes'])}, lag {group['lag_seconds']:.1f} s, "
                    f"ETA {'-' if eta is None else f'{eta:.0f} s'}"
                )
            else:
                line = f"    {what}: lag {group['lag_seconds']:.2f} s / {_mib(group['lag_bytes'])}"
            live.show(line)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not finish in {timeout:.0f} s: {group}")
            time.sleep(0.1)

    def summary(self, audit: int) -> None:
        say(f"\n  {'step':<28} {'time':>8}  result")
        for name, took, result in self.rows:
            say(f"  {name:<28} {took}  {result}")
        say(
            f"\n  {audit} audit entries; total {time.monotonic() - self.t0:.1f} s; "
            f"logs in {WORK.relative_to(ROOT)}/"
        )

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.net.down()


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    return run_demo(Demo(), str(WORK))


if __name__ == "__main__":
    sys.exit(main())
