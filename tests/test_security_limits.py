"""Issue 6 items 16 and 17: timeouts against idle and trickling clients, and
connection caps per address, per user and in total (docs/security.md).

Timer logic runs on a ``task.Clock`` with ``StringTransport``; the caps are
tested on the real server with real sockets and imaplib/poplib/smtplib.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailtwist.auth import build_portal
from mailtwist.config import Config, ConfigError, load_config
from mailtwist.directory import FileDirectory
from mailtwist.imap.server import IMAPServer, register_imap
from mailtwist.limits import (
    ConnectionLimiter,
    LimitedFactory,
    Refusal,
    client_key,
    extend_timeout,
)
from mailtwist.pop3 import MailboxLocks, POP3Server, register_pop3
from mailtwist.smtp.policy import SMTPPolicy
from mailtwist.smtp.server import MailtwistSMTP, SMTPFactory
from mailtwist.storage.store import MailStore
from tests.support import (DOMAIN, PASSWORD, InlineReactor, InlineThreadPool, ServerMixin,
                           client_tls_context)

HOST = "mx.example.test"
ALICE = f"alice@{DOMAIN}"


class ClockStack:
    """A real directory, store and portal whose threads and time are inline."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        root = Path(testcase.mktemp()).resolve()
        root.mkdir(parents=True)
        self.clock = InlineReactor()
        self.pool = InlineThreadPool()
        self.directory = FileDirectory(root)
        self.directory.bcrypt_rounds = 4
        self.directory.add_domain(DOMAIN)
        self.directory.add_account(ALICE, PASSWORD)
        self.store = MailStore(root / "mail", HOST)
        self.portal, self.realm = build_portal(self.directory, self.clock, self.pool)
        self.config = Config(data_dir=root, hostname=HOST)
        self.config.allow_plaintext_auth = True
        self.config.auth_failure_delay = 0
        register_imap(self.realm, self.store, self.clock, self.pool, directory=self.directory)
        register_pop3(self.realm, self.store, self.clock, self.pool, MailboxLocks())

    def smtp(self) -> tuple[MailtwistSMTP, StringTransport]:
        factory = SMTPFactory(self.config, SMTPPolicy("smtp", self.directory), None,
                              reactor=self.clock)
        session = factory.buildProtocol(None)
        transport = StringTransport()
        session.makeConnection(transport)
        return session, transport

    def imap(self) -> tuple[IMAPServer, StringTransport]:
        session = IMAPServer(self.portal, self.config, reactor=self.clock,
                             threadpool=self.pool)
        transport = StringTransport()
        session.makeConnection(transport)
        return session, transport

    def pop3(self) -> tuple[POP3Server, StringTransport]:
        session = POP3Server(self.portal, self.config, reactor=self.clock)
        transport = StringTransport()
        session.makeConnection(transport)
        return session, transport


def trickle(clock: Clock, session, transport: StringTransport, data: bytes,
            every: float) -> int:
    """Send *data* a byte each *every* seconds until the server hangs up; the
    number of bytes it took."""
    for sent, byte in enumerate(data, 1):
        session.dataReceived(bytes([byte]))
        clock.advance(every)
        if transport.disconnecting:
            return sent
    return len(data) + 1


