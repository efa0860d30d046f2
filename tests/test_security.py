"""Issue 6, security and durability: the protections already in place, by item.

Only what the protocol test modules do not already cover (docs/security.md
lists where each item is tested). Real service on 127.0.0.1, real or raw
clients.
"""

from __future__ import annotations

import base64
import poplib
import smtplib
import socket

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist import auth as auth_module
from tests.support import (DOMAIN, PASSWORD, ServerMixin, client_tls_context, read_some,
                           record_peak)

SMUGGLING_ENDINGS = (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n",
                     b"\r\n\x00.\r\n", b"\n.\r")

RELAY_TESTS = (
    f"user%other.test@{DOMAIN}",
    f'"user@other.test"@{DOMAIN}',
    f"@{DOMAIN}:user@other.test",
    f"user@other.test@{DOMAIN}",
    f"other.test!user@{DOMAIN}",
    "user@[127.0.0.1]",
    "user@other.test",
)


def smtp_session(port: int, wire: bytes, wait: float = 0.5) -> bytes:
    """Send *wire* (pipelined) after the greeting; all replies until quiet or closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = bytearray(read_some(sock, 0.3))
        sock.sendall(wire)
        received += read_some(sock, wait)
        return bytes(received)


def read_final_reply(sock: socket.socket) -> bytes:
    """Everything up to and including the first final (non-334) SMTP reply line."""
    data = bytearray()
    sock.settimeout(10)
    while not any(line[:3].isdigit() and line[3:4] == b" " and line[:3] != b"334"
                  for line in bytes(data).split(b"\r\n")[:-1]):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def reply_lines(data: bytes) -> list[bytes]:
    """The last line of every reply (code + space)."""
    return [line for line in data.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]


class SmugglingTests(ServerMixin, unittest.TestCase):
    """Item 8: SMTP smuggling."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_no_fake_end_of_data_smuggles_a_second_message(self):
        """Guards item 8 end to end on port 25: after each known fake end-of-data
        (bare LF/CR variants and CRLF NUL . CRLF) a smuggled MAIL/RCPT/DATA stays
        message content: one 354 and one 250 per real message, and nothing for
        the smuggled recipient."""
        wire = b"EHLO c.test\r\n"
        for ending in SMUGGLING_ENDINGS:
            wire += (b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                     b"Subject: real\r\n\r\nbody" + ending
                     + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
                       b"DATA\r\nSubject: smuggled\r\n\r\nhi\r\n.\r\n")
        wire += b"QUIT\r\n"
        data = yield self.in_thread(smtp_session, self.port("smtp"), wire)
        codes = [line[:3] for line in reply_lines(data)]
        n = len(SMUGGLING_ENDINGS)
        self.assertEqual(codes, [b"220", b"250"] + [b"250", b"250", b"354", b"250"] * n
                         + [b"221"])
        self.assertEqual(self.maildir_files(f"bob@{DOMAIN}"), [])
        messages = [p.read_bytes() for p in self.maildir_files(f"alice@{DOMAIN}")]
        self.assertEqual(len(messages), n)
        for message in messages:
            self.assertIn(b"Subject: smuggled", message)


