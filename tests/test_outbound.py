"""Sending to the world, end to end: a DNS server and remote MX hosts on loopback.

The sending mailtwist (example.test) asks the test DNS server for MX records
and delivers to a second mailtwist (remote.test on 127.0.0.2) or to scripted
SMTP servers (127.0.0.3, ...) that answer 4xx/5xx on demand.
"""

from __future__ import annotations

import email
import email.policy
import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from tests.dnsserver import (
    PASSWORD,
    Script,
    TestDNSServer,
    free_port,
    listen_scripted,
    maildir_messages,
    start_mailtwist,
    wait_for,
)
from tests.support import client_tls_context

FAST_QUEUE = {"retry_first": 0.3, "retry_max": 1.0, "scan_interval": 0.5}


def submit(port: int, rcpts: list[str], message: bytes, sender: str = "alice@example.test",
           mail_options=(), rcpt_options=()) -> dict:
    """Send as alice through the submission port (STARTTLS, AUTH)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.starttls(context=client_tls_context())
        client.login(sender, PASSWORD)
        return client.sendmail(sender, rcpts, message, list(mail_options), list(rcpt_options))


def message(subject: str = "hello", body: bytes = b"Hello there.\r\n.a line with a dot\r\n",
            to: str = "carol@remote.test") -> bytes:
    return (f"From: Alice <alice@example.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n\r\n").encode() + body


class OutboundTestCase(unittest.TestCase):
    """A DNS server, a receiving mailtwist for remote.test and a sending one."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = TestDNSServer()
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.port = free_port("127.0.0.2")
        self.dns.mx("remote.test", 10, "mx.remote.test")
        self.dns.a("mx.remote.test", "127.0.0.2")
        self.receiver = yield start_mailtwist(
            self, domain="remote.test", hostname="mx.remote.test", accounts=("carol", "dave"),
            smtp=f"tcp:{self.port}:interface=127.0.0.2")
        self.sender = yield self.start_sender()

    def start_sender(self, **overrides):
        settings = {
            "outbound": {"dns_servers": [self.dns.address], "port": self.port,
                         "connect_timeout": 5, "command_timeout": 10, "dns_timeout": 3},
            "queue": dict(FAST_QUEUE),
        }
        for key, value in overrides.items():
            settings[key] = {**settings.get(key, {}), **value}
        return start_mailtwist(self, domain="example.test", hostname="mx.example.test",
                               data_dir=getattr(self, "sender_dir", None), **settings)

    def submit(self, rcpts, msg, **kwargs) -> defer.Deferred:
        port = self.sender.port_of("submission")
        return defer.maybeDeferred(lambda: None).addCallback(
            lambda _: self._in_thread(submit, port, rcpts, msg, **kwargs))

    def _in_thread(self, f, *args, **kwargs):
        from twisted.internet.threads import deferToThread
        return deferToThread(f, *args, **kwargs)

    def queue_ids(self, service=None) -> list[str]:
        return (service or self.sender).queue.spool.ids()

    def inbox(self, service, account) -> list[bytes]:
        return maildir_messages(service, account)


