"""A real ``havend nbd-serve`` process under bad clients: one clear line, no damage."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from conftest import IHAVEOPT, REQUEST_MAGIC, Havend, RawClient, start_havend
from waiting import wait_until

EINVAL, EPERM, ENOSPC = 22, 1, 28
FUA = 1


def wait_for_log(server: Havend, needle: str, timeout: float = 10) -> list[str]:
    return wait_until(
        lambda: [line for line in server.log() if needle in line],
        timeout,
        f"a log line with {needle!r}",
        detail=lambda: "\n".join(server.log()),
    )


def test_reads_writes_flush_and_fua_reach_the_file(havend: Havend, raw_client) -> None:
    client = raw_client(havend.port)
    client.go()
    assert client.size == 16 << 20
    original = havend.path.read_bytes()
    error, data = client.read(4096, 8192)
    assert error == 0 and data == original[4096 : 4096 + 8192]

    assert client.write(100, b"A" * 5000) == 0
    assert client.write(1 << 20, b"B" * 4096, flags=FUA) == 0
    client.request(3, cookie=9)  # FLUSH
    assert client.reply() == (0, 9, b"")
    with open(havend.path, "rb") as f:
        f.seek(100)
        assert f.read(5000) == b"A" * 5000
        f.seek(1 << 20)
        assert f.read(4096) == b"B" * 4096


def test_trim_and_write_zeroes_read_back_as_zeroes(havend: Havend, raw_client) -> None:
    client = raw_client(havend.port)
    client.go()
    for command, flags, cookie in ((4, 0, 11), (6, 0, 12), (6, 2, 13)):  # TRIM, ZEROES, NO_HOLE
        offset = cookie * 65536
        client.request(command, offset, 65536, flags=flags, cookie=cookie)
        assert client.reply() == (0, cookie, b"")
        assert client.read(offset, 65536) == (0, bytes(65536))


def test_out_of_range_and_unknown_requests_get_errors_and_the_session_goes_on(
    havend: Havend, raw_client
) -> None:
    client = raw_client(havend.port)
    client.go()
    size = client.size
    assert client.read(size - 1, 2)[0] == EINVAL
    assert client.write(size - 1, b"xy") == ENOSPC
    client.request(42, cookie=5)
    assert client.reply() == (EINVAL, 5, b"")
    assert client.read(0, 512) == (0, havend.path.read_bytes()[:512])
    assert havend.path.stat().st_size == size  # nothing written past the end
    assert wait_for_log(havend, "WRITE refused with ENOSPC")


def test_read_only_export_refuses_writes_with_eperm(havend_ro: Havend, raw_client) -> None:
    before = havend_ro.path.read_bytes()
    client = raw_client(havend_ro.port)
    client.go()
    assert client.flags & 2  # NBD_FLAG_READ_ONLY
    assert client.write(0, b"nope" * 1024) == EPERM
    client.request(4, 0, 4096, cookie=3)  # TRIM
    assert client.reply() == (EPERM, 3, b"")
    assert client.read(0, 4096) == (0, before[:4096])
    assert havend_ro.path.read_bytes() == before


def test_a_bad_client_is_dropped_with_one_line_and_others_keep_working(
    havend: Havend, raw_client
) -> None:
    good = raw_client(havend.port)
    good.go()

    bad = raw_client(havend.port)
    bad.go()
    bad.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # not a request magic
    assert bad.sock.recv(1) == b""  # dropped

    garbage = raw_client(havend.port)
    garbage.greeting()
    garbage.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert garbage.sock.recv(100) == b""

    lines = wait_for_log(havend, "bad request magic")
    assert len(lines) == 1 and "dropping connection" in lines[0]
    assert len(wait_for_log(havend, "unknown handshake flags")) == 1
    assert good.read(0, 4096) == (0, havend.path.read_bytes()[:4096])
    assert havend.alive()


def test_client_vanishing_mid_write_loses_nothing_acknowledged(havend: Havend, raw_client) -> None:
    client = raw_client(havend.port)
    client.go()
    assert client.write(0, b"K" * 4096) == 0  # acknowledged: must survive
    client.request(1, 8192, 65536, cookie=77)
    client.sock.sendall(b"H" * 1000)  # then the client dies mid-payload
    client.sock.close()
    assert len(wait_for_log(havend, "middle of a message")) == 1

    other = raw_client(havend.port)
    other.go()
    assert other.read(0, 4096) == (0, b"K" * 4096)
    error, data = other.read(8192, 1000)
    assert error == 0 and data != b"H" * 1000  # the unacknowledged write never happened


def test_connection_reset_in_the_handshake_does_not_hurt(havend: Havend, raw_client) -> None:
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", havend.port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(struct.pack(">IQ", 1, IHAVEOPT))  # flags, then half an option
        sock.close()  # RST
    client = raw_client(havend.port)
    client.go()
    assert client.read(0, 512)[0] == 0


def test_oversized_write_payload_drops_only_that_client(havend: Havend, raw_client) -> None:
    client = raw_client(havend.port)
    client.go()
    client.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, (1 << 25) + 1))
    assert client.sock.recv(1) == b""
    assert wait_for_log(havend, "exceeds the 33554432 maximum")
    other = raw_client(havend.port)
    other.go()
    assert other.read(0, 512)[0] == 0


def test_unix_socket_and_default_export(volume: Path, tmp_path: Path, raw_client) -> None:
    sock_path = str(tmp_path / "nbd.sock")
    server = start_havend(volume, unix=sock_path)
    try:
        assert server.uri == f"nbd+unix:///disk?socket={sock_path}"
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(5)
        conn.connect(sock_path)
        client = RawClient.__new__(RawClient)
        client.sock = conn
        client.go("")  # the empty name is the default export
        assert client.size == volume.stat().st_size
        client.close()
    finally:
        assert server.stop() == 0
    assert not os.path.exists(sock_path)


def test_sigterm_finishes_cleanly_and_syncs(volume: Path, raw_client) -> None:
    server = start_havend(volume)
    client = raw_client(server.port)
    client.go()
    assert client.write(0, b"Z" * 4096) == 0
    assert server.stop(signal.SIGTERM) == 0
    assert volume.read_bytes()[:4096] == b"Z" * 4096
    assert any("stopping" in line for line in server.log())


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "havend", "nbd-serve", str(tmp_path / "missing.img")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot open volume" in result.stderr and "Traceback" not in result.stderr
