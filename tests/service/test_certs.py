"""Node TLS material: CA and node files, and real mutual TLS 1.3 between nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from havend import certs
from havend.certs import CAFiles, NodeFiles, client_context, describe, init_ca, issue
from havend.errors import CertificateError, HavendError

TIMEOUT = 10.0
NODE1_SANS = ["127.0.0.1", "node1.haven.test"]
NODE2_SANS = ["127.0.0.1", "Node2.Haven.Test.", "::1"]


@dataclass(frozen=True)
class PKI:
    ca: CAFiles
    node1: NodeFiles
    node2: NodeFiles
    stranger: NodeFiles  # issued by another deployment's CA
    stale: NodeFiles  # issued by the right CA, expired


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    ca = init_ca(root / "ca")
    other_ca = init_ca(root / "other-ca", "another deployment")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    return PKI(
        ca=ca,
        node1=issue(ca.cert.parent, root / "node1", "node1", NODE1_SANS),
        node2=issue(ca.cert.parent, root / "node2", "node2", NODE2_SANS),
        stranger=issue(other_ca.cert.parent, root / "stranger", "node2", NODE2_SANS),
        stale=issue(ca.cert.parent, root / "stale", "stale", ["127.0.0.1"], 1, long_ago),
    )


def server_ctx(node: NodeFiles) -> ssl.SSLContext:
    return certs.server_context(node.cert, node.key, node.ca)


def client_ctx(node: NodeFiles) -> ssl.SSLContext:
    return client_context(node.cert, node.key, node.ca)


@dataclass
class Outcome:
    version: str | None  # TLS version the client negotiated
    greeting: bytes  # what the server said after the handshake; b"" if it hung up
    accepted: list[str]  # client CNs the server's handler saw
    client_error: Exception | None  # why the client's handshake failed
    tls_errors: list[str]  # handshake failures asyncio logged, on either side


class _HandshakeFailures(logging.Handler):
    """Collects TLS handshake failures, which asyncio logs (on both sides) only in debug mode."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
            self.errors.append(str(record.exc_info[1]))


async def _exchange(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> Outcome:
    accepted: list[str] = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subject = dict(pair[0] for pair in writer.get_extra_info("peercert")["subject"])
        accepted.append(subject["commonName"])
        writer.write(f"hello {subject['commonName']}\n".encode())
        try:
            await writer.drain()
            await reader.read()  # until the client hangs up
        finally:
            writer.close()

    listener = await asyncio.start_server(
        greet, "127.0.0.1", 0, ssl=server, ssl_handshake_timeout=TIMEOUT
    )
    port = listener.sockets[0].getsockname()[1]
    version, greeting, client_error = None, b"", None
    try:
        async with asyncio.timeout(TIMEOUT):
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1",
                    port,
                    ssl=client,
                    server_hostname=hostname,
                    ssl_handshake_timeout=TIMEOUT,
                )
            except (ssl.SSLError, ConnectionError) as exc:
                client_error = exc
            else:
                version = writer.get_extra_info("ssl_object").version()
                # TLS 1.3 checks the client certificate after the client's handshake is done,
                # and asyncio's server closes without sending the alert: a rejected client
                # sees the connection end here, with no greeting.
                with contextlib.suppress(ConnectionError):
                    greeting = await reader.readline()
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
    finally:
        listener.close()
        async with asyncio.timeout(TIMEOUT):
            await listener.wait_closed()
    return Outcome(version, greeting, accepted, client_error, [])


def exchange(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> Outcome:
    """One client connection to a fresh server.

    A server logs its handshake failure before it closes the socket, so ``tls_errors``
    holds it by the time the client has seen the connection end.
    """
    failures = _HandshakeFailures()
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.addHandler(failures)
    asyncio_log.setLevel(logging.DEBUG)
    try:
        outcome = asyncio.run(_exchange(server, client, hostname), debug=True)
    finally:
        asyncio_log.removeHandler(failures)
        asyncio_log.setLevel(level)
    outcome.tls_errors = failures.errors
    return outcome


def assert_server_rejected(outcome: Outcome, reason: str) -> None:
    """The client finished its side of the handshake; the server refused it for ``reason``."""
    assert outcome.client_error is None and outcome.version == "TLSv1.3"
    assert outcome.greeting == b"" and outcome.accepted == []
    # The client logged nothing (its handshake succeeded): every entry is the server's.
    assert outcome.tls_errors and all(reason in error for error in outcome.tls_errors), outcome


def assert_client_rejected(outcome: Outcome, reason: str) -> None:
    """The client refused the server's certificate for ``reason``; no session started."""
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError), outcome
    assert reason in str(outcome.client_error)
    assert outcome.version is None and outcome.accepted == []


