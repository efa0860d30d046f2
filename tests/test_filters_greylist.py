"""The greylist filter: triplets at RCPT through the real SMTP server, with
task.Clock for time and its SQLite state across a rebuild of the filter."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.filters.dnsbl import dnsbl
from mailtwist.filters.greylist import (
    GreylistFilter,
    GreylistStore,
    greylist,
    normalize_sender,
)
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.interfaces import (
    CONTINUE,
    FilterContext,
    FilterSession,
    IFilter,
    IFilterFactory,
    TempFail,
)
from mailtwist.testing import FilterTestServer
from tests.dnsserver import TestDNSServer
from tests.support import assert_one_line_config_errors

MESSAGE = b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
DAY = 86400


class ClockedReactor:
    """The real reactor (network, threads), with time from a task.Clock."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, *args, **kwargs):
        return self.clock.callLater(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(reactor, name)


class GreylistTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.state_dir = Path(self.mktemp())

    def build(self, **settings) -> GreylistFilter:
        context = FilterContext("mx.example.test", self.state_dir,
                                reactor=ClockedReactor(self.clock))
        flt = greylist.build(settings, context)
        self.addCleanup(self.close, flt)
        return flt

    @staticmethod
    def close(flt: GreylistFilter) -> defer.Deferred:
        """Close *flt*'s database once its background purge is done."""
        d = flt.purging or defer.succeed(None)
        return d.addBoth(lambda _: flt.close())

    def server(self, filters, **kwargs):
        return FilterTestServer(self, filters, **kwargs).start()

    def test_provides_interfaces(self):
        """The factory is installed as a plugin and builds an IFilter."""
        self.assertIs(installed_factories()["greylist"], greylist)
        verifyObject(IFilterFactory, greylist)
        verifyObject(IFilter, self.build())

    @defer.inlineCallbacks
    def test_first_sight_then_retry_after_delay(self):
        """A new triplet gets 451 4.7.1; an early retry too; a retry after delay passes."""
        server = yield self.server([self.build()])
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("rcpt", 451, "4.7.1"))
        self.assertIn("Greylisted, try again in 300 seconds", result.text)
        self.clock.advance(100)
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 451)
        self.assertIn("try again in 200 seconds", result.text)
        self.clock.advance(201)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertEqual(len(result.stored["alice@example.test"]), 1)
        # known now: later mail of the same triplet passes at once
        self.clock.advance(10 * DAY)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)

    @defer.inlineCallbacks
    def test_state_survives_restart(self):
        """The triplet seen by one server passes after delay on a new one built on the
        same state directory."""
        first = self.build()
        server = yield self.server([first])
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 451)
        yield server.server.stopService()
        yield self.close(first)
        self.clock.advance(301)
        server = yield self.server([self.build()])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertTrue((self.state_dir / "greylist.sqlite").exists())

    @defer.inlineCallbacks
    def test_retry_too_late_restarts(self):
        """A retry after retry_window is greylisted again, as a new triplet."""
        server = yield self.server([self.build(retry_window=DAY)])
        yield server.send(MESSAGE)
        self.clock.advance(DAY + 1)
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 451)
        self.assertIn("try again in 300 seconds", result.text)
        self.clock.advance(300)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)

    @defer.inlineCallbacks
    def test_known_triplet_expires(self):
        """A passed triplet unused for longer than expire is greylisted again."""
        flt = self.build(expire=10 * DAY, auto_whitelist=0)
        session = FilterSession("smtp", "192.0.2.1", sender="a@sender.test")
        first = yield flt.rcpt_to(session, "alice@example.test")
        self.assertIsInstance(first, TempFail)
        self.clock.advance(300)
        verdict = yield flt.rcpt_to(session, "alice@example.test")
        self.assertIs(verdict, CONTINUE)
        self.clock.advance(10 * DAY + 1)
        verdict = yield flt.rcpt_to(session, "alice@example.test")
        self.assertIsInstance(verdict, TempFail)

    @defer.inlineCallbacks
    def test_null_sender(self):
        """Bounces (MAIL FROM:<>) are greylisted by the triplet with an empty sender."""
        server = yield self.server([self.build()])
        result = yield server.send(MESSAGE, sender="")
        self.assertEqual((result.stage, result.code), ("rcpt", 451))
        self.clock.advance(300)
        result = yield server.send(MESSAGE, sender="")
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, sender="someone@sender.test")
        self.assertEqual(result.code, 451)

    @defer.inlineCallbacks
    def test_client_network_and_sender_normalization(self):
        """Clients of one /24 share a triplet, and VERP digits do not make a new sender."""
        flt = self.build()
        verdict = yield flt.rcpt_to(FilterSession("smtp", "192.0.2.1",
                                                  sender="bounce-123@list.test"),
                                    "alice@example.test")
        self.assertIsInstance(verdict, TempFail)
        self.clock.advance(300)
        verdict = yield flt.rcpt_to(FilterSession("smtp", "192.0.2.77",
                                                  sender="bounce-456@List.test"),
                                    "Alice@example.test")
        self.assertIs(verdict, CONTINUE)
        verdict = yield flt.rcpt_to(FilterSession("smtp", "198.51.100.1",
                                                  sender="bounce-456@list.test"),
                                    "alice@example.test")
        self.assertIsInstance(verdict, TempFail)
        verdict = yield flt.rcpt_to(FilterSession("smtp", "2001:db8:1:2::1",
                                                  sender="x@list.test"), "alice@example.test")
        self.assertIsInstance(verdict, TempFail)
        self.assertEqual(flt.client_key(FilterSession("smtp", "2001:db8:1:2::1")),
                         "2001:db8:1:2::/64")
        self.assertEqual(normalize_sender("prvs=1234abcd=Bob77@Sender.test"),
                         "bob#@sender.test")

    @defer.inlineCallbacks
    def test_auto_whitelist(self):
        """After auto_whitelist passed triplets a client passes any triplet at once."""
        flt = self.build(auto_whitelist=2)
        client = "192.0.2.1"

        @defer.inlineCallbacks
        def pass_triplet(sender):
            session = FilterSession("smtp", client, sender=sender)
            yield flt.rcpt_to(session, "alice@example.test")
            self.clock.advance(300)
            verdict = yield flt.rcpt_to(session, "alice@example.test")
            self.assertIs(verdict, CONTINUE)

        yield pass_triplet("one@sender.test")
        verdict = yield flt.rcpt_to(FilterSession("smtp", client, sender="new@sender.test"),
                                    "bob@example.test")
        self.assertIsInstance(verdict, TempFail)
        yield pass_triplet("two@sender.test")
        verdict = yield flt.rcpt_to(FilterSession("smtp", client, sender="new@sender.test"),
                                    "bob@example.test")
        self.assertIs(verdict, CONTINUE)

    @defer.inlineCallbacks
    def test_authenticated_users_skip(self):
        """An authenticated session is never greylisted."""
        server = yield self.server([self.build()], role="submission")
        result = yield server.send(MESSAGE, login="bob@example.test", sender="bob@example.test")
        self.assertTrue(result.accepted, result)

    @defer.inlineCallbacks
    def test_whitelists_skip(self):
        """Trusted networks, whitelisted sender domains and recipients pass at first sight."""
        server = yield self.server([self.build(trusted_networks=["127.0.0.0/8"])])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        flt = self.build(whitelist_sender_domains=["friends.test"],
                         whitelist_recipients=["postmaster@example.test", "@other.test"])
        server = yield self.server([flt])
        result = yield server.send(MESSAGE, sender="x@friends.test")
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, sender="x@sender.test",
                                   recipients=["alice@example.test"])
        self.assertEqual(result.code, 451)
        session = FilterSession("smtp", "192.0.2.1", sender="x@sender.test")
        self.assertEqual(flt.exempt(session, "Postmaster@example.test"), "whitelisted recipient")
        self.assertEqual(flt.exempt(session, "a@other.test"), "whitelisted recipient")

    @defer.inlineCallbacks
    def test_dnswl_listed_client_skips(self):
        """A client the dnsbl filter found on a DNSWL is not greylisted."""
        dns = TestDNSServer()
        dns.start()
        self.addCleanup(dns.stop)
        dns.a("1.0.0.127.wl.test", "127.0.10.1")
        context = FilterContext("mx.example.test", self.mktemp(), dns_servers=(dns.address,),
                                dns_timeout=2.0, reactor=reactor)
        listed = dnsbl.build({"dnswl_zones": ["wl.test"]}, context)
        server = yield self.server([listed, self.build()])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        unlisted = dnsbl.build({"dnswl_zones": ["other-wl.test"]}, context)
        server = yield self.server([unlisted, self.build()])
        result = yield server.send(MESSAGE, sender="y@sender.test")
        self.assertEqual(result.code, 451)

    @defer.inlineCallbacks
    def test_database_error_fails_open(self):
        """When the state cannot be stored the mail passes and the error is logged."""
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.state_dir.write_text("not a directory")
        flt = self.build()
        verdict = yield flt.rcpt_to(FilterSession("smtp", "192.0.2.1", sender=""),
                                    "alice@example.test")
        self.assertIs(verdict, CONTINUE)
        yield flt.purging
        self.assertTrue(self.flushLoggedErrors(OSError))

    def test_purge_bounds_the_database(self):
        """purge deletes expired pending and passed triplets and caps pending ones."""
        store = GreylistStore(self.state_dir, max_entries=3)
        self.addCleanup(store.close)
        now = 1_000_000.0
        for n in range(5):
            store.decide("192.0.2.0/24", f"s{n}@x.test", "a@example.test", now + n, 300,
                         DAY, 35 * DAY, 0)
        store.decide("192.0.2.0/24", "s0@x.test", "a@example.test", now + 400, 300, DAY,
                     35 * DAY, 0)  # passes
        self.assertEqual(store.count(), 5)
        store.purge(now + 500, DAY, 35 * DAY)
        self.assertEqual(store.count(), 4)      # 3 pending (the newest) + 1 passed
        store.purge(now + DAY + 10, DAY, 35 * DAY)
        self.assertEqual(store.count(), 1)      # pending ones are past the retry window
        store.purge(now + 36 * DAY, DAY, 35 * DAY)
        self.assertEqual(store.count(), 0)

    @defer.inlineCallbacks
    def test_filter_purges_periodically(self):
        """The filter purges expired entries itself, at most every purge_interval."""
        flt = self.build(retry_window=DAY, purge_interval=3600)
        yield flt.rcpt_to(FilterSession("smtp", "192.0.2.1", sender="a@x.test"), "a@example.test")
        self.clock.advance(DAY + 1)
        verdict = yield flt.rcpt_to(FilterSession("smtp", "198.51.100.1", sender="b@x.test"),
                                    "a@example.test")
        self.assertIsInstance(verdict, TempFail)
        self.assertIsNotNone(flt.purging)
        yield flt.purging
        count = yield flt._in_thread(flt.store.count)
        self.assertEqual(count, 1)

    def test_settings_errors_are_one_line(self):
        """Bad settings give one ConfigError line naming filters.greylist.<key>."""
        context = FilterContext("mx.example.test", self.state_dir, reactor=reactor)
        cases = {
            "filters.greylist.retry_window: must be longer than delay": {"delay": 600,
                                                                        "retry_window": 300},
            "filters.greylist.delay: expected an integer": {"delay": "5m"},
            "filters.greylist.ipv4_prefix: must be 8 to 32": {"ipv4_prefix": 33},
            "filters.greylist.trusted_networks: bad network": {"trusted_networks": ["x"]},
            "filters.greylist.expire: must be more than 0": {"expire": 0},
            "filters.greylist.whitelist: unknown setting": {"whitelist": []},
        }
        assert_one_line_config_errors(
            self, lambda s: build_filter("greylist", s, context=context), cases)
