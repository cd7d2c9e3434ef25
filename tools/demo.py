"""``make demo``: haven.dr end to end on this machine, in about a minute.

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

import contextlib
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from havend import certs
from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog, check_prefix

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".build" / "demo"
VOLUMES = {"db": 64 * MiB, "log": 32 * MiB}
PREFILL = 48 * MiB  # data the database volume holds before it is protected


def say(text: str = "") -> None:
    print(text, flush=True)


class Live:
    """A progress line: rewritten in place on a terminal, else every 2 s."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def show(self, line: str) -> None:
        if self.tty:
            print(f"\r{line:<78}", end="", flush=True)
        elif time.monotonic() - self.last >= 2:
            self.last = time.monotonic()
            print(line, flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r" + " " * 78 + "\r", end="", flush=True)


class Network:
    """Two namespaces (site, cloud) joined to each other and to this one by
    veth pairs; or plain loopback."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.site, self.cloud = f"hvdemo-site-{tag}", f"hvdemo-cloud-{tag}"
        self.namespaces = False
        self.addr = {"site": "127.0.0.1", "cloud": "127.0.0.1", "link": "127.0.0.1"}
        self._veths: list[str] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def up(self) -> str:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return "loopback ports (network namespaces need root and iproute2)"
        try:
            net = 200 + os.getpid() % 50
            for ns in (self.site, self.cloud):
                self._ip("netns", "add", ns)
                self.namespaces = True
                self._ip("-n", ns, "link", "set", "lo", "up")
            pairs = [  # (here, there, namespace of here or None, namespace of there, subnet)
                ("hvd-s0", "hvd-s1", None, self.site, f"10.{net}.1"),
                ("hvd-c0", "hvd-c1", None, self.cloud, f"10.{net}.2"),
                ("hvd-x0", "hvd-x1", self.site, self.cloud, f"10.{net}.3"),
            ]
            for a, b, ns_a, ns_b, subnet in pairs:
                a, b = f"{a}{os.getpid() % 1000}", f"{b}{os.getpid() % 1000}"
                self._ip("link", "add", a, "type", "veth", "peer", "name", b)
                self._veths.append(a)
                for dev, ns, host in ((a, ns_a, 1), (b, ns_b, 2)):
                    prefix = ["-n", ns] if ns else []
                    if ns:
                        self._ip("link", "set", dev, "netns", ns)
                    self._ip(*prefix, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
                    self._ip(*prefix, "link", "set", dev, "up")
            self.addr = {
                "site": f"10.{net}.1.2",  # the source, seen from here
                "cloud": f"10.{net}.2.2",  # the target, seen from here
                "link": f"10.{net}.3.2",  # the target, seen from the site
            }
            return f"network namespaces {self.site} and {self.cloud} (veth links)"
        except (subprocess.CalledProcessError, OSError) as exc:
            self.down()
            self.namespaces = False
            why = (
                exc.stderr.decode().strip()
                if isinstance(exc, subprocess.CalledProcessError)
                else exc
            )
            return f"loopback ports (namespaces failed: {why})"

    def prefix(self, where: str) -> list[str]:
        if not self.namespaces:
            return []
        return ["ip", "netns", "exec", self.site if where == "site" else self.cloud]

    def down(self) -> None:
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=10)
        for ns in (self.site, self.cloud):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._veths.clear()


class Node:
    def __init__(self, name: str, config: dict[str, Any], prefix: list[str]) -> None:
        self.name = name
        self.dir = WORK / name
        self.config_path = WORK / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        status = self.dir / "status.json"
        status.unlink(missing_ok=True)
        log = open(WORK / f"{self.name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "havend",
                "run",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops us in order
        )
        log.close()
        deadline = time.monotonic() + 30
        while not status.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: see {WORK / self.name}.log")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return json.loads((self.dir / "status.json").read_text())

    def token(self) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "havend",
                "token",
                "create",
                "--config",
                str(self.config_path),
                "--name",
                "demo",
                "--scope",
                "admin",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return json.loads(out.stdout)["token"]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


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
    demo = Demo()
    stop = threading.Event()

    def interrupted(signum: int, _: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything")
        return 130
    except Exception as exc:
        say(f"\ndemo FAILED: {exc} (logs in {WORK})")
        return 1
    finally:
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
