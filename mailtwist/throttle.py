"""Brute-force protection for logins, shared by every protocol of the server.

One :class:`LoginThrottle` per process counts failed logins per client address
and per account:

- Each failed login is answered after ``failure_delay * 2 ** (n - 1)`` seconds,
  at most ``max_delay``, where *n* is the larger of the address's and the
  account's failure counts. Successful logins are never delayed.
- An address with ``max_failures`` failures is refused for ``block_time``
  seconds, for every account and protocol, without checking a password.
- An account with ``account_max_failures`` failures (from any addresses) is
  refused only to addresses that have themselves failed; the real user
  logging in from an address with no failures is still checked, so an
  attacker cannot lock them out.

Failures are forgotten once ``window`` seconds pass without a new one (and any
block has ended). A success resets nothing: otherwise one valid account would
let an attacker clear the counter between guesses at others. IPv6 clients are
counted per /64, since one host usually has a whole /64. Memory is bounded:
at most ``max_entries`` addresses and as many accounts are remembered, expired
entries are dropped as new failures come in, and when the table is full the
entry with the oldest failure goes. Time comes from an injected clock
(``IReactorTime``), so tests use ``task.Clock``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.cred import error as cred_error
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailtwist import events
from mailtwist.limits import client_key

MAX_ACCOUNT_KEY = 320


class LoginThrottled(cred_error.LoginFailed):
    """Refused without a password check: too many failed logins lately."""


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class _Table:
    """Failure records by key, oldest failure first, at most *cap* of them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.records: OrderedDict[str, _Record] = OrderedDict()

    def get(self, key: str, now: float, window: float) -> _Record | None:
        record = self.records.get(key)
        if record is not None and _expired(record, now, window):
            del self.records[key]
            return None
        return record

    def fail(self, key: str, now: float, window: float) -> _Record:
        record = self.get(key, now, window) or _Record()
        self.records.pop(key, None)
        record.failures += 1
        record.last = now
        self.records[key] = record
        self._trim(now, window)
        return record

    def _trim(self, now: float, window: float) -> None:
        records = self.records
        while records:
            key, oldest = next(iter(records.items()))
            if len(records) > self.cap or _expired(oldest, now, window):
                del records[key]
            else:
                break

    def __len__(self) -> int:
        return len(self.records)


def _expired(record: _Record, now: float, window: float) -> bool:
    return now - record.last >= window and record.blocked_until <= now


#: The counting key of a client address: IPv4 as is, IPv6 by its /64 (the
#: connection limits count clients the same way).
address_key = client_key


def account_key(username: bytes | str) -> str:
    """The counting key of a login name: decoded, lower-cased, length-capped."""
    if isinstance(username, bytes):
        username = username.decode("utf-8", "replace")
    return username.strip().lower()[:MAX_ACCOUNT_KEY]


class LoginThrottle:
    """Counts failed logins per address and per account; see the module docstring."""

    def __init__(self, clock: IReactorTime, failure_delay: float = 2.0,
                 max_delay: float = 30.0, window: float = 900.0, max_failures: int = 10,
                 block_time: float = 900.0, account_max_failures: int = 100,
                 max_entries: int = 100_000) -> None:
        self.clock = clock
        self.failure_delay = failure_delay
        self.max_delay = max_delay
        self.window = window
        self.max_failures = max_failures
        self.block_time = block_time
        self.account_max_failures = account_max_failures
        self.addresses = _Table(max_entries)
        self.accounts = _Table(max_entries)

    @classmethod
    def from_config(cls, config: Any, clock: IReactorTime) -> "LoginThrottle":
        """A throttle with the ``[auth]`` settings of *config*."""
        auth = config.auth_throttle
        return cls(clock, failure_delay=config.auth_failure_delay, max_delay=auth.max_delay,
                   window=auth.window, max_failures=auth.max_failures,
                   block_time=auth.block_time,
                   account_max_failures=auth.account_max_failures,
                   max_entries=auth.max_entries)

    def refuses(self, address: str, username: bytes | str) -> bool:
        """True if a login by *username* from *address* must be refused unchecked."""
        now = self.clock.seconds()
        by_address = self.addresses.get(address_key(address), now, self.window)
        if by_address is not None and by_address.blocked_until > now:
            return True
        by_account = self.accounts.get(account_key(username), now, self.window)
        return (by_account is not None and by_address is not None
                and by_account.failures >= self.account_max_failures)

    def failed(self, address: str, username: bytes | str) -> float:
        """Record a failed login; the seconds to wait before answering it."""
        now = self.clock.seconds()
        by_address = self.addresses.fail(address_key(address), now, self.window)
        by_account = self.accounts.fail(account_key(username), now, self.window)
        if by_address.failures >= self.max_failures:
            by_address.blocked_until = now + self.block_time
        n = max(by_address.failures, by_account.failures)
        if self.failure_delay <= 0:
            return 0.0
        return min(self.failure_delay * 2.0 ** min(n - 1, 64), self.max_delay)

    def login(self, portal: Any, address: str, creds: Any, mind: Any,
              *interfaces: Any) -> defer.Deferred:
        """``portal.login`` guarded by the throttle.

        Fails at once with :class:`LoginThrottled` when refused; a failed login
        (``UnauthorizedLogin``) is recorded and its failure delayed; anything
        else passes through unchanged.
        """
        username = getattr(creds, "username", b"")
        if self.refuses(address, username):
            events.login_throttled(interfaces, address, username)
            return defer.fail(LoginThrottled("too many failed logins"))
        d = defer.maybeDeferred(portal.login, creds, mind, *interfaces)
        events.watch_login(d, interfaces, address, username)

        def failed(failure: Failure) -> Failure | defer.Deferred:
            if not failure.check(cred_error.UnauthorizedLogin):
                return failure
            return self._answer_later(self.failed(address, username), failure)

        d.addErrback(failed)
        return d

    def reject(self, address: str, username: bytes | str) -> defer.Deferred:
        """A login the protocol refuses itself (e.g. a SASL authorization identity
        that is not the user's): counted like a wrong password, failing with
        ``UnauthorizedLogin`` after the delay, or at once with LoginThrottled."""
        if self.refuses(address, username):
            return defer.fail(LoginThrottled("too many failed logins"))
        failure = Failure(cred_error.UnauthorizedLogin("authentication failed"))
        return self._answer_later(self.failed(address, username), failure)

    def _answer_later(self, delay: float, failure: Failure) -> defer.Deferred:
        later: defer.Deferred = defer.Deferred()
        self.clock.callLater(delay, later.errback, failure)
        return later


def ensure_throttle(throttle: LoginThrottle | None, config: Any,
                    clock: IReactorTime) -> LoginThrottle:
    """*throttle* (the one the service shares), or a new one from the config for a
    protocol built on its own, e.g. in a unit test."""
    return throttle if throttle is not None else LoginThrottle.from_config(config, clock)
