"""The outbound filter stage: asked before mail is spooled for remote recipients
(at the end of DATA on a real submission session), and in the queue runner for
mail queued without a client (notices)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

from mailtwist.filters import Filter, FilterFactory, header_values
from mailtwist.filters.chain import FilterChain, FilterError
from mailtwist.interfaces import (
    AddHeader,
    Continue,
    Discard,
    FileInto,
    IFilter,
    Quarantine,
    Reject,
    RemoveHeader,
    TempFail,
)
from mailtwist.queue.envelope import DELIVERED, FAILED, PENDING
from mailtwist.testing import DOMAIN, FilterTestServer
from tests.support import capture_chain_log, logged_text

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = "carol@remote.example"
DAVE = "dave@elsewhere.example"
MESSAGE = b"From: alice@example.test\r\nSubject: hello\r\nX-Internal: secret\r\n\r\nbody\r\n"


class Outbound(Filter):
    """Records its calls and answers *verdict* at the outbound stage."""

    name = "outbound_recorder"

    def __init__(self, verdict=None) -> None:
        self.verdict = verdict if verdict is not None else Continue()
        self.calls: list[tuple] = []

    def outbound(self, session, message, recipients):
        self.calls.append((session.role, session.user, session.sender,
                           list(session.recipients), session.queue_id, message,
                           list(recipients)))
        return self.verdict


class Raising(Filter):
    name = "exploding_outbound"

    def outbound(self, session, message, recipients):
        raise ZeroDivisionError("boom")


class Hanging(Filter):
    name = "hanging_outbound"

    def outbound(self, session, message, recipients):
        return defer.Deferred()


@implementer(IFilter)
class OldStyle:
    """A filter written against the interface before the outbound stage and
    mailbox events existed: no ``outbound`` or ``mailbox_event`` methods."""

    name = "old_style"

    def connect(self, session):
        return Continue()

    def helo(self, session, name):
        return Continue()

    def auth(self, session, username, success):
        return Continue()

    def mail_from(self, session, sender):
        return Continue()

    def rcpt_to(self, session, recipient):
        return Continue()

    def data(self, session, message):
        return Continue(AddHeader("X-Old-Style", "seen"))

    def delivery(self, session, message, target):
        return Continue()


class SubmissionOutboundTests(unittest.TestCase):
    """The stage at the end of DATA on submission: its replies reach the client."""

    @defer.inlineCallbacks
    def submit(self, outbound, recipients=(CAROL,), timeout=30.0, filters=()):
        self.server = yield FilterTestServer(self, filters, role="submission",
                                             outbound=outbound, timeout=timeout).start()
        result = yield self.server.send(MESSAGE, sender=ALICE, recipients=recipients,
                                        login=ALICE)
        return result

    @defer.inlineCallbacks
    def test_called_with_session_message_and_remote_recipients(self):
        """outbound(session, message, recipients) gets only the remote recipients."""
        flt = Outbound()
        result = yield self.submit([flt], recipients=(ALICE, CAROL, DAVE))
        self.assertTrue(result.accepted)
        [(role, user, sender, rcpts, queue_id, message, remote)] = flt.calls
        self.assertEqual((role, user, sender), ("submission", ALICE, ALICE))
        self.assertEqual(rcpts, [ALICE, CAROL, DAVE])
        self.assertEqual(remote, [CAROL, DAVE])
        self.assertTrue(message.startswith(b"Received: "))
        self.assertIn(b"X-Internal: secret", message)
        [queued] = result.queued
        self.assertEqual(queued.recipients, (CAROL, DAVE))
        self.assertIn(f"id {queue_id}".encode(), queued.content)

    @defer.inlineCallbacks
    def test_alias_forwarding_on_port_25(self):
        """Inbound mail an alias forwards to a remote address passes the stage too."""
        flt = Outbound(Reject("no forwarding today", 550, "5.7.1"))
        self.server = yield FilterTestServer(self, [], role="smtp", outbound=[flt]).start()
        self.server.server.directory.add_alias(f"fwd@{DOMAIN}", [CAROL])
        result = yield self.server.send(MESSAGE, recipients=[f"fwd@{DOMAIN}"])
        self.assertEqual((result.code, result.text), (550, "no forwarding today"))
        [(role, user, *_rest, remote)] = flt.calls
        self.assertEqual((role, user, remote), ("smtp", None, [CAROL]))
        self.assertEqual(result.queued, [])

    @defer.inlineCallbacks
    def test_not_called_for_local_only_mail(self):
        """Mail with only local recipients never passes the outbound stage."""
        flt = Outbound(Reject("no"))
        result = yield self.submit([flt], recipients=(BOB,))
        self.assertTrue(result.accepted)
        self.assertEqual(flt.calls, [])
        self.assertEqual(len(result.stored[BOB]), 1)

    @defer.inlineCallbacks
    def test_header_actions_edit_only_the_outbound_copy(self):
        """Header edits reach the spooled copy; the local copy stays as received."""
        flt = Outbound(Continue(RemoveHeader("X-Internal"), AddHeader("X-Outbound", "yes")))
        result = yield self.submit([flt], recipients=(BOB, CAROL))
        self.assertTrue(result.accepted)
        [queued] = result.queued
        self.assertEqual(header_values(queued.content, "X-Outbound"), ["yes"])
        self.assertEqual(header_values(queued.content, "X-Internal"), [])
        [local] = result.stored[BOB]
        self.assertEqual(header_values(local.content, "X-Internal"), ["secret"])
        self.assertEqual(header_values(local.content, "X-Outbound"), [])

    @defer.inlineCallbacks
    def test_edits_are_made_before_dkim_signing(self):
        """The DKIM signature is added after the outbound edits (it sits above them)."""
        from mailtwist.dkim import generate_key

        self.server = yield FilterTestServer(
            self, [], role="submission",
            outbound=[Outbound(Continue(AddHeader("X-Outbound", "yes")))]).start()
        generate_key(self.server.data_dir / "dkim", DOMAIN, "t1", "ed25519")
        result = yield self.server.send(MESSAGE, sender=ALICE, recipients=[CAROL],
                                        login=ALICE)
        [queued] = result.queued
        self.assertTrue(queued.content.startswith(b"DKIM-Signature: "), queued.content[:80])
        names = [line.split(b":")[0] for line in queued.content.split(b"\r\n")
                 if line[:1] not in (b" ", b"\t")]
        self.assertEqual(names.index(b"X-Outbound"), names.index(b"DKIM-Signature") + 1)

    @defer.inlineCallbacks
    def test_later_filter_sees_earlier_edits(self):
        """Outbound filters run in order on the edited copy."""
        first = Outbound(Continue(AddHeader("X-First", "1")))
        second = Outbound()
        yield self.submit([first, second])
        [call] = second.calls
        self.assertEqual(header_values(call[5], "X-First"), ["1"])

    @defer.inlineCallbacks
    def test_reject_is_the_data_reply_and_nothing_is_stored(self):
        """Reject answers the client at the end of DATA, as given; no copy anywhere."""
        result = yield self.submit([Outbound(Reject("outbound spam", 554, "5.7.1"))],
                                   recipients=(BOB, CAROL))
        self.assertEqual((result.stage, result.code, result.enhanced, result.text),
                         ("data", 554, "5.7.1", "outbound spam"))
        self.assertEqual(result.queued, [])
        self.assertEqual(result.stored[BOB], [])

    @defer.inlineCallbacks
    def test_tempfail_stays_as_given(self):
        """TempFail answers the client with its own 4xx."""
        result = yield self.submit([Outbound(TempFail("rate limited", 450, "4.7.0"))])
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 450, "4.7.0"))
        self.assertEqual(result.queued, [])

    @defer.inlineCallbacks
    def test_crash_is_451_and_nothing_is_sent(self):
        """A raising outbound filter: 451 4.7.1, nothing spooled or stored, its name logged."""
        events = capture_chain_log(self)
        result = yield self.submit([Raising()], recipients=(BOB, CAROL))
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.queued, [])
        self.assertEqual(result.stored[BOB], [])
        self.assertIn("exploding_outbound", logged_text(events))
        self.assertIn("outbound stage", logged_text(events))
        self.flushLoggedErrors(ZeroDivisionError)

    @defer.inlineCallbacks
    def test_timeout_is_451_and_nothing_is_sent(self):
        """A hanging outbound filter times out: 451 4.7.1, nothing spooled."""
        events = capture_chain_log(self)
        result = yield self.submit([Hanging()], timeout=0.05)
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.queued, [])
        self.assertIn("hanging_outbound", logged_text(events))

    @defer.inlineCallbacks
    def test_discard_drops_remote_copies_only(self):
        """Discard: 250, local copies delivered, nothing leaves."""
        result = yield self.submit([Outbound(Discard())], recipients=(BOB, CAROL))
        self.assertTrue(result.accepted)
        self.assertEqual(result.queued, [])
        self.assertEqual(len(result.stored[BOB]), 1)

    @defer.inlineCallbacks
    def test_message_actions_other_than_headers_are_filter_errors(self):
        """FileInto or Quarantine make no sense for mail leaving: a 451 filter error."""
        for verdict in (Continue(FileInto("Junk")), Quarantine("why")):
            result = yield self.submit([Outbound(verdict)])
            self.assertEqual((result.code, result.enhanced), (451, "4.7.1"))
            self.assertEqual(result.queued, [])
            yield self.server.server.stopService()
        self.assertEqual(len(self.flushLoggedErrors(FilterError)), 2)

    @defer.inlineCallbacks
    def test_old_style_filter_without_the_method_is_continue(self):
        """A filter written before the outbound stage still works there and elsewhere."""
        result = yield self.submit([OldStyle()], recipients=(BOB, CAROL),
                                   filters=[OldStyle()])
        self.assertTrue(result.accepted)
        [queued] = result.queued
        self.assertEqual(header_values(queued.content, "X-Old-Style"), ["seen"])

    @defer.inlineCallbacks
    def test_enabled_from_config(self):
        """[filters] outbound = [...] enables a dotted-path filter for the stage."""
        self.server = yield FilterTestServer(
            self, None, role="submission",
            config={"filters": {"outbound": [f"{__name__}.reject_all_factory"]}}).start()
        result = yield self.server.send(MESSAGE, sender=ALICE, recipients=[CAROL],
                                        login=ALICE)
        self.assertEqual((result.code, result.text), (550, "no mail leaves"))


reject_all_factory = FilterFactory("reject_all", lambda s: Outbound(Reject("no mail leaves")))


class QueueOutboundTests(unittest.TestCase):
    """Mail queued without a client (a notice) passes the stage in the queue runner."""

    @defer.inlineCallbacks
    def queued_notice(self, flt):
        self.server = yield FilterTestServer(self, [], outbound=[flt],
                                             config={"dkim": {"sign": False}}).start()
        service = self.server.server
        envelope = yield service.dispatcher.send_notice(
            b"From: MAILER-DAEMON\r\nSubject: notice\r\n\r\nhi\r\n", CAROL)
        spool = service.queue.spool
        self.assertEqual(spool.load(envelope.id).extra.get("outbound_filters"), "pending")
        message = spool.read_message(envelope.id)
        outgoing = yield defer.Deferred.fromCoroutine(service.queue._outbound_stage(
            envelope, envelope.pending(), message, 1000.0))
        return envelope, outgoing

    @defer.inlineCallbacks
    def test_continue_applies_header_edits(self):
        """Continue: the copy sent carries the filter's header edits."""
        flt = Outbound(Continue(AddHeader("X-Queue", "checked")))
        envelope, outgoing = yield self.queued_notice(flt)
        self.assertEqual(header_values(outgoing, "X-Queue"), ["checked"])
        [(role, _user, sender, _rcpts, queue_id, _message, remote)] = flt.calls
        self.assertEqual((role, sender, remote, queue_id), ("queue", "", [CAROL], envelope.id))

    @defer.inlineCallbacks
    def test_reject_fails_the_recipients(self):
        """Reject: the recipients fail with the filter's reply (a bounce), nothing sent."""
        envelope, outgoing = yield self.queued_notice(Outbound(Reject("nope", 550, "5.7.1")))
        self.assertIsNone(outgoing)
        [r] = envelope.recipients
        self.assertEqual((r.status, r.code, r.enhanced), (FAILED, 550, "5.7.1"))

    @defer.inlineCallbacks
    def test_tempfail_defers(self):
        """TempFail: the recipients stay pending with the filter's reply, nothing sent."""
        envelope, outgoing = yield self.queued_notice(Outbound(TempFail("later")))
        self.assertIsNone(outgoing)
        [r] = envelope.recipients
        self.assertEqual((r.status, r.code, r.enhanced), (PENDING, 451, "4.7.1"))

    @defer.inlineCallbacks
    def test_crash_defers(self):
        """A crashing filter in the queue: deferred (4xx), never sent."""
        capture_chain_log(self)
        envelope, outgoing = yield self.queued_notice(Raising())
        self.assertIsNone(outgoing)
        self.assertEqual(envelope.recipients[0].status, PENDING)
        self.assertEqual(envelope.recipients[0].code, 451)
        self.flushLoggedErrors(ZeroDivisionError)

    @defer.inlineCallbacks
    def test_discard_drops_silently(self):
        """Discard: the recipients are done and reported (no notice about a notice)."""
        envelope, outgoing = yield self.queued_notice(Outbound(Discard()))
        self.assertIsNone(outgoing)
        [r] = envelope.recipients
        self.assertEqual((r.status, r.reported), (DELIVERED, True))


class ChainTests(unittest.TestCase):
    def test_outbound_timeout_on_the_clock(self):
        """The outbound hook has the chain's timeout, counted on the injected clock."""
        clock = task.Clock()
        chain = FilterChain([Hanging()], timeout=5, clock=clock)
        capture_chain_log(self)
        results = []
        chain.run("outbound", None, MESSAGE, [CAROL]).addCallback(results.append)
        clock.advance(4.9)
        self.assertEqual(results, [])
        clock.advance(0.2)
        [result] = results
        self.assertEqual((result.verdict.code, result.filter), (451, "hanging_outbound"))
