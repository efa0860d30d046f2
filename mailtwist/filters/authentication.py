"""SPF, DKIM and DMARC checks with one RFC 8601 Authentication-Results header.

The ``auth_results`` filter (data stage; SPF also at MAIL when
``spf_fail_reject`` is on) is written on the public filter API like any
third-party filter.  pyspf and dkimpy resolve names synchronously, so every
check runs in the reactor's thread pool, with a dnspython resolver that asks
the ``dns_servers`` of the filter's settings, else those of the server's
``[outbound]`` config (from the FilterContext), else /etc/resolv.conf.  The
authserv-id is the ``hostname`` setting, else the server's host name.

Simplifications (see docs/filters.md): the organizational domain is the last
two labels of a name (no public-suffix list); DMARC ``pct``, ``rua``/``ruf``
and ``fo`` are ignored.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from twisted.internet import threads

from mailtwist.dkim import from_domain
from mailtwist.filters import Filter, FilterConfigError, FilterFactory, header_values
from mailtwist.interfaces import (
    CONTINUE,
    AddHeader,
    Continue,
    FileInto,
    Reject,
    RemoveHeader,
    TempFail,
)
from mailtwist.outbound.mx import parse_nameserver, system_nameservers

AR_HEADER = "Authentication-Results"


class DNSTempError(Exception):
    """A lookup timed out or the servers failed (SERVFAIL, refused)."""


class Resolver:
    """Blocking TXT/A/AAAA/MX/PTR lookups with dnspython, for worker threads only."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float) -> None:
        self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                      for host, port in servers or system_nameservers()]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout

    def query(self, name: str, qtype: str) -> list:
        """The rdata of *name*/*qtype*; [] for NXDOMAIN or no data; DNSTempError."""
        try:
            answer = self._resolver.resolve(name.rstrip(".") + ".", qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DNSTempError(f"{name}/{qtype}: {e}") from None
        except dns.exception.DNSException as e:
            raise DNSTempError(f"{name}/{qtype}: {e}") from None
        return list(answer)

    def txt(self, name: str) -> list[bytes]:
        """Every TXT record of *name*, its strings joined."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    def spf_lookup(self, name: str, qtype: str) -> list:
        """Answers in the form of pyspf's ``DNSLookup``."""
        try:
            records = self.query(name, qtype)
        except DNSTempError as e:
            raise spf.TempError(f"DNS {e}") from None
        result = []
        for r in records:
            if qtype in ("A", "AAAA"):
                result.append(((name, qtype), r.address))
            elif qtype == "MX":
                result.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                result.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                result.append(((name, qtype), r.strings))
        return result


# pyspf calls its module-level DNSLookup; route it to the resolver of the
# worker thread's current check, and to pyspf's own lookup otherwise.
_local = threading.local()
_pyspf_lookup = spf.DNSLookup


def _thread_lookup(name, qtype, strict=True, timeout=30):
    resolver = getattr(_local, "resolver", None)
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return resolver.spf_lookup(name, qtype)


spf.DNSLookup = _thread_lookup


def org_domain(domain: str) -> str:
    """The organizational domain by the last-two-labels rule."""
    return ".".join(domain.lower().rstrip(".").split(".")[-2:])


def aligned(domain: str | None, from_dom: str, strict: bool) -> bool:
    if not domain:
        return False
    domain = domain.lower().rstrip(".")
    return domain == from_dom if strict else org_domain(domain) == org_domain(from_dom)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+$")


def _pvalue(value: str) -> str:
    """An RFC 8601 property value: a token, or a quoted string."""
    if _TOKEN.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments dropped)."""
    without = re.sub(r"\([^()]*\)", " ", value)
    return without.split(";", 1)[0].strip().split()[0].lower() if without.strip() else ""


@dataclass
class Results:
    """The outcome of the three checks for one message."""

    spf: str = "none"
    spf_identity: str = ""          # "smtp.mailfrom=..." or "smtp.helo=..."
    spf_domain: str = ""
    dkim: list[tuple[str, str, str]] = field(default_factory=list)  # (result, d, s)
    dmarc: str = "none"
    from_domain: str = ""
    policy: str = ""                # p= (or sp=) that applies, "" without a record

    def header_value(self, hostname: str) -> str:
        parts = [hostname, f"spf={self.spf} {self.spf_identity}".strip()]
        if self.dkim:
            parts += [f"dkim={r} header.d={_pvalue(d)} header.s={_pvalue(s)}"
                      for r, d, s in self.dkim]
        else:
            parts.append("dkim=none")
        dmarc = f"dmarc={self.dmarc}"
        if self.policy:
            dmarc += f" (p={self.policy})"
        if self.from_domain:
            dmarc += f" header.from={_pvalue(self.from_domain)}"
        parts.append(dmarc)
        return "; ".join(parts)


class AuthenticationFilter(Filter):
    """Checks SPF, DKIM and DMARC and records them in Authentication-Results."""

    name = "auth_results"

    def __init__(self, hostname: str, resolver: Resolver, dns_timeout: float,
                 dmarc_reject: bool = False, spf_fail_reject: bool = False,
                 junk_folder: str = "Junk", reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.hostname = hostname.lower()
        self.resolver = resolver
        self.dns_timeout = dns_timeout
        self.dmarc_reject = dmarc_reject
        self.spf_fail_reject = spf_fail_reject
        self.junk = FileInto(junk_folder)
        self.reactor = reactor

    # -- running blocking checks off the reactor ------------------------------

    def _in_thread(self, func: Callable, *args: Any):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self._with_resolver, func, *args)

    def _with_resolver(self, func: Callable, *args: Any):
        _local.resolver = self.resolver
        try:
            return func(*args)
        finally:
            _local.resolver = None

    # -- checks (worker thread) ------------------------------------------------

    def check_spf(self, ip: str, sender: str, helo: str) -> tuple[str, str, str]:
        """(result, identity property, domain): MAIL FROM, or HELO for the null sender."""
        if sender:
            identity, domain = f"smtp.mailfrom={_pvalue(sender)}", _domain_of(sender)
        else:
            identity, domain = f"smtp.helo={_pvalue(helo)}", helo.lower()
        if not domain:
            return "none", identity, domain
        try:
            query = spf.query(ip, sender, helo, timeout=self.dns_timeout,
                              querytime=self.dns_timeout * 3)
            result, _code, _explanation = query.check()
        except spf.TempError:
            result = "temperror"
        except Exception:  # noqa: BLE001 - a malformed input is a permerror
            result = "permerror"
        return result, identity, domain

    def check_dkim(self, message: bytes) -> list[tuple[str, str, str]]:
        """(result, d, s) for every DKIM-Signature."""
        failed = []

        def dnsfunc(name, timeout=5):
            name = name.decode() if isinstance(name, bytes) else name
            try:
                records = self.resolver.txt(name)
            except DNSTempError as e:
                failed.append(e)
                raise dkim.DnsTimeoutError(str(e)) from None
            return records[0] if records else None

        try:
            verifier = dkim.DKIM(message, timeout=self.dns_timeout)
        except Exception:  # noqa: BLE001 - unparsable message
            return [("permerror", "", "")]
        results = []
        signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
        for idx, raw in enumerate(signatures):
            try:
                tags = dkim.util.parse_tag_value(re.sub(rb"\s+", b"", raw))
                d = tags.get(b"d", b"").decode("ascii", "replace")
                s = tags.get(b"s", b"").decode("ascii", "replace")
            except Exception:  # noqa: BLE001
                d = s = ""
            del failed[:]
            try:
                ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            except dkim.DKIMException:
                ok = False
            if ok:
                results.append(("pass", d, s))
            elif failed:
                results.append(("temperror", d, s))
            else:
                results.append(("fail", d, s))
        return results

    def dmarc_record(self, from_dom: str) -> tuple[dict[str, str] | None, bool]:
        """(tags, is_org_record) of the DMARC policy for *from_dom*; DNSTempError."""
        candidates = [(from_dom, False)]
        if org_domain(from_dom) != from_dom:
            candidates.append((org_domain(from_dom), True))
        for name, is_org in candidates:
            records = [r for r in self.resolver.txt(f"_dmarc.{name}")
                       if r.strip().lower().startswith(b"v=dmarc1")]
            if len(records) == 1:
                tags = {}
                for part in records[0].decode("utf-8", "replace").split(";"):
                    key, sep, value = part.partition("=")
                    if sep:
                        tags[key.strip().lower()] = value.strip().lower()
                if tags.get("p") in ("none", "quarantine", "reject"):
                    return tags, is_org
        return None, False

    def check(self, message: bytes, ip: str, sender: str, helo: str,
              spf_done: tuple[str, str, str] | None) -> Results:
        """Every check for one message (worker thread)."""
        results = Results()
        results.spf, results.spf_identity, results.spf_domain = (
            spf_done or self.check_spf(ip, sender, helo))
        results.dkim = self.check_dkim(message)
        from_values = header_values(message, "From")
        from_dom = from_domain(message)
        if from_dom is None:
            results.dmarc = "permerror" if from_values else "none"
            return results
        results.from_domain = from_dom
        try:
            tags, is_org = self.dmarc_record(from_dom)
        except DNSTempError:
            results.dmarc = "temperror"
            return results
        if tags is None:
            return results
        results.policy = tags.get("sp", tags["p"]) if is_org else tags["p"]
        if results.policy not in ("none", "quarantine", "reject"):
            results.policy = tags["p"]
        spf_ok = results.spf == "pass" and aligned(results.spf_domain, from_dom,
                                                   tags.get("aspf") == "s")
        dkim_ok = any(r == "pass" and aligned(d, from_dom, tags.get("adkim") == "s")
                      for r, d, _ in results.dkim)
        if spf_ok or dkim_ok:
            results.dmarc = "pass"
        elif results.spf == "temperror" or any(r == "temperror" for r, _, _ in results.dkim):
            results.dmarc = "temperror"
        else:
            results.dmarc = "fail"
        return results

    # -- stages -----------------------------------------------------------------

    def mail_from(self, session, sender):
        if not self.spf_fail_reject or session.user:
            return CONTINUE
        helo = session.helo or ""
        d = self._in_thread(self.check_spf, session.peer_host, sender, helo)

        def decide(spf_result):
            session.state_for(self.name)["spf"] = ((session.peer_host, sender, helo),
                                                   spf_result)
            result = spf_result[0]
            if result == "fail":
                return Reject(f"SPF check failed for {spf_result[2]}", 550, "5.7.23")
            if result == "temperror":
                return TempFail("SPF check: temporary DNS error, try again later",
                                451, "4.7.24")
            return CONTINUE
        return d.addCallback(decide)

    def data(self, session, message):
        forged = [v for v in header_values(message, AR_HEADER)
                  if authserv_id(v) == self.hostname]
        edits: list = []
        if forged:
            others = [v for v in header_values(message, AR_HEADER)
                      if authserv_id(v) != self.hostname]
            edits.append(RemoveHeader(AR_HEADER))
            edits += [AddHeader(AR_HEADER, v) for v in reversed(others)]
        if session.user:
            return Continue(*edits)
        helo = session.helo or ""
        sender = session.sender or ""
        cached = session.state_for(self.name).get("spf")
        spf_done = cached[1] if cached and cached[0] == (session.peer_host, sender, helo) \
            else None
        d = self._in_thread(self.check, message, session.peer_host, sender, helo, spf_done)
        return d.addCallback(self._verdict, edits)

    def _verdict(self, results: Results, edits: list):
        header = AddHeader(AR_HEADER, results.header_value(self.hostname))
        actions = [*edits, header]
        if self.spf_fail_reject and results.spf == "fail":
            return Reject(f"SPF check failed for {results.spf_domain}", 550, "5.7.23")
        if self.spf_fail_reject and results.spf == "temperror":
            return TempFail("SPF check: temporary DNS error, try again later", 451, "4.7.24")
        if results.dmarc == "fail" and results.policy == "reject" and self.dmarc_reject:
            return Reject(f"DMARC policy of {results.from_domain} rejects this message",
                          550, "5.7.1")
        if results.dmarc == "temperror" and self.dmarc_reject:
            return TempFail("DMARC check: temporary DNS error, try again later", 451, "4.7.1")
        if results.dmarc == "fail" and results.policy in ("reject", "quarantine"):
            actions.append(self.junk)
        return Continue(*actions)


def _build(settings: dict[str, Any], context: Any = None) -> AuthenticationFilter:
    servers = []
    configured = settings["dns_servers"] or list(getattr(context, "dns_servers", ()) or ())
    for text in configured:
        if not isinstance(text, str):
            raise FilterConfigError("dns_servers", f"expected \"host:port\" strings, "
                                                   f"got {text!r}")
        try:
            servers.append(parse_nameserver(text))
        except ValueError as e:
            raise FilterConfigError("dns_servers", f"bad nameserver {text!r}: {e}") from None
    timeout = float(settings["dns_timeout"])
    if not timeout > 0:
        raise FilterConfigError("dns_timeout", "must be more than 0")
    hostname = settings["hostname"] or getattr(context, "hostname", None) or socket.getfqdn()
    try:
        FileInto(settings["junk_folder"])
    except ValueError as e:
        raise FilterConfigError("junk_folder", str(e)) from None
    return AuthenticationFilter(hostname, Resolver(servers, timeout), timeout,
                                dmarc_reject=settings["dmarc_reject"],
                                spf_fail_reject=settings["spf_fail_reject"],
                                junk_folder=settings["junk_folder"])


auth_results = FilterFactory(
    "auth_results", _build,
    description="SPF, DKIM and DMARC checks; adds Authentication-Results",
    defaults={"hostname": "", "dns_servers": [], "dns_timeout": 5.0,
              "dmarc_reject": False, "spf_fail_reject": False, "junk_folder": "Junk"},
)
