"""The dnsbl filter: DNSBL/DNSWL lookups against a loopback DNS server, through
the real SMTP server."""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.filters import header_values
from mailtwist.filters.dnsbl import (
    DNSBLFilter,
    dnsbl,
    dnswl_listed,
    parse_zone,
    reverse_name,
)
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.interfaces import (
    CONTINUE,
    FilterContext,
    FilterSession,
    IFilter,
    IFilterFactory,
    Reject,
)
from mailtwist.testing import FilterTestServer
from tests.dnsserver import TestDNSServer
from tests.support import assert_one_line_config_errors


class SilentDNS(protocol.DatagramProtocol):
    """A DNS server that never answers (and counts the queries it ignored)."""

    queries = 0

    def datagramReceived(self, data, addr):
        self.queries += 1


MESSAGE = b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class ZoneSyntaxTests(unittest.TestCase):
    def test_filter_and_weight(self):
        """Postfix's zone=filter*weight syntax: ranges, lists and the weight."""
        zone = parse_zone("zen.spamhaus.org=127.0.0.[2..4;10]*3")
        self.assertEqual((zone.name, zone.weight), ("zen.spamhaus.org", 3))
        self.assertEqual([zone.matches(f"127.0.0.{n}") for n in (1, 2, 4, 5, 10)],
                         [False, True, True, False, True])
        self.assertFalse(zone.matches("127.0.1.2"))

    def test_without_filter_error_codes_do_not_count(self):
        """Without a filter any 127/8 answer counts, but not 127.255.255.x error codes."""
        zone = parse_zone("bl.example")
        self.assertTrue(zone.matches("127.0.0.2"))
        self.assertFalse(zone.matches("127.255.255.254"))
        self.assertFalse(zone.matches("192.0.2.1"))

    def test_bad_zones_are_refused(self):
        """Malformed entries raise ValueError naming the entry."""
        for spec in ("bl.example=127.0.0", "bl.example=127.0.0.[1..300]", "bl.example*x",
                     "bad zone", "bl.example=127.0.0.[a]", ""):
            with self.assertRaises(ValueError, msg=spec):
                parse_zone(spec)

    def test_reverse_names(self):
        """IPv4 octets and IPv6 nibbles are reversed."""
        self.assertEqual(reverse_name(ipaddress.ip_address("192.0.2.1")), "1.2.0.192")
        self.assertEqual(reverse_name(ipaddress.ip_address("2001:db8::1")),
                         "1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2")


