"""POP3 server: wire-level edge cases against StringTransport, and the real
server on 127.0.0.1 driven by poplib, raw sockets, curl and fetchmail."""

from __future__ import annotations

import base64
import os
import poplib
import shutil
import socket
import subprocess
from pathlib import Path

from twisted.cred import credentials, error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.mail.pop3 import IMailbox
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailtwist.auth import MailRealm, build_portal
from mailtwist.config import Config
from mailtwist.directory import FileDirectory
from mailtwist.pop3 import (
    LineBuffer,
    LineTooLong,
    MailboxLocks,
    MaildirMailbox,
    POP3Factory,
    POP3Server,
    dot_stuff,
    format_uidl,
    parse_number,
    register_pop3,
    top_of_message,
)
from mailtwist.storage.maildir import Folder
from mailtwist.storage.store import MailStore
from mailtwist.tls import ensure_certificate, server_context_factory
from tests.support import InlineReactor, InlineThreadPool, client_tls_context, read_line

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORD = "correct horse battery staple"

DOTTY = (
    b".Leading: header line starting with a dot\n"
    b"Subject: dots\n"
    b"\n"
    b".\n"
    b"..two dots\n"
    b". dot space\n"
    b"ordinary line\n"
    b".last line without newline"
)


def message(subject: str, body: str = "Hello.\n") -> bytes:
    return f"From: a@{DOMAIN}\nTo: {ALICE}\nSubject: {subject}\n\n{body}".encode()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# Pure helpers


