"""What both demos share: progress lines, the two sites (network namespaces
joined by veth pairs, or loopback ports) and a havend node process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
from nodes import make_token


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
    """A ``havend run`` of ``config`` in ``work`` (its state, config and log
    there), started in a namespace by ``prefix``."""

    def __init__(self, name: str, config: dict[str, Any], prefix: list[str], work: Path) -> None:
        self.name = name
        self.work = work
        self.dir = work / name
        self.config_path = work / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        status = self.dir / "status.json"
        status.unlink(missing_ok=True)
        log = open(self.work / f"{self.name}.log", "ab")  # noqa: SIM115 - the child owns it
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
                raise RuntimeError(f"{self.name} did not start: see {self.work / self.name}.log")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return json.loads((self.dir / "status.json").read_text())

    def token(self, scope: str = "admin", name: str = "demo") -> str:
        return make_token(self, name, scope)  # it reads only .config_path

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


def run_demo(demo: Any, logs: str) -> int:
    """``demo.run()``, then ``demo.close()`` whatever happened: 0; 130 after
    Ctrl-C or SIGTERM; 1 after a failure, said in one line."""

    def interrupted(signum: int, _: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything")
        return 130
    except Exception as exc:  # every failure ends the same way: said, then cleaned up
        say(f"\nthe demo failed: {exc}\n(logs in {logs})")
        return 1
    finally:
        demo.close()
