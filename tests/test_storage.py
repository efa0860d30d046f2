"""Tests for mailtwist.storage.maildir against real temporary directories."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

import mailtwist
from mailtwist.storage import maildir
from mailtwist.storage.maildir import (
    SPECIAL_FOLDERS,
    FolderNotFound,
    InvalidFolderName,
    LockError,
    Maildir,
    validate_folder_name,
)

REPO_ROOT = pathlib.Path(mailtwist.__file__).resolve().parent.parent

TRICKY_CHARS = st.sampled_from(list("ab./\\&-~ \x00\n*%ü語\U0001f600"))

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run script in a fresh interpreter that can import mailtwist."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120
    )


class StorageTestCase(unittest.TestCase):
    def make_maildir(self, hostname: str = "mx.example.org") -> Maildir:
        md = Maildir(self.mktemp(), hostname=hostname)
        md.ensure()
        return md

    def entries(self, path: pathlib.Path) -> list[str]:
        return sorted(os.listdir(path))


class DeliveryTests(StorageTestCase):
    def test_deliver_to_new_with_lf_and_sizes(self) -> None:
        md = self.make_maildir()
        base = md.deliver(MESSAGE)
        self.assertEqual(self.entries(md.root / "new"), [base])
        self.assertEqual(self.entries(md.root / "tmp"), [])
        self.assertEqual(self.entries(md.root / "cur"), [])
        stored = (md.root / "new" / base).read_bytes()
        self.assertEqual(stored, MESSAGE.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"\r", stored)
        self.assertTrue(base.endswith(f",S={len(stored)},W={len(MESSAGE)}"), base)

    def test_base_name_format_and_hostname_escaping(self) -> None:
        md = self.make_maildir(hostname="mx/1:a")
        base = md.deliver(b"x\n")
        self.assertRegex(base, r"^\d+\.M\d+P\d+Q\d+\.mx\\0571\\072a,S=2,W=3$")
        self.assertNotEqual(md.deliver(b"x\n"), base)

    def test_deliver_with_flags_goes_to_cur(self) -> None:
        md = self.make_maildir()
        base = md.deliver(b"x\n", flags="SF")
        self.assertEqual(self.entries(md.root / "cur"), [base + ":2,FS"])
        self.assertEqual(self.entries(md.root / "new"), [])
        [info] = md.folder().scan()
        self.assertEqual(info.flags, frozenset("FS"))

    def test_deliver_sets_internal_date(self) -> None:
        md = self.make_maildir()
        base = md.deliver(b"x\n", mtime=1_000_000_000)
        self.assertEqual(os.stat(md.root / "new" / base).st_mtime, 1_000_000_000)
        [info] = md.folder().scan()
        self.assertEqual(info.mtime, 1_000_000_000)

    def test_deliver_creates_maildir(self) -> None:
        md = Maildir(os.path.join(self.mktemp(), "user", "Maildir"))
        md.deliver(b"x\n")
        for sub in ("cur", "new", "tmp"):
            self.assertTrue((md.root / sub).is_dir())
        self.assertEqual(len(md.folder().scan()), 1)

    def test_fsync_failure_leaves_nothing(self) -> None:
        md = self.make_maildir()

        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(maildir, "_fsync", no_space)
        exc = self.assertRaises(OSError, md.deliver, MESSAGE)
        self.assertEqual(exc.errno, errno.ENOSPC)
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(self.entries(md.root / sub), [], sub)

    def test_directory_fsync_failure_unpublishes(self) -> None:
        """A failure after the rename into new/ must not leave the message behind."""
        md = self.make_maildir()
        calls = []
        real_fsync = maildir._fsync

        def fail_second(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.EIO, "I/O error")
            real_fsync(fd)

        self.patch(maildir, "_fsync", fail_second)
        exc = self.assertRaises(OSError, md.deliver, MESSAGE, flags="S")
        self.assertEqual(exc.errno, errno.EIO)
        self.assertEqual(len(calls), 2)
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(self.entries(md.root / sub), [], sub)

    def test_real_write_failure_leaves_nothing(self) -> None:
        """The kernel refuses the write half-way (RLIMIT_FSIZE); nothing may remain."""
        md = self.make_maildir()
        script = (
            "import resource, signal, sys\n"
            "from mailtwist.storage.maildir import Maildir\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "md = Maildir(sys.argv[1])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            "    md.deliver(b'x' * 100000)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n"
            "else:\n"
            "    print('delivered')\n"
        )
        result = run_python(script, str(md.root))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), str(errno.EFBIG))
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(self.entries(md.root / sub), [], sub)

    def test_missing_folder_is_not_created(self) -> None:
        md = self.make_maildir()
        self.assertRaises(FolderNotFound, md.deliver, b"x\n", folder="Nope")
        self.assertRaises(FolderNotFound, md.folder, "Nope")
        self.assertEqual(md.list_folders(), ["INBOX"])

    def test_special_folders_created_on_first_use(self) -> None:
        md = self.make_maildir()
        md.deliver(b"x\n", folder="Sent")
        md.folder("Trash")
        self.assertEqual(md.list_folders(), ["INBOX", "Sent", "Trash"])
        for name in ("Sent", "Trash"):
            path = md.root / ("." + name)
            self.assertTrue((path / "maildirfolder").is_file())
            for sub in ("cur", "new", "tmp"):
                self.assertTrue((path / sub).is_dir())
        self.assertEqual(len(md.folder("Sent").scan()), 1)
        self.assertEqual(SPECIAL_FOLDERS, {"Sent", "Drafts", "Trash", "Junk", "Archive"})

    def test_invalid_flags_rejected(self) -> None:
        md = self.make_maildir()
        self.assertRaises(ValueError, md.deliver, b"x\n", flags="S1")
        self.assertEqual(self.entries(md.root / "tmp"), [])


class UidTests(StorageTestCase):
    def test_uids_ascend_and_persist(self) -> None:
        md = self.make_maildir()
        bases = [md.deliver(b"%d\n" % i, mtime=1_600_000_000 + i) for i in range(5)]
        folder = md.folder()
        infos = folder.scan()
        self.assertEqual([i.uid for i in infos], [1, 2, 3, 4, 5])
        self.assertEqual([i.base for i in infos], bases)
        self.assertEqual(folder.uidnext, 6)

        again = Maildir(md.root).folder()
        self.assertEqual([(i.uid, i.base) for i in again.scan()], [(i.uid, i.base) for i in infos])
        self.assertEqual(again.uidvalidity, folder.uidvalidity)
        self.assertEqual(again.uidnext, 6)

    def test_our_arrivals_numbered_in_delivery_order(self) -> None:
        """Guards COPY/APPEND UID order: the mtime is the INTERNALDATE, so a
        copy of older mail must still get UIDs in the order it was written."""
        md = self.make_maildir()
        late = md.deliver(b"late\n", mtime=2_000_000_000)
        early = md.deliver(b"early\n", mtime=1_000_000_000)
        infos = md.folder().scan()
        self.assertEqual([i.base for i in infos], [late, early])

    def test_foreign_arrivals_ordered_by_mtime(self) -> None:
        """Files another program named its own way are numbered by their time."""
        md = self.make_maildir()
        new = md.root / "new"
        for name, mtime in (("zzz-late", 2_000_000_000), ("aaa-early", 1_000_000_000)):
            (new / name).write_bytes(b"x\n")
            os.utime(new / name, (mtime, mtime))
        infos = md.folder().scan()
        self.assertEqual([i.base for i in infos], ["aaa-early", "zzz-late"])

    def test_uidlist_format(self) -> None:
        md = self.make_maildir()
        base = md.deliver(b"x\n")
        folder = md.folder()
        folder.scan()
        lines = (md.root / "dovecot-uidlist").read_text().splitlines()
        self.assertRegex(lines[0], rf"^3 V{folder.uidvalidity} N2 G[0-9a-f]{{32}}$")
        self.assertEqual(lines[1:], [f"1 :{base}"])
        self.assertFalse((md.root / "dovecot-uidlist.lock").exists())

    def test_unchanged_scan_does_not_rewrite(self) -> None:
        md = self.make_maildir()
        md.deliver(b"x\n")
        folder = md.folder()
        folder.scan()
        before = os.stat(md.root / "dovecot-uidlist")
        Maildir(md.root).folder().scan()
        after = os.stat(md.root / "dovecot-uidlist")
        self.assertEqual((before.st_ino, before.st_mtime_ns), (after.st_ino, after.st_mtime_ns))

    def test_flag_change_keeps_uid(self) -> None:
        md = self.make_maildir()
        md.deliver(b"a\n")
        md.deliver(b"b\n")
        folder = md.folder()
        first, second = folder.scan()
        updated = folder.set_flags(second, ["\\Seen", "F"])
        self.assertEqual((updated.uid, updated.subdir), (2, "cur"))
        self.assertEqual(updated.filename, second.base + ":2,FS")
        self.assertEqual(updated.flags, frozenset("FS"))
        rescanned = Maildir(md.root).folder().scan()
        self.assertEqual(
            [(i.uid, i.flags) for i in rescanned], [(1, frozenset()), (2, frozenset("FS"))]
        )
        seen = folder.mark_seen(first)
        self.assertEqual((seen.uid, seen.subdir, seen.flags), (1, "cur", frozenset("S")))
        self.assertEqual(self.entries(md.root / "new"), [])

    def test_set_flags_keeps_dovecot_info_extension(self) -> None:
        md = self.make_maildir()
        (md.root / "cur" / "123.M1P1.h,S=2,W=3:2,S,xyz").write_bytes(b"x\n")
        folder = md.folder()
        [info] = folder.scan()
        updated = folder.set_flags(info, "ST")
        self.assertEqual(updated.filename, "123.M1P1.h,S=2,W=3:2,ST,xyz")

    def test_flag_changes_relative_to_disk(self) -> None:
        """add/remove apply to the current on-disk flags, not a stale snapshot."""
        md = self.make_maildir()
        md.deliver(b"a\n")
        session1, session2 = md.folder(), Maildir(md.root).folder()
        [stale] = session1.scan()
        [fresh] = session2.scan()
        session2.add_flags(fresh, "F")
        result = session1.mark_seen(stale)
        self.assertEqual(result.flags, frozenset("FS"))
        result = session1.remove_flags(result, ["\\Flagged"])
        self.assertEqual(result.flags, frozenset("S"))

    def test_follows_rename_by_other_session(self) -> None:
        md = self.make_maildir()
        md.deliver(MESSAGE, mtime=1_500_000_000)
        session1, session2 = md.folder(), Maildir(md.root).folder()
        [old] = session1.scan()
        [other] = session2.scan()
        session2.set_flags(other, "R")
        self.assertFalse(old.path.exists())
        self.assertEqual(session1.read_message(old), MESSAGE.replace(b"\r\n", b"\n"))
        self.assertEqual(old.mtime, 1_500_000_000)
        updated = session1.set_flags(old, "S")
        self.assertEqual(updated.filename, old.base + ":2,S")
        self.assertEqual([i.uid for i in session2.scan()], [old.uid])

    def test_set_flags_on_expunged_message(self) -> None:
        md = self.make_maildir()
        md.deliver(b"a\n")
        folder = md.folder()
        [info] = folder.scan()
        os.unlink(info.path)
        self.assertRaises(FileNotFoundError, folder.set_flags, info, "S")
        self.assertRaises(FileNotFoundError, folder.read_message, info)

    def test_uids_never_reused(self) -> None:
        md = self.make_maildir()
        for i in range(3):
            md.deliver(b"%d\n" % i)
        folder = md.folder()
        infos = folder.scan()
        folder.remove(infos[2])
        folder.remove(infos[2])
        self.assertEqual([i.uid for i in folder.scan()], [1, 2])
        self.assertEqual(folder.uidnext, 4)
        md.deliver(b"new\n")
        self.assertEqual([i.uid for i in Maildir(md.root).folder().scan()], [1, 2, 4])
        self.assertNotIn(infos[2].base, (md.root / "dovecot-uidlist").read_text())

    def test_remove_many_and_external_expunge(self) -> None:
        md = self.make_maildir()
        for i in range(5):
            md.deliver(b"%d\n" % i)
        folder = md.folder()
        infos = folder.scan()
        folder.remove_many(infos[:2])
        os.unlink(infos[2].path)
        self.assertEqual([i.uid for i in folder.scan()], [4, 5])
        lines = (md.root / "dovecot-uidlist").read_text().splitlines()
        self.assertEqual([line.split()[0] for line in lines[1:]], ["4", "5"])
        self.assertIn(" N6 ", lines[0])

    def test_uidvalidity_changes_when_folder_recreated(self) -> None:
        md = self.make_maildir()
        md.create_folder("Work")
        first = md.folder("Work").uidvalidity
        md.delete_folder("Work")
        md.create_folder("Work")
        second = md.folder("Work").uidvalidity
        self.assertGreater(second, first)
        self.assertLessEqual(abs(first - time.time()), 5)

    def test_lookalike_uidlist_is_reread_before_update(self) -> None:
        """A rewrite with the same inode, size and mtime must not be overwritten with stale data."""
        md = self.make_maildir()
        md.deliver(b"a\n")
        folder = md.folder()
        folder.scan()
        uidlist = md.root / "dovecot-uidlist"
        before = os.stat(uidlist)
        header = uidlist.read_text().splitlines()[0]
        old_guid = header.split(" G")[1]
        new_guid = "f" * 32
        with open(uidlist, "r+b") as f:
            f.write(uidlist.read_bytes().replace(old_guid.encode(), new_guid.encode()))
        os.utime(uidlist, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(os.stat(uidlist).st_size, before.st_size)
        md.deliver(b"b\n")
        self.assertEqual([i.uid for i in folder.scan()], [1, 2])
        self.assertIn(f" G{new_guid}", uidlist.read_text().splitlines()[0])

    def test_reads_dovecot_v3_uidlist(self) -> None:
        md = self.make_maildir()
        named = "1276528487.M364837P9451.kurkku,S=5,W=7:2,"
        plain = "1276533073.M242911P3632.kurkku"
        (md.root / "cur" / named).write_bytes(b"ab\ncd")
        (md.root / "cur" / (plain + ":2,F")).write_bytes(b"z" * 40)
        (md.root / "dovecot-uidlist").write_text(
            "3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1 Xfuture\n"
            f"25006 :{named}\n"
            f"25017 W2481 S2400 P0001 :{plain}:2,F\n"
        )
        folder = md.folder()
        infos = folder.scan()
        self.assertEqual(folder.uidvalidity, 1275660208)
        self.assertEqual(
            [(i.uid, i.size, i.vsize) for i in infos], [(25006, 5, 7), (25017, 2400, 2481)]
        )
        self.assertEqual(infos[1].flags, frozenset("F"))

        new_base = md.deliver(b"new\n")
        infos = folder.scan()
        self.assertEqual([i.uid for i in infos], [25006, 25017, 25022])
        lines = (md.root / "dovecot-uidlist").read_text().splitlines()
        self.assertEqual(lines[0], "3 V1275660208 N25023 G3085f01b7f11094c501100008c4a11c1 Xfuture")
        self.assertEqual(
            lines[1:],
            [
                f"25006 :{named.split(':')[0]}",
                f"25017 W2481 S2400 P0001 :{plain}",
                f"25022 :{new_base}",
            ],
        )

    def test_reads_version1_uidlist(self) -> None:
        md = self.make_maildir()
        (md.root / "cur" / "1000.M1P1.host:2,S").write_bytes(b"hello\n")
        (md.root / "dovecot-uidlist").write_text("1 1234567 7\n3 1000.M1P1.host:2,S\n")
        folder = md.folder()
        md.deliver(b"x\n")
        infos = folder.scan()
        self.assertEqual([i.uid for i in infos], [3, 7])
        self.assertEqual(folder.uidvalidity, 1234567)
        self.assertEqual((infos[0].size, infos[0].vsize), (6, 7))
        self.assertTrue((md.root / "dovecot-uidlist").read_text().startswith("3 V1234567 N8 G"))

    def test_sizes_computed_and_cached_for_foreign_names(self) -> None:
        md = self.make_maildir()
        (md.root / "new" / "1000.courier").write_bytes(b"a\nb\r\nc\n")
        folder = md.folder()
        [info] = folder.scan()
        self.assertEqual((info.size, info.vsize), (7, 9))
        self.assertEqual(len(folder.read_message_crlf(info)), info.vsize)
        lines = (md.root / "dovecot-uidlist").read_text().splitlines()
        self.assertEqual(lines[1], "1 S7 W9 :1000.courier")


class ReadTests(StorageTestCase):
    def test_read_message_raw_and_crlf(self) -> None:
        md = self.make_maildir()
        md.deliver(b"A: b\r\n\r\nmixed\nline\r\nlone\rcr\r\r\nend")
        folder = md.folder()
        [info] = folder.scan()
        raw = folder.read_message(info)
        self.assertEqual(raw, b"A: b\n\nmixed\nline\nlone\rcr\r\nend")
        crlf = folder.read_message_crlf(info)
        self.assertEqual(crlf, b"A: b\r\n\r\nmixed\r\nline\r\nlone\rcr\r\nend")
        self.assertEqual(len(raw), info.size)
        self.assertEqual(len(crlf), info.vsize)

    def test_crlf_keeps_existing_crlf(self) -> None:
        md = self.make_maildir()
        (md.root / "new" / "1.M1P1.h").write_bytes(b"a\r\nb\nc\r\n")
        folder = md.folder()
        [info] = folder.scan()
        self.assertEqual(folder.read_message_crlf(info), b"a\r\nb\r\nc\r\n")
        self.assertEqual(info.vsize, 9)


class KeywordTests(StorageTestCase):
    def test_keyword_letters(self) -> None:
        md = self.make_maildir()
        folder = md.folder()
        self.assertIsNone(folder.keyword_letter("$Junk", create=False))
        self.assertEqual(folder.keyword_letter("$Junk"), "a")
        self.assertEqual(folder.keyword_letter("$Label1"), "b")
        self.assertEqual(folder.keyword_letter("$Junk"), "a")
        self.assertEqual(folder.keyword_letter("$junk", create=False), "a")
        self.assertEqual((md.root / "dovecot-keywords").read_text(), "0 $Junk\n1 $Label1\n")
        self.assertEqual(Maildir(md.root).folder().keywords(), {"a": "$Junk", "b": "$Label1"})

    def test_existing_dovecot_keywords(self) -> None:
        md = self.make_maildir()
        (md.root / "dovecot-keywords").write_text("0 $Junk\n2 $NonJunk\n")
        folder = md.folder()
        self.assertEqual(folder.keyword_letter("$NonJunk"), "c")
        self.assertEqual(folder.keyword_letter("Work"), "b")
        self.assertEqual(folder.keywords(), {"a": "$Junk", "b": "Work", "c": "$NonJunk"})

    def test_keyword_flags_on_messages(self) -> None:
        md = self.make_maildir()
        folder = md.folder()
        letter = folder.keyword_letter("$Forwarded")
        md.deliver(b"x\n")
        [info] = folder.scan()
        info = folder.set_flags(info, {"S", letter})
        self.assertTrue(info.filename.endswith(":2,Sa"))
        self.assertEqual(folder.scan()[0].flags, frozenset({"S", "a"}))

    def test_keyword_limits(self) -> None:
        md = self.make_maildir()
        folder = md.folder()
        for bad in ("", "two words", "\\Seen", "paren(", "nul\x00", "ümlaut"):
            self.assertRaises(ValueError, folder.keyword_letter, bad)
        letters = [folder.keyword_letter(f"k{i}") for i in range(26)]
        self.assertEqual(letters, [chr(ord("a") + i) for i in range(26)])
        self.assertIsNone(folder.keyword_letter("one-too-many"))


class FolderNameTests(StorageTestCase):
    REJECTED = [
        "",
        "/",
        "a//b",
        "/abs",
        "/etc/passwd",
        "a/",
        ".",
        "..",
        "../x",
        "a/../b",
        "a/./b",
        "a.b",
        ".hidden",
        "x\x00y",
        "x\ny",
        "tab\there",
        "x\x7fy",
        "esc\x1b",
        "c1\x85",
        "a\\b",
        "star*",
        "per%cent",
        "a" * 201,
        "lone\ud800surrogate",
    ]

    def test_rejects_unsafe_names(self) -> None:
        md = self.make_maildir()
        for name in self.REJECTED:
            self.assertRaises(InvalidFolderName, md.create_folder, name)
            self.assertRaises(InvalidFolderName, md.folder, name)
            self.assertRaises(InvalidFolderName, md.deliver, b"x\n", name)
        self.assertEqual(self.entries(md.root), ["cur", "new", "tmp"])

    def test_error_messages_are_clear(self) -> None:
        exc = self.assertRaises(InvalidFolderName, validate_folder_name, "a.b")
        self.assertIn("'.'", str(exc))
        self.assertIsInstance(exc, ValueError)
        exc = self.assertRaises(InvalidFolderName, validate_folder_name, "a/../b")
        self.assertIn("'..'", str(exc))

    def test_accepts_and_canonicalises(self) -> None:
        self.assertEqual(validate_folder_name("inbox"), "INBOX")
        self.assertEqual(validate_folder_name("InBoX/sub"), "INBOX/sub")
        self.assertEqual(validate_folder_name("a" * 200), "a" * 200)
        self.assertEqual(validate_folder_name("Tom & Jerry/2024"), "Tom & Jerry/2024")

    def test_unicode_names_stored_as_mutf7(self) -> None:
        import twisted.mail.imap4  # noqa: F401  (registers the imap4-utf-7 codec)

        md = self.make_maildir()
        names = ["Entwürfe", "日本語/子供", "Tom & Jerry", "~peter/mail/台北"]
        for name in names:
            md.create_folder(name)
        for name in names:
            encoded = [c.encode("imap4-utf-7").decode("ascii") for c in name.split("/")]
            expected = "." + ".".join(encoded)
            self.assertTrue((md.root / expected).is_dir(), expected)
        self.assertIn(".Entw&APw-rfe", self.entries(md.root))
        self.assertIn(".Tom &- Jerry", self.entries(md.root))
        self.assertEqual(
            md.list_folders(),
            [
                "INBOX",
                "Entwürfe",
                "Tom & Jerry",
                "~peter",
                "~peter/mail",
                "~peter/mail/台北",
                "日本語",
                "日本語/子供",
            ],
        )
        md.deliver(b"x\n", folder="日本語/子供")
        self.assertEqual(len(md.folder("日本語/子供").scan()), 1)

    def test_foreign_directories_not_listed(self) -> None:
        md = self.make_maildir()
        odd_dirs = [".bad&name", ".&AGE-", ".x..y", ".INBOX", ".inbox.sub", "..mailtwist-deleted-1"]
        for odd in odd_dirs + ["plain"]:
            os.mkdir(md.root / odd)
        (md.root / ".file").write_bytes(b"")
        self.assertEqual(md.list_folders(), ["INBOX"])

    def test_inbox_is_root(self) -> None:
        md = self.make_maildir()
        self.assertEqual(md.folder("inbox").path, md.root)
        self.assertEqual(md.folder("INBOX").name, "INBOX")
        self.assertRaises(FileExistsError, md.create_folder, "Inbox")

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(max_size=60),
            st.lists(st.text(alphabet=TRICKY_CHARS, max_size=8), max_size=5).map("/".join),
        )
    )
    def test_accepted_names_stay_inside_root(self, name: str) -> None:
        root = pathlib.Path("/srv/mail/user/Maildir")
        md = Maildir(root)
        try:
            canonical = validate_folder_name(name)
        except InvalidFolderName:
            self.assertRaises(InvalidFolderName, md.folder_path, name)
            return
        path = md.folder_path(name)
        self.assertEqual(pathlib.Path(os.path.normpath(path)), path)
        if canonical == "INBOX":
            self.assertEqual(path, root)
            return
        self.assertEqual(path.parent, root)
        self.assertTrue(path.name.startswith("."))
        self.assertNotIn(path.name, (".", ".."))
        self.assertNotIn("/", path.name)
        self.assertNotIn("\x00", path.name)
        self.assertLessEqual(len(path.name.encode()), 255)
        self.assertEqual(maildir._decode_dir_name(path.name), canonical)


class FolderManagementTests(StorageTestCase):
    def test_create_hierarchy(self) -> None:
        md = self.make_maildir()
        md.create_folder("Archive/2024/Q1")
        self.assertEqual(md.list_folders(), ["INBOX", "Archive", "Archive/2024", "Archive/2024/Q1"])
        self.assertTrue((md.root / ".Archive.2024.Q1" / "maildirfolder").exists())
        self.assertRaises(FileExistsError, md.create_folder, "Archive/2024")
        md.create_folder("INBOX/Sub")
        self.assertEqual(md.list_folders()[-1], "INBOX/Sub")
        self.assertFalse((md.root / ".INBOX").exists())

    def test_delete_folder(self) -> None:
        md = self.make_maildir()
        md.create_folder("A/B")
        md.deliver(b"x\n", folder="A")
        md.delete_folder("A")
        self.assertEqual(md.list_folders(), ["INBOX", "A/B"])
        self.assertEqual([n for n in self.entries(md.root) if n.startswith("..")], [])
        self.assertRaises(FolderNotFound, md.delete_folder, "A")
        self.assertRaises(ValueError, md.delete_folder, "INBOX")
        self.assertRaises(ValueError, md.delete_folder, "inbox")
        self.assertRaises(FolderNotFound, md.folder, "A")

    def test_rename_folder_with_children(self) -> None:
        md = self.make_maildir()
        md.create_folder("A/B/C")
        md.deliver(b"x\n", folder="A/B")
        [before] = md.folder("A/B").scan()
        md.rename_folder("A", "X/Y")
        self.assertEqual(md.list_folders(), ["INBOX", "X", "X/Y", "X/Y/B", "X/Y/B/C"])
        [after] = md.folder("X/Y/B").scan()
        self.assertEqual((after.uid, after.base), (before.uid, before.base))

    def test_rename_errors(self) -> None:
        md = self.make_maildir()
        md.create_folder("A/B")
        md.create_folder("C")
        self.assertRaises(FileExistsError, md.rename_folder, "A", "C")
        self.assertRaises(FileExistsError, md.rename_folder, "A/B", "C")
        self.assertRaises(InvalidFolderName, md.rename_folder, "A", "A/Z")
        self.assertRaises(InvalidFolderName, md.rename_folder, "A", "a.b")
        self.assertRaises(ValueError, md.rename_folder, "INBOX", "Old")
        self.assertRaises(FolderNotFound, md.rename_folder, "Missing", "New")
        self.assertEqual(md.list_folders(), ["INBOX", "A", "A/B", "C"])

    def test_quota_usage(self) -> None:
        md = self.make_maildir()
        md.deliver(b"12345\r\n")
        md.deliver(b"abc\n", folder="Sent", flags="S")
        (md.root / "cur" / "1.foreign:2,S").write_bytes(b"0123456789")
        self.assertEqual(md.quota_usage(), 6 + 4 + 10)


class ConcurrencyTests(StorageTestCase):
    def test_threads_deliver_and_scan(self) -> None:
        md = self.make_maildir()
        bases: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            session = Maildir(md.root)
            folder = session.folder()
            try:
                for i in range(50):
                    base = session.deliver(b"thread %d message %d\n" % (n, i))
                    with lock:
                        bases.append(base)
                    folder.scan()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        infos = md.folder().scan()
        self.assertEqual(sorted(i.uid for i in infos), list(range(1, 201)))
        self.assertEqual(sorted(i.base for i in infos), sorted(bases))
        self.assertEqual(len(set(bases)), 200)

    def test_processes_share_uidlist(self) -> None:
        """Processes coordinate only through the dotlock: every UID any session saw must stick.

        A lost uidlist update heals on the next scan, so the final state alone
        proves little; what must hold is that no session ever sees a UID
        change or two messages share one.
        """
        md = self.make_maildir()
        script = (
            "import json, sys\n"
            "from mailtwist.storage.maildir import Maildir\n"
            "md = Maildir(sys.argv[1])\n"
            "folder = md.folder()\n"
            "seen = {}\n"
            "for i in range(40):\n"
            "    md.deliver(b'x %d\\n' % i)\n"
            "    for info in folder.scan():\n"
            "        if seen.setdefault(info.base, info.uid) != info.uid:\n"
            "            sys.exit(f'UID of {info.base} changed')\n"
            "print(json.dumps(seen))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(md.root)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        folder = md.folder()
        views: list[dict[str, int]] = [{}]
        while any(p.poll() is None for p in procs):
            for info in folder.scan():
                views[0].setdefault(info.base, info.uid)
        for p in procs:
            out, err = p.communicate()
            self.assertEqual(p.returncode, 0, err)
            views.append(json.loads(out))
        final = {info.base: info.uid for info in folder.scan()}
        self.assertEqual(sorted(final.values()), list(range(1, 121)))
        for view in views:
            for base, uid in view.items():
                self.assertEqual(final[base], uid, base)

    def test_uids_stable_while_flags_change(self) -> None:
        """Renames by another session during scans must not make UIDs change.

        readdir() skips entries renamed while a large directory is being read
        (here nearly every listing misses one), so a scan that trusted a
        single listing would drop those messages and give them new UIDs.
        """
        md = self.make_maildir()
        for i in range(3000):
            (md.root / "cur" / f"{10_000 + i}.M1P1Q{i}.h,S=2,W=3:2,S").write_bytes(b"x\n")
        scanner = md.folder()
        expected = {i.base: i.uid for i in scanner.scan()}
        stop = threading.Event()
        errors: list[BaseException] = []

        def toggler() -> None:
            folder = Maildir(md.root).folder()
            infos = folder.scan()
            rng = random.Random(1)
            try:
                while not stop.is_set():
                    k = rng.randrange(len(infos))
                    infos[k] = folder.set_flags(infos[k], rng.choice(["S", "SF", "R", "RS"]))
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=toggler)
        thread.start()
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                self.assertEqual({i.base: i.uid for i in scanner.scan()}, expected)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(scanner.uidnext, 3001)


class VirtualClock:
    """Stands in for the time module in maildir: monotonic() and sleep() are virtual.

    ``sleep`` records its argument, moves the clock on and then calls
    ``on_sleep`` with the number of sleeps so far; everything else (the
    wall clock that dates locks) is the real time module.
    """

    def __init__(self, on_sleep: Callable[[int], None] | None = None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class LockTests(StorageTestCase):
    def write_lock(self, md: Maildir, content: str, age: float = 0.0) -> pathlib.Path:
        path = md.root / "dovecot-uidlist.lock"
        path.write_text(content)
        if age:
            stamp = time.time() - age
            os.utime(path, (stamp, stamp))
        return path

    def test_fresh_lock_blocks(self) -> None:
        """A fresh lock of another host is waited for until LOCK_TIMEOUT, then LockError.

        The waiting runs on a virtual clock, so no assertion depends on how
        fast the machine is.  Fails if the lock were broken (the scan would
        succeed and remove it), if the scan gave up before the timeout had
        passed on its clock or without retrying in between, or if it kept
        waiting after the first try past the timeout.
        """
        md = self.make_maildir()
        md.deliver(b"x\n")
        self.patch(maildir, "LOCK_TIMEOUT", 0.3)
        clock = VirtualClock()
        self.patch(maildir, "time", clock)
        lock = self.write_lock(md, "1:some-other-host")
        exc = self.assertRaises(LockError, md.folder().scan)
        self.assertIsInstance(exc, OSError)
        self.assertGreaterEqual(clock.now, 0.3)
        self.assertLess(sum(clock.sleeps[:-1]), 0.3)
        self.assertGreater(len(clock.sleeps), 2)
        self.assertTrue(lock.exists())
        self.assertEqual(lock.read_text(), "1:some-other-host")
        self.assertFalse((md.root / "dovecot-uidlist").exists())

    def test_waiter_takes_the_lock_only_after_release(self) -> None:
        """A scan that finds the uidlist locked takes the lock once it is released, not before.

        The holder releases the lock while the scan sleeps for the third
        time; the events are recorded in the order they happen.  Fails if
        the scan took the lock (or broke it) before the release, or if it
        gave up instead of trying again after the release.
        """
        md = self.make_maildir()
        md.deliver(b"x\n")
        lock = self.write_lock(md, "1:some-other-host")
        events: list[str] = []

        def holder(sleeps: int) -> None:
            events.append("wait")
            if sleeps == 3:
                lock.unlink()
                events.append("released")

        self.patch(maildir, "time", VirtualClock(holder))
        acquire = maildir._DotLock.acquire

        def recorded(dotlock: maildir._DotLock) -> None:
            acquire(dotlock)
            events.append("acquired")

        self.patch(maildir._DotLock, "acquire", recorded)
        self.assertEqual([i.uid for i in md.folder().scan()], [1])
        self.assertEqual(events[:5], ["wait", "wait", "wait", "released", "acquired"])
        self.assertFalse(lock.exists())
        self.assertTrue((md.root / "dovecot-uidlist").exists())

    def test_stale_lock_is_replaced(self) -> None:
        md = self.make_maildir()
        md.deliver(b"x\n")
        self.patch(maildir, "LOCK_TIMEOUT", 0.3)
        lock = self.write_lock(md, "1:some-other-host", age=3 * 60)
        self.assertEqual([i.uid for i in md.folder().scan()], [1])
        self.assertFalse(lock.exists())

    def test_lock_of_dead_local_process_is_replaced(self) -> None:
        md = self.make_maildir()
        md.deliver(b"x\n")
        self.patch(maildir, "LOCK_TIMEOUT", 0.3)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        self.write_lock(md, f"{dead.pid}:{socket.gethostname()}")
        self.assertEqual([i.uid for i in md.folder().scan()], [1])

    def test_lost_lock_blocks_uidlist_replace(self) -> None:
        """A writer whose lock was broken as stale must not overwrite the new holder's work."""
        md = self.make_maildir()
        md.deliver(b"x\n")
        md.folder().scan()
        uidlist = md.root / "dovecot-uidlist"
        before = uidlist.read_bytes()
        with maildir._locked(uidlist) as lock:
            lock_path = md.root / "dovecot-uidlist.lock"
            os.unlink(lock_path)
            lock_path.write_text("1:some-other-host")
            self.assertRaises(LockError, maildir._write_atomic, uidlist, b"junk\n", lock)
        self.assertEqual(uidlist.read_bytes(), before)
        self.assertEqual(lock_path.read_text(), "1:some-other-host")
        self.assertEqual([n for n in self.entries(md.root) if n.endswith(".tmp")], [])

    def test_corrupt_uidlist_is_rebuilt(self) -> None:
        md = self.make_maildir()
        md.deliver(b"x\n")
        (md.root / "dovecot-uidlist").write_text("garbage\n")
        folder = md.folder()
        self.assertEqual([i.uid for i in folder.scan()], [1])
        self.assertTrue((md.root / "dovecot-uidlist").read_text().startswith("3 V"))


