"""DKIM: keys, the DNS record, and signatures that verify at the receiving end."""

from __future__ import annotations

import dkim
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailtwist.dkim import DKIMSigner, from_domain, generate_key, public_records, zone_line
from tests.dnsserver import wait_for
from tests.test_outbound import OutboundTestCase, message

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: signed\r\n"
           b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nbody\r\n")


def txt_via(server: str, port: int):
    """A dkimpy dnsfunc that asks the test DNS server (blocking: run in a thread)."""
    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        response = dns.query.udp(query, server, port=port, timeout=timeout)
        if response.flags & dns.flags.TC:
            response = dns.query.tcp(query, server, port=port, timeout=timeout)
        for answer in response.answer:
            for record in answer:
                return b"".join(record.strings)
        return None
    return dnsfunc


class KeyTests(unittest.TestCase):
    def setUp(self):
        from pathlib import Path
        self.key_dir = Path(self.mktemp())

    def test_rsa_and_ed25519_sign_and_verify(self):
        records = {}
        for algorithm, selector in (("rsa", "r1"), ("ed25519", "e1")):
            path, value = generate_key(self.key_dir, "example.test", selector, algorithm)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            records[f"{selector}._domainkey.example.test."] = value.encode()
        signer = DKIMSigner(self.key_dir, lambda domain: domain == "example.test")
        signed = signer.sign(MESSAGE)
        self.assertEqual(signed.count(b"DKIM-Signature:"), 2)
        self.assertIn(b"a=rsa-sha256", signed)
        self.assertIn(b"a=ed25519-sha256", signed)

        def lookup(name, timeout=5):
            return records.get(name.decode())
        for index in range(2):
            verifier = dkim.DKIM(signed)
            self.assertTrue(verifier.verify(idx=index, dnsfunc=lookup))
        tampered = signed.replace(b"body", b"BODY")
        self.assertFalse(dkim.verify(tampered, dnsfunc=lookup))

    def test_only_local_from_domains_are_signed(self):
        generate_key(self.key_dir, "example.test", "r1", "rsa")
        signer = DKIMSigner(self.key_dir, lambda domain: False)
        self.assertEqual(signer.sign(MESSAGE), MESSAGE)
        other = MESSAGE.replace(b"alice@example.test", b"x@other.test")
        self.assertEqual(DKIMSigner(self.key_dir, lambda d: True).sign(other), other)

    def test_from_domain(self):
        self.assertEqual(from_domain(b"From: \"A, B\" <a@Example.TEST>\r\n\r\n"), "example.test")
        self.assertIsNone(from_domain(b"From: a@x.test, b@y.test\r\n\r\n"))
        self.assertIsNone(from_domain(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n"))
        self.assertEqual(from_domain(b"From: Long\r\n <a@folded.test>\r\n\r\n"), "folded.test")

    def test_zone_line_splits_long_values(self):
        generate_key(self.key_dir, "example.test", "r1", "rsa")
        [(selector, value)] = public_records(self.key_dir, "example.test")
        line = zone_line(selector, "example.test", value)
        self.assertTrue(line.startswith('r1._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p='))
        self.assertEqual(line.count('" "'), len(value) // 255)


class SignedDeliveryTests(OutboundTestCase):
    """Mail from alice@example.test arrives at remote.test with signatures that
    dkimpy verifies against the records the test DNS server publishes."""

    @defer.inlineCallbacks
    def test_signature_verifies_at_the_receiver(self):
        key_dir = self.sender.config.data_dir / "dkim"
        for algorithm, selector in (("rsa", "rsa-1"), ("ed25519", "ed-1")):
            _, value = generate_key(key_dir, "example.test", selector, algorithm)
            self.dns.txt(f"{selector}._domainkey.example.test", value)
        yield self.submit(["carol@remote.test"], message("dkim test"))
        yield wait_for(lambda: self.inbox(self.receiver, "carol@remote.test"))
        [stored] = self.inbox(self.receiver, "carol@remote.test")
        wire = stored.replace(b"\n", b"\r\n")
        self.assertEqual(wire.count(b"DKIM-Signature:"), 2)
        dnsfunc = txt_via("127.0.0.1", self.dns.port)
        for index in range(2):
            ok = yield deferToThread(dkim.DKIM(wire).verify, idx=index, dnsfunc=dnsfunc)
            self.assertTrue(ok, f"signature {index} does not verify")
        forged = wire.replace(b"Subject: dkim test", b"Subject: dkim TEST")
        ok = yield deferToThread(dkim.verify, forged, dnsfunc=dnsfunc)
        self.assertFalse(ok)