class OpenRelayTests(ServerMixin, unittest.TestCase):
    """Item 10: no open relay, whatever the address form."""

    def setUp(self):
        d = self.start_server()
        d.addCallback(lambda _: self.directory.add_alias(f"@{DOMAIN}", [f"bob@{DOMAIN}"]))
        return d

    def queued(self) -> list[str]:
        queue = self.data_dir / "queue"
        return sorted(p.name for p in queue.rglob("*") if p.is_file()) if queue.exists() else []

    def try_relay(self, port: int, rcpt: str) -> tuple[int, int | None]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("c.test")
            mail, _ = client.mail("s@remote.test")
            code, _ = client.rcpt(f"<{rcpt}>")
            sent = None
            if code == 250:
                sent, _ = client.data(b"Subject: relay test\r\n\r\nx\r\n")
            return (mail, code) if mail != 250 else (code, sent)

    @defer.inlineCallbacks
    def test_relay_test_addresses_are_refused_or_stay_local(self):
        """Guards item 10 on port 25 and on unauthenticated 587: the classic
        relay-test forms (percent hack, quoted @, source route, double @, bang
        path, address literal) are refused or delivered to a local mailbox (here
        the catch-all), and nothing ever reaches the outbound queue."""
        results = {}
        for role in ("smtp", "submission"):
            for rcpt in RELAY_TESTS:
                results[role, rcpt] = yield self.in_thread(self.try_relay, self.port(role), rcpt)
        for (role, rcpt), (code, sent) in results.items():
            if role == "submission":
                self.assertEqual(code, 530, rcpt)
            elif code == 250:
                self.assertEqual(sent, 250, rcpt)
            else:
                self.assertEqual(code // 100, 5, (rcpt, code))
        self.assertEqual(results["smtp", f"@{DOMAIN}:user@other.test"][0], 554)
        self.assertEqual(results["smtp", "user@[127.0.0.1]"][0], 554)
        self.assertEqual(self.queued(), [])
        local = [p.read_bytes() for p in self.maildir_files(f"bob@{DOMAIN}")]
        accepted = [rcpt for (role, rcpt), (code, _) in results.items() if code == 250]
        self.assertEqual(len(local), len(accepted))


class EnumerationTests(ServerMixin, unittest.TestCase):
    """Item 15: no user enumeration."""

    def setUp(self):
        # Sixteen failed logins from one address: above the throttle's default block.
        d = self.start_server(auth={"max_failures": 1000})
        d.addCallback(lambda _: self.directory.add_account(f"off@{DOMAIN}", PASSWORD))
        d.addCallback(lambda _: self.directory.set_account_enabled(f"off@{DOMAIN}", False))
        return d

    @defer.inlineCallbacks
    def test_vrfy_same_for_known_and_unknown_expn_refused(self):
        """Guards item 15 for VRFY/EXPN: VRFY answers 252 alike for an account and
        a non-existent address, and EXPN is refused, on every SMTP port."""
        for role in ("smtp", "submission"):
            data = yield self.in_thread(smtp_session, self.port(role),
                                        b"EHLO c.test\r\nVRFY alice@example.test\r\n"
                                        b"VRFY nobody@example.test\r\nVRFY alice\r\n"
                                        b"EXPN alice@example.test\r\nQUIT\r\n")
            lines = reply_lines(data)
            self.assertEqual(lines[2], lines[3])
            self.assertEqual(lines[2], lines[4])
            self.assertTrue(lines[2].startswith(b"252 "), lines[2])
            self.assertTrue(lines[5].startswith(b"502 "), lines[5])

    def smtp_auth(self, user: str, password: str, mechanism: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port("submissions")), timeout=10) as s:
            sock = client_tls_context().wrap_socket(s)
            read_some(sock, 0.2)
            sock.sendall(b"EHLO c.test\r\n")
            read_some(sock, 0.2)
            if mechanism == "PLAIN":
                token = base64.b64encode(f"\0{user}\0{password}".encode())
                sock.sendall(b"AUTH PLAIN " + token + b"\r\n")
            else:
                sock.sendall(b"AUTH LOGIN\r\n" + base64.b64encode(user.encode()) + b"\r\n"
                             + base64.b64encode(password.encode()) + b"\r\n")
            return read_final_reply(sock)

    def pop3_auth(self, user: str, password: str, mechanism: str) -> bytes:
        client = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), timeout=10,
                                 context=client_tls_context())
        try:
            if mechanism == "USER":
                client._putcmd(f"USER {user}")
                user_reply = client._getline()[0]
                client._putcmd(f"PASS {password}")
                return user_reply + b"|" + client._getline()[0]
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            client._putcmd(f"AUTH PLAIN {token}")
            return client._getline()[0]
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_unknown_disabled_and_wrong_password_replies_identical(self):
        """Guards item 15 for logins: an unknown user, a disabled account and a
        wrong password get byte-identical replies in SMTP AUTH (PLAIN, LOGIN)
        and POP3 (USER/PASS, AUTH PLAIN)."""
        cases = [(f"alice@{DOMAIN}", "wrong"), (f"nobody@{DOMAIN}", "wrong"),
                 (f"off@{DOMAIN}", PASSWORD), ("nobody@nowhere.test", "wrong")]
        for mechanism in ("PLAIN", "LOGIN"):
            replies = []
            for user, password in cases:
                replies.append((yield self.in_thread(self.smtp_auth, user, password, mechanism)))
            self.assertEqual(len(set(replies)), 1, replies)
            self.assertIn(b"535 5.7.8 ", replies[0])
        for mechanism in ("USER", "PLAIN"):
            replies = []
            for user, password in cases:
                replies.append((yield self.in_thread(self.pop3_auth, user, password, mechanism)))
            self.assertEqual(len(set(replies)), 1, replies)
            self.assertTrue(replies[0].endswith(b"-ERR [AUTH] Authentication failed."),
                            replies[0])


    @defer.inlineCallbacks
    def test_unknown_and_disabled_users_cost_the_same_bcrypt_work(self):
        """Guards item 15's equal timing without measuring time: every failed
        login (wrong password, unknown user, disabled account) runs exactly one
        bcrypt check at the cost of the real accounts' hashes, so none answers
        sooner (a dummy hash of another cost would tell unknown users apart)."""
        checked: list[bytes] = []
        real_check = auth_module.check_password

        def counting_check(password: str, password_hash: bytes) -> bool:
            checked.append(password_hash[:7])
            return real_check(password, password_hash)

        self.patch(auth_module, "check_password", counting_check)
        cost = self.directory.get_account(f"alice@{DOMAIN}").password_hash[:7]
        cases = [(f"alice@{DOMAIN}", "wrong"), (f"nobody@{DOMAIN}", "wrong"),
                 (f"off@{DOMAIN}", PASSWORD), ("nobody@nowhere.test", "wrong")]
        for user, password in cases:
            checked.clear()
            reply = yield self.in_thread(self.smtp_auth, user, password, "PLAIN")
            self.assertIn(b"535 5.7.8 ", reply)
            self.assertEqual(checked, [cost], user)
            checked.clear()
            reply = yield self.in_thread(self.pop3_auth, user, password, "PLAIN")
            self.assertTrue(reply.endswith(b"Authentication failed."), reply)
            self.assertEqual(checked, [cost], user)