class HelperTests(unittest.TestCase):

    def test_dot_stuff_every_line_including_first(self) -> None:
        self.assertEqual(
            dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n"),
            b"..a\r\nb\r\n..\r\n...c\r\n.\r\n",
        )

    def test_dot_stuff_adds_final_crlf_and_fixes_bare_lf(self) -> None:
        self.assertEqual(dot_stuff(b"a\n.b"), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(dot_stuff(b""), b".\r\n")

    def test_top_headers_blank_line_and_n_body_lines(self) -> None:
        data = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
        self.assertEqual(top_of_message(data, 0), b"A: 1\r\nB: 2\r\n\r\n")
        self.assertEqual(top_of_message(data, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n")
        self.assertEqual(top_of_message(data, 99), data)
        self.assertEqual(top_of_message(b"A: 1\r\n", 3), b"A: 1\r\n")
        self.assertEqual(top_of_message(b"\r\nbody\r\nmore\r\n", 1), b"\r\nbody\r\n")

    def test_uidl_is_dovecot_default_format(self) -> None:
        self.assertEqual(format_uidl(1, 0x4F5A3B2C), b"000000014f5a3b2c")
        self.assertEqual(format_uidl(0x1234ABCD, 1700000000), b"1234abcd6553f100")

    def test_parse_number(self) -> None:
        self.assertEqual(parse_number(b"12"), 12)
        self.assertEqual(parse_number(b"0"), 0)
        for bad in (b"", b"-1", b"+1", b"1.0", b"x", b"\xd9\xa1", b"9" * 11):
            self.assertIsNone(parse_number(bad), bad)

    def test_line_buffer(self) -> None:
        lines = LineBuffer(max_length=10)
        lines.feed(b"ONE\r\nTWO\nTHR")
        self.assertEqual(lines.next_line(), b"ONE")
        self.assertEqual(lines.next_line(), b"TWO")
        self.assertIsNone(lines.next_line())
        lines.feed(b"EE\r\n")
        self.assertEqual(lines.next_line(), b"THREE")
        lines.feed(b"AFTER\r\nSTLS\r\n")
        lines.clear()
        self.assertIsNone(lines.next_line())
        lines.feed(b"x" * 12)
        self.assertRaises(LineTooLong, lines.next_line)


# Protocol edge cases, synchronous: threads run inline, time is a Clock.


class TLSStringTransport(StringTransport):
    """StringTransport that records startTLS."""

    tls_context = None

    def startTLS(self, context) -> None:
        self.tls_context = context


@implementer(ICredentialsChecker)
class ManualChecker:
    """Password checks the test finishes by hand, to hold a login open."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred, credentials.IUsernamePassword]] = []

    def requestAvatarId(self, creds) -> defer.Deferred:
        d = defer.Deferred()
        self.pending.append((d, creds))
        return d

    def finish(self) -> None:
        d, creds = self.pending.pop(0)
        if creds.password == PASSWORD.encode():
            d.callback(creds.username.decode())
        else:
            d.errback(cred_error.UnauthorizedLogin())


TLS_CONTEXT = object()


class SessionTests(unittest.TestCase):
    """One POP3Server on a StringTransport over a real Maildir."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.store = MailStore(Path(self.mktemp()), "mx.example.test")
        self.checker = ManualChecker()
        self.realm = MailRealm()
        self.locks = MailboxLocks()
        register_pop3(self.realm, self.store, self.clock, InlineThreadPool(), self.locks)
        self.config = Config()
        self.config.auth_failure_delay = 2.0

    def deliver(self, data: bytes, address: str = ALICE) -> str:
        return self.store.maildir(address).deliver(data)

    def connect(self, tls_context=TLS_CONTEXT, implicit_tls: bool = False,
                allow_plaintext: bool = False) -> tuple[POP3Server, TLSStringTransport]:
        self.config.allow_plaintext_auth = allow_plaintext
        session = POP3Server(Portal(self.realm, [self.checker]), self.config,
                             tls_context=tls_context, implicit_tls=implicit_tls,
                             reactor=self.clock)
        transport = TLSStringTransport()
        session.makeConnection(transport)
        self.assertEqual(transport.value(), b"+OK mailtwist POP3 server ready.\r\n")
        transport.clear()
        self.addCleanup(self.disconnect, session)
        return session, transport

    def disconnect(self, session: POP3Server) -> None:
        if session.connected:
            session.connectionLost(Failure(ConnectionError("test over")))

    def send(self, session: POP3Server, transport: TLSStringTransport, data: bytes) -> bytes:
        transport.clear()
        session.dataReceived(data)
        return transport.value()

    def login(self, address: str = ALICE) -> tuple[POP3Server, TLSStringTransport]:
        session, transport = self.connect(implicit_tls=True)
        self.send(session, transport, f"USER {address}\r\nPASS {PASSWORD}\r\n".encode())
        self.checker.finish()
        self.assertEqual(transport.value(), b"+OK\r\n+OK Logged in.\r\n")
        transport.clear()
        return session, transport

    def capabilities(self, session: POP3Server, transport: TLSStringTransport) -> list[bytes]:
        reply = self.send(session, transport, b"CAPA\r\n").split(b"\r\n")
        self.assertTrue(reply[0].startswith(b"+OK"))
        self.assertEqual(reply[-2:], [b".", b""])
        return reply[1:-2]

    def test_capa_before_tls_offers_stls_but_no_passwords(self) -> None:
        session, transport = self.connect()
        self.assertEqual(self.capabilities(session, transport), [
            b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"STLS",
            b"IMPLEMENTATION mailtwist",
        ])

    def test_capa_after_stls_offers_passwords_not_stls(self) -> None:
        session, transport = self.connect()
        self.send(session, transport, b"STLS\r\n")
        caps = self.capabilities(session, transport)
        self.assertIn(b"USER", caps)
        self.assertIn(b"SASL PLAIN", caps)
        self.assertNotIn(b"STLS", caps)

    def test_capa_without_tls_context_or_on_implicit_tls(self) -> None:
        session, transport = self.connect(tls_context=None)
        self.assertNotIn(b"STLS", self.capabilities(session, transport))
        session, transport = self.connect(implicit_tls=True)
        caps = self.capabilities(session, transport)
        self.assertNotIn(b"STLS", caps)
        self.assertIn(b"USER", caps)

    def test_capa_with_plaintext_allowed(self) -> None:
        session, transport = self.connect(allow_plaintext=True)
        caps = self.capabilities(session, transport)
        self.assertIn(b"USER", caps)
        self.assertIn(b"STLS", caps)

    def test_capa_in_transaction_state_has_no_login_capabilities(self) -> None:
        session, transport = self.login()
        caps = self.capabilities(session, transport)
        for cap in (b"USER", b"SASL PLAIN", b"STLS"):
            self.assertNotIn(cap, caps)
        self.assertIn(b"UIDL", caps)

    def test_stls_discards_pipelined_plaintext(self) -> None:
        session, transport = self.connect()
        reply = self.send(session, transport, b"STLS\r\nUSER " + ALICE.encode() + b"\r\n")
        self.assertEqual(reply, b"+OK Begin TLS negotiation\r\n")
        self.assertIs(transport.tls_context, TLS_CONTEXT)
        reply = self.send(session, transport, f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(reply, b"-ERR No USER given.\r\n")
        self.assertEqual(self.checker.pending, [])

    def test_stls_resets_user(self) -> None:
        session, transport = self.connect(allow_plaintext=True)
        self.send(session, transport, f"USER {ALICE}\r\n".encode())
        self.send(session, transport, b"STLS\r\n")
        reply = self.send(session, transport, f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(reply, b"-ERR No USER given.\r\n")

    def test_stls_refused_when_secure_unavailable_or_logged_in(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        self.assertEqual(self.send(session, transport, b"STLS\r\n"),
                         b"-ERR TLS is already active.\r\n")
        session, transport = self.connect(tls_context=None)
        self.assertEqual(self.send(session, transport, b"STLS\r\n"),
                         b"-ERR TLS is not available.\r\n")
        session, transport = self.login()
        self.assertTrue(self.send(session, transport, b"STLS\r\n").startswith(b"-ERR"))
        self.assertIsNone(transport.tls_context)

    def test_passwords_refused_before_tls(self) -> None:
        session, transport = self.connect()
        for command in (b"USER alice", b"PASS secret", b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="):
            reply = self.send(session, transport, command + b"\r\n")
            self.assertTrue(reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"),
                            reply)
        self.assertEqual(self.checker.pending, [])

    def test_apop_not_supported(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        reply = self.send(session, transport, b"APOP alice 0123456789abcdef\r\n")
        self.assertEqual(reply, b"-ERR APOP is not supported.\r\n")

    def test_pipelined_commands_wait_for_login(self) -> None:
        self.deliver(message("one"))
        session, transport = self.connect(implicit_tls=True)
        reply = self.send(session, transport,
                          f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\n".encode())
        self.assertEqual(reply, b"+OK\r\n")
        self.checker.finish()
        size = len(crlf(message("one")))
        self.assertEqual(transport.value(),
                         b"+OK\r\n+OK Logged in.\r\n+OK 1 %d\r\n+OK\r\n" % size)

    def test_failed_login_answers_after_delay_with_auth_code(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        self.send(session, transport, f"USER {ALICE}\r\nPASS wrong\r\nNOOP\r\n".encode())
        self.checker.finish()
        self.assertEqual(transport.value(), b"+OK\r\n")
        self.clock.advance(1.9)
        self.assertEqual(transport.value(), b"+OK\r\n")
        self.clock.advance(0.1)
        self.assertEqual(transport.value(),
                         b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
                         b"-ERR Command not valid in this state.\r\n")

    def test_repeated_failed_logins_disconnect(self) -> None:
        self.config.auth_failure_delay = 0
        session, transport = self.connect(implicit_tls=True)
        for attempt in range(POP3Server.max_auth_failures):
            self.assertFalse(transport.disconnecting)
            self.send(session, transport, f"USER {ALICE}\r\nPASS wrong{attempt}\r\n".encode())
            self.checker.finish()
            self.clock.advance(0)
        self.assertTrue(transport.disconnecting)

    def test_auth_plain_initial_response_and_continuation(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
        self.send(session, transport, b"AUTH PLAIN " + token + b"\r\n")
        self.checker.finish()
        self.assertEqual(transport.value(), b"+OK Logged in.\r\n")

        self.disconnect(session)
        session, transport = self.connect(implicit_tls=True)
        self.assertEqual(self.send(session, transport, b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.send(session, transport, token + b"\r\n")
        self.checker.finish()
        self.assertEqual(transport.value(), b"+OK Logged in.\r\n")

    def test_auth_plain_rejects_other_authzid_and_cancel(self) -> None:
        self.config.auth_failure_delay = 0
        session, transport = self.connect(implicit_tls=True)
        token = base64.b64encode(f"{BOB}\0{ALICE}\0{PASSWORD}".encode())
        reply = self.send(session, transport, b"AUTH PLAIN " + token + b"\r\n")
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(reply, b"")
        self.send(session, transport, b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(session, transport, b"*\r\n"),
                         b"-ERR Authentication cancelled.\r\n")
        self.assertEqual(self.send(session, transport, b"AUTH CRAM-MD5\r\n"),
                         b"-ERR Unsupported authentication mechanism.\r\n")
        self.assertEqual(self.checker.pending, [])

    def test_second_session_gets_in_use(self) -> None:
        self.login()
        session, transport = self.connect(implicit_tls=True)
        self.send(session, transport, f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.checker.finish()
        self.assertEqual(transport.value(),
                         b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n")

    def test_lock_released_on_connection_loss(self) -> None:
        session, transport = self.login()
        self.assertEqual(len(self.locks._held), 1)
        self.disconnect(session)
        self.assertEqual(len(self.locks._held), 0)

    def test_lock_released_when_login_finishes_after_disconnect(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        self.send(session, transport, f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.disconnect(session)
        self.checker.finish()
        self.assertEqual(len(self.locks._held), 0)

    def test_retr_wire_format(self) -> None:
        self.deliver(DOTTY)
        session, transport = self.login()
        reply = self.send(session, transport, b"RETR 1\r\n")
        self.assertEqual(reply, b"+OK %d octets\r\n" % len(crlf(DOTTY)) + (
            b"..Leading: header line starting with a dot\r\n"
            b"Subject: dots\r\n"
            b"\r\n"
            b"..\r\n"
            b"...two dots\r\n"
            b".. dot space\r\n"
            b"ordinary line\r\n"
            b"..last line without newline\r\n"
            b".\r\n"
        ))

    def test_top_wire_format(self) -> None:
        self.deliver(DOTTY)
        session, transport = self.login()
        reply = self.send(session, transport, b"TOP 1 2\r\n")
        self.assertEqual(reply, (
            b"+OK Top of message follows\r\n"
            b"..Leading: header line starting with a dot\r\n"
            b"Subject: dots\r\n"
            b"\r\n"
            b"..\r\n"
            b"...two dots\r\n"
            b".\r\n"
        ))
        self.assertEqual(self.send(session, transport, b"TOP 1 x\r\n"),
                         b"-ERR Invalid line count.\r\n")

    def test_message_number_bounds(self) -> None:
        self.deliver(message("one"))
        self.deliver(message("two"))
        session, transport = self.login()
        for command in (b"DELE", b"RETR", b"LIST", b"UIDL"):
            for number in (b"0", b"-1", b"3", b"99999999999", b"x", b"1x"):
                reply = self.send(session, transport, command + b" " + number + b"\r\n")
                self.assertEqual(reply, b"-ERR no such message\r\n", (command, number))
        self.assertEqual(self.send(session, transport, b"TOP 3 0\r\n"),
                         b"-ERR no such message\r\n")
        self.assertEqual(self.send(session, transport, b"DELE 2\r\n"),
                         b"+OK Marked to be deleted.\r\n")
        for command in (b"DELE 2", b"RETR 2", b"TOP 2 0", b"LIST 2", b"UIDL 2"):
            self.assertEqual(self.send(session, transport, command + b"\r\n"),
                             b"-ERR no such message\r\n", command)

    def test_stat_list_uidl_skip_deleted_and_rset_restores(self) -> None:
        self.deliver(message("one"))
        self.deliver(message("two"))
        folder = self.store.maildir(ALICE).folder()
        infos = folder.scan()
        uidls = [format_uidl(m.uid, folder.uidvalidity) for m in infos]
        size = len(crlf(message("one")))
        session, transport = self.login()
        self.send(session, transport, b"DELE 1\r\n")
        self.assertEqual(self.send(session, transport, b"STAT\r\n"), b"+OK 1 %d\r\n" % size)
        self.assertEqual(self.send(session, transport, b"LIST\r\n"),
                         b"+OK 1 messages (%d octets)\r\n2 %d\r\n.\r\n" % (size, size))
        self.assertEqual(self.send(session, transport, b"UIDL\r\n"),
                         b"+OK 1 messages (%d octets)\r\n2 %s\r\n.\r\n" % (size, uidls[1]))
        self.assertEqual(self.send(session, transport, b"RSET\r\n"),
                         b"+OK 2 messages (%d octets)\r\n" % (2 * size))
        self.assertEqual(self.send(session, transport, b"UIDL 1\r\n"), b"+OK 1 %s\r\n" % uidls[0])
        self.assertEqual(self.send(session, transport, b"LIST 2\r\n"), b"+OK 2 %d\r\n" % size)

    def test_quit_applies_deletions_and_seen_then_releases_lock(self) -> None:
        self.deliver(message("one"))
        self.deliver(message("two"))
        self.deliver(message("three"))
        session, transport = self.login()
        reply = self.send(session, transport, b"DELE 1\r\nRETR 2\r\nTOP 3 0\r\nQUIT\r\n")
        self.assertTrue(reply.endswith(b"+OK Logging out.\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.locks._held), 0)
        infos = self.store.maildir(ALICE).folder().scan()
        self.assertEqual([sorted(m.flags) for m in infos], [["S"], []])
        self.assertEqual([m.subdir for m in infos], ["cur", "new"])

    def test_quit_reports_deletions_that_failed(self) -> None:
        def refuse(*args) -> None:
            raise PermissionError("read-only file system")

        self.patch(Folder, "remove_many", refuse)
        self.patch(Folder, "remove", refuse)
        self.deliver(message("one"))
        session, transport = self.login()
        reply = self.send(session, transport, b"DELE 1\r\nQUIT\r\n")
        self.assertEqual(reply, b"+OK Marked to be deleted.\r\n"
                                b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.locks._held), 0)

    def test_pipelined_input_is_paused_while_busy(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        self.send(session, transport, f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        session.dataReceived(b"NOOP\r\n" * 20000)
        self.assertEqual(transport.producerState, "paused")
        self.checker.finish()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value().count(b"+OK\r\n"), 20001)

    def test_disconnect_without_quit_changes_nothing(self) -> None:
        self.deliver(message("one"))
        self.deliver(message("two"))
        before = self.store.maildir(ALICE).folder().scan()
        session, transport = self.login()
        self.send(session, transport, b"DELE 1\r\nRETR 2\r\n")
        self.disconnect(session)
        self.assertEqual(self.store.maildir(ALICE).folder().scan(), before)

    def test_unknown_and_out_of_state_commands(self) -> None:
        session, transport = self.connect(implicit_tls=True)
        self.assertEqual(self.send(session, transport, b"FOO\r\n"), b"-ERR Unknown command.\r\n")
        self.assertEqual(self.send(session, transport, b"STAT\r\n"),
                         b"-ERR Command not valid in this state.\r\n")
        self.assertEqual(self.send(session, transport, b"LAST\r\n"), b"-ERR Unknown command.\r\n")

    def test_too_many_errors_disconnect(self) -> None:
        session, transport = self.connect()
        self.send(session, transport, b"BAD\r\n" * (POP3Server.max_errors - 1))
        self.assertFalse(transport.disconnecting)
        reply = self.send(session, transport, b"BAD\r\nNOOP\r\n")
        self.assertEqual(reply, b"-ERR Unknown command.\r\n"
                                b"-ERR Too many bad commands, closing connection.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_overlong_line_disconnects(self) -> None:
        session, transport = self.connect()
        self.assertEqual(self.send(session, transport, b"XNOP " + b"x" * 1019 + b"\r\n"),
                         b"-ERR Unknown command.\r\n")
        self.assertFalse(transport.disconnecting)
        reply = self.send(session, transport, b"USER " + b"x" * 2000)
        self.assertEqual(reply, b"-ERR Line too long.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        self.config.pop3_idle_timeout = 600
        session, transport = self.connect()
        self.clock.advance(599)
        self.send(session, transport, b"CAPA\r\n")
        self.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"-ERR Disconnected for inactivity.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_mailbox_provides_imailbox(self) -> None:
        self.deliver(message("one"))
        self.deliver(message("two"))
        opened = self.realm.factories[IMailbox](ALICE)
        mailbox = self.successResultOf(opened)
        self.assertIsInstance(mailbox, MaildirMailbox)
        self.assertTrue(verifyObject(IMailbox, mailbox))
        size = len(crlf(message("one")))
        self.assertEqual(mailbox.listMessages(), [size, size])
        mailbox.deleteMessage(0)
        self.assertEqual(mailbox.listMessages(), [0, size])
        self.assertRaises(ValueError, mailbox.deleteMessage, 0)
        self.assertRaises(ValueError, mailbox.getUidl, 2)
        mailbox.undeleteMessages()
        self.assertEqual(self.successResultOf(mailbox.getMessage(1)).read(),
                         crlf(message("two")))
        mailbox.logout()
        self.assertEqual(len(self.locks._held), 0)


# The real server on 127.0.0.1.


def read_multiline(sock: socket.socket) -> list[bytes]:
    lines = [read_line(sock)]
    if lines[0].startswith(b"+OK"):
        while lines[-1] not in (b".\r\n", b""):
            lines.append(read_line(sock))
    return lines


class TrackingFactory(POP3Factory):
    """Remembers its sessions so a test can wait for them to end."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sessions: list[POP3Server] = []

    def buildProtocol(self, addr) -> POP3Server:
        session = super().buildProtocol(addr)
        self.sessions.append(session)
        return session


class NetworkTests(unittest.TestCase):
    """Real listeners (pop3 with STLS, pop3s) over a temporary data directory."""

    def setUp(self) -> None:
        data_dir = Path(self.mktemp()).resolve()
        data_dir.mkdir(parents=True)
        directory = FileDirectory(data_dir)
        directory.bcrypt_rounds = 4
        directory.add_domain(DOMAIN)
        directory.add_account(ALICE, PASSWORD)
        directory.add_account(BOB, PASSWORD)
        cert, key, _ = ensure_certificate(data_dir, "localhost")
        tls = server_context_factory(cert, key)

        pool = ThreadPool(minthreads=0, maxthreads=4, name="test-pop3")
        pool.start()
        self.addCleanup(pool.stop)
        portal, realm = build_portal(directory, reactor, pool)
        self.store = MailStore(data_dir / "mail", "mx.example.test")
        self.locks = register_pop3(realm, self.store, reactor, pool, MailboxLocks())
        self.config = Config(data_dir=data_dir, hostname="mx.example.test")
        self.config.auth_failure_delay = 0
        self.config.pop3_idle_timeout = 600

        self.factories = [
            TrackingFactory(portal, self.config, tls, reactor=reactor, threadpool=pool),
            TrackingFactory(portal, self.config, tls, implicit_tls=True, reactor=reactor,
                            threadpool=pool),
        ]
        self.pop3_port = self.listen(self.factories[0])
        self.pop3s_port = self.listen(TLSMemoryBIOFactory(tls, False, self.factories[1]))
        self.addCleanup(self.sessions_closed)

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def sessions_closed(self):
        """Wait for the server side of every connection to end (aborting stragglers)."""
        sessions = [s for f in self.factories for s in f.sessions]
        for attempt in range(500):
            alive = [s for s in sessions if s.connected]
            if not alive:
                return
            if attempt == 300:
                for session in alive:
                    session.transport.abortConnection()
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("server sessions did not end")

    @defer.inlineCallbacks
    def wait_unlocked(self, address: str = ALICE):
        key = str(self.store.path_for(address))
        for _ in range(500):
            if key not in self.locks:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{address} still locked")

    def deliver(self, data: bytes, address: str = ALICE) -> str:
        return self.store.maildir(address).deliver(data)

    def files(self, address: str = ALICE) -> list[str]:
        root = self.store.path_for(address)
        return sorted(f"{sub}/{name}" for sub in ("new", "cur")
                      for name in os.listdir(root / sub))

    def client(self, secure: str = "stls", user: str | None = ALICE) -> poplib.POP3:
        """A poplib client (blocking: call from a thread), logged in when *user* is given."""
        if secure == "pop3s":
            client = poplib.POP3_SSL("127.0.0.1", self.pop3s_port, timeout=10,
                                     context=client_tls_context())
        else:
            client = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
            if secure == "stls":
                client.stls(client_tls_context())
        if user is not None:
            client.user(user)
            client.pass_(PASSWORD)
        return client

    @defer.inlineCallbacks
    def test_capa_before_and_after_stls(self):
        def talk():
            client = self.client(secure="plain", user=None)
            before = client.capa()
            client.stls(client_tls_context())
            after = client.capa()
            client.quit()
            return before, after

        before, after = yield deferToThread(talk)
        self.assertEqual(set(before), {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE",
                                       "PIPELINING", "STLS", "IMPLEMENTATION"})
        self.assertEqual(before["IMPLEMENTATION"], ["mailtwist"])
        self.assertEqual(set(after), {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE",
                                      "PIPELINING", "USER", "SASL", "IMPLEMENTATION"})
        self.assertEqual(after["SASL"], ["PLAIN"])

    @defer.inlineCallbacks
    def test_user_refused_before_tls_accepted_after_stls(self):
        self.deliver(message("one"))

        def talk():
            client = self.client(secure="plain", user=None)
            try:
                client.user(ALICE)
            except poplib.error_proto as e:
                refused = e.args[0]
            else:
                refused = None
            client.stls(client_tls_context())
            client.user(ALICE)
            welcome = client.pass_(PASSWORD)
            stat = client.stat()
            client.quit()
            return refused, welcome, stat

        refused, welcome, stat = yield deferToThread(talk)
        self.assertTrue(refused.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"))
        self.assertEqual(welcome, b"+OK Logged in.")
        self.assertEqual(stat, (1, len(crlf(message("one")))))

    @defer.inlineCallbacks
    def test_pop3s_implicit_tls(self):
        self.deliver(message("one"))

        def talk():
            client = self.client(secure="pop3s", user=None)
            caps = client.capa()
            client.user(ALICE)
            client.pass_(PASSWORD)
            retrieved = client.retr(1)[1]
            client.quit()
            return caps, retrieved

        caps, retrieved = yield deferToThread(talk)
        self.assertIn("USER", caps)
        self.assertNotIn("STLS", caps)
        self.assertEqual(b"\r\n".join(retrieved) + b"\r\n", crlf(message("one")))

    @defer.inlineCallbacks
    def test_stat_list_uidl_top_retr(self):
        first, second = message("one", "a\nb\nc\n"), message("two", "x\n")
        self.deliver(first)
        self.deliver(second)
        folder = self.store.maildir(ALICE).folder()
        expected_uidls = [format_uidl(m.uid, folder.uidvalidity) for m in folder.scan()]

        def talk():
            client = self.client()
            result = (client.stat(), client.list()[1], client.uidl()[1], client.uidl(2),
                      client.top(1, 1)[1], client.retr(2)[1])
            client.quit()
            return result

        stat, listing, uidls, uidl_2, top, retrieved = yield deferToThread(talk)
        sizes = [len(crlf(first)), len(crlf(second))]
        self.assertEqual(stat, (2, sum(sizes)))
        self.assertEqual(listing, [b"1 %d" % sizes[0], b"2 %d" % sizes[1]])
        self.assertEqual(uidls, [b"1 " + expected_uidls[0], b"2 " + expected_uidls[1]])
        self.assertEqual(uidl_2, b"+OK 2 " + expected_uidls[1])
        self.assertEqual(top, first.split(b"\n")[:5])
        self.assertEqual(b"\r\n".join(retrieved) + b"\r\n", crlf(second))

    @defer.inlineCallbacks
    def test_leading_dots_round_trip(self):
        self.deliver(DOTTY)

        def talk():
            client = self.client()
            lines = client.retr(1)[1]
            client.quit()
            return lines

        lines = yield deferToThread(talk)
        self.assertEqual(b"\r\n".join(lines), crlf(DOTTY))

    @defer.inlineCallbacks
    def test_uidl_stable_across_sessions_and_seen(self):
        self.deliver(message("one"))
        self.deliver(message("two"))

        def uidls():
            client = self.client()
            result = client.uidl()[1]
            client.quit()
            return result

        def retrieve_first():
            client = self.client()
            client.retr(1)
            client.quit()

        before = yield deferToThread(uidls)
        again = yield deferToThread(uidls)
        yield deferToThread(retrieve_first)
        self.assertTrue(self.files()[0].startswith("cur/"))
        after = yield deferToThread(uidls)
        self.assertEqual(before, again)
        self.assertEqual(before, after)
        for line in before:
            uidl = line.split(b" ", 1)[1]
            self.assertTrue(0 < len(uidl) <= 70 and all(0x21 <= c <= 0x7E for c in uidl))

    @defer.inlineCallbacks
    def test_retr_sets_seen_top_does_not(self):
        self.deliver(message("one"))
        self.deliver(message("two"))

        def talk():
            client = self.client()
            client.retr(1)
            client.top(2, 0)
            client.quit()

        yield deferToThread(talk)
        files = self.files()
        self.assertEqual(len(files), 2)
        seen = [f for f in files if f.startswith("cur/") and f.endswith(":2,S")]
        self.assertEqual(len(seen), 1)
        self.assertEqual(len([f for f in files if f.startswith("new/")]), 1)
        infos = self.store.maildir(ALICE).folder().scan()
        self.assertEqual([sorted(m.flags) for m in infos], [["S"], []])

    @defer.inlineCallbacks
    def test_dele_quit_removes_file(self):
        self.deliver(message("one"))
        survivor = self.deliver(message("two"))

        def talk():
            client = self.client()
            client.dele(1)
            return client.quit()

        quit_reply = yield deferToThread(talk)
        self.assertEqual(quit_reply, b"+OK Logging out.")
        self.assertEqual(self.files(), [f"new/{survivor}"])

    @defer.inlineCallbacks
    def test_dele_then_disconnect_keeps_file(self):
        self.deliver(message("one"))
        before = self.files()

        def talk():
            client = self.client()
            client.dele(1)
            client.close()

        yield deferToThread(talk)
        yield self.wait_unlocked()
        self.assertEqual(self.files(), before)

    @defer.inlineCallbacks
    def test_rset_undeletes(self):
        self.deliver(message("one"))
        before = self.files()

        def talk():
            client = self.client()
            client.dele(1)
            stat_deleted = client.stat()
            client.rset()
            stat_reset = client.stat()
            client.quit()
            return stat_deleted, stat_reset

        stat_deleted, stat_reset = yield deferToThread(talk)
        self.assertEqual(stat_deleted, (0, 0))
        self.assertEqual(stat_reset, (1, len(crlf(message("one")))))
        self.assertEqual(self.files(), before)

    @defer.inlineCallbacks
    def test_dele_bounds(self):
        self.deliver(message("one"))

        def talk():
            client = self.client()
            replies = []
            for number in ("0", "-1", "2", "abc", "1", "1"):
                try:
                    replies.append(client.dele(number))
                except poplib.error_proto as e:
                    replies.append(e.args[0])
            client.quit()
            return replies

        replies = yield deferToThread(talk)
        self.assertEqual(replies, [b"-ERR no such message"] * 4
                         + [b"+OK Marked to be deleted.", b"-ERR no such message"])
        self.assertEqual(self.files(), [])

    @defer.inlineCallbacks
    def test_second_session_in_use(self):
        first = yield deferToThread(self.client)

        def second():
            client = self.client(user=None)
            client.user(ALICE)
            try:
                client.pass_(PASSWORD)
            except poplib.error_proto as e:
                client.quit()
                return e.args[0]
            client.quit()
            return None

        try:
            refused = yield deferToThread(second)
            bob = yield deferToThread(self.client, user=BOB)
            yield deferToThread(bob.quit)
        finally:
            yield deferToThread(first.quit)
        self.assertEqual(refused, b"-ERR [IN-USE] Mailbox is locked by another POP3 session.")
        again = yield deferToThread(self.client)
        yield deferToThread(again.quit)

    @defer.inlineCallbacks
    def test_failed_login_has_auth_code(self):
        def talk():
            client = self.client(user=None)
            client.user(ALICE)
            try:
                client.pass_("wrong password")
            except poplib.error_proto as e:
                client.quit()
                return e.args[0]
            return None

        refused = yield deferToThread(talk)
        self.assertEqual(refused, b"-ERR [AUTH] Authentication failed.")

    @defer.inlineCallbacks
    def test_stls_injection_is_discarded(self):
        def talk():
            with socket.create_connection(("127.0.0.1", self.pop3_port), timeout=10) as sock:
                read_line(sock)
                sock.sendall(f"STLS\r\nUSER {ALICE}\r\n".encode())
                stls = read_line(sock)
                with client_tls_context().wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(f"PASS {PASSWORD}\r\n".encode())
                    pass_reply = read_line(tls)
                    tls.sendall(b"CAPA\r\n")
                    caps = read_multiline(tls)
                    tls.sendall(b"QUIT\r\n")
                    quit_reply = read_line(tls)
            return stls, pass_reply, caps, quit_reply

        stls, pass_reply, caps, quit_reply = yield deferToThread(talk)
        self.assertEqual(stls, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(pass_reply, b"-ERR No USER given.\r\n")
        self.assertIn(b"USER\r\n", caps)
        self.assertEqual(quit_reply, b"+OK Logging out.\r\n")

    @defer.inlineCallbacks
    def test_pipelined_session(self):
        self.deliver(message("one"))

        def talk():
            with socket.create_connection(("127.0.0.1", self.pop3s_port), timeout=10) as raw:
                with client_tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
                    read_line(sock)
                    sock.sendall(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\n"
                                 f"DELE 1\r\nSTAT\r\nQUIT\r\n".encode())
                    replies = [read_line(sock), read_line(sock), read_line(sock)]
                    replies.append(b"".join(read_multiline(sock)))
                    replies += [read_line(sock), read_line(sock), read_line(sock)]
            return replies

        replies = yield deferToThread(talk)
        size = len(crlf(message("one")))
        self.assertEqual(replies, [
            b"+OK\r\n", b"+OK Logged in.\r\n", b"+OK 1 %d\r\n" % size,
            b"+OK %d octets\r\n" % size + crlf(message("one")) + b".\r\n",
            b"+OK Marked to be deleted.\r\n", b"+OK 0 0\r\n", b"+OK Logging out.\r\n",
        ])
        self.assertEqual(self.files(), [])

    @defer.inlineCallbacks
    def test_curl_retrieves_over_stls(self):
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed (the CI installs it)")
        self.deliver(DOTTY)
        url = f"pop3://127.0.0.1:{self.pop3_port}/1"
        result = yield deferToThread(
            subprocess.run,
            [curl, "--silent", "--show-error", "--ssl-reqd", "--insecure",
             "--user", f"{ALICE}:{PASSWORD}", url],
            capture_output=True, timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, crlf(DOTTY) + b"\r\n")
        self.assertEqual(len(self.files()), 1)

    @defer.inlineCallbacks
    def test_fetchmail_downloads_and_deletes(self):
        fetchmail = shutil.which("fetchmail")
        if fetchmail is None:
            raise unittest.SkipTest("fetchmail is not installed (the CI installs it)")
        self.deliver(message("first fetch"))
        self.deliver(DOTTY)
        home = Path(self.mktemp()).resolve()
        home.mkdir()
        out = home / "out"
        rc = home / "fetchmailrc"
        rc.write_text(
            f'poll 127.0.0.1 with proto POP3 port {self.pop3_port}\n'
            f'  user "{ALICE}" there with password "{PASSWORD}" is "me" here\n'
            f'  options sslproto "tls1.2+" no sslcertck mda "cat >> {out}"\n'
        )
        rc.chmod(0o600)
        env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
        result = yield deferToThread(
            subprocess.run,
            [fetchmail, "--fetchmailrc", str(rc), "--nodetach", "--nosyslog", "--verbose"],
            capture_output=True, timeout=60, env=env,
        )
        log = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, log)
        self.assertIn(b"STLS", log)
        fetched = out.read_bytes()
        self.assertIn(b"Subject: first fetch", fetched)
        self.assertIn(b"\n..two dots\n. dot space\n", fetched)
        self.assertEqual(self.files(), [])
