"""Helpers for the IMAP tests: clients on the real server, a raw line client."""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
from typing import ClassVar

from imapclient import IMAPClient
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.support import DOMAIN, PASSWORD, ServerMixin, client_tls_context

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def message(subject: str, body: str = "Hello.\r\n", sender: str = f"carol@{DOMAIN}") -> bytes:
    return (f"From: Carol <{sender}>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash(subject))}@{DOMAIN}>\r\n\r\n{body}").encode()


class RawIMAP:
    """A line-level IMAP client on a plain socket (optionally upgraded to TLS)."""

    def __init__(self, port: int, tls: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            sock = client_tls_context().wrap_socket(sock)
        self.sock = sock
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def until(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged response for *tag* (literals kept inline)."""
        lines = []
        while True:
            line = self.line()
            literal = re.search(rb"\{(\d+)\}$", line)
            while literal:
                size = int(literal.group(1))
                while len(self.buffer) < size:
                    self.buffer += self.sock.recv(65536)
                line += b"\r\n" + self.buffer[:size]
                self.buffer = self.buffer[size:]
                more = self.line()
                line += more
                literal = re.search(rb"\{(\d+)\}$", more)
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def starttls(self) -> None:
        assert self.command(b"tls", b"STARTTLS")[-1].startswith(b"tls OK")
        self.sock = client_tls_context().wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()


class IMAPTestCase(ServerMixin, unittest.TestCase):
    """Starts the server; the helpers below block, so call them in a thread."""

    server_options: ClassVar[dict] = {}

    def setUp(self):
        self.clients: list = []
        d = self.start_server(**self.server_options)
        d.addCallback(lambda _: self.addCleanup(self._close_clients))
        return d

    @defer.inlineCallbacks
    def _close_clients(self):
        """Close what the test left open and wait until the server saw it go."""
        def close_all():
            for client in self.clients:
                sock = getattr(client, "sock", None)
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                except OSError:
                    pass
        yield self.in_thread(close_all)
        factories = [getattr(listener.factory, "wrappedFactory", listener.factory)
                     for role in ("imap", "imaps") for listener in self.server.listeners[role]]
        for _ in range(100):
            if not any(factory.sessions for factory in factories):
                break
            yield deferLater(reactor, 0.05, lambda: None)

    def imap(self, user: str = ALICE, tls: str = "starttls") -> imaplib.IMAP4:
        if tls == "implicit":
            client = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                                       ssl_context=client_tls_context())
        else:
            client = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            if tls == "starttls":
                client.starttls(client_tls_context())
        self.clients.append(client)
        client.login(user, PASSWORD)
        return client

    def imapclient(self, user: str = ALICE) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.port("imaps"), ssl=True,
                            ssl_context=client_tls_context(), timeout=15)
        self.clients.append(client._imap)
        client.login(user, PASSWORD)
        return client

    def raw(self, tls: bool = True, login: bool = True) -> RawIMAP:
        raw = RawIMAP(self.port("imaps" if tls else "imap"), tls=tls)
        self.clients.append(raw)
        if login:
            lines = raw.command(b"l", b'LOGIN "%s" "%s"' % (ALICE.encode(), PASSWORD.encode()))
            assert lines[-1].startswith(b"l OK"), lines
        return raw

    def deliver(self, raw: bytes, account: str = ALICE, folder: str = "INBOX",
                flags: str = "", mtime: float | None = None) -> str:
        """Put a message straight into the Maildir, as delivery does."""
        return self.server.store.maildir(account).deliver(raw, folder, flags, mtime)


def ok(result: tuple) -> list:
    typ, data = result
    assert typ == "OK", result
    return data


__all__ = ["ALICE", "BOB", "PASSWORD", "IMAPTestCase", "RawIMAP", "message", "ok", "ssl"]
