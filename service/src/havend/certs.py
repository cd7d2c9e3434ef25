"""Node TLS material: one CA per deployment, node certificates, and TLS 1.3 contexts.

Nodes talk to each other over TLS 1.3 with mutual authentication: each side
presents its own certificate and accepts only certificates signed by the
deployment's CA. All keys are EC P-256, all signatures ECDSA with SHA-256; the
cryptography is ``cryptography`` and Python's ``ssl``, nothing home-made.

Files (every PEM file is created with ``O_EXCL``; nothing is ever overwritten):

- CA directory, made by :func:`init_ca` / ``havend certs init``:

  - ``ca.pem``: the self-signed CA certificate (CA:true, pathlen 0,
    keyCertSign + cRLSign), mode 0644.
  - ``ca.key``: the CA private key, unencrypted PKCS#8 PEM, mode 0600 from the
    moment it is created (never readable by others, not even briefly).

- Node directory, made by :func:`issue` / ``havend certs issue``, one per node:

  - ``<name>.pem``: the node certificate, mode 0644; subject CN ``<name>``, the
    given SANs (IP addresses or DNS names), ExtendedKeyUsage serverAuth *and*
    clientAuth because every node is both.
  - ``<name>.key``: the node private key, unencrypted PKCS#8 PEM, mode 0600
    (unencrypted so havend starts unattended; its file mode is its protection).
  - ``ca.pem``: a copy of the CA certificate, the node's only trust anchor.

Trust model: one CA per deployment, and it is the only thing a node trusts (the
system trust store is never loaded). Whoever holds ``ca.key`` can mint a node
identity, so the CA key lives on the Ansible controller or is kept offline; a
node receives only its own key, its own certificate and ``ca.pem``. There is no
revocation list: node certificates are short-lived (825 days by default) and
removing a node for good means replacing the CA and re-issuing the others.
Clients check the server's name against its SANs, so a node is reached by one
of the names or addresses it was issued for.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from havend.errors import CertificateError

StrPath = str | os.PathLike[str]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_CA_NAME = "haven.dr CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 825
KEY_MODE = 0o600
CERT_MODE = 0o644

# Certificates start a few minutes in the past so a node whose clock lags slightly accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


@dataclass(frozen=True)
class CAFiles:
    """Where :func:`init_ca` wrote the CA: ``cert`` is ``ca.pem``, ``key`` is ``ca.key``."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeFiles:
    """Where :func:`issue` wrote a node's material.

    ``ca`` is the CA certificate in the node directory; ``ca_written`` says
    whether this call copied it there (False when an identical copy existed).
    """

    cert: Path
    key: Path
    ca: Path
    ca_written: bool

    @property
    def written(self) -> tuple[Path, ...]:
        """The files this call created, in the order they were written."""
        return (self.cert, self.key, self.ca) if self.ca_written else (self.cert, self.key)


class CertificateInfo(TypedDict):
    """What :func:`describe` reports about a certificate."""

    subject_cn: str
    issuer_cn: str
    sans: list[str]
    serial: str
    not_before: str
    not_after: str
    fingerprint_sha256: str


def init_ca(
    directory: StrPath, common_name: str = DEFAULT_CA_NAME, days: int = DEFAULT_CA_DAYS
) -> CAFiles:
    """Create a new deployment CA in ``directory`` (made with mode 0700 if missing).

    Writes ``ca.key`` (mode 0600) and ``ca.pem`` (mode 0644), valid for ``days``
    days from now. Raises :class:`CertificateError` if either file already
    exists, without touching it, or if the arguments are unusable.
    """
    common_name = common_name.strip()
    if not 1 <= len(common_name) <= 64:
        raise CertificateError("the CA name must be 1 to 64 characters")
    not_before, not_after = _validity(days, None)
    folder = _make_directory(directory)
    files = CAFiles(cert=folder / CA_CERT, key=folder / CA_KEY)
    for path in (files.cert, files.key):
        if os.path.lexists(path):
            raise CertificateError(f"{path} already exists: refusing to overwrite a CA")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _create_all([(files.key, _key_pem(key), KEY_MODE), (files.cert, _cert_pem(cert), CERT_MODE)])
    return files


