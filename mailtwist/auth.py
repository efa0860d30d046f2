"""Identity: the bcrypt password checker and the realm behind one cred Portal.

The checker runs bcrypt in a small dedicated thread pool (never on the reactor),
and spends the same time on an unknown user, a disabled user and a wrong password
(all checked against a real hash), giving the same answer for each.

Like Dovecot's auth cache, recently verified logins are remembered for a short
time so that clients that log in for every check (mobile mail, fetchmail, the
IMAP "login-heavy" load) do not pay bcrypt each time: see :class:`VerifiedCache`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Any, Callable

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailtwist.directory import DUMMY_HASH, FileDirectory, check_password


class VerifiedCache:
    """Recently verified (username, password) pairs, held only as keyed hashes.

    The key of an entry is HMAC-SHA256 under a random per-process secret over the
    username, the password *and the stored bcrypt hash*: nothing here can be
    turned back into a password, a memory dump reveals nothing without the
    secret, and a password change (new hash) or a disabled account makes the old
    entry unreachable at once.  Entries live *ttl* seconds on the reactor's
    clock; at most *size* are kept (least recently used dropped).  Only
    successes are cached, so wrong passwords always cost a bcrypt check.
    """

    def __init__(self, clock: Any, ttl: float = 300.0, size: int = 10_000) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._secret = os.urandom(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def _key(self, username: str, password: str, password_hash: bytes) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (username.encode("utf-8"), password.encode("utf-8"), password_hash):
            mac.update(len(part).to_bytes(4, "big") + part)
        return mac.digest()

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, username: str, password: str, password_hash: bytes) -> bool:
        """Was this exact login verified less than ttl seconds ago?"""
        if self.ttl <= 0:
            return False
        key = self._key(username, password, password_hash)
        expires = self._entries.get(key)
        if expires is None:
            return False
        if expires <= self.clock.seconds():
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, username: str, password: str, password_hash: bytes) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        key = self._key(username, password, password_hash)
        self._entries[key] = self.clock.seconds() + self.ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@implementer(ICredentialsChecker)
class BcryptChecker:
    """Checks username/password against the directory's bcrypt hashes in *threadpool*,
    answering from *cache* (a :class:`VerifiedCache`) for a login verified recently."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, directory: FileDirectory, reactor: IReactorThreads,
                 threadpool: ThreadPool, cache: VerifiedCache | None = None) -> None:
        self.directory = directory
        self.reactor = reactor
        self.threadpool = threadpool
        self.cache = cache

    def _cached(self, username: str, password: str) -> str | None:
        """The account's address when this login is in the cache and still valid."""
        try:
            account = self.directory.get_account(username)
        except Exception:
            return None
        if account is None or not account.enabled or account.password_hash is None:
            return None
        if self.cache.hit(username, password, account.password_hash):
            return account.address
        return None

    def _remember(self, verified: tuple[str, bytes], username: str, password: str) -> str:
        address, password_hash = verified
        if self.cache is not None:
            self.cache.add(username, password, password_hash)
        return address

    def _dummy_hash(self) -> bytes:
        """DUMMY_HASH at the cost new passwords get (``bcrypt_rounds``), so that an
        unknown or disabled user costs the same bcrypt work as a wrong password."""
        rounds = getattr(self.directory, "bcrypt_rounds", 12)
        return b"$2b$%02d$" % rounds + DUMMY_HASH[7:]

    def _verify(self, username: str, password: str) -> tuple[str, bytes]:
        """(address, the hash the password matched) or UnauthorizedLogin; the
        cache keys on that very hash, so a concurrent password change can't
        make the old password valid again."""
        account = None
        try:
            account = self.directory.get_account(username)
        except Exception:
            account = None
        usable = account is not None and account.enabled
        password_hash = account.password_hash if usable else self._dummy_hash()
        matched = check_password(password, password_hash)
        if usable and matched:
            return account.address, password_hash
        raise error.UnauthorizedLogin("authentication failed")

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> defer.Deferred:
        username = _text(creds.username)
        password = _text(creds.password)
        if username is None or password is None or not username or not password:
            return defer.fail(error.UnauthorizedLogin("authentication failed"))
        if self.cache is not None:
            address = self._cached(username, password)
            if address is not None:
                return defer.succeed(address)
        d = deferToThreadPool(self.reactor, self.threadpool, self._verify, username, password)
        return d.addCallback(self._remember, username, password)


def _text(value: bytes | str) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


@implementer(IRealm)
class MailRealm:
    """Hands out one avatar per protocol interface for an authenticated address.

    *factories* maps an interface to ``f(address) -> avatar or Deferred``; the
    POP3, SMTP and IMAP modules register theirs when the service is built, so the
    realm knows nothing of protocols.
    """

    def __init__(self) -> None:
        self.factories: dict[Any, Callable[[str], Any]] = {}

    def register(self, interface: Any, factory: Callable[[str], Any]) -> None:
        self.factories[interface] = factory

    def requestAvatar(self, avatarId: str, mind: Any, *interfaces: Any) -> defer.Deferred:
        for interface in interfaces:
            factory = self.factories.get(interface)
            if factory is not None:
                d = defer.maybeDeferred(factory, avatarId)
                d.addCallback(lambda avatar, i=interface: (i, avatar, getattr(avatar, "logout", _noop)))
                return d
        return defer.fail(NotImplementedError(
            f"no avatar for {', '.join(i.__name__ for i in interfaces)}"
        ))


def _noop() -> None:
    pass


def build_portal(directory: FileDirectory, reactor: IReactorThreads,
                 threadpool: ThreadPool, cache: VerifiedCache | None = None
                 ) -> tuple[Portal, MailRealm]:
    """One Portal and realm for every protocol of the server."""
    realm = MailRealm()
    return Portal(realm, [BcryptChecker(directory, reactor, threadpool, cache)]), realm
