"""Real ``havend run`` source and target processes for replication tests."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from faultproxy import FaultProxy
from waiting import wait_until


@dataclass
class NodeProcess:
    name: str
    config_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> NodeProcess:
        status = self.state_dir / "status.json"
        status.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "havend", "run", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        proc = self.proc

        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log_path.read_text()}")
            return status.exists()

        wait_until(
            started,
            timeout,
            f"{self.name} to start (its status.json)",
            detail=lambda: f"{self.name} did not start:\n{self.log_path.read_text()}",
        )
        return self

    def status(self) -> dict[str, Any]:
        for _ in range(50):  # replaced atomically, but may be absent for an instant
            try:
                return json.loads((self.state_dir / "status.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.02)
        raise AssertionError(f"{self.name}: no status.json")

    def address(self, key: str) -> str:
        return self.status()["addresses"][key]

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{self.name} ignored SIGTERM:\n{self.log_path.read_text()}"
            ) from None

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def target_node(
    tmp: Path, name: str = "tgt1", tls: dict | None = None, api: bool = False
) -> NodeProcess:
    """A target on a fixed free port, so that it comes back where its source looks."""
    state = tmp / name
    listen = {"host": "127.0.0.1", "port": free_port()}
    config = {
        "node": {"name": name, "role": "target", "state_dir": str(state)},
        "target": {"listen": listen, "replica_dir": str(state / "rep")},
        "status_interval": 1,
        "status_period": 0.2,
    }
    config.update({"tls": tls} if tls else {"insecure_plaintext": True})
    if api:
        config["api"] = {"host": "127.0.0.1", "port": 0}
    return NodeProcess(name, write_config(tmp / f"{name}.yaml", config), state, tmp / f"{name}.log")


def source_node(
    tmp: Path,
    target_port: int | None,
    groups: list[dict[str, Any]],
    name: str = "src1",
    tls: dict | None = None,
    nbd_port: int = 0,
    link_timeout: float = 30.0,
    api: bool = False,
) -> NodeProcess:
    state = tmp / name
    config = {
        "node": {"name": name, "role": "source", "state_dir": str(state)},
        "source": {
            "nbd": {"host": "127.0.0.1", "port": nbd_port},
            "target": {"host": "127.0.0.1", "port": target_port, "server_name": "tgt1"},
            "groups": groups,
            "link_timeout": link_timeout,
            "volume_dir": str(tmp),  # volumes made through the API: in the test's directory
        },
        "status_interval": 1,
        "status_period": 0.2,
    }
    config.update({"tls": tls} if tls else {"insecure_plaintext": True})
    if api:
        config["api"] = {"host": "127.0.0.1", "port": 0}
    if target_port is None:  # paired later, through the API
        del config["source"]["target"]
    return NodeProcess(name, write_config(tmp / f"{name}.yaml", config), state, tmp / f"{name}.log")


def make_tls(tmp: Path) -> tuple[dict, dict]:
    """Certificates of src1 and tgt1 from one test CA (the TLS config of each)."""
    from havend.certs import init_ca, issue

    ca = init_ca(tmp / "ca", "test-ca")
    out = []
    for name in ("src1", "tgt1"):
        files = issue(tmp / "ca", tmp / "pki", name, ["127.0.0.1", "localhost", name])
        out.append({"cert": str(files.cert), "key": str(files.key), "ca": str(ca.cert)})
    return out[0], out[1]


def subnet() -> str:
    """A /24 for a test's VM network, unlikely to be in use here
    (10.200-249.x.0): the first three octets."""
    return f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"


MiB = 1 << 20


def app_group(tmp: Path, volumes: dict[str, int], **extra: Any) -> dict[str, Any]:
    """Group "app" of new empty (sparse) volumes in ``tmp``, ``{name: size}``,
    its journal 64 segments of 1 MiB; ``extra`` adds or replaces keys."""
    paths = {}
    for name, size in volumes.items():
        path = tmp / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        paths[name] = path
    return {
        "name": "app",
        "volumes": [{"name": n, "path": str(p)} for n, p in paths.items()],
        "journal": {"segment_size": MiB, "max_segments": 64},
    } | extra


@dataclass
class Pair:
    """Two sites: a target, and a source replicating to it, directly or
    through a fault proxy (``proxy``); ``tls`` holds the (source, target) TLS
    configs, None over plaintext."""

    target: NodeProcess
    source: NodeProcess
    proxy: FaultProxy | None = None
    tls: tuple[dict, dict] | None = None

    def stop(self) -> None:
        """Source, proxy, target, each even if another fails (the first error is
        raised after), then kill -9 whatever still runs."""
        errors = []
        for stop in (self.source.stop, self.proxy.stop if self.proxy else None, self.target.stop):
            try:
                if stop is not None:
                    stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        for node in (self.source, self.target):
            node.kill()
        if errors:
            raise errors[0]


def start_pair(
    tmp: Path,
    groups: list[dict[str, Any]],
    *,
    tls: bool | tuple[dict, dict] = False,
    proxy: bool = False,
    api: bool | str = False,
    paired: bool = True,
    target: NodeProcess | None = None,
    caught_up: float | None = None,
    **source_options: Any,
) -> Pair:
    """The two sites of the replication tests, started: the target (``target``,
    or a new ``tgt1``), a :class:`FaultProxy` in front of it if ``proxy``, then
    the source ``src1`` with ``groups``, replicating to the proxy or the target
    (``paired=False``: to no target, it pairs later through the API).

    ``tls``: False, plaintext; True, certificates from one test CA
    (:func:`make_tls`); or the (source, target) TLS configs. ``api``: the REST
    API on both nodes (True), or on one ("source", "target"). ``source_options``
    go to :func:`source_node` (``link_timeout``, ``nbd_port``...).
    ``caught_up``: wait that many seconds for the first sync. If anything
    fails, nothing is left running."""
    tls_configs = make_tls(tmp) if tls is True else tls or None
    src_tls, tgt_tls = tls_configs or (None, None)
    if api not in (True, False, "source", "target"):
        raise ValueError(f"api={api!r}: True, False, 'source' or 'target'")
    target = target or target_node(tmp, tls=tgt_tls, api=api in (True, "target"))
    source: NodeProcess | None = None
    fault_proxy: FaultProxy | None = None
    try:
        target.start()
        port = int(target.address("replication").rsplit(":", 1)[1])
        if proxy:
            fault_proxy = FaultProxy("127.0.0.1", port).start()
            port = fault_proxy.port
        source = source_node(
            tmp,
            port if paired else None,
            groups,
            tls=src_tls,
            api=api in (True, "source"),
            **source_options,
        )
        source.start()
        if caught_up is not None:
            wait_caught_up(source, target, timeout=caught_up)
        return Pair(target, source, fault_proxy, tls_configs)
    except BaseException:
        for node in (source, target):
            if node is not None:
                node.kill()
        if fault_proxy is not None:
            fault_proxy.stop()
        raise


def wait_caught_up(source: NodeProcess, target: NodeProcess, timeout: float = 60) -> None:
    """Until every group's last seq is acknowledged and applied on the target,
    as seen in status files written after this call began."""
    since = time.time()

    def caught_up() -> bool:
        src_status, tgt_status = source.status(), target.status()
        if src_status["time"] <= since or tgt_status["time"] <= since:
            return False
        src = {g["group"]: g for g in src_status["groups"]}
        tgt = {g["group"]: g for g in tgt_status["groups"]}
        return all(
            g["acked_seq"] == g["last_seq"]
            and g["lag_bytes"] == 0  # no region waiting for a resync either
            and gid in tgt
            and tgt[gid]["applied_seq"] == g["last_seq"]
            and tgt[gid]["state"] == "consistent"
            for gid, g in src.items()
        )

    wait_until(
        caught_up,
        timeout,
        f"{source.name} and {target.name} to catch up (status written since the wait began)",
        detail=lambda: (
            f"not caught up:\nsource {source.status()}\ntarget {target.status()}\n"
            f"--- source log\n{source.log()[-3000:]}\n--- target log\n{target.log()[-3000:]}"
        ),
    )


def make_token(node: NodeProcess, name: str, scope: str) -> str:
    """A new API token of ``node`` (``havend token create``), its secret."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "havend",
            "token",
            "create",
            "--config",
            str(node.config_path),
            "--name",
            name,
            "--scope",
            scope,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)["token"]
