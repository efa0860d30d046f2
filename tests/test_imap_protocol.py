"""IMAPServer against StringTransport and a Clock: ordering of pipelined
commands while one waits, input flow control, timeouts and limits."""

from __future__ import annotations

from twisted.cred import credentials
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.imap4 import IAccount
from twisted.trial import unittest
from zope.interface import implementer

from mailtwist.auth import MailRealm
from mailtwist.config import Config
from mailtwist.imap.server import (
    AUTH_TIMEOUT,
    MAX_PAUSED_INPUT,
    PREAUTH_TIMEOUT,
    IMAPServer,
)
from mailtwist.imap.wire import MAX_LINE, MAX_SKIP


@implementer(ICredentialsChecker)
class SlowChecker:
    """Answers each login when the test says so."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def requestAvatarId(self, creds) -> defer.Deferred:
        d = defer.Deferred()
        self.pending.append(d)
        return d


class FakeAccount:
    address = "alice@example.test"


def make_server(config: Config | None = None) -> tuple[IMAPServer, StringTransport, Clock,
                                                       SlowChecker]:
    clock = Clock()
    checker = SlowChecker()
    realm = MailRealm()
    realm.register(IAccount, lambda address: FakeAccount())
    config = config or Config()
    config.allow_plaintext_auth = True
    config.auth_failure_delay = 1.0
    server = IMAPServer(Portal(realm, [checker]), config, reactor=clock)
    transport = StringTransport()
    server.makeConnection(transport)
    return server, transport, clock, checker


def lines(transport: StringTransport) -> list[bytes]:
    data = transport.value()
    transport.clear()
    return data.split(b"\r\n")[:-1]


class ProtocolTests(unittest.TestCase):

    def test_pipelined_commands_wait_for_the_login(self) -> None:
        server, transport, _clock, checker = make_server()
        lines(transport)
        server.dataReceived(b"a LOGIN alice pw\r\nb CAPABILITY\r\nc NOOP\r\n")
        self.assertEqual(lines(transport), [])
        checker.pending[0].callback("alice@example.test")
        reply = lines(transport)
        self.assertTrue(reply[0].startswith(b"a OK [CAPABILITY IMAP4rev1"))
        self.assertTrue(reply[1].startswith(b"* CAPABILITY"))
        self.assertIn(b"UIDPLUS", reply[1])
        self.assertEqual(reply[2:], [b"b OK CAPABILITY completed.", b"c OK NOOP completed."])

    def test_failed_login_is_answered_after_the_delay(self) -> None:
        server, transport, clock, checker = make_server()
        lines(transport)
        server.dataReceived(b"a LOGIN alice wrong\r\nb NOOP\r\n")
        checker.pending[0].errback(cred_error.UnauthorizedLogin())
        self.assertEqual(lines(transport), [])
        clock.advance(1.0)
        self.assertEqual(lines(transport), [b"a NO [AUTHENTICATIONFAILED] Authentication failed.",
                                            b"b OK NOOP completed."])

    def test_input_is_paused_while_a_command_waits(self) -> None:
        server, transport, _clock, checker = make_server()
        server.dataReceived(b"a LOGIN alice pw\r\n")
        server.dataReceived(b"b NOOP\r\n" * (MAX_PAUSED_INPUT // 8 + 10))
        self.assertEqual(transport.producerState, "paused")
        checker.pending[0].callback("alice@example.test")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value().count(b"b OK NOOP"), MAX_PAUSED_INPUT // 8 + 10)

    def test_autologout_before_and_after_login(self) -> None:
        server, transport, clock, checker = make_server()
        clock.advance(PREAUTH_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        server.dataReceived(b"a LOGIN alice pw\r\n")
        checker.pending[0].callback("alice@example.test")
        clock.advance(PREAUTH_TIMEOUT + 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(AUTH_TIMEOUT)
        self.assertTrue(transport.value().endswith(b"* BYE Autologout; connection idle too long.\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_overlong_line_is_refused_then_a_flood_ends_the_session(self) -> None:
        """Guards item 11: an overlong command gets BAD and is skipped; a flood
        without a line end past MAX_SKIP ends the session."""
        server, transport, _clock, _checker = make_server()
        lines(transport)
        server.dataReceived(b"a NOOP " + b"x" * (MAX_LINE + 10))
        self.assertEqual(lines(transport), [b"a BAD Command line too long."])
        self.assertFalse(transport.disconnecting)
        server.dataReceived(b"x" * MAX_SKIP)
        self.assertEqual(lines(transport), [b"* BYE Command line too long."])
        self.assertTrue(transport.disconnecting)

    def test_literal_continuations_and_bad_syntax(self) -> None:
        server, transport, _clock, checker = make_server()
        lines(transport)
        server.dataReceived(b"a LOGIN {5}\r\n")
        self.assertEqual(lines(transport), [b"+ Ready for literal data"])
        server.dataReceived(b"alice {2}\r\n")
        self.assertEqual(lines(transport), [b"+ Ready for literal data"])
        server.dataReceived(b"pw\r\n")
        checker.pending[0].callback("alice@example.test")
        self.assertTrue(lines(transport)[0].startswith(b"a OK"))
        server.dataReceived(b'b LIST "unterminated\r\nc LIST (\r\n\r\n+x NOOP\r\n')
        reply = lines(transport)
        self.assertEqual([r.split(b" ")[:2] for r in reply],
                         [[b"b", b"BAD"], [b"c", b"BAD"], [b"*", b"BAD"], [b"*", b"BAD"]])

    def test_too_many_bad_commands_end_the_session(self) -> None:
        server, transport, _clock, _checker = make_server()
        server.dataReceived(b"x FROB\r\n" * 25)
        self.assertIn(b"* BYE Too many bad commands.", transport.value())
        self.assertTrue(transport.disconnecting)
