"""The auth_results filter: SPF, DKIM and DMARC against a loopback DNS server."""

from __future__ import annotations

import base64
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from mailtwist.config import ConfigError
from mailtwist.dkim import generate_key, record_name
from mailtwist.filters import header_values
from mailtwist.filters.authentication import auth_results, authserv_id, org_domain
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.testing import FilterTestServer
from tests.dnsserver import TestDNSServer

HOSTNAME = "mx.example.test"
SELECTOR = "sel1"


def make_message(from_addr: str, subject: str = "hello", extra: bytes = b"") -> bytes:
    return extra + (f"From: {from_addr}\r\nTo: alice@example.test\r\n"
                    f"Subject: {subject}\r\nMessage-ID: <1@sender.test>\r\n\r\n"
                    "Hello Alice,\r\nlunch at noon?\r\n").encode()


class AuthResultsTests(unittest.TestCase):
    def setUp(self):
        self.dns = TestDNSServer()
        self.dns.start()
        self.addCleanup(self.dns.stop)
        key_path, record = generate_key(Path(self.mktemp()), "sender.test", SELECTOR,
                                        "ed25519")
        self.key = key_path
        self.dns.txt(record_name(SELECTOR, "sender.test"), record)
        self.dns.txt("sender.test", "v=spf1 ip4:127.0.0.1 -all")
        self.dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject; adkim=r; aspf=r")
        self.dns.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
        self.dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")

    def sign(self, message: bytes) -> bytes:
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return dkim.sign(message, SELECTOR.encode(), b"sender.test", base64.b64encode(seed),
                         signature_algorithm=b"ed25519-sha256", linesep=b"\r\n") + message

    def server(self, dns_address: str | None = None, **settings):
        config = {"filters": {
            "smtp": ["auth_results"],
            "auth_results": {"hostname": HOSTNAME,
                             "dns_servers": [dns_address or self.dns.address],
                             "dns_timeout": 2.0, **settings},
        }}
        return FilterTestServer(self, None, config=config).start()

    @staticmethod
    def results(stored) -> list[str]:
        return header_values(stored.content.replace(b"\n", b"\r\n"), "Authentication-Results")

    @defer.inlineCallbacks
    def test_signed_aligned_message_passes(self):
        server = yield self.server(dmarc_reject=True)
        result = yield server.send(self.sign(make_message("Bob <bob@sender.test>")),
                                   sender="bounces@sender.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "INBOX")
        [value] = self.results(stored)
        self.assertTrue(value.startswith(HOSTNAME + "; "), value)
        self.assertIn("spf=pass smtp.mailfrom=bounces@sender.test", value)
        self.assertIn("dkim=pass header.d=sender.test header.s=sel1", value)
        self.assertIn("dmarc=pass (p=reject) header.from=sender.test", value)
        # our header is above our Received (delivery adds Return-Path and Delivered-To)
        self.assertLess(stored.content.index(b"\nAuthentication-Results: "),
                        stored.content.index(b"\nReceived: "))

    @defer.inlineCallbacks
    def test_tampered_signature_fails_dkim(self):
        server = yield self.server()
        signed = self.sign(make_message("bob@sender.test"))
        result = yield server.send(signed.replace(b"lunch at noon", b"lunch at five"),
                                   sender="bounces@sender.test")
        [stored] = result.stored["alice@example.test"]
        [value] = self.results(stored)
        self.assertIn("dkim=fail header.d=sender.test", value)
        # SPF still passes aligned, so DMARC passes
        self.assertIn("dmarc=pass", value)

    @defer.inlineCallbacks
    def test_forged_from_rejected_with_dmarc_reject(self):
        server = yield self.server(dmarc_reject=True)
        result = yield server.send(make_message("Bank <security@bank.test>"),
                                   sender="phisher@sender.test")
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 550, "5.7.1"))
        self.assertIn("bank.test", result.text)
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_forged_from_filed_into_junk_without_dmarc_reject(self):
        server = yield self.server()
        result = yield server.send(make_message("Bank <security@bank.test>"),
                                   sender="phisher@sender.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Junk")
        [value] = self.results(stored)
        self.assertIn("spf=pass", value)
        self.assertIn("dkim=none", value)
        self.assertIn("dmarc=fail (p=reject) header.from=bank.test", value)

    @defer.inlineCallbacks
    def test_forged_results_for_our_hostname_are_removed(self):
        forged = (b"Authentication-Results: MX.example.test (forged); spf=pass; dkim=pass; "
                  b"dmarc=pass\r\n"
                  b"Authentication-Results: other.example; spf=fail\r\n")
        server = yield self.server()
        result = yield server.send(self.sign(make_message("bob@sender.test", extra=forged)),
                                   sender="bounces@sender.test")
        [stored] = result.stored["alice@example.test"]
        values = self.results(stored)
        self.assertEqual([authserv_id(v) for v in values], [HOSTNAME, "other.example"])
        self.assertNotIn(b"(forged)", stored.content)

    @defer.inlineCallbacks
    def test_spf_fail_reject_refuses_at_mail(self):
        server = yield self.server(spf_fail_reject=True)
        result = yield server.send(make_message("x@bank.test"), sender="x@bank.test")
        self.assertEqual((result.stage, result.code, result.enhanced), ("mail", 550, "5.7.23"))

    @defer.inlineCallbacks
    def test_spf_softfail_is_recorded_and_not_refused(self):
        """``~all`` for our address is spf=softfail in the header; spf_fail_reject
        refuses only a hard fail (as Postfix's policyd-spf does by default)."""
        self.dns.txt("soft.test", "v=spf1 ip4:192.0.2.1 ~all")
        server = yield self.server(spf_fail_reject=True)
        result = yield server.send(make_message("x@soft.test"), sender="x@soft.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        [value] = self.results(stored)
        self.assertIn("spf=softfail smtp.mailfrom=x@soft.test", value)

    @defer.inlineCallbacks
    def test_spf_fail_without_reject_is_recorded(self):
        """A hard SPF fail without spf_fail_reject is delivered with spf=fail."""
        server = yield self.server()
        result = yield server.send(make_message("x@bank.test"), sender="x@bank.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        [value] = self.results(stored)
        self.assertIn("spf=fail smtp.mailfrom=x@bank.test", value)

    @defer.inlineCallbacks
    def test_null_sender_checks_helo(self):
        self.dns.txt("client.example.test", "v=spf1 -all")
        server = yield self.server()
        result = yield server.send(make_message("bob@sender.test"), sender="")
        [stored] = result.stored["alice@example.test"]
        [value] = self.results(stored)
        self.assertIn("spf=fail smtp.helo=client.example.test", value)

    def silent_dns(self) -> str:
        """A UDP port on loopback that never answers."""
        port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def test_dns_timeout_is_temperror(self):
        server = yield self.server(self.silent_dns(), dns_timeout=0.3)
        result = yield server.send(self.sign(make_message("bob@sender.test")),
                                   sender="bounces@sender.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "INBOX")
        [value] = self.results(stored)
        self.assertIn("spf=temperror", value)
        self.assertIn("dkim=temperror header.d=sender.test", value)
        self.assertIn("dmarc=temperror", value)

    @defer.inlineCallbacks
    def test_dns_timeout_tempfails_when_dmarc_may_reject(self):
        server = yield self.server(self.silent_dns(), dns_timeout=0.3, dmarc_reject=True)
        result = yield server.send(make_message("bob@sender.test"),
                                   sender="bounces@sender.test")
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_servfail_is_temperror(self):
        self.dns.authority.broken.add("_dmarc.sender.test")
        server = yield self.server()
        result = yield server.send(make_message("bob@sender.test"),
                                   sender="bounces@sender.test")
        [stored] = result.stored["alice@example.test"]
        [value] = self.results(stored)
        self.assertIn("spf=pass", value)
        self.assertIn("dmarc=temperror", value)
        self.flushLoggedErrors(RuntimeError)  # the test DNS server logs its SERVFAIL


class SettingsTests(unittest.TestCase):
    def test_installed_as_plugin(self):
        self.assertIs(installed_factories()["auth_results"], auth_results)

    def test_server_context_fills_hostname_and_dns_servers(self):
        """Guards the FilterContext: without its own settings the filter uses the
        server's host name and [outbound] DNS servers."""
        from mailtwist.interfaces import FilterContext

        context = FilterContext(hostname="mx.context.test", state_dir=self.mktemp(),
                                dns_servers=("127.0.0.9:5353",))
        flt = build_filter("auth_results", {}, context=context)
        self.assertEqual(flt.hostname, "mx.context.test")
        servers = [(ns.address, ns.port) for ns in flt.resolver._resolver.nameservers]
        self.assertEqual(servers, [("127.0.0.9", 5353)])
        own = build_filter("auth_results", {"hostname": "own.test",
                                            "dns_servers": ["127.0.0.8:53"]}, context=context)
        self.assertEqual(own.hostname, "own.test")
        self.assertEqual([ns.address for ns in own.resolver._resolver.nameservers],
                         ["127.0.0.8"])

    def test_bad_nameserver_refused(self):
        with self.assertRaises(ConfigError) as e:
            build_filter("auth_results", {"dns_servers": ["not an address"]})
        self.assertIn("filters.auth_results.dns_servers", str(e.exception))

    def test_bad_type_refused(self):
        with self.assertRaises(ConfigError) as e:
            build_filter("auth_results", {"dmarc_reject": "yes"})
        self.assertIn("filters.auth_results.dmarc_reject", str(e.exception))

    def test_bad_timeout_refused(self):
        with self.assertRaises(ConfigError) as e:
            build_filter("auth_results", {"dns_timeout": 0})
        self.assertIn("filters.auth_results.dns_timeout", str(e.exception))


class HelperTests(unittest.TestCase):
    def test_org_domain(self):
        self.assertEqual(org_domain("mail.Sender.test."), "sender.test")
        self.assertEqual(org_domain("sender.test"), "sender.test")

    def test_authserv_id(self):
        self.assertEqual(authserv_id("(c) MX.example.test 1; spf=pass"), "mx.example.test")
        self.assertEqual(authserv_id("mx.example.test; none"), "mx.example.test")
