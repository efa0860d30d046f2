"""Issue 6 item 20, "secrets never logged": passwords and SASL blobs stay out of
every log line, right or wrong, on every protocol.

The server runs in-process; every event it emits is captured as twistd's text
log would write it and as the JSON observer would, while real clients log in
(and fail) with smtplib, imaplib and poplib, and raw sockets send the mistakes
real clients make (a SASL blob where a command is expected, a password sent
with a bad command). No password, no base64 of a SASL exchange, may appear.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import smtplib

from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.trial import unittest

from mailtwist.events import event_as_record
from tests.support import (
    DOMAIN,
    PASSWORD,
    ServerMixin,
    client_tls_context,
    raw_exchange,
)

ALICE = f"alice@{DOMAIN}"
WRONG = "Wrong-Secret-Guess-42"


class SecretsNotLoggedTests(ServerMixin, unittest.TestCase):
    """Every protocol's logins, good and bad, leave no secret in the logs."""

    def setUp(self):
        self.lines: list[str] = []

        def observe(event) -> None:
            self.lines.append(formatEventAsClassicLogText(event) or "")
            self.lines.append(json.dumps(event_as_record(event), default=str))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return self.start_server(auth={"failure_delay": 0, "max_failures": 1000})

    def secrets(self) -> list[str]:
        """The passwords and the base64 forms a SASL exchange carries them in."""
        found = [PASSWORD, WRONG]
        for password in (PASSWORD, WRONG):
            found.append(base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode())
            found.append(base64.b64encode(password.encode()).decode())
        return found

    def logins(self) -> None:
        for password in (WRONG, PASSWORD):
            for method in ("PLAIN", "LOGIN"):
                with smtplib.SMTP_SSL("127.0.0.1", self.port("submissions"), timeout=10,
                                      context=client_tls_context()) as client:
                    client.ehlo("c.test")
                    try:
                        client.login(ALICE, password, initial_response_ok=method == "PLAIN")
                    except smtplib.SMTPAuthenticationError:
                        pass
            imap = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                                     ssl_context=client_tls_context(), timeout=10)
            try:
                imap.login(ALICE, password)
            except imaplib.IMAP4.error:
                pass
            try:
                imap.authenticate("PLAIN", lambda _, p=password: f"\0{ALICE}\0{p}".encode())
            except imaplib.IMAP4.error:
                pass
            imap.logout()
            pop = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), timeout=10,
                                  context=client_tls_context())
            try:
                pop.user(ALICE)
                pop.pass_(password)
            except poplib.error_proto:
                pass
            pop.quit()
        blob = base64.b64encode(f"\0{ALICE}\0{WRONG}".encode())
        # Blobs and passwords where the server expects a command, and a
        # password in a command the server rejects.
        raw_exchange(self.port("smtp"), [b"EHLO c.test\r\n", blob + b"\r\n",
                                         b"AUTH PLAIN " + blob + b"\r\n",
                                         f"NOOP {WRONG}\r\n".encode()])
        raw_exchange(self.port("submission"), [b"EHLO c.test\r\n",
                                               b"AUTH PLAIN " + blob + b"\r\n"])
        raw_exchange(self.port("imap"), [b"a " + blob + b"\r\n",
                                         f"b LOGIN {ALICE} {WRONG}\r\n".encode(),
                                         f"c LOGIN {ALICE} {WRONG} extra\r\n".encode()])
        raw_exchange(self.port("pop3"), [f"USER {ALICE}\r\n".encode(),
                                         f"PASS {WRONG}\r\n".encode(), blob + b"\r\n"])

    def test_no_password_or_sasl_blob_in_any_log_line(self):
        """Guards item 20's "secrets never logged": after good and bad logins over
        SMTP AUTH (PLAIN, LOGIN), IMAP (LOGIN, AUTHENTICATE), POP3 (USER/PASS) and
        misplaced secrets on the plaintext ports, no log line (text or JSON)
        contains a password or its base64; the login events are there."""
        d = self.in_thread(self.logins)

        def check(_):
            text = "\n".join(self.lines)
            self.assertIn('"event_kind": "login"', text)
            self.assertIn(ALICE, text)
            for secret in self.secrets():
                self.assertNotIn(secret, text)
        return d.addCallback(check)
