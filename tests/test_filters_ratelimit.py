"""The ratelimit filter through the real SMTP server with task.Clock for time,
and the three policy filters enabled from mailtwist.toml."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.cli import main
from mailtwist.config import load_config
from mailtwist.filters.dnsbl import DNSBLFilter
from mailtwist.filters.greylist import GreylistFilter
from mailtwist.filters.loader import build_chains, build_filter, installed_factories
from mailtwist.filters.ratelimit import Counter, RateLimitFilter, ratelimit
from mailtwist.interfaces import (
    CONTINUE,
    FilterContext,
    FilterSession,
    IFilter,
    IFilterFactory,
)
from mailtwist.testing import FilterTestServer
from tests.support import assert_one_line_config_errors

MESSAGE = b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class CounterTests(unittest.TestCase):
    def test_sliding_window(self):
        """A sliding window counts the events of the last *window* seconds."""
        counter = Counter(2, 60, sliding=True, max_keys=10)
        self.assertTrue(counter.hit("k", 100))
        self.assertTrue(counter.hit("k", 130))
        self.assertFalse(counter.hit("k", 159))
        self.assertTrue(counter.hit("k", 160.5))     # the event at 100 left the window
        self.assertFalse(counter.hit("k", 170))

    def test_fixed_window(self):
        """A fixed window resets its counter at every multiple of *window*."""
        counter = Counter(2, 60, sliding=False, max_keys=10)
        self.assertTrue(counter.hit("k", 150))
        self.assertTrue(counter.hit("k", 170))
        self.assertFalse(counter.hit("k", 179))
        self.assertTrue(counter.hit("k", 180))       # a new window began at 180

    def test_memory_is_bounded(self):
        """At most max_keys keys are kept (least recently used evicted); stale ones expire."""
        counter = Counter(1, 60, sliding=True, max_keys=2)
        counter.hit("a", 0)
        counter.hit("b", 1)
        counter.hit("a", 2)          # refused, but "a" is now the most recently used
        counter.hit("c", 3)
        self.assertEqual(list(counter.keys), ["a", "c"])
        self.assertEqual(counter.expire(61.5), 1)
        self.assertEqual(list(counter.keys), ["c"])


class RateLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)

    def build(self, **settings) -> RateLimitFilter:
        context = FilterContext("mx.example.test", self.mktemp(), reactor=self.clock)
        return ratelimit.build(settings, context)

    def server(self, flt, **kwargs):
        return FilterTestServer(self, [flt], **kwargs).start()

    def test_provides_interfaces(self):
        """The factory is installed as a plugin and builds an IFilter."""
        self.assertIs(installed_factories()["ratelimit"], ratelimit)
        verifyObject(IFilterFactory, ratelimit)
        verifyObject(IFilter, self.build())

    @defer.inlineCallbacks
    def test_connections_per_client(self):
        """Over client_connections a client gets 421 4.7.0 at connect, until the window moves."""
        server = yield self.server(self.build(client_connections=2, client_window=60))
        for _ in range(2):
            result = yield server.send(MESSAGE)
            self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("connect", 421, "4.7.0"))
        self.assertIn("too many connections from client [127.0.0.1] (limit 2 per 60 s, "
                      "client_connections)", result.text)
        self.clock.advance(60)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)

    @defer.inlineCallbacks
    def test_messages_per_client(self):
        """Over client_messages MAIL is answered 450 4.7.1."""
        server = yield self.server(self.build(client_messages=1))
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("mail", 450, "4.7.1"))
        self.assertIn("too many messages from client [127.0.0.1]", result.text)

    @defer.inlineCallbacks
    def test_recipients_per_client(self):
        """Over client_recipients RCPT is answered 452 4.7.1; earlier recipients still get it."""
        server = yield self.server(self.build(client_recipients=2))
        result = yield server.send(MESSAGE, recipients=["alice@example.test", "bob@example.test",
                                                        "alice@example.test"])
        self.assertTrue(result.accepted, result)
        self.assertEqual([code for code, _ in result.rcpt_replies], [250, 250, 452])
        self.assertIn(b"4.7.1 Error: too many recipients", result.rcpt_replies[2][1])
        self.assertEqual(len(result.stored["bob@example.test"]), 1)

    @defer.inlineCallbacks
    def test_per_user_limits(self):
        """Authenticated sessions count per user; the per-client limits do not apply to them."""
        server = yield self.server(self.build(user_messages=1, client_messages=1),
                                   role="submission")
        result = yield server.send(MESSAGE, login="bob@example.test", sender="bob@example.test")
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, login="alice@example.test",
                                   sender="alice@example.test")
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, login="bob@example.test", sender="bob@example.test")
        self.assertEqual((result.stage, result.code), ("mail", 450))
        self.assertIn("user bob@example.test", result.text)
        self.assertIn("user_messages", result.text)

    @defer.inlineCallbacks
    def test_user_recipients(self):
        """user_recipients counts the recipients of one user over several messages."""
        server = yield self.server(self.build(user_recipients=2), role="submission")
        result = yield server.send(MESSAGE, login="bob@example.test", sender="bob@example.test")
        self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, login="bob@example.test", sender="bob@example.test",
                                   recipients=["alice@example.test", "bob@example.test"])
        self.assertEqual([code for code, _ in result.rcpt_replies], [250, 452])

    @defer.inlineCallbacks
    def test_per_sender_limits(self):
        """sender_messages counts per envelope sender, the null sender included."""
        server = yield self.server(self.build(sender_messages=1))
        for sender in ("a@sender.test", "b@sender.test", ""):
            result = yield server.send(MESSAGE, sender=sender)
            self.assertTrue(result.accepted, result)
        result = yield server.send(MESSAGE, sender="A@sender.test")
        self.assertEqual((result.stage, result.code), ("mail", 450))
        self.assertIn("sender <a@sender.test>", result.text)
        result = yield server.send(MESSAGE, sender="")
        self.assertIn("sender <>", result.text)

    @defer.inlineCallbacks
    def test_refused_event_is_not_counted_in_other_limits(self):
        """A message refused by one limit does not use up another limit's budget."""
        flt = self.build(client_messages=5, sender_messages=1)
        session = FilterSession("smtp", "192.0.2.1")
        self.assertIs((yield flt.mail_from(session, "a@x.test")), CONTINUE)
        for _ in range(3):
            verdict = yield flt.mail_from(session, "a@x.test")
            self.assertEqual(verdict.code, 450)
        for n in range(4):
            self.assertIs((yield flt.mail_from(session, f"b{n}@x.test")), CONTINUE)

    @defer.inlineCallbacks
    def test_trusted_networks_and_off(self):
        """Trusted networks are never limited, and 0 turns a limit off."""
        server = yield self.server(self.build(client_connections=1,
                                              trusted_networks=["127.0.0.1/32"]))
        for _ in range(2):
            result = yield server.send(MESSAGE)
            self.assertTrue(result.accepted, result)
        flt = self.build(client_connections=0)
        self.assertEqual(flt.limits, [])

    def test_ipv6_clients_count_per_prefix(self):
        """IPv6 clients are counted per /64 by default."""
        flt = self.build(client_connections=1)
        self.assertIs(flt.connect(FilterSession("smtp", "2001:db8::1")), CONTINUE)
        self.assertEqual(flt.connect(FilterSession("smtp", "2001:db8::2")).code, 421)
        self.assertIs(flt.connect(FilterSession("smtp", "2001:db8:0:1::1")), CONTINUE)

    def test_settings_errors_are_one_line(self):
        """Bad settings give one ConfigError line naming filters.ratelimit.<key>."""
        cases = {
            "filters.ratelimit.client_messages: must be 0 or more": {"client_messages": -1},
            "filters.ratelimit.client_window: must be more than 0": {"client_window": 0},
            "filters.ratelimit.window_type: must be sliding or fixed": {"window_type": "x"},
            "filters.ratelimit.user_messages: expected an integer": {"user_messages": "10"},
            "filters.ratelimit.messages: unknown setting": {"messages": 3},
        }
        assert_one_line_config_errors(self, lambda s: build_filter("ratelimit", s), cases)


