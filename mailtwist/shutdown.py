"""Graceful shutdown: the sessions of every listener, and how they are ended.

When the server stops (:meth:`mailtwist.tap.MailService.stopService`) it first
stops listening, then :meth:`SessionTracker.drain` ends the sessions:

- an SMTP session in the middle of a transaction (MAIL given, DATA under way, or
  the message being written) may finish it for up to ``shutdown_timeout``
  seconds; once its reply is sent it is closed with ``421 4.3.2``. A client that
  has not finished by then is cut off with the same 421: its message was never
  acknowledged, so it is not stored and the client sends it again later;
- every other session is closed at once: SMTP with ``421 4.3.2``, IMAP with
  ``* BYE Server shutting down``, POP3 with ``-ERR Server shutting down``
  (each protocol's ``shutdown_notice()``).

Postfix's ``postfix stop`` behaves alike for smtpd; Dovecot says BYE to IMAP
clients on shutdown.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailtwist.wrapping import WrappingFactory

log = Logger()

POLL_INTERVAL = 0.1


class TrackingFactory(WrappingFactory):
    """Builds protocols with the wrapped factory and remembers them (weakly)."""

    def __init__(self, wrapped: Factory, tracker: SessionTracker) -> None:
        super().__init__(wrapped)
        self.tracker = tracker

    def built(self, protocol) -> None:
        self.tracker.sessions.add(protocol)


def in_transaction(session: Any) -> bool:
    """Whether *session* has work in flight that shutdown should let finish."""
    return bool(getattr(session, "in_transaction", False))


class SessionTracker:
    """The live sessions of all listeners, and their orderly end."""

    def __init__(self) -> None:
        self.sessions: weakref.WeakSet = weakref.WeakSet()

    def track(self, factory: Factory) -> TrackingFactory:
        """Wrap *factory* so its sessions are known at shutdown."""
        return TrackingFactory(factory, self)

    def drain(self, timeout: float, clock: Any) -> defer.Deferred:
        """Close idle sessions now; let transactions finish within *timeout*
        seconds of *clock*, then cut off what is left. Fires when done."""
        waiting = []
        for session in list(self.sessions):
            if in_transaction(session):
                waiting.append(session)
            else:
                _notify(session)
        done: defer.Deferred = defer.Deferred()
        if not waiting:
            done.callback(0)
            return done
        log.info("shutdown: waiting up to {timeout:g} s for {n} SMTP transaction(s) "
                 "in flight", timeout=timeout, n=len(waiting))
        calls: dict[str, Any] = {}

        def poll() -> None:
            waiting[:] = [s for s in waiting if in_transaction(s) or not _finish(s)]
            if waiting:
                calls["poll"] = clock.callLater(POLL_INTERVAL, poll)
            else:
                if calls["deadline"].active():
                    calls["deadline"].cancel()
                done.callback(0)

        def deadline() -> None:
            if calls["poll"].active():
                calls["poll"].cancel()
            cut = [s for s in waiting if in_transaction(s)]
            if cut:
                log.warn("shutdown: {n} SMTP transaction(s) did not finish within "
                         "{timeout:g} s; cut off unacknowledged", n=len(cut), timeout=timeout)
            for session in waiting:
                _notify(session)
            done.callback(len(cut))

        calls["deadline"] = clock.callLater(timeout, deadline)
        calls["poll"] = clock.callLater(POLL_INTERVAL, poll)
        return done


def _finish(session: Any) -> bool:
    """Close a session whose transaction ended; True (it is done)."""
    _notify(session)
    return True


def _notify(session: Any) -> None:
    notice = getattr(session, "shutdown_notice", None)
    if notice is None:
        transport = getattr(session, "transport", None)
        if transport is not None:
            transport.loseConnection()
        return
    try:
        notice()
    except Exception:  # noqa: BLE001 - one broken session must not stop the shutdown
        log.failure("shutdown notice failed")
