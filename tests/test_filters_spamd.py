"""The spamd filter: the spamc protocol against a fake spamd written with Twisted,
the failure policy, and a real spamd (Debian package spamd) when installed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.config import ConfigError
from mailtwist.filters import header_values
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.filters.spamd import ScannerError, SpamdFilter, SpamdProtocol, spamd
from mailtwist.interfaces import IFilter, IFilterFactory
from mailtwist.testing import FilterTestServer

HAM = (b"From: Bob <bob@sender.test>\r\nTo: alice@example.test\r\nSubject: lunch\r\n"
       b"X-Spam-Flag: YES\r\nX-Spam-Score: -100\r\n\r\nat noon?\r\n")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def crlf(content: bytes) -> bytes:
    """A stored message (LF endings) with CRLF again, for header_values."""
    return content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class FakeSpamd(protocol.Protocol):
    """Reads one spamc request and answers as the factory says."""

    def connectionMade(self):
        self.buffer = b""
        self.factory.connections += 1

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.decode().split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith("content-length:"))
        if len(body) < length:
            return
        self.factory.requests.append((lines, body))
        waiting, self.factory.received = self.factory.received, defer.Deferred()
        waiting.callback(None)
        if self.factory.answer is None:
            return                                  # never answers
        self.transport.write(self.factory.answer)
        self.transport.loseConnection()


class FakeSpamdFactory(protocol.Factory):
    protocol = FakeSpamd

    def __init__(self):
        self.requests = []
        self.connections = 0
        self.received = defer.Deferred()
        self.answer = b""
        self.score(1.2)

    def score(self, score: float, symbols: str = "MISSING_DATE,NO_RELAYS"):
        spam = "True" if score >= 5 else "False"
        body = symbols.encode()
        self.answer = (f"SPAMD/1.1 0 EX_OK\r\nContent-length: {len(body)}\r\n"
                       f"Spam: {spam} ; {score} / 5.0\r\n\r\n").encode() + body


class SpamdTestMixin:
    def start_fake(self) -> FakeSpamdFactory:
        self.fake = FakeSpamdFactory()
        port = reactor.listenTCP(0, self.fake, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.fake_port = port.getHost().port
        return self.fake

    def server(self, role="smtp", **settings):
        config = {"filters": {role: ["spamd"],
                              "spamd": {"port": self.fake_port, "timeout": 5.0, **settings}}}
        return FilterTestServer(self, None, role=role, config=config).start()

    def collect_log(self) -> list[str]:
        lines = []

        def observer(event):
            if event.get("filter") == "spamd":
                from twisted.logger import formatEvent
                lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return lines


def free_port() -> int:
    """A TCP port nothing listens on (for 'unreachable' and for spamd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SpamdFilterTests(SpamdTestMixin, unittest.TestCase):
    def setUp(self):
        self.start_fake()

    @defer.inlineCallbacks
    def test_ham_gets_score_headers(self):
        """A low score adds X-Spam-Status/-Score, no flag, and stays in the INBOX."""
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "INBOX")
        content = crlf(stored.content)
        self.assertEqual(header_values(content, "X-Spam-Score"), ["1.2"])
        [status] = header_values(content, "X-Spam-Status")
        self.assertTrue(status.startswith("No, score=1.2 required=5.0 "
                                          "tests=MISSING_DATE,NO_RELAYS"), status)
        self.assertEqual(header_values(content, "X-Spam-Flag"), [])

    @defer.inlineCallbacks
    def test_request_is_spamc_1_5_symbols(self):
        """spamd gets SYMBOLS SPAMC/1.5 with the exact Content-length and the message."""
        server = yield self.server(user="mailtwist")
        yield server.send(HAM)
        [(lines, body)] = self.fake.requests
        self.assertEqual(lines[0], "SYMBOLS SPAMC/1.5")
        self.assertIn(f"Content-length: {len(body)}", lines)
        self.assertIn("User: mailtwist", lines)
        self.assertIn(b"Subject: lunch\r\n", body)

    @defer.inlineCallbacks
    def test_unix_socket(self):
        """socket = "/path" talks to spamd on a UNIX socket instead of TCP."""
        short = Path(tempfile.mkdtemp(prefix="mt-spamd-"))  # sun_path holds ~107 bytes
        self.addCleanup(shutil.rmtree, short, True)
        path = short / "spamd.sock"
        unix = FakeSpamdFactory()
        unix.score(8.0, "FROM_UNIX")
        port = reactor.listenUNIX(str(path), unix)
        self.addCleanup(port.stopListening)
        server = yield self.server(socket=str(path))
        result = yield server.send(HAM)
        self.assertEqual(len(unix.requests), 1)
        self.assertEqual(self.fake.requests, [])
        [stored] = result.stored["alice@example.test"]
        self.assertIn("tests=FROM_UNIX", header_values(crlf(stored.content), "X-Spam-Status")[0])

    @defer.inlineCallbacks
    def test_forged_headers_removed(self):
        """Incoming X-Spam-* headers are neither stored nor shown to spamd."""
        server = yield self.server()
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        content = crlf(stored.content)
        self.assertNotIn(b"-100", content)
        self.assertEqual(header_values(content, "X-Spam-Flag"), [])
        [(_lines, body)] = self.fake.requests
        self.assertNotIn(b"X-Spam-Flag", body)

    @defer.inlineCallbacks
    def test_junk_above_junk_score(self):
        """At or above junk_score the message goes to Junk with X-Spam-Flag: YES."""
        self.fake.score(7.5, "BAYES_99")
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Junk")
        content = crlf(stored.content)
        self.assertEqual(header_values(content, "X-Spam-Flag"), ["YES"])
        self.assertTrue(header_values(content, "X-Spam-Status")[0].startswith("Yes, score=7.5"))

    @defer.inlineCallbacks
    def test_own_junk_score(self):
        """junk_score, not spamd's required score, decides Junk."""
        self.fake.score(3.0)
        server = yield self.server(junk_score=2.5, junk_folder="Spam")
        result = yield server.send(HAM)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Spam")

    @defer.inlineCallbacks
    def test_reject_above_reject_score(self):
        """At or above reject_score the message is refused with 550 5.7.1 and not stored."""
        self.fake.score(21.0)
        server = yield self.server(reject_score=15.0)
        result = yield server.send(HAM)
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 550, "5.7.1"))
        self.assertIn("spam", result.text)
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_reject_score_zero_never_rejects(self):
        """reject_score = 0 (the default) files even a huge score into Junk."""
        self.fake.score(1000.0, "GTUBE")
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertTrue(result.accepted, result)
        self.assertEqual(result.stored["alice@example.test"][0].folder, "Junk")

    @defer.inlineCallbacks
    def test_big_message_not_scanned(self):
        """Messages above max_size are delivered unscanned, forged headers still removed."""
        server = yield self.server(max_size=200)
        result = yield server.send(HAM + b"x" * 300 + b"\r\n")
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.fake.connections, 0)
        content = crlf(result.stored["alice@example.test"][0].content)
        self.assertEqual(header_values(content, "X-Spam-Flag"), [])
        self.assertEqual(header_values(content, "X-Spam-Status"), [])

    @defer.inlineCallbacks
    def test_authenticated_submission_skipped(self):
        """Mail from an authenticated user is not sent to spamd by default."""
        server = yield self.server(role="submission")
        result = yield server.send(HAM, sender="bob@example.test", login="bob@example.test")
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.fake.connections, 0)

    @defer.inlineCallbacks
    def test_check_authenticated(self):
        """check_authenticated = true scans authenticated submissions too."""
        server = yield self.server(role="submission", check_authenticated=True)
        result = yield server.send(HAM, sender="bob@example.test", login="bob@example.test")
        self.assertTrue(result.accepted, result)
        self.assertEqual(self.fake.connections, 1)

    @defer.inlineCallbacks
    def test_unreachable_fails_open_with_log_line(self):
        """spamd down: the message is delivered unscanned and one line says why."""
        lines = self.collect_log()
        self.fake_port = free_port()
        server = yield self.server()
        result = yield server.send(HAM)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(header_values(crlf(stored.content), "X-Spam-Status"), [])
        self.assertEqual(header_values(crlf(stored.content), "X-Spam-Flag"), [])
        [line] = lines
        self.assertIn(f"spamd at 127.0.0.1:{self.fake_port}", line)
        self.assertIn("accepted unscanned", line)

    @defer.inlineCallbacks
    def test_unreachable_tempfail(self):
        """on_failure = "tempfail": spamd down answers 451 4.7.1 and stores nothing."""
        lines = self.collect_log()
        self.fake_port = free_port()
        server = yield self.server(on_failure="tempfail")
        result = yield server.send(HAM)
        self.assertEqual((result.stage, result.code, result.enhanced), ("data", 451, "4.7.1"))
        self.assertEqual(result.stored["alice@example.test"], [])
        self.assertIn("refused with 451", lines[0])

    @defer.inlineCallbacks
    def test_spamd_error_reply(self):
        """A spamd error status (EX_PROTOCOL...) is a failure, not a score."""
        self.fake.answer = b"SPAMD/1.0 76 Bad header line: (EOF)\r\n"
        lines = self.collect_log()
        server = yield self.server(on_failure="tempfail")
        result = yield server.send(HAM)
        self.assertEqual(result.code, 451)
        self.assertIn("spamd refused the request: SPAMD/1.0 76 Bad header line", lines[0])

    @defer.inlineCallbacks
    def test_timeout(self):
        """spamd that never answers: after `timeout` on the clock, the failure policy."""
        self.fake.answer = None
        clock = task.Clock()
        flt = SpamdFilter(port=self.fake_port, timeout=10.0, max_size=0,
                          on_failure="tempfail", check_authenticated=False,
                          junk_folder="Junk", clock=clock)
        server = yield FilterTestServer(self, [flt]).start()
        sending = server.send(HAM)
        yield self.fake.received
        clock.advance(9)
        self.assertFalse(sending.called)
        clock.advance(1)
        result = yield sending
        self.assertEqual((result.code, result.enhanced), (451, "4.7.1"))
        self.assertEqual(result.stored["alice@example.test"], [])

    def test_bad_settings(self):
        """Bad settings are refused with the key named."""
        for settings, key in [({"on_failure": "ignore"}, "filters.spamd.on_failure"),
                              ({"junk_score": 5.0, "reject_score": 2.0},
                               "filters.spamd.reject_score"),
                              ({"port": 0}, "filters.spamd.port"),
                              ({"timeout": 0.0}, "filters.spamd.timeout"),
                              ({"junk_folder": "../x"}, "filters.spamd.junk_folder"),
                              ({"port": "783"}, "filters.spamd.port"),
                              ({"hostname": "x"}, "filters.spamd.hostname")]:
            with self.assertRaises(ConfigError) as cm:
                build_filter("spamd", settings)
            self.assertTrue(str(cm.exception).startswith(key + ":"), (settings, cm.exception))

    def test_installed_plugin(self):
        """spamd is found as a plugin and provides the interfaces."""
        self.assertIs(installed_factories()["spamd"], spamd)
        verifyObject(IFilterFactory, spamd)
        verifyObject(IFilter, spamd.build({}))


