"""The Quarantine verdict: durable entries under data_dir/quarantine, 250 to the
client, no mailbox copy, and `mailtwist quarantine list|show|release|delete`."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailtwist import cli
from mailtwist import quarantine as quarantine_module
from mailtwist.delivery import DeliveryError, LocalDelivery
from mailtwist.filters import Filter, header_values
from mailtwist.filters.chain import FilterError
from mailtwist.interfaces import Continue, Quarantine
from mailtwist.quarantine import QuarantineEntry, QuarantineError, QuarantineStore
from mailtwist.queue.spool import Spool
from mailtwist.storage.store import MailStore
from mailtwist.testing import DOMAIN, FilterTestServer

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = "carol@remote.example"
MESSAGE = b"From: sender@example.test\r\nSubject: cheap pills\r\n\r\nbuy now\r\n"


class DataQuarantine(Filter):
    name = "pill_detector"

    def data(self, session, message):
        if b"pills" in message:
            return Quarantine("pills")
        return Continue()


class QuarantineBob(Filter):
    name = "bob_guard"

    def delivery(self, session, message, target):
        if target.account == BOB:
            return Quarantine("bob gets no pills")
        return Continue()


class RcptQuarantine(Filter):
    name = "early_quarantine"

    def rcpt_to(self, session, recipient):
        return Quarantine("too early")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


class QuarantineVerdictTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, filters, **kwargs):
        self.server = yield FilterTestServer(self, filters, **kwargs).start()
        return self.server

    @defer.inlineCallbacks
    def test_data_stage_quarantine(self):
        """Data-stage Quarantine: 250, no mailbox copy, one entry with envelope and reason."""
        server = yield self.start([DataQuarantine()])
        result = yield server.send(MESSAGE, recipients=[ALICE, BOB])
        self.assertTrue(result.accepted)
        self.assertEqual((result.stored[ALICE], result.stored[BOB]), ([], []))
        [held] = result.quarantined
        self.assertEqual(held.reason, "pills")
        entry = held.entry
        self.assertEqual((entry.stage, entry.filter, entry.sender),
                         ("data", "pill_detector", f"sender@{DOMAIN}"))
        self.assertEqual(entry.recipients, [ALICE, BOB])
        self.assertTrue(held.content.startswith(b"Received: "))
        self.assertIn(b"buy now", held.content)
        root = server.data_dir / "quarantine"
        self.assertEqual(sorted(p.name for p in root.iterdir() if p.is_file()),
                         [held.id + ".json", held.id + ".msg"])

    @defer.inlineCallbacks
    def test_delivery_stage_quarantines_one_copy(self):
        """Delivery-stage Quarantine holds that local copy only; the others are delivered."""
        server = yield self.start([QuarantineBob()])
        result = yield server.send(MESSAGE, recipients=[ALICE, BOB])
        self.assertTrue(result.accepted)
        self.assertEqual(len(result.stored[ALICE]), 1)
        self.assertEqual(result.stored[BOB], [])
        [held] = result.quarantined
        self.assertEqual((held.entry.stage, held.reason), ("delivery", "bob gets no pills"))
        self.assertEqual([(c.account, c.address) for c in held.entry.local], [(BOB, BOB)])
        self.assertEqual(held.entry.remote, [])

    @defer.inlineCallbacks
    def test_quarantine_at_rcpt_is_a_filter_error(self):
        """Quarantine is only for data and delivery: elsewhere a 451 filter error."""
        server = yield self.start([RcptQuarantine()])
        result = yield server.send(MESSAGE)
        self.assertEqual((result.stage, result.code, result.enhanced), ("rcpt", 451, "4.7.1"))
        self.assertEqual(result.quarantined, [])
        self.flushLoggedErrors(FilterError)

    @defer.inlineCallbacks
    def test_entry_is_fsynced_before_the_reply(self):
        """The message file, envelope file and directory are fsynced (250 waits for them)."""
        synced: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        self.patch(quarantine_module.os, "fsync", recording_fsync)
        server = yield self.start([DataQuarantine()])
        result = yield server.send(MESSAGE)
        [held] = result.quarantined
        root = str(server.data_dir / "quarantine")
        tmp = root + "/tmp/"
        self.assertTrue(any(p.startswith(tmp + held.id + ".msg.") for p in synced), synced)
        self.assertTrue(any(p.startswith(tmp + held.id + ".json.") for p in synced), synced)
        self.assertIn(root, synced)

    @defer.inlineCallbacks
    def test_failed_write_is_a_4xx_and_leaves_nothing(self):
        """If the quarantine cannot be written, the client gets 4xx and no entry remains."""
        server = yield self.start([DataQuarantine()])
        root = server.data_dir / "quarantine"
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_text("not a directory")
        result = yield server.send(MESSAGE)
        self.assertEqual(result.code // 100, 4)
        self.assertEqual(result.stored[ALICE], [])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_survives_a_restart(self):
        """A new store on the same directory (a restarted server) finds the entry."""
        server = yield self.start([DataQuarantine()])
        result = yield server.send(MESSAGE)
        [held] = result.quarantined
        yield server.server.stopService()
        store = QuarantineStore(server.data_dir / "quarantine")
        self.assertEqual(store.ids(), [held.id])
        self.assertEqual(store.load(held.id).reason, "pills")
        self.assertEqual(store.read_message(held.id), held.content)


class QuarantineCommandTests(unittest.TestCase):
    """`mailtwist quarantine` on the data directory of a server that quarantined mail."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield FilterTestServer(self, [DataQuarantine()]).start()
        result = yield self.server.send(MESSAGE, recipients=[ALICE, BOB])
        [self.held] = result.quarantined
        self.data_dir = str(self.server.data_dir)

    def test_list(self):
        """list shows the id, sender, stage, filter, reason and recipients."""
        status, out, _ = run_cli("quarantine", "list", "--data-dir", self.data_dir)
        self.assertEqual(status, 0)
        self.assertIn(self.held.id, out)
        self.assertIn("data stage, filter pill_detector", out)
        self.assertIn(": pills", out)
        self.assertIn(f"<{BOB}>", out)
        self.assertIn("1 message in quarantine", out)

    def test_show(self):
        """show prints the envelope and the headers."""
        status, out, _ = run_cli("quarantine", "show", self.held.id, "--data-dir",
                                 self.data_dir)
        self.assertEqual(status, 0)
        self.assertIn('"reason": "pills"', out)
        self.assertIn("Subject: cheap pills", out)
        self.assertNotIn("buy now", out)

    @defer.inlineCallbacks
    def test_release_delivers_to_the_original_recipients_without_filters(self):
        """release delivers to every original recipient's INBOX (no filters) and removes it."""
        status, out, _ = yield deferToThread(
            run_cli, "quarantine", "release", self.held.id, "--data-dir", self.data_dir)
        self.assertEqual(status, 0, out)
        self.assertIn(f"released {self.held.id}", out)
        for account in (ALICE, BOB):
            [stored] = yield deferToThread(self.server.stored, account)
            self.assertEqual(stored.folder, "INBOX")
            self.assertIn(b"buy now", stored.content)
            self.assertEqual(header_values(stored.content.replace(b"\n", b"\r\n"),
                                           "Delivered-To"), [account])
        self.assertEqual(QuarantineStore(Path(self.data_dir) / "quarantine").ids(), [])

    def test_delete(self):
        """delete removes the entry; a second delete is a one-line error."""
        status, out, _ = run_cli("quarantine", "delete", self.held.id, "--data-dir",
                                 self.data_dir)
        self.assertEqual((status, out.strip()), (0, f"deleted {self.held.id}"))
        status, _, err = run_cli("quarantine", "delete", self.held.id, "--data-dir",
                                 self.data_dir)
        self.assertEqual(status, 1)
        self.assertEqual(err.strip(), f"mailtwist: error: no quarantined message {self.held.id}")

    def test_unknown_id(self):
        """An unknown or malformed id is one line, exit status 1."""
        for bad in ("0123456789ABCDEF", "../etc"):
            status, _, err = run_cli("quarantine", "release", bad, "--data-dir",
                                     self.data_dir)
            self.assertEqual(status, 1)
            self.assertEqual(len(err.strip().splitlines()), 1)