class CommandFloodTests(ServerMixin, unittest.TestCase):
    """Item 11 (SMTP and POP3): megabytes without a line end in command mode."""

    def setUp(self):
        return self.start_server()

    def record_peak(self, role: str, measure) -> list[int]:
        """Wrap the listener's sessions so every dataReceived records *measure(session)*."""
        return record_peak(self.server.listeners[role][0].factory, measure)

    @staticmethod
    def flood(port: int, size: int, after: bytes) -> tuple[bytes, bool]:
        """Greeting, *size* bytes of 'x', then *after*; replies and whether the server closed."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            received = bytearray(read_some(sock, 0.3))
            chunk = b"x" * 65536
            try:
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(after)
                received += read_some(sock, 0.5)
            except OSError:
                return bytes(received), True
            try:
                sock.sendall(b"NOOP\r\n")
                more = read_some(sock, 0.5)
            except OSError:
                return bytes(received), True
            received += more
            return bytes(received), not more

    @defer.inlineCallbacks
    def test_smtp_overlong_line_is_refused_and_the_session_goes_on(self):
        """Guards item 11 for SMTP: a 100 KB command line is skipped with the
        framer's buffer never above the command limit, answered 500 5.5.2 once
        the line ends, and the session goes on."""
        peaks = self.record_peak("smtp", lambda s: s.framer.buffered)
        data, closed = yield self.in_thread(self.flood, self.port("smtp"), 100 * 1024,
                                            b"\r\nEHLO c.test\r\n")
        self.assertFalse(closed)
        self.assertEqual([line[:9] for line in reply_lines(data)],
                         [b"220 mx.ex", b"500 5.5.2", b"250 SMTPU", b"250 2.0.0"])
        self.assertTrue(peaks)
        self.assertLessEqual(max(peaks), self.config.smtp.max_command_line + 2)

    @defer.inlineCallbacks
    def test_smtp_five_megabytes_without_crlf(self):
        """Guards item 11 for SMTP: megabytes without a line end end the session
        with 421 after 1 MiB, the buffer bounded by the command limit throughout."""
        peaks = self.record_peak("smtp", lambda s: s.framer.buffered)
        data, closed = yield self.in_thread(self.flood, self.port("smtp"), 5 * 1024 * 1024,
                                            b"\r\nEHLO c.test\r\n")
        self.assertTrue(closed)  # the 421 itself is lost to the RST of unread input
        self.assertNotIn(b"250 ", data)
        self.assertLessEqual(max(peaks), self.config.smtp.max_command_line + 2)

    @defer.inlineCallbacks
    def test_pop3_five_megabytes_without_crlf(self):
        """Guards item 11 for POP3: 5 MB without a line end ends the session
        ("Line too long") with the line buffer bounded by one read past the limit."""
        from mailtwist.pop3 import MAX_LINE
        peaks = self.record_peak("pop3", lambda s: len(s.lines))
        data, closed = yield self.in_thread(self.flood, self.port("pop3"), 5 * 1024 * 1024,
                                            b"\r\n")
        self.assertTrue(closed)
        self.assertTrue(data.startswith(b"+OK mailtwist POP3"), data[:100])
        self.assertNotIn(b"+OK\r\n", data[20:])
        self.assertTrue(peaks)
        self.assertLessEqual(max(peaks), MAX_LINE + 2 + 65536)


class PlaintextAuthTests(ServerMixin, unittest.TestCase):
    """Item 6: no credentials over plaintext, loopback included, unless allowed."""

    def setUp(self):
        return self.start_server()

    def exchange(self) -> dict[str, bytes]:
        """What each plaintext listener (reached over 127.0.0.1) says to a client
        trying to log in before TLS."""
        plain = base64.b64encode(f"\0alice@{DOMAIN}\0{PASSWORD}".encode())
        return {
            "smtp": smtp_session(self.port("smtp"), b"EHLO c.test\r\nAUTH PLAIN " + plain
                                 + b"\r\nQUIT\r\n"),
            "submission": smtp_session(self.port("submission"), b"EHLO c.test\r\nAUTH PLAIN "
                                       + plain + b"\r\nQUIT\r\n"),
            "imap": smtp_session(self.port("imap"),
                                 b"a CAPABILITY\r\nb LOGIN alice@" + DOMAIN.encode()
                                 + b' "' + PASSWORD.encode() + b'"\r\nc AUTHENTICATE PLAIN '
                                 + plain + b"\r\nd SELECT INBOX\r\ne LOGOUT\r\n"),
            "pop3": smtp_session(self.port("pop3"),
                                 b"CAPA\r\nUSER alice@" + DOMAIN.encode() + b"\r\nPASS "
                                 + PASSWORD.encode() + b"\r\nAUTH PLAIN " + plain
                                 + b"\r\nSTAT\r\nQUIT\r\n"),
        }

    @defer.inlineCallbacks
    def test_no_password_accepted_before_tls_on_loopback(self):
        """Guards item 6 by default, from 127.0.0.1 (loopback is not exempt): port
        25 offers no AUTH, 587 neither advertises AUTH nor accepts it (538 5.7.11),
        IMAP advertises LOGINDISABLED and refuses LOGIN and AUTHENTICATE with
        [PRIVACYREQUIRED], POP3 lists neither USER nor SASL and refuses USER and
        AUTH with [AUTH]; no session ends up logged in."""
        seen = yield self.in_thread(self.exchange)
        smtp, submission = seen["smtp"], seen["submission"]
        self.assertNotIn(b"AUTH", smtp.split(b"\r\n221")[0].split(b"250 ")[0])
        self.assertTrue(reply_lines(smtp)[2].startswith(b"503 5.5.1"), smtp)
        ehlo = submission.split(b"\r\n538")[0]
        self.assertNotIn(b"AUTH", ehlo.split(b"\r\n", 1)[1])
        self.assertIn(b"538 5.7.11", submission)
        imap = seen["imap"]
        self.assertIn(b"LOGINDISABLED", imap)
        self.assertIn(b"b NO [PRIVACYREQUIRED]", imap)
        self.assertIn(b"c NO [PRIVACYREQUIRED]", imap)
        self.assertIn(b"d BAD", imap)
        pop3 = seen["pop3"]
        capa = pop3.split(b"\r\n.\r\n")[0]
        self.assertNotIn(b"\r\nUSER\r\n", capa)
        self.assertNotIn(b"SASL", capa)
        self.assertIn(b"-ERR [AUTH] Plaintext authentication disallowed", pop3)
        self.assertNotIn(b"+OK Logged in", pop3)
        self.assertNotIn(b"+OK 0 0", pop3)

    @defer.inlineCallbacks
    def test_allow_plaintext_auth_is_explicit(self):
        """Guards that the refusal above is the configuration's doing: with
        allow_plaintext_auth = true the same plaintext logins succeed."""
        yield self.server.stopService()
        yield self.start_server(allow_plaintext_auth=True)
        seen = yield self.in_thread(self.exchange)
        self.assertIn(b"235 2.7.0", seen["submission"])
        self.assertNotIn(b"LOGINDISABLED", seen["imap"])
        self.assertIn(b"b OK", seen["imap"])
        self.assertIn(b"\r\nUSER\r\n", seen["pop3"])
        self.assertIn(b"+OK", seen["pop3"].split(b"PASS")[0])


class SMTPCommandHygieneTests(ServerMixin, unittest.TestCase):
    """Item 9 for SMTP: command lines end in CRLF and hold no other CR or NUL."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_bare_cr_bare_lf_and_nul_commands_are_refused(self):
        """Guards item 9 on port 25: NOOP ending in a bare LF, a command with a
        bare CR or a NUL, and a MAIL joined to RCPT by a bare LF are each
        answered 500 5.5.2 and not run, so the RCPT that follows has no
        transaction and no message can be sent with such lines."""
        data = yield self.in_thread(
            smtp_session, self.port("smtp"),
            b"EHLO c.test\r\nNOOP\nNO\rOP\r\nNO\0OP\r\n"
            b"MAIL FROM:<s@remote.test>\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\nQUIT\r\n")
        codes = [line[:9] for line in reply_lines(data)]
        self.assertEqual(codes, [b"220 mx.ex", b"250 SMTPU", b"500 5.5.2", b"500 5.5.2",
                                 b"500 5.5.2", b"500 5.5.2", b"503 5.5.1", b"503 5.5.1",
                                 b"221 2.0.0"])
