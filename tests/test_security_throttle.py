"""Issue 6 item 14, brute force: the shared login throttle (mailtwist/throttle.py).

The timing logic is tested on a ``task.Clock``; the wiring with real clients
(smtplib, poplib) against the real service, a second client bound to 127.0.0.2.
"""

from __future__ import annotations

import poplib
import smtplib
import socket

from twisted.cred import credentials, error as cred_error
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailtwist.config import ConfigError, load_config
from mailtwist.throttle import LoginThrottle, LoginThrottled, address_key
from tests.support import DOMAIN, PASSWORD, ServerMixin, client_tls_context

ALICE = f"alice@{DOMAIN}"


class FakePortal:
    """A portal whose logins succeed for PASSWORD and fail otherwise, counting calls."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error

    def login(self, creds, mind, *interfaces) -> defer.Deferred:
        self.calls += 1
        if self.error is not None:
            return defer.fail(self.error)
        if creds.password == PASSWORD.encode():
            return defer.succeed((interfaces[0], object(), lambda: None))
        return defer.fail(cred_error.UnauthorizedLogin())


def creds(user: str = ALICE, password: str = "wrong") -> credentials.UsernamePassword:
    return credentials.UsernamePassword(user.encode(), password.encode())


class ThrottleTimingTests(unittest.SynchronousTestCase):
    """LoginThrottle on a task.Clock: delays, blocks, expiry, memory bound."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, failure_delay=2.0, max_delay=30.0,
                                      window=900.0, max_failures=10, block_time=600.0,
                                      account_max_failures=100, max_entries=1000)

    def test_delay_doubles_per_failure_up_to_the_cap(self) -> None:
        """Guards the progressive slow-down: failure_delay * 2^(n-1), capped at max_delay."""
        delays = [self.throttle.failed("192.0.2.1", ALICE) for _ in range(7)]
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])

    def test_zero_base_delay_means_no_delay(self) -> None:
        """Guards failure_delay = 0 (tests, trusted setups): no wait, blocking still works."""
        self.throttle.failure_delay = 0.0
        self.assertEqual([self.throttle.failed("192.0.2.1", ALICE) for _ in range(10)],
                         [0.0] * 10)
        self.assertTrue(self.throttle.refuses("192.0.2.1", ALICE))

    def test_address_blocked_after_max_failures_then_released(self) -> None:
        """Guards the block: the 11th attempt from an address is refused for every
        account, until block_time has passed."""
        for i in range(9):
            self.throttle.failed("192.0.2.1", f"user{i}@{DOMAIN}")
        self.assertFalse(self.throttle.refuses("192.0.2.1", ALICE))
        self.throttle.failed("192.0.2.1", "whoever")
        self.assertTrue(self.throttle.refuses("192.0.2.1", ALICE))
        self.assertTrue(self.throttle.refuses("192.0.2.1", "bob@example.test"))
        self.clock.advance(599)
        self.assertTrue(self.throttle.refuses("192.0.2.1", ALICE))
        self.clock.advance(1)
        self.assertFalse(self.throttle.refuses("192.0.2.1", ALICE))

    def test_other_addresses_stay_fast(self) -> None:
        """Guards that one attacker does not slow or block other clients."""
        for _ in range(10):
            self.throttle.failed("192.0.2.1", "victim@example.test")
        self.assertFalse(self.throttle.refuses("192.0.2.2", ALICE))
        self.assertEqual(self.throttle.failed("192.0.2.2", ALICE), 2.0)

    def test_failures_forgotten_after_window_without_one(self) -> None:
        """Guards expiry: failures older than the window no longer count."""
        for _ in range(9):
            self.throttle.failed("192.0.2.1", ALICE)
        self.clock.advance(900)
        self.assertEqual(self.throttle.failed("192.0.2.1", "other"), 2.0)
        self.assertFalse(self.throttle.refuses("192.0.2.1", ALICE))

    def test_hammered_account_refused_only_to_failing_addresses(self) -> None:
        """Guards per-account limiting without lock-out: once an account has
        account_max_failures failures, addresses that failed are refused for it,
        while an address with no failures (the real user) is still checked."""
        self.throttle.account_max_failures = 5
        for i in range(5):
            self.throttle.failed(f"198.51.100.{i}", ALICE)
        self.assertTrue(self.throttle.refuses("198.51.100.0", ALICE))
        self.assertFalse(self.throttle.refuses("198.51.100.0", "bob@example.test"))
        self.assertFalse(self.throttle.refuses("203.0.113.7", ALICE))
        # The account's count slows failures from new addresses too.
        self.assertEqual(self.throttle.failed("203.0.113.8", ALICE), 30.0)

    def test_account_names_compare_case_insensitively(self) -> None:
        """Guards that changing the case of the login name does not reset its count."""
        self.throttle.account_max_failures = 2
        self.throttle.failed("192.0.2.1", "Alice@Example.TEST")
        self.throttle.failed("192.0.2.2", b"alice@example.test")
        self.assertTrue(self.throttle.refuses("192.0.2.1", ALICE.upper()))

    def test_ipv6_counted_per_64(self) -> None:
        """Guards against an IPv6 client escaping the count by changing its interface id."""
        for i in range(10):
            self.throttle.failed(f"2001:db8:1:2::{i + 1:x}", ALICE)
        self.assertTrue(self.throttle.refuses("2001:db8:1:2:ffff::1", "x"))
        self.assertFalse(self.throttle.refuses("2001:db8:1:3::1", "x"))
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_memory_is_bounded(self) -> None:
        """Guards memory: at most max_entries addresses and accounts are kept, and
        expired ones are dropped as new failures come in."""
        for i in range(5000):
            self.throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"u{i}")
        self.assertEqual(len(self.throttle.addresses), 1000)
        self.assertEqual(len(self.throttle.accounts), 1000)
        self.clock.advance(901)
        self.throttle.failed("192.0.2.9", "x")
        self.assertEqual((len(self.throttle.addresses), len(self.throttle.accounts)), (1, 1))