class HostileEntryTests(StorageTestCase):
    """Only regular files are messages; sizes in names are trusted only when numeric."""

    def test_name_sizes(self) -> None:
        """Dovecot's ,S=/,W= fields, the usual layout and the odd ones."""
        self.assertEqual(maildir._name_sizes("1.M2P3Q4.host,S=10,W=12"), (10, 12))
        self.assertEqual(maildir._name_sizes("1.M2P3Q4.host,W=12,S=10"), (10, 12))
        self.assertEqual(maildir._name_sizes("x,S=1x,S=5,W=7"), (5, 7))
        self.assertEqual(maildir._name_sizes("x,S=,W=q"), (None, None))

    def test_non_numeric_size_fields_do_not_hide_a_message(self) -> None:
        """A name with ``,S=x`` is sized by reading the file, not dropped."""
        md = Maildir(self.mktemp())
        md.ensure()
        (md.root / "cur" / "junk,S=x,W=:2,S").write_bytes(b"a\nb\n")
        (info,) = md.folder().scan()
        self.assertEqual((info.size, info.vsize), (4, 6))

    def test_only_regular_files_are_messages(self) -> None:
        """Links, directories and FIFOs in new/ and cur/ are not listed or opened."""
        md = Maildir(self.mktemp())
        md.ensure()
        outside = pathlib.Path(self.mktemp())
        outside.write_bytes(b"Subject: outside\n\nsecret\n")
        md.deliver(b"Subject: inside\n\nx\n")
        (md.root / "cur" / "link:2,S").symlink_to(outside.resolve())
        (md.root / "new" / "dir").mkdir()
        os.mkfifo(md.root / "new" / "fifo")
        infos = md.folder().scan()
        self.assertEqual(len(infos), 1)
        fake = maildir.MessageInfo(99, "link", "cur", "link:2,S", frozenset(), 1, 1, md.root)
        with self.assertRaises(OSError):
            md.folder().read_message(fake)