class StoreTests(unittest.TestCase):
    def test_release_remote_goes_to_the_spool(self):
        """Released remote recipients are spooled (signed when the original was)."""
        root = Path(self.mktemp())
        store = QuarantineStore(root / "quarantine")
        entry_id = store.add_blocking(b"Subject: x\r\n\r\nhi\r\n", QuarantineEntry(
            sender=ALICE, reason="r", stage="data", remote=[CAROL], sign=True, user=ALICE))
        spool = Spool(root / "queue")
        local = LocalDelivery(MailStore(root / "mail", "mx.example.test"), None, None)
        store.release_blocking(entry_id, local, spool,
                               signer=lambda m: b"DKIM-Signature: test\r\n" + m)
        [queued] = spool.ids()
        envelope = spool.load(queued)
        self.assertEqual(([r.address for r in envelope.recipients], envelope.sender),
                         ([CAROL], ALICE))
        self.assertTrue(spool.read_message(queued).startswith(b"DKIM-Signature: test\r\n"))
        self.assertEqual(store.ids(), [])

    def test_failed_release_keeps_the_entry(self):
        """If a local copy cannot be written, the entry stays and nothing is spooled."""
        root = Path(self.mktemp())
        store = QuarantineStore(root / "quarantine")
        from mailtwist.quarantine import QuarantinedCopy
        entry_id = store.add_blocking(b"Subject: x\r\n\r\nhi\r\n", QuarantineEntry(
            sender=ALICE, reason="r", stage="data", remote=[CAROL],
            local=[QuarantinedCopy(BOB, BOB)]))
        (root / "mail").mkdir(parents=True)
        (root / "mail" / DOMAIN).write_text("a file where a directory should be")
        spool = Spool(root / "queue")
        local = LocalDelivery(MailStore(root / "mail", "mx.example.test"), None, None)
        self.assertRaises(DeliveryError, store.release_blocking, entry_id, local, spool)
        self.assertEqual(store.ids(), [entry_id])
        self.assertEqual(spool.ids(), [])
        self.flushLoggedErrors()

    def test_bad_id_is_refused(self):
        """Ids are checked, so a path cannot escape the quarantine directory."""
        store = QuarantineStore(Path(self.mktemp()))
        self.assertRaises(QuarantineError, store.load, "../../etc/passwd")

    def test_reason_is_one_line(self):
        """A reason with CR/LF is refused when the verdict is made (it is logged and stored)."""
        self.assertRaises(ValueError, Quarantine, "a\r\nb")
        self.assertEqual(Quarantine().reason, "quarantined by a filter")


