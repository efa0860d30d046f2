"""Connection caps and slow-client deadlines, shared by every listener.

One :class:`ConnectionLimiter` per server process counts open connections in
total, per client address and protocol family (SMTP, IMAP, POP3), and logged-in
IMAP sessions per account and client address.  ``tap.build_service`` wraps each
listener's protocol factory in a :class:`LimitedFactory`; a connection over a
cap gets the protocol's refusal line (SMTP ``421``, IMAP ``* BYE``, POP3
``-ERR``) at once and is closed, without ever reaching the protocol.

The numbers follow Postfix and Dovecot (docs/security.md):
``max_connections_per_ip`` is Postfix's ``smtpd_client_connection_count_limit``
(50), ``max_sessions_per_user_ip`` Dovecot's ``mail_max_userip_connections``
(10).  IPv6 clients are counted per /64, the block one host usually controls.

:func:`extend_timeout` is the other half of the slow-client defence: the
protocols reset their idle timer only when a whole command has arrived, and
give the bytes of a transfer (SMTP DATA, IMAP literals) credit of one second
per ``min_data_rate`` bytes, the way Postfix's ``smtpd_min_data_rate`` extends
its per-request deadline.  A client trickling a byte a minute is thus cut once
the idle timeout has passed since its last complete command.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

from mailtwist.wrapping import WrappingFactory

log = Logger()

FAMILIES = {
    "smtp": "smtp", "submission": "smtp", "submissions": "smtp",
    "imap": "imap", "imaps": "imap",
    "pop3": "pop3", "pop3s": "pop3",
}
"""Listener role -> the protocol family whose per-address cap it shares."""

FD_RESERVE = 128
"""File descriptors kept free for the stores, logs, threads and the listeners."""


def client_key(host: str) -> str:
    """The address a per-client cap counts: the host itself, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def parse_networks(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDR strings -> networks; ValueError names the bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an address or network such as "
                             f"\"192.0.2.0/24\" or \"2001:db8::/32\"") from None
    return networks


class ConnectionLimiter:
    """Counts connections and logged-in sessions of one server process.

    *max_connections* caps all listeners together, *max_per_ip* the
    connections from one client address per protocol family, *max_user_ip*
    the logged-in sessions of one account from one address.  Addresses in
    *trusted* networks are exempt from the per-address caps, not the total.
    """

    def __init__(self, max_connections: int = 5000, max_per_ip: int = 50,
                 max_user_ip: int = 10, trusted: Iterable[str] = ()) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.max_user_ip = max_user_ip
        self.trusted = parse_networks(trusted)
        self.total = 0
        self.per_ip: dict[tuple[str, str], int] = {}
        self.per_user_ip: dict[tuple[str, str, str], int] = {}

    @classmethod
    def from_config(cls, config: Any) -> ConnectionLimiter:
        limits = config.limits
        return cls(limits.max_connections, limits.max_connections_per_ip,
                   limits.max_sessions_per_user_ip, limits.trusted_networks)

    def is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def open(self, family: str, host: str) -> tuple[str | None, Callable[[], None] | None]:
        """Count a new connection: ``(None, release)`` if it may stay, else
        ``(reason, None)`` with reason "total" or "address"."""
        if self.total >= self.max_connections:
            return "total", None
        key = (family, client_key(host))
        counted = not self.is_trusted(host)
        if counted and self.per_ip.get(key, 0) >= self.max_per_ip:
            return "address", None
        self.total += 1
        if counted:
            self.per_ip[key] = self.per_ip.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            if counted:
                _decrement(self.per_ip, key)

        return None, release

    def open_session(self, family: str, user: str, host: str) -> Callable[[], None] | None:
        """Count a logged-in session of *user* from *host*; None when over the cap."""
        if self.is_trusted(host):
            return lambda: None
        key = (family, user.lower(), client_key(host))
        if self.per_user_ip.get(key, 0) >= self.max_user_ip:
            return None
        self.per_user_ip[key] = self.per_user_ip.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                _decrement(self.per_user_ip, key)

        return release


