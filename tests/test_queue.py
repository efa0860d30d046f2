"""The queue's parts on their own: spool files, envelopes, the retry scheduler
(on a task.Clock), reports, and the SMTP client's byte rules."""

from __future__ import annotations

import email
import email.policy
import json
import os
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailtwist.config import QueueSettings
from mailtwist.dsn import (
    DSNParameterError,
    ReportItem,
    build_report,
    parse_envid,
    parse_notify,
    parse_orcpt,
)
from mailtwist.outbound.client import Outcome
from mailtwist.outbound.wire import (
    ProtocolError,
    ReplyParser,
    dot_stuff,
    xtext_decode,
    xtext_encode,
)
from mailtwist.queue.dispatch import received_count
from mailtwist.queue.envelope import Envelope, EnvelopeError, Recipient
from mailtwist.queue.runner import QueueRunner, backoff
from mailtwist.queue.spool import ORPHAN_AGE, Spool, SpoolError

MESSAGE = b"From: a@example.test\r\nSubject: test\r\n\r\nbody\r\n"


def envelope(entry_id="ABC123", sender="alice@example.test", rcpts=("x@remote.test",),
             created=1000.0, **kwargs) -> Envelope:
    return Envelope(id=entry_id, sender=sender, recipients=[Recipient(r) for r in rcpts],
                    created=created, next_attempt=created, **kwargs)


class WireTests(unittest.TestCase):
    def test_multiline_reply(self):
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-mx.test hi\r\n250-PIPELINING\r"), [])
        [reply] = parser.feed(b"\n250 DSN\r\n")
        self.assertEqual((reply.code, reply.lines), (250, ("mx.test hi", "PIPELINING", "DSN")))

    def test_enhanced_code_and_text(self):
        [reply] = ReplyParser().feed(b"550 5.1.1 <x@y>: no such user\r\n")
        self.assertEqual((reply.enhanced, reply.text), ("5.1.1", "<x@y>: no such user"))
        [mismatch] = ReplyParser().feed(b"451 5.1.1 odd\r\n")
        self.assertIsNone(mismatch.enhanced)

    def test_malformed_reply(self):
        self.assertRaises(ProtocolError, ReplyParser().feed, b"hello\r\n")
        self.assertRaises(ProtocolError, ReplyParser().feed, b"250-a\r\n251 b\r\n")
        self.assertRaises(ProtocolError, ReplyParser().feed, b"2" * 5000)

    def test_dot_stuffing_and_line_ends(self):
        self.assertEqual(dot_stuff(b".first\r\nmid\r\n.\r\n..two\r\n"),
                         b"..first\r\nmid\r\n..\r\n...two\r\n.\r\n")
        self.assertEqual(dot_stuff(b"a\nb\r.c\r\nno end"), b"a\r\nb\r\n..c\r\nno end\r\n.\r\n")
        self.assertEqual(dot_stuff(b""), b".\r\n")

    def test_xtext(self):
        for text in ("plain", "a+b=c", "sp ace", "ünï"):
            self.assertEqual(xtext_decode(xtext_encode(text)), text)
        self.assertEqual(xtext_encode("a+b"), "a+2Bb")
        self.assertRaises(ValueError, xtext_decode, "+zz")

    def test_received_count(self):
        msg = b"Received: a\r\nreceived: b\r\n\tcont\r\nX: y\r\n\r\nReceived: not a header\r\n"
        self.assertEqual(received_count(msg), 2)


class DSNParameterTests(unittest.TestCase):
    def test_notify(self):
        self.assertEqual(parse_notify("success,Delay"), ["SUCCESS", "DELAY"])
        self.assertEqual(parse_notify("NEVER"), ["NEVER"])
        for bad in ("NEVER,SUCCESS", "", "SOMETIMES", "SUCCESS,SUCCESS"):
            self.assertRaises(DSNParameterError, parse_notify, bad)

    def test_orcpt_and_envid(self):
        self.assertEqual(parse_orcpt("rfc822;a+2Bb@example.test"), "rfc822;a+b@example.test")
        self.assertRaises(DSNParameterError, parse_orcpt, "nosemicolon")
        self.assertEqual(parse_envid("QQ+3D1"), "QQ=1")
        self.assertRaises(DSNParameterError, parse_envid, "x" * 101)