class SMTPTimeoutTests(unittest.TestCase):
    """SMTP: 5 minutes per command (RFC 5321 4.5.3.2.7), DATA at a minimum rate."""

    def setUp(self) -> None:
        self.stack = ClockStack(self)
        self.clock = self.stack.clock

    def start_data(self) -> tuple[MailtwistSMTP, StringTransport]:
        session, transport = self.stack.smtp()
        session.dataReceived(b"EHLO client.example\r\nMAIL FROM:<bob@remote.example>\r\n"
                             b"RCPT TO:<" + ALICE.encode() + b">\r\nDATA\r\n")
        self.assertIn(b"354 ", transport.value())
        transport.clear()
        return session, transport

    def test_idle_client_is_cut_after_five_minutes(self) -> None:
        """Guards the SMTP idle limit: 300 s with no command, then 421 4.4.2."""
        session, transport = self.stack.smtp()
        self.assertTrue(transport.value().startswith(b"220 "))
        self.clock.advance(299)
        session.dataReceived(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(),
                         f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode())
        self.assertTrue(transport.disconnecting)

    def test_trickled_command_line_is_cut(self) -> None:
        """Guards the per-command deadline: a command trickled a byte every 20 s is
        cut 300 s after the last complete one, though bytes keep coming."""
        session, transport = self.stack.smtp()
        sent = trickle(self.clock, session, transport, b"EHLO " + b"x" * 100 + b"\r\n", 20)
        self.assertEqual(sent, 15)
        self.assertTrue(transport.value().endswith(b"421 4.4.2 " + HOST.encode()
                                                   + b" Error: timeout exceeded\r\n"))

    def test_trickled_data_is_cut(self) -> None:
        """Guards the DATA deadline: content at a byte a minute is cut with 421 4.4.2
        about 300 s after DATA, not kept open by each byte."""
        session, transport = self.start_data()
        sent = trickle(self.clock, session, transport, b"Subject: slow\r\n\r\n" * 10, 60)
        self.assertLessEqual(sent, 6)
        self.assertEqual(transport.value(),
                         f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode())

    def test_data_bytes_earn_time(self) -> None:
        """Guards the min_data_rate credit: 1 MB sent at once keeps DATA open for
        300 s + 1 MB / 500 B/s, and no longer."""
        session, transport = self.start_data()
        session.dataReceived(b"x" * 1000 + b"\r\n" + b"y" * (1_000_000 - 1002) + b"\r\n")
        credit = 300 + 1_000_000 / 500
        self.clock.advance(credit - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"421 4.4.2", transport.value())

    def test_min_data_rate_is_configurable(self) -> None:
        """Guards [limits] min_data_rate: at 100 B/s the same megabyte earns 10000 s."""
        self.stack.config.limits.min_data_rate = 100
        session, transport = self.start_data()
        session.dataReceived(b"z" * 999_998 + b"\r\n")
        self.clock.advance(300 + 10_000 - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)


