"""mailtwist.testing, used the way a plugin author's own test suite would."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.filters import Filter, FilterFactory, header_values
from mailtwist.interfaces import AddHeader, Continue, Quarantine, Reject
from mailtwist.testing import FilterTestServer, parse_session, run_message, run_session


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


# What swaks 20201014 printed for one delivery to a mailtwist server (its bare
# " ->" lines, trailing space trimmed, are the blank lines of the message).
SWAKS_RECORDING = """\
=== Trying 127.0.0.1:45475...
=== Connected to 127.0.0.1.
<-  220 localhost ESMTP mailtwist
 -> EHLO client.remote.example
<-  250-localhost
<-  250-PIPELINING
<-  250-SIZE 26214400
<-  250-STARTTLS
<-  250-ENHANCEDSTATUSCODES
<-  250-8BITMIME
<-  250 SMTPUTF8
 -> MAIL FROM:<carol@remote.example>
<-  250 2.1.0 Ok
 -> RCPT TO:<alice@example.test>
<-  250 2.1.5 Ok
 -> DATA
<-  354 End data with <CR><LF>.<CR><LF>
 -> Date: Sun, 29 Nov 2026 13:00:42 +0000
 -> To: alice@example.test
 -> From: carol@remote.example
 -> Subject: recorded
 -> Message-Id: <20261129130042.019332@vm>
 -> X-Mailer: swaks v20201014.0 jetmore.org/john/code/swaks/
 ->
 -> hello from swaks
 ->
 ->
 -> .
<-  250 2.0.0 Ok: queued as 4DB4A9B7FBC9
 -> QUIT
<-  221 2.0.0 Bye
=== Connection closed with remote host.
"""

# An RFC-style pipelined recording: three commands, then their three replies.
PIPELINED_RECORDING = """\
S: 220 mx.example.net ESMTP
C: EHLO client.example.net
S: 250-mx.example.net
S: 250 PIPELINING
C: MAIL FROM:<news@list.example.net>
C: RCPT TO:<bob@example.test>
C: DATA
S: 250 2.1.0 Ok
S: 250 2.1.5 Ok
S: 354 go ahead
C: Subject: weekly news
C:
C: ..a line that starts with a dot
C: .
S: 250 2.0.0 Ok
C: QUIT
S: 221 2.0.0 Bye
"""


class SenderBlock(Filter):
    """Refuse one sender at MAIL FROM."""

    name = "sender_block"

    def mail_from(self, session, sender):
        if sender == "carol@remote.example":
            return Reject("carol is blocked", 550, "5.7.1")
        return Continue()


class RecordedSessionTests(unittest.TestCase):
    """mailtwist.testing replays a recorded SMTP session through the real server."""

    @defer.inlineCallbacks
    def test_swaks_recording_replays_and_shows_where_it_differs(self):
        """A swaks transcript runs command by command; a filter's refusal shows as a
        mismatch with the recording, and the DATA content is not sent after a 503."""
        result = yield run_session(self, [SenderBlock()], SWAKS_RECORDING)
        self.assertEqual([e.command.split(":")[0] for e in result.exchanges],
                         ["", "EHLO client.remote.example", "MAIL FROM", "RCPT TO", "DATA",
                          "<message>", "QUIT"])
        mail = result.reply_to("mail from")
        self.assertEqual((mail.code, mail.enhanced, mail.text, mail.recorded),
                         (550, "5.7.1", "carol is blocked", 250))
        self.assertEqual(result.reply_to("<message>").code, None)
        self.assertEqual(result.codes[-1], 221)
        self.assertEqual([e.command for e in result.mismatches][:4],
                         ["MAIL FROM:<carol@remote.example>", "RCPT TO:<alice@example.test>",
                          "DATA", "<message>"])
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_swaks_recording_delivers_unchanged_without_filters(self):
        """The same recording without the filter matches every recorded reply and
        stores the recorded message, blank lines and all."""
        result = yield run_session(self, [], SWAKS_RECORDING)
        self.assertEqual(result.mismatches, [])
        [stored] = result.stored["alice@example.test"]
        self.assertIn(b"Subject: recorded\n", stored.content)
        self.assertTrue(stored.content.endswith(b"\n\nhello from swaks\n\n\n"),
                        stored.content)

    @defer.inlineCallbacks
    def test_pipelined_recording_on_a_started_server(self):
        """Replies recorded after a pipelined group pair with their commands in order;
        the DATA content goes out as recorded (dot-stuffed) and a data filter sees it."""
        server = yield FilterTestServer(self, [SubjectTagger("casino")]).start()
        result = yield server.replay(PIPELINED_RECORDING)
        self.assertEqual(result.codes, [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual([e.recorded for e in result.exchanges],
                         [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual(result.mismatches, [])
        [stored] = result.stored["bob@example.test"]
        self.assertEqual(header_values(stored.content, "X-Tagged-By"), ["subject_tagger"])
        self.assertIn(b"\n.a line that starts with a dot\n", stored.content)


class ParseSessionTests(unittest.SynchronousTestCase):
    """A recording that cannot be replayed is refused with the line at fault."""

    def test_errors_name_the_line(self):
        for text, error in [
            ("S: 220 hi\nhello there\n", "line 2: neither a client nor a server line"),
            ("S: 220 hi\nC: STARTTLS\n", "line 2: STARTTLS cannot be replayed"),
            ("<-  220 hi\n ~> EHLO x\n", "line 2: TLS lines cannot be replayed"),
            ("S: 220 hi\nS: twenty\n", "line 2: not an SMTP reply"),
            ("C: DATA\nC: Subject: x\n", "no final '.' line"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_session(text)
            self.assertIn(error, str(caught.exception))
