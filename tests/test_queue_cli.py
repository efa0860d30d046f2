"""``mailtwist queue ...`` and ``mailtwist dkim ...`` on the spool of a running server."""

from __future__ import annotations

import contextlib
import email
import email.policy
import io

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mailtwist.cli import main
from tests.dnsserver import Script, listen_scripted, wait_for
from tests.test_outbound import OutboundTestCase, message


class QueueCommandTests(OutboundTestCase):

    def cli(self, *args: str) -> defer.Deferred:
        """Run the CLI in a thread, as a separate process would: it may wait for an
        entry's lock, which the server releases on the reactor thread."""
        return deferToThread(self.cli_now, *args)

    def cli_now(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--data-dir", str(self.sender.config.data_dir), *args])
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def queue_one(self, subject: str):
        """A message for down.test, whose MX answers 451 until told otherwise."""
        if not hasattr(self, "down"):
            self.dns.mx("down.test", 10, "mx.down.test")
            self.dns.a("mx.down.test", "127.0.0.3")
            self.script = Script(mail=["451 4.3.2 not now"] * 1000)
            self.down = listen_scripted(self, "127.0.0.3", self.port, self.script)
        before = set(self.queue_ids())
        yield self.submit(["frank@down.test"], message(subject))
        [entry_id] = set(self.queue_ids()) - before
        spool = self.sender.queue.spool
        yield wait_for(lambda: spool.load(entry_id).attempts >= 1)
        return entry_id

    @defer.inlineCallbacks
    def test_list_show_delete(self):
        entry_id = yield self.queue_one("to be deleted")
        code, out, err = yield self.cli("queue", "list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(entry_id, out)
        self.assertIn("<alice@example.test>", out)
        self.assertIn("pending   <frank@down.test>  (451 4.3.2 not now)", out)
        self.assertTrue(out.endswith("1 message in the queue\n"))
        code, out, _ = yield self.cli("queue", "show", entry_id)
        self.assertEqual(code, 0)
        self.assertIn('"address": "frank@down.test"', out)
        self.assertIn("Subject: to be deleted", out)
        self.assertEqual((yield self.cli("queue", "delete", entry_id))[0], 0)
        self.assertEqual(self.queue_ids(), [])
        code, _, err = yield self.cli("queue", "show", entry_id)
        self.assertEqual((code, err), (1, f"mailtwist: error: no queue entry {entry_id}\n"))
        self.assertEqual((yield self.cli("queue", "show", "../../etc"))[0], 1)

    @defer.inlineCallbacks
    def test_flush_retries_at_once(self):
        self.sender.queue.settings.retry_first = 3600
        entry_id = yield self.queue_one("flushed")
        self.script.mail.clear()
        code, out, _ = yield self.cli("queue", "flush")
        self.assertEqual(code, 0)
        self.assertIn("1 message will be retried now", out)
        yield wait_for(lambda: self.down.received)
        yield wait_for(lambda: entry_id not in self.queue_ids())

    @defer.inlineCallbacks
    def test_bounce_notifies_the_sender(self):
        self.sender.queue.settings.retry_first = 3600
        entry_id = yield self.queue_one("bounced by hand")
        self.assertEqual((yield self.cli("queue", "bounce", entry_id))[0], 0)
        yield wait_for(lambda: self.inbox(self.sender, "alice@example.test"))
        yield wait_for(lambda: not self.queue_ids())
        report = email.message_from_bytes(self.inbox(self.sender, "alice@example.test")[0],
                                          policy=email.policy.default)
        _, rcpt = report.get_payload()[1].get_payload()
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("failed", "5.0.0"))
        self.assertIn("Subject: bounced by hand", report.get_payload()[2].get_content())

    def test_dkim_keygen_prints_the_record(self):
        code, out, err = self.cli_now("dkim", "keygen", "example.test", "--selector", "s1",
                                  "--algorithm", "ed25519")
        self.assertEqual((code, err), (0, ""))
        self.assertIn('s1._domainkey.example.test. IN TXT ( "v=DKIM1; k=ed25519; p=', out)
        code, _, err = self.cli_now("dkim", "keygen", "example.test", "--selector", "s1")
        self.assertEqual(code, 1)
        self.assertIn("exists already", err)
        code, out, _ = self.cli_now("dkim", "show", "example.test")
        self.assertEqual(out.count("._domainkey."), 1)