class CrashLeftoverTests(unittest.TestCase):
    """What a crash leaves in the quarantine is removed at start-up."""

    def test_old_leftovers_go_fresh_and_complete_entries_stay(self):
        """Guards the start-up cleanup: old temp files and messages without an
        envelope (never acknowledged) go; fresh ones (a write in progress,
        maybe by another worker) and complete entries stay."""
        import time

        store = QuarantineStore(self.mktemp())
        kept = store.add_blocking(b"Subject: kept\r\n\r\nx\r\n",
                                  QuarantineEntry(sender="a@b.test", reason="test",
                                                  stage="data", remote=["c@d.test"]))
        old = time.time() - 7200
        leftovers = [store.tmp / "x.msg.abc", store.root / "Q0ORPHAN.msg"]
        fresh = store.tmp / "y.msg.def"
        for path in leftovers + [fresh]:
            path.write_bytes(b"partial")
        for path in leftovers:
            os.utime(path, (old, old))
        os.utime(store.root / f"{kept}.msg", (old, old))
        self.assertEqual(store.clean_blocking(), 2)
        self.assertFalse(any(path.exists() for path in leftovers))
        self.assertTrue(fresh.exists())
        self.assertEqual(store.ids(), [kept])
        self.assertEqual(store.read_message(kept), b"Subject: kept\r\n\r\nx\r\n")

    def test_start_up_cleanup_covers_the_quarantine(self):
        """Guards the wiring: the server's start-up cleanup runs the quarantine's."""
        from mailtwist.config import load_config
        from mailtwist.tap import build_service

        data = Path(self.mktemp()).resolve()
        config = load_config(None, {"data_dir": str(data), "hostname": "mx.example.test",
                                    "listen": {}})
        top = build_service(config)
        self.assertIs(top.tmp_cleanup.quarantine, top.quarantine)
        leftover = top.quarantine.tmp / "z.msg.old"
        leftover.parent.mkdir(parents=True)
        leftover.write_bytes(b"partial")
        os.utime(leftover, (1, 1))
        top.tmp_cleanup._clean()
        self.assertFalse(leftover.exists())
