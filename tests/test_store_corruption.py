"""A corrupted or hostile Maildir (issue 6, item 18), through real IMAP and POP3 sessions.

Symbolic links into ``cur/`` and ``new/`` (to a file and to a directory
outside the Maildir), a folder directory that is a symbolic link, garbage
file names, an empty file, an unreadable file, a directory and a FIFO where
message files belong: none of them may crash a session, none may make the
server serve what lies outside the Maildir, and UIDs only grow, also when
the clock goes back.
"""

from __future__ import annotations

import os
import poplib
import re
import time as real_time
from pathlib import Path

from mailtwist.storage import maildir as maildir_module
from mailtwist.storage.maildir import Maildir
from tests.imap_support import ALICE, PASSWORD, IMAPTestCase
from tests.support import client_tls_context

SECRET = b"SECRET-OUTSIDE"
OUTSIDE_MESSAGE = (b"From: spy@outside.test\nSubject: " + SECRET + b"\n\n" + SECRET + b" body\n")


class BackwardsClock:
    """The ``time`` module as maildir.py sees it, with the wall clock set back."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return real_time.time() - self.offset

    def time_ns(self) -> int:
        return real_time.time_ns() - int(self.offset * 1e9)

    def __getattr__(self, name: str):
        return getattr(real_time, name)


class CorruptStoreTests(IMAPTestCase):
    """Hostile entries in a Maildir are skipped, never followed, never fatal."""

    def root(self) -> Path:
        return self.server.store.path_for(ALICE)

    def plant(self) -> Path:
        """Two good messages and every kind of junk; the outside directory."""
        self.deliver(b"From: a@example.test\r\nSubject: good one\r\n\r\nfine\r\n")
        self.deliver(b"From: b@example.test\r\nSubject: good two\r\n\r\nfine\r\n", flags="S")
        outside = Path(self.mktemp()).resolve()
        for sub in ("cur", "new", "tmp"):
            (outside / sub).mkdir(parents=True)
        (outside / "secret").write_bytes(OUTSIDE_MESSAGE)
        (outside / "cur" / "1.M1P1Q1.outside:2,").write_bytes(OUTSIDE_MESSAGE)
        root = self.root()
        (root / "cur" / "9.M9P9Q9.evil-file:2,S").symlink_to(outside / "secret")
        (root / "new" / "9.M9P9Q8.evil-new").symlink_to(outside / "secret")
        (root / "cur" / "9.M9P9Q7.evil-dir:2,").symlink_to(outside)
        (root / ".Evil").symlink_to(outside)
        (root / "cur" / "9.M9P9Q6.a-directory:2,S").mkdir()
        os.mkfifo(root / "new" / "9.M9P9Q5.fifo")
        (root / "cur" / "garbage name ,S=x,W=:2,\x7f").write_bytes(b"\x00\xff garbage \x00")
        (root / "new").joinpath(os.fsdecode(b"\xff\xfe-not-utf8")).write_bytes(b"junk\n")
        (root / "cur" / "0.empty:2,").write_bytes(b"")
        unreadable = root / "cur" / "8.unreadable:2,"
        unreadable.write_bytes(b"Subject: unreadable\n\nx\n")
        unreadable.chmod(0)
        return outside

    def test_imap_session_survives_and_never_serves_outside_content(self):
        """SELECT/FETCH/SEARCH/LIST over the junk: only files inside, no crash."""
        def check():
            outside = self.plant()
            raw = self.raw()
            everything = []
            listing = raw.command(b"l", b'LIST "" "*"')
            everything += listing
            self.assertFalse(any(b"Evil" in line for line in listing), listing)
            reply = raw.command(b"s", b"SELECT INBOX")
            everything += reply
            self.assertTrue(reply[-1].startswith(b"s OK"), reply)
            exists = int(re.search(rb"\* (\d+) EXISTS", b"\n".join(reply)).group(1))
            # the two good ones, the garbage and non-UTF-8 names, the empty and
            # the unreadable file: regular files only
            self.assertEqual(exists, 6)
            for tag, command in [
                (b"f", b"FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[])"),
                (b"g", b"FETCH 1:* (BODY[] INTERNALDATE)"),
                (b"t", b"SEARCH TEXT secret"),
                (b"h", b"SEARCH SUBJECT secret"),
                (b"b", b"SEARCH BODY outside"),
                (b"u", b"UID SEARCH SENTSINCE 1-Jan-1970"),
                (b"x", b"STORE 1:* +FLAGS (\\Flagged)"),
                (b"e", b"EXAMINE INBOX"),
                (b"v", b"SELECT Evil"),
                (b"w", b"STATUS Evil (MESSAGES)"),
                (b"c", b"CREATE Evil/Child"),
            ]:
                reply = raw.command(tag, command)
                everything += reply
                self.assertTrue(reply[-1].startswith(tag + b" "), reply)
            self.assertFalse(any(SECRET in line for line in everything))
            self.assertTrue(raw.command(b"n", b"NOOP")[-1].startswith(b"n OK"))
            # the search found nothing outside
            self.assertTrue(any(line == b"* SEARCH" for line in everything))
            # nothing outside was renamed, moved or created
            self.assertEqual(sorted(p.name for p in outside.rglob("*")),
                             ["1.M1P1Q1.outside:2,", "cur", "new", "secret", "tmp"])
        return self.in_thread(check)

    def test_pop3_session_survives_and_never_serves_outside_content(self):
        """STAT/LIST/UIDL/RETR/TOP over the junk: only files inside, no crash."""
        def check():
            self.plant()
            client = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), timeout=10,
                                     context=client_tls_context())
            try:
                client.user(ALICE)
                client.pass_(PASSWORD)
                count, _ = client.stat()
                self.assertEqual(count, 6)
                seen = [b"\n".join(client.list()[1]), b"\n".join(client.uidl()[1])]
                for i in range(1, count + 1):
                    for call in (lambda: client.retr(i), lambda: client.top(i, 1)):
                        try:
                            seen.append(b"\n".join(call()[1]))
                        except poplib.error_proto as e:
                            seen.append(str(e).encode())
                self.assertFalse(any(SECRET in data for data in seen))
                self.assertTrue(client.noop().startswith(b"+OK"))
            finally:
                client.quit()
        return self.in_thread(check)

    def test_folder_symlink_is_not_a_folder_for_the_store(self):
        """The storage layer refuses a folder directory that is a symbolic link."""
        def check():
            self.plant()
            maildir = Maildir(self.root())
            self.assertNotIn("Evil", maildir.list_folders())
            with self.assertRaises(maildir_module.FolderNotFound):
                maildir.folder("Evil")
            infos = maildir.folder("INBOX").scan()
            self.assertEqual(len(infos), 6)
            for info in infos:
                try:
                    data = maildir.folder("INBOX").read_message(info)
                except OSError:
                    continue
                self.assertNotIn(SECRET, data)
        return self.in_thread(check)

    def test_cur_that_is_a_symlink_is_not_read(self):
        """A ``cur`` (or ``new``) directory replaced by a link to elsewhere lists nothing."""
        def check():
            self.deliver(b"Subject: inside\r\n\r\nx\r\n")
            outside = Path(self.mktemp()).resolve()
            outside.mkdir()
            (outside / "1.M1P1Q1.outside:2,S").write_bytes(OUTSIDE_MESSAGE)
            cur = self.root() / "cur"
            os.rename(cur, self.root() / "cur-old")
            cur.symlink_to(outside)
            raw = self.raw()
            reply = raw.command(b"s", b"SELECT INBOX")
            self.assertIn(b"* 1 EXISTS", reply)
            reply = raw.command(b"f", b"FETCH 1:* (BODY.PEEK[])")
            self.assertFalse(any(SECRET in line for line in reply), reply)
        return self.in_thread(check)

    def test_uids_keep_growing_when_the_clock_goes_back(self):
        """A delivery after the clock went back a day gets a higher UID (UIDs come
        from the uidlist's counter, not from time), and a new folder's
        UIDVALIDITY is still new."""
        def check():
            maildir = self.server.store.maildir(ALICE)
            self.deliver(b"Subject: before 1\r\n\r\nx\r\n")
            self.deliver(b"Subject: before 2\r\n\r\nx\r\n")
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            maildir.create_folder("Old")
            old_validity = maildir.folder("Old").uidvalidity
            self.patch(maildir_module, "time", BackwardsClock(86400))
            earlier = real_time.time() - 86400
            self.deliver(b"Subject: after\r\n\r\nx\r\n", mtime=earlier)
            self.deliver(b"Subject: after 2\r\n\r\nx\r\n", mtime=earlier - 10)
            reply = raw.command(b"n", b"NOOP")
            self.assertIn(b"* 4 EXISTS", reply)
            reply = raw.command(b"f", b"FETCH 1:* (UID ENVELOPE)")
            uids = {m.group(2): int(m.group(1))
                    for m in re.finditer(rb'UID (\d+) ENVELOPE \(NIL "([^"]+)"', b"\n".join(reply))}
            self.assertEqual(uids[b"before 1"], 1)
            self.assertEqual(uids[b"before 2"], 2)
            self.assertEqual(sorted((uids[b"after"], uids[b"after 2"])), [3, 4])
            maildir.create_folder("New")
            self.assertGreater(maildir.folder("New").uidvalidity, old_validity)
        return self.in_thread(check)

    def test_delivery_never_writes_through_a_linked_tmp(self):
        """A ``tmp`` (or ``new``) that is a link to elsewhere makes delivery and
        APPEND fail cleanly; nothing is written outside."""
        def check():
            outside = Path(self.mktemp()).resolve()
            outside.mkdir()
            self.deliver(b"Subject: first\r\n\r\nx\r\n")
            tmp = self.root() / "tmp"
            tmp.rmdir()
            tmp.symlink_to(outside)
            with self.assertRaises(OSError):
                self.deliver(b"Subject: second\r\n\r\nx\r\n")
            raw = self.raw()
            raw.send(b"a APPEND INBOX {21+}\r\nSubject: appended\r\n\r\n\r\n")
            reply = raw.until(b"a")
            self.assertTrue(reply[-1].startswith(b"a NO"), reply)
            self.assertTrue(raw.command(b"n", b"NOOP")[-1].startswith(b"n OK"))
            self.assertEqual(list(outside.iterdir()), [])
        d = self.in_thread(check)
        # the APPEND's OSError is logged by the server, as it should be
        d.addCallback(lambda _: self.assertTrue(self.flushLoggedErrors(OSError)))
        return d
