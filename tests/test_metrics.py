"""Prometheus metrics at /metrics of the [web] listener."""

from __future__ import annotations

import poplib
import smtplib
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.queue.envelope import Envelope, Recipient
from mailtwist.queue.spool import new_id
from tests.support import DOMAIN, PASSWORD, ServerMixin, client_tls_context

WEB = {"listen": ["tcp:0:interface=127.0.0.1"]}
MESSAGE = (b"From: someone@elsewhere.test\r\nTo: alice@example.test\r\n"
           b"Subject: counted\r\n\r\nhello\r\n")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from /metrics (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("someone@elsewhere.test", [f"alice@{DOMAIN}"], MESSAGE)


def pop3_login(port: int, password: str) -> bool:
    client = poplib.POP3_SSL("127.0.0.1", port, timeout=10, context=client_tls_context())
    try:
        client.user(f"alice@{DOMAIN}")
        client.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        client.close()


class MetricsTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_server(web=WEB)

    def scrape(self) -> defer.Deferred:
        return self.in_thread(scrape, self.port("web"))

    @defer.inlineCallbacks
    def test_delivery_and_connections_are_counted(self):
        before = yield self.scrape()
        self.assertEqual(before[("mailtwist_messages_delivered_total", ())], 0)
        yield self.in_thread(send, self.port("smtp"))
        self.assertEqual(len(self.maildir_files(f"alice@{DOMAIN}")), 1)
        after = yield self.scrape()
        self.assertEqual(after[("mailtwist_messages_delivered_total", ())], 1)
        self.assertEqual(
            after[("mailtwist_messages_received_total", (("role", "smtp"),))], 1)
        self.assertEqual(after[("mailtwist_connections_total", (("role", "smtp"),))], 1)
        # each scrape is a connection of the web listener
        self.assertEqual(after[("mailtwist_connections_total", (("role", "web"),))], 2)
        # every listener role has its series from the start, at zero until used
        self.assertEqual(after[("mailtwist_connections_total", (("role", "imap"),))], 0)

    @defer.inlineCallbacks
    def test_transactions_and_local_latency_are_counted(self):
        """Guards the transaction counter and the local delivery latency histogram
        (fed by the smtp.transaction event and the delivery proxy)."""
        yield self.in_thread(send, self.port("smtp"))
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            yield self.in_thread(self.send_to, "nobody@example.test")
        found = yield self.scrape()
        self.assertEqual(found[("mailtwist_smtp_transactions_total",
                                (("result", "accepted"), ("role", "smtp")))], 1)
        self.assertEqual(found[("mailtwist_local_delivery_seconds_count", ())], 1)

    def send_to(self, address: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
            client.sendmail("someone@elsewhere.test", [address], MESSAGE)

    def test_outbound_and_filter_events_are_counted(self):
        """Guards the outbound outcome counter, the outbound latency histogram and
        the filter verdict counter (fed by delivery.attempt and filter.verdict)."""
        from mailtwist import events
        from mailtwist.interfaces import Reject

        metrics = self.server.metrics
        common = dict(queue_id="Q1", relay="mx.far.test", code=250, enhanced="2.0.0",
                      text="ok", attempt=1, size=10)
        events.delivery_attempt(recipient="a@far.test", status="delivered", age=42.0,
                                **common)
        events.delivery_attempt(recipient="b@far.test", status="pending", **common)
        events.delivery_attempt(recipient="c@far.test", status="failed", **common)
        events.filter_verdict(filter_name="dnsbl", stage="connect",
                              verdict=Reject("listed", 554, "5.7.1"))
        value = metrics.registry.get_sample_value
        for outcome in ("delivered", "deferred", "bounced"):
            self.assertEqual(value("mailtwist_outbound_attempts_total",
                                   {"outcome": outcome}), 1)
        self.assertEqual(value("mailtwist_outbound_delivery_seconds_sum"), 42.0)
        self.assertEqual(value("mailtwist_filter_verdicts_total",
                               {"filter": "dnsbl", "stage": "connect",
                                "verdict": "Reject"}), 1)

    @defer.inlineCallbacks
    def test_logins_are_counted(self):
        ok = yield self.in_thread(pop3_login, self.port("pop3s"), PASSWORD)
        self.assertTrue(ok)
        ok = yield self.in_thread(pop3_login, self.port("pop3s"), "wrong password")
        self.assertFalse(ok)
        found = yield self.scrape()
        self.assertEqual(found[("mailtwist_auth_total", (("result", "success"),))], 1)
        self.assertEqual(found[("mailtwist_auth_total", (("result", "failure"),))], 1)
        self.assertEqual(found[("mailtwist_connections_total", (("role", "pop3s"),))], 2)

    @defer.inlineCallbacks
    def test_queue_size(self):
        found = yield self.scrape()
        self.assertEqual(found[("mailtwist_queue_messages", ())], 0)
        later = time.time() + 3600
        envelope = Envelope(id=new_id(), sender="alice@example.test",
                            recipients=[Recipient("bob@elsewhere.test")],
                            created=time.time(), next_attempt=later)
        yield self.in_thread(self.server.queue.spool.enqueue, MESSAGE, envelope)
        found = yield self.scrape()
        self.assertEqual(found[("mailtwist_queue_messages", ())], 1)

    def test_private_registry_per_service(self):
        from prometheus_client import REGISTRY

        self.assertIsNot(self.server.metrics.registry, REGISTRY)
        self.assertIsNone(REGISTRY.get_sample_value("mailtwist_messages_delivered_total"))