def _decrement(counts: dict, key: Any) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def refusal(family: str, hostname: str, host: str, reason: str) -> bytes:
    """The line a connection over a cap gets before it is closed."""
    if family == "smtp":
        text = (f"too many connections from {host}" if reason == "address"
                else "too many connections, try again later")
        return f"421 4.7.0 {hostname} Error: {text}\r\n".encode("utf-8", "replace")
    if family == "imap":
        text = (f"Too many connections from {host}." if reason == "address"
                else "Too many connections, try again later.")
        return f"* BYE [UNAVAILABLE] {text}\r\n".encode("utf-8", "replace")
    text = (f"Too many connections from {host}." if reason == "address"
            else "Too many connections, try again later.")
    return f"-ERR [SYS/TEMP] {text}\r\n".encode("utf-8", "replace")


class Refusal(protocol.Protocol):
    """Says why the connection is refused, then closes it; ignores input."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class LimitedFactory(WrappingFactory):
    """Wraps a listener's protocol factory with the limiter's connection caps.

    A connection within the caps gets the wrapped factory's protocol, whose
    ``connectionLost`` then releases its count; others get :class:`Refusal`.
    Every other attribute is the wrapped factory's.
    """

    def __init__(self, wrapped: protocol.Factory, limiter: ConnectionLimiter, role: str,
                 hostname: str) -> None:
        super().__init__(wrapped)
        self.limiter = limiter
        self.family = FAMILIES.get(role, role)
        self.hostname = hostname
        self.refused = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        host = str(getattr(addr, "host", addr))
        reason, release = self.limiter.open(self.family, host)
        if reason is not None:
            self.refused += 1
            log.info("{family} connection from {host} refused: too many connections "
                     "({reason})", family=self.family, host=host,
                     reason="from this address" if reason == "address" else "in total")
            refused = Refusal(refusal(self.family, self.hostname, host, reason))
            refused.factory = self
            return refused
        try:
            proto = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            release()
            raise
        if proto is None:
            release()
            return None
        _release_on_close(proto, release)
        _no_delay_on_connect(proto)
        return proto


def _no_delay_on_connect(proto: protocol.Protocol) -> None:
    """Turn Nagle's algorithm off for *proto*'s TCP connection when it is made.

    Our replies are often written in more than one reactor turn (untagged IMAP
    responses, then the tagged one after a thread-pool job); with Nagle on,
    the second segment waits for the client's delayed ACK (40 ms on Linux) and
    a client doing one command at a time gets ~25 commands/s. Dovecot and
    Postfix avoid the same stall with TCP_NODELAY/TCP_CORK.
    """
    made = proto.makeConnection

    def make_connection(transport: Any) -> None:
        set_no_delay(transport)
        made(transport)

    proto.makeConnection = make_connection  # type: ignore[method-assign]


def set_no_delay(transport: Any) -> bool:
    """TCP_NODELAY on the TCP connection under *transport* (through TLS wrappers)."""
    for _ in range(4):
        if transport is None:
            return False
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
                return True
            except OSError:
                return False
        transport = getattr(transport, "transport", None)
    return False


def _release_on_close(proto: protocol.Protocol, release: Callable[[], None]) -> None:
    """Make *proto*'s connectionLost call *release* afterwards (even if it raises)."""
    lost = proto.connectionLost

    def connection_lost(reason: Any = protocol.connectionDone) -> None:
        try:
            lost(reason)
        finally:
            release()

    proto.connectionLost = connection_lost  # type: ignore[method-assign]


def extend_timeout(proto: Any, seconds: float) -> None:
    """Push *proto*'s running ``TimeoutMixin`` timer *seconds* further out.

    Used for the bytes of a transfer (SMTP DATA, IMAP literals): credit in
    proportion to the data received, instead of a full reset per read that
    would let a client trickle forever.  Nothing happens when no timer runs.
    """
    call = getattr(proto, "_TimeoutMixin__timeoutCall", None)
    if seconds > 0 and call is not None and call.active():
        call.delay(seconds)


def ensure_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards *wanted* (at most the hard limit) and
    return the number of connections the result leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as e:
                log.warn("cannot raise the open-file limit to {target}: {error}",
                         target=target, error=e)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))
