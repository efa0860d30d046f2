"""The per-folder message cache and CONDSTORE bookkeeping, through real IMAP sessions.

SEARCH must answer the same with the cache cold, warm and rebuilt; a warm
cache answers header SEARCH and FETCH ENVELOPE/BODYSTRUCTURE without opening
message files; expunged messages leave the cache and their UIDs are never
reused; a lost index never lowers HIGHESTMODSEQ; a trimmed expunge log still
gives QRESYNC clients every UID they must forget; Dovecot's subscriptions
file is read and written.
"""

from __future__ import annotations

import datetime
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from mailtwist.imap import mailbox as mailbox_module
from mailtwist.imap.account import format_subscriptions, parse_subscriptions
from mailtwist.imap.mime import ParsedMessage
from mailtwist.imap.search import evaluate, parse_search
from mailtwist.storage import index as index_module
from mailtwist.storage.index import CACHE_NAME, INDEX_NAME
from mailtwist.storage.maildir import Maildir
from mailtwist.tap import build_service
from tests.imap_support import ALICE, IMAPTestCase

CORPUS = [
    (b"From: Carol <carol@example.test>\r\nTo: alice@example.test, dave@example.test\r\n"
     b"Cc: erin@example.test\r\nSubject: =?utf-8?q?Stra=C3=9Fe_caf=C3=A9?=\r\n"
     b"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nX-Tag: red\r\n"
     b"Message-ID: <one@example.test>\r\n\r\nA body with a needle in it.\r\n"),
    (b"From: Dave <dave@example.test>\r\nTo: alice@example.test\r\n"
     b"Bcc: frank@example.test\r\nSubject: quarterly report\r\n"
     b"Date: Fri, 10 Jan 2020 23:30:00 -0800\r\nX-Tag: blue\r\n\r\nNothing here.\r\n"),
    (b"From: =?iso-8859-1?q?J=F6rg?= <joerg@example.test>\r\nTo: bob@example.test\r\n"
     b"Subject: STRASSE works\r\nX-Tag: red\r\nX-Tag: green\r\n\r\n"
     b"--\r\nhello world\r\n"),
    (b"From: carol@example.test\r\nTo: alice@example.test\r\nSubject:\r\n"
     b"Date: garbage\r\n\r\nneedle NEEDLE\r\n"),
    (b"To: nobody@example.test\r\n\r\nno subject, no from\r\n"),
]

QUERIES = [
    b"FROM carol",
    b"FROM J\xc3\xb6rg",
    b"TO alice",
    b"CC erin",
    b"BCC frank",
    b"SUBJECT strasse",
    b"SUBJECT \"\"",
    b"SUBJECT report",
    b"HEADER X-Tag red",
    b"HEADER X-Tag green",
    b"HEADER x-tag \"\"",
    b"HEADER Message-ID <one@",
    b"HEADER Nonexistent \"\"",
    b"TEXT needle",
    b"TEXT \"x-tag: blue\"",
    b"BODY needle",
    b"BODY carol",
    b"SENTSINCE 1-Mar-2024",
    b"SENTBEFORE 11-Jan-2020",
    b"SENTON 10-Jan-2020",
    b"NOT FROM carol",
    b"OR SUBJECT report HEADER X-Tag green",
    b"2:* FROM carol",
    b"UNSEEN SUBJECT caf\xc3\xa9",
]
"""SEARCH keys (UTF-8 unless stated) whose answers must not depend on the cache."""


