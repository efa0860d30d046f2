"""The filter plugin API: verdicts at every SMTP stage, the chain's timeouts and
failures, header edits, delivery choices, configuration and discovery."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import mailtwist.plugins
from mailtwist.config import ConfigError, load_config
from mailtwist.filters import Filter, FilterFactory, apply_header_actions, header_values
from mailtwist.filters.builtin import HeaderFolderFilter, header_folder
from mailtwist.filters.chain import FilterChain
from mailtwist.filters.loader import (build_chains, format_listing, installed_factories,
                                     list_filters)
from mailtwist.interfaces import (
    Accept,
    AddFlags,
    AddHeader,
    ChangeHeader,
    Continue,
    Discard,
    FileInto,
    FilterSession,
    IFilter,
    IFilterFactory,
    Redirect,
    Reject,
    RemoveHeader,
    TempFail,
)
from mailtwist.testing import DOMAIN, FilterTestServer
from tests.support import capture_chain_log, logged_text

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
MESSAGE = (b"From: sender@example.test\r\nSubject: hello\r\nX-Old: 1\r\n"
           b"X-Old: 2\r\n\r\nbody\r\n")


class StageFilter(Filter):
    """Answers *verdict* at *stage* and Continue elsewhere."""

    def __init__(self, stage: str, verdict, name: str = "stage_filter") -> None:
        self.stage = stage
        self.verdict = verdict
        self.name = name

    def _at(self, stage: str):
        return self.verdict if stage == self.stage else Continue()

    def connect(self, session):
        return self._at("connect")

    def helo(self, session, name):
        return self._at("helo")

    def auth(self, session, username, success):
        return self._at("auth")

    def mail_from(self, session, sender):
        return self._at("mail")

    def rcpt_to(self, session, recipient):
        return self._at("rcpt")

    def data(self, session, message):
        return self._at("data")

    def delivery(self, session, message, target):
        return self._at("delivery")


class Raising(Filter):
    name = "exploding_filter"

    def data(self, session, message):
        raise ZeroDivisionError("boom")


class Hanging(Filter):
    name = "hanging_filter"

    def rcpt_to(self, session, recipient):
        return defer.Deferred()


class InterfaceTests(unittest.SynchronousTestCase):
    def test_base_filter_provides_ifilter(self):
        verifyObject(IFilter, Filter())

    def test_builtin_factory_and_filter(self):
        verifyObject(IFilterFactory, header_folder)
        verifyObject(IFilter, header_folder.build({}))

    def test_reply_codes_must_match_the_verdict(self):
        self.assertRaises(ValueError, Reject, "x", 451, "4.7.1")
        self.assertRaises(ValueError, TempFail, "x", 550, "5.7.1")
        self.assertRaises(ValueError, Reject, "x", 550, "4.7.1")
        self.assertRaises(ValueError, Reject, "two\r\nlines")
        self.assertEqual(Reject().code, 550)
        self.assertEqual(TempFail().code, 451)

    def test_actions_validate(self):
        self.assertRaises(ValueError, AddHeader, "Bad Name", "v")
        self.assertRaises(ValueError, AddHeader, "X-A", "v\r\nInjected: yes")
        self.assertRaises(ValueError, FileInto, "../escape")
        self.assertRaises(ValueError, AddFlags, ("\\Recent",))
        self.assertRaises(ValueError, Redirect, ())
        self.assertEqual(AddFlags(("\\Seen", "\\Flagged")).letters, "FS")

    def test_session_state_is_per_filter(self):
        session = FilterSession(role="smtp", peer_host="192.0.2.1")
        session.state_for("a")["n"] = 1
        self.assertEqual(session.state_for("b"), {})
        self.assertEqual(session.state_for("a"), {"n": 1})


class HeaderTests(unittest.SynchronousTestCase):
    def test_values_unfold(self):
        message = b"Subject: a\r\n b\r\nX: 1\r\n\r\nSubject: body\r\n"
        self.assertEqual(header_values(message, "subject"), ["a b"])

    def test_edits(self):
        edited = apply_header_actions(MESSAGE, [
            AddHeader("X-Filter", "yes"), ChangeHeader("Subject", "[tag] hello"),
            RemoveHeader("x-old"), ChangeHeader("X-New", "added")])
        head, _, body = edited.partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n"), [
            b"X-Filter: yes", b"From: sender@example.test", b"Subject: [tag] hello",
            b"X-New: added"])
        self.assertEqual(body, b"body\r\n")

    def test_body_is_never_touched(self):
        message = b"A: 1\r\n\r\nX-Old: in the body\r\n"
        self.assertEqual(apply_header_actions(message, [RemoveHeader("X-Old")]), message)


class ChainTests(unittest.TestCase):
    def session(self) -> FilterSession:
        return FilterSession(role="smtp", peer_host="192.0.2.1")

    def test_hanging_filter_times_out_as_tempfail(self):
        events = capture_chain_log(self)
        clock = task.Clock()
        chain = FilterChain([Hanging()], timeout=5, clock=clock)
        d = chain.run("rcpt", self.session(), ALICE)
        self.assertNoResult(d)
        clock.advance(5)
        result = self.successResultOf(d)
        self.assertEqual((result.verdict.code, result.verdict.enhanced), (451, "4.7.1"))
        self.assertIn("hanging_filter", logged_text(events))
        self.assertIn("timed out", logged_text(events))

    def test_raising_filter_is_a_tempfail_naming_it(self):
        events = capture_chain_log(self)
        chain = FilterChain([Raising()], clock=task.Clock())
        result = self.successResultOf(chain.run("data", self.session(), MESSAGE))
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("exploding_filter", logged_text(events))
        self.assertIn("ZeroDivisionError", logged_text(events))

    def test_not_a_verdict_is_a_tempfail(self):
        capture_chain_log(self)
        chain = FilterChain([StageFilter("mail", None)], clock=task.Clock())
        result = self.successResultOf(chain.run("mail", self.session(), ALICE))
        self.assertIsInstance(result.verdict, TempFail)

    def test_action_at_the_wrong_stage_is_a_tempfail(self):
        capture_chain_log(self)
        chain = FilterChain([StageFilter("rcpt", Continue(AddHeader("X", "y")))],
                            clock=task.Clock())
        result = self.successResultOf(chain.run("rcpt", self.session(), ALICE))
        self.assertIsInstance(result.verdict, TempFail)

    def test_accept_skips_later_filters_and_edits_chain(self):
        chain = FilterChain([
            StageFilter("data", Continue(AddHeader("X-First", "1"))),
            StageFilter("data", Accept(FileInto("Junk"))),
            StageFilter("data", Reject()),
        ], clock=task.Clock())
        result = self.successResultOf(chain.run("data", self.session(), MESSAGE))
        self.assertIsInstance(result.verdict, Accept)
        self.assertTrue(result.message.startswith(b"X-First: 1\r\n"))
        self.assertEqual(result.actions, [FileInto("Junk")])

    def test_later_filter_sees_earlier_edits(self):
        seen = []

        class Reader(Filter):
            def data(self, session, message):
                seen.append(header_values(message, "X-First"))
                return Continue()

        chain = FilterChain([StageFilter("data", Continue(AddHeader("X-First", "1"))),
                             Reader()], clock=task.Clock())
        self.successResultOf(chain.run("data", self.session(), MESSAGE))
        self.assertEqual(seen, [["1"]])


class StageReplyTests(unittest.TestCase):
    """Every refusing verdict reaches the client as asked, at its own stage."""

    @defer.inlineCallbacks
    def send(self, flt, role="smtp", login=None, recipients=(ALICE,), message=MESSAGE,
             **kwargs):
        self.server = yield FilterTestServer(self, [flt], role=role, **kwargs).start()
        sender = login or "sender@example.test"
        result = yield self.server.send(message, sender=sender, recipients=recipients,
                                        login=login)
        return result

    @defer.inlineCallbacks
    def check(self, stage, verdict, expected_stage=None, **kwargs):
        result = yield self.send(StageFilter(stage, verdict), **kwargs)
        self.assertEqual((result.stage, result.code, result.enhanced, result.text),
                         (expected_stage or stage, verdict.code, verdict.enhanced,
                          verdict.text))
        self.assertEqual(result.stored[ALICE], [])
        return result

    def test_connect_reject(self):
        return self.check("connect", Reject("go away", 554, "5.7.1"))

    def test_connect_tempfail(self):
        return self.check("connect", TempFail("busy", 421, "4.3.2"))

    def test_helo_reject(self):
        return self.check("helo", Reject("bad helo", 550, "5.7.1"))

    def test_mail_reject(self):
        return self.check("mail", Reject("sender blocked", 553, "5.7.1"))

    def test_mail_tempfail(self):
        return self.check("mail", TempFail("later", 450, "4.7.1"))

    def test_rcpt_reject(self):
        return self.check("rcpt", Reject("no such user here", 550, "5.1.1"))

    def test_data_tempfail_stays_451(self):
        return self.check("data", TempFail("greylisted", 451, "4.7.1"))

    def test_data_reject_keeps_code_and_enhanced_code(self):
        return self.check("data", Reject("spam", 550, "5.7.1"))

    def test_data_reject_554(self):
        return self.check("data", Reject("virus found", 554, "5.7.9"))

    def test_delivery_reject(self):
        return self.check("delivery", Reject("mailbox policy", 550, "5.7.1"), "data")

    @defer.inlineCallbacks
    def test_auth_reject_leaves_client_unauthenticated(self):
        result = yield self.check("auth", Reject("not from here", 535, "5.7.8"),
                                  role="submission", login=ALICE)
        self.assertEqual(result.stage, "auth")

    @defer.inlineCallbacks
    def test_auth_continue_authenticates(self):
        result = yield self.send(StageFilter("auth", Continue()), role="submission",
                                 login=ALICE)
        self.assertTrue(result.accepted)
        self.assertEqual(len(result.stored[ALICE]), 1)

    @defer.inlineCallbacks
    def test_raising_filter_gives_451_and_stores_nothing(self):
        events = capture_chain_log(self)
        result = yield self.send(Raising())
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.stored[ALICE], [])
        self.assertIn("exploding_filter", logged_text(events))

    @defer.inlineCallbacks
    def test_hanging_filter_gives_451(self):
        events = capture_chain_log(self)
        result = yield self.send(Hanging(), timeout=0.05)
        self.assertEqual((result.stage, result.code, result.enhanced), ("rcpt", 451, "4.7.1"))
        self.assertIn("hanging_filter", logged_text(events))

    def test_helo_tempfail(self):
        return self.check("helo", TempFail("try later", 450, "4.7.1"))

    def test_rcpt_tempfail(self):
        return self.check("rcpt", TempFail("over quota for now", 452, "4.2.2"))

    def test_delivery_tempfail_is_the_data_reply(self):
        """A delivery-stage TempFail is the end-of-DATA reply, code and text as asked."""
        return self.check("delivery", TempFail("mailbox busy", 451, "4.2.0"), "data")

    @defer.inlineCallbacks
    def test_auth_tempfail(self):
        result = yield self.check("auth", TempFail("directory busy", 454, "4.7.0"),
                                  role="submission", login=ALICE)
        self.assertEqual(result.stage, "auth")

    @defer.inlineCallbacks
    def test_accept_skips_later_filters_of_the_stage_only(self):
        """Accept at RCPT: the next filter's rcpt_to is not asked (its Reject is not
        the reply), but its data hook still is."""
        later = StageFilter("rcpt", Reject("never asked", 550, "5.7.1"), name="later")
        later.data = lambda session, message: Continue(AddHeader("X-Later", "asked"))
        server = yield FilterTestServer(self, [StageFilter("rcpt", Accept()), later]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        [stored] = result.stored[ALICE]
        self.assertEqual(header_values(stored.content, "X-Later"), ["asked"])

    @defer.inlineCallbacks
    def test_data_accept_applies_its_actions_and_skips_the_rest(self):
        """Accept at DATA with FileInto: filed as asked; a later Reject is not asked."""
        server = yield FilterTestServer(self, [
            StageFilter("data", Accept(FileInto("Junk"))),
            StageFilter("data", Reject("never asked", 550, "5.7.1"), name="later"),
        ]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        self.assertEqual([m.folder for m in result.stored[ALICE]], ["Junk"])

    @defer.inlineCallbacks
    def test_hanging_data_filter_gives_451_and_stores_nothing(self):
        """A data hook that never answers: 451 at the end of DATA after the hook
        timeout, a log line naming the filter, and no copy in any mailbox."""
        events = capture_chain_log(self)

        class HangingData(Filter):
            name = "slow_scanner"

            def data(self, session, message):
                return defer.Deferred()

        result = yield self.send(HangingData(), timeout=0.05, recipients=(ALICE, BOB))
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.stored, {ALICE: [], BOB: []})
        self.assertIn("slow_scanner", logged_text(events))

    @defer.inlineCallbacks
    def test_raising_delivery_filter_gives_451_and_stores_no_copy(self):
        """A delivery hook that raises for one of two recipients: 451, and neither
        recipient gets a copy (the client retries the whole message)."""
        events = capture_chain_log(self)

        class BobCrash(Filter):
            name = "bob_crash"

            def delivery(self, session, message, target):
                if target.account == BOB:
                    raise RuntimeError("boom")
                return Continue()

        result = yield self.send(BobCrash(), recipients=(ALICE, BOB))
        self.assertEqual((result.stage, result.code), ("data", 451))
        self.assertEqual(result.stored, {ALICE: [], BOB: []})
        self.assertIn("bob_crash", logged_text(events))

    @defer.inlineCallbacks
    def test_no_filters_delivers(self):
        self.server = yield FilterTestServer(self, []).start()
        result = yield self.server.send(MESSAGE)
        self.assertTrue(result.accepted)
        self.assertEqual(len(result.stored[ALICE]), 1)


class DiscardTests(unittest.TestCase):
    @defer.inlineCallbacks
    def discard_at(self, stage):
        server = yield FilterTestServer(self, [StageFilter(stage, Discard())]).start()
        result = yield server.send(MESSAGE, recipients=[ALICE, BOB])
        self.assertEqual((result.stage, result.code), ("data", 250))
        self.assertEqual(result.stored, {ALICE: [], BOB: []})

    def test_discard_at_mail(self):
        return self.discard_at("mail")

    def test_discard_at_rcpt(self):
        return self.discard_at("rcpt")

    def test_discard_at_data(self):
        return self.discard_at("data")

    def test_discard_at_delivery(self):
        return self.discard_at("delivery")

    @defer.inlineCallbacks
    def test_discard_one_recipient(self):
        class DropBob(Filter):
            def rcpt_to(self, session, recipient):
                return Discard() if recipient == BOB else Continue()

        server = yield FilterTestServer(self, [DropBob()]).start()
        result = yield server.send(MESSAGE, recipients=[ALICE, BOB])
        self.assertTrue(result.accepted)
        self.assertEqual((len(result.stored[ALICE]), len(result.stored[BOB])), (1, 0))


class MessageActionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_header_edits_are_in_the_stored_file(self):
        flt = StageFilter("data", Continue(AddHeader("X-Spam-Score", "3.5"),
                                           ChangeHeader("Subject", "[SPAM] hello"),
                                           RemoveHeader("X-Old")))
        server = yield FilterTestServer(self, [flt]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        [stored] = result.stored[ALICE]
        self.assertEqual(header_values(stored.content, "X-Spam-Score"), ["3.5"])
        self.assertEqual(header_values(stored.content, "Subject"), ["[SPAM] hello"])
        self.assertEqual(header_values(stored.content, "X-Old"), [])
        self.assertIn(b"\n\nbody\n", stored.content)

    @defer.inlineCallbacks
    def test_delivery_file_into_folder_with_flags(self):
        flt = StageFilter("delivery", Continue(FileInto("Lists/python"),
                                               AddFlags(("\\Flagged",))))
        server = yield FilterTestServer(self, [flt]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        [stored] = result.stored[ALICE]
        self.assertEqual((stored.folder, stored.flags), ("Lists/python", "F"))
        self.assertTrue(stored.content.startswith(b"Return-Path: <sender@example.test>\n"))

    @defer.inlineCallbacks
    def test_data_file_into_applies_to_every_local_copy(self):
        server = yield FilterTestServer(self, [StageFilter("data", Continue(
            FileInto("Junk")))]).start()
        result = yield server.send(MESSAGE, recipients=[ALICE, BOB])
        self.assertEqual([m.folder for m in result.stored[ALICE] + result.stored[BOB]],
                         ["Junk", "Junk"])

    @defer.inlineCallbacks
    def test_delivery_redirect(self):
        class ToBob(Filter):
            def delivery(self, session, message, target):
                if target.account == ALICE:
                    return Continue(Redirect((BOB,)))
                return Continue()

        server = yield FilterTestServer(self, [ToBob()]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        self.assertEqual((len(result.stored[ALICE]), len(result.stored[BOB])), (0, 1))

    @defer.inlineCallbacks
    def test_data_redirect_replaces_recipients(self):
        server = yield FilterTestServer(self, [StageFilter("data", Continue(
            Redirect((BOB,)), FileInto("Redirected")))]).start()
        result = yield server.send(MESSAGE)
        self.assertTrue(result.accepted)
        self.assertEqual(result.stored[ALICE], [])
        self.assertEqual([m.folder for m in result.stored[BOB]], ["Redirected"])

    @defer.inlineCallbacks
    def test_client_gone_before_filters_finish_stores_nothing(self):
        from mailtwist.smtp.server import MailtwistSMTP

        waiting = defer.Deferred()
        sessions = []

        class Slow(Filter):
            def data(self, session, message):
                d = defer.Deferred()
                waiting.callback(d)
                return d

        original = MailtwistSMTP.connectionLost

        def lost(protocol, reason):
            original(protocol, reason)
            sessions.append(protocol)

        self.patch(MailtwistSMTP, "connectionLost", lost)
        server = yield FilterTestServer(self, [Slow()]).start()

        def send_and_hang_up():
            import socket
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n"
                             b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
                sock.recv(4096)
                sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")

        yield deferToThread(send_and_hang_up)
        verdict = yield waiting
        while not sessions:
            yield task.deferLater(reactor, 0.01, lambda: None)
        verdict.callback(Continue())
        self.assertEqual(server.stored(ALICE), [])

    @defer.inlineCallbacks
    def test_session_context(self):
        seen = {}

        class Recorder(Filter):
            name = "recorder"

            def connect(self, session):
                session.state_for(self.name)["connected"] = True
                return Continue()

            def data(self, session, message):
                seen.update(peer=session.peer_host, helo=session.helo, tls=session.tls,
                            sender=session.sender, recipients=list(session.recipients),
                            state=dict(session.state_for(self.name)), role=session.role,
                            queue_id=session.queue_id)
                return Continue()

        server = yield FilterTestServer(self, [Recorder()]).start()
        yield server.send(MESSAGE, recipients=[ALICE, BOB], helo="client.example.test")
        queue_id = seen.pop("queue_id")
        self.assertEqual(seen, {"peer": "127.0.0.1", "helo": "client.example.test",
                                "tls": False, "sender": "sender@example.test",
                                "recipients": [ALICE, BOB], "state": {"connected": True},
                                "role": "smtp"})
        self.assertTrue(queue_id)


class SessionContextTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_and_authenticated_user(self):
        """After STARTTLS and AUTH on submission, every later hook sees tls=True
        and the authenticated user; the connect hook saw tls=False."""
        seen = []

        class Recorder(Filter):
            name = "recorder"

            def connect(self, session):
                seen.append(("connect", session.tls, session.user))
                return Continue()

            def mail_from(self, session, sender):
                seen.append(("mail", session.tls, session.user))
                return Continue()

            def data(self, session, message):
                seen.append(("data", session.tls, session.user))
                return Continue()

        server = yield FilterTestServer(self, [Recorder()], role="submission").start()
        result = yield server.send(MESSAGE, sender=ALICE, login=ALICE, starttls=True)
        self.assertTrue(result.accepted, result)
        self.assertEqual(seen, [("connect", False, None), ("mail", True, ALICE),
                                ("data", True, ALICE)])


class SessionStateTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_state_lasts_for_the_session_and_only_for_it(self):
        """state_for() keeps a filter's data across the transactions of one SMTP
        session (replayed as recorded) and starts empty in the next session."""

        class Counter(Filter):
            name = "counter"

            def data(self, session, message):
                state = session.state_for(self.name)
                state["n"] = state.get("n", 0) + 1
                return Continue(AddHeader("X-Message-In-Session", str(state["n"])))

        transaction = ("C: MAIL FROM:<sender@example.test>\nS: 250\n"
                       "C: RCPT TO:<alice@example.test>\nS: 250\nC: DATA\nS: 354\n"
                       "C: Subject: n\nC:\nC: x\nC: .\nS: 250\n")
        recording = ("S: 220\nC: EHLO c.example.test\nS: 250\n" + transaction * 2
                     + "C: QUIT\nS: 221\n")
        server = yield FilterTestServer(self, [Counter()]).start()
        first = yield server.replay(recording)
        self.assertEqual(first.mismatches, [])
        second = yield server.send(b"Subject: n\r\n\r\nx\r\n")
        self.assertTrue(second.accepted)
        self.assertEqual(sorted(header_values(m.content, "X-Message-In-Session")[0]
                                for m in second.stored[ALICE]), ["1", "1", "2"])


class ConfigTests(unittest.TestCase):
    def load(self, text: str):
        path = Path(self.mktemp())
        path.write_text(textwrap.dedent(text))
        return load_config(path)

    def assertOneLineError(self, text, *fragments, build=False):
        def attempt():
            config = self.load(text)
            if build:
                build_chains(config, clock=task.Clock())
        error = self.assertRaises(ConfigError, attempt)
        message = str(error)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_enabled_and_settings(self):
        config = self.load("""
            [filters]
            timeout = 5
            smtp = ["header_folder"]
            [filters.header_folder]
            folder = "Spam"
        """)
        self.assertEqual(config.filters.enabled, {"smtp": ["header_folder"]})
        chains = build_chains(config, clock=task.Clock())
        [flt] = chains["smtp"].filters
        self.assertIsInstance(flt, HeaderFolderFilter)
        self.assertEqual(flt.action, FileInto("Spam"))
        self.assertEqual(chains["smtp"].timeout, 5)
        self.assertFalse(chains["submission"])

    def test_outbound_and_mailbox_lists(self):
        """[filters] outbound and mailbox build their own chains; one filter is built once."""
        config = self.load("""
            [filters]
            smtp = ["header_folder"]
            outbound = ["header_folder"]
            mailbox = ["header_folder"]
        """)
        chains = build_chains(config, clock=task.Clock())
        [outbound] = chains["outbound"].filters
        [mailbox] = chains["mailbox"].filters
        self.assertIs(outbound, chains["smtp"].filters[0])
        self.assertIs(mailbox, outbound)
        [listing] = [i for i in list_filters(config) if i.name == "header_folder"]
        self.assertEqual(listing.roles, ("smtp", "outbound", "mailbox"))

    def test_unknown_key(self):
        self.assertOneLineError("[filters]\nsmpt = ['x']\n", "filters.smpt", "unknown key")

    def test_bad_timeout(self):
        self.assertOneLineError("[filters]\ntimeout = -1\n", "filters.timeout")

    def test_settings_without_enabling(self):
        self.assertOneLineError("[filters.header_folder]\nfolder = 'x'\n",
                                "filters.header_folder")

    def test_unknown_filter(self):
        self.assertOneLineError("[filters]\nsmtp = ['nonesuch']\n", "nonesuch", "header_folder",
                                build=True)

    def test_unknown_setting(self):
        self.assertOneLineError("[filters]\nsmtp = ['header_folder']\n"
                                "[filters.header_folder]\nfoldr = 'x'\n",
                                "filters.header_folder.foldr", "allowed: flags, folder",
                                build=True)

    def test_wrong_type(self):
        self.assertOneLineError("[filters]\nsmtp = ['header_folder']\n"
                                "[filters.header_folder]\nfolder = 3\n",
                                "filters.header_folder.folder", "expected a string",
                                build=True)

    def test_filter_own_validation(self):
        self.assertOneLineError("[filters]\nsmtp = ['header_folder']\n"
                                "[filters.header_folder]\nfolder = '../x'\n",
                                "filters.header_folder.folder", build=True)

    def test_dotted_path_not_a_factory(self):
        self.assertOneLineError("[filters]\nsmtp = ['mailtwist.filters.Filter']\n",
                                "IFilterFactory", build=True)

    def test_dotted_path(self):
        config = self.load("[filters]\nsmtp = ['mailtwist.filters.builtin.header_folder']\n")
        chains = build_chains(config, clock=task.Clock())
        self.assertIsInstance(chains["smtp"].filters[0], HeaderFolderFilter)

    def test_listing(self):
        config = self.load("[filters]\nsubmission = ['header_folder']\n")
        listing = format_listing(config)
        self.assertIn("header_folder", listing)
        line = [x for x in listing.splitlines() if x.startswith("header_folder")][0]
        self.assertIn("submission", line)
        self.assertNotIn(" smtp", line)


THIRD_PARTY_PLUGIN = '''
from mailtwist.filters import Filter, FilterFactory
from mailtwist.interfaces import Reject


class NoGreetings(Filter):
    name = "no_greetings"

    def __init__(self, word):
        self.word = word

    def data(self, session, message):
        return Reject("no " + self.word) if self.word.encode() in message else None


no_greetings = FilterFactory("no_greetings", lambda s: NoGreetings(s["word"]),
                             description="third-party test filter", defaults={"word": "hello"})
'''


class DiscoveryTests(unittest.TestCase):
    def test_builtin_is_installed(self):
        self.assertIs(installed_factories()["header_folder"], header_folder)

    def test_third_party_distribution(self):
        """A module in another sys.path entry's mailtwist/plugins/ is found."""
        root = Path(self.mktemp())
        package = root / "mailtwist" / "plugins"
        package.mkdir(parents=True)
        module = f"thirdparty_{id(self)}"
        (package / f"{module}.py").write_text(THIRD_PARTY_PLUGIN)
        mailtwist.plugins.__path__.append(str(package))
        self.addCleanup(mailtwist.plugins.__path__.remove, str(package))
        self.addCleanup(sys.modules.pop, f"mailtwist.plugins.{module}", None)
        factories = installed_factories()
        self.assertIn("no_greetings", factories)
        verifyObject(IFilterFactory, factories["no_greetings"])
        self.assertIn("header_folder", factories)

    @defer.inlineCallbacks
    def test_configured_builtin_runs_in_the_real_server(self):
        """[filters] in the config, through build_service: spam lands in Junk."""
        server = yield FilterTestServer(self, None, config={"filters": {
            "smtp": ["header_folder"], "header_folder": {"flags": ["\\Seen"]}}}).start()
        result = yield server.send(b"X-Spam-Flag: YES\r\nSubject: buy\r\n\r\nx\r\n")
        self.assertTrue(result.accepted)
        [stored] = result.stored[ALICE]
        self.assertEqual((stored.folder, stored.flags), ("Junk", "S"))
        result = yield server.send(MESSAGE)
        self.assertEqual(sorted(m.folder for m in result.stored[ALICE]), ["INBOX", "Junk"])


class FactoryTests(unittest.SynchronousTestCase):
    def test_defaults_and_types(self):
        factory = FilterFactory("x", lambda s: Filter(), defaults={"n": 1, "f": 1.0,
                                                                   "b": False, "l": ["a"]})
        self.assertEqual(factory.validate({"n": 2, "f": 3}), {"n": 2, "f": 3, "b": False,
                                                               "l": ["a"]})
        for bad in ({"n": 1.5}, {"b": 1}, {"n": True}, {"l": [1]}, {"zz": 1}):
            self.assertRaises(Exception, factory.validate, bad)
