"""Fixtures shared by havend's tests: real havend processes and a raw NBD client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import WaitTimeout, wait_until

HAVEND = [sys.executable, "-m", "havend"]
_LISTENING = re.compile(r"serving .* on (nbd(?:\+unix)?://\S+)")


def require_tool(name: str) -> str:
    """Path of a tool the tests run (an NBD peer, strace, sshd); `make setup`
    (tools/setup.sh) installs them all, so a missing one fails, never skips."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make setup` (it installs the test tools)")
    return path


@dataclass
class Havend:
    """A running ``havend nbd-serve`` process; its log goes to a file, never a pipe."""

    proc: subprocess.Popen[bytes]
    uri: str
    path: Path
    name: str
    port: int | None
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> list[str]:
        return self.log_path.read_text().splitlines()


def start_havend(path: Path, *args: str, name: str = "disk", unix: str | None = None) -> Havend:
    """Start ``havend nbd-serve`` on a free port (or ``unix``) and wait until it listens."""
    log_path = path.with_name(f"havend-{path.name}-{time.monotonic_ns()}.log")
    cmd = [*HAVEND, "nbd-serve", str(path), "--name", name]
    cmd += ["--socket", unix] if unix else ["--port", "0"]
    cmd += list(args)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True
        )
    try:
        match = wait_until(
            lambda: proc.poll() is not None or _LISTENING.search(log_path.read_text()),
            20,
            "havend to listen",
            interval=0.02,
        )
    except WaitTimeout:
        match = None
    if not isinstance(match, re.Match):  # it exited, or never said it listens
        proc.kill()
        proc.wait()
        raise AssertionError("havend did not start:\n" + log_path.read_text())
    uri = match.group(1)
    port = re.match(r"nbd://[^:]+:(\d+)/", uri)
    return Havend(proc, uri, path, name, int(port.group(1)) if port else None, log_path)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A 16 MiB volume of random data."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(16 << 20))
    return path


@pytest.fixture
def havend(volume: Path) -> Iterator[Havend]:
    server = start_havend(volume)
    yield server
    server.stop()


@pytest.fixture
def havend_ro(volume: Path) -> Iterator[Havend]:
    server = start_havend(volume, "--read-only")
    yield server
    server.stop()


# A raw NBD client, to send exactly the bytes a test needs (also wrong ones).

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698


class RawClient:
    """A blocking NBD client over one socket; every call has a timeout."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.size = 0
        self.flags = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"server closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        return hflags

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC
        return option, reply, self.recv_exact(length)

    def go(self, name: str = "disk") -> None:
        """Fixed-newstyle handshake ending in NBD_OPT_GO; raises unless it succeeds."""
        self.greeting()
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        encoded = name.encode()
        self.option(7, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0))
        while True:
            _, reply, data = self.option_reply()
            if reply == 3 and struct.unpack_from(">H", data)[0] == 0:
                self.size, self.flags = struct.unpack_from(">QH", data, 2)
            elif reply == 1:
                return
            elif reply != 3:
                raise AssertionError(f"NBD_OPT_GO refused: {reply:#x} {data!r}")

    def request(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)
        )

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data is read only for a successful READ."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == REPLY_MAGIC
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data

    def read(self, offset: int, length: int, cookie: int = 1) -> tuple[int, bytes]:
        self.request(0, offset, length, cookie=cookie)
        error, got, data = self.reply(length)
        assert got == cookie
        return error, data

    def write(self, offset: int, data: bytes, *, flags: int = 0, cookie: int = 2) -> int:
        self.request(1, offset, len(data), flags=flags, cookie=cookie)
        self.sock.sendall(data)
        error, got, _ = self.reply()
        assert got == cookie
        return error


@pytest.fixture
def raw_client() -> Iterator[type[RawClient]]:
    opened: list[RawClient] = []

    class Tracked(RawClient):
        def __init__(self, port: int, timeout: float = 10.0) -> None:
            super().__init__(port, timeout)
            opened.append(self)

    yield Tracked
    for client in opened:
        client.close()
