"""The fault proxy itself, against a threaded echo server: each fault does what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy
from waiting import wait_until

TIMEOUT = 10.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(TIMEOUT)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


@pytest.fixture
def proxy(echo: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo) as p:
        yield p


def connect(proxy: FaultProxy, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


def wait_active(proxy: FaultProxy, count: int) -> None:
    wait_until(
        lambda: proxy.stats().active,
        TIMEOUT,
        f"{count} connection(s) active in the proxy",
        until=lambda active: active == count,
        interval=0.01,
    )


def assert_refused(proxy: FaultProxy) -> None:
    """A new connection is reset: at connect() already, or at the first read."""
    try:
        sock = connect(proxy)
    except ConnectionResetError:
        return
    with sock:
        assert_dead(sock)


def assert_dead(sock: socket.socket) -> None:
    """The connection was reset or closed: the next read fails or sees EOF."""
    try:
        sock.sendall(b"x")
        assert sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_pass_through_both_ways_and_counters(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: many chunks
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exact(sock, len(payload)) == payload
        sender.join(TIMEOUT)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the half-close went through and came back
    stats = proxy.stats()
    assert stats.client_to_server == stats.server_to_client == len(payload)
    assert stats.accepted == 1
    wait_active(proxy, 0)


def test_delay_adds_at_least_the_delay(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo_once(sock, b"warm") == b"warm"
        proxy.delay(0.2)
        start = time.monotonic()
        assert echo_once(sock, b"slow") == b"slow"
        assert time.monotonic() - start >= 0.35  # 0.2 each way, loosely
        proxy.delay(0)
        assert echo_once(sock, b"fast") == b"fast"


def test_bandwidth_limits_throughput(proxy: FaultProxy) -> None:
    proxy.bandwidth(200_000)
    payload = b"b" * 100_000
    with connect(proxy) as sock:
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exact(sock, len(payload)) == payload
        sender.join(TIMEOUT)
        assert time.monotonic() - start >= 0.3  # 100 kB at 200 kB/s is 0.5 s, loosely
    proxy.bandwidth(None)


def test_partition_holds_bytes_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo_once(sock, b"before") == b"before"
        proxy.partition()
        sock.sendall(b"during")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        late = connect(proxy)  # accepted, but not connected through
        late.sendall(b"late")
        with pytest.raises(TimeoutError):
            late.settimeout(0.2)
            late.recv(10)
        before = proxy.stats().client_to_server
        proxy.heal()
        sock.settimeout(TIMEOUT)
        late.settimeout(TIMEOUT)
        assert recv_exact(sock, 6) == b"during"  # held, not dropped
        assert recv_exact(late, 4) == b"late"
        assert before == len(b"before")
        late.close()


def test_reset_all_resets_every_connection(proxy: FaultProxy) -> None:
    socks = [connect(proxy) for _ in range(3)]
    for sock in socks:
        assert echo_once(sock, b"hi") == b"hi"
    assert proxy.reset_all() == 3
    for sock in socks:
        with pytest.raises((ConnectionResetError, ConnectionError)):
            echo_once(sock, b"again")
        sock.close()
    with connect(proxy) as sock:  # new connections still work
        assert echo_once(sock, b"new") == b"new"
    assert proxy.stats().resets == 3


def test_reset_all_during_partition_ends_parked_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo_once(sock, b"x") == b"x"
        proxy.partition()
        sock.sendall(b"held")
        late = connect(proxy)
        wait_active(proxy, 2)
        assert proxy.reset_all() == 2
        wait_active(proxy, 0)
        assert_dead(sock)
        assert_dead(late)
        late.close()
        proxy.heal()


def test_refuse_then_accept(proxy: FaultProxy) -> None:
    proxy.refuse()
    assert_refused(proxy)
    proxy.accept()
    with connect(proxy) as sock:
        assert echo_once(sock, b"ok") == b"ok"
    stats = proxy.stats()
    assert stats.refused == 1 and stats.accepted == 2


def test_drop_after_cuts_once_after_exactly_n_bytes(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo_once(sock, b"12345") == b"12345"
        proxy.drop_after(10)
        sent = proxy.stats().client_to_server
        sock.sendall(b"a" * 4)
        assert recv_exact(sock, 4) == b"aaaa"
        sock.sendall(b"b" * 20)  # 6 of these pass, then the cut
        with pytest.raises((ConnectionResetError, ConnectionError)):
            recv_exact(sock, 20)
    assert proxy.stats().client_to_server - sent == 10
    with connect(proxy) as sock:  # once: the reconnect gets through
        assert echo_once(sock, b"c" * 50) == b"c" * 50


def test_drop_after_every_connection(proxy: FaultProxy) -> None:
    proxy.drop_after(3, once=False)
    for _ in range(2):
        with connect(proxy) as sock:
            sock.sendall(b"12345")
            with pytest.raises((ConnectionResetError, ConnectionError)):
                recv_exact(sock, 5)
    proxy.drop_after(None)
    with connect(proxy) as sock:
        assert echo_once(sock, b"12345") == b"12345"


def test_target_down_resets_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with FaultProxy("127.0.0.1", port) as proxy:
            assert_refused(proxy)


def test_stop_is_bounded_with_open_connections(echo: int) -> None:
    proxy = FaultProxy("127.0.0.1", echo).start()
    sock = connect(proxy)
    proxy.partition()
    sock.sendall(b"stuck")
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 8
    assert_dead(sock)
    sock.close()
    with pytest.raises(RuntimeError):
        proxy.delay(1)
