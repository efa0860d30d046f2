"""Identity: the bcrypt password checker and the realm behind one cred Portal.

The checker runs bcrypt in a small dedicated thread pool (never on the reactor),
and spends the same time on an unknown user, a disabled user and a wrong password
(all checked against a real hash), giving the same answer for each.
"""

from __future__ import annotations

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


@implementer(ICredentialsChecker)
class BcryptChecker:
    """Checks username/password against the directory's bcrypt hashes in *threadpool*."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, directory: FileDirectory, reactor: IReactorThreads,
                 threadpool: ThreadPool) -> None:
        self.directory = directory
        self.reactor = reactor
        self.threadpool = threadpool

    def _check(self, username: str, password: str) -> str:
        account = None
        try:
            account = self.directory.get_account(username)
        except Exception:
            account = None
        usable = account is not None and account.enabled
        password_hash = account.password_hash if usable else DUMMY_HASH
        matched = check_password(password, password_hash)
        if usable and matched:
            return account.address
        raise error.UnauthorizedLogin("authentication failed")

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> defer.Deferred:
        username = _text(creds.username)
        password = _text(creds.password)
        if username is None or password is None or not username or not password:
            return defer.fail(error.UnauthorizedLogin("authentication failed"))
        return deferToThreadPool(self.reactor, self.threadpool, self._check, username, password)


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
                 threadpool: ThreadPool) -> tuple[Portal, MailRealm]:
    """One Portal and realm for every protocol of the server."""
    realm = MailRealm()
    return Portal(realm, [BcryptChecker(directory, reactor, threadpool)]), realm