class IMAPTimeoutTests(unittest.TestCase):
    """IMAP: 3 minutes to log in (Dovecot), 31 after (RFC 3501 5.4), IDLE for 29."""

    def setUp(self) -> None:
        self.stack = ClockStack(self)
        self.clock = self.stack.clock

    def login(self) -> tuple[IMAPServer, StringTransport]:
        session, transport = self.stack.imap()
        session.dataReceived(b'a LOGIN ' + ALICE.encode() + b' "' + PASSWORD.encode()
                             + b'"\r\n')
        self.assertIn(b"a OK ", transport.value())
        transport.clear()
        return session, transport

    def test_login_timeout_is_three_minutes(self) -> None:
        """Guards the pre-login idle limit: 180 s without a command, then BYE."""
        session, transport = self.stack.imap()
        self.clock.advance(179)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.value().endswith(
            b"* BYE Autologout; connection idle too long.\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_thirty_minutes_after_login_and_idle_for_twenty_nine(self) -> None:
        """Guards RFC 3501 5.4 and RFC 2177: a logged-in client may be silent 30 min,
        and an IDLE renewed every 29 min is never cut; 31 min of silence is."""
        session, transport = self.login()
        self.clock.advance(30 * 60)
        self.assertFalse(transport.disconnecting)
        session.dataReceived(b"b SELECT INBOX\r\n")
        for _ in range(3):
            session.dataReceived(b"c IDLE\r\n")
            self.clock.advance(29 * 60)
            session.dataReceived(b"DONE\r\n")
            self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"c OK IDLE completed."), 3)
        self.clock.advance(31 * 60)
        self.assertTrue(transport.disconnecting)

    def test_trickled_command_is_cut(self) -> None:
        """Guards the per-command deadline: bytes of an unfinished line do not reset
        the idle timer (they did: every read reset it)."""
        session, transport = self.stack.imap()
        sent = trickle(self.clock, session, transport, b"a CAPABILITY" + b" " * 100 + b"\r\n",
                       10)
        self.assertEqual(sent, 19)  # 180 s, plus 18 bytes of credit (36 ms)
        self.assertTrue(transport.value().endswith(
            b"* BYE Autologout; connection idle too long.\r\n"))

    def test_trickled_literal_is_cut(self) -> None:
        """Guards literals: an announced literal trickled a byte a minute is cut
        31 min after the last complete command."""
        session, transport = self.login()
        session.dataReceived(b"b APPEND INBOX {5000}\r\n")
        self.assertEqual(transport.value(), b"+ Ready for literal data\r\n")
        sent = trickle(self.clock, session, transport, b"x" * 5000, 60)
        self.assertEqual(sent, 32)  # 1860 s, plus the credit of 54 bytes
        self.assertTrue(transport.value().endswith(
            b"* BYE Autologout; connection idle too long.\r\n"))

    def test_literal_bytes_earn_time(self) -> None:
        """Guards the literal credit: 1 MB of an APPEND at once adds 2000 s."""
        session, transport = self.login()
        session.dataReceived(b"b APPEND INBOX {2000000}\r\n")
        session.dataReceived(b"x" * 1_000_000)
        self.clock.advance(31 * 60 + 2000 - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_timeouts_are_configurable(self) -> None:
        """Guards [limits] imap_login_timeout and imap_idle_timeout."""
        self.stack.config.limits.imap_login_timeout = 30
        self.stack.config.limits.imap_idle_timeout = 3600
        session, transport = self.stack.imap()
        self.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        session, transport = self.login()
        self.clock.advance(3599)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)


