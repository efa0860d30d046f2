"""The DNS records a domain needs for mailtwist, and a check of what is published.

:func:`expected_records` lists them (MX, SPF, DKIM, DMARC, MTA-STS, TLSRPT and
the RFC 6186 SRV records); :func:`zone_text` prints them in zone-file format;
:func:`check_records` looks them up with a ``twisted.names`` resolver and says
per record whether it is ok, missing or wrong.  ``mailtwist dns DOMAIN [--check]``
is the command line for both.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError

from mailtwist.config import IMPLICIT_TLS_ROLES, Config

SPF = "v=spf1 mx -all"
MTA_STS_MODE = "testing"
MTA_STS_MAX_AGE = 86400

# RFC 6186 / RFC 8314 service names and the listener role behind each.
SRV_SERVICES = (
    ("_submissions._tcp", "submissions"),
    ("_submission._tcp", "submission"),
    ("_imaps._tcp", "imaps"),
    ("_imap._tcp", "imap"),
    ("_pop3s._tcp", "pop3s"),
    ("_pop3._tcp", "pop3"),
)

_PORT_KINDS = {"tcp", "tcp6", "ssl", "tls"}


@dataclass(frozen=True)
class Record:
    """One record to publish: owner name (no trailing dot), type, value.

    The value is in presentation form: ``"10 mx.example.org."`` for MX,
    ``"0 1 993 mx.example.org."`` for SRV, the unquoted text for TXT.
    """

    name: str
    type: str
    value: str
    what: str

    def zone_line(self) -> str:
        if self.type == "TXT":
            chunks = " ".join(f'"{self.value[i:i + 255]}"'
                              for i in range(0, len(self.value), 255))
            if len(self.value) > 255:
                chunks = f"( {chunks} )"
            return f"{self.name}. IN TXT {chunks}"
        return f"{self.name}. IN {self.type} {self.value}"


@dataclass(frozen=True)
class CheckResult:
    """What a lookup found for one record: status is ok, missing, wrong or error."""

    record: Record
    status: str
    found: tuple[str, ...] = ()
    detail: str = ""

    def line(self) -> str:
        where = f"{self.record.type:<6} {self.record.name}"
        if self.status == "ok":
            return f"ok       {where}"
        if self.status == "missing":
            return f"missing  {where}  expected: {self.record.value}"
        if self.status == "wrong":
            found = " | ".join(self.found)
            return f"wrong    {where}  expected: {self.record.value}  found: {found}"
        return f"error    {where}  {self.detail}"


def endpoint_port(description: str) -> int | None:
    """The port number of a TCP-like server endpoint string, else None."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0].lower() not in _PORT_KINDS:
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    value = keywords.get("port", positional[0] if positional else None)
    try:
        port = int(value) if value is not None else None
    except ValueError:
        return None
    return port if port else None


def configured_ports(config: Config) -> dict[str, int]:
    """Role -> the port of its first TCP listener in the config (roles without one left out)."""
    ports = {}
    for role, descriptions in config.listen.items():
        for description in descriptions:
            port = endpoint_port(description)
            if port is not None:
                ports[role] = port
                break
    return ports


def mta_sts_policy(config: Config) -> str:
    """The MTA-STS policy file (RFC 8461) served at /.well-known/mta-sts.txt."""
    return (f"version: STSv1\r\nmode: {MTA_STS_MODE}\r\nmx: {config.hostname}\r\n"
            f"max_age: {MTA_STS_MAX_AGE}\r\n")


def mta_sts_id(config: Config) -> str:
    """A policy id that changes exactly when the policy text changes."""
    return hashlib.sha256(mta_sts_policy(config).encode()).hexdigest()[:20]


def expected_records(config: Config, domain: str, dkim: Iterable[tuple[str, str]],
                     ports: dict[str, int]) -> list[Record]:
    """Every record *domain* should publish; *dkim* is (selector, TXT value) per key
    and *ports* maps listener roles to the ports clients should use."""
    host = config.hostname
    records = [
        Record(domain, "MX", f"10 {host}.", "mail for the domain goes to this server"),
        Record(domain, "TXT", SPF, "SPF: only the MX hosts send for the domain"),
    ]
    for selector, value in dkim:
        records.append(Record(f"{selector}._domainkey.{domain}", "TXT", value,
                              f"DKIM public key {selector}"))
    records += [
        Record(f"_dmarc.{domain}", "TXT",
               f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
               "DMARC policy and where reports go"),
        Record(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={mta_sts_id(config)}",
               f"MTA-STS; the policy is served at https://mta-sts.{domain}"
               "/.well-known/mta-sts.txt"),
        Record(f"_smtp._tls.{domain}", "TXT",
               f"v=TLSRPTv1; rua=mailto:postmaster@{domain}", "TLS reporting (RFC 8460)"),
    ]
    for service, role in SRV_SERVICES:
        port = ports.get(role)
        value = f"0 1 {port} {host}." if port else "0 0 0 ."
        what = (f"{role} on port {port}" + (" (implicit TLS)" if role in IMPLICIT_TLS_ROLES
                                            else "") if port else f"no {role} service")
        records.append(Record(f"{service}.{domain}", "SRV", value, what))
    return records