class DeliveryTests(OutboundTestCase):

    @defer.inlineCallbacks
    def test_delivery_over_starttls(self):
        refused = yield self.submit(["carol@remote.test"], message("over tls"))
        self.assertEqual(refused, {})
        yield wait_for(lambda: self.inbox(self.receiver, "carol@remote.test"))
        [received] = self.inbox(self.receiver, "carol@remote.test")
        self.assertIn(b"Subject: over tls", received)
        self.assertIn(b"\n.a line with a dot\n", received)
        self.assertIn(b"Return-Path: <alice@example.test>", received)
        top = received.split(b"\nReceived: ", 2)
        self.assertIn(b"by mx.remote.test (mailtwist) with ESMTPS id", top[1])
        yield wait_for(lambda: not self.queue_ids())

    @defer.inlineCallbacks
    def test_one_5xx_recipient_bounced_others_delivered(self):
        yield self.submit(["carol@remote.test", "nobody@remote.test", "dave@remote.test"],
                          message("partly"))
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"))
        yield wait_for(lambda: not self.queue_ids())
        self.assertEqual(len(self.inbox(self.receiver, "carol@remote.test")), 1)
        self.assertEqual(len(self.inbox(self.receiver, "dave@remote.test")), 1)
        [bounce] = self.inbox(self.sender, "alice@example.test")
        report = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        self.assertIn(b"Return-Path: <>", bounce)
        self.assertEqual(report["To"], "alice@example.test")
        self.assertEqual(report["Auto-Submitted"], "auto-replied")
        text, status, original = report.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertIn("nobody@remote.test", text.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        per_message, *per_recipient = status.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual(len(per_recipient), 1)
        [rcpt] = per_recipient
        self.assertEqual(rcpt["Final-Recipient"], "rfc822; nobody@remote.test")
        self.assertEqual(rcpt["Action"], "failed")
        self.assertEqual(rcpt["Status"], "5.1.1")
        self.assertEqual(rcpt["Remote-MTA"], "dns; mx.remote.test")
        self.assertTrue(rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 "),
                        rcpt["Diagnostic-Code"])
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: partly", original.get_content())
        self.assertNotIn("Hello there", original.get_content())

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        self.dns.null_mx("nomail.test")
        yield self.submit(["someone@nomail.test"], message("to nowhere"))
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"), timeout=5)
        [bounce] = self.inbox(self.sender, "alice@example.test")
        report = email.message_from_bytes(bounce, policy=email.policy.default)
        _, rcpt = report.get_payload()[1].get_payload()
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("failed", "5.1.10"))
        self.assertIn("null MX", report.get_payload()[0].get_content())
        yield wait_for(lambda: not self.queue_ids())

    @defer.inlineCallbacks
    def test_nonexistent_domain_bounces(self):
        yield self.submit(["someone@nxdomain.test"], message("nx"))
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"), timeout=5)
        report = email.message_from_bytes(self.inbox(self.sender, "alice@example.test")[0],
                                          policy=email.policy.default)
        _, rcpt = report.get_payload()[1].get_payload()
        self.assertEqual(rcpt["Status"], "5.1.2")


class RetryTests(OutboundTestCase):

    @defer.inlineCallbacks
    def test_retry_after_4xx_then_success(self):
        self.dns.mx("flaky.test", 10, "mx.flaky.test")
        self.dns.a("mx.flaky.test", "127.0.0.3")
        flaky = listen_scripted(self, "127.0.0.3", self.port, Script(
            rcpt={"erin@flaky.test": ["451 4.3.0 greylisted, try again later"]}))
        yield self.submit(["erin@flaky.test"], message("greylisted"))
        yield wait_for(lambda: flaky.received)
        self.assertEqual(flaky.connections, 2)
        [txn] = flaky.received
        self.assertIn(b"Subject: greylisted", txn.data)
        self.assertIn(b"\r\n..a line with a dot\r\n", self._raw_data(flaky))
        yield wait_for(lambda: not self.queue_ids())
        self.assertEqual(self.inbox(self.sender, "alice@example.test"), [])

    def _raw_data(self, factory) -> bytes:
        # The scripted server stores DATA as received (still dot-stuffed).
        return factory.received[-1].data

    @defer.inlineCallbacks
    def test_queue_survives_restart_and_delivers_once(self):
        self.dns.mx("down.test", 10, "mx.down.test")
        self.dns.a("mx.down.test", "127.0.0.3")
        script = Script(mail=["451 4.3.2 system not accepting messages"] * 100)
        down = listen_scripted(self, "127.0.0.3", self.port, script)
        yield self.submit(["frank@down.test"], message("persistent"))
        [entry_id] = self.queue_ids()
        yield wait_for(lambda: down.connections >= 1)
        spool = self.sender.queue.spool
        yield wait_for(lambda: "4.3.2" in (spool.load(entry_id).recipients[0].text or ""))
        self.sender_dir = self.sender.config.data_dir
        yield self.sender.stopService()
        envelope = self.sender.queue.spool.load(entry_id)
        self.assertEqual(envelope.recipients[0].status, "pending")
        self.assertIn("4.3.2", envelope.recipients[0].text)
        script.mail.clear()
        self.sender = yield self.start_sender()
        yield wait_for(lambda: down.received)
        yield wait_for(lambda: not self.queue_ids())
        self.assertEqual(len(down.received), 1)
        self.assertEqual(self.inbox(self.sender, "alice@example.test"), [])