def issue(
    ca_directory: StrPath,
    out_directory: StrPath,
    name: str,
    sans: list[str],
    days: int = DEFAULT_NODE_DAYS,
    not_before: dt.datetime | None = None,
) -> NodeFiles:
    """Issue a node certificate signed by the CA in ``ca_directory``.

    Writes ``<name>.key`` (mode 0600) and ``<name>.pem`` into ``out_directory``
    (made with mode 0700 if missing), and copies ``ca.pem`` there unless an
    identical copy exists. ``name`` becomes the subject CN and the file stem: a
    letter or digit then up to 63 of letters, digits, ``.``, ``_``, ``-``, and
    not ``ca``. Each SAN that parses as an IP address is an IP SAN, anything
    else must be a DNS name; at least one is required.

    The certificate is valid for ``days`` days (at least 1) from ``not_before``
    (timezone-aware; default: now minus a few minutes of clock-skew allowance);
    a ``not_before`` far enough in the past gives an already expired
    certificate, which is how tests get one. Raises :class:`CertificateError`,
    writing nothing, on a bad name or SAN, an existing ``<name>`` file, a
    different ``ca.pem`` in ``out_directory``, an unreadable or expired CA, or a
    validity that would outlast the CA's.
    """
    if not _NODE_NAME.match(name) or name.lower() == Path(CA_CERT).stem:
        raise CertificateError(
            f"bad node name {name!r}: use 1-64 letters, digits, '.', '_', '-' "
            "starting with a letter or digit (and not 'ca')"
        )
    if not sans:
        raise CertificateError(f"{name}: at least one SAN (IP address or DNS name) is required")
    names = _general_names(sans)
    start, end = _validity(days, not_before)
    ca_folder = Path(ca_directory)
    ca_cert, ca_key = _load_ca(ca_folder)
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= dt.datetime.now(dt.UTC):
        raise CertificateError(f"the CA in {ca_folder} expired on {ca_end.isoformat()}")
    if end > ca_end:
        raise CertificateError(
            f"{name}: a certificate valid until {end.isoformat()} would outlive the CA "
            f"(valid until {ca_end.isoformat()}); ask for fewer days"
        )

    folder = _make_directory(out_directory)
    files = NodeFiles(
        cert=folder / f"{name}.pem",
        key=folder / f"{name}.key",
        ca=folder / CA_CERT,
        ca_written=True,
    )
    for path in (files.cert, files.key):
        if os.path.lexists(path):
            raise CertificateError(f"{path} already exists: refusing to overwrite it")
    ca_pem = _cert_pem(ca_cert)
    if os.path.lexists(files.ca):
        if _read(files.ca) != ca_pem:
            raise CertificateError(
                f"{files.ca} is not the certificate of the CA in {ca_folder}: refusing to mix CAs"
            )
        files = NodeFiles(cert=files.cert, key=files.key, ca=files.ca, ca_written=False)

    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    plan = [(files.key, _key_pem(key), KEY_MODE), (files.cert, _cert_pem(cert), CERT_MODE)]
    if files.ca_written:
        plan.append((files.ca, ca_pem, CERT_MODE))
    _create_all(plan)
    return files


def server_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """A server context: TLS 1.3 only, presents ``cert``/``key``, requires a client
    certificate signed by ``ca`` (the only trust anchor; no system store).

    Raises :class:`CertificateError` if the files cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    return _configure(context, cert, key, ca)


def client_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """A client context: TLS 1.3 only, presents ``cert``/``key``, accepts only a
    server certificate signed by ``ca`` whose SANs match the ``server_hostname``
    given when connecting.

    Raises :class:`CertificateError` if the files cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return _configure(context, cert, key, ca)


def describe(cert_path: StrPath) -> CertificateInfo:
    """Summarise the PEM certificate at ``cert_path``.

    Times are ISO 8601 in UTC (``+00:00``), the serial is lower-case hex, SANs
    are strings (IP addresses in canonical form) in certificate order, and the
    fingerprint is the SHA-256 of the DER, upper-case hex joined by ``:`` as
    ``openssl x509 -fingerprint -sha256`` prints it. Raises
    :class:`CertificateError` if the file is missing or not a certificate.
    """
    return _describe(_load_cert(Path(cert_path)))


def describe_der(der: bytes) -> CertificateInfo:
    """:func:`describe` of a DER certificate (a TLS peer's, as the handshake gave it)."""
    return _describe(x509.load_der_x509_certificate(der))