class EnvelopeTests(unittest.TestCase):
    def test_round_trip(self):
        env = envelope(ret="HDRS", envid="E1")
        env.recipients[0].notify = ["SUCCESS"]
        data = env.to_json()
        self.assertEqual(json.loads(data)["recipients"][0]["address"], "x@remote.test")
        self.assertEqual(Envelope.from_json(data), env)

    def test_rejects_bad_files(self):
        good = json.loads(envelope().to_json())
        for change in ({"version": 99}, {"recipients": []}, {"sender": 5},
                       {"recipients": [{"address": "x", "status": "lost"}]}):
            self.assertRaises(EnvelopeError, Envelope.from_json,
                              json.dumps({**good, **change}).encode())
        self.assertRaises(EnvelopeError, Envelope.from_json, b"\x80not json")


class SpoolTests(unittest.TestCase):
    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))

    def test_enqueue_load_save_remove(self):
        entry_id = self.spool.enqueue(MESSAGE, envelope())
        self.assertEqual(self.spool.ids(), [entry_id])
        self.assertEqual(self.spool.read_message(entry_id), MESSAGE)
        self.assertEqual(self.spool.read_headers(entry_id),
                         b"From: a@example.test\r\nSubject: test\r\n")
        env = self.spool.load(entry_id)
        env.attempts = 3
        before = self.spool.stamp(entry_id)
        self.spool.save(env)
        self.assertNotEqual(self.spool.stamp(entry_id), before)
        self.assertEqual(self.spool.load(entry_id).attempts, 3)
        self.spool.remove(entry_id)
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(os.listdir(self.spool.root), ["tmp"])
        self.assertRaises(SpoolError, self.spool.load, entry_id)

    def test_taken_id_gets_a_new_one(self):
        first = self.spool.enqueue(MESSAGE, envelope())
        second = self.spool.enqueue(MESSAGE, envelope())
        self.assertNotEqual(first, second)
        self.assertEqual(len(self.spool.ids()), 2)

    def test_lock_excludes_a_second_holder(self):
        entry_id = self.spool.enqueue(MESSAGE, envelope())
        with self.spool.lock(entry_id) as held:
            self.assertIsNotNone(held)
            self.assertIsNone(self.spool.lock(entry_id, wait=0.1))
        self.assertIsNotNone(self.spool.lock(entry_id))
        self.assertRaises(SpoolError, self.spool.lock, "NOSUCH")
        self.assertRaises(SpoolError, self.spool.lock, "../etc")

    def test_clean_removes_only_old_orphans(self):
        entry_id = self.spool.enqueue(MESSAGE, envelope())
        orphan = self.spool.root / "DEAD.msg"
        orphan.write_bytes(b"x")
        fresh = self.spool.root / "FRESH.msg"
        fresh.write_bytes(b"x")
        old = time.time() - ORPHAN_AGE - 10
        os.utime(orphan, (old, old))
        self.assertEqual(self.spool.clean(), ["DEAD.msg"])
        self.assertTrue(fresh.exists())
        self.assertEqual(self.spool.ids(), [entry_id])


