"""Delivery of queued mail for one domain: route (MX or smarthost), connect, talk.

:meth:`OutboundTransport.deliver` tries the route's addresses in order until one
host has settled every recipient, and returns an :class:`Outcome` for each
recipient: delivered, failed, or still pending with the last error.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailtwist.outbound.client import (
    ClientProtocol,
    HostError,
    OutgoingMessage,
    Outcome,
    Session,
    SessionSettings,
    _describe,
)
from mailtwist.outbound.mx import MXResolver, RoutingError, Target
from mailtwist.queue.envelope import FAILED, PENDING

log = Logger()


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """TLS without certificate checks (SMTP's usual "may"/"encrypt"), with SNI."""

    def __init__(self, context: SSL.Context, hostname: str = "") -> None:
        self._context = context
        self._hostname = hostname

    @classmethod
    def factory(cls):
        """A function hostname -> creator sharing one OpenSSL context."""
        context = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()
        return lambda hostname: cls(context, hostname)

    def clientConnectionForTLS(self, tlsProtocol):  # noqa: N802 - Twisted interface
        connection = SSL.Connection(self._context, None)
        try:
            ipaddress.ip_address(self._hostname)
        except ValueError:
            if self._hostname:
                connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_app_data(tlsProtocol)
        return connection


@dataclass
class Relay:
    """A smarthost: where to send, how to secure it, how to log in."""

    host: str
    port: int = 587
    tls: str = "starttls"
    username: str | None = None
    password: str | None = None
    domains: tuple[str, ...] = ()

    def handles(self, domain: str) -> bool:
        return not self.domains or domain.lower() in self.domains


class OutboundTransport:
    """Sends mail for one domain at a time; tracks its connections so they can
    be dropped when the service stops."""

    def __init__(self, *, reactor, mx: MXResolver, helo_name: str, port: int = 25,
                 tls_mode: str = "may", verify_creator=None, relay: Relay | None = None,
                 connect_timeout: float = 30.0, command_timeout: float = 300.0,
                 data_timeout: float = 600.0) -> None:
        self.reactor = reactor
        self.mx = mx
        self.helo_name = helo_name
        self.port = port
        self.tls_mode = tls_mode
        self.verify_creator = verify_creator
        self.relay = relay
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self._opportunistic = OpportunisticTLS.factory()
        self._connections: set[ClientProtocol] = set()
        self.closing = False

    def abort_all(self) -> None:
        """Drop every open connection and open no new one until :attr:`closing` is
        reset (service stop); the attempts under way end as temporary failures."""
        self.closing = True
        for proto in list(self._connections):
            if proto.transport is not None:
                proto.transport.abortConnection()

    def _creator(self, mode: str):
        if mode == "verify":
            return self.verify_creator
        return self._opportunistic

    async def _route(self, domain: str) -> tuple[list[Target], int, SessionSettings]:
        relay = self.relay
        if relay is not None and relay.handles(domain):
            addresses = await self.mx.addresses(relay.host)
            if not addresses:
                raise RoutingError(f"relay host {relay.host} has no address", "4.4.4",
                                   permanent=False)
            implicit = relay.tls == "implicit"
            mode = {"starttls": "encrypt", "implicit": "encrypt", "none": "none",
                    "verify": "verify"}[relay.tls]
            auth = (relay.username, relay.password or "") if relay.username else None
            settings = SessionSettings(self.helo_name, mode, self._creator(mode), implicit,
                                       auth, self.command_timeout, self.data_timeout)
            return [Target(relay.host, a) for a in addresses], relay.port, settings
        settings = SessionSettings(self.helo_name, self.tls_mode, self._creator(self.tls_mode),
                                   False, None, self.command_timeout, self.data_timeout)
        return await self.mx.targets(domain), self.port, settings

    async def deliver(self, domain: str, messages: list[OutgoingMessage]) -> dict[str, Outcome]:
        """An outcome for every recipient of *messages* (all of *domain*)."""
        results: dict[str, Outcome] = {}
        everyone = [r for m in messages for r in m.recipients]
        try:
            targets, port, settings = await self._route(domain)
        except RoutingError as e:
            status = FAILED if e.permanent else PENDING
            return {r.address: Outcome(status, e.code, e.enhanced, e.text) for r in everyone}
        last: Outcome | None = None
        for target in targets:
            remaining = [m for m in (_unsettled(m, results) for m in messages) if m.recipients]
            if not remaining or self.closing:
                break
            try:
                proto = await self._connect(target, port, settings)
            except Exception as e:
                text = f"connect to {target.host}[{target.address}]:{port}: {_describe(e)}"
                log.info("{text}", text=text)
                last = Outcome(PENDING, None, "4.4.1", text, target.host)
                continue
            session = Session(proto, target.host, settings)
            self._connections.add(proto)
            try:
                await session.run(remaining)
            except HostError as e:
                log.info("{host}[{addr}]: {text}", host=target.host, addr=target.address,
                         text=e.text)
                code = e.reply.code if e.reply is not None else None
                last = Outcome(FAILED if e.permanent else PENDING, code, e.enhanced,
                               str(e.reply) if e.reply is not None else e.text, target.host)
                if e.permanent:
                    results.update(session.results)
                    break
            finally:
                self._connections.discard(proto)
                proto.close()
                results.update(session.results)
        if last is None:
            last = Outcome(PENDING, None, "4.4.1", f"no host for {domain} could be reached")
        for r in everyone:
            results.setdefault(r.address, last)
        return results

    async def _connect(self, target: Target, port: int, settings: SessionSettings):
        kind = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
        endpoint = kind(self.reactor, target.address, port, timeout=self.connect_timeout)
        if settings.implicit_tls:
            endpoint = wrapClientTLS(settings.tls_creator(target.host), endpoint)
        proto = ClientProtocol(self.reactor)
        d = connectProtocol(endpoint, proto)
        d.addTimeout(self.connect_timeout + 1, self.reactor)
        return await d


def _unsettled(message: OutgoingMessage, results: dict[str, Outcome]) -> OutgoingMessage:
    return OutgoingMessage(message.sender,
                           [r for r in message.recipients if r.address not in results],
                           message.message, message.ret, message.envid, message.payload)