class SpamdProtocolTests(unittest.TestCase):
    """The spamc protocol on a StringTransport: answers in pieces, broken answers."""

    def connect(self, message=b"Subject: x\r\n\r\nbody\r\n"):
        proto = SpamdProtocol(message)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_request(self):
        """The request is the command line, Content-length, a blank line, the message."""
        _proto, transport = self.connect(b"abc")
        self.assertEqual(transport.value(), b"SYMBOLS SPAMC/1.5\r\nContent-length: 3\r\n\r\nabc")

    def test_answer_in_pieces(self):
        """An answer arriving byte by byte gives the score, threshold and symbols."""
        proto, transport = self.connect()
        answer = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: True ; 6.5 / 5.0\r\n\r\nAAA,B_B,C"
        for i in range(len(answer)):
            self.assertNoResult(proto.finished)
            proto.dataReceived(answer[i:i + 1])
        result = self.successResultOf(proto.finished)
        self.assertEqual((result.score, result.threshold, result.symbols),
                         (6.5, 5.0, ("AAA", "B_B", "C")))
        self.assertTrue(transport.disconnecting)

    def test_truncated_answer(self):
        """A connection closed before Content-length bytes came is an error."""
        proto, _ = self.connect()
        proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 20\r\n"
                           b"Spam: False ; 1.0 / 5.0\r\n\r\nAB")
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(proto.finished, ScannerError)

    def test_not_spamd(self):
        """Something that is not spamd (an HTTP server, say) is an error at once."""
        proto, _ = self.connect()
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        failure = self.failureResultOf(proto.finished, ScannerError)
        self.assertIn("not a spamd answer", str(failure.value))

    def test_bad_spam_header(self):
        """A Spam header without a score is an error, not a zero score."""
        proto, _ = self.connect()
        proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: maybe\r\n\r\n")
        self.failureResultOf(proto.finished, ScannerError)


