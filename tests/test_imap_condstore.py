"""CONDSTORE and QRESYNC (RFC 7162) on the real server, with IMAPClient and raw
lines: mod-sequences, their persistence across restarts, conditional STORE,
VANISHED, and the index being rebuilt when it is lost."""

from __future__ import annotations

import os
import re
import time

from twisted.internet import defer, reactor

from mailtwist.storage.index import INDEX_NAME
from mailtwist.storage.maildir import Maildir
from mailtwist.tap import build_service
from tests.imap_support import ALICE, IMAPTestCase, message


def untagged(reply: list[bytes]) -> list[bytes]:
    return [line for line in reply if line.startswith(b"* ")]


def highest(reply: list[bytes]) -> int:
    for line in reply:
        found = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"no HIGHESTMODSEQ in {reply!r}")


def modseqs(reply: list[bytes]) -> dict[int, int]:
    """UID -> MODSEQ of the FETCH responses."""
    out = {}
    for line in reply:
        found = re.search(rb"FETCH \(.*UID (\d+).*MODSEQ \((\d+)\)", line)
        if found:
            out[int(found.group(1))] = int(found.group(2))
    return out


class CondstoreTests(IMAPTestCase):

    def index_path(self):
        return self.server.store.path_for(ALICE) / INDEX_NAME

    @defer.inlineCallbacks
    def restart(self):
        """Stop the service and start a new one on the same data directory."""
        yield self._close_clients()
        self.clients = []
        old = self.server
        yield old.stopService()
        for child in list(old):
            old.removeService(child)  # so the cleanup does not stop them twice
        self.server = build_service(self.config, reactor)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        for listeners in self.server.listeners.values():
            for listener in listeners:
                yield listener.listening

    def test_capability_and_select_condstore(self):
        def check():
            self.deliver(message("one"))
            with self.imapclient() as client:
                caps = client.capabilities()
                self.assertIn(b"CONDSTORE", caps)
                self.assertIn(b"QRESYNC", caps)
            raw = self.raw()
            reply = raw.command(b"s", b"SELECT INBOX")
            # RFC 7162 3.1.2.1: HIGHESTMODSEQ on every SELECT, even before CONDSTORE.
            self.assertGreaterEqual(highest(reply), 1)
            reply = raw.command(b"c", b"SELECT INBOX (CONDSTORE)")
            self.assertGreaterEqual(highest(reply), 1)
            self.assertTrue(reply[-1].startswith(b"c OK [READ-WRITE]"), reply)
            reply = raw.command(b"f", b"FETCH 1 (FLAGS MODSEQ)")
            self.assertRegex(reply[0], rb"^\* 1 FETCH \(FLAGS \((\\Recent)?\) MODSEQ \(\d+\)\)$")
        return self.in_thread(check)

    def test_modseq_grows_on_store_append_and_delivery(self):
        def check():
            self.deliver(message("one"))
            with self.imapclient() as client:
                client.enable("CONDSTORE")
                start = client.select_folder("INBOX")[b"HIGHESTMODSEQ"]
                first = client.fetch([1], ["MODSEQ"])[1][b"MODSEQ"][0]
                self.assertLessEqual(first, start)
                client.add_flags([1], [b"\\Flagged"])
                after_store = client.fetch([1], ["MODSEQ"])[1][b"MODSEQ"][0]
                self.assertGreater(after_store, start)
                client.append("INBOX", message("appended"))
                self.deliver(message("delivered"))
                client.noop()
                fetched = client.fetch(client.search(), ["MODSEQ"])
                self.assertEqual(len(fetched), 3)
                appended, delivered = (fetched[uid][b"MODSEQ"][0] for uid in (2, 3))
                self.assertGreater(appended, after_store)
                self.assertGreater(delivered, appended)
                status = client.folder_status("INBOX", [b"HIGHESTMODSEQ"])
                self.assertEqual(status[b"HIGHESTMODSEQ"], delivered)
                changed = client.fetch(client.search(), ["FLAGS"],
                                       modifiers=[f"CHANGEDSINCE {appended}"])
                self.assertEqual(sorted(changed), [3])
                self.assertEqual(changed[3][b"MODSEQ"], (delivered,))
        return self.in_thread(check)

    def test_untagged_fetch_carries_modseq_after_enable(self):
        def check():
            self.deliver(message("one"))
            a, b = self.raw(), self.raw()
            b.command(b"e", b"ENABLE CONDSTORE")
            a.command(b"s", b"SELECT INBOX")
            b.command(b"s", b"SELECT INBOX")
            a.command(b"1", b"STORE 1 +FLAGS.SILENT (\\Seen)")
            seen = untagged(b.command(b"n", b"NOOP"))
            self.assertEqual(len(seen), 1)
            self.assertRegex(seen[0], rb"^\* 1 FETCH \(UID 1 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)$")
            other = untagged(a.command(b"2", b"STORE 1 +FLAGS (\\Flagged)"))
            self.assertEqual(len(other), 1)
            self.assertRegex(other[0], rb"^\* 1 FETCH \(FLAGS \(\\Flagged \\Seen[^)]*\)\)$")
        return self.in_thread(check)

    def test_unchangedsince_conflict_answers_modified(self):
        def check():
            for i in range(3):
                self.deliver(message(f"m{i}"))
            a, b = self.raw(), self.raw()
            a.command(b"s", b"SELECT INBOX (CONDSTORE)")
            b.command(b"s", b"SELECT INBOX (CONDSTORE)")
            known = modseqs(a.command(b"f", b"FETCH 1:3 (UID MODSEQ)"))
            b.command(b"1", b"STORE 2 +FLAGS.SILENT (\\Flagged)")
            reply = a.command(b"2", b"STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS (\\Seen)"
                              % max(known.values()))
            self.assertTrue(reply[-1].startswith(b"2 OK [MODIFIED 2]"), reply)
            stored = modseqs(a.command(b"3", b"FETCH 1:3 (UID FLAGS MODSEQ)"))
            self.assertGreater(stored[1], known[1])
            self.assertGreater(stored[3], known[3])
            flags = a.command(b"4", b"FETCH 2 (FLAGS)")
            self.assertRegex(flags[0], rb"^\* 2 FETCH \(FLAGS \(\\Flagged[^)]*\)\)$")
            reply = a.command(b"5", b"UID STORE 1 (UNCHANGEDSINCE 0) +FLAGS (\\Draft)")
            self.assertTrue(reply[-1].startswith(b"5 OK [MODIFIED 1]"), reply)
            reply = a.command(b"6", b"STORE 1 (UNCHANGEDSINCE %d) -FLAGS.SILENT (\\Seen)"
                              % stored[1])
            self.assertTrue(reply[-1].startswith(b"6 OK STORE"), reply)
            self.assertRegex(untagged(reply)[0], rb"^\* 1 FETCH \(MODSEQ \(\d+\)\)$")
        return self.in_thread(check)

    def test_search_modseq_reports_highest_match(self):
        def check():
            for i in range(3):
                self.deliver(message(f"m{i}"))
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            raw.command(b"1", b"STORE 2 +FLAGS.SILENT (\\Seen)")
            reply = raw.command(b"2", b"FETCH 2 (MODSEQ)")
            value = modseqs([line.replace(b"(MODSEQ", b"(UID 2 MODSEQ") for line in reply])[2]
            reply = raw.command(b"3", b"SEARCH MODSEQ %d" % value)
            self.assertIn(b"* SEARCH 2 (MODSEQ %d)" % value, reply)
            reply = raw.command(b"4", b"SEARCH MODSEQ %d" % (value + 1))
            self.assertIn(b"* SEARCH", reply)
        return self.in_thread(check)

    @defer.inlineCallbacks
    def test_modseq_survives_restart(self):
        state = {}

        def before():
            self.deliver(message("one"))
            self.deliver(message("two"))
            with self.imapclient() as client:
                client.enable("CONDSTORE")
                client.select_folder("INBOX")
                client.add_flags([1], [b"\\Seen"])
                client.add_flags([2], [b"\\Flagged"])
                state["modseqs"] = {uid: d[b"MODSEQ"][0]
                                    for uid, d in client.fetch(client.search(), ["MODSEQ"]).items()}
                state["highest"] = client.folder_status("INBOX", [b"HIGHESTMODSEQ"])[
                    b"HIGHESTMODSEQ"]

        def after():
            with self.imapclient() as client:
                client.enable("CONDSTORE")
                self.assertEqual(client.select_folder("INBOX")[b"HIGHESTMODSEQ"],
                                 state["highest"])
                again = {uid: d[b"MODSEQ"][0]
                         for uid, d in client.fetch(client.search(), ["MODSEQ"]).items()}
                self.assertEqual(again, state["modseqs"])
                client.remove_flags([1], [b"\\Seen"])
                self.assertGreater(client.fetch([1], ["MODSEQ"])[1][b"MODSEQ"][0],
                                   state["highest"])

        yield self.in_thread(before)
        yield self.restart()
        yield self.in_thread(after)

    @defer.inlineCallbacks
    def test_changes_while_stopped_get_new_modseqs(self):
        state = {}

        def before():
            for i in range(3):
                self.deliver(message(f"m{i}"))
            raw = self.raw()
            state["highest"] = highest(raw.command(b"s", b"SELECT INBOX (CONDSTORE)"))

        def outside():
            cur = self.server.store.path_for(ALICE) / "cur"
            infos = sorted(Maildir(self.server.store.path_for(ALICE)).folder("INBOX").scan(),
                           key=lambda info: info.uid)
            self.assertEqual([info.uid for info in infos], [1, 2, 3])
            os.rename(infos[0].path, cur / (infos[0].base + ":2,S"))
            infos[1].path.unlink()

        def after():
            raw = self.raw()
            raw.command(b"e", b"ENABLE QRESYNC")
            reply = raw.command(b"s", b"SELECT INBOX (QRESYNC (%d %d))"
                                % (self.uidvalidity(), state["highest"]))
            self.assertGreater(highest(reply), state["highest"])
            self.assertIn(b"* VANISHED (EARLIER) 2", reply)
            changed = modseqs(reply)
            self.assertEqual(sorted(changed), [1])
            self.assertGreater(changed[1], state["highest"])

        yield self.in_thread(before)
        yield self.restart()
        yield self.in_thread(outside)
        yield self.in_thread(after)

    def uidvalidity(self) -> int:
        return self.server.store.maildir(ALICE).folder("INBOX").uidvalidity

    def test_qresync_select_reports_vanished_and_changes(self):
        def check():
            for i in range(4):
                self.deliver(message(f"m{i}"))
            a, b = self.raw(), self.raw()
            a.command(b"e", b"ENABLE QRESYNC")
            reply = a.command(b"s", b"SELECT INBOX")
            mark = highest(reply)
            uidvalidity = self.uidvalidity()
            a.command(b"u", b"UNSELECT")
            b.command(b"s", b"SELECT INBOX")
            b.command(b"1", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
            b.command(b"2", b"STORE 3 +FLAGS.SILENT (\\Flagged)")
            b.command(b"3", b"EXPUNGE")
            reply = a.command(b"q", b"SELECT INBOX (QRESYNC (%d %d 1:4))" % (uidvalidity, mark))
            self.assertIn(b"* VANISHED (EARLIER) 2", reply)
            self.assertEqual(sorted(modseqs(reply)), [3])
            self.assertIn(b"* 3 EXISTS", reply)
            reply = a.command(b"r", b"SELECT INBOX (QRESYNC (%d %d 3:4))" % (uidvalidity, mark))
            self.assertIn(b"* OK [CLOSED] Previous mailbox closed.", reply)
            self.assertFalse(any(b"VANISHED" in line for line in reply), reply)
            reply = a.command(b"w", b"SELECT INBOX (QRESYNC (%d %d))" % (uidvalidity + 1, mark))
            self.assertFalse(any(b"VANISHED" in line or b"MODSEQ (" in line for line in reply))
            reply = a.command(b"v", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % mark)
            self.assertEqual(reply[0], b"* VANISHED (EARLIER) 2")
            self.assertEqual(sorted(modseqs(reply)), [3])
            b.command(b"4", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            b.command(b"5", b"EXPUNGE")
            self.assertIn(b"* VANISHED 1", a.command(b"n", b"NOOP"))
            reply = b.command(b"x", b"SELECT INBOX (QRESYNC (1 1))")
            self.assertTrue(reply[-1].startswith(b"x BAD"), reply)
        return self.in_thread(check)

    @defer.inlineCallbacks
    def test_lost_index_is_rebuilt(self):
        state = {}

        def before():
            self.deliver(message("one"))
            with self.imapclient() as client:
                client.enable("CONDSTORE")
                client.select_folder("INBOX")
                client.add_flags([1], [b"\\Seen"])
                client.add_flags([1], [b"\\Flagged"])
                self.index_path().unlink()
                client.add_flags([1], [b"\\Answered"])
                state["highest"] = client.folder_status("INBOX", [b"HIGHESTMODSEQ"])[
                    b"HIGHESTMODSEQ"]
            self.assertTrue(self.index_path().exists())
            self.assertGreater(state["highest"], 2)

        def after():
            with self.imapclient() as client:
                client.enable("CONDSTORE")
                # RFC 7162: HIGHESTMODSEQ never goes down without a new UIDVALIDITY
                rebuilt = client.select_folder("INBOX")[b"HIGHESTMODSEQ"]
                self.assertGreater(rebuilt, state["highest"])
                self.assertEqual(client.fetch([1], ["MODSEQ"])[1][b"MODSEQ"], (rebuilt,))
                self.deliver(message("two"))
                client.noop()
                fetched = client.fetch(client.search(), ["FLAGS", "MODSEQ"])
                self.assertEqual(sorted(fetched), [1, 2])
                self.assertEqual(fetched[2][b"MODSEQ"], (rebuilt + 1,))
            self.assertTrue(self.index_path().read_bytes().startswith(b"mailtwist-index 2 "))

        yield self.in_thread(before)
        yield self.restart()
        self.index_path().unlink()
        yield self.in_thread(after)

    def test_new_uidvalidity_rebuilds_the_index(self):
        def check():
            self.deliver(message("one"))
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX (CONDSTORE)")
            raw.command(b"1", b"STORE 1 +FLAGS.SILENT (\\Seen)")
            old = self.uidvalidity()
            (self.server.store.path_for(ALICE) / "dovecot-uidlist").unlink()
            raw.send(b"2 NOOP\r\n")
            reply = []
            try:
                while True:
                    reply.append(raw.line())
            except EOFError:
                pass
            self.assertTrue(any(b"BYE [UNAVAILABLE]" in line for line in reply), reply)
            fresh = self.raw()
            reply = fresh.command(b"s", b"SELECT INBOX (CONDSTORE)")
            new = int(re.search(rb"\[UIDVALIDITY (\d+)\]", b"".join(reply)).group(1))
            self.assertNotEqual(new, old)
            self.assertEqual(highest(reply), 1)
            header = self.index_path().read_bytes().split(b"\n")[0]
            self.assertEqual(header, b"mailtwist-index 1 %d 1" % new)
        return self.in_thread(check)

    def test_flag_rename_by_another_program_gets_a_new_modseq(self):
        def check():
            self.deliver(message("one"), flags="S")
            raw = self.raw()
            mark = highest(raw.command(b"s", b"SELECT INBOX (CONDSTORE)"))
            cur = self.server.store.path_for(ALICE) / "cur"
            (path,) = list(cur.iterdir())
            os.rename(path, cur / (path.name.partition(":")[0] + ":2,FS"))
            seen = []
            for _ in range(40):  # the rescan trusts directory times a second old
                seen = untagged(raw.command(b"n", b"NOOP"))
                if seen:
                    break
                time.sleep(0.1)
            self.assertEqual(len(seen), 1, seen)
            changed = modseqs(seen)
            self.assertGreater(changed[1], mark)
            reply = raw.command(b"f", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % mark)
            self.assertEqual(modseqs(reply), changed)
        return self.in_thread(check)
