"""DKIM signing of outgoing mail (RFC 6376; ed25519 per RFC 8463), with dkimpy.

Keys live in ``<data_dir>/dkim/<domain>/<selector>.key`` (PEM, mode 0600);
``mailtwist dkim keygen DOMAIN`` makes one and prints the TXT record to
publish.  A message is signed when its From: address is in a local domain
that has keys: once per key, so a domain with an RSA and an ed25519 key
carries both signatures and receivers use the one they understand.
Signing blocks (it is CPU work); the dispatcher runs it in a worker thread.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.logger import Logger

log = Logger()

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
RSA_BITS = 2048
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FROM = re.compile(rb"^from:((?:.*)(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class DKIMError(Exception):
    """A key cannot be made or used; one line for the admin."""


@dataclass(frozen=True)
class SigningKey:
    """One private key in the form dkimpy takes, with its selector and algorithm."""

    selector: str
    algorithm: bytes
    private: bytes


def validate_selector(selector: str) -> str:
    selector = selector.lower()
    if not _SELECTOR.fullmatch(selector):
        raise DKIMError(f"invalid selector {selector!r}: use letters, digits and hyphens")
    return selector


def default_selector(algorithm: str, now: float | None = None) -> str:
    """E.g. ``rsa-202611``: algorithm and month, so a rotated key gets a new name."""
    return f"{algorithm}-{time.strftime('%Y%m', time.gmtime(now))}"


def _load_key(path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    selector = path.stem
    if isinstance(key, rsa.RSAPrivateKey):
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return SigningKey(selector, ALGORITHMS["rsa"], pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey(selector, ALGORITHMS["ed25519"], base64.b64encode(seed))
    raise DKIMError(f"{path}: not an RSA or ed25519 key")


def _public_record(key) -> str:
    """The TXT record value for a private key."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def zone_line(selector: str, domain: str, value: str) -> str:
    """A zone-file line, the value split into strings of at most 255 characters."""
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{record_name(selector, domain)}. IN TXT ( {chunks} )"


def generate_key(key_dir: Path, domain: str, selector: str,
                 algorithm: str = "rsa") -> tuple[Path, str]:
    """Make a key for *domain* and return its path and the TXT record value.

    Never overwrites a key: a selector that exists is an error.
    """
    if algorithm not in ALGORITHMS:
        raise DKIMError(f"unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    selector = validate_selector(selector)
    key = (rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
           if algorithm == "rsa" else ed25519.Ed25519PrivateKey.generate())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    folder = key_dir / domain
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{selector}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DKIMError(f"{path} exists already; choose another --selector") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return path, _public_record(key)


def public_records(key_dir: Path, domain: str) -> list[tuple[str, str]]:
    """(selector, TXT value) for every key of *domain*."""
    records = []
    for path in sorted((key_dir / domain).glob("*.key")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        records.append((path.stem, _public_record(key)))
    return records


def from_domain(message: bytes) -> str | None:
    """The domain of the single From: address in the header section, else None."""
    end = message.find(b"\r\n\r\n")
    head = message[: end + 2] if end >= 0 else message
    found = _FROM.findall(head)
    if len(found) != 1:
        return None
    value = re.sub(rb"\r?\n", b"", found[0]).decode("utf-8", "replace")
    addresses = [a for _, a in getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].lower().rstrip(">")


class DKIMSigner:
    """Signs messages whose From: domain is local and has keys in *key_dir*."""

    def __init__(self, key_dir: Path, is_local_domain) -> None:
        self.key_dir = Path(key_dir)
        self.is_local_domain = is_local_domain
        self._cache: dict[str, tuple[tuple, list[SigningKey]]] = {}
        self._lock = threading.Lock()

    def keys(self, domain: str) -> list[SigningKey]:
        """The domain's keys, re-read when its key files change."""
        folder = self.key_dir / domain
        try:
            paths = sorted(folder.glob("*.key"))
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in paths)
        except OSError:
            return []
        with self._lock:
            cached = self._cache.get(domain)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        keys = []
        for path in paths:
            try:
                keys.append(_load_key(path))
            except (OSError, ValueError, DKIMError) as e:
                log.error("DKIM key {path} unusable: {error}", path=path, error=e)
        with self._lock:
            self._cache[domain] = (stamp, keys)
        return keys

    def __call__(self, message: bytes) -> bytes:
        return self.sign(message)

    def sign(self, message: bytes) -> bytes:
        """*message* with DKIM-Signature headers prepended (unchanged if not ours)."""
        domain = from_domain(message)
        if domain is None or not self.is_local_domain(domain):
            return message
        signatures = b""
        for key in self.keys(domain):
            try:
                signatures += dkim.sign(message, key.selector.encode(), domain.encode(),
                                        key.private, signature_algorithm=key.algorithm,
                                        linesep=b"\r\n")
            except dkim.DKIMException as e:
                log.error("DKIM signing for {domain} with {selector} failed: {error}",
                          domain=domain, selector=key.selector, error=e)
        return signatures + message