def _describe(cert: x509.Certificate) -> CertificateInfo:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_list = [str(entry.value) for entry in sans]
    except x509.ExtensionNotFound:
        san_list = []
    return CertificateInfo(
        subject_cn=_common_name(cert.subject),
        issuer_cn=_common_name(cert.issuer),
        sans=san_list,
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``havend certs init`` and ``havend certs issue`` on the top-level subparsers."""
    certs = subparsers.add_parser(
        "certs",
        help="create the deployment CA and node certificates",
        description="Create the TLS material nodes use to authenticate each other.",
    )
    sub = certs.add_subparsers(dest="certs_command", required=True)

    init = sub.add_parser(
        "init",
        help="create a new deployment CA",
        description="Create ca.pem and ca.key (mode 0600) in DIR; refuses to replace a CA.",
    )
    init.add_argument("--dir", required=True, type=Path, dest="directory", help="CA directory")
    init.add_argument("--name", default=DEFAULT_CA_NAME, help="CA common name")
    init.add_argument("--days", type=int, default=DEFAULT_CA_DAYS, help="validity in days")
    # cli.main builds its event loop from args.loop; plain asyncio is plenty for file writes.
    init.set_defaults(run=_run_init, loop="asyncio")

    node = sub.add_parser(
        "issue",
        help="issue a node certificate from the CA",
        description="Write NAME.pem, NAME.key (mode 0600) and a copy of ca.pem into OUT.",
    )
    node.add_argument("--ca", required=True, type=Path, help="CA directory (from certs init)")
    node.add_argument("--name", required=True, help="node name: certificate CN and file stem")
    node.add_argument(
        "--san",
        required=True,
        action="append",
        dest="sans",
        help="IP address or DNS name the node is reached at (repeatable)",
    )
    node.add_argument("--out", required=True, type=Path, help="node directory to write into")
    node.add_argument("--days", type=int, default=DEFAULT_NODE_DAYS, help="validity in days")
    node.set_defaults(run=_run_issue, loop="asyncio")


async def _run_init(args: argparse.Namespace) -> None:
    files = init_ca(args.directory, args.name, args.days)
    print(files.key)
    print(files.cert)


async def _run_issue(args: argparse.Namespace) -> None:
    files = issue(args.ca, args.out, args.name, args.sans, args.days)
    for path in files.written:
        print(path)


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertificateError(f"validity must be at least 1 day, not {days}")
    if not_before is None:
        not_before = dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    elif not_before.tzinfo is None:
        raise CertificateError("not_before must be timezone-aware")
    # X.509 times have whole seconds: drop the rest so what we compare is what gets signed.
    start = not_before.astimezone(dt.UTC).replace(microsecond=0)
    return start, start + dt.timedelta(days=days)


def _general_names(sans: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in sans:
        text = raw.strip()
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(text))
        except ValueError:
            entry = x509.DNSName(_dns_name(text, raw))
        if entry not in names:
            names.append(entry)
    return names


def _dns_name(text: str, raw: str) -> str:
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    # An all-numeric last label is a mistyped IP address, never a host name.
    if (
        len(name) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise CertificateError(f"SAN {raw!r} is neither an IP address nor a DNS name")
    return name


def _make_directory(directory: StrPath) -> Path:
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise CertificateError(f"{folder} is not a directory")
    return folder


def _create_all(plan: list[tuple[Path, bytes, int]]) -> None:
    """Create every file or, on the first failure, remove the ones this call made."""
    done: list[Path] = []
    try:
        for path, data, mode in plan:
            _create(path, data, mode)
            done.append(path)
    except BaseException:
        for path in done:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _create(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # The mode is given to open(2): the file never exists with wider permissions.
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise CertificateError(f"{path} already exists: refusing to overwrite it") from exc
    except OSError as exc:
        raise CertificateError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        # The umask may have narrowed the mode; set it exactly (fchmod never widens a key).
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate") from exc


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _load_cert(folder / CA_CERT)
    key_path = folder / CA_KEY
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise CertificateError(f"{key_path} does not belong to {folder / CA_CERT}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise CertificateError(f"{folder / CA_CERT} is not a havend CA certificate") from exc
    if not constraints.ca:
        raise CertificateError(f"{folder / CA_CERT} is not a CA certificate")
    return cert, key


def _configure(context: ssl.SSLContext, cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # Strict RFC 5280 checks (Python 3.13's default): our certificates are built to pass them.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"cannot load CA certificate {ca}: {exc}") from exc
    return context


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""
