"""Issue 6 item 17: one server process holds 1,000 idle SMTP and 1,000 idle IMAP
connections and still serves a new client (docs/security.md).

The clients are Twisted protocols in the test's own reactor, so the process
needs about 4,200 file descriptors: the soft RLIMIT_NOFILE is raised towards
the hard limit, and the test is skipped when the hard limit is too low.
"""

from __future__ import annotations

import imaplib
import resource
import smtplib

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.support import DOMAIN, PASSWORD, ServerMixin

IDLE = 1000
BATCH = 40
FDS_NEEDED = 4 * IDLE + 300  # client and server end of each, plus the server's files


class Greeted(protocol.Protocol):
    """A client that waits for the server's first line, then stays silent."""

    def __init__(self) -> None:
        self.greeting: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n" in self.received and not self.greeting.called:
            self.greeting.callback(self.received)

    def connectionLost(self, reason) -> None:
        if not self.greeting.called:
            self.greeting.errback(reason)
        self.closed.callback(None)


class GreetedFactory(protocol.ClientFactory):
    """Connects one Greeted client; its Deferreds fail if connecting fails."""

    def __init__(self) -> None:
        self.client = Greeted()

    def buildProtocol(self, addr) -> Greeted:
        return self.client

    def clientConnectionFailed(self, connector, reason) -> None:
        self.client.greeting.errback(reason)
        self.client.closed.callback(None)


def raise_fd_limit(testcase: unittest.TestCase, needed: int) -> None:
    """Raise the soft open-file limit to the hard limit (restored afterwards), or
    skip the test when even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise unittest.SkipTest(f"needs {needed} open files; the hard RLIMIT_NOFILE "
                                    f"is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        testcase.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


def rss_kib() -> int:
    """Resident set size of this process (server and test clients), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class IdleConnectionTests(ServerMixin, unittest.TestCase):
    """1,000 idle SMTP and 1,000 idle IMAP connections on one server process."""

    timeout = 300

    @defer.inlineCallbacks
    def test_thousand_idle_smtp_and_imap_connections(self) -> None:
        """Guards capacity: 1,000 idle SMTP and 1,000 idle IMAP clients all get their
        greeting and stay connected, and a new client is still served."""
        raise_fd_limit(self, FDS_NEEDED)
        before = rss_kib()
        yield self.start_server(allow_plaintext_auth=True,
                                limits={"max_connections_per_ip": 2 * IDLE + 10})
        clients: list[Greeted] = []
        self.addCleanup(self.close_all, clients)
        results = []
        for role in ("smtp", "imap"):
            port = self.port(role)
            for _ in range(IDLE // BATCH):
                # A batch at a time, within the listen backlog (50): connections
                # the kernel cannot queue would wait for a greeting forever.
                batch = []
                for _ in range(BATCH):
                    factory = GreetedFactory()
                    clients.append(factory.client)
                    batch.append(factory.client.greeting.addTimeout(60, reactor))
                    reactor.connectTCP("127.0.0.1", port, factory, timeout=60)
                results += yield defer.gatherResults(batch, consumeErrors=True)
        smtp, imap = results[:IDLE], results[IDLE:]
        self.assertEqual(sum(g.startswith(b"220 mx.example.test ESMTP") for g in smtp), IDLE)
        self.assertEqual(sum(g.startswith(b"* OK [CAPABILITY IMAP4rev1") for g in imap), IDLE)
        self.assertGreaterEqual(self.server.limiter.total, 2 * IDLE)
        self.assertFalse(any(c.closed.called for c in clients))

        def served() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=30) as client:
                code, _ = client.ehlo("new.example")
            imap = imaplib.IMAP4("127.0.0.1", self.port("imap"), timeout=30)
            try:
                _, data = imap.login(f"alice@{DOMAIN}", PASSWORD)
            finally:
                imap.logout()
            return code, data[0]

        code, logged_in = yield self.in_thread(served)
        self.assertEqual(code, 250)
        self.assertIn(b"Logged in", logged_in)
        print(f"\nRSS with {IDLE} idle SMTP + {IDLE} idle IMAP connections (server and "
              f"clients in one process): {rss_kib() // 1024} MiB "
              f"(was {before // 1024} MiB)")

    @defer.inlineCallbacks
    def close_all(self, clients: list[Greeted]) -> None:
        """Disconnect every client and wait until the server saw each close."""
        for client in clients:
            if client.transport is not None and not client.closed.called:
                client.transport.loseConnection()
        yield defer.gatherResults([c.closed for c in clients], consumeErrors=True)
        for _ in range(500):
            if self.server.limiter.total == 0:
                break
            yield deferLater(reactor, 0.01, lambda: None)