class ReportTests(unittest.TestCase):
    def test_failure_report_structure(self):
        r = Recipient("x@remote.test", orcpt="rfc822;X@remote.test", status="failed", code=550,
                      enhanced="5.1.1", text="550 5.1.1 no such user",
                      remote_mta="mx.remote.test", updated=2000.0)
        data = build_report(hostname="mx.example.test", to="alice@example.test",
                            items=[ReportItem(r, "failed")], headers=MESSAGE.split(b"\r\n\r\n")[0],
                            envid="ENV-1", arrival=1000.0, now=2000.0)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        report = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(report["Subject"], "Undelivered Mail Returned to Sender")
        _, status, headers = report.get_payload()
        per_message, rcpt = status.get_payload()
        self.assertEqual(per_message["Original-Envelope-Id"], "ENV-1")
        self.assertEqual(rcpt["Original-Recipient"], "rfc822; X@remote.test")
        self.assertEqual(rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")

    def test_full_message_on_ret_full(self):
        r = Recipient("x@remote.test", status="failed", enhanced="5.0.0")
        data = build_report(hostname="h.test", to="a@example.test", items=[ReportItem(r, "failed")],
                            headers=b"Subject: test\r\n", message=MESSAGE)
        report = email.message_from_bytes(data, policy=email.policy.default)
        original = report.get_payload()[2]
        self.assertEqual(original.get_content_type(), "message/rfc822")
        self.assertIn(b"body", data)


class FakeTransport:
    """Answers every recipient with the next scripted outcome (default: 451)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.outcomes: list[Outcome] = []
        self.aborted = 0
        self.closing = False

    async def deliver(self, domain, messages):
        rcpts = [r.address for m in messages for r in m.recipients]
        self.calls.append((domain, rcpts))
        outcome = (self.outcomes.pop(0) if self.outcomes
                   else Outcome("pending", 451, "4.3.0", "451 4.3.0 later", "mx." + domain))
        return {address: outcome for address in rcpts}

    def abort_all(self) -> None:
        self.aborted += 1


class NoticeSink:
    """Takes the runner's notices instead of a mailbox."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, bytes]] = []

    def send_notice(self, report: bytes, to: str) -> defer.Deferred:
        self.notices.append((to, report))
        return defer.succeed(None)

    def actions(self) -> list[str]:
        result = []
        for _, report in self.notices:
            msg = email.message_from_bytes(report, policy=email.policy.default)
            result += [part["Action"] for part in msg.get_payload()[1].get_payload()[1:]]
        return result


class SchedulerTests(unittest.TestCase):
    """The retry schedule on a task.Clock; spool and threads are real."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.spool = Spool(Path(self.mktemp()))
        self.transport = FakeTransport()
        self.sink = NoticeSink()
        self.settings = QueueSettings(retry_first=300, retry_max=1200, max_age=4000,
                                      delay_warning=1000, scan_interval=60)
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-queue")
        self.runner = QueueRunner(self.spool, self.settings, self.transport, self.sink,
                                  "mx.example.test", reactor, pool, clock=self.clock)

    @defer.inlineCallbacks
    def start(self, env: Envelope):
        self.spool.enqueue(MESSAGE, env)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        yield self.runner.idle()
        yield self.step(0)

    @defer.inlineCallbacks
    def step(self, seconds: float):
        self.clock.advance(seconds)
        yield self.runner.idle()

    def test_backoff_doubles_and_is_capped(self):
        self.assertEqual([backoff(n, 300, 1200) for n in range(1, 6)],
                         [300, 600, 1200, 1200, 1200])

    @defer.inlineCallbacks
    def test_retries_then_warns_then_gives_up(self):
        yield self.start(envelope())
        self.assertEqual(len(self.transport.calls), 1)
        yield self.step(299)
        self.assertEqual(len(self.transport.calls), 1)
        yield self.step(1)
        self.assertEqual(len(self.transport.calls), 2)
        yield self.step(599)
        self.assertEqual(len(self.transport.calls), 2)
        yield self.step(1)
        self.assertEqual(len(self.transport.calls), 3)
        self.assertEqual(self.sink.notices, [])
        yield self.step(1200)
        self.assertEqual(len(self.transport.calls), 4)
        self.assertEqual(self.sink.actions(), ["delayed"])
        env = self.spool.load("ABC123")
        self.assertTrue(env.warned)
        self.assertEqual(env.next_attempt, self.clock.seconds() + 1200)
        yield self.step(1200)
        self.assertEqual(len(self.transport.calls), 5)
        self.assertEqual(self.sink.actions(), ["delayed"])
        self.assertEqual(self.spool.load("ABC123").next_attempt, 1000 + 4000)
        yield self.step(699)
        self.assertEqual(self.spool.ids(), ["ABC123"])
        yield self.step(1)
        self.assertEqual(len(self.transport.calls), 5)
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(self.sink.actions(), ["delayed", "failed"])
        to, report = self.sink.notices[-1]
        self.assertEqual(to, "alice@example.test")
        self.assertIn(b"Status: 4.3.0", report)
        self.assertIn(b"delivery time expired; last error: 451 4.3.0 later", report)
        self.assertEqual(self.clock.getDelayedCalls()[0].func, self.runner.scan)

    @defer.inlineCallbacks
    def test_permanent_failure_of_one_domain_only(self):
        self.transport.outcomes = [
            Outcome("failed", 550, "5.1.1", "550 5.1.1 unknown", "mx.a.test"),
            Outcome("delivered", 250, "2.0.0", "250 ok", "mx.b.test")]
        yield self.start(envelope(rcpts=("x@a.test", "y@b.test")))
        self.assertEqual(sorted(d for d, _ in self.transport.calls), ["a.test", "b.test"])
        self.assertEqual(self.sink.actions(), ["failed"])
        self.assertEqual(self.spool.ids(), [])

    @defer.inlineCallbacks
    def test_no_notice_for_null_sender(self):
        self.transport.outcomes = [Outcome("failed", 550, "5.1.1", "550 no", "mx")]
        yield self.start(envelope(sender=""))
        self.assertEqual(self.sink.notices, [])
        self.assertEqual(self.spool.ids(), [])

    @defer.inlineCallbacks
    def test_success_notice_only_when_asked_and_not_passed_on(self):
        env = envelope(rcpts=("x@a.test", "y@a.test", "z@a.test"))
        for r in env.recipients[:2]:
            r.notify = ["SUCCESS"]
        self.transport.outcomes = [Outcome("delivered", 250, "2.0.0", "250 ok", "mx.a.test")]
        yield self.start(env)
        self.assertEqual(self.sink.actions(), ["relayed", "relayed"])

    @defer.inlineCallbacks
    def test_loop_is_failed_without_delivery(self):
        self.settings.max_hops = 1
        self.spool.enqueue(b"Received: a\r\nReceived: b\r\n\r\nx\r\n", envelope())
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        yield self.runner.idle()
        yield self.step(0)
        self.assertEqual(self.transport.calls, [])
        self.assertIn(b"Status: 5.4.6", self.sink.notices[0][1])

    @defer.inlineCallbacks
    def test_stop_leaves_no_timers(self):
        yield self.start(envelope())
        self.assertTrue(self.clock.getDelayedCalls())
        yield self.runner.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.aborted, 1)


class ConfigTests(unittest.TestCase):
    """[queue], [outbound] and [dkim]: defaults and one-line errors naming the key."""

    def load(self, text: str):
        from mailtwist.config import load_config
        path = self.mktemp()
        Path(path).write_text(text)
        return load_config(path)

    def assertConfigError(self, text: str, *fragments: str) -> None:
        from mailtwist.config import ConfigError
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_defaults_like_postfix(self):
        config = self.load("")
        self.assertEqual((config.queue.retry_first, config.queue.retry_max,
                          config.queue.max_age, config.queue.delay_warning),
                         (300, 4 * 3600, 5 * 86400, 4 * 3600))
        self.assertEqual((config.outbound.port, config.outbound.tls), (25, "may"))
        self.assertTrue(config.dkim.sign)

    def test_values(self):
        config = self.load('[queue]\nretry_first = 0.5\ndelay_warning = 0\n'
                           '[outbound]\nport = 2525\ndns_servers = ["127.0.0.1:5353", "::1"]\n'
                           'tls = "verify"\nrelay_host = "smtp.example.net"\n'
                           'relay_domains = ["Gmail.com"]\n[dkim]\nsign = false\n')
        self.assertEqual(config.queue.retry_first, 0.5)
        self.assertEqual(config.queue.delay_warning, 0)
        self.assertEqual(config.outbound.dns_servers, ["127.0.0.1:5353", "::1"])
        self.assertEqual(config.outbound.relay_domains, ["gmail.com"])
        self.assertFalse(config.dkim.sign)

    def test_errors(self):
        self.assertConfigError("[queue]\nretry_first = 0\n", "queue.retry_first", "> 0")
        self.assertConfigError("[queue]\nretry = 1\n", "queue.retry", "unknown key", "retry_max")
        self.assertConfigError("[outbound]\nport = 70000\n", "outbound.port", "1..65535")
        self.assertConfigError("[outbound]\ntls = \"yes\"\n", "outbound.tls", "may, encrypt")
        self.assertConfigError("[outbound]\ndns_servers = [\"dns.google\"]\n",
                               "outbound.dns_servers", "not an IP address")
        self.assertConfigError("[outbound]\nrelay_username = \"u\"\n", "relay_password")
        self.assertConfigError("[dkim]\nsign = 1\n", "dkim.sign", "true or false")
        self.assertConfigError("outbound = 3\n", "outbound", "a table")