class ConfigurationTests(unittest.TestCase):
    """The three policy filters enabled from mailtwist.toml."""

    TOML = """
data_dir = "{data_dir}"
[outbound]
dns_servers = ["127.0.0.1:5353"]
[filters]
smtp = ["dnsbl", "greylist", "ratelimit"]
[filters.dnsbl]
zones = ["zen.spamhaus.org=127.0.0.[2..11]*2", "bl.spamcop.net"]
dnswl_zones = ["list.dnswl.org=127.0.[0..255].[1..3]"]
threshold = 2
[filters.greylist]
delay = 60
whitelist_sender_domains = ["example.org"]
[filters.ratelimit]
client_connections = 30
"""

    def write_config(self, extra: str = "") -> Path:
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        path = base / "mailtwist.toml"
        path.write_text(self.TOML.format(data_dir=base / "data") + extra)
        return path

    def test_built_from_toml(self):
        """[filters] smtp = ["dnsbl", "greylist", "ratelimit"] with their tables builds a chain."""
        config = load_config(self.write_config())
        chain = build_chains(config, clock=reactor)["smtp"]
        dnsbl, grey, limit = chain.filters
        self.assertIsInstance(dnsbl, DNSBLFilter)
        self.assertEqual([z.name for z in dnsbl.zones], ["zen.spamhaus.org", "bl.spamcop.net"])
        self.assertEqual(dnsbl.resolver.servers, [("127.0.0.1", 5353)])
        self.assertIsInstance(grey, GreylistFilter)
        self.assertEqual(grey.delay, 60)
        self.assertEqual(grey.store.path, config.data_dir / "filters" / "greylist"
                         / "greylist.sqlite")
        self.assertIsInstance(limit, RateLimitFilter)
        self.assertEqual([lim.setting for lim in limit.limits], ["client_connections"])

    def run_cli(self, path: Path) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--config", str(path), "filters"])
        return code, out.getvalue(), err.getvalue()

    def test_mailtwist_filters_lists_them(self):
        """`mailtwist filters` lists the three filters as enabled for smtp."""
        code, out, err = self.run_cli(self.write_config())
        self.assertEqual((code, err), (0, ""))
        for name in ("dnsbl", "greylist", "ratelimit"):
            [line] = [line for line in out.splitlines() if line.startswith(name + " ")]
            self.assertIn("smtp", line)

    def test_mailtwist_filters_reports_bad_setting(self):
        """A bad setting in a [filters.NAME] table is one error line naming it."""
        path = self.write_config()
        path.write_text(path.read_text().replace("delay = 60", "delay = -5"))
        code, _out, err = self.run_cli(path)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("filters.greylist.delay: must be 0 or more", err)


