"""Test network on loopback: a DNS server with in-memory zones, a scriptable
SMTP receiver, and a helper that starts a whole mailtwist on a given address.

Remote "hosts" are other loopback addresses (127.0.0.2, 127.0.0.3, ...), all
listening on one port number, which the sending mailtwist is configured to
use for outbound SMTP.
"""

from __future__ import annotations

import base64
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, server
from twisted.python.failure import Failure

from mailtwist.config import ROLES, load_config
from mailtwist.tap import build_service

PASSWORD = "correct horse battery staple"


class MemoryAuthority(common.ResolverBase):
    """Answers from a dict of name -> records; unknown names are NXDOMAIN,
    names in :attr:`broken` fail with SERVFAIL."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list] = defaultdict(list)
        self.broken: set[str] = set()
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name, cls, type, timeout):
        key = (name.decode() if isinstance(name, bytes) else str(name)).rstrip(".").lower()
        self.queries.append((key, type))
        if key in self.broken:
            return defer.fail(RuntimeError(f"broken name {key}"))
        if key not in self.records:
            return defer.fail(Failure(dns.AuthoritativeDomainError(key)))
        answers = [dns.RRHeader(key, record.TYPE, dns.IN, 60, record, auth=True)
                   for record in self.records[key]
                   if type in (record.TYPE, dns.ALL_RECORDS)]
        return defer.succeed((answers, [], []))


class TestDNSServer:
    """A DNS server on 127.0.0.1 (UDP and TCP on one port)."""

    def __init__(self) -> None:
        self.authority = MemoryAuthority()
        self.port = 0
        self._ports: list = []

    def add(self, name: str, record) -> None:
        self.authority.records[name.lower()].append(record)

    def mx(self, domain: str, preference: int, host: str) -> None:
        self.add(domain, dns.Record_MX(preference, host.encode()))

    def null_mx(self, domain: str) -> None:
        self.add(domain, dns.Record_MX(0, b""))

    def a(self, host: str, address: str) -> None:
        self.add(host, dns.Record_A(address))

    def aaaa(self, host: str, address: str) -> None:
        self.add(host, dns.Record_AAAA(address))

    def txt(self, name: str, value: str) -> None:
        data = value.encode()
        self.add(name, dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)]))

    def start(self) -> int:
        factory = server.DNSServerFactory(authorities=[self.authority])
        factory.noisy = False
        for _ in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.port = port
            return port
        raise RuntimeError("no free port for the test DNS server")

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Received:
    """One transaction a scripted server accepted (or saw)."""

    mail: str
    rcpts: list[str]
    data: bytes | None = None
    tls: bool = False


@dataclass
class Script:
    """What a :class:`ScriptedSMTP` answers; replies are full lines like
    ``"451 4.3.0 try later"``.  Lists of replies are used up one per use,
    then the default applies."""

    greeting: str | None = "220 scripted.test ESMTP"
    extensions: list[str] = field(default_factory=lambda: ["PIPELINING", "8BITMIME",
                                                           "ENHANCEDSTATUSCODES"])
    mail: list[str] = field(default_factory=list)
    rcpt: dict[str, list[str]] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    auth: tuple[str, str] | None = None
    tls_context: object = None


class ScriptedSMTPProtocol(protocol.Protocol):
    """A tiny SMTP server that answers as its script says and records what it got."""

    def __init__(self, factory: ScriptedSMTPFactory) -> None:
        self.factory = factory
        self.script = factory.script
        self.buffer = b""
        self.txn: Received | None = None
        self.in_data = False
        self.data = b""
        self.tls = False
        self.authenticated = False

    def connectionMade(self) -> None:
        self.factory.connections += 1
        if self.script.greeting is not None:
            self.line(self.script.greeting)

    def line(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0 and not self.buffer.startswith(b".\r\n"):
                    return
                if self.buffer.startswith(b".\r\n"):
                    content, self.buffer = b"", self.buffer[3:]
                else:
                    content, self.buffer = self.buffer[: end + 2], self.buffer[end + 5:]
                self.in_data = False
                self.end_of_data(content)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end].decode(), self.buffer[end + 2:]
            self.factory.commands.append(line)
            self.command(line)
            if self.transport is None or self.transport.disconnecting:
                return

    def _next(self, replies: list[str], default: str) -> str:
        return replies.pop(0) if replies else default

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            ext = list(self.script.extensions)
            if self.script.tls_context is not None and not self.tls:
                ext.append("STARTTLS")
            if self.script.auth is not None:
                ext.append("AUTH PLAIN")
            lines = ["scripted.test", *ext]
            for text in lines[:-1]:
                self.line("250-" + text)
            self.line("250 " + lines[-1])
        elif verb == "HELO":
            self.line("250 scripted.test")
        elif verb == "STARTTLS":
            self.line("220 2.0.0 go ahead")
            self.buffer = b""
            self.transport.startTLS(self.script.tls_context)
            self.tls = True
        elif verb == "AUTH":
            user, password = self.script.auth
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            if line.split(" ")[1:] == ["PLAIN", token]:
                self.authenticated = True
                self.line("235 2.7.0 ok")
            else:
                self.line("535 5.7.8 bad credentials")
        elif verb == "MAIL":
            if self.script.auth is not None and not self.authenticated:
                self.line("530 5.7.0 authentication required")
                return
            reply = self._next(self.script.mail, "250 2.1.0 ok")
            if reply.startswith("250"):
                self.txn = Received(line, [], tls=self.tls)
            self.line(reply)
        elif verb == "RCPT":
            if self.txn is None:
                self.line("503 5.5.1 need MAIL")
                return
            address = line.split("<", 1)[1].split(">", 1)[0]
            reply = self._next(self.script.rcpt.get(address, []), "250 2.1.5 ok")
            if reply.startswith("250"):
                self.txn.rcpts.append(line)
            self.line(reply)
        elif verb == "DATA":
            if self.txn is None or not self.txn.rcpts:
                self.line("554 5.5.1 no valid recipients")
                return
            self.in_data = True
            self.line("354 go ahead")
        elif verb == "RSET":
            self.txn = None
            self.line("250 2.0.0 ok")
        elif verb == "QUIT":
            self.line("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.line("502 5.5.2 unknown command")

    def end_of_data(self, content: bytes) -> None:
        txn, self.txn = self.txn, None
        reply = self._next(self.script.data, "250 2.0.0 accepted")
        if reply.startswith("250") and txn is not None:
            txn.data = content
            self.factory.received.append(txn)
        self.line(reply)


class ScriptedSMTPFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0

    def buildProtocol(self, addr) -> ScriptedSMTPProtocol:
        return ScriptedSMTPProtocol(self)


def listen_scripted(testcase, address: str, port: int,
                    script: Script | None = None) -> ScriptedSMTPFactory:
    """A scripted SMTP server on *address*:*port*, stopped at the end of the test."""
    factory = ScriptedSMTPFactory(script)
    listening = reactor.listenTCP(port, factory, interface=address)
    testcase.addCleanup(listening.stopListening)
    return factory


def free_port(address: str = "127.0.0.2") -> int:
    """A port number that is free now on *address* (and very likely on its neighbours)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@defer.inlineCallbacks
