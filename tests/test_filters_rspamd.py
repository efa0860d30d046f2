"""The rspamd filter: its HTTP protocol against a fake rspamd written with
twisted.web, every action, the failure policy, and a real rspamd (Debian
package rspamd) when installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource
from twisted.web import server as web_server
from zope.interface.verify import verifyObject

from mailtwist.config import ConfigError
from mailtwist.filters import header_values
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.filters.rspamd import RspamdFilter, rspamd
from mailtwist.interfaces import Continue, IFilter, IFilterFactory, MailboxEvent
from mailtwist.testing import FilterTestServer
from tests.test_filters_spamd import HAM, crlf, free_port, spawn_daemon

GTUBE_TAIL = b"JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class FakeRspamd(resource.Resource):
    """POST /checkv2: records the request, answers self.answer (None: never)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.received = defer.Deferred()
        self.status = 200
        self.reply(action="no action", score=1.5)

    def reply(self, **fields):
        answer = {"is_skipped": False, "score": 0.0, "required_score": 15.0,
                  "symbols": {"MISSING_DATE": {"score": 1.0}, "ARC_NA": {"score": 0.0}},
                  **fields}
        self.answer = json.dumps(answer).encode()

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders, request.content.read()))
        waiting, self.received = self.received, defer.Deferred()
        waiting.callback(None)
        if self.answer is None:
            return web_server.NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.answer


class RspamdTestMixin:
    def start_fake(self):
        self.fake = FakeRspamd()
        site = web_server.Site(self.fake)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    def server(self, role="smtp", **settings):
        config = {"filters": {role: ["rspamd"],
                              "rspamd": {"url": self.url, "timeout": 5.0, **settings}}}
        return FilterTestServer(self, None, role=role, config=config).start()


