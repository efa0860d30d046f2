"""Prometheus metrics of one running server, in a registry of its own.

:class:`Metrics` holds the counters; ``tap.build_service`` hooks them in
without the protocol modules knowing: listener factories, the SMTP
factories' dispatcher, the local delivery and the Portal's checkers are
wrapped in small counting proxies.  The web listener serves
:meth:`Metrics.render` at ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.protocol import Factory

PREFIX = "mailtwist"


class Metrics:
    """The server's counters and gauges in a private CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Counter(
            f"{PREFIX}_connections", "Connections accepted, per listener role",
            ["role"], registry=self.registry)
        self.received = Counter(
            f"{PREFIX}_messages_received",
            "Messages accepted over SMTP (stored locally or queued), per listener role",
            ["role"], registry=self.registry)
        self.delivered = Counter(
            f"{PREFIX}_messages_delivered",
            "Message copies written into local mailboxes", registry=self.registry)
        self.auth = Counter(
            f"{PREFIX}_auth", "Password checks by result (success, failure)",
            ["result"], registry=self.registry)
        self.queue_size = Gauge(
            f"{PREFIX}_queue_messages", "Messages in the outbound queue",
            registry=self.registry)

    def watch_queue(self, count: Callable[[], int]) -> None:
        """Report *count()* (which may block: it runs while rendering) as the queue size."""
        self.queue_size.set_function(count)

    def render(self) -> bytes:
        """The text exposition format; blocking (gauge functions read the disk)."""
        return generate_latest(self.registry)

    def count_connections(self, factory: Factory, role: str) -> CountingFactory:
        return CountingFactory(factory, self.connections.labels(role=role))

    def count_received(self, dispatcher: Any, role: str) -> CountingDispatcher:
        return CountingDispatcher(dispatcher, self.received.labels(role=role))

    def count_deliveries(self, delivery: Any) -> CountingDelivery:
        return CountingDelivery(delivery, self.delivered)

    def count_logins(self, portal: Any) -> None:
        """Wrap each of *portal*'s checkers so password checks are counted."""
        for interface, checker in list(portal.checkers.items()):
            if not isinstance(checker, CountingChecker):
                portal.checkers[interface] = CountingChecker(checker, self.auth)


class _Proxy:
    """Delegates every attribute it does not define to the wrapped object."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class CountingFactory(Factory):
    """Counts connections, then lets the wrapped factory build the protocol.

    Other attributes are the wrapped factory's, so code that inspects the
    listener's factory (``wrappedFactory`` or attributes of it) still works.
    """

    def __init__(self, wrapped: Factory, counter: Any) -> None:
        self.wrappedFactory = wrapped
        self.counter = counter
        self.noisy = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrappedFactory"], name)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is not None:
            self.counter.inc()
        return protocol


class CountingDispatcher(_Proxy):
    """Counts messages the wrapped dispatcher made durable."""

    def __init__(self, wrapped: Any, counter: Any) -> None:
        super().__init__(wrapped)
        self._counter = counter

    def deliver(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        d = self._wrapped.deliver(*args, **kwargs)

        def counted(result: Any) -> Any:
            self._counter.inc()
            return result

        return d.addCallback(counted)


class CountingDelivery(_Proxy):
    """Counts the mailbox copies the wrapped LocalDelivery wrote (one per account)."""

    def __init__(self, wrapped: Any, counter: Any) -> None:
        super().__init__(wrapped)
        self._counter = counter

    def deliver(self, message: bytes, sender: str, mailboxes: Any) -> defer.Deferred:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._wrapped.reactor, self._wrapped.threadpool,
                                 self.deliver_blocking, message, sender, list(mailboxes))

    def deliver_blocking(self, message: bytes, sender: str, mailboxes: list) -> None:
        mailboxes = list(mailboxes)
        self._wrapped.deliver_blocking(message, sender, mailboxes)
        self._counter.inc(len({box.account for box in mailboxes}))


class CountingChecker(_Proxy):
    """A cred checker that counts successful and failed password checks."""

    def __init__(self, wrapped: Any, counter: Any) -> None:
        super().__init__(wrapped)
        self._counter = counter
        self.credentialInterfaces = wrapped.credentialInterfaces

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        d = defer.maybeDeferred(self._wrapped.requestAvatarId, credentials)

        def success(avatar_id: Any) -> Any:
            self._counter.labels(result="success").inc()
            return avatar_id

        def failure(reason: Any) -> Any:
            if reason.check(UnauthorizedLogin):
                self._counter.labels(result="failure").inc()
            return reason

        return d.addCallbacks(success, failure)
