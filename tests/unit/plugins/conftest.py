# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A real HTTP(S) server on 127.0.0.1 that answers as the test scripts it, so
the client is tested over real sockets (timeouts, refused connections, TLS)
rather than against a mock of requests."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Script:
    """Answers by (method, path): a list of (status, body[, delay[, headers]])
    used in turn (the last one repeats), or a function (request) -> (status, body)."""

    def __init__(self):
        self.routes = {}
        self.requests = []  # (method, path, headers, body) as received

    def on(self, method, path, *answers):
        self.routes[(method, path)] = list(answers)

    def answer(self, method, path, headers, body):
        self.requests.append((method, path, dict(headers), body))
        route = self.routes.get((method, path.split("?")[0]))
        if route is None:
            return 404, {"detail": "no route %s %s in the test's script" % (method, path)}, 0, {}
        if callable(route[0]):
            status, data = route[0](method, path, body)
            return status, data, 0, {}
        entry = route.pop(0) if len(route) > 1 else route[0]
        status, data = entry[0], entry[1]
        return status, data, entry[2] if len(entry) > 2 else 0, entry[3] if len(entry) > 3 else {}


def _handler(script):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, data, delay, headers = script.answer(self.command, self.path, self.headers, body)
            if delay:
                time.sleep(delay)
            payload = data if isinstance(data, bytes) else json.dumps(data).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, *args):  # quiet
            pass

    return Handler


class _Server:
    def __init__(self, script, context=None):
        self.script = script
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def havend():
    """A plain-HTTP scripted node: ``.script.on(...)``, ``.url``."""
    server = _Server(Script())
    yield server
    server.close()


def _self_signed(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, u"test-node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(u"127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = str(directory / "node.pem"), str(directory / "node.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


@pytest.fixture
def havend_tls(tmp_path):
    """A scripted node over HTTPS with a self-signed certificate; ``.ca`` is its path."""
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Server(Script(), context)
    server.ca = cert
    yield server
    server.close()


@pytest.fixture
def listening():
    """A loopback port something listens on (nothing answers)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
