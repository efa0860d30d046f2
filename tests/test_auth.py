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


def directory_and_pool(testcase) -> tuple[FileDirectory, ThreadPool]:
    """A directory of example.test with alice (password "secret") at 4 bcrypt
    rounds, and a started thread pool stopped at the end of *testcase*."""
    data_dir = testcase.mktemp()
    os.mkdir(data_dir)
    directory = FileDirectory(data_dir)
    directory.bcrypt_rounds = 4
    directory.add_domain("example.test")
    directory.add_account("alice@example.test", "secret")
    pool = ThreadPool(0, 2, name="test-bcrypt")
    pool.start()
    testcase.addCleanup(pool.stop)
    return directory, pool


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.directory, self.pool = directory_and_pool(self)
        self.directory.add_account("dis@example.test", "secret")
        self.directory.set_account_enabled("dis@example.test", False)
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


class CountingChecker(BcryptChecker):
    """Counts the bcrypt verifications that really ran (the cache's point is fewer)."""

    verified = 0

    def _verify(self, username, password):
        type(self).verified += 1
        return super()._verify(username, password)


class VerifiedCacheTests(unittest.TestCase):
    """The verified-login cache: repeated logins skip bcrypt, nothing else changes."""

    def setUp(self):
        from twisted.internet import task

        from mailtwist.auth import VerifiedCache

        self.directory, self.pool = directory_and_pool(self)
        self.clock = task.Clock()
        self.cache = VerifiedCache(self.clock, ttl=300, size=100)
        CountingChecker.verified = 0
        self.checker = CountingChecker(self.directory, reactor, self.pool, self.cache)

    def login(self, user=b"alice@example.test", password=b"secret"):
        return self.checker.requestAvatarId(credentials.UsernamePassword(user, password))

    @defer.inlineCallbacks
    def test_second_login_skips_bcrypt(self):
        """Guards the login-heavy case: a repeated right password costs no bcrypt."""
        self.assertEqual((yield self.login()), "alice@example.test")
        self.assertEqual((yield self.login()), "alice@example.test")
        self.assertEqual(CountingChecker.verified, 1)

    @defer.inlineCallbacks
    def test_wrong_password_is_never_answered_from_cache(self):
        """Guards that the cache can't admit a wrong password and failures are not cached."""
        yield self.login()
        for _ in range(2):
            with self.assertRaises(error.UnauthorizedLogin):
                yield self.login(password=b"Secret")
        self.assertEqual(CountingChecker.verified, 3)

    @defer.inlineCallbacks
    def test_entry_expires_after_ttl(self):
        """Guards the TTL: after it, bcrypt runs again."""
        yield self.login()
        self.clock.advance(301)
        yield self.login()
        self.assertEqual(CountingChecker.verified, 2)

    @defer.inlineCallbacks
    def test_password_change_drops_the_entry(self):
        """Guards 'dropped on password change': the old password stops working at once."""
        yield self.login()
        self.directory.set_password("alice@example.test", "new-secret")
        with self.assertRaises(error.UnauthorizedLogin):
            yield self.login()
        self.assertEqual((yield self.login(password=b"new-secret")), "alice@example.test")

    @defer.inlineCallbacks
    def test_disabled_account_is_refused_despite_cache(self):
        """Guards that disabling an account ends its cached login."""
        yield self.login()
        self.directory.set_account_enabled("alice@example.test", False)
        with self.assertRaises(error.UnauthorizedLogin):
            yield self.login()

    @defer.inlineCallbacks
    def test_cache_holds_no_password(self):
        """Guards 'never weakens what is stored': entries are keyed hashes, not passwords."""
        yield self.login()
        self.assertEqual(len(self.cache), 1)
        for key in self.cache._entries:
            self.assertNotIn(b"secret", key)
            self.assertEqual(len(key), 32)

    def test_size_bound_evicts_least_recent(self):
        """Guards bounded memory: at most size entries."""
        from mailtwist.auth import VerifiedCache

        cache = VerifiedCache(self.clock, ttl=300, size=2)
        for n in range(3):
            cache.add(f"u{n}", "p", b"hash")
        self.assertEqual(len(cache), 2)
        self.assertFalse(cache.hit("u0", "p", b"hash"))
        self.assertTrue(cache.hit("u2", "p", b"hash"))

    def test_ttl_zero_disables(self):
        """Guards auth.cache_ttl = 0: nothing is remembered."""
        from mailtwist.auth import VerifiedCache

        cache = VerifiedCache(self.clock, ttl=0)
        cache.add("u", "p", b"hash")
        self.assertFalse(cache.hit("u", "p", b"hash"))


class CacheConfigTests(unittest.TestCase):
    def test_cache_keys_read_and_validated(self):
        """Guards [auth] cache_ttl/cache_size: read, 0 allowed for the TTL, bad values refused."""
        from mailtwist.config import ConfigError, load_config

        config = load_config(None, {"auth": {"cache_ttl": 0, "cache_size": 5}})
        self.assertEqual((config.auth_throttle.cache_ttl, config.auth_throttle.cache_size),
                         (0.0, 5))
        for bad in ({"cache_ttl": -1}, {"cache_ttl": "1h"}, {"cache_size": 0}):
            with self.assertRaises(ConfigError) as raised:
                load_config(None, {"auth": bad})
            self.assertIn(f"auth.{next(iter(bad))}", str(raised.exception))