def start_spamd(testcase) -> tuple[subprocess.Popen, int, Path]:
    """Start the real spamd on 127.0.0.1 with local tests only: (process, port, log)."""
    path = shutil.which("spamd") or next(
        (p for p in ("/usr/sbin/spamd", "/usr/bin/spamd") if os.path.exists(p)), None)
    if path is None:
        raise unittest.SkipTest("spamd is not installed (Debian package spamd; "
                                ".ci/run installs it)")
    home = Path(testcase.mktemp()).resolve()
    home.mkdir(parents=True)
    home.chmod(0o777)                  # spamd runs as nobody when we are root
    home.parent.chmod(0o755)           # mkdtemp's 0700
    port = free_port()
    args = [path, "-L", "-x", f"--listen=127.0.0.1:{port}", "--max-children=1",
            "--min-children=1", "--syslog=stderr", f"-H{home}",
            f"--pidfile={home / 'spamd.pid'}"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    process = spawn_daemon(testcase, args, home / "spamd.log", stop_wait=10)
    return process, port, home / "spamd.log"


def spawn_daemon(testcase, args: list[str], log_path: Path,
                 stop_wait: float) -> subprocess.Popen:
    """Start a real scanner daemon logging to *log_path*; the cleanup stops it
    (terminate, then kill after *stop_wait* seconds) and closes the log."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the cleanup
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def stop():
        process.terminate()
        try:
            process.wait(stop_wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    testcase.addCleanup(stop)
    return process


class RealSpamdTests(SpamdTestMixin, unittest.TestCase):
    """Against SpamAssassin's own spamd (GTUBE scores 1000)."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        process, self.fake_port, log_path = start_spamd(self)
        for _ in range(600):
            if process.poll() is not None:
                self.fail(f"spamd exited: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.fake_port), timeout=1):
                    break
            except OSError:
                yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"spamd did not start: {log_path.read_text()[-2000:]}")

    @defer.inlineCallbacks
    def test_gtube_junk_and_reject(self):
        """GTUBE goes to Junk with spamd's symbols; with reject_score it is refused."""
        message = (b"From: Bob <bob@sender.test>\r\nTo: alice@example.test\r\n"
                   b"Subject: test\r\n\r\n" + GTUBE + b"\r\n")
        server = yield self.server(timeout=60.0)
        result = yield server.send(message)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "Junk")
        content = crlf(stored.content)
        self.assertEqual(header_values(content, "X-Spam-Flag"), ["YES"])
        self.assertIn("GTUBE", header_values(content, "X-Spam-Status")[0])
        self.assertGreaterEqual(float(header_values(content, "X-Spam-Score")[0]), 900)

        server = yield self.server(timeout=60.0, reject_score=500.0)
        result = yield server.send(message)
        self.assertEqual((result.code, result.enhanced), (550, "5.7.1"))

    @defer.inlineCallbacks
    def test_ham(self):
        """An ordinary message gets X-Spam-Status: No from spamd and stays in the INBOX."""
        message = (b"From: Bob <bob@sender.test>\r\nTo: Alice <alice@example.test>\r\n"
                   b"Subject: lunch tomorrow\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
                   b"Message-ID: <lunch.1@sender.test>\r\n\r\nHi Alice,\r\n\r\n"
                   b"shall we have lunch tomorrow at noon? The usual place.\r\n\r\nBob\r\n")
        server = yield self.server(timeout=60.0)
        result = yield server.send(message)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(stored.folder, "INBOX")
        content = crlf(stored.content)
        self.assertTrue(header_values(content, "X-Spam-Status")[0].startswith("No, score="))
        self.assertEqual(header_values(content, "X-Spam-Flag"), [])
