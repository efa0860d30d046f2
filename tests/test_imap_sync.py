"""Consistency between IMAP sessions, POP3, SMTP delivery and other programs:
untagged EXISTS/EXPUNGE/FETCH at the points RFC 3501 allows, and IDLE push."""

from __future__ import annotations

import os
import poplib
import smtplib
import time

from mailtwist.storage.maildir import Maildir
from tests.imap_support import ALICE, PASSWORD, IMAPTestCase, message
from tests.support import client_tls_context


def untagged(reply: list[bytes]) -> list[bytes]:
    return [line for line in reply if line.startswith(b"* ")]


class SessionTests(IMAPTestCase):

    def test_sessions_see_each_others_changes(self):
        def check():
            for i in range(3):
                self.deliver(message(f"m{i}"))
            a, b = self.raw(), self.raw()
            a.command(b"s", b"SELECT INBOX")
            b.command(b"s", b"SELECT INBOX")
            a.command(b"1", b"STORE 1 +FLAGS.SILENT (\\Flagged)")
            self.assertEqual(untagged(b.command(b"1", b"NOOP")),
                             [b"* 1 FETCH (UID 1 FLAGS (\\Flagged))"])
            body = message("appended")
            a.command(b"2", b"APPEND INBOX {%d+}\r\n%s" % (len(body), body))
            self.assertEqual(untagged(b.command(b"2", b"NOOP")), [b"* 4 EXISTS", b"* 0 RECENT"])
            a.command(b"3", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
            self.assertIn(b"* 2 EXPUNGE", a.command(b"4", b"EXPUNGE"))
            reply = b.command(b"3", b"NOOP")
            self.assertEqual(untagged(reply), [b"* 2 EXPUNGE"])
            self.assertEqual(untagged(b.command(b"4", b"FETCH 1:* (UID)")),
                             [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 4)"])
            self.assertEqual(untagged(a.command(b"5", b"NOOP")), [])
        return self.in_thread(check)

    def test_expunge_is_not_sent_during_fetch_store_search(self):
        def check():
            for i in range(3):
                self.deliver(message(f"x{i}"))
            a, b = self.raw(), self.raw()
            a.command(b"s", b"SELECT INBOX")
            b.command(b"s", b"SELECT INBOX")
            a.command(b"1", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
            a.command(b"2", b"EXPUNGE")
            reply = b.command(b"1", b"FETCH 1:3 (UID FLAGS)")
            self.assertFalse(any(b"EXPUNGE" in line for line in reply), reply)
            self.assertIn(b"* 3 FETCH (UID 3 FLAGS ())", reply)
            reply = b.command(b"2", b"SEARCH ALL")
            self.assertIn(b"* SEARCH 1 2 3", reply)
            reply = b.command(b"3", b"STORE 3 +FLAGS (\\Seen)")
            self.assertFalse(any(b"EXPUNGE" in line for line in reply), reply)
            self.assertIn(b"* 3 FETCH (FLAGS (\\Seen))", reply)
            reply = b.command(b"4", b"FETCH 2 (BODY.PEEK[])")
            self.assertTrue(reply[-1].startswith(b"4 OK [EXPUNGEISSUED]"), reply)
            reply = b.command(b"5", b"UID FETCH 1 (FLAGS)")
            self.assertIn(b"* 2 EXPUNGE", reply)
            self.assertEqual(untagged(b.command(b"6", b"FETCH 2 (UID)")), [b"* 2 FETCH (UID 3)"])
        return self.in_thread(check)

    def test_only_one_session_sees_recent(self):
        def check():
            a, b = self.raw(), self.raw()
            a.command(b"s", b"SELECT INBOX")
            b.command(b"s", b"SELECT INBOX")
            self.deliver(message("fresh"))
            reply_a = untagged(a.command(b"n", b"NOOP"))
            reply_b = untagged(b.command(b"n", b"NOOP"))
            recent = sorted([r for r in reply_a + reply_b if r.endswith(b"RECENT")])
            self.assertEqual(recent, [b"* 0 RECENT", b"* 1 RECENT"])
            self.assertIn(b"* 1 EXISTS", reply_a)
            self.assertIn(b"* 1 EXISTS", reply_b)
            for _ in range(50):
                if not os.listdir(self.server.store.path_for(ALICE) / "new"):
                    break
                time.sleep(0.05)
            self.assertEqual(os.listdir(self.server.store.path_for(ALICE) / "new"), [])
            c = self.raw()
            self.assertIn(b"* 0 RECENT", c.command(b"s", b"SELECT INBOX"))
        return self.in_thread(check)

    def test_changes_by_other_programs_are_noticed(self):
        def check():
            for i in range(3):
                self.deliver(message(f"o{i}"))
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            other = Maildir(self.server.store.path_for(ALICE))
            folder = other.folder("INBOX")
            infos = folder.scan()
            folder.add_flags(infos[0], "F")
            folder.remove(infos[1])
            other.deliver(message("outside"))
            reply = untagged(raw.command(b"n", b"NOOP"))
            self.assertEqual(reply, [b"* 2 EXPUNGE", b"* 3 EXISTS", b"* 3 RECENT",
                                     b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent))"])
        return self.in_thread(check)

    def test_pop3_deletion_is_noticed(self):
        def check():
            self.deliver(message("p1"))
            self.deliver(message("p2"))
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            pop = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), context=client_tls_context())
            pop.user(ALICE)
            pop.pass_(PASSWORD)
            pop.dele(1)
            pop.quit()
            self.assertEqual(untagged(raw.command(b"n", b"NOOP")), [b"* 1 EXPUNGE"])
        return self.in_thread(check)

    def test_deleted_mailbox_ends_other_sessions(self):
        def check():
            a, b = self.raw(), self.raw()
            a.command(b"c", b"CREATE Doomed")
            b.command(b"s", b"SELECT Doomed")
            self.assertIn(b"* OK [CLOSED] Mailbox closed.",
                          a.command(b"s", b"SELECT Doomed") and a.command(b"d", b"DELETE Doomed"))
            b.send(b"n NOOP\r\n")
            self.assertTrue(b.line().startswith(b"* BYE [UNAVAILABLE]"))
            self.assertRaises(EOFError, b.line)
        return self.in_thread(check)


class IdleTests(IMAPTestCase):

    def test_idle_push_after_smtp_delivery(self):
        """The server pushes EXISTS to an idling client by itself (the client sends
        nothing after IDLE); the wait is only a bound so a broken push fails."""
        def check():
            with self.imapclient() as client:
                client.select_folder("INBOX")
                client.idle()
                with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as smtp:
                    smtp.sendmail(f"carol@{'example.test'}", [ALICE], message("pushed"))
                responses = client.idle_check(timeout=10)
                client.idle_done()
                self.assertIn((1, b"EXISTS"), responses)
                fetched = client.fetch([1], ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
                self.assertIn(b"pushed", fetched[1][b"BODY[HEADER.FIELDS (SUBJECT)]"])
        return self.in_thread(check)

    def test_idle_sees_other_sessions_at_once(self):
        def check():
            self.deliver(message("i1"))
            self.deliver(message("i2"))
            with self.imapclient() as idler:
                idler.select_folder("INBOX")
                idler.idle()
                other = self.raw()
                other.command(b"s", b"SELECT INBOX")
                other.command(b"1", b"STORE 2 +FLAGS (\\Answered)")
                responses = idler.idle_check(timeout=3)
                self.assertIn((2, b"FETCH", (b"UID", 2, b"FLAGS", (b"\\Answered", b"\\Recent"))),
                              responses)
                other.command(b"2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
                other.command(b"3", b"EXPUNGE")
                self.assertIn((1, b"EXPUNGE"), idler.idle_check(timeout=3))
                idler.idle_done()
                self.assertEqual(idler.search("ALL"), [2])
        return self.in_thread(check)

    def test_idle_without_mailbox_and_bad_continuation(self):
        def check():
            raw = self.raw()
            raw.send(b"i IDLE\r\n")
            self.assertEqual(raw.line(), b"+ idling")
            raw.send(b"DONE\r\n")
            self.assertEqual(raw.line(), b"i OK IDLE completed.")
            raw.command(b"s", b"SELECT INBOX")
            raw.send(b"j IDLE\r\n")
            self.assertEqual(raw.line(), b"+ idling")
            raw.send(b"NOOP\r\n")
            self.assertTrue(raw.line().startswith(b"j BAD"))
        return self.in_thread(check)