@dataclass
class Parsed:
    """A corpus message for the evaluator alone: parsed from its bytes, no cache."""

    seq: int
    raw: bytes
    flags: frozenset = frozenset()
    recent: bool = False
    modseq: int = 1

    @property
    def uid(self) -> int:
        return self.seq

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def internaldate(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    def parsed(self) -> ParsedMessage:
        return ParsedMessage.parse(self.raw)


def oracle(query: bytes, charset: bytes) -> list[bytes]:
    """What UID SEARCH must answer for the corpus, by parsing every message."""
    corpus = [Parsed(i, raw) for i, raw in enumerate(CORPUS, 1)]
    found = evaluate(parse_search(b"CHARSET " + charset + b" " + query), corpus)
    return [b"* SEARCH" + b"".join(b" %d" % n for n in found)]


class _CacheTestCase(IMAPTestCase):
    """Warm-up off (tests fill the cache themselves), helpers, restarts."""

    def setUp(self):
        self.patch(mailbox_module, "WARM_UP", False)
        return super().setUp()

    def folder_dir(self) -> Path:
        return self.server.store.path_for(ALICE)

    def cache_rows(self) -> dict[int, str]:
        """UID -> base name of the cache's rows, read with a connection of our own."""
        path = self.folder_dir() / CACHE_NAME
        if not path.exists():
            return {}
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        try:
            return dict(db.execute("SELECT uid, base FROM messages"))
        except sqlite3.OperationalError:  # being created by the server right now
            return {}
        finally:
            db.close()

    def delete_cache(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.folder_dir() / CACHE_NAME}{suffix}").unlink(missing_ok=True)

    def search_all(self, raw) -> list[list[bytes]]:
        results = []
        for i, query in enumerate(QUERIES):
            for charset in (b"UTF-8", b"US-ASCII"):
                if charset == b"US-ASCII" and not query.isascii():
                    continue
                tag = b"s%d%s" % (i, charset[:1])
                command = b"UID SEARCH CHARSET " + charset + b" "
                if query.isascii():
                    reply = raw.command(tag, command + query)
                else:
                    key, _, value = query.rpartition(b" ")
                    raw.send(tag + b" " + command + key + b" {%d+}\r\n" % len(value)
                             + value + b"\r\n")
                    reply = raw.until(tag)
                self.assertTrue(reply[-1].startswith(tag + b" OK"), (query, reply))
                answer = [line for line in reply if line.startswith(b"* SEARCH")]
                self.assertEqual(answer, oracle(query, charset), (query, charset))
                results.append(answer)
        return results

    @defer.inlineCallbacks
    def restart(self):
        """Stop the service and start a new one on the same data directory."""
        yield self._close_clients()
        self.clients = []
        old = self.server
        yield old.stopService()
        for child in list(old):
            old.removeService(child)
        self.server = build_service(self.config, reactor)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        for listeners in self.server.listeners.values():
            for listener in listeners:
                yield listener.listening


class CacheTests(_CacheTestCase):
    """SEARCH and FETCH over the message cache, cold, warm and rebuilt."""

    @defer.inlineCallbacks
    def test_search_is_the_same_cold_warm_and_after_deleting_the_cache(self):
        """Cached header values answer every SEARCH key as parsing the files does
        (checked against the evaluator alone), cold, warm, and rebuilt after the
        cache file was deleted under the running server and after a restart."""
        def before():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"EXAMINE INBOX")
            self.assertEqual(self.cache_rows(), {})
            cold = self.search_all(raw)
            self.assertEqual(len(self.cache_rows()), len(CORPUS))
            warm = self.search_all(raw)
            self.assertEqual(warm, cold)
            self.delete_cache()
            self.assertEqual(self.search_all(raw), cold)
            self.assertEqual(len(self.cache_rows()), len(CORPUS))
            expected = {
                b"FROM carol": b"* SEARCH 1 4",
                b"SUBJECT strasse": b"* SEARCH 1 3",
                b"SUBJECT \"\"": b"* SEARCH 1 2 3 4",
                b"HEADER X-Tag red": b"* SEARCH 1 3",
                b"TEXT needle": b"* SEARCH 1 4",
                b"SENTBEFORE 11-Jan-2020": b"* SEARCH 2",
                b"2:* FROM carol": b"* SEARCH 4",
            }
            by_query = {}
            position = 0
            for query in QUERIES:
                by_query[query] = cold[position]
                position += 2 if query.isascii() else 1
            for query, line in expected.items():
                self.assertEqual(by_query[query], [line], query)
            state["cold"] = cold

        state = {}
        yield self.in_thread(before)
        yield self.restart()
        self.delete_cache()

        def after():
            raw = self.raw()
            raw.command(b"x", b"EXAMINE INBOX")
            self.assertEqual(self.search_all(raw), state["cold"])

        yield self.in_thread(after)

    def test_us_ascii_search_folds_only_ascii(self):
        """CHARSET US-ASCII (i;ascii-casemap) does not let STRASSE find Straße,
        with the cache warm as with it cold."""
        def check():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            for _ in range(2):
                reply = raw.command(b"a", b"SEARCH CHARSET US-ASCII SUBJECT strasse")
                self.assertIn(b"* SEARCH 3", reply)
                reply = raw.command(b"u", b"SEARCH CHARSET UTF-8 SUBJECT strasse")
                self.assertIn(b"* SEARCH 1 3", reply)
        return self.in_thread(check)

    def test_warm_cache_serves_search_and_fetch_without_the_files(self):
        """Once cached, header SEARCH and FETCH ENVELOPE/BODY/BODYSTRUCTURE do not
        read message files: rewritten files do not change their answers."""
        def check():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            items = b"FETCH 1:* (ENVELOPE BODY BODYSTRUCTURE RFC822.SIZE)"
            first = raw.command(b"f", items)
            self.assertEqual(len(self.cache_rows()), len(CORPUS))
            before = raw.command(b"s", b"SEARCH FROM carol")
            for path in self.maildir_files(ALICE):
                path.write_bytes(b"From: mallory@evil.test\nSubject: replaced\n\n"
                                 b"Content-Type: multipart/mixed\n")
            self.assertEqual(raw.command(b"f", items), first)
            self.assertEqual(raw.command(b"s", b"SEARCH FROM carol"), before)
            self.assertIn(b"* SEARCH", raw.command(b"m", b"SEARCH FROM mallory"))
            self.assertNotIn(b"* SEARCH 1", raw.command(b"m", b"SEARCH FROM mallory"))
            # A body search has to read the files, and sees the new content.
            self.assertIn(b"* SEARCH 1 2 3 4 5",
                          raw.command(b"b", b"SEARCH BODY multipart"))
            # So does a body fetch.
            reply = raw.command(b"p", b"FETCH 1 BODY.PEEK[HEADER.FIELDS (FROM)]")
            self.assertIn(b"mallory", b"".join(reply))
        return self.in_thread(check)

    def test_rows_made_by_search_are_completed_by_fetch(self):
        """SEARCH caches only what it needs; the first FETCH ENVELOPE completes
        the row, and later ones no longer need the file."""
        def check():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            raw.command(b"s", b"SEARCH FROM carol")
            self.assertEqual(len(self.cache_rows()), len(CORPUS))
            first = raw.command(b"f", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
            self.assertIn(b'"carol"', first[0])
            for path in self.maildir_files(ALICE):
                path.write_bytes(b"From: mallory@evil.test\n\n")
            self.assertEqual(raw.command(b"f", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)"), first)
        return self.in_thread(check)

    def test_expunged_messages_leave_the_cache_and_uids_are_not_reused(self):
        """EXPUNGE removes the cache row; the next message gets a new UID and row."""
        def check():
            for raw in CORPUS[:3]:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            raw.command(b"s", b"SEARCH FROM dave")
            rows = self.cache_rows()
            self.assertEqual(sorted(rows), [1, 2, 3])
            raw.command(b"d", b"UID STORE 2 +FLAGS.SILENT (\\Deleted)")
            raw.command(b"e", b"EXPUNGE")
            self.assertEqual(sorted(self.cache_rows()), [1, 3])
            self.deliver(b"From: dave@example.test\r\nSubject: again\r\n\r\nnew\r\n")
            raw.command(b"n", b"NOOP")
            self.assertIn(b"* SEARCH 4", raw.command(b"u", b"UID SEARCH FROM dave"))
            rows = self.cache_rows()
            self.assertEqual(sorted(rows), [1, 3, 4])
            self.assertNotEqual(rows[4], dict(rows).get(2))
            reply = raw.command(b"f", b"UID FETCH 4 (ENVELOPE)")
            self.assertIn(b'"again"', reply[0])
        return self.in_thread(check)

    def test_warm_up_fills_the_cache_after_select(self):
        """With warm-up on, the folder gets cached in the background after SELECT."""
        self.patch(mailbox_module, "WARM_UP", True)
        self.patch(mailbox_module, "WARM_CHUNK", 2)

        def check():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            for _ in range(200):
                if len(self.cache_rows()) == len(CORPUS):
                    break
                raw.command(b"n", b"NOOP")
            self.assertEqual(len(self.cache_rows()), len(CORPUS))
        return self.in_thread(check)

    def test_search_runs_in_chunks(self):
        """A SEARCH over more messages than a chunk gives the same numbers, with
        ``*`` still meaning the whole mailbox's last message."""
        self.patch(mailbox_module, "SEARCH_CHUNK", 2)
        self.patch(mailbox_module, "BODY_SEARCH_CHUNK", 2)

        def check():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"x", b"SELECT INBOX")
            self.assertIn(b"* SEARCH 1 4", raw.command(b"a", b"SEARCH FROM carol"))
            self.assertIn(b"* SEARCH 5", raw.command(b"b", b"SEARCH *"))
            self.assertIn(b"* SEARCH 4 5", raw.command(b"c", b"SEARCH 4:* ALL"))
            self.assertIn(b"* SEARCH 1 4", raw.command(b"d", b"SEARCH BODY needle"))
        return self.in_thread(check)


def highest(reply: list[bytes]) -> int:
    for line in reply:
        found = re.search(rb"HIGHESTMODSEQ (\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"no HIGHESTMODSEQ in {reply!r}")


def vanished(reply: list[bytes]) -> bytes | None:
    for line in reply:
        if line.startswith(b"* VANISHED (EARLIER) "):
            return line[len(b"* VANISHED (EARLIER) "):]
    return None


class ModseqTests(_CacheTestCase):
    """HIGHESTMODSEQ across a lost index, and the bounded expunge log."""

    def uidvalidity(self) -> int:
        return self.server.store.maildir(ALICE).folder("INBOX").uidvalidity

    def expunge(self, raw, uid: int) -> None:
        raw.command(b"d", b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
        raw.command(b"e", b"UID EXPUNGE %d" % uid)

    @defer.inlineCallbacks
    def test_lost_or_damaged_index_never_lowers_highestmodseq(self):
        """After the index is deleted (or damaged) HIGHESTMODSEQ is above every
        value a client saw, every message reports a newer MODSEQ, and a QRESYNC
        from before gets a VANISHED (EARLIER) that covers the old expunges."""
        state = {}

        def before():
            for raw in CORPUS:
                self.deliver(raw)
            raw = self.raw()
            raw.command(b"e", b"ENABLE QRESYNC")
            raw.command(b"s", b"SELECT INBOX")
            raw.command(b"f", b"STORE 1:3 +FLAGS.SILENT (\\Flagged)")
            self.expunge(raw, 2)
            state["highest"] = highest(raw.command(b"t", b"STATUS INBOX (HIGHESTMODSEQ)"))
            state["uidvalidity"] = self.uidvalidity()

        def after():
            raw = self.raw()
            raw.command(b"e", b"ENABLE QRESYNC")
            reply = raw.command(b"s", b"SELECT INBOX (QRESYNC (%d %d 1:5))"
                                % (state["uidvalidity"], state["highest"]))
            self.assertGreater(highest(reply), state["highest"])
            self.assertEqual(vanished(reply), b"2")
            fetched = [line for line in reply if b"FETCH" in line]
            self.assertEqual(len(fetched), 4, reply)
            for line in fetched:
                modseq = int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))
                self.assertGreater(modseq, state["highest"])
            state["highest"] = highest(reply)

        yield self.in_thread(before)
        yield self._close_clients()
        yield self.restart()
        (self.folder_dir() / INDEX_NAME).unlink()
        yield self.in_thread(after)
        yield self.restart()
        (self.folder_dir() / INDEX_NAME).write_bytes(b"mailtwist-index 1 damaged\n")
        yield self.in_thread(after)

    def test_trimmed_expunge_log_answers_with_a_superset(self):
        """A client whose mod-sequence is below the trimmed log's floor gets every
        vanished UID of its known range; one above it gets the exact set."""
        self.patch(index_module, "MAX_EXPUNGED", 2)

        def check():
            for i in range(10):
                self.deliver(b"Subject: m%d\r\n\r\nx\r\n" % i)
            b = self.raw()
            b.command(b"e", b"ENABLE QRESYNC")
            old = highest(b.command(b"s", b"SELECT INBOX"))
            for uid in (1, 2, 3):
                self.expunge(b, uid)
            middle = highest(b.command(b"t", b"STATUS INBOX (HIGHESTMODSEQ)"))
            for uid in (5, 6):
                self.expunge(b, uid)
            uidvalidity = self.uidvalidity()
            a = self.raw()
            a.command(b"e", b"ENABLE QRESYNC")
            reply = a.command(b"q", b"SELECT INBOX (QRESYNC (%d %d 1:10))" % (uidvalidity, old))
            self.assertEqual(vanished(reply), b"1:3,5:6")
            reply = a.command(b"r", b"SELECT INBOX (QRESYNC (%d %d 2:5))" % (uidvalidity, old))
            self.assertEqual(vanished(reply), b"2:3,5")
            reply = a.command(b"m", b"SELECT INBOX (QRESYNC (%d %d))" % (uidvalidity, middle))
            self.assertEqual(vanished(reply), b"5:6")
            reply = a.command(b"f", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % old)
            self.assertEqual(vanished(reply), b"1:3,5:6")
            reply = a.command(b"g", b"UID FETCH 4:* (FLAGS) (CHANGEDSINCE %d VANISHED)"
                              % middle)
            self.assertEqual(vanished(reply), b"5:6")
        return self.in_thread(check)


class SubscriptionTests(IMAPTestCase):
    """Dovecot's ``subscriptions`` file, read and written."""

    def root(self) -> Path:
        return self.server.store.path_for(ALICE)

    def test_dovecot_version_2_file_is_read_and_written(self):
        """A migrated Dovecot user keeps the subscriptions; ours stay readable by Dovecot."""
        def check():
            self.deliver(b"Subject: x\r\n\r\nx\r\n")
            (self.root() / "subscriptions").write_bytes(
                "V\t2\n\nArchive\t2024\nStraße\nbad\x01tname\n".encode())
            client = self.imapclient()
            names = {name for _, _, name in client.list_sub_folders()}
            self.assertIn("Archive/2024", names)
            self.assertIn("Straße", names)
            client.subscribe_folder("Work")
            data = (self.root() / "subscriptions").read_bytes()
            self.assertTrue(data.startswith(b"V\t2\n\n"), data)
            lines = data.decode().split("\n")[2:]
            self.assertIn("Archive\t2024", lines)
            self.assertIn("Straße", lines)
            self.assertIn("Work", lines)
            client.unsubscribe_folder("Archive/2024")
            self.assertNotIn(b"Archive\t2024\n", (self.root() / "subscriptions").read_bytes())
        return self.in_thread(check)

    def test_version_1_file_is_read(self):
        """Lines without the version header: modified UTF-7, '/' or '.' between levels."""
        def check():
            self.deliver(b"Subject: x\r\n\r\nx\r\n")
            (self.root() / "subscriptions").write_bytes(b"Lists.Python\nNews/Daily\nStra&AN8-e\n")
            client = self.imapclient()
            names = {name for _, _, name in client.list_sub_folders()}
            self.assertTrue({"Lists/Python", "News/Daily", "Straße"} <= names, names)
        return self.in_thread(check)

    def test_format_round_trip(self):
        """What we write is what we read, levels separated by TABs."""
        names = {"INBOX", "Archive/2024/Q1", "Straße", "a&b"}
        data = format_subscriptions(names)
        self.assertEqual(data.split(b"\n")[:3], [b"V\t2", b"", b"Archive\t2024\tQ1"])
        self.assertEqual(parse_subscriptions(data), names)
        self.assertEqual(parse_subscriptions(b"V\t2\n\nA\x01tB\n"), set())


class _Warmable:
    """Stands in for a SharedFolder in the registry's warm-up queue."""

    def __init__(self, path: str, log: list) -> None:
        self.path = self.name = path
        self.gone = False
        self.log = log
        self.release = defer.Deferred()

    async def _warm_up(self) -> None:
        self.log.append(("start", self.path))
        await self.release
        self.log.append(("end", self.path))


class WarmUpQueueTests(SynchronousTestCase):
    """Folders are warmed one at a time, each once per request."""

    def test_one_folder_at_a_time(self):
        """A second folder waits for the first; a repeated request is not doubled."""
        registry = mailbox_module.FolderRegistry(None, None)
        log: list = []
        a, b, c = (_Warmable(p, log) for p in ("a", "b", "c"))
        registry.warm_up(a)
        registry.warm_up(b)
        registry.warm_up(b)
        registry.warm_up(c)
        c.gone = True
        self.assertEqual(log, [("start", "a")])
        a.release.callback(None)
        self.assertEqual(log, [("start", "a"), ("end", "a"), ("start", "b")])
        b.release.callback(None)
        self.assertEqual(log[-1], ("end", "b"))
        self.assertEqual(len(log), 4)


class CountingPool(ThreadPool):
    """A real thread pool that counts the jobs it was given."""

    jobs = 0

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.jobs += 1
        return super().callInThreadWithCallback(onResult, func, *args, **kw)


class ChunkedSearchTests(unittest.TestCase):
    """SEARCH over a big folder is many short pool jobs, not one long one."""

    @defer.inlineCallbacks
    def test_search_is_split_into_pool_jobs(self):
        """With 2 messages per chunk, 7 messages take 4 jobs (header keys too)."""
        self.patch(mailbox_module, "WARM_UP", False)
        self.patch(mailbox_module, "SEARCH_CHUNK", 2)
        pool = CountingPool(0, 2)
        pool.start()
        self.addCleanup(pool.stop)
        maildir = Maildir(self.mktemp())
        for i in range(7):
            sender = b"carol" if i % 2 else b"dave"
            maildir.deliver(b"From: %s@example.test\r\n\r\nx\r\n" % sender)
        shared = mailbox_module.FolderRegistry(reactor, pool).get(maildir, "INBOX")
        yield defer.Deferred.fromCoroutine(shared.refresh())
        uids = list(shared.uids)
        messages = [shared.messages[u] for u in uids]
        before = pool.jobs
        found = yield defer.Deferred.fromCoroutine(
            shared.search(parse_search(b"FROM carol"), uids, messages, set()))
        self.assertEqual(found, [2, 4, 6])
        self.assertEqual(pool.jobs - before, 4)
        found = yield defer.Deferred.fromCoroutine(
            shared.search(parse_search(b"7:*"), uids, messages, set()))
        self.assertEqual(found, [7])


class ScanCountingFolder(mailbox_module.SharedFolder):
    """A real SharedFolder that counts the full scans it makes."""

    scans = 0

    def _scan_blocking(self, force):
        result = super()._scan_blocking(force)
        if result is not None:
            type(self).scans += 1
        return result


class RefreshSharingTests(unittest.TestCase):
    """Sessions busy on one folder share scans (issue 7: stay-logged-in load)."""

    def setUp(self):
        self.patch(mailbox_module, "WARM_UP", False)
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.maildir = Maildir(self.mktemp())
        for i in range(3):
            self.maildir.deliver(b"Subject: %d\r\n\r\nx\r\n" % i)
        registry = mailbox_module.FolderRegistry(reactor, self.pool)
        self.shared = ScanCountingFolder(registry, self.maildir, "INBOX",
                                         str(self.maildir.folder_path("INBOX")))
        ScanCountingFolder.scans = 0

    def refresh(self, force=False):
        return defer.Deferred.fromCoroutine(self.shared.refresh(force))

    @defer.inlineCallbacks
    def test_waiting_refreshes_share_one_scan(self):
        """Guards the coalescing: refreshes queued behind a running one do not
        each rescan; a scan that started after them has seen everything."""
        yield self.refresh()
        self.assertEqual(ScanCountingFolder.scans, 1)
        self.maildir.deliver(b"Subject: new\r\n\r\nx\r\n")
        yield self.shared.lock.acquire()
        waiting = [self.refresh() for _ in range(5)]
        self.shared.lock.release()
        yield defer.gatherResults(waiting)
        self.assertEqual(ScanCountingFolder.scans, 2)
        self.assertEqual(len(self.shared.uids), 4)

    @defer.inlineCallbacks
    def test_hundreds_of_waiting_sessions_all_get_their_answer(self):
        """Guards against the lock hand-over recursion: 600 refreshes queued at
        once (sessions selecting together) all finish, with one scan."""
        yield self.refresh()
        before = ScanCountingFolder.scans
        yield self.shared.lock.acquire()
        waiting = [self.refresh() for _ in range(600)]
        self.shared.lock.release()
        results = yield defer.DeferredList(waiting, consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in results), [r for ok, r in results if not ok][:1])
        self.assertLessEqual(ScanCountingFolder.scans, before + 1)

    @defer.inlineCallbacks
    def test_own_store_needs_no_rescan_but_other_changes_are_seen(self):
        """Guards the own-change stamp: after our STORE the next refresh does not
        rescan; a change by another program afterwards is still noticed."""
        yield self.refresh()
        uid = self.shared.uids[0]
        yield defer.Deferred.fromCoroutine(
            self.shared.store([uid], "add", ["\\Flagged"], origin=None))
        scans = ScanCountingFolder.scans
        yield self.refresh()
        self.assertEqual(ScanCountingFolder.scans, scans)
        self.maildir.deliver(b"Subject: from outside\r\n\r\nx\r\n")
        yield self.refresh()
        self.assertEqual(ScanCountingFolder.scans, scans + 1)
        self.assertEqual(len(self.shared.uids), 4)