class ThrottledLoginTests(unittest.SynchronousTestCase):
    """LoginThrottle.login and reject, the calls the protocols make."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, failure_delay=2.0, max_failures=3)
        self.portal = FakePortal()

    def login(self, password: str = "wrong", address: str = "192.0.2.1") -> list:
        results: list = []
        d = self.throttle.login(self.portal, address, creds(password=password), None, object)
        d.addBoth(results.append)
        return results

    def test_failure_answered_only_after_the_delay(self) -> None:
        """Guards that a wrong password's answer waits exactly the throttle's delay."""
        results = self.login()
        self.clock.advance(1.99)
        self.assertEqual(results, [])
        self.clock.advance(0.01)
        self.assertTrue(results[0].check(cred_error.UnauthorizedLogin))
        results = self.login()
        self.clock.advance(3.99)
        self.assertEqual(results, [])
        self.clock.advance(0.01)
        self.assertEqual(len(results), 1)

    def test_success_is_not_delayed(self) -> None:
        """Guards that the real user is never slowed by the throttle."""
        self.login()
        results = self.login(password=PASSWORD)
        self.assertIsInstance(results[0], tuple)

    def test_refused_at_once_without_a_password_check(self) -> None:
        """Guards the block: refused immediately, and the portal (bcrypt) is not asked."""
        for _ in range(3):
            self.login()
            self.clock.advance(60)
        calls = self.portal.calls
        results = self.login(password=PASSWORD)
        self.assertTrue(results[0].check(LoginThrottled))
        self.assertEqual(self.portal.calls, calls)
        self.assertIsInstance(self.login(password=PASSWORD, address="192.0.2.2")[0], tuple)

    def test_internal_errors_pass_through_uncounted(self) -> None:
        """Guards that a server-side error is neither delayed nor held against the client."""
        portal = FakePortal(error=RuntimeError("disk on fire"))
        results: list = []
        self.throttle.login(portal, "192.0.2.1", creds(), None, object).addBoth(results.append)
        self.assertTrue(results[0].check(RuntimeError))
        self.assertEqual(len(self.throttle.addresses), 0)

    def test_reject_counts_and_delays_like_a_wrong_password(self) -> None:
        """Guards SASL authzid refusals: they count and wait like any failed login."""
        results: list = []
        self.throttle.reject("192.0.2.1", ALICE).addBoth(results.append)
        self.assertEqual(results, [])
        self.clock.advance(2)
        self.assertTrue(results[0].check(cred_error.UnauthorizedLogin))
        self.assertEqual(len(self.throttle.addresses), 1)


class ThrottleConfigTests(unittest.TestCase):
    """The [auth] keys of the throttle."""

    def test_keys_are_read_and_validated(self) -> None:
        """Guards the documented [auth] keys and their error messages."""
        config = load_config(None, {"auth": {"max_delay": 10, "window": 60, "max_failures": 5,
                                             "block_time": 120.5, "account_max_failures": 50,
                                             "max_entries": 10}})
        t = config.auth_throttle
        self.assertEqual((t.max_delay, t.window, t.max_failures, t.block_time,
                          t.account_max_failures, t.max_entries), (10.0, 60.0, 5, 120.5, 50, 10))
        throttle = LoginThrottle.from_config(config, Clock())
        self.assertEqual((throttle.max_failures, throttle.block_time), (5, 120.5))
        for bad in ({"max_failures": 0}, {"window": -1}, {"max_delay": "x"},
                    {"max_entries": 1.5}, {"block_time": True}):
            with self.assertRaises(ConfigError) as raised:
                load_config(None, {"auth": bad})
            self.assertIn(f"auth.{next(iter(bad))}", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            load_config(None, {"auth": {"lockout": 1}})
        self.assertIn("account_max_failures", str(raised.exception))


# -- real clients against the real service --------------------------------------


class SourcePOP3(poplib.POP3):
    """poplib.POP3 whose socket is bound to *source* (another 127.0.0.x)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def loopback_alias_available() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