def start_mailtwist(testcase, *, domain: str, hostname: str, accounts=("alice", "bob"),
                    smtp: str | None = None, data_dir: Path | None = None,
                    served=("smtp", "submission", "submissions", "pop3"), **overrides):
    """Start a mailtwist for *domain*; return its service.  *smtp* is the endpoint of
    its port-25 listener (default: 127.0.0.1, port 0)."""
    if data_dir is None:
        data_dir = Path(testcase.mktemp()).resolve()
    fresh = not data_dir.exists()
    settings = {
        "data_dir": str(data_dir),
        "hostname": hostname,
        "bcrypt_rounds": 4,
        "listen": {role: ["tcp:0:interface=127.0.0.1"] if role in served else "none"
                   for role in ROLES},
        "auth": {"failure_delay": 0},
    }
    if smtp is not None:
        settings["listen"]["smtp"] = [smtp]
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    if fresh:
        data_dir.mkdir(parents=True)
        (data_dir / "domains").write_text(f"{domain}\n")
    config = load_config(None, settings)
    service = build_service(config, reactor)
    if fresh:
        for name in accounts:
            service.directory.add_account(f"{name}@{domain}", PASSWORD)
    service.startService()
    testcase.addCleanup(_stop, service)
    for listeners in service.listeners.values():
        for listener in listeners:
            yield listener.listening
    return service


def _stop(service) -> defer.Deferred | None:
    if service.running:
        return service.stopService()
    return None


def maildir_messages(service, account: str) -> list[bytes]:
    """Contents of the messages in *account*'s INBOX (new and cur), oldest first."""
    base = service.store.path_for(account)
    paths = sorted((p for sub in ("new", "cur") if (base / sub).is_dir()
                    for p in (base / sub).iterdir()), key=lambda p: p.name)
    return [p.read_bytes() for p in paths]


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Let the reactor run until *predicate()* is true; fail after *timeout* seconds."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield deferLater(reactor, interval, lambda: None)
        waited += interval
