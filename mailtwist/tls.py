"""TLS: the self-signed certificate of the embedded default, and the server context.

The policy (docs/security.md): TLS 1.2 and 1.3 only, Mozilla "intermediate"
AEAD ciphers, server cipher order, no compression, no renegotiation. The
context can be switched at run time (reload, certificate renewal).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mailtwist.config import ConfigError


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in *cert_pem*, colon-separated hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A new P-256 key and a 10-year self-signed certificate for *hostname*, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(hostname)] if hostname and hostname != "localhost" else []
    san.append(x509.DNSName("localhost"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(data_dir: str | os.PathLike, hostname: str) -> tuple[Path, Path, str]:
    """Return (cert, key, fingerprint) in *data_dir*/tls, creating a self-signed pair
    on first use. Existing files are never replaced."""
    tls_dir = Path(data_dir) / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if not cert_path.exists() or not key_path.exists():
        cert_pem, key_pem = make_self_signed(hostname)
        _write_private(key_path, key_pem, 0o600)
        _write_private(cert_path, cert_pem, 0o644)
    return cert_path, key_path, fingerprint(cert_path.read_bytes())


def ensure_default_certificate(data_dir: Path, hostname: str) -> tuple[Path, Path, str]:
    """:func:`ensure_certificate` for the server (start and reload): a directory
    it cannot write is a ConfigError naming it."""
    try:
        return ensure_certificate(data_dir, hostname)
    except OSError as e:
        raise ConfigError(f"tls: cannot create a certificate in "
                          f"{data_dir / 'tls'}: {e.strerror}") from None


# Mozilla's "intermediate" TLS 1.2 suites (ECDHE key exchange, AEAD ciphers only;
# its DHE suites are left out since no DH parameters are configured). TLS 1.3
# suites are OpenSSL's defaults, all of them AEAD.
SERVER_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: a renewal changes at least one."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class TLSMaterial:
    """A loaded and checked certificate and key, ready to serve."""

    cert_path: Path
    key_path: Path
    context: SSL.Context
    fingerprint: str
    stamps: tuple[FileStamp | None, FileStamp | None]


def load_server_tls(cert_path: Path, key_path: Path) -> TLSMaterial:
    """Read, check and build the server context for *cert_path*/*key_path*:
    TLS 1.2 minimum, :data:`SERVER_CIPHERS`, server cipher order, no compression,
    no renegotiation, no session tickets. ConfigError names the bad file."""
    stamps = (FileStamp.of(cert_path), FileStamp.of(key_path))
    try:
        cert_pem = cert_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"tls.cert: cannot read {cert_path}: {e.strerror}") from None
    try:
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"tls.key: cannot read {key_path}: {e.strerror}") from None
    try:
        certs = [
            crypto.load_certificate(crypto.FILETYPE_PEM, block)
            for block in _pem_blocks(cert_pem, b"CERTIFICATE")
        ]
        if not certs:
            raise crypto.Error("no certificate found")
    except crypto.Error as e:
        raise ConfigError(f"tls.cert: {cert_path} is not a PEM certificate ({e})") from None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise ConfigError(f"tls.key: {key_path} is not a PEM private key") from None
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=certs[0],
            extraCertChain=certs[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
        )
        context = options.getContext()
    except (SSL.Error, ValueError) as e:
        raise ConfigError(
            f"tls: key {key_path} does not match certificate {cert_path} ({e})"
        ) from None
    # CertificateOptions already sets OP_NO_COMPRESSION and OP_CIPHER_SERVER_PREFERENCE.
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    return TLSMaterial(cert_path, key_path, context, fingerprint(cert_pem), stamps)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """The TLS context every listener holds (implicit TLS and STARTTLS).

    It serves one :class:`TLSMaterial` at a time; :meth:`switch` replaces it, so
    a renewed certificate is used by the next handshake while connections
    already encrypted keep the context they started with.
    """

    def __init__(self, material: TLSMaterial) -> None:
        self.material = material

    @property
    def fingerprint(self) -> str:
        return self.material.fingerprint

    def switch(self, material: TLSMaterial) -> None:
        """Serve *material* from the next handshake on."""
        self.material = material

    def getContext(self) -> SSL.Context:  # noqa: N802 - IOpenSSLContextFactory
        return self.material.context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:  # noqa: N802,N803
        return SSL.Connection(self.material.context, None)


def server_context_factory(cert_path: Path, key_path: Path) -> ServerTLS:
    """A switchable TLS 1.2+ server context from PEM files; ConfigError names the bad file."""
    return ServerTLS(load_server_tls(cert_path, key_path))


def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, pos = [], 0
    while (start := data.find(begin, pos)) != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        blocks.append(data[start:stop + len(end)] + b"\n")
        pos = stop + len(end)
    return blocks
