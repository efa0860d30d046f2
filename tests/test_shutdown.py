"""Graceful shutdown: stop listening first, let an SMTP transaction in flight
finish within shutdown_timeout, cut off what does not, and close idle sessions
with 421 / BYE / -ERR."""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.trial import unittest

from .support import DOMAIN, ServerMixin

ALICE = f"alice@{DOMAIN}"


class SMTPClient:
    """A blocking line-by-line SMTP client on a raw socket (call it in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")

    def reply(self) -> bytes:
        """One whole reply (the last line of a multi-line one)."""
        while True:
            line = self.file.readline()
            if not line or line[3:4] != b"-":
                return line

    def expect(self, code: bytes) -> bytes:
        line = self.reply()
        if not line.startswith(code):
            raise AssertionError(f"expected {code!r}, got {line!r}")
        return line

    def command(self, line: bytes, code: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def begin_data(self) -> None:
        """EHLO, MAIL, RCPT, DATA and the first half of a message."""
        self.command(b"EHLO client.example", b"250")
        self.command(b"MAIL FROM:<sender@example.org>", b"250")
        self.command(f"RCPT TO:<{ALICE}>".encode(), b"250")
        self.command(b"DATA", b"354")
        self.sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")

    def rest(self) -> bytes:
        """Whatever the server sends until it closes the connection."""
        data = bytearray()
        while chunk := self.file.read1(4096):
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_refused(port: int) -> None:
    """Return once 127.0.0.1:*port* refuses connections (the listener stopped)."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts connections")


class ShutdownTests(ServerMixin, unittest.TestCase):
    def setUp(self):
        return self.start_server()

    def client(self, role: str = "smtp") -> SMTPClient:
        client = SMTPClient(self.port(role))
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def wait_for_drain(self, clock: task.Clock):
        """Until the shutdown waits on *clock* (listeners are closed by then)."""
        for _ in range(200):
            if clock.getDelayedCalls():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("the shutdown never started waiting")

    @defer.inlineCallbacks
    def test_transfer_in_flight_finishes(self):
        """A client mid-DATA when the server stops finishes, gets 250, then 421,
        and its message is on disk; new connections are refused meanwhile."""
        port = self.port("smtp")
        client = yield self.in_thread(self.client)
        yield self.in_thread(client.begin_data)
        stopped = stop(self.server)
        yield self.in_thread(wait_refused, port)
        self.assertFalse(stopped.fired)

        def finish() -> tuple[bytes, bytes]:
            client.sock.sendall(b"second half\r\n.\r\n")
            return client.reply(), client.rest()
        done, after = yield self.in_thread(finish)
        self.assertTrue(done.startswith(b"250 2.0.0"), done)
        self.assertTrue(after.startswith(b"421 4.3.2 "), after)
        yield stopped
        files = self.maildir_files(ALICE)
        self.assertEqual(len(files), 1)
        self.assertIn(b"first half\nsecond half\n", files[0].read_bytes())

    @defer.inlineCallbacks
    def test_transfer_cut_after_the_bound(self):
        """A client that does not finish within shutdown_timeout gets 421 and no 250;
        nothing is stored."""
        clock = self.server.shutdown_clock = task.Clock()
        client = yield self.in_thread(self.client)
        yield self.in_thread(client.begin_data)
        stopped = stop(self.server)
        yield self.wait_for_drain(clock)
        clock.advance(self.config.shutdown_timeout - 1)
        self.assertFalse(stopped.fired)
        clock.advance(1)
        after = yield self.in_thread(client.rest)
        self.assertTrue(after.startswith(b"421 4.3.2 "), after)
        self.assertNotIn(b"250", after)
        yield stopped
        self.assertEqual(self.maildir_files(ALICE), [])

    @defer.inlineCallbacks
    def test_idle_sessions_are_closed_at_once(self):
        """Idle SMTP, IMAP and POP3 sessions get 421 4.3.2 / * BYE / -ERR without
        waiting for the shutdown bound."""
        self.server.shutdown_clock = task.Clock()

        def connect():
            smtp = self.client()
            smtp.command(b"EHLO client.example", b"250")
            smtp.command(b"MAIL FROM:<sender@example.org>", b"250")
            smtp.command(b"RSET", b"250")
            imap = socket.create_connection(("127.0.0.1", self.port("imap")), timeout=10)
            self.addCleanup(imap.close)
            imap.recv(4096)
            imap.sendall(b"a NOOP\r\n")
            imap.recv(4096)
            pop3 = socket.create_connection(("127.0.0.1", self.port("pop3")), timeout=10)
            self.addCleanup(pop3.close)
            pop3.recv(4096)
            return smtp, imap, pop3
        smtp, imap, pop3 = yield self.in_thread(connect)
        yield self.server.stopService()

        def goodbyes():
            return smtp.rest(), read_all(imap), read_all(pop3)
        smtp_bye, imap_bye, pop3_bye = yield self.in_thread(goodbyes)
        self.assertTrue(smtp_bye.startswith(b"421 4.3.2 "), smtp_bye)
        self.assertEqual(imap_bye, b"* BYE Server shutting down\r\n")
        self.assertEqual(pop3_bye, b"-ERR Server shutting down\r\n")

    @defer.inlineCallbacks
    def test_queue_runner_stops_first(self):
        """Once the shutdown begins, the queue runner starts no new deliveries."""
        clock = self.server.shutdown_clock = task.Clock()
        client = yield self.in_thread(self.client)
        yield self.in_thread(client.begin_data)
        stopped = self.server.stopService()
        yield self.wait_for_drain(clock)
        self.assertFalse(self.server.queue.running)
        clock.advance(self.config.shutdown_timeout)
        yield stopped


def stop(server) -> defer.Deferred:
    """server.stopService(), with ``fired`` telling whether it has finished
    (``Deferred.called`` is already true while it waits on the drain)."""
    d = server.stopService()
    d.fired = False

    def fired(result):
        d.fired = True
        return result
    d.addBoth(fired)
    return d


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(4096):
        data += chunk
    return bytes(data)



class ShutdownConfigTests(unittest.TestCase):
    def test_shutdown_timeout_key(self):
        """shutdown_timeout: seconds >= 0 (default 30); anything else names the key."""
        from mailtwist.config import ConfigError, load_config

        self.assertEqual(load_config(None, {"data_dir": "d"}).shutdown_timeout, 30.0)
        self.assertEqual(load_config(None, {"shutdown_timeout": 0}).shutdown_timeout, 0.0)
        for bad in (-1, "30", True):
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"shutdown_timeout": bad})
            self.assertIn("shutdown_timeout", str(caught.exception))
