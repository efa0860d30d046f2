"""Structured log events (mailtwist/events.py): one per SMTP transaction,
delivery attempt, login and filter verdict; JSON output; no secrets in logs."""

from __future__ import annotations

import base64
import imaplib
import io
import json
import os
import poplib
import smtplib
import stat
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist import events
from mailtwist.config import QueueSettings
from mailtwist.filters.chain import FilterChain
from mailtwist.interfaces import CONTINUE, FilterSession, Reject
from mailtwist.outbound.client import Outcome
from mailtwist.queue.runner import QueueRunner
from mailtwist.queue.spool import Spool
from tests.support import DOMAIN, PASSWORD, ServerMixin, client_tls_context
from tests.test_queue import MESSAGE, FakeTransport, NoticeSink, envelope

SECRET = "Sup3r-secret wrong p4ssword"


class CaptureMixin:
    """Every log event of the test, as events and as the JSON observer's output."""

    def capture(self) -> None:
        self.events: list[dict] = []
        self.json_out = io.StringIO()
        observer = events.JSONObserver(self.json_out)
        verifyObject(ILogObserver, observer)

        def collect(event: dict) -> None:
            self.events.append(event)
            observer(event)

        globalLogPublisher.addObserver(collect)
        self.addCleanup(globalLogPublisher.removeObserver, collect)

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event_kind") == kind]

    def json_records(self) -> list[dict]:
        return [json.loads(line) for line in self.json_out.getvalue().splitlines()]