class RspamdFilterTests(RspamdTestMixin, unittest.TestCase):
    def setUp(self):
        self.start_fake()

    @defer.inlineCallbacks
    def test_envelope_in_request_headers(self):
        """POST /checkv2 carries the message and IP, Helo, From, Rcpt (each), Queue-Id."""
        server = yield self.server()
        result = yield server.send(HAM, recipients=["alice@example.test", "bob@example.test"])
        self.assertTrue(result.accepted, result)
        [(path, headers, body)] = self.fake.requests
        self.assertEqual(path, b"/checkv2")
        self.assertEqual(headers.getRawHeaders(b"ip"), [b"127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"helo"), [b"client.example.test"])
        self.assertEqual(headers.getRawHeaders(b"from"), [b"sender@example.test"])
        self.assertEqual(headers.getRawHeaders(b"rcpt"),
                         [b"alice@example.test", b"bob@example.test"])
        self.assertEqual(len(headers.getRawHeaders(b"queue-id")), 1)
        self.assertEqual(headers.getRawHeaders(b"mta-name"), [b"mx.example.test"])
        self.assertIsNone(headers.getRawHeaders(b"user"))
        self.assertIn(b"Subject: lunch\r\n", body)
        self.assertNotIn(b"X-Spam-Flag", body)

    @defer.inlineCallbacks
    def test_no_action_adds_headers(self):
        """"no action": score headers, forged ones removed, INBOX."""
        server = yield self.server()
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "INBOX")
        content = crlf(stored.content)
        self.assertEqual(header_values(content, "X-Spam-Score"), ["1.5"])
        self.assertEqual(header_values(content, "X-Spam-Flag"), [])
        [status] = header_values(content, "X-Spam-Status")
        self.assertTrue(status.startswith("No, score=1.5 required=15.0 tests=ARC_NA,MISSING_DATE"),
                        status)

    @defer.inlineCallbacks
    def test_add_header_files_into_junk(self):
        """"add header": X-Spam-Flag: YES and the Junk folder."""
        self.fake.reply(action="add header", score=7.0)
        server = yield self.server()
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Junk")
        self.assertEqual(header_values(crlf(stored.content), "X-Spam-Flag"), ["YES"])

    @defer.inlineCallbacks
    def test_rewrite_subject(self):
        """"rewrite subject": rspamd's subject replaces ours, and Junk."""
        self.fake.reply(action="rewrite subject", score=9.0, subject="*** SPAM *** lunch")
        server = yield self.server(junk_folder="Spam")
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Spam")
        self.assertEqual(header_values(crlf(stored.content), "Subject"), ["*** SPAM *** lunch"])

    @defer.inlineCallbacks
    def test_rewrite_subject_off(self):
        """rewrite_subject = false keeps the Subject but still files into Junk."""
        self.fake.reply(action="rewrite subject", score=9.0, subject="*** SPAM *** lunch")
        server = yield self.server(rewrite_subject=False)
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual((stored.folder, header_values(crlf(stored.content), "Subject")),
                         ("Junk", ["lunch"]))

    @defer.inlineCallbacks
    def test_reject(self):
        """"reject": 550 5.7.1 with rspamd's smtp_message; nothing stored."""
        self.fake.reply(action="reject", score=20.0,
                        messages={"smtp_message": "Spam message rejected\r\nby us"})
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 550, "5.7.1"))
        self.assertEqual(result.text, "Spam message rejected by us")
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_skipped_answer_keeps_its_action(self):
        """is_skipped (GTUBE, settings) only means checks were skipped: "reject" still rejects."""
        self.fake.reply(action="reject", score=15.0, is_skipped=True,
                        messages={"smtp_message": "Gtube pattern"})
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertEqual((result.code, result.text), (550, "Gtube pattern"))

    @defer.inlineCallbacks
    def test_soft_reject_and_greylist(self):
        """"soft reject" and "greylist" answer 451 4.7.1 at the data stage."""
        server = yield self.server()
        for action in ("soft reject", "greylist"):
            self.fake.reply(action=action, score=5.0)
            result = yield server.send(HAM)
            self.assertEqual((result.stage, result.code, result.enhanced),
                             ("data", 451, "4.7.1"), action)
            self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_greylist_off(self):
        """greylist = false delivers a "greylist" answer as no action."""
        self.fake.reply(action="greylist", score=5.0)
        server = yield self.server(greylist=False)
        result = yield server.send(HAM)
        self.assertTrue(result.accepted, result)
        self.assertEqual(result.stored["alice@example.test"][0].folder, "INBOX")

    @defer.inlineCallbacks
    def test_authenticated_skipped_unless_asked(self):
        """Authenticated submissions are not scanned; with check_authenticated, User is sent."""
        server = yield self.server(role="submission")
        yield server.send(HAM, sender="bob@example.test", login="bob@example.test")
        self.assertEqual(self.fake.requests, [])
        server = yield self.server(role="submission", check_authenticated=True)
        result = yield server.send(HAM, sender="bob@example.test", login="bob@example.test")
        self.assertTrue(result.accepted, result)
        [(_path, headers, _body)] = self.fake.requests
        self.assertEqual(headers.getRawHeaders(b"user"), [b"bob@example.test"])

    @defer.inlineCallbacks
    def test_big_message_not_scanned(self):
        """Messages above max_size are not sent to rspamd."""
        server = yield self.server(max_size=100)
        result = yield server.send(HAM + b"y" * 200 + b"\r\n")
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_failures(self):
        """Down, HTTP 500, non-JSON, an error object: accept (default) or 451 by on_failure."""
        answers = [(500, b'{"error": "oops"}'), (200, b"<html>"),
                   (200, b'{"error": "Cannot parse input"}')]
        server_open = yield self.server()
        server_closed = yield self.server(on_failure="tempfail")
        for status, answer in answers:
            self.fake.status, self.fake.answer = status, answer
            opened = yield server_open.send(HAM)
            self.assertTrue(opened.accepted, (answer, opened))
            self.assertEqual(header_values(crlf(opened.stored["alice@example.test"][-1].content),
                                           "X-Spam-Status"), [])
            closed = yield server_closed.send(HAM)
            self.assertEqual((closed.code, closed.enhanced), (451, "4.7.1"), answer)
        self.url = f"http://127.0.0.1:{free_port()}"
        server_down = yield self.server(on_failure="tempfail")
        result = yield server_down.send(HAM)
        self.assertEqual(result.code, 451)

    @defer.inlineCallbacks
    def test_timeout(self):
        """rspamd that never answers: `timeout` seconds on the clock, then the policy."""
        self.fake.answer = None
        clock = task.Clock()
        flt = RspamdFilter(url=self.url, timeout=8.0, max_size=0, on_failure="tempfail",
                           check_authenticated=False, junk_folder="Junk", clock=clock)
        server = yield FilterTestServer(self, [flt]).start()
        sending = server.send(HAM)
        yield self.fake.received
        clock.advance(7.9)
        self.assertFalse(sending.called)
        clock.advance(0.1)
        result = yield sending
        self.assertEqual((result.code, result.enhanced), (451, "4.7.1"))

    def learner(self, **kwargs) -> RspamdFilter:
        self.fake.answer = b'{"success": true}'
        settings = {"url": self.url, "learn_url": self.url, **kwargs}
        return build_filter("rspamd", settings)

    @staticmethod
    def event(kind, source, destination, uids=(7, 8)):
        def reader(wanted):
            return [(uid, b"Subject: m%d\r\n\r\nx\r\n" % uid) for uid in wanted]
        return MailboxEvent("alice@example.test", kind, source, destination,
                            source_uids=tuple(uids), uids=tuple(uids), reader=reader)

    @defer.inlineCallbacks
    def test_learn_spam_and_ham(self):
        """Moving into Junk posts each message to /learnspam, out of Junk to /learnham."""
        flt = self.learner(password="secret")
        yield flt.mailbox_event(self.event("move", "INBOX", "Junk"))
        yield flt.mailbox_event(self.event("copy", "Junk", "Archive", uids=(9,)))
        self.assertEqual([(path, body) for path, _headers, body in self.fake.requests],
                         [(b"/learnspam", b"Subject: m7\r\n\r\nx\r\n"),
                          (b"/learnspam", b"Subject: m8\r\n\r\nx\r\n"),
                          (b"/learnham", b"Subject: m9\r\n\r\nx\r\n")])
        self.assertEqual(self.fake.requests[0][1].getRawHeaders(b"password"), [b"secret"])

    @defer.inlineCallbacks
    def test_no_learning_for_other_events(self):
        """Appends, moves to Trash or between other folders, and learn_url unset: nothing."""
        flt = self.learner()
        for event in (self.event("append", None, "Junk"), self.event("move", "Junk", "Trash"),
                      self.event("move", "INBOX", "Archive"), self.event("copy", "Junk", "Junk")):
            yield flt.mailbox_event(event)
        yield rspamd.build({"url": self.url}).mailbox_event(self.event("move", "INBOX", "Junk"))
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_learn_max_and_errors(self):
        """At most learn_max messages per event; a refusal is one log line per message."""
        lines = []

        def observer(event):
            if event.get("filter") == "rspamd":
                lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        flt = self.learner(learn_max=2)
        self.fake.status, self.fake.answer = 500, b'{"error": "no statfiles"}'
        verdict = yield flt.mailbox_event(self.event("move", "INBOX", "Junk", uids=(1, 2, 3)))
        self.assertEqual(verdict, Continue())
        self.assertEqual(len(self.fake.requests), 2)
        failures = [line for line in lines if "failed" in line]
        self.assertEqual(len(failures), 2)
        self.assertIn("learning spam from alice@example.test uid 1", failures[0])
        self.assertIn('HTTP 500: {"error": "no statfiles"}', failures[0])

    def test_bad_settings(self):
        """Bad settings are refused with the key named."""
        for settings, key in [({"url": "127.0.0.1:11333"}, "filters.rspamd.url"),
                              ({"url": "http://h:1/checkv2"}, "filters.rspamd.url"),
                              ({"on_failure": "drop"}, "filters.rspamd.on_failure"),
                              ({"max_size": -1}, "filters.rspamd.max_size"),
                              ({"greylist": "yes"}, "filters.rspamd.greylist"),
                              ({"learn_url": "localhost"}, "filters.rspamd.learn_url"),
                              ({"learn_max": 0}, "filters.rspamd.learn_max")]:
            with self.assertRaises(ConfigError) as cm:
                build_filter("rspamd", settings)
            self.assertTrue(str(cm.exception).startswith(key + ":"), (settings, cm.exception))

    def test_installed_plugin(self):
        """rspamd is found as a plugin and provides the interfaces."""
        self.assertIs(installed_factories()["rspamd"], rspamd)
        verifyObject(IFilterFactory, rspamd)
        verifyObject(IFilter, rspamd.build({}))


RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    enable_test_patterns = true;
    disable_hyperscan = true;
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{ type = "console"; level = "error"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
"""


class RealRspamdTests(RspamdTestMixin, unittest.TestCase):
    """Against rspamd itself, with its GTUBE-like test patterns enabled."""

    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        path = shutil.which("rspamd")
        if path is None or not os.path.isdir("/etc/rspamd"):
            raise unittest.SkipTest("rspamd is not installed (Debian package rspamd; "
                                    ".ci/run installs it)")
        home = Path(self.mktemp()).resolve()
        for sub in ("db", "run", "local"):
            (home / sub).mkdir(parents=True)
            (home / sub).chmod(0o777)
        for directory in (home, home.parent):      # mkdtemp's 0700: rspamd runs as nobody
            directory.chmod(0o755)
        port = free_port()
        (home / "rspamd.conf").write_text(RSPAMD_CONF.format(port=port))
        args = [path, "-f", "-c", str(home / "rspamd.conf"), f"--var=DBDIR={home / 'db'}",
                f"--var=RUNDIR={home / 'run'}", f"--var=LOCAL_CONFDIR={home / 'local'}"]
        if os.geteuid() == 0:
            args += ["-u", "nobody", "-g", "nogroup"]
        process = spawn_daemon(self, args, home / "rspamd.log", stop_wait=20)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(1800):
            if process.poll() is not None:
                self.fail(f"rspamd exited: {(home / 'rspamd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"rspamd did not start: {(home / 'rspamd.log').read_text()[-2000:]}")

    @defer.inlineCallbacks
    def test_actions(self):
        """rspamd's reject, add header, rewrite subject and no action, end to end."""
        server = yield self.server(timeout=60.0)

        def message(prefix: bytes) -> bytes:
            return (b"From: Bob <bob@sender.test>\r\nTo: alice@example.test\r\n"
                    b"Subject: lunch\r\n\r\n" + prefix + GTUBE_TAIL + b"\r\n")
        result = yield server.send(message(b"X"))
        self.assertEqual((result.code, result.enhanced), (550, "5.7.1"), result)
        result = yield server.send(message(b"Y"))
        self.assertTrue(result.accepted, result)
        [junk] = result.stored["alice@example.test"]
        self.assertEqual(junk.folder, "Junk")
        self.assertIn("GTUBE", header_values(crlf(junk.content), "X-Spam-Status")[0])
        result = yield server.send(message(b"Z"))
        subjects = [header_values(crlf(m.content), "Subject")[0]
                    for m in result.stored["alice@example.test"]]
        self.assertIn("*** SPAM *** lunch", subjects)
        result = yield server.send(message(b"A"), recipients=["bob@example.test"])
        self.assertTrue(result.accepted, result)
        [ham] = result.stored["bob@example.test"]
        self.assertEqual(ham.folder, "INBOX")
        self.assertEqual(header_values(crlf(ham.content), "X-Spam-Flag"), [])