class RoutingTests(OutboundTestCase):
    """MX lookup through twisted.names against the test DNS server."""

    def resolver(self, rng=None):
        from mailtwist.outbound.mx import MXResolver
        return MXResolver(self.sender.queue.transport.mx.resolver, ipv6=True, timeout=3,
                          rng=rng)

    @defer.inlineCallbacks
    def test_preference_order_and_equal_preference_shuffle(self):
        import random
        for pref, host in ((20, "b1.pref.test"), (10, "a.pref.test"), (20, "b2.pref.test"),
                           (20, "b3.pref.test"), (30, "c.pref.test")):
            self.dns.mx("pref.test", pref, host)
        orders = set()
        for seed in range(12):
            hosts = yield defer.Deferred.fromCoroutine(
                self.resolver(random.Random(seed)).mx_hosts("pref.test"))
            self.assertEqual(hosts[0], "a.pref.test")
            self.assertEqual(sorted(hosts[1:4]), ["b1.pref.test", "b2.pref.test", "b3.pref.test"])
            self.assertEqual(hosts[4], "c.pref.test")
            orders.add(tuple(hosts[1:4]))
        self.assertGreater(len(orders), 1)

    @defer.inlineCallbacks
    def test_implicit_mx_and_ipv6_first(self):
        self.dns.a("plain.test", "127.0.0.9")
        self.dns.aaaa("plain.test", "::1")
        targets = yield defer.Deferred.fromCoroutine(self.resolver().targets("plain.test"))
        self.assertEqual([(t.host, t.address) for t in targets],
                         [("plain.test", "::1"), ("plain.test", "127.0.0.9")])

    @defer.inlineCallbacks
    def test_dns_failures(self):
        from mailtwist.outbound.mx import RoutingError
        self.dns.null_mx("null.test")
        self.dns.authority.broken.add("servfail.test")
        self.dns.mx("nohost.test", 10, "missing.nohost.test")
        expected = {"null.test": ("5.1.10", True), "nx.test": ("5.1.2", True),
                    "servfail.test": ("4.4.3", False), "nohost.test": ("5.4.4", True)}
        for domain, (status, permanent) in expected.items():
            try:
                yield defer.Deferred.fromCoroutine(self.resolver().targets(domain))
            except RoutingError as e:
                self.assertEqual((e.enhanced, e.permanent), (status, permanent), domain)
            else:
                self.fail(f"{domain} resolved")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class TransactionTests(OutboundTestCase):

    def scripted(self, domain: str, address: str, script: Script | None = None):
        self.dns.mx(domain, 10, f"mx.{domain}")
        self.dns.a(f"mx.{domain}", address)
        return listen_scripted(self, address, self.port, script)

    @defer.inlineCallbacks
    def test_recipients_of_one_domain_share_a_transaction_without_pipelining(self):
        server = self.scripted("plain.test", "127.0.0.3", Script(extensions=["8BITMIME"]))
        yield self.submit(["a@plain.test", "b@plain.test"], message("two"))
        yield wait_for(lambda: not self.queue_ids())
        [txn] = server.received
        self.assertEqual(len(txn.rcpts), 2)
        self.assertEqual(server.connections, 1)
        self.assertFalse(txn.tls)

    @defer.inlineCallbacks
    def test_dsn_parameters_passed_on_to_a_dsn_server(self):
        server = self.scripted("dsn.test", "127.0.0.3",
                               Script(extensions=["PIPELINING", "DSN", "SIZE 100000"]))
        yield self.submit(["a@dsn.test"], message("dsn"),
                          mail_options=["RET=HDRS", "ENVID=QQ+2B1"],
                          rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A@dsn.test"])
        yield wait_for(lambda: not self.queue_ids())
        mail = next(c for c in server.commands if c.startswith("MAIL"))
        rcpt = next(c for c in server.commands if c.startswith("RCPT"))
        self.assertRegex(mail, r"^MAIL FROM:<alice@example.test> SIZE=\d+ RET=HDRS ENVID=QQ\+2B1$")
        self.assertEqual(rcpt, "RCPT TO:<a@dsn.test> NOTIFY=SUCCESS,FAILURE "
                               "ORCPT=rfc822;A@dsn.test")
        self.assertEqual(self.inbox(self.sender, "alice@example.test"), [])

    @defer.inlineCallbacks
    def test_success_notice_when_the_next_hop_has_no_dsn(self):
        self.scripted("nodsn.test", "127.0.0.3")
        yield self.submit(["a@nodsn.test"], message("notify me"),
                          mail_options=["ENVID=my-envelope"],
                          rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;a@nodsn.test"])
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"))
        report = email.message_from_bytes(self.inbox(self.sender, "alice@example.test")[0],
                                          policy=email.policy.default)
        self.assertEqual(report["Subject"], "Successful Mail Delivery Report")
        per_message, rcpt = report.get_payload()[1].get_payload()
        self.assertEqual(per_message["Original-Envelope-Id"], "my-envelope")
        self.assertEqual((rcpt["Action"], rcpt["Original-Recipient"]),
                         ("relayed", "rfc822; a@nodsn.test"))

    @defer.inlineCallbacks
    def test_local_success_notice(self):
        yield self.submit(["bob@example.test"], message("local notify", to="bob@example.test"),
                          rcpt_options=["NOTIFY=SUCCESS"])
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"))
        report = email.message_from_bytes(self.inbox(self.sender, "alice@example.test")[0],
                                          policy=email.policy.default)
        _, rcpt = report.get_payload()[1].get_payload()
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("delivered", "2.0.0"))

    @defer.inlineCallbacks
    def test_dsn_parameters_refused_on_port_25(self):
        from tests.support import raw_exchange
        data = yield self._in_thread(raw_exchange, self.sender.port_of("smtp"), [
            b"EHLO c.test\r\n", b"MAIL FROM:<x@remote.test> RET=FULL\r\n"])
        self.assertNotIn(b"DSN", data)
        self.assertIn(b"555 5.5.4", data)

    @defer.inlineCallbacks
    def test_alias_to_a_remote_address_is_forwarded_from_port_25(self):
        self.sender.directory.add_alias("fwd@example.test", ["carol@remote.test"])

        def send():
            with smtplib.SMTP("127.0.0.1", self.sender.port_of("smtp"), timeout=10) as client:
                client.ehlo("client.elsewhere.test")
                return client.sendmail("someone@elsewhere.test", ["fwd@example.test"],
                                       message("forwarded"))
        self.assertEqual((yield self._in_thread(send)), {})
        yield wait_for(lambda: self.inbox(self.receiver, "carol@remote.test"))
        [stored] = self.inbox(self.receiver, "carol@remote.test")
        self.assertIn(b"Return-Path: <someone@elsewhere.test>", stored)
        self.assertNotIn(b"DKIM-Signature", stored)

    @defer.inlineCallbacks
    def test_mail_loop_refused_by_received_count(self):
        looped = b"".join(b"Received: from hop%d.test\r\n" % i for i in range(50))
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield self.submit(["carol@remote.test"], looped + message("loop"))
        self.assertEqual(caught.exception.smtp_code, 554)
        self.assertEqual(self.queue_ids(), [])


class FallbackTests(OutboundTestCase):

    @defer.inlineCallbacks
    def test_silent_host_times_out_and_the_next_mx_takes_the_mail(self):
        yield self.sender.stopService()
        self.sender_dir = self.sender.config.data_dir
        self.sender = yield self.start_sender(outbound={"command_timeout": 0.5})
        self.dns.mx("two.test", 10, "silent.two.test")
        self.dns.mx("two.test", 20, "backup.two.test")
        self.dns.a("silent.two.test", "127.0.0.5")
        self.dns.a("backup.two.test", "127.0.0.3")
        silent = listen_scripted(self, "127.0.0.5", self.port, Script(greeting=None))
        backup = listen_scripted(self, "127.0.0.3", self.port)
        yield self.submit(["x@two.test"], message("fallback"))
        yield wait_for(lambda: backup.received)
        self.assertEqual(silent.connections, 1)
        self.assertEqual(silent.commands, [])

    @defer.inlineCallbacks
    def test_delivery_over_ipv6(self):
        self.dns.mx("six.test", 10, "mx.six.test")
        self.dns.aaaa("mx.six.test", "::1")
        six = listen_scripted(self, "::1", self.port)
        yield self.submit(["x@six.test"], message("ipv6"))
        yield wait_for(lambda: six.received)
        self.assertIn(b"Subject: ipv6", six.received[0].data)


class TLSPolicyTests(OutboundTestCase):

    @defer.inlineCallbacks
    def restart_sender(self, **outbound):
        yield self.sender.stopService()
        self.sender_dir = self.sender.config.data_dir
        self.sender = yield self.start_sender(outbound=outbound)

    @defer.inlineCallbacks
    def test_verified_tls_with_the_receivers_certificate(self):
        yield self.restart_sender(tls="verify",
                                  tls_ca_file=str(self.receiver.config.cert_path))
        yield self.submit(["carol@remote.test"], message("verified"))
        yield wait_for(lambda: self.inbox(self.receiver, "carol@remote.test"))
        [received] = self.inbox(self.receiver, "carol@remote.test")
        self.assertIn(b"Subject: verified", received)
        top = received.split(b"\nReceived: ", 2)
        self.assertIn(b"by mx.remote.test (mailtwist) with ESMTPS id", top[1])

    @defer.inlineCallbacks
    def test_unverifiable_certificate_defers(self):
        yield self.restart_sender(tls="verify")
        yield self.submit(["carol@remote.test"], message("unverified"))
        [entry_id] = self.queue_ids()
        spool = self.sender.queue.spool
        yield wait_for(lambda: spool.load(entry_id).attempts >= 1)
        [rcpt] = spool.load(entry_id).recipients
        self.assertEqual(rcpt.status, "pending")
        self.assertIn("TLS handshake", rcpt.text)
        self.assertEqual(self.inbox(self.receiver, "carol@remote.test"), [])


class SmarthostTests(OutboundTestCase):

    @defer.inlineCallbacks
    def test_everything_goes_through_the_relay_with_auth_over_tls(self):
        from mailtwist.tls import server_context_factory
        receiver_config = self.receiver.config
        relay = listen_scripted(self, "127.0.0.4", self.port, Script(
            auth=("relayuser", "relay secret"),
            tls_context=server_context_factory(receiver_config.cert_path,
                                               receiver_config.key_path)))
        yield self.sender.stopService()
        self.sender_dir = self.sender.config.data_dir
        self.sender = yield self.start_sender(outbound={
            "relay_host": "127.0.0.4", "relay_port": self.port, "relay_username": "relayuser",
            "relay_password": "relay secret", "relay_domains": ["remote.test"]})
        yield self.submit(["carol@remote.test"], message("via relay"))
        yield wait_for(lambda: relay.received)
        [txn] = relay.received
        self.assertTrue(txn.tls)
        self.assertIn(b"Subject: via relay", txn.data)
        self.assertEqual(self.inbox(self.receiver, "carol@remote.test"), [])
