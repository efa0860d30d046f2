"""The IMAP server on 127.0.0.1 driven by imaplib, IMAPClient, raw sockets and curl:
TLS and login rules, mailbox commands, and the message commands."""

from __future__ import annotations

import base64
import imaplib
import os
import shutil
import subprocess
from typing import ClassVar

from twisted.mail.imap4 import IAccount
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.imap.account import IMAPAccount
from mailtwist.imap.mailbox import FolderRegistry
from tests.imap_support import ALICE, PASSWORD, IMAPTestCase, RawIMAP, message, ok
from tests.support import client_tls_context


class TLSAndLoginTests(IMAPTestCase):

    def test_capabilities_before_and_after_tls(self):
        def check():
            raw = self.raw(tls=False, login=False)
            self.assertIn(b"STARTTLS", raw.greeting)
            self.assertIn(b"LOGINDISABLED", raw.greeting)
            self.assertNotIn(b"AUTH=", raw.greeting)
            raw.starttls()
            caps = raw.command(b"c", b"CAPABILITY")[0]
            self.assertIn(b"AUTH=PLAIN", caps)
            self.assertNotIn(b"LOGINDISABLED", caps)
            self.assertNotIn(b"STARTTLS", caps)
            login = raw.command(b"l", b'LOGIN "%s" "%s"' % (ALICE.encode(), PASSWORD.encode()))
            for cap in (b"UIDPLUS", b"MOVE", b"IDLE", b"NAMESPACE", b"SPECIAL-USE",
                        b"CHILDREN", b"LITERAL+", b"UNSELECT", b"APPENDLIMIT="):
                self.assertIn(cap, login[-1])
        return self.in_thread(check)

    def test_login_and_authenticate_refused_before_tls(self):
        def check():
            raw = self.raw(tls=False, login=False)
            reply = raw.command(b"a", b'LOGIN "%s" "%s"' % (ALICE.encode(), PASSWORD.encode()))
            self.assertTrue(reply[-1].startswith(b"a NO [PRIVACYREQUIRED]"), reply)
            token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
            reply = raw.command(b"b", b"AUTHENTICATE PLAIN " + token)
            self.assertTrue(reply[-1].startswith(b"b NO [PRIVACYREQUIRED]"), reply)
            self.assertTrue(raw.command(b"c", b"SELECT INBOX")[-1].startswith(b"c BAD"))
        return self.in_thread(check)

    def test_starttls_discards_pipelined_commands(self):
        def check():
            raw = self.raw(tls=False, login=False)
            raw.send(b"a STARTTLS\r\nb LOGIN %s \"%s\"\r\n" % (ALICE.encode(), PASSWORD.encode()))
            self.assertTrue(raw.line().startswith(b"a OK"))
            raw.sock = client_tls_context().wrap_socket(raw.sock)
            reply = raw.command(b"c", b"SELECT INBOX")
            self.assertEqual(len(reply), 1, reply)
            self.assertTrue(reply[0].startswith(b"c BAD"), reply)
            self.assertFalse(any(line.startswith(b"b ") for line in reply))
        return self.in_thread(check)

    def test_failed_login_answers_authenticationfailed(self):
        def check():
            client = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                                       ssl_context=client_tls_context())
            self.clients.append(client)
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                client.login(ALICE, "wrong")
            self.assertIn("AUTHENTICATIONFAILED", str(caught.exception))
            client.login(ALICE, PASSWORD)
            client.logout()
        return self.in_thread(check)

    def test_imaps_login_and_authenticate_plain(self):
        def check():
            client = self.imap(tls="implicit")
            self.assertEqual(client.state, "AUTH")
            client.logout()
            client = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                                       ssl_context=client_tls_context())
            self.clients.append(client)
            typ, _ = client.authenticate(
                "PLAIN", lambda _: b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
            self.assertEqual(typ, "OK")
            client.logout()
            with self.imapclient() as other:
                self.assertIn(b"IDLE", other.capabilities())
        return self.in_thread(check)

    def test_authenticate_with_continuation_and_cancel(self):
        def check():
            raw = self.raw(login=False)
            raw.send(b"a AUTHENTICATE PLAIN\r\n")
            self.assertEqual(raw.line(), b"+ ")
            raw.send(b"*\r\n")
            self.assertTrue(raw.line().startswith(b"a BAD"))
            raw.send(b"b AUTHENTICATE PLAIN\r\n")
            self.assertEqual(raw.line(), b"+ ")
            raw.send(base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
                     + b"\r\n")
            self.assertTrue(raw.line().startswith(b"b OK [CAPABILITY"))
        return self.in_thread(check)

    def test_commands_in_wrong_state_and_unknown(self):
        def check():
            raw = self.raw()
            self.assertTrue(raw.command(b"a", b"FETCH 1 FLAGS")[-1].startswith(b"a BAD"))
            self.assertTrue(raw.command(b"b", b"FROB")[-1].startswith(b"b BAD"))
            self.assertTrue(raw.command(b"c", b"LOGIN a b")[-1].startswith(b"c BAD"))
            self.assertTrue(raw.command(b"d", b"NOOP extra")[-1].startswith(b"d BAD"))
            self.assertTrue(raw.command(b"e", b"NOOP")[-1].startswith(b"e OK"))
        return self.in_thread(check)

    def test_avatar_provides_iaccount(self):
        account = IMAPAccount(ALICE, self.server.store.maildir(ALICE),
                              FolderRegistry(None, None))
        self.assertTrue(verifyObject(IAccount, account))


class PlaintextAllowedTests(IMAPTestCase):

    server_options: ClassVar[dict] = {"allow_plaintext_auth": True}

    def test_login_without_tls_when_allowed(self):
        def check():
            client = self.imap(tls="none")
            self.assertIn("AUTH=PLAIN", client.capabilities)
            self.assertNotIn("LOGINDISABLED", client.capabilities)
            client.logout()
        return self.in_thread(check)


class MailboxTests(IMAPTestCase):

    def list_names(self, client, pattern="*") -> dict[str, bytes]:
        result = {}
        for line in ok(client.list('""', pattern)):
            attrs, _, name = line.rpartition(b' "/" ')
            result[name.strip(b'"').decode()] = attrs
        return result

    def test_special_folders_exist_with_attributes(self):
        def check():
            client = self.imap()
            names = self.list_names(client)
            self.assertEqual(next(iter(names)), "INBOX")
            for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
                self.assertIn(b"\\" + folder.encode(), names[folder])
            subscribed = [line.rpartition(b" ")[2] for line in ok(client.lsub('""', "*"))]
            self.assertIn(b'"Sent"', subscribed)
            # a new mailbox has INBOX subscribed too (clients that show only
            # subscribed folders would hide it otherwise)
            self.assertIn(b"INBOX", [name.strip(b'"') for name in subscribed])
        return self.in_thread(check)

    def test_create_hierarchy_delete_rename(self):
        def check():
            client = self.imap()
            ok(client.create("a/b/c"))
            names = self.list_names(client)
            self.assertIn(b"\\HasChildren", names["a"])
            self.assertIn(b"\\HasChildren", names["a/b"])
            self.assertIn(b"\\HasNoChildren", names["a/b/c"])
            self.assertEqual(client.create("a/b")[0], "NO")
            self.assertIn(b"ALREADYEXISTS", client.response("ALREADYEXISTS")[1][0] or b"ALREADYEXISTS")
            ok(client.delete("a/b"))
            names = self.list_names(client)
            self.assertIn(b"\\Noselect", names["a/b"])
            self.assertEqual(client.select("a/b")[0], "NO")
            self.assertEqual(client.delete("nonexistent")[0], "NO")
            self.assertEqual(client.delete("INBOX")[0], "NO")
            ok(client.rename("a", "z"))
            names = self.list_names(client)
            self.assertNotIn("a", names)
            self.assertIn("z/b/c", names)
            self.assertEqual(client.rename("z", "Sent")[0], "NO")
            percent = self.list_names(client, "%")
            self.assertIn("z", percent)
            self.assertNotIn("z/b", percent)
            self.assertEqual(ok(client.list('""', '""'))[0], b'(\\Noselect) "/" ""')
        return self.in_thread(check)

    def test_rename_inbox_moves_messages(self):
        def check():
            for i in range(3):
                self.deliver(message(f"m{i}"))
            client = self.imap()
            ok(client.rename("INBOX", "Old"))
            self.assertEqual(ok(client.select("INBOX")), [b"0"])
            self.assertEqual(ok(client.select("Old")), [b"3"])
            self.assertIn(b"m1", ok(client.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))[0][1])
        return self.in_thread(check)

    def test_dangerous_names_are_refused(self):
        def check():
            raw = self.raw()
            before = sorted(os.listdir(self.data_dir / "mail"))
            for i, name in enumerate([b'".."', b'"a/../../b"', b'"&AC4ALg-"', b'"&AC4ALg-/x"',
                                      b'"a&AC8-b"', b'"&AAA-"', b'"/etc"', b'"a.b"',
                                      b"{3+}\r\na\x00b", b'"x\\\\y"', b'"caf\xc3\xa9"',
                                      b'"&2D0-"', b"{3+}\r\na\rb"]):
                tag = b"t%d" % i
                reply = raw.command(tag, b"CREATE " + name)
                self.assertTrue(reply[-1].startswith(tag + b" NO"), (name, reply))
                reply = raw.command(tag, b"SELECT " + name)
                self.assertTrue(reply[-1].startswith(tag + b" NO"), (name, reply))
            self.assertEqual(sorted(os.listdir(self.data_dir / "mail")), before)
            home = self.server.store.path_for(ALICE)
            self.assertFalse(any(".." in entry or "\0" in entry for entry in os.listdir(home)))
        return self.in_thread(check)

    def test_modified_utf7_names(self):
        def check():
            client = self.imap()
            ok(client.create("Entw&APw-rfe/&ZeVnLIqe-"))
            names = self.list_names(client)
            self.assertIn("Entw&APw-rfe/&ZeVnLIqe-", names)
            home = self.server.store.path_for(ALICE)
            self.assertTrue((home / ".Entw&APw-rfe.&ZeVnLIqe-").is_dir())
            ok(client.select("Entw&APw-rfe/&ZeVnLIqe-"))
        return self.in_thread(check)

    def test_subscribe_and_lsub(self):
        def check():
            client = self.imap()
            ok(client.create("p/q"))
            ok(client.subscribe("p/q"))
            lsub = [line for line in ok(client.lsub('""', "p/*"))]
            self.assertEqual(lsub, [b'() "/" "p/q"'])
            self.assertEqual(ok(client.lsub('""', "p")), [None])
            self.assertEqual(ok(client.lsub('""', "%")).count(b'(\\Noselect) "/" "p"'), 1)
            ok(client.unsubscribe("p/q"))
            self.assertEqual(ok(client.lsub('""', "p/*")), [None])
            with self.imapclient() as other:
                self.assertNotIn("p/q", other.list_sub_folders())
                other.subscribe_folder("p")
                self.assertIn("p", [name for _, _, name in other.list_sub_folders()])
        return self.in_thread(check)

    def test_create_special_use(self):
        def check():
            raw = self.raw()
            reply = raw.command(b"a", b"CREATE Outbox (USE (\\Sent))")
            self.assertTrue(reply[-1].startswith(b"a OK"), reply)
            reply = raw.command(b"b", b"CREATE Starred (USE (\\Flagged))")
            self.assertTrue(reply[-1].startswith(b"b NO [USEATTR]"), reply)
            reply = raw.command(b"c", b'LIST (SPECIAL-USE) "" "*"')
            listed = [line for line in reply if line.startswith(b"* LIST")]
            self.assertIn(b'* LIST (\\HasNoChildren \\Sent) "/" "Outbox"', listed)
            self.assertTrue(all(b"\\" in line.split(b")")[0] for line in listed))
            self.assertFalse(any(b'"INBOX"' in line for line in listed))
            with self.imapclient() as client:
                self.assertEqual(client.find_special_folder(b"\\Junk"), "Junk")
        return self.in_thread(check)

    def test_status(self):
        def check():
            self.deliver(message("one"))
            self.deliver(message("two"), flags="S")
            client = self.imap()
            data = ok(client.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)"))
            self.assertRegex(data[0].decode(),
                             r'"INBOX" \(MESSAGES 2 RECENT 1 UIDNEXT 3 UIDVALIDITY \d+ UNSEEN 1\)')
            self.assertEqual(client.status("Nope", "(MESSAGES)")[0], "NO")
            with self.imapclient() as other:
                self.assertEqual(other.folder_status("INBOX", ["APPENDLIMIT"]),
                                 {b"APPENDLIMIT": self.config.smtp.max_message_size})
        return self.in_thread(check)

    def test_namespace_id_enable(self):
        def check():
            with self.imapclient() as client:
                namespace = client.namespace()
                self.assertEqual(namespace.personal, (("", "/"),))
                self.assertIsNone(namespace.other)
                self.assertEqual(client.id_({"name": "test"})[0][:2], (b"name", b"mailtwist"))
                self.assertEqual(client.enable("X-UNKNOWN"), [])
        return self.in_thread(check)