class ThrottleServiceTests(ServerMixin, unittest.TestCase):
    """The one throttle shared by SMTP AUTH and POP3 in the real service."""

    def setUp(self):
        if not loopback_alias_available():
            raise unittest.SkipTest("cannot bind 127.0.0.2 for the second client")
        return self.start_server(auth={"max_failures": 10, "account_max_failures": 1000})

    def smtp_login(self, password: str, source: str = "127.0.0.1",
                   user: str = ALICE) -> tuple[int, bytes]:
        with smtplib.SMTP_SSL("127.0.0.1", self.port("submissions"), timeout=10,
                              context=client_tls_context(),
                              source_address=(source, 0)) as client:
            client.ehlo("c.test")
            client.user, client.password = user, password
            try:
                return client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error

    def pop3_login(self, password: str, source: str = "127.0.0.1",
                   user: str = ALICE) -> bytes:
        client = SourcePOP3("127.0.0.1", self.port("pop3"), source)
        try:
            client.stls(client_tls_context())
            client.user(user)
            try:
                return client.pass_(password)
            except poplib.error_proto as e:
                return e.args[0]
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_eleventh_attempt_refused_across_protocols_other_client_logs_in(self):
        """Guards item 14 end to end: ten failures from one address, mixed over SMTP
        AUTH and POP3, make the eleventh attempt (with the right password) refused
        on both protocols without a password check, while a client on 127.0.0.2
        still logs in to the same account on both."""
        for _ in range(5):
            code, _ = yield self.in_thread(self.smtp_login, "wrong")
            self.assertEqual(code, 535)
            reply = yield self.in_thread(self.pop3_login, "wrong")
            self.assertEqual(reply, b"-ERR [AUTH] Authentication failed.")
        code, text = yield self.in_thread(self.smtp_login, PASSWORD)
        self.assertEqual(code, 421)
        self.assertTrue(text.startswith(b"4.7.0 "), text)
        self.assertIn(b"too many failed logins", text)
        reply = yield self.in_thread(self.pop3_login, PASSWORD)
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Too many failed logins, try again later.")
        code, _ = yield self.in_thread(self.smtp_login, PASSWORD, "127.0.0.2")
        self.assertEqual(code, 235)
        reply = yield self.in_thread(self.pop3_login, PASSWORD, "127.0.0.2")
        self.assertTrue(reply.startswith(b"+OK"), reply)

    def imap_login(self, password: str, source: str = "127.0.0.1") -> bytes:
        with socket.create_connection(("127.0.0.1", self.port("imaps")), timeout=10,
                                      source_address=(source, 0)) as raw:
            with client_tls_context().wrap_socket(raw) as tls:
                greeting = tls.recv(4096)
                assert greeting.startswith(b"* OK"), greeting
                tls.sendall(b'a LOGIN "%s" "%s"\r\n' % (ALICE.encode(), password.encode()))
                received = b""
                while chunk := tls.recv(4096):
                    received += chunk
                    for line in received.split(b"\r\n"):
                        if line.startswith(b"a "):
                            return line
                return received

    @defer.inlineCallbacks
    def test_imap_shares_the_throttle(self):
        """Guards item 14 for IMAP: failures on SMTP AUTH from one address make
        IMAP LOGIN from it refused with NO [UNAVAILABLE] before any password
        check, while another address logs in over IMAP."""
        for _ in range(10):
            code, _ = yield self.in_thread(self.smtp_login, "wrong")
        reply = yield self.in_thread(self.imap_login, PASSWORD)
        self.assertTrue(reply.startswith(b"a NO [UNAVAILABLE]"), reply)
        reply = yield self.in_thread(self.imap_login, PASSWORD, "127.0.0.2")
        self.assertTrue(reply.startswith(b"a OK"), reply)

    @defer.inlineCallbacks
    def test_hammered_account_still_open_to_its_user_elsewhere(self):
        """Guards per-account limiting without lock-out: after the account's
        failure limit the attacking address is refused for that account, while
        the real user logs in from another address."""
        self.server.throttle.account_max_failures = 3
        for _ in range(3):
            code, _ = yield self.in_thread(self.smtp_login, "guess")
            self.assertEqual(code, 535)
        code, _ = yield self.in_thread(self.smtp_login, PASSWORD)
        self.assertEqual(code, 421)
        code, _ = yield self.in_thread(self.smtp_login, PASSWORD, "127.0.0.1", f"bob@{DOMAIN}")
        self.assertEqual(code, 235)
        code, _ = yield self.in_thread(self.smtp_login, PASSWORD, "127.0.0.2")
        self.assertEqual(code, 235)
