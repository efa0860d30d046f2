"""mailtwist.testing, used the way a plugin author's own test suite would."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.filters import Filter, FilterFactory, header_values
from mailtwist.interfaces import AddHeader, Continue, Quarantine, Reject
from mailtwist.testing import FilterTestServer, run_message


class SubjectTagger(Filter):
    """A plugin author's filter: refuse one word, tag the rest."""

    name = "subject_tagger"

    def __init__(self, banned: str) -> None:
        self.banned = banned.encode()

    def data(self, session, message):
        if self.banned in message:
            return Reject(f"{self.banned.decode()} not welcome here", 550, "5.7.1")
        return Continue(AddHeader("X-Tagged-By", self.name))


subject_tagger = FilterFactory("subject_tagger", lambda s: SubjectTagger(s["banned"]),
                               defaults={"banned": "lottery"})


class PluginAuthorTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_rejected_message(self):
        result = yield run_message(self, [subject_tagger],
                                   b"Subject: you won the lottery\r\n\r\nclaim now\r\n")
        self.assertEqual((result.stage, result.code, result.enhanced),
                         ("data", 550, "5.7.1"))
        self.assertEqual(result.text, "lottery not welcome here")
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_tagged_message(self):
        result = yield run_message(self, [SubjectTagger("casino")],
                                   b"Subject: lunch?\r\n\r\nat noon\r\n")
        self.assertTrue(result.accepted)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(header_values(stored.content, "X-Tagged-By"), ["subject_tagger"])

    @defer.inlineCallbacks
    def test_several_messages_on_one_server(self):
        server = yield FilterTestServer(self, [SubjectTagger("casino")]).start()
        first = yield server.send(b"Subject: casino\r\n\r\nx\r\n")
        second = yield server.send(b"Subject: ok\r\n\r\nx\r\n",
                                   recipients=["bob@example.test"])
        self.assertEqual((first.code, second.code), (550, 250))
        self.assertEqual(len(second.stored["bob@example.test"]), 1)


class OutboundTagger(Filter):
    """A plugin author's outbound filter: tag what leaves."""

    name = "outbound_tagger"

    def outbound(self, session, message, recipients):
        return Continue(AddHeader("X-Left-Via", "mailtwist"))


class PillGuard(Filter):
    """A plugin author's quarantine filter."""

    name = "pill_guard"

    def data(self, session, message):
        return Quarantine("pills") if b"pills" in message else Continue()


class NewStageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_outbound_filter_and_queued_copy(self):
        """outbound=[...] on submission: result.queued shows the edited outgoing copy."""
        server = yield FilterTestServer(self, [], role="submission",
                                        outbound=[OutboundTagger()]).start()
        result = yield server.send(b"Subject: hi\r\n\r\nx\r\n", sender="alice@example.test",
                                   recipients=["carol@remote.example"],
                                   login="alice@example.test")
        self.assertTrue(result.accepted)
        [queued] = result.queued
        self.assertEqual(queued.recipients, ("carol@remote.example",))
        self.assertEqual(header_values(queued.content, "X-Left-Via"), ["mailtwist"])

    @defer.inlineCallbacks
    def test_quarantined_message(self):
        """run_message reports a quarantined message in result.quarantined."""
        result = yield run_message(self, [PillGuard()], b"Subject: pills\r\n\r\nx\r\n")
        self.assertTrue(result.accepted)
        self.assertEqual(result.stored["alice@example.test"], [])
        [held] = result.quarantined
        self.assertEqual((held.reason, held.entry.recipients),
                         ("pills", ["alice@example.test"]))

    @defer.inlineCallbacks
    def test_mailbox_events_after_move(self):
        """mailbox=[...] plus server.move(): the filter is told, and mailbox_events lists it."""
        told = []

        class Recorder(Filter):
            name = "recorder"

            def mailbox_event(self, event):
                told.append(event)
                return Continue()

        server = yield FilterTestServer(self, [], mailbox=[Recorder()]).start()
        yield server.send(b"Subject: spam\r\n\r\nx\r\n")
        yield server.move("alice", "INBOX", "Junk")
        self.assertEqual([(e.kind, e.source, e.destination) for e in told],
                         [("move", "INBOX", "Junk")])
        self.assertEqual(server.mailbox_events, told)