def zone_text(config: Config, domain: str, records: list[Record]) -> str:
    """The records as zone-file lines, each after a comment saying what it is for."""
    host = config.hostname
    lines = [f"; DNS records for {domain} (mailtwist, host {host})",
             f"; {host} needs A and/or AAAA records with this server's public addresses:",
             f";   {host}. IN A 192.0.2.25",
             f";   {host}. IN AAAA 2001:db8::25",
             "; and the reverse (PTR) records of those addresses should name it."]
    for record in records:
        lines.append(f"; {record.what}")
        lines.append(record.zone_line())
    return "\n".join(lines) + "\n"


# -- checking ------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return re.sub(r"\s*;\s*", "; ", " ".join(text.split())).strip("; ").lower()


def _txt_tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags


def _txt_family(record: Record) -> str:
    """The version tag that marks records of this kind at a shared name (v=spf1...)."""
    return record.value.split(";", 1)[0].split(" ", 1)[0].lower()


def _txt_matches(record: Record, found: str) -> bool:
    if record.name.startswith("_mta-sts."):
        tags = _txt_tags(found)
        return tags.get("v", "").lower() == "stsv1" and bool(tags.get("id"))
    if "._domainkey." in record.name:
        want, got = _txt_tags(record.value), _txt_tags(found)
        return want.get("p") == got.get("p") and want.get("k", "rsa") == got.get("k", "rsa")
    return _normalize(found) == _normalize(record.value)


def _name(value: object) -> str:
    return str(value).rstrip(".").lower()


def _srv_value(payload: dns.Record_SRV) -> str:
    target = _name(payload.target)
    return f"{payload.priority} {payload.weight} {payload.port} {target or ''}."


async def _check_one(resolver, record: Record, timeout: tuple[int, ...]) -> CheckResult:
    lookup = {"MX": resolver.lookupMailExchange, "TXT": resolver.lookupText,
              "SRV": resolver.lookupService}[record.type]
    try:
        answers, _, _ = await lookup(record.name, timeout=timeout)
    except (DNSNameError, DomainError):
        return CheckResult(record, "missing")
    except Exception as e:  # noqa: BLE001 - a timeout or SERVFAIL: report, never crash
        return CheckResult(record, "error", detail=f"lookup failed: {e.__class__.__name__} {e}")
    payloads = [a.payload for a in answers if a.type == getattr(dns, record.type)]
    if record.type == "MX":
        found = tuple(f"{p.preference} {_name(p.name)}." for p in payloads)
        want = record.value.split()[1].rstrip(".").lower()
        ok = any(_name(p.name) == want for p in payloads)
    elif record.type == "SRV":
        found = tuple(_srv_value(p) for p in payloads)
        _, _, port, target = record.value.split()
        ok = any(p.port == int(port) and _name(p.target) == target.rstrip(".").lower()
                 for p in payloads)
    else:
        texts = [b"".join(p.data).decode("utf-8", "replace") for p in payloads]
        family = _txt_family(record)
        found = tuple(t for t in texts if t.lower().startswith(family))
        ok = any(_txt_matches(record, t) for t in found)
    if ok:
        return CheckResult(record, "ok", found)
    return CheckResult(record, "wrong" if found else "missing", found)


async def _check_host(resolver, host: str, timeout: tuple[int, ...]) -> CheckResult:
    """The server's own name must have an address (A or AAAA)."""
    record = Record(host, "A/AAAA", "an address of this server", "the MX host's address")
    found: list[str] = []
    for lookup in (resolver.lookupAddress, resolver.lookupIPV6Address):
        try:
            answers, _, _ = await lookup(host, timeout=timeout)
        except (DNSNameError, DomainError):
            continue
        except Exception as e:  # noqa: BLE001 - reported like the others
            return CheckResult(record, "error", detail=f"lookup failed: {e.__class__.__name__}")
        found += [socket.inet_ntop(socket.AF_INET if a.type == dns.A else socket.AF_INET6,
                                   a.payload.address)
                  for a in answers if a.type in (dns.A, dns.AAAA)]
    return CheckResult(record, "ok" if found else "missing", tuple(found))


def check_records(resolver, host: str, records: list[Record],
                  timeout: float = 10.0) -> defer.Deferred:
    """Look every record up, all at once; fire with a list of :class:`CheckResult`
    in the order of *records*, after the host's own address check (never fails)."""
    seconds = (max(1, int(timeout)),)

    lookups = [defer.ensureDeferred(_check_host(resolver, host, seconds))]
    lookups += [defer.ensureDeferred(_check_one(resolver, record, seconds))
                for record in records]
    return defer.gatherResults(lookups, consumeErrors=True)
