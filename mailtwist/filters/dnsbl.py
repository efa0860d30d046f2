"""DNSBL and DNSWL checks of the connecting address (the ``dnsbl`` filter).

Like Postfix's postscreen (``postscreen_dnsbl_sites``) and
``reject_rbl_client``: the client address, reversed (nibbles for IPv6), is
looked up as an A record in every configured zone with twisted.names, all
zones at once.  Each listing whose answer passes the zone's return-code filter
adds the zone's weight to a score; at ``threshold`` the client is listed and
the configured action applies (reject, tempfail or tag).  DNSWL zones work the
same way with their own score; a client allow-listed there skips the DNSBL
verdict and is marked in the session (:func:`dnswl_listed`) so that the
``greylist`` filter lets it through too.

DNS failures and timeouts never refuse anything: the zone is not counted and a
line is logged (fail open, as Postfix does).  See docs/builtin-filters.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error

from mailtwist.filters import Filter, FilterConfigError, FilterFactory
from mailtwist.interfaces import (
    CONTINUE,
    AddHeader,
    Continue,
    FilterSession,
    Reject,
    RemoveHeader,
    TempFail,
)

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The session-state key (of the filter named "dnsbl") set for DNSWL-listed clients.
DNSWL_MARK = "dnswl"

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
#: Answers some lists give for errors (Spamhaus: query refused, typing error, ...).
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")


# -- helpers shared by the policy filters -------------------------------------------

def client_ip(session: FilterSession) -> IPAddress | None:
    """The client's IP address (IPv4-mapped IPv6 as IPv4); None for a non-IP peer."""
    try:
        address = ipaddress.ip_address(session.peer_host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(key: str, values: Iterable[Any]) -> tuple[IPNetwork, ...]:
    """CIDR strings ("192.0.2.0/24", "2001:db8::/32", "198.51.100.7") or
    FilterConfigError naming *key*."""
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise FilterConfigError(key, f"expected network strings like \"192.0.2.0/24\", "
                                         f"got {value!r}")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as e:
            raise FilterConfigError(key, f"bad network {value!r}: {e}") from None
    return tuple(networks)


def in_networks(address: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether *address* is in one of *networks*."""
    return address is not None and any(address.version == net.version and address in net
                                       for net in networks)


def check_positive(settings: dict[str, Any], *keys: str, allow_zero: bool = False) -> None:
    """FilterConfigError for a key whose number is negative (or zero when not allowed)."""
    for key in keys:
        value = settings[key]
        if value < 0 or (value == 0 and not allow_zero):
            raise FilterConfigError(key, "must be more than 0" if not allow_zero
                                    else "must be 0 or more")


def reverse_name(address: IPAddress) -> str:
    """The DNSBL query label of *address*: reversed octets, or reversed nibbles for IPv6."""
    pointer = address.reverse_pointer
    return pointer.rsplit(".in-addr.arpa", 1)[0] if address.version == 4 \
        else pointer.rsplit(".ip6.arpa", 1)[0]


# -- zones ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Zone:
    """One ``zone[=filter][*weight]`` entry."""

    name: str
    #: per octet the allowed values; None: any 127.0.0.0/8 answer but 127.255.255.x
    octets: tuple[frozenset[int], ...] | None = field(default=None, repr=False)
    weight: int = 1
    spec: str = ""

    def matches(self, answer: str) -> bool:
        """Whether one A answer counts as a listing."""
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.octets is None:
            return address in _LOOPBACK_NET and address not in _ERROR_CODES
        parts = [int(p) for p in str(address).split(".")]
        return all(value in allowed for value, allowed in zip(parts, self.octets))


def _octet(text: str, spec: str) -> frozenset[int]:
    """One octet pattern: ``2``, ``[2..11]`` or ``[2;4;6..8]``."""
    if text.startswith("[") and text.endswith("]"):
        items = text[1:-1].split(";")
    elif text.isdigit():
        items = [text]
    else:
        raise ValueError(f"bad octet {text!r} in {spec!r}")
    values: set[int] = set()
    for item in items:
        low, sep, high = item.partition("..")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad octet {text!r} in {spec!r}")
        first, last = int(low), int(high) if sep else int(low)
        if not 0 <= first <= last <= 255:
            raise ValueError(f"octet range {item!r} out of 0..255 in {spec!r}")
        values.update(range(first, last + 1))
    return frozenset(values)


def parse_zone(spec: str) -> Zone:
    """Parse ``"zen.spamhaus.org=127.0.0.[2..11]*3"`` (Postfix postscreen syntax);
    ValueError says what is wrong."""
    if not isinstance(spec, str):
        raise ValueError(f"expected zone strings, got {spec!r}")
    text = spec.strip()
    weight = 1
    if "*" in text:
        text, _, weight_text = text.rpartition("*")
        try:
            weight = int(weight_text)
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} in {spec!r}") from None
    name, sep, pattern = text.partition("=")
    name = name.strip().rstrip(".").lower()
    if not name or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"bad zone name {name!r} in {spec!r}")
    octets = None
    if sep:
        pattern = pattern.strip()
        parts = re.findall(r"\[[^\]]*\]|[^.\[\]]+", pattern)
        if len(parts) != 4 or ".".join(parts) != pattern:
            raise ValueError(f"return-code filter must have 4 octets, like "
                             f"127.0.0.[2..11], in {spec!r}")
        octets = tuple(_octet(p, spec) for p in parts)
    return Zone(name, octets, weight, spec.strip())


# -- results ---------------------------------------------------------------------------

@dataclass
class Listing:
    """One zone that lists the client, with the answers that counted."""

    zone: Zone
    answers: tuple[str, ...]


@dataclass
class CheckResult:
    """The outcome of all lookups for one client."""

    address: str
    score: int = 0
    listings: list[Listing] = field(default_factory=list)
    allow_score: int = 0
    allow_listings: list[Listing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    listed: bool = False
    allowed: bool = False
    reason: str = ""        # TXT record of a listing (for the reply), if fetched


class DNSBLFilter(Filter):
    """Looks the client up in DNSBL/DNSWL zones and acts on the score."""

    name = "dnsbl"

    def __init__(self, zones: Sequence[Zone], threshold: int = 1,
                 allow_zones: Sequence[Zone] = (), allow_threshold: int = 1,
                 action: str = "reject", stage: str = "connect",
                 trusted: Sequence[IPNetwork] = (), urls: dict[str, str] | None = None,
                 tag_header: str = "X-Mailtwist-DNSBL", resolver=None,
                 dns_timeout: float = 10.0) -> None:
        self.zones = list(zones)
        self.threshold = threshold
        self.allow_zones = list(allow_zones)
        self.allow_threshold = allow_threshold
        self.action = action
        self.stage = stage
        self.trusted = tuple(trusted)
        self.urls = dict(urls or {})
        self.tag_header = tag_header
        self.resolver = resolver
        third = dns_timeout / 3
        self.timeout = (third, dns_timeout - third)

    # -- lookups ------------------------------------------------------------------

    def _lookup(self, zone: Zone, label: str) -> defer.Deferred:
        """Fires with a Listing, None (not listed) or an error text."""
        name = f"{label}.{zone.name}"
        d = self.resolver.lookupAddress(name, timeout=self.timeout)

        def answered(result) -> Listing | None:
            answers = tuple(r.payload.dottedQuad() for r in result[0] if r.type == dns.A)
            counted = tuple(a for a in answers if zone.matches(a))
            return Listing(zone, counted) if counted else None

        def failed(failure) -> Listing | str | None:
            if failure.check(dns_error.DNSNameError):
                return None
            reason = failure.getErrorMessage() or failure.type.__name__
            if failure.check(defer.TimeoutError, dns_error.DNSQueryTimeoutError):
                reason = "timed out"
            log.warn("dnsbl: lookup of {name} failed ({reason}); zone not counted",
                     name=name, reason=reason)
            return f"{zone.name}: {reason}"

        return d.addCallbacks(answered, failed)

    @defer.inlineCallbacks
    def check(self, address: IPAddress):
        """Look *address* up in every zone at once; fires with a CheckResult
        (never fails: DNS errors are recorded in ``errors`` and not counted)."""
        label = reverse_name(address)
        result = CheckResult(str(address))
        zones = [(z, False) for z in self.zones] + [(z, True) for z in self.allow_zones]
        outcomes = yield defer.gatherResults([self._lookup(z, label) for z, _ in zones])
        for (zone, allow), outcome in zip(zones, outcomes):
            if isinstance(outcome, str):
                result.errors.append(outcome)
            elif outcome is not None and allow:
                result.allow_listings.append(outcome)
                result.allow_score += zone.weight
            elif outcome is not None:
                result.listings.append(outcome)
                result.score += zone.weight
        result.allowed = bool(self.allow_zones) and result.allow_score >= self.allow_threshold
        result.listed = bool(result.listings) and result.score >= self.threshold
        if result.allowed:
            log.info("dnsbl: {ip} allow-listed by {zones}; DNSBL verdict skipped",
                     ip=result.address,
                     zones=", ".join(li.zone.name for li in result.allow_listings))
        elif result.listed:
            log.info("dnsbl: {ip} listed by {zones} (score {score}, threshold {threshold})",
                     ip=result.address, score=result.score, threshold=self.threshold,
                     zones=", ".join(f"{li.zone.name}={'/'.join(li.answers)}"
                                     for li in result.listings))
            if self.action != "tag" and not self._url(result):
                result.reason = yield self._txt(f"{label}.{result.listings[0].zone.name}")
        return result

    def _txt(self, name: str) -> defer.Deferred:
        """The TXT record of a listing (the list's explanation, often a URL), or ""."""
        d = self.resolver.lookupText(name, timeout=self.timeout)

        def answered(result) -> str:
            for record in result[0]:
                if record.type == dns.TXT:
                    text = b"".join(record.payload.data).decode("ascii", "replace")
                    return re.sub(r"[^ -~]", "?", text)[:200]
            return ""
        return d.addCallbacks(answered, lambda _failure: "")

    def _url(self, result: CheckResult) -> str:
        for listing in result.listings:
            template = self.urls.get(listing.zone.name)
            if template:
                return template.replace("{ip}", result.address)
        return ""

    def _result_for(self, session: FilterSession, address: IPAddress) -> defer.Deferred:
        """The session's CheckResult, looked up once per session."""
        state = session.state_for(self.name)
        if "result" in state:
            return defer.succeed(state["result"])
        waiter: defer.Deferred = defer.Deferred()
        if "waiters" in state:
            state["waiters"].append(waiter)
            return waiter
        state["waiters"] = [waiter]

        def done(result: CheckResult) -> None:
            state["result"] = result
            if result.allowed:
                state[DNSWL_MARK] = True
            waiters, state["waiters"] = state["waiters"], []
            for w in waiters:
                w.callback(result)

        def broken(failure) -> None:
            log.failure("dnsbl: check of {ip} failed; not counted", failure, ip=address)
            done(CheckResult(str(address), errors=[failure.getErrorMessage()]))

        self.check(address).addCallbacks(done, broken)
        return waiter

    # -- verdicts ---------------------------------------------------------------------

    def _verdict(self, result: CheckResult, stage: str):
        if result.allowed or not result.listed or self.action == "tag":
            return CONTINUE
        zones = ", ".join(li.zone.name for li in result.listings if li.zone.weight > 0)
        text = f"Service unavailable; client [{result.address}] blocked using {zones}"
        extra = self._url(result) or result.reason
        if extra:
            text += f"; {extra}"
        if self.action == "reject":
            return Reject(text, 554, "5.7.1")
        return TempFail(text, 421 if stage == "connect" else 450, "4.7.1")

    def _exempt(self, session: FilterSession) -> IPAddress | None:
        """The address to check, or None when the session is not checked."""
        address = client_ip(session)
        if address is None or in_networks(address, self.trusted):
            return None
        return address

    # -- stages -------------------------------------------------------------------------

    def connect(self, session):
        address = self._exempt(session)
        if address is None or self.stage != "connect":
            return CONTINUE
        return self._result_for(session, address).addCallback(self._verdict, "connect")

    def mail_from(self, session, sender):
        # rcpt stage: start the lookup early, for unauthenticated sessions only
        address = self._exempt(session)
        if address is not None and self.stage == "rcpt" and not session.user:
            self._result_for(session, address)
        return CONTINUE

    def rcpt_to(self, session, recipient):
        address = self._exempt(session)
        if address is None or self.stage != "rcpt" or session.user:
            return CONTINUE
        return self._result_for(session, address).addCallback(self._verdict, "rcpt")

    def data(self, session, message):
        if self.action != "tag":
            return CONTINUE
        remove = RemoveHeader(self.tag_header)
        result = session.state_for(self.name).get("result")
        if session.user or result is None or result.allowed or not result.listed:
            return Continue(remove)
        value = ", ".join(f"{li.zone.name}={'/'.join(li.answers)}" for li in result.listings)
        return Continue(remove, AddHeader(self.tag_header,
                                          f"{value} (client {result.address}, "
                                          f"score {result.score})"))


def dnswl_listed(session: FilterSession) -> bool:
    """Whether the dnsbl filter found this session's client on a DNSWL."""
    return bool(session.state_for(DNSBLFilter.name).get(DNSWL_MARK))


def make_resolver(context: Any):
    """A twisted.names resolver for the context's DNS servers (resolv.conf if none)."""
    from mailtwist.outbound.mx import parse_nameserver, system_nameservers

    reactor = getattr(context, "reactor", None)
    if reactor is None:
        from twisted.internet import reactor
    servers = [parse_nameserver(s) for s in getattr(context, "dns_servers", ())]
    return client.Resolver(servers=servers or system_nameservers(), reactor=reactor)


def _zones(key: str, specs: list[str]) -> list[Zone]:
    zones = []
    for spec in specs:
        try:
            zones.append(parse_zone(spec))
        except ValueError as e:
            raise FilterConfigError(key, str(e)) from None
    names = [z.name for z in zones]
    if len(set(names)) != len(names):
        raise FilterConfigError(key, "a zone is listed twice")
    return zones


def _build(settings: dict[str, Any], context: Any = None) -> DNSBLFilter:
    zones = _zones("zones", settings["zones"])
    allow = _zones("dnswl_zones", settings["dnswl_zones"])
    if not zones and not allow:
        raise FilterConfigError("zones", "no zones configured; add e.g. "
                                         "zones = [\"zen.spamhaus.org=127.0.0.[2..11]\"]")
    if settings["action"] not in ("reject", "tempfail", "tag"):
        raise FilterConfigError("action", f"must be reject, tempfail or tag, "
                                          f"got {settings['action']!r}")
    if settings["stage"] not in ("connect", "rcpt"):
        raise FilterConfigError("stage", f"must be connect or rcpt, got {settings['stage']!r}")
    for key in ("threshold", "dnswl_threshold"):
        if settings[key] < 1:
            raise FilterConfigError(key, "must be 1 or more")
    urls = settings["urls"]
    for zone, url in urls.items():
        if not isinstance(url, str) or any(c in url for c in "\r\n\0"):
            raise FilterConfigError("urls", f"{zone}: expected a URL string, got {url!r}")
    try:
        RemoveHeader(settings["tag_header"])
    except ValueError as e:
        raise FilterConfigError("tag_header", str(e)) from None
    try:
        resolver = make_resolver(context)
    except ValueError as e:
        raise FilterConfigError(None, f"bad DNS server in [outbound] dns_servers: {e}") \
            from None
    timeout = float(getattr(context, "dns_timeout", None) or 10.0)
    return DNSBLFilter(zones, settings["threshold"], allow, settings["dnswl_threshold"],
                       action=settings["action"], stage=settings["stage"],
                       trusted=parse_networks("trusted_networks", settings["trusted_networks"]),
                       urls={k.lower().rstrip("."): v for k, v in urls.items()},
                       tag_header=settings["tag_header"], resolver=resolver,
                       dns_timeout=timeout)


dnsbl = FilterFactory(
    "dnsbl", _build,
    description="DNSBL/DNSWL checks of the client address (reject, tempfail or tag)",
    defaults={"zones": [], "threshold": 1, "dnswl_zones": [], "dnswl_threshold": 1,
              "action": "reject", "stage": "connect", "trusted_networks": [],
              "urls": {}, "tag_header": "X-Mailtwist-DNSBL"},
)
