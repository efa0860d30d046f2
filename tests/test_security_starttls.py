"""Issue 6 item 5: STARTTLS/STLS command injection and session reset.

Plaintext pipelined behind STARTTLS (SMTP, IMAP) or STLS (POP3) must be
thrown away, not run inside the encrypted session (CVE-2011-0411 and the
2021 "NO STARTTLS" family); whatever the client said in plaintext (HELO, an
open transaction, a POP3 USER) is forgotten; a second STARTTLS is refused.
Real listeners on 127.0.0.1, raw sockets upgraded with Python's ssl.
"""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.trial import unittest

from tests.imap_support import RawIMAP
from tests.support import (DOMAIN, PASSWORD, ServerMixin, client_tls_context, read_line,
                           read_some)

ALICE = f"alice@{DOMAIN}"


def read_reply(sock: socket.socket) -> bytes:
    """One complete SMTP reply (all its lines), read byte by byte."""
    data = bytearray()
    while True:
        line = read_line(sock)
        data += line
        if not line.endswith(b"\r\n") or line[3:4] == b" ":
            return bytes(data)


class SMTPStartTLSTests(ServerMixin, unittest.TestCase):
    """SMTP STARTTLS on port 25."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_pipelined_commands_after_starttls_are_discarded(self):
        """Guards the discarding of plaintext pipelined after STARTTLS (SMTP).

        EHLO and MAIL pipelined behind STARTTLS would, if run inside TLS, let
        the RCPT sent after the handshake succeed; discarded, RCPT is 503.
        """
        def talk():
            with socket.create_connection(("127.0.0.1", self.port("smtp")), timeout=10) as sock:
                read_reply(sock)
                sock.sendall(b"EHLO c.test\r\n")
                read_reply(sock)
                sock.sendall(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@remote.test>\r\n")
                starttls = read_reply(sock)
                tls = client_tls_context().wrap_socket(sock)
                tls.sendall(f"RCPT TO:<{ALICE}>\r\n".encode())
                after = read_some(tls, 1.0)
                return starttls, after
        starttls, after = yield self.in_thread(talk)
        self.assertTrue(starttls.startswith(b"220 2.0.0"), starttls)
        self.assertTrue(after.startswith(b"503 5.5.1"), after)
        self.assertNotIn(b"250", after)

    @defer.inlineCallbacks
    def test_state_reset_and_second_starttls_refused(self):
        """Guards the reset of HELO and an open transaction by STARTTLS, and the
        refusal (503) of a second STARTTLS inside TLS, which is no longer offered."""
        def talk():
            with socket.create_connection(("127.0.0.1", self.port("smtp")), timeout=10) as sock:
                read_reply(sock)
                replies = []
                for command in (b"EHLO c.test", b"MAIL FROM:<s@remote.test>", b"STARTTLS"):
                    sock.sendall(command + b"\r\n")
                    replies.append(read_reply(sock))
                tls = client_tls_context().wrap_socket(sock)
                for command in (b"MAIL FROM:<s@remote.test>", b"EHLO c.test",
                                f"RCPT TO:<{ALICE}>".encode(), b"STARTTLS", b"QUIT"):
                    tls.sendall(command + b"\r\n")
                    replies.append(read_reply(tls))
                return replies
        replies = yield self.in_thread(talk)
        ehlo, mail, starttls, mail_no_helo, ehlo_tls, rcpt, second, _quit = replies
        self.assertIn(b"STARTTLS", ehlo)
        self.assertTrue(mail.startswith(b"250"), mail)
        self.assertTrue(starttls.startswith(b"220"), starttls)
        self.assertEqual(mail_no_helo, b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.assertTrue(ehlo_tls.startswith(b"250-"), ehlo_tls)
        self.assertNotIn(b"STARTTLS", ehlo_tls)
        self.assertTrue(rcpt.startswith(b"503 5.5.1"), rcpt)
        self.assertTrue(second.startswith(b"503 5.5.1"), second)
        self.assertEqual(self.maildir_files(ALICE), [])


class IMAPStartTLSTests(ServerMixin, unittest.TestCase):
    """IMAP STARTTLS on port 143."""

    def setUp(self):
        return self.start_server()

    def test_pipelined_login_after_starttls_is_discarded(self):
        """Guards the discarding of plaintext pipelined after STARTTLS (IMAP):
        a LOGIN sent in the same packet must not log the session in."""
        def check():
            raw = RawIMAP(self.port("imap"))
            try:
                raw.send(b"a STARTTLS\r\nb LOGIN %s \"%s\"\r\n"
                         % (ALICE.encode(), PASSWORD.encode()))
                self.assertTrue(raw.line().startswith(b"a OK"))
                raw.sock = client_tls_context().wrap_socket(raw.sock)
                reply = raw.command(b"c", b"SELECT INBOX")
                self.assertFalse(any(line.startswith(b"b ") for line in reply), reply)
                self.assertTrue(reply[-1].startswith(b"c BAD"), reply)
            finally:
                raw.close()
        return self.in_thread(check)

    def test_second_starttls_refused(self):
        """Guards the refusal of a second STARTTLS (IMAP: BAD) and that the
        capabilities after TLS no longer offer STARTTLS or forbid LOGIN."""
        def check():
            raw = RawIMAP(self.port("imap"))
            try:
                before = raw.command(b"a", b"CAPABILITY")
                self.assertIn(b"STARTTLS", before[0])
                self.assertIn(b"LOGINDISABLED", before[0])
                raw.starttls()
                caps = raw.command(b"b", b"CAPABILITY")
                self.assertNotIn(b"STARTTLS", caps[0])
                self.assertNotIn(b"LOGINDISABLED", caps[0])
                second = raw.command(b"c", b"STARTTLS")
                self.assertEqual(second, [b"c BAD TLS is already active."])
                login = raw.command(b"d", b'LOGIN %s "%s"' % (ALICE.encode(), PASSWORD.encode()))
                self.assertTrue(login[-1].startswith(b"d OK"), login)
            finally:
                raw.close()
        return self.in_thread(check)


class POP3StlsTests(ServerMixin, unittest.TestCase):
    """POP3 STLS on port 110, with plaintext USER allowed so that state exists to reset."""

    def setUp(self):
        return self.start_server(allow_plaintext_auth=True)

    @defer.inlineCallbacks
    def test_pipelined_pass_after_stls_is_discarded(self):
        """Guards the discarding of plaintext pipelined after STLS (POP3): a
        pipelined USER/PASS must not log in inside TLS."""
        def talk():
            with socket.create_connection(("127.0.0.1", self.port("pop3")), timeout=10) as sock:
                read_line(sock)
                sock.sendall(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
                stls = read_line(sock)
                with client_tls_context().wrap_socket(sock) as tls:
                    tls.sendall(b"STAT\r\n")
                    return stls, read_some(tls, 1.0)
        stls, after = yield self.in_thread(talk)
        self.assertEqual(stls, b"+OK Begin TLS negotiation\r\n")
        self.assertTrue(after.startswith(b"-ERR"), after)
        self.assertNotIn(b"+OK", after)

    @defer.inlineCallbacks
    def test_user_forgotten_and_second_stls_refused(self):
        """Guards the reset of a USER given before STLS and the refusal of a second STLS."""
        def talk():
            with socket.create_connection(("127.0.0.1", self.port("pop3")), timeout=10) as sock:
                read_line(sock)
                sock.sendall(f"USER {ALICE}\r\n".encode())
                user = read_line(sock)
                sock.sendall(b"STLS\r\n")
                stls = read_line(sock)
                with client_tls_context().wrap_socket(sock) as tls:
                    replies = []
                    for command in (f"PASS {PASSWORD}", "STLS", f"USER {ALICE}",
                                    f"PASS {PASSWORD}"):
                        tls.sendall(command.encode() + b"\r\n")
                        replies.append(read_line(tls))
                    return user, stls, replies
        user, stls, (pass_reply, second, user_tls, pass_tls) = yield self.in_thread(talk)
        self.assertTrue(user.startswith(b"+OK"), user)
        self.assertEqual(stls, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(pass_reply, b"-ERR No USER given.\r\n")
        self.assertEqual(second, b"-ERR TLS is already active.\r\n")
        self.assertTrue(user_tls.startswith(b"+OK"), user_tls)
        self.assertTrue(pass_tls.startswith(b"+OK"), pass_tls)