class MessageTests(IMAPTestCase):

    def test_select_and_examine_responses(self):
        def check():
            self.deliver(message("seen"), flags="S")
            self.deliver(message("new"))
            client = self.imap()
            self.assertEqual(ok(client.select("INBOX")), [b"2"])
            self.assertEqual(client.untagged_responses["RECENT"], [b"1"])
            self.assertEqual(client.untagged_responses["UNSEEN"], [b"2"])
            self.assertEqual(client.untagged_responses["UIDNEXT"], [b"3"])
            self.assertIn(b"\\*", client.untagged_responses["PERMANENTFLAGS"][0])
            self.assertIn(b"\\Draft", client.untagged_responses["FLAGS"][0])
            self.assertIn("READ-WRITE", client.untagged_responses)
            examine = self.imap()
            typ, _ = examine.select("INBOX", readonly=True)
            self.assertEqual(typ, "OK")
            self.assertIn("READ-ONLY", examine.untagged_responses)
            ok(examine.fetch("2", "(BODY[])"))
            self.assertNotIn(b"\\Seen", ok(examine.fetch("2", "(FLAGS)"))[0])
            self.assertEqual(examine.store("1", "+FLAGS", "(\\Flagged)")[0], "NO")
            self.assertEqual(examine.expunge()[0], "NO")
        return self.in_thread(check)

    def test_append_with_and_without_flags_and_date(self):
        def check():
            client = self.imap()
            results = [
                client.append("INBOX", None, None, message("plain")),
                client.append("INBOX", "(\\Seen $Label1)", None, message("flags")),
                client.append("INBOX", None, '"01-Feb-2021 10:20:30 +0100"', message("date")),
                client.append("INBOX", "(\\Flagged)", '"02-Mar-2022 00:00:00 +0000"',
                              message("both")),
            ]
            uids = []
            for typ, data in results:
                self.assertEqual(typ, "OK")
                self.assertRegex(data[0].decode(), r"^\[APPENDUID \d+ \d+\]")
                uids.append(int(data[0].split()[2].rstrip(b"]")))
            self.assertEqual(uids, [1, 2, 3, 4])
            ok(client.select("INBOX"))
            flags = ok(client.fetch("1:4", "(FLAGS INTERNALDATE)"))
            self.assertNotIn(b"\\Seen", flags[0])
            self.assertIn(b"\\Seen", flags[1])
            self.assertIn(b"$Label1", flags[1])
            self.assertIn(b'INTERNALDATE "01-Feb-2021 09:20:30 +0000"', flags[2])
            self.assertIn(b"\\Flagged", flags[3])
            self.assertIn(b'"02-Mar-2022 00:00:00 +0000"', flags[3])
            typ, data = client.append("Nope", None, None, message("x"))
            self.assertEqual(typ, "NO")
            self.assertIn(b"[TRYCREATE]", data[0])
            with self.assertRaises(imaplib.IMAP4.error):
                client.append("INBOX", "(\\Recent)", None, message("x"))
        return self.in_thread(check)

    def test_append_with_literal_plus_and_imapclient(self):
        def check():
            raw = self.raw()
            body = message("plus")
            raw.send(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(body), body))
            self.assertTrue(raw.until(b"a")[-1].startswith(b"a OK [APPENDUID"))
            with self.imapclient() as client:
                big = message("big", "x" * 998 + "\r\n") * 1
                big += b"y" * 1024 * 1024
                reply = client.append("INBOX", big, flags=(b"\\Draft",))
                self.assertIn(b"APPENDUID", reply)
                client.select_folder("INBOX")
                data = client.fetch([2], ["RFC822.SIZE", "BODY.PEEK[]", "FLAGS"])[2]
                self.assertEqual(data[b"RFC822.SIZE"], len(big))
                self.assertEqual(data[b"BODY[]"], big)
                self.assertEqual(data[b"FLAGS"], (b"\\Draft",))
        return self.in_thread(check)

    def test_fetch_partial_peek_and_seen(self):
        def check():
            self.deliver(message("partial", "0123456789abcdef\r\n"))
            client = self.imap()
            ok(client.select("INBOX"))
            data = ok(client.fetch("1", "(BODY.PEEK[]<0.10>)"))
            self.assertEqual(data[0][0], b"1 (BODY[]<0> {10}")
            self.assertEqual(data[0][1], b"From: Caro")
            data = ok(client.fetch("1", "(BODY.PEEK[TEXT]<10.100>)"))
            self.assertEqual(data[0][1], b"abcdef\r\n")
            self.assertNotIn(b"\\Seen", ok(client.fetch("1", "(FLAGS)"))[0])
            data = ok(client.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])"))
            self.assertIn(b"FLAGS (\\Seen", data[0][0])
            self.assertEqual(data[0][1], b"Subject: partial\r\n\r\n")
            self.assertIn(b"\\Seen", ok(client.fetch("1", "(FLAGS)"))[0])
            ok(client.store("1", "-FLAGS", "(\\Seen)"))
            size = int(ok(client.fetch("1", "(RFC822.SIZE)"))[0].split()[-1].rstrip(b")"))
            data = ok(client.fetch("1", "(RFC822)"))
            self.assertEqual(len(data[0][1]), size)
            self.assertIn(b"\\Seen", ok(client.fetch("1", "(FLAGS)"))[0])
            data = ok(client.fetch("1", "(RFC822.HEADER ENVELOPE BODYSTRUCTURE)"))
            self.assertTrue(data[0][1].endswith(b"\r\n\r\n"))
            self.assertIn(b'ENVELOPE (NIL "partial"', data[1])
            self.assertIn(b'BODYSTRUCTURE ("text" "plain"', data[1])
            for bad in [("1", "(BODY[1.2.3.MIME)"), ("5", "(FLAGS)"), ("1", "(FROB)")]:
                with self.assertRaises(imaplib.IMAP4.error):
                    client.fetch(*bad)
        return self.in_thread(check)

    def test_fetch_with_imapclient(self):
        def check():
            mime = (b"From: a@example.test\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
                    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
                    b"--XX\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nHallo \xc3\xbc\r\n"
                    b"--XX\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\n"
                    b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--XX--\r\n")
            self.deliver(mime)
            with self.imapclient() as client:
                info = client.select_folder("INBOX")
                self.assertEqual(info[b"EXISTS"], 1)
                data = client.fetch([1], ["ENVELOPE", "BODYSTRUCTURE", "BODY.PEEK[1]",
                                            "BODY.PEEK[2.MIME]", "INTERNALDATE", "UID"])[1]
                self.assertEqual(data[b"ENVELOPE"].subject, b"=?utf-8?q?gr=C3=BC=C3=9Fe?=")
                self.assertTrue(data[b"BODYSTRUCTURE"].is_multipart)
                self.assertEqual(data[b"BODY[1]"], "Hallo ü".encode())
                self.assertIn(b"a.bin", data[b"BODY[2.MIME]"])
        return self.in_thread(check)

    def test_store_variants_and_keywords(self):
        def check():
            for i in range(3):
                self.deliver(message(f"s{i}"))
            client = self.imap()
            ok(client.select("INBOX"))
            typ, data = client.store("1:3", "+FLAGS.SILENT", "(\\Flagged)")
            self.assertEqual((typ, data), ("OK", [None]))
            data = ok(client.store("2", "FLAGS", "(\\Answered $Forwarded)"))
            self.assertIn(b"\\Answered", data[0])
            self.assertIn(b"$Forwarded", data[0])
            self.assertNotIn(b"\\Flagged", data[0])
            data = ok(client.store("3", "-FLAGS", "(\\Flagged)"))
            self.assertNotIn(b"\\Flagged", data[0])
            self.assertIn(b"$Forwarded", client.untagged_responses.get("FLAGS", [b""])[-1])
            flags = ok(client.fetch("1:3", "(FLAGS)"))
            self.assertIn(b"\\Flagged", flags[0])
            home = self.server.store.path_for(ALICE)
            self.assertIn("$Forwarded", (home / "dovecot-keywords").read_text())
            with self.assertRaises(imaplib.IMAP4.error):
                client.store("1", "+FLAGS", "(\\Bogus)")
            other = self.imap()
            ok(other.select("INBOX"))
            self.assertIn(b"$Forwarded", other.untagged_responses["FLAGS"][0])
            self.assertIn(b"$Forwarded", ok(other.fetch("2", "(FLAGS)"))[0])
        return self.in_thread(check)

    def test_expunge_keeps_sequence_numbers_right(self):
        def check():
            for i in range(1, 7):
                self.deliver(message(f"e{i}"))
            client = self.imap()
            ok(client.select("INBOX"))
            ok(client.store("2,4,5", "+FLAGS.SILENT", "(\\Deleted)"))
            self.assertEqual(ok(client.expunge()), [b"5", b"4", b"2"])
            subjects = ok(client.fetch("1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
            got = [(item[0].split()[2], item[1].strip()) for item in subjects if
                   isinstance(item, tuple)]
            self.assertEqual(got, [(b"1", b"Subject: e1"), (b"3", b"Subject: e3"),
                                   (b"6", b"Subject: e6")])
            self.assertEqual(len(self.maildir_files(ALICE)), 3)
            ok(client.store("3", "+FLAGS", "(\\Deleted)"))
            ok(client.close())
            self.assertEqual(len(self.maildir_files(ALICE)), 2)
            ok(client.select("INBOX"))
            ok(client.store("1", "+FLAGS", "(\\Deleted)"))
            ok(client._simple_command("UNSELECT"))
            self.assertEqual(len(self.maildir_files(ALICE)), 2)
        return self.in_thread(check)

    def test_uid_commands(self):
        def check():
            for i in range(1, 6):
                self.deliver(message(f"u{i}"))
            client = self.imap()
            ok(client.select("INBOX"))
            data = ok(client.uid("FETCH", "1:*", "(FLAGS)"))
            self.assertEqual([d.split()[2] for d in data], [b"1", b"2", b"3", b"4", b"5"])
            self.assertEqual(ok(client.uid("FETCH", "10:*", "(UID)")), [b"5 (UID 5)"])
            self.assertEqual(ok(client.uid("FETCH", "7:9", "(UID)")), [None])
            data = ok(client.uid("STORE", "2:3", "+FLAGS", "(\\Deleted)"))
            self.assertIn(b"UID 2", data[0])
            self.assertEqual(ok(client.uid("SEARCH", None, "DELETED")), [b"2 3"])
            self.assertEqual(ok(client.search(None, "DELETED")), [b"2 3"])
            ok(client.uid("EXPUNGE", "3"))
            self.assertEqual(ok(client.uid("SEARCH", None, "ALL")), [b"1 2 4 5"])
            self.assertEqual(client.uid("COPY", "4:5", "Trash")[0], "OK")
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            reply = raw.command(b"c", b"UID COPY 1,4:5 Trash")
            self.assertRegex(reply[-1].decode(), r"^c OK \[COPYUID \d+ 1,4:5 3:5\]")
            reply = raw.command(b"e", b"EXPUNGE")
            self.assertEqual(reply[0], b"* 2 EXPUNGE")
            self.assertEqual(raw.command(b"f", b"UID FETCH 1:* UID")[:-1],
                             [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 4)", b"* 3 FETCH (UID 5)"])
        return self.in_thread(check)

    def test_copy_keeps_flags_and_date(self):
        def check():
            self.deliver(message("c1"), flags="FS", mtime=1_500_000_000)
            self.deliver(message("c2"))
            client = self.imap()
            ok(client.create("Keep"))
            ok(client.select("INBOX"))
            ok(client.store("2", "+FLAGS", "(Important)"))
            typ, data = client.copy("1:2", "Keep")
            self.assertEqual(typ, "OK")
            self.assertRegex(data[0].decode(), r"^\[COPYUID \d+ 1:2 1:2\]")
            typ, data = client.copy("1", "Nope")
            self.assertEqual(typ, "NO")
            self.assertIn(b"TRYCREATE", data[0])
            ok(client.select("Keep"))
            data = ok(client.fetch("1:2", "(FLAGS INTERNALDATE)"))
            self.assertIn(b"\\Flagged \\Seen", data[0])
            self.assertIn(b'"14-Jul-2017 02:40:00 +0000"', data[0])
            self.assertIn(b"Important", data[1])
            self.assertEqual(len(self.maildir_files(ALICE)), 2)
        return self.in_thread(check)

    def test_move_with_imapclient(self):
        def check():
            for i in range(3):
                self.deliver(message(f"mv{i}"))
            with self.imapclient() as client:
                client.select_folder("INBOX")
                client.move([1, 3], "Archive")
                self.assertEqual(client.search("ALL"), [2])
                client.select_folder("Archive")
                fetched = client.fetch(client.search(), ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
                subjects = sorted(v[b"BODY[HEADER.FIELDS (SUBJECT)]"].strip()
                                  for v in fetched.values())
                self.assertEqual(subjects, [b"Subject: mv0", b"Subject: mv2"])
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            reply = raw.command(b"m", b"MOVE 1 Trash")
            self.assertTrue(reply[0].startswith(b"* OK [COPYUID "), reply)
            self.assertEqual(reply[1], b"* 1 EXPUNGE")
            self.assertTrue(reply[-1].startswith(b"m OK"))
        return self.in_thread(check)

    def test_search_through_imapclient(self):
        def check():
            self.deliver(message("Grüße aus Köln", "über alles\r\n"))
            self.deliver(message("plain ascii"), flags="S")
            with self.imapclient() as client:
                client.select_folder("INBOX")
                self.assertEqual(client.search(["SUBJECT", "grüße"], charset="UTF-8"), [1])
                self.assertEqual(client.search(["UNSEEN"]), [1])
                self.assertEqual(client.search(["NOT", "SEEN", "BODY", "alles"]), [1])
                self.assertEqual(client.search(["SEEN", "BODY", "alles"]), [])
                self.assertEqual(client.search(["SEEN"]), [2])
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            self.assertTrue(raw.command(b"a", b"SEARCH CHARSET KOI8-R ALL")[-1]
                            .startswith(b"a NO [BADCHARSET"))
            self.assertTrue(raw.command(b"b", b"SEARCH FROB")[-1].startswith(b"b BAD"))
        return self.in_thread(check)

    def test_literal_too_big_for_append(self):
        def check():
            raw = self.raw()
            limit = self.config.smtp.max_message_size
            reply = raw.command(b"a", b"APPEND INBOX {%d}" % (limit + 1))
            self.assertEqual(reply, [b"a NO [TOOBIG] Message too big (at most %d octets)." % limit])
            raw.send(b"b APPEND INBOX {%d+}\r\n" % (limit + 1))
            raw.send(b"x" * (limit + 1) + b"\r\n")
            self.assertTrue(raw.until(b"b")[-1].startswith(b"b NO [TOOBIG]"))
            self.assertTrue(raw.command(b"c", b"LOGIN {70000}")[-1].startswith(b"c BAD"))
            self.assertTrue(raw.command(b"d", b"NOOP")[-1].startswith(b"d OK"))
        return self.in_thread(check)

    def test_curl_fetches_by_uid(self):
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed (the CI installs it)")

        def check():
            self.deliver(message("for curl", "Curl body.\r\n"))
            for url, extra in [(f"imaps://127.0.0.1:{self.port('imaps')}/INBOX;UID=1", []),
                               (f"imap://127.0.0.1:{self.port('imap')}/INBOX;UID=1",
                                ["--ssl-reqd"])]:
                result = subprocess.run(
                    [curl, "--silent", "--show-error", "--insecure", *extra,
                     "--user", f"{ALICE}:{PASSWORD}", url],
                    capture_output=True, timeout=30, check=False)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(b"Subject: for curl", result.stdout)
                self.assertIn(b"Curl body.", result.stdout)
        return self.in_thread(check)


class QuotaTests(IMAPTestCase):

    def test_quota_reported_and_enforced_at_append_and_copy(self):
        def check():
            carol = f"carol@{ALICE.partition('@')[2]}"
            self.directory.add_account(carol, PASSWORD, quota_bytes=4096)
            raw = RawIMAP(self.port("imaps"), tls=True)
            self.clients.append(raw)
            raw.command(b"l", b'LOGIN "%s" "%s"' % (carol.encode(), PASSWORD.encode()))
            self.assertEqual(raw.command(b"q", b"GETQUOTAROOT INBOX")[:-1],
                             [b'* QUOTAROOT "INBOX" ""', b'* QUOTA "" (STORAGE 0 4)'])
            body = message("big", "z" * 2500 + "\r\n")
            append = b"APPEND INBOX {%d+}\r\n%s" % (len(body), body)
            self.assertTrue(raw.command(b"a", append)[-1].startswith(b"a OK [APPENDUID"))
            reply = raw.command(b"b", append)
            self.assertEqual(reply, [b"b NO [OVERQUOTA] Quota exceeded."])
            raw.command(b"s", b"SELECT INBOX")
            self.assertEqual(raw.command(b"c", b"COPY 1 Trash")[-1],
                             b"c NO [OVERQUOTA] Quota exceeded.")
            self.assertTrue(raw.command(b"m", b"MOVE 1 Trash")[-1].startswith(b"m OK"))
            self.assertEqual(raw.command(b"g", b'GETQUOTA ""')[0], b'* QUOTA "" (STORAGE 3 4)')
            self.assertTrue(raw.command(b"t", b'SETQUOTA "" (STORAGE 10)')[-1]
                            .startswith(b"t NO"))
            with self.imapclient() as client:
                roots, quotas = client.get_quota_root("INBOX")
                self.assertEqual((roots.mailbox, roots.quota_roots, quotas), ("INBOX", [], []))
            unlimited = self.raw()
            self.assertEqual(unlimited.command(b"q", b"GETQUOTAROOT INBOX")[:-1],
                             [b'* QUOTAROOT "INBOX"'])
            self.assertTrue(unlimited.command(b"g", b'GETQUOTA ""')[-1].startswith(b"g NO"))
        return self.in_thread(check)