def test_mutual_auth_over_tls13_both_ways(pki: PKI) -> None:
    one_to_two = exchange(server_ctx(pki.node2), client_ctx(pki.node1), "node2.haven.test")
    assert one_to_two.version == "TLSv1.3"
    assert one_to_two.greeting == b"hello node1\n"
    assert one_to_two.accepted == ["node1"] and one_to_two.tls_errors == []

    two_to_one = exchange(server_ctx(pki.node1), client_ctx(pki.node2), "127.0.0.1")
    assert two_to_one.version == "TLSv1.3"
    assert two_to_one.greeting == b"hello node2\n"
    assert two_to_one.accepted == ["node2"]


def test_contexts_refuse_anything_older_than_tls13(pki: PKI) -> None:
    for context in (server_ctx(pki.node1), client_ctx(pki.node1)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert len(context.get_ca_certs()) == 1  # the deployment CA, never the system store
    assert client_ctx(pki.node1).check_hostname

    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    legacy.load_verify_locations(pki.ca.cert)
    legacy.load_cert_chain(pki.node1.cert, pki.node1.key)
    outcome = exchange(server_ctx(pki.node2), legacy, "node2.haven.test")
    assert isinstance(outcome.client_error, ConnectionError) and outcome.accepted == []
    assert outcome.tls_errors and all("UNSUPPORTED_PROTOCOL" in e for e in outcome.tls_errors)


def test_client_from_another_ca_is_rejected(pki: PKI) -> None:
    # The stranger trusts our CA, so only the server's check of its certificate can stop it.
    stranger = client_context(pki.stranger.cert, pki.stranger.key, pki.ca.cert)
    outcome = exchange(server_ctx(pki.node1), stranger, "node1.haven.test")
    assert_server_rejected(outcome, "unable to get local issuer certificate")


def test_server_from_another_ca_is_rejected(pki: PKI) -> None:
    outcome = exchange(server_ctx(pki.stranger), client_ctx(pki.node1), "node2.haven.test")
    assert_client_rejected(outcome, "self-signed certificate in certificate chain")


def test_client_without_certificate_is_rejected(pki: PKI) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
    anonymous.load_verify_locations(pki.ca.cert)
    outcome = exchange(server_ctx(pki.node1), anonymous, "node1.haven.test")
    assert_server_rejected(outcome, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_hostname_not_in_sans_is_rejected(pki: PKI) -> None:
    outcome = exchange(server_ctx(pki.node1), client_ctx(pki.node2), "node2.haven.test")
    assert_client_rejected(outcome, "Hostname mismatch")
    outcome = exchange(server_ctx(pki.node1), client_ctx(pki.node2), "127.0.0.2")
    assert_client_rejected(outcome, "IP address mismatch")


def test_expired_certificates_are_rejected_on_both_sides(pki: PKI) -> None:
    not_after = dt.datetime.fromisoformat(describe(pki.stale.cert)["not_after"])
    assert not_after < dt.datetime.now(dt.UTC)
    outcome = exchange(server_ctx(pki.stale), client_ctx(pki.node1), "127.0.0.1")
    assert_client_rejected(outcome, "certificate has expired")
    outcome = exchange(server_ctx(pki.node1), client_ctx(pki.stale), "127.0.0.1")
    assert_server_rejected(outcome, "certificate has expired")


def test_key_files_are_0600_and_created_that_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: dict[str, tuple[int, int]] = {}
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        opened[os.fspath(path)] = (flags, mode)
        return real_open(path, flags, mode)

    monkeypatch.setattr(certs.os, "open", spy)
    previous = os.umask(0)  # the most permissive umask must not widen anything
    try:
        ca = init_ca(tmp_path / "ca")
        node = issue(tmp_path / "ca", tmp_path / "node", "node1", ["10.0.0.1"])
    finally:
        os.umask(previous)

    for key in (ca.key, node.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        flags, mode = opened[str(key)]
        assert flags & os.O_EXCL and flags & os.O_CREAT and mode == 0o600
    for cert in (ca.cert, node.cert, node.ca):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in ca.key.read_bytes()  # PKCS#8, unencrypted


def test_existing_ca_is_never_overwritten(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    before = (ca.cert.read_bytes(), ca.key.read_bytes())
    with pytest.raises(CertificateError, match="refusing to overwrite a CA"):
        init_ca(tmp_path)
    ca.cert.unlink()  # half a CA is still a CA: its key must survive
    with pytest.raises(CertificateError, match="refusing to overwrite a CA"):
        init_ca(tmp_path)
    assert ca.key.read_bytes() == before[1]
    assert issubclass(CertificateError, HavendError)


def test_certificate_contents(pki: PKI) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    leaf = x509.load_pem_x509_certificate(pki.node2.cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert pki.node2.ca.read_bytes() == pki.ca.cert.read_bytes()

    info = describe(pki.node2.cert)
    assert info["subject_cn"] == "node2" and info["issuer_cn"] == "haven.dr CA"
    assert info["sans"] == ["127.0.0.1", "node2.haven.test", "::1"]
    not_before = dt.datetime.fromisoformat(info["not_before"])
    assert dt.datetime.fromisoformat(info["not_after"]) - not_before == dt.timedelta(days=825)
    assert not_before <= dt.datetime.now(dt.UTC)
    assert len(info["fingerprint_sha256"].split(":")) == 32


@pytest.mark.parametrize(
    ("name", "sans", "message"),
    [
        ("../evil", ["127.0.0.1"], "bad node name"),
        ("a/b", ["127.0.0.1"], "bad node name"),
        ("", ["127.0.0.1"], "bad node name"),
        (".hidden", ["127.0.0.1"], "bad node name"),
        ("ca", ["127.0.0.1"], "bad node name"),
        ("node3", [], "at least one SAN"),
        ("node3", ["10.0.0.300"], "neither an IP address nor a DNS name"),
        ("node3", ["bad_name.example"], "neither an IP address nor a DNS name"),
        ("node3", ["-x.example"], "neither an IP address nor a DNS name"),
    ],
)
def test_issue_validates_name_and_sans(
    pki: PKI, tmp_path: Path, name: str, sans: list[str], message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        issue(pki.ca.cert.parent, tmp_path / "out", name, sans)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_issue_refuses_overwrites_foreign_ca_copies_and_bad_validity(
    pki: PKI, tmp_path: Path
) -> None:
    ca_dir = pki.ca.cert.parent
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        issue(ca_dir, pki.node1.cert.parent, "node1", ["127.0.0.1"])
    # node2's directory from the stranger's deployment already holds that deployment's ca.pem.
    with pytest.raises(CertificateError, match="refusing to mix CAs"):
        issue(ca_dir, pki.stranger.cert.parent, "node9", ["127.0.0.1"])
    assert not (pki.stranger.cert.parent / "node9.key").exists()
    with pytest.raises(CertificateError, match="outlive the CA"):
        issue(ca_dir, tmp_path, "node9", ["127.0.0.1"], days=3651)
    with pytest.raises(CertificateError, match="at least 1 day"):
        issue(ca_dir, tmp_path, "node9", ["127.0.0.1"], days=0)
    with pytest.raises(CertificateError, match="cannot read"):
        issue(tmp_path / "no-ca", tmp_path, "node9", ["127.0.0.1"])
    assert not any(tmp_path.iterdir())  # every refusal came before anything was written


def test_contexts_report_unloadable_files(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot load certificate"):
        client_context(pki.node1.cert, pki.node2.key, pki.ca.cert)
    with pytest.raises(CertificateError, match="cannot load CA certificate"):
        certs.server_context(pki.node1.cert, pki.node1.key, tmp_path / "missing.pem")


def havend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "havend", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_cli_init_and_issue(tmp_path: Path) -> None:
    init = havend("init", "--dir", "ca", "--name", "test CA", "--days", "30", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert init.stdout.splitlines() == ["ca/ca.key", "ca/ca.pem"]
    assert describe(tmp_path / "ca" / "ca.pem")["subject_cn"] == "test CA"

    node = ["issue", "--ca", "ca", "--name", "n1", "--san", "127.0.0.1", "--san", "n1.test"]
    first = havend(*node, "--out", "n1", "--days", "7", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["n1/n1.pem", "n1/n1.key", "n1/ca.pem"]
    assert describe(tmp_path / "n1" / "n1.pem")["sans"] == ["127.0.0.1", "n1.test"]
    # A second node in the same directory shares the CA copy already there.
    second = havend(
        *node[:4], "n2", "--san", "10.1.2.3", "--out", "n1", "--days", "7", cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["n1/n2.pem", "n1/n2.key"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "--dir", "ca"], "refusing to overwrite a CA"),
        (["issue", "--ca", "ca", "--name", "../x", "--san", "h", "--out", "o"], "bad node name"),
        (["issue", "--ca", "nowhere", "--name", "x", "--san", "h", "--out", "o"], "cannot read"),
    ],
)
def test_cli_errors_are_one_line_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    assert havend("init", "--dir", "ca", cwd=tmp_path).returncode == 0
    result = havend(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
