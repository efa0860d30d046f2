"""The cred pieces: bcrypt checker, realm and avatars."""

from __future__ import annotations

import os

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet import defer, reactor
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.pop3 import IMailbox
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.auth import BcryptChecker, build_portal
from mailtwist.directory import FileDirectory
from mailtwist.smtp.policy import AuthenticatedSender, SMTPPolicy


class CheckerTests(unittest.TestCase):
    def setUp(self):
        data_dir = self.mktemp()
        os.mkdir(data_dir)
        self.directory = FileDirectory(data_dir)
        self.directory.bcrypt_rounds = 4
        self.directory.add_domain("example.test")
        self.directory.add_account("alice@example.test", "secret")
        self.directory.add_account("dis@example.test", "secret")
        self.directory.set_account_enabled("dis@example.test", False)
        self.pool = ThreadPool(0, 2, name="test-bcrypt")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.checker = BcryptChecker(self.directory, reactor, self.pool)

    def test_interfaces(self):
        verifyObject(ICredentialsChecker, self.checker)
        portal, realm = build_portal(self.directory, reactor, self.pool)
        verifyObject(IRealm, realm)
        verifyObject(IMessageDelivery, AuthenticatedSender(
            "alice@example.test", SMTPPolicy("submission", self.directory), None))

    @defer.inlineCallbacks
    def test_right_password_gives_canonical_address(self):
        avatar_id = yield self.checker.requestAvatarId(
            credentials.UsernamePassword(b"Alice@Example.TEST", b"secret"))
        self.assertEqual(avatar_id, "alice@example.test")

    @defer.inlineCallbacks
    def test_failures_look_the_same(self):
        messages = []
        for user, password in [(b"alice@example.test", b"wrong"), (b"nobody@example.test", b"x"),
                               (b"dis@example.test", b"secret"), (b"", b""),
                               (b"\xff@example.test", b"secret")]:
            try:
                yield self.checker.requestAvatarId(credentials.UsernamePassword(user, password))
            except error.UnauthorizedLogin as e:
                messages.append(str(e))
            else:
                self.fail(f"{user!r} logged in")
        self.assertEqual(set(messages), {"authentication failed"})

    @defer.inlineCallbacks
    def test_realm_gives_registered_avatars_only(self):
        portal, realm = build_portal(self.directory, reactor, self.pool)
        realm.register(IMessageDelivery, lambda address: AuthenticatedSender(
            address, SMTPPolicy("submission", self.directory), None))
        iface, avatar, logout = yield portal.login(
            credentials.UsernamePassword(b"alice@example.test", b"secret"), None,
            IMessageDelivery)
        self.assertIs(iface, IMessageDelivery)
        self.assertEqual(avatar.address, "alice@example.test")
        with self.assertRaises(NotImplementedError):
            yield portal.login(credentials.UsernamePassword(b"alice@example.test", b"secret"),
                               None, IMailbox)