class POP3TimeoutTests(unittest.TestCase):
    """POP3: at least 10 minutes (RFC 1939 section 3), per command."""

    def setUp(self) -> None:
        self.stack = ClockStack(self)
        self.clock = self.stack.clock

    def test_ten_minutes_idle(self) -> None:
        """Guards the POP3 autologout: 600 s of silence, then -ERR and close."""
        session, transport = self.stack.pop3()
        self.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.value().endswith(b"-ERR Disconnected for inactivity.\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_trickled_command_is_cut(self) -> None:
        """Guards the per-command deadline: a line trickled a byte a minute is cut
        600 s after the last complete command."""
        session, transport = self.stack.pop3()
        sent = trickle(self.clock, session, transport, b"USER " + b"x" * 100 + b"\r\n", 60)
        self.assertEqual(sent, 10)
        self.assertTrue(transport.disconnecting)


class LimiterTests(unittest.TestCase):
    """ConnectionLimiter and LimitedFactory without the network."""

    def test_counts_and_releases(self) -> None:
        """Guards the per-address and total counts, and that release frees a slot once."""
        limiter = ConnectionLimiter(max_connections=3, max_per_ip=2)
        _, first = limiter.open("smtp", "192.0.2.1")
        _, second = limiter.open("smtp", "192.0.2.1")
        self.assertEqual(limiter.open("smtp", "192.0.2.1"), ("address", None))
        _, other = limiter.open("imap", "192.0.2.1")
        self.assertEqual(limiter.open("pop3", "192.0.2.9"), ("total", None))
        first()
        first()
        self.assertEqual(limiter.total, 2)
        reason, again = limiter.open("smtp", "192.0.2.1")
        self.assertIsNone(reason)
        for release in (second, other, again):
            release()
        self.assertEqual((limiter.total, limiter.per_ip), (0, {}))

    def test_ipv6_counts_per_64_and_mapped_v4_as_v4(self) -> None:
        """Guards IPv6 grouping: one host's /64 is one client address."""
        self.assertEqual(client_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("::ffff:192.0.2.7"), "192.0.2.7")
        limiter = ConnectionLimiter(max_per_ip=1)
        self.assertIsNone(limiter.open("imap", "2001:db8:1:2::1")[0])
        self.assertEqual(limiter.open("imap", "2001:db8:1:2::ffff")[0], "address")
        self.assertIsNone(limiter.open("imap", "2001:db8:1:3::1")[0])

    def test_trusted_networks_are_exempt_from_per_address_caps(self) -> None:
        """Guards trusted_networks: exempt per address and per user, not in total."""
        limiter = ConnectionLimiter(max_connections=3, max_per_ip=1, max_user_ip=1,
                                    trusted=["10.0.0.0/8"])
        for _ in range(3):
            self.assertIsNone(limiter.open("smtp", "10.1.2.3")[0])
        self.assertEqual(limiter.open("smtp", "10.1.2.3")[0], "total")
        self.assertIsNotNone(limiter.open_session("imap", ALICE, "10.1.2.3"))
        self.assertIsNotNone(limiter.open_session("imap", ALICE, "10.1.2.3"))

    def test_user_sessions_per_address(self) -> None:
        """Guards max_sessions_per_user_ip: counted per account (any case) and address."""
        limiter = ConnectionLimiter(max_user_ip=2)
        first = limiter.open_session("imap", ALICE, "192.0.2.1")
        self.assertIsNotNone(limiter.open_session("imap", ALICE.upper(), "192.0.2.1"))
        self.assertIsNone(limiter.open_session("imap", ALICE, "192.0.2.1"))
        self.assertIsNotNone(limiter.open_session("imap", ALICE, "192.0.2.2"))
        first()
        self.assertIsNotNone(limiter.open_session("imap", ALICE, "192.0.2.1"))

    def test_limited_factory_refuses_and_releases_on_close(self) -> None:
        """Guards LimitedFactory: the refusal line at once, release on connectionLost."""
        stack = ClockStack(self)
        smtp = SMTPFactory(stack.config, SMTPPolicy("smtp", stack.directory), None,
                           reactor=stack.clock)
        limiter = ConnectionLimiter(max_per_ip=1)
        factory = LimitedFactory(smtp, limiter, "submission", HOST)
        addr = IPv6Address("TCP", "2001:db8::5", 4000)
        session = factory.buildProtocol(addr)
        self.assertIsInstance(session, MailtwistSMTP)
        refused = factory.buildProtocol(addr)
        self.assertIsInstance(refused, Refusal)
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertEqual(transport.value(), f"421 4.7.0 {HOST} Error: too many connections "
                                            f"from 2001:db8::5\r\n".encode())
        self.assertTrue(transport.disconnecting)
        session.makeConnection(StringTransport())
        session.connectionLost(Failure(Exception("gone")))
        self.assertIsInstance(factory.buildProtocol(addr), MailtwistSMTP)
        self.assertIs(factory.policy, smtp.policy)

    def test_extend_timeout_needs_a_running_timer(self) -> None:
        """Guards extend_timeout: it moves TimeoutMixin's timer and nothing else."""
        stack = ClockStack(self)
        session, transport = stack.pop3()
        extend_timeout(session, 100)
        stack.clock.advance(699)
        self.assertFalse(transport.disconnecting)
        stack.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        extend_timeout(session, 100)  # no timer any more: no error

    def test_config_errors_are_one_line(self) -> None:
        """Guards [limits] validation: each bad value named in one line."""
        cases = {
            "max_connections": 0,
            "max_connections_per_ip": "many",
            "trusted_networks": ["10.0.0.0/33"],
            "imap_idle_timeout": 600,
            "nonsense": 1,
        }
        for key, value in cases.items():
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"limits": {key: value}})
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"limits.{key}: "), message)
            self.assertNotIn("\n", message)
        config = load_config(None, {"limits": {"trusted_networks": ["192.0.2.0/24"],
                                               "max_connections": 10}})
        self.assertEqual(config.limits.trusted_networks, ["192.0.2.0/24"])
        self.assertEqual(config.limits.max_connections, 10)


