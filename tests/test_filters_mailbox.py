"""Mailbox events: the [filters] mailbox chain is told after real IMAP COPY, MOVE
and APPEND (imaplib against the real server); notifications never fail the
IMAP command."""

from __future__ import annotations

import imaplib

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailtwist.filters import Filter, FilterFactory
from mailtwist.filters.chain import FilterChain
from mailtwist.interfaces import IFilter, MailboxEvent, Reject
from mailtwist.testing import DOMAIN, PASSWORD, FilterTestServer
from tests.support import capture_chain_log, logged_text

ALICE = f"alice@{DOMAIN}"
SPAM = b"From: spammer@example.test\r\nSubject: win big\r\n\r\nclick here\r\n"
HAM = b"From: friend@example.test\r\nSubject: lunch\r\n\r\nnoon?\r\n"


class Learner(Filter):
    """A spam filter that learns from what users move into Junk."""

    name = "learner"

    def __init__(self) -> None:
        self.events: list[MailboxEvent] = []
        self.learned: list[bytes] = []

    @defer.inlineCallbacks
    def mailbox_event(self, event):
        self.events.append(event)
        if event.destination == "Junk":
            messages = yield event.read_messages()
            self.learned += [content for _, content in messages]
        return Reject("verdicts are ignored here")


class Raising(Filter):
    name = "exploding_learner"

    def mailbox_event(self, event):
        raise ZeroDivisionError("boom")


class Hanging(Filter):
    name = "hanging_learner"

    def mailbox_event(self, event):
        return defer.Deferred()


@implementer(IFilter)
class NoMailboxMethod:
    """An older filter object (written before mailbox events): no mailbox_event."""

    name = "older"


learner_factory = FilterFactory("learner", lambda settings: Learner())


class MailboxEventTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, mailbox, messages=(SPAM, HAM), **kwargs):
        self.server = yield FilterTestServer(self, [], mailbox=mailbox, **kwargs).start()
        for message in messages:
            result = yield self.server.send(message)
            self.assertTrue(result.accepted)
        return self.server

    @defer.inlineCallbacks
    def test_move_into_junk(self):
        """A real UID MOVE into Junk: one "move" event with folders, UIDs and readable copies."""
        learner = Learner()
        server = yield self.start([learner])
        reply = yield server.move("alice", "INBOX", "Junk", uids="1")
        self.assertIn("MOVE completed", reply)
        [event] = learner.events
        self.assertEqual((event.user, event.kind, event.source, event.destination),
                         (ALICE, "move", "INBOX", "Junk"))
        self.assertEqual(event.source_uids, (1,))
        self.assertEqual(len(event.uids), 1)
        [learned] = learner.learned
        self.assertIn(b"Subject: win big\r\n", learned)
        self.assertEqual(server.mailbox_events, [event])
        stored = yield deferToThread(server.stored, ALICE)
        self.assertEqual(sorted(m.folder for m in stored), ["INBOX", "Junk"])

    @defer.inlineCallbacks
    def test_copy(self):
        """UID COPY of two messages: a "copy" event with both UID pairs in order."""
        learner = Learner()
        server = yield self.start([learner])
        yield server.copy("alice", "INBOX", "Archive", uids="1:2")
        [event] = learner.events
        self.assertEqual((event.kind, event.source, event.destination),
                         ("copy", "INBOX", "Archive"))
        self.assertEqual(event.source_uids, (1, 2))
        messages = yield event.read_messages()
        self.assertEqual([uid for uid, _ in messages], list(event.uids))
        self.assertIn(b"lunch", messages[1][1])

    @defer.inlineCallbacks
    def test_append(self):
        """APPEND by imaplib: an "append" event without a source folder."""
        learner = Learner()
        server = yield self.start([learner], messages=())

        def append():
            client = imaplib.IMAP4("127.0.0.1", server.server.port_of("imap"))
            try:
                client.login(ALICE, PASSWORD)
                return client.append("Junk", None, None, SPAM)[0]
            finally:
                client.logout()

        status = yield deferToThread(append)
        self.assertEqual(status, "OK")
        yield defer.DeferredList(server.mailbox_chain.running)
        [event] = learner.events
        self.assertEqual((event.kind, event.source, event.destination, event.source_uids),
                         ("append", None, "Junk", ()))
        self.assertEqual(learner.learned, [SPAM])

    @defer.inlineCallbacks
    def test_crash_is_logged_and_the_command_succeeds(self):
        """A raising filter: MOVE still succeeds, its name is logged, later filters are told."""
        events = capture_chain_log(self)
        learner = Learner()
        server = yield self.start([Raising(), learner])
        reply = yield server.move("alice", "INBOX", "Junk", uids="1")
        self.assertIn("MOVE completed", reply)
        self.assertEqual(len(learner.events), 1)
        self.assertIn("exploding_learner", logged_text(events))
        self.flushLoggedErrors(ZeroDivisionError)

    @defer.inlineCallbacks
    def test_timeout_is_logged_and_the_command_succeeds(self):
        """A hanging filter times out: MOVE completed anyway, the timeout logged by name."""
        events = capture_chain_log(self)
        server = yield self.start([Hanging()], timeout=0.05)
        reply = yield server.move("alice", "INBOX", "Junk", uids="1")
        self.assertIn("MOVE completed", reply)
        self.assertIn("hanging_learner timed out", logged_text(events))

    @defer.inlineCallbacks
    def test_old_filter_without_the_method(self):
        """A filter object lacking mailbox_event is skipped (Continue), nothing logged."""
        events = capture_chain_log(self)
        server = yield self.start([NoMailboxMethod()], messages=(SPAM,))
        reply = yield server.move("alice", "INBOX", "Junk")
        self.assertIn("MOVE completed", reply)
        self.assertEqual(logged_text(events), "")
        self.assertEqual(len(server.mailbox_events), 1)

    @defer.inlineCallbacks
    def test_enabled_from_config(self):
        """[filters] mailbox = [...] builds the chain the IMAP server tells."""
        self.server = yield FilterTestServer(
            self, None, config={"filters": {"mailbox": [f"{__name__}.learner_factory"]}}
        ).start()
        yield self.server.send(SPAM)
        yield self.server.move("alice", "INBOX", "Junk")
        [learner] = self.server.mailbox_chain.filters
        self.assertEqual([e.kind for e in learner.events], ["move"])


class ChainNotifyTests(unittest.TestCase):
    def test_timeout_on_the_clock(self):
        """notify gives each filter the chain timeout on the injected clock, then goes on."""
        events = capture_chain_log(self)
        clock = task.Clock()
        learner = Learner()
        chain = FilterChain([Hanging(), learner], timeout=5, clock=clock)
        event = MailboxEvent(ALICE, "move", "INBOX", "Junk", (1,), (7,))
        done = []
        chain.notify(event).addCallback(done.append)
        clock.advance(4.9)
        self.assertEqual((done, learner.events), ([], []))
        clock.advance(0.2)
        self.assertEqual((done, learner.events), ([None], [event]))
        self.assertIn("hanging_learner", logged_text(events))

    def test_filter_base_class_has_the_new_methods(self):
        """Filter subclasses get no-op outbound and mailbox_event; IFilter is still met."""
        verifyObject(IFilter, Filter())
        self.assertIsNotNone(Filter().mailbox_event(None))

    def test_event_without_reader(self):
        """An event built by hand (a unit test) reads as no messages."""
        event = MailboxEvent(ALICE, "copy", "INBOX", "Junk")
        self.assertEqual(self.successResultOf(event.read_messages()), [])