class RealServerTests(CaptureMixin, ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_transaction_and_logins_are_events_without_secrets(self):
        """One smtp.transaction event per message and one login event per login
        decision (SMTP, IMAP, POP3); no password or AUTH blob anywhere in the logs."""
        self.capture()
        yield self.start_server()
        submission, imap, pop3 = self.port("submission"), self.port("imap"), self.port("pop3")
        user = f"alice@{DOMAIN}"

        def client() -> str:
            with smtplib.SMTP("127.0.0.1", submission, timeout=10) as smtp:
                smtp.ehlo("client.example.test")
                smtp.starttls(context=client_tls_context())
                smtp.ehlo("client.example.test")
                smtp.user, smtp.password = user, SECRET
                with self.assertRaises(smtplib.SMTPAuthenticationError):
                    smtp.auth("PLAIN", smtp.auth_plain)
                smtp.login(user, PASSWORD)
                smtp.sendmail(user, [f"bob@{DOMAIN}"],
                              b"Subject: hi\r\n\r\nhello\r\n")
                reply = smtp.noop()
            with imaplib.IMAP4("127.0.0.1", imap, timeout=10) as client:
                client.starttls(ssl_context=client_tls_context())
                with self.assertRaises(imaplib.IMAP4.error):
                    client.login(user, SECRET)
            pop = poplib.POP3("127.0.0.1", pop3, timeout=10)
            pop.stls(context=client_tls_context())
            pop.user(user)
            with self.assertRaises(poplib.error_proto):
                pop.pass_(SECRET)
            pop.quit()
            return str(reply)

        yield self.in_thread(client)

        [txn] = self.of_kind("smtp.transaction")
        self.assertEqual(
            {k: txn[k] for k in ("role", "peer", "helo", "sender", "recipients", "tls",
                                 "user", "code", "enhanced", "result")},
            {"role": "submission", "peer": "127.0.0.1", "helo": "client.example.test",
             "sender": user, "recipients": 1, "tls": True, "user": user, "code": 250,
             "enhanced": "2.0.0", "result": "accepted"})
        self.assertEqual(txn["size"], len(b"Subject: hi\r\n\r\nhello\r\n"))
        self.assertRegex(txn["queue_id"], "^[0-9A-F]{12}$")
        self.assertEqual(len(self.maildir_files(f"bob@{DOMAIN}")), 1)
        self.assertIn(txn["queue_id"].encode(), self.maildir_files(f"bob@{DOMAIN}")[0]
                      .read_bytes())

        logins = [(e["protocol"], e["user"], e["result"], e["peer"])
                  for e in self.of_kind("login")]
        self.assertEqual(logins, [("smtp", user, "failure", "127.0.0.1"),
                                  ("smtp", user, "success", "127.0.0.1"),
                                  ("imap", user, "failure", "127.0.0.1"),
                                  ("pop3", user, "failure", "127.0.0.1")])

        records = self.json_records()
        self.assertEqual(len(records), len(self.events))
        [json_txn] = [r for r in records if r.get("event_kind") == "smtp.transaction"]
        self.assertEqual(set(json_txn) - {"time", "level", "namespace", "message", "event_kind"},
                         set(events.FIELDS["smtp.transaction"]))
        self.assertEqual(json_txn["queue_id"], txn["queue_id"])

        everything = "\n".join([self.json_out.getvalue()]
                               + [formatEvent(e) + repr(e) for e in self.events])
        blobs = [SECRET, PASSWORD,
                 base64.b64encode(f"\0{user}\0{SECRET}".encode()).decode(),
                 base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode(),
                 base64.b64encode(SECRET.encode()).decode(),
                 base64.b64encode(PASSWORD.encode()).decode()]
        for blob in blobs:
            self.assertNotIn(blob, everything)

    @defer.inlineCallbacks
    def test_refused_transaction_is_an_event(self):
        """A message refused at the end of DATA (too big) still gets its event, with the
        refusal code."""
        self.capture()
        yield self.start_server(smtp={"max_message_size": 100})
        port = self.port("smtp")

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("sender.example.net")
                smtp.esmtp_features.pop("size", None)  # so the refusal comes after DATA
                with self.assertRaises(smtplib.SMTPDataError):
                    smtp.sendmail("x@example.net", [f"bob@{DOMAIN}"], b"x" * 500 + b"\r\n")

        yield self.in_thread(client)
        [txn] = self.of_kind("smtp.transaction")
        self.assertEqual((txn["role"], txn["code"], txn["enhanced"], txn["result"],
                          txn["queue_id"], txn["user"], txn["tls"]),
                         ("smtp", 552, "5.3.4", "rejected", None, None, False))


class FilterVerdictTests(CaptureMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_non_continue_verdicts_are_events(self):
        """A Reject is logged with the filter's name, stage and code; Continue is not."""
        self.capture()

        class Passes:
            name = "passes"

            def mail_from(self, session, sender):
                return CONTINUE

        class Refuses:
            name = "refuses"

            def mail_from(self, session, sender):
                return Reject("no thanks", 554, "5.7.1")

        session = FilterSession(role="smtp", peer_host="192.0.2.7")
        session.queue_id = "Q1"
        chain = FilterChain([Passes(), Refuses()], clock=task.Clock())
        result = yield chain.run("mail", session, "someone@example.net")
        self.assertTrue(result.refused)
        [event] = self.of_kind("filter.verdict")
        self.assertEqual({k: event[k] for k in events.FIELDS["filter.verdict"]},
                         {"filter": "refuses", "stage": "mail", "verdict": "Reject",
                          "code": 554, "enhanced": "5.7.1", "queue_id": "Q1",
                          "peer": "192.0.2.7", "role": "smtp"})


class DeliveryAttemptTests(CaptureMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_each_attempt_is_an_event(self):
        """Every outbound attempt per recipient is one delivery.attempt event."""
        self.capture()
        clock = task.Clock()
        clock.advance(1000)
        spool = Spool(Path(self.mktemp()))
        transport = FakeTransport()
        transport.outcomes = [Outcome("delivered", 250, "2.0.0", "250 ok", "mx.remote.test")]
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-events")
        runner = QueueRunner(spool, QueueSettings(), transport, NoticeSink(),
                             "mx.example.test", reactor, pool, clock=clock)
        spool.enqueue(MESSAGE, envelope())
        runner.startService()
        self.addCleanup(runner.stopService)
        yield runner.idle()
        clock.advance(0)
        yield runner.idle()
        [event] = self.of_kind("delivery.attempt")
        self.assertEqual({k: event[k] for k in events.FIELDS["delivery.attempt"]},
                         {"queue_id": "ABC123", "recipient": "x@remote.test",
                          "relay": "mx.remote.test", "status": "delivered", "code": 250,
                          "enhanced": "2.0.0", "text": "250 ok", "attempt": 1,
                          "size": len(MESSAGE), "age": event["age"]})
        self.assertGreaterEqual(event["age"], 0.0)


class JSONObserverTests(unittest.TestCase):
    def test_record_shape_failures_and_secret_fields(self):
        """The JSON record has time, level, message, the kind's fields and a failure's
        traceback; other fields an event carries (a password, say) are not written."""
        out = io.StringIO()
        observer = events.JSONObserver(out)
        from twisted.logger import Logger

        log = Logger(namespace="mailtwist.test", observer=observer)
        log.info("hello {who}", who="world", password="hunter2", relay_secret="x")
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            log.failure("it broke")
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((first["level"], first["namespace"], first["message"]),
                         ("info", "mailtwist.test", "hello world"))
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertNotIn("hunter2", out.getvalue())
        self.assertEqual(set(first), {"time", "level", "namespace", "message"})
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["failure"])

    def test_factory_for_twistd_logger(self):
        """``--logger mailtwist.events.json_observer`` writes to $MAILTWIST_JSON_LOG,
        created private (0600), or to stdout."""
        path = Path(self.mktemp())
        os.environ["MAILTWIST_JSON_LOG"] = str(path)
        self.addCleanup(os.environ.pop, "MAILTWIST_JSON_LOG", None)
        observer = events.json_observer()
        self.addCleanup(observer.out.close)
        events.login(protocol="imap", peer="192.0.2.1", user="a@b.test", result="failure")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        observer({"log_format": "x {n}", "n": 1, "log_time": 0.0,
                  "event_kind": "login", "protocol": "pop3", "peer": "p", "user": "u",
                  "result": "success"})
        [record] = [json.loads(line) for line in path.read_text().splitlines()]
        self.assertEqual((record["event_kind"], record["protocol"], record["message"]),
                         ("login", "pop3", "x 1"))
        os.environ.pop("MAILTWIST_JSON_LOG")
        import sys

        self.assertIs(events.json_observer().out, sys.stdout)


class LogFormatOptionTests(unittest.TestCase):
    """``twistd mailtwist --log-format json``: JSON lines chosen by the server's own
    option, where twistd's text log would go."""

    def parse(self, *argv: str):
        from twisted.scripts.twistd import ServerOptions

        self.patch(events, "_json_log_target", events._json_log_target)
        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    def test_option_sets_twistds_observer(self):
        """json becomes twistd's --logger, writing to --logfile (created 0600);
        text (the default) leaves twistd's own observer alone."""
        self.assertIsNone(self.parse("-n", "mailtwist")["logger"])
        path = Path(self.mktemp())
        config = self.parse("--logfile", str(path), "mailtwist", "--log-format", "json")
        observer = config["logger"]()
        self.addCleanup(observer.out.close)
        observer({"log_format": "hello {who}", "who": "json", "log_time": 0.0})
        self.assertEqual(json.loads(path.read_text())["message"], "hello json")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        import sys

        config = self.parse("-n", "mailtwist", "--log-format", "json")
        self.assertIs(config["logger"]().out, sys.stdout)

    def test_bad_value_and_conflict_are_usage_errors(self):
        """An unknown format, or json together with twistd's --logger, is refused."""
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as caught:
            self.parse("-n", "mailtwist", "--log-format", "xml")
        self.assertIn("--log-format: expected text or json, got 'xml'", str(caught.exception))
        with self.assertRaises(UsageError) as caught:
            self.parse("-n", "--logger", "mailtwist.events.json_observer", "mailtwist",
                       "--log-format", "json")
        self.assertIn("give one of them", str(caught.exception))

    def test_running_server_writes_json_without_secrets(self):
        """A real twistd with --log-format json: every line of the log is JSON, a
        transaction and a failed and a good login are events, no password is in it."""
        import subprocess
        import sys
        import time

        from mailtwist.cli import main

        base = Path(self.mktemp()).resolve()
        base.mkdir()
        data = base / "data"
        data.mkdir(mode=0o700)
        quiet = io.StringIO()
        from contextlib import redirect_stdout

        with redirect_stdout(quiet):
            self.assertEqual(main(["--data-dir", str(data), "domain", "add", DOMAIN]), 0)
            self.patch(sys, "stdin", io.StringIO(PASSWORD + "\n"))
            self.assertEqual(main(["--data-dir", str(data), "user", "add", f"bob@{DOMAIN}",
                                   "--password-stdin"]), 0)
        log_path = base / "mailtwist.jsonl"
        root = Path(__file__).resolve().parent.parent
        args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", str(log_path), "mailtwist",
                "--log-format", "json", "--data-dir", str(data), "--allow-plaintext-auth",
                "--smtp", "tcp:0:interface=127.0.0.1", "--pop3", "tcp:0:interface=127.0.0.1"]
        for role in ("submission", "submissions", "imap", "imaps", "pop3s"):
            args += [f"--{role}", "none"]
        proc = subprocess.Popen(args, cwd=base, env=dict(os.environ, PYTHONPATH=str(root)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)

        def records() -> list[dict]:
            text = log_path.read_text() if log_path.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        ports: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(ports) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            for record in records():
                if " listening on " in record["message"]:
                    role = record["message"].split()[0]
                    ports[role] = int(record["message"].rsplit(":", 1)[1].rstrip(")"))
        self.assertEqual(set(ports), {"smtp", "pop3"}, log_path.read_text())

        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
            client.sendmail("carol@remote.example", [f"bob@{DOMAIN}"],
                            b"Subject: json\r\n\r\nhi\r\n")
        for password in (SECRET, PASSWORD):
            pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
            try:
                pop.user(f"bob@{DOMAIN}")
                pop.pass_(password)
            except poplib.error_proto:
                pass
            pop.quit()

        wanted = {("smtp.transaction", "accepted"), ("login", "failure"),
                  ("login", "success")}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = {(r.get("event_kind"), r.get("result")) for r in records()}
            if wanted <= seen:
                break
            time.sleep(0.1)
        self.assertLessEqual(wanted, seen, log_path.read_text())
        text = log_path.read_text()
        self.assertNotIn(SECRET, text)
        self.assertNotIn(PASSWORD, text)