class DNSBLTests(unittest.TestCase):
    def setUp(self):
        self.dns = TestDNSServer()
        self.dns.start()
        self.addCleanup(self.dns.stop)
        # the test client connects from 127.0.0.1
        self.dns.a("1.0.0.127.bl.test", "127.0.0.2")
        self.dns.txt("1.0.0.127.bl.test", "https://bl.test/query/127.0.0.1")
        self.dns.a("1.0.0.127.other.test", "127.0.0.12")
        self.dns.a("1.0.0.127.wl.test", "127.0.10.2")

    def server(self, role: str = "smtp", dns_address: str | None = None,
               dns_timeout: float = 2.0, **settings):
        config = {
            "outbound": {"dns_servers": [dns_address or self.dns.address],
                         "dns_timeout": dns_timeout},
            "filters": {role: ["dnsbl"], "dnsbl": settings},
        }
        return FilterTestServer(self, None, role=role, config=config).start()

    def build(self, **settings) -> DNSBLFilter:
        context = FilterContext("mx.example.test", self.mktemp(),
                                dns_servers=(self.dns.address,), dns_timeout=2.0,
                                reactor=reactor)
        return dnsbl.build(settings, context)

    def test_provides_interfaces(self):
        """The factory is installed as a plugin and builds an IFilter."""
        self.assertIs(installed_factories()["dnsbl"], dnsbl)
        verifyObject(IFilterFactory, dnsbl)
        verifyObject(IFilter, self.build(zones=["bl.test"]))

    @defer.inlineCallbacks
    def test_listed_client_rejected_at_connect(self):
        """A listed client gets 554 5.7.1 naming the zone and the list's TXT text."""
        server = yield self.server(zones=["bl.test"])
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("connect", 554, "5.7.1"))
        self.assertIn("[127.0.0.1] blocked using bl.test", result.text)
        self.assertIn("https://bl.test/query/127.0.0.1", result.text)
        self.assertEqual(result.stored["alice@example.test"], [])
        self.assertIn(("1.0.0.127.bl.test", dns.A), self.dns.authority.queries)

    @defer.inlineCallbacks
    def test_configured_url_in_reply(self):
        """A zone's configured lookup URL replaces the TXT text, with the address filled in."""
        server = yield self.server(zones=["bl.test"],
                                   urls={"bl.test": "https://lookup.test/?ip={ip}"})
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 554)
        self.assertIn("; https://lookup.test/?ip=127.0.0.1", result.text)

    @defer.inlineCallbacks
    def test_unlisted_client_accepted(self):
        """A client no zone lists is accepted (NXDOMAIN is 'not listed')."""
        server = yield self.server(zones=["clean.test"])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertIn(("1.0.0.127.clean.test", dns.A), self.dns.authority.queries)

    @defer.inlineCallbacks
    def test_return_code_filter(self):
        """An answer outside the zone's return-code filter does not count."""
        server = yield self.server(zones=["other.test=127.0.0.[2..11]"])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        server = yield self.server(zones=["other.test=127.0.0.[2..12]"])
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 554)

    @defer.inlineCallbacks
    def test_weights_and_threshold(self):
        """Weights add up; the client is refused only at the threshold."""
        server = yield self.server(zones=["bl.test*2", "clean.test*2"], threshold=3)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        server = yield self.server(zones=["bl.test*2", "other.test*1"], threshold=3)
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code, 554)
        self.assertIn("blocked using bl.test, other.test", result.text)

    @defer.inlineCallbacks
    def test_dnswl_skips_dnsbl_verdict(self):
        """A DNSWL-listed client is accepted although a DNSBL lists it."""
        server = yield self.server(zones=["bl.test"],
                                   dnswl_zones=["wl.test=127.0.[0..255].[1..3]"])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)

    @defer.inlineCallbacks
    def test_dnswl_marks_session(self):
        """A DNSWL listing is recorded in the session for the greylist filter."""
        flt = self.build(zones=["bl.test"], dnswl_zones=["wl.test"])
        session = FilterSession("smtp", "127.0.0.1")
        verdict = yield flt.connect(session)
        self.assertIs(verdict, CONTINUE)
        self.assertTrue(dnswl_listed(session))
        other = FilterSession("smtp", "127.0.0.1")
        verdict = yield self.build(zones=["bl.test"], dnswl_zones=["nowl.test"]).connect(other)
        self.assertIsInstance(verdict, Reject)
        self.assertFalse(dnswl_listed(other))

    @defer.inlineCallbacks
    def test_servfail_fails_open(self):
        """A SERVFAIL from the DNSBL never refuses the client."""
        self.dns.authority.broken.add("1.0.0.127.bl.test")
        server = yield self.server(zones=["bl.test"])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertIn(("1.0.0.127.bl.test", dns.A), self.dns.authority.queries)
        self.flushLoggedErrors(RuntimeError)  # the test DNS server logs its failure

    @defer.inlineCallbacks
    def test_timeout_fails_open(self):
        """A DNS server that never answers: the lookup times out and the client is accepted."""
        silent = SilentDNS()
        port = reactor.listenUDP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        events: list[str] = []

        def observe(event):
            events.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        server = yield self.server(zones=["bl.test"],
                                   dns_address=f"127.0.0.1:{port.getHost().port}",
                                   dns_timeout=0.6)
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertGreaterEqual(silent.queries, 1)
        self.assertTrue([e for e in events if "lookup of 1.0.0.127.bl.test failed (timed out)"
                         in e], events)

    @defer.inlineCallbacks
    def test_tempfail_action(self):
        """action = "tempfail" answers 421 4.7.1 at connect."""
        server = yield self.server(zones=["bl.test"], action="tempfail")
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("connect", 421, "4.7.1"))

    @defer.inlineCallbacks
    def test_rcpt_stage(self):
        """stage = "rcpt" refuses at RCPT (554 5.7.1), not at connect."""
        server = yield self.server(zones=["bl.test"], stage="rcpt")
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("rcpt", 554, "5.7.1"))

    @defer.inlineCallbacks
    def test_authenticated_session_not_checked(self):
        """With stage = "rcpt" an authenticated client is never looked up."""
        server = yield self.server(role="submission", zones=["bl.test"], stage="rcpt")
        result = yield server.send(MESSAGE, login="bob@example.test",
                                   sender="bob@example.test")
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.dns.authority.queries, [])

    @defer.inlineCallbacks
    def test_trusted_network_not_checked(self):
        """A client in trusted_networks is never looked up; loopback is not exempt by default."""
        server = yield self.server(zones=["bl.test"], trusted_networks=["127.0.0.0/8"])
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.dns.authority.queries, [])

    @defer.inlineCallbacks
    def test_tag_action_adds_header(self):
        """action = "tag" delivers with a header naming the listing; forged ones are removed."""
        server = yield self.server(zones=["bl.test"], action="tag")
        result = yield server.send(b"X-Mailtwist-DNSBL: forged\r\n" + MESSAGE)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        values = header_values(stored.content.replace(b"\n", b"\r\n"), "X-Mailtwist-DNSBL")
        self.assertEqual(values, ["bl.test=127.0.0.2 (client 127.0.0.1, score 1)"])

    @defer.inlineCallbacks
    def test_ipv6_client(self):
        """An IPv6 client is looked up by its reversed nibbles."""
        self.dns.a("1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.bl.test", "127.0.0.2")
        flt = self.build(zones=["bl.test"])
        verdict = yield flt.connect(FilterSession("smtp", "2001:db8::1"))
        self.assertEqual((verdict.code, verdict.enhanced), (554, "5.7.1"))
        self.assertIn("[2001:db8::1] blocked using bl.test", verdict.text)
        verdict = yield flt.connect(FilterSession("smtp", "2001:db8::2"))
        self.assertIs(verdict, CONTINUE)

    def test_settings_errors_are_one_line(self):
        """Bad settings give one ConfigError line naming filters.dnsbl.<key>."""
        cases = {
            "filters.dnsbl.zones: octet range '1..300'": {"zones": ["bl.test=127.0.0.[1..300]"]},
            "filters.dnsbl.zones: no zones configured": {},
            "filters.dnsbl.action: must be reject, tempfail or tag": {"zones": ["bl.test"],
                                                                      "action": "drop"},
            "filters.dnsbl.trusted_networks: bad network": {"zones": ["bl.test"],
                                                             "trusted_networks": ["10.0.0/33"]},
            "filters.dnsbl.threshold: expected an integer": {"zones": ["bl.test"],
                                                             "threshold": "2"},
            "filters.dnsbl.zone: unknown setting": {"zone": "bl.test"},
        }
        assert_one_line_config_errors(self, lambda s: build_filter("dnsbl", s), cases)
