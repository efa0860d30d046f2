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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.application import service
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher

from mailtwist.wrapping import WrappingFactory

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
        self.transactions = Counter(
            f"{PREFIX}_smtp_transactions",
            "SMTP mail transactions by listener role and result (accepted, deferred, "
            "rejected)", ["role", "result"], registry=self.registry)
        self.outbound = Counter(
            f"{PREFIX}_outbound_attempts",
            "Outbound delivery attempts per recipient by outcome (delivered, deferred, "
            "bounced)", ["outcome"], registry=self.registry)
        self.outbound_latency = Histogram(
            f"{PREFIX}_outbound_delivery_seconds",
            "Seconds from queueing to successful delivery of an outbound recipient",
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400),
            registry=self.registry)
        self.local_latency = Histogram(
            f"{PREFIX}_local_delivery_seconds",
            "Seconds to write (and fsync) one message into local Maildirs",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry)
        self.filter_verdicts = Counter(
            f"{PREFIX}_filter_verdicts",
            "Filter answers other than Continue, by filter, stage and verdict",
            ["filter", "stage", "verdict"], registry=self.registry)

    _OUTCOMES = {"delivered": "delivered", "pending": "deferred", "failed": "bounced"}

    def observe(self, event: dict) -> None:
        """Count one structured log event (mailtwist.events) if it is one we count."""
        kind = event.get("event_kind")
        if kind == "smtp.transaction":
            self.transactions.labels(role=str(event.get("role")),
                                     result=str(event.get("result"))).inc()
        elif kind == "delivery.attempt":
            outcome = self._OUTCOMES.get(event.get("status"), "deferred")
            self.outbound.labels(outcome=outcome).inc()
            if outcome == "delivered":
                self.outbound_latency.observe(float(event.get("age") or 0.0))
        elif kind == "filter.verdict":
            self.filter_verdicts.labels(filter=str(event.get("filter")),
                                        stage=str(event.get("stage")),
                                        verdict=str(event.get("verdict"))).inc()

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
        return CountingDelivery(delivery, self.delivered, self.local_latency)

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


class CountingFactory(WrappingFactory):
    """Counts connections, then lets the wrapped factory build the protocol."""

    def __init__(self, wrapped: Factory, counter: Any) -> None:
        super().__init__(wrapped)
        self.counter = counter

    def built(self, protocol) -> None:
        self.counter.inc()


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

    def __init__(self, wrapped: Any, counter: Any, latency: Any) -> None:
        super().__init__(wrapped)
        self._counter = counter
        self._latency = latency

    def deliver(self, message: bytes, sender: str, mailboxes: Any) -> defer.Deferred:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._wrapped.reactor, self._wrapped.threadpool,
                                 self.deliver_blocking, message, sender, list(mailboxes))

    def deliver_blocking(self, message: bytes, sender: str, mailboxes: list) -> None:
        mailboxes = list(mailboxes)
        with self._latency.time():
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


class EventCounter(service.Service):
    """Feeds the structured log events (mailtwist.events) to :meth:`Metrics.observe`
    while the server runs: transactions, outbound outcomes and latency, filter
    verdicts are counted where they are logged, without more hooks."""

    def __init__(self, metrics: Metrics, publisher: Any = None) -> None:
        self.metrics = metrics
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.metrics.observe)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self.metrics.observe)
