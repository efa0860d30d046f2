"""Where mail for a domain goes: MX records via twisted.names (RFC 5321 5.1).

MX hosts in preference order, equal preferences shuffled; no MX record means
the domain itself (implicit MX, A/AAAA); a null MX (RFC 7505) means the
domain takes no mail at all.  The resolver is injected, so tests ask a DNS
server on loopback.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure

MAX_MX_ADDRESSES = 10


class RoutingError(Exception):
    """No usable host; *permanent* tells whether retrying can help."""

    def __init__(self, text: str, enhanced: str, permanent: bool, code: int | None = None):
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced
        self.permanent = permanent
        self.code = code


@dataclass(frozen=True)
class Target:
    """One address to connect to, and the host name it belongs to."""

    host: str
    address: str

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


def _is_nxdomain(failure: Failure) -> bool:
    return failure.check(dns_error.DNSNameError) is not None


def _temporary(domain: str, what: str, failure: Failure) -> RoutingError:
    reason = failure.getErrorMessage() or failure.type.__name__
    if failure.check(defer.TimeoutError, dns_error.DNSQueryTimeoutError):
        reason = "timed out"
    return RoutingError(f"DNS lookup of {what} for {domain} failed: {reason}", "4.4.3",
                        permanent=False)


def _name(value: object) -> str:
    return str(value).rstrip(".").lower()


class MXResolver:
    """Turns a domain into the addresses to try, in order."""

    def __init__(self, resolver, ipv6: bool = True, timeout: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.ipv6 = ipv6
        self.timeout = (max(1, int(timeout // 3)), max(1, int(timeout - timeout // 3)))
        self.rng = rng or random.Random()

    async def mx_hosts(self, domain: str) -> list[str]:
        """MX host names in the order to try; RoutingError for none or a null MX."""
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(domain, timeout=self.timeout)
        except Exception:
            failure = Failure()
            if _is_nxdomain(failure):
                raise RoutingError(f"Host or domain name not found: {domain} does not exist",
                                   "5.1.2", permanent=True) from None
            raise _temporary(domain, "MX", failure) from None
        records = [(a.payload.preference, _name(a.payload.name))
                   for a in answers if a.type == dns.MX]
        if not records:
            return [domain]
        real = [(pref, name) for pref, name in records if name not in ("", ".")]
        if not real:
            raise RoutingError(f"domain {domain} does not accept mail (null MX)", "5.1.10",
                               permanent=True, code=556)
        by_preference: dict[int, list[str]] = {}
        for pref, name in real:
            by_preference.setdefault(pref, []).append(name)
        hosts = []
        for pref in sorted(by_preference):
            group = by_preference[pref]
            self.rng.shuffle(group)
            hosts += [name for name in group if name not in hosts]
        return hosts

    async def addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of *host*; RoutingError(temporary) if a lookup failed
        and nothing was found."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return [str(literal)]
        lookups = [self.resolver.lookupAddress(host, timeout=self.timeout)]
        if self.ipv6:
            lookups.insert(0, self.resolver.lookupIPV6Address(host, timeout=self.timeout))
        results = await defer.DeferredList(lookups, consumeErrors=True)
        found: list[str] = []
        problem: Failure | None = None
        for ok, value in results:
            if not ok:
                if not _is_nxdomain(value):
                    problem = value
                continue
            for answer in value[0]:
                if answer.type == dns.AAAA:
                    found.append(socket.inet_ntop(socket.AF_INET6, answer.payload.address))
                elif answer.type == dns.A:
                    found.append(answer.payload.dottedQuad())
        if not found and problem is not None:
            raise _temporary(host, "addresses", problem)
        return found

    async def targets(self, domain: str) -> list[Target]:
        """Every address to try for *domain*, best first; RoutingError if none."""
        hosts = await self.mx_hosts(domain)
        targets: list[Target] = []
        temporary: RoutingError | None = None
        for host in hosts:
            try:
                addresses = await self.addresses(host)
            except RoutingError as e:
                temporary = e
                continue
            targets += [Target(host, a) for a in addresses]
            if len(targets) >= MAX_MX_ADDRESSES:
                break
        if targets:
            return targets[:MAX_MX_ADDRESSES]
        if temporary is not None:
            raise temporary
        raise RoutingError(f"no address found for the mail hosts of {domain} "
                           f"({', '.join(hosts)})", "5.4.4", permanent=True)


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers of resolv.conf (read once, at start-up); 127.0.0.1 if none."""
    servers = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                servers.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
            except ValueError:
                continue
    return servers or [("127.0.0.1", 53)]


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"[::1]:5353"`` → (address, port)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    address = ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return str(address), port