def connect_and_read(port: int, tls: bool = False) -> tuple[socket.socket, bytes]:
    """A connection and the first thing the server said on it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        sock = client_tls_context().wrap_socket(sock, server_hostname="localhost")
    return sock, sock.recv(4096)


def read_until_closed(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


class CapTests(ServerMixin, unittest.TestCase):
    """The caps on the real server, with real sockets and clients."""

    @defer.inlineCallbacks
    def test_per_address_cap_per_protocol(self) -> None:
        """Guards max_connections_per_ip: the 4th SMTP, IMAP and POP3 connection from
        one address is answered 421 / * BYE / -ERR at once and closed; a slot comes
        back when a connection closes; the families count separately."""
        yield self.start_server(limits={"max_connections_per_ip": 3})
        expected = {
            "smtp": b"421 4.7.0 mx.example.test Error: too many connections from 127.0.0.1\r\n",
            "imap": b"* BYE [UNAVAILABLE] Too many connections from 127.0.0.1.\r\n",
            "pop3": b"-ERR [SYS/TEMP] Too many connections from 127.0.0.1.\r\n",
        }

        def check() -> None:
            for role, refusal in expected.items():
                held = [connect_and_read(self.port(role)) for _ in range(3)]
                try:
                    for _, greeting in held:
                        self.assertNotEqual(greeting, refusal)
                    sock, first = connect_and_read(self.port(role))
                    with sock:
                        self.assertEqual(first + read_until_closed(sock), refusal)
                    held.pop()[0].close()
                    for _ in range(50):
                        sock, greeting = connect_and_read(self.port(role))
                        sock.close()
                        if greeting != refusal:
                            break
                        time.sleep(0.05)  # the server has not seen the close yet
                    self.assertNotEqual(greeting, refusal, role)
                finally:
                    for sock, _ in held:
                        sock.close()

        yield self.in_thread(check)

    @defer.inlineCallbacks
    def test_submission_family_shares_the_cap(self) -> None:
        """Guards the family grouping: smtp and submission count together."""
        yield self.start_server(limits={"max_connections_per_ip": 2})

        def check() -> bytes:
            held = [connect_and_read(self.port("smtp")), connect_and_read(self.port("smtp"))]
            try:
                sock, greeting = connect_and_read(self.port("submission"))
                sock.close()
                imap, imap_greeting = connect_and_read(self.port("imap"))
                imap.close()
                self.assertTrue(imap_greeting.startswith(b"* OK"))
                return greeting
            finally:
                for sock, _ in held:
                    sock.close()

        greeting = yield self.in_thread(check)
        self.assertTrue(greeting.startswith(b"421 4.7.0 "), greeting)

    @defer.inlineCallbacks
    def test_total_cap_and_implicit_tls(self) -> None:
        """Guards max_connections: over the process total even a new address is
        refused; on imaps the BYE comes inside TLS."""
        yield self.start_server(limits={"max_connections": 2})

        def check() -> bytes:
            held = [connect_and_read(self.port("smtp")), connect_and_read(self.port("pop3"))]
            try:
                sock, greeting = connect_and_read(self.port("imaps"), tls=True)
                with sock:
                    return greeting + read_until_closed(sock)
            finally:
                for sock, _ in held:
                    sock.close()

        answer = yield self.in_thread(check)
        self.assertEqual(answer, b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n")

    @defer.inlineCallbacks
    def test_trusted_networks_exempt(self) -> None:
        """Guards trusted_networks: loopback listed there is not capped per address
        (the other tests show it is capped like anyone when not listed)."""
        yield self.start_server(limits={"max_connections_per_ip": 1,
                                        "trusted_networks": ["127.0.0.0/8"]})

        def check() -> list[bytes]:
            held = [connect_and_read(self.port("smtp")) for _ in range(4)]
            for sock, _ in held:
                sock.close()
            return [greeting for _, greeting in held]

        greetings = yield self.in_thread(check)
        self.assertTrue(all(g.startswith(b"220 ") for g in greetings), greetings)

    @defer.inlineCallbacks
    def test_imap_sessions_per_user_and_address(self) -> None:
        """Guards max_sessions_per_user_ip: the 3rd login of alice from one address
        gets * BYE at once; bob is not affected; a logout frees the slot."""
        yield self.start_server(allow_plaintext_auth=True,
                                limits={"max_sessions_per_user_ip": 2})

        def login(user: str) -> imaplib.IMAP4:
            client = imaplib.IMAP4("127.0.0.1", self.port("imap"), timeout=10)
            client.login(f"{user}@{DOMAIN}", PASSWORD)
            return client

        def check() -> str:
            first, second = login("alice"), login("alice")
            try:
                with self.assertRaises(imaplib.IMAP4.abort) as caught:
                    login("alice")
                login("bob").logout()
                first.logout()
                third = login("alice")
                third.logout()
                return str(caught.exception)
            finally:
                second.logout()

        message = yield self.in_thread(check)
        self.assertIn("Too many connections for this user", message)

    @defer.inlineCallbacks
    def test_pop3_one_session_per_mailbox(self) -> None:
        """Guards the POP3 per-user cap: a second session of the same mailbox gets
        -ERR [IN-USE] (RFC 2449), the mailbox lock."""
        yield self.start_server(allow_plaintext_auth=True)

        def check() -> str:
            first = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=10)
            first.user(ALICE)
            first.pass_(PASSWORD)
            try:
                second = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=10)
                second.user(ALICE)
                with self.assertRaises(poplib.error_proto) as caught:
                    second.pass_(PASSWORD)
                second.close()
                return str(caught.exception)
            finally:
                first.quit()

        message = yield self.in_thread(check)
        self.assertIn("[IN-USE]", message)

    @defer.inlineCallbacks
    def test_smtp_client_sees_421(self) -> None:
        """Guards the SMTP refusal with a real client: smtplib reports 421."""
        yield self.start_server(limits={"max_connections_per_ip": 1})

        def check() -> tuple[int, bytes]:
            held, _ = connect_and_read(self.port("smtp"))
            try:
                with self.assertRaises(smtplib.SMTPConnectError) as caught:
                    smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10)
                return caught.exception.smtp_code, caught.exception.smtp_error
            finally:
                held.close()

        code, text = yield self.in_thread(check)
        self.assertEqual(code, 421)
        self.assertIn(b"too many connections from 127.0.0.1", text)


class NoDelayTests(ServerMixin, unittest.TestCase):
    """Replies are not held back by Nagle's algorithm (issue 7: command latency)."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_accepted_connections_have_tcp_nodelay(self):
        """Guards TCP_NODELAY on plain and implicit-TLS listeners: without it a
        reply written in two reactor turns waits for the client's delayed ACK."""
        from mailtwist.limits import set_no_delay

        seen = []
        for role in ("imap", "smtp", "imaps"):
            factory = self.server.listeners[role][0].factory
            build = factory.buildProtocol

            def buildProtocol(addr, build=build):
                proto = build(addr)
                made = proto.makeConnection

                def make(transport, made=made):
                    made(transport)
                    tcp = transport
                    while not hasattr(tcp, "getTcpNoDelay"):
                        tcp = tcp.transport
                    seen.append(bool(tcp.getTcpNoDelay()))
                proto.makeConnection = make
                return proto
            factory.buildProtocol = buildProtocol

        def connect() -> None:
            imaplib.IMAP4("127.0.0.1", self.port("imap")).logout()
            smtplib.SMTP("127.0.0.1", self.port("smtp")).quit()
            imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                              ssl_context=client_tls_context()).logout()
        yield self.in_thread(connect)
        self.assertEqual(seen, [True, True, True])
        self.assertFalse(set_no_delay(None))