class SharedWorkersTests(unittest.TestCase):
    """With workers = N the limits hold for the server, not per process."""

    def setUp(self):
        from twisted.python.threadpool import ThreadPool

        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.state_dir = self.mktemp()

    def build(self, **settings) -> RateLimitFilter:
        """One process's filter: its own memory, the shared state directory."""
        context = FilterContext("mx.example.test", self.state_dir, reactor=self.clock,
                                threadpool=self.pool, workers=2)
        flt = ratelimit.build(settings, context)
        flt.threads_reactor = reactor
        return flt

    @defer.inlineCallbacks
    def test_two_processes_share_the_count(self):
        """Guards the cross-process limit: connections counted by two filter
        instances (as in two workers) add up; the window still moves on."""
        first = self.build(client_connections=3, client_window=60)
        second = self.build(client_connections=3, client_window=60)
        self.assertIsNotNone(first.shared)
        session = FilterSession(role="smtp", peer_host="192.0.2.7")
        verdicts = []
        for flt in (first, second, first, second):
            verdicts.append((yield defer.maybeDeferred(flt.connect, session)))
        self.assertEqual(verdicts[:3], [CONTINUE] * 3)
        self.assertEqual(verdicts[3].code, 421)
        self.assertIn("client [192.0.2.7]", verdicts[3].text)
        self.clock.advance(61)
        self.assertIs((yield defer.maybeDeferred(second.connect, session)), CONTINUE)

    @defer.inlineCallbacks
    def test_refused_event_counts_in_no_limit(self):
        """Guards the one-transaction check: a message refused by the sender limit
        is not counted against the client limit either."""
        flt = self.build(client_messages=2, sender_messages=1)
        session = FilterSession(role="smtp", peer_host="192.0.2.8")
        self.assertIs((yield defer.maybeDeferred(flt.mail_from, session, "a@x.test")),
                      CONTINUE)
        refused = yield defer.maybeDeferred(flt.mail_from, session, "a@x.test")
        self.assertEqual(refused.code, 450)
        self.assertIs((yield defer.maybeDeferred(flt.mail_from, session, "b@x.test")),
                      CONTINUE)

    def test_one_worker_keeps_memory(self):
        """Guards the default: a single process counts in memory (no file)."""
        context = FilterContext("mx.example.test", self.state_dir, reactor=self.clock,
                                threadpool=self.pool)
        self.assertIsNone(ratelimit.build({"client_connections": 1}, context).shared)
