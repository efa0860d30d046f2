"""The queue runner: delivers spooled mail, retries with back-off, sends notices.

Each entry has one timer (``clock.callLater``) for its next attempt.  An
attempt claims the entry (``flock``, so the CLI never changes it under us),
delivers the pending recipients domain by domain, writes their new state
durably *before* anything else (so a crash never delivers twice what a
remote host acknowledged), sends the DSNs that are due, then removes the
entry or schedules the next attempt.  A periodic re-scan of the spool picks
up what the CLI changed (flush, bounce, delete).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailtwist import events
from mailtwist.dsn import ReportItem, build_report
from mailtwist.outbound.client import OutgoingMessage, Outcome
from mailtwist.queue.dispatch import header_section, received_count
from mailtwist.queue.envelope import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    EnvelopeError,
    Recipient,
)
from mailtwist.queue.spool import Spool, SpoolError

log = Logger()

BUSY_RETRY = 5.0


def backoff(attempts: int, first: float, cap: float) -> float:
    """Seconds to wait after the *attempts*-th failed attempt: first, doubling, capped."""
    return min(cap, first * 2 ** max(0, attempts - 1))


class QueueRunner(service.Service):
    """Delivers the entries of one spool.

    It owns its thread pool and stops it only after the attempts under way
    have written their results, so nothing acknowledged is lost on shutdown.
    """

    def __init__(self, spool: Spool, settings, transport, dispatcher, hostname: str,
                 reactor, threadpool: ThreadPool, max_recipients: int = 50,
                 clock=None) -> None:
        self.spool = spool
        self.settings = settings
        self.transport = transport
        self.dispatcher = dispatcher
        self.hostname = hostname
        self.clock = clock or reactor
        self.reactor = reactor
        self.threadpool = threadpool
        self.max_recipients = max_recipients
        self._timers: dict[str, Any] = {}
        self._stamps: dict[str, Any] = {}
        self._active: dict[str, defer.Deferred] = {}
        self._scan_timer = None
        self._scanning: defer.Deferred | None = None
        self._touched: set[str] = set()
        self._limit = defer.DeferredSemaphore(settings.concurrency)

    def _in_thread(self, f, *args) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.transport.closing = False
        self.threadpool.start()
        self.scan()

    def stopService(self) -> defer.Deferred | None:
        if not self.running:
            return None
        super().stopService()
        for timer in list(self._timers.values()):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._scan_timer is not None and self._scan_timer.active():
            self._scan_timer.cancel()
        self.transport.abort_all()
        d = self.idle()
        d.addBoth(lambda _: self.threadpool.stop())
        return d

    def idle(self) -> defer.Deferred:
        """Fires once the attempts and the scan under way have finished."""
        waiting = list(self._active.values())
        if self._scanning is not None:
            waiting.append(self._scanning)
        return defer.DeferredList(waiting, consumeErrors=True)

    # -- scheduling ------------------------------------------------------------

    def queued(self, envelope: Envelope) -> None:
        """A new entry was spooled by this process: try it now."""
        if self.running:
            self._schedule(envelope.id, envelope.next_attempt)

    def scan(self) -> defer.Deferred:
        """Re-read the spool: schedule new entries and those whose envelope changed."""
        if self._scanning is not None:
            return self._scanning
        self._touched = set()
        d = self._in_thread(self._scan_blocking)
        d.addCallback(self._scanned)
        d.addErrback(lambda f: log.failure("queue scan failed", f))

        def done(_: object) -> None:
            self._scanning = None
            if self.running:
                self._scan_timer = self.clock.callLater(self.settings.scan_interval, self.scan)
        d.addBoth(done)
        self._scanning = d
        return d

    def _scan_blocking(self) -> list[tuple[str, Any, float | None]]:
        self.spool.ensure()
        self.spool.clean()
        found = []
        for entry_id in self.spool.ids():
            stamp = self.spool.stamp(entry_id)
            if stamp is None:
                continue
            if stamp == self._stamps.get(entry_id):
                found.append((entry_id, stamp, None))
                continue
            try:
                envelope = self.spool.load(entry_id)
            except (EnvelopeError, SpoolError, OSError) as e:
                log.error("queue entry {id} unreadable: {error}", id=entry_id, error=e)
                found.append((entry_id, stamp, None))
                continue
            found.append((entry_id, stamp, envelope.next_attempt))
        return found

    def _scanned(self, found: list[tuple[str, Any, float | None]]) -> None:
        present = set()
        for entry_id, stamp, next_attempt in found:
            present.add(entry_id)
            if entry_id in self._touched:
                continue
            changed = self._stamps.get(entry_id) != stamp
            self._stamps[entry_id] = stamp
            if changed and next_attempt is not None and entry_id not in self._active:
                self._schedule(entry_id, next_attempt)
        for entry_id in set(self._stamps) - present:
            if entry_id not in self._active and entry_id not in self._touched:
                self._forget(entry_id)

    def _schedule(self, entry_id: str, when: float) -> None:
        if not self.running:
            return
        timer = self._timers.pop(entry_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timers[entry_id] = self.clock.callLater(delay, self._start, entry_id)

    def _forget(self, entry_id: str) -> None:
        timer = self._timers.pop(entry_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._stamps.pop(entry_id, None)

    def _start(self, entry_id: str) -> None:
        self._timers.pop(entry_id, None)
        if entry_id in self._active or not self.running:
            return
        d = self._limit.run(self._attempt, entry_id)
        d.addErrback(lambda f: log.failure("queue entry {id}: attempt failed", f, id=entry_id))
        self._active[entry_id] = d
        d.addBoth(self._finished, entry_id)

    def _finished(self, _: object, entry_id: str) -> None:
        """What a scan that overlapped this attempt read of the entry is stale."""
        del self._active[entry_id]
        self._touched.add(entry_id)

    # -- one attempt -----------------------------------------------------------

    def _claim(self, entry_id: str):
        lock = self.spool.lock(entry_id)
        if lock is None:
            return None
        try:
            envelope = self.spool.load(entry_id)
            message = self.spool.read_message(entry_id)
        except BaseException:
            lock.release()
            raise
        return lock, envelope, message

    def _attempt(self, entry_id: str) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._attempt_async(entry_id))

    async def _attempt_async(self, entry_id: str) -> None:
        if not self.running:
            return
        try:
            claimed = await self._in_thread(self._claim, entry_id)
        except (SpoolError, EnvelopeError) as e:
            log.warn("queue entry {id}: {error}", id=entry_id, error=e)
            self._forget(entry_id)
            return
        if claimed is None:
            self._schedule(entry_id, self.clock.seconds() + BUSY_RETRY)
            return
        lock, envelope, message = claimed
        try:
            await self._process(envelope, message)
        finally:
            lock.release()

    async def _process(self, envelope: Envelope, message: bytes) -> None:
        if not self.running:
            return
        now = self.clock.seconds()
        pending = envelope.pending()
        if pending:
            if now - envelope.created >= self.settings.max_age:
                for r in pending:
                    last = f"; last error: {r.text}" if r.text else ""
                    _mark(r, FAILED, now, r.code, _temporary_status(r.enhanced, "4.4.7"),
                          f"delivery time expired{last}")
            elif (hops := received_count(message)) > self.settings.max_hops:
                for r in pending:
                    _mark(r, FAILED, now, None, "5.4.6",
                          f"too many hops ({hops} Received headers): "
                          "mail loop")
            else:
                outgoing = await self._outbound_stage(envelope, pending, message, now)
                if outgoing is not None:
                    await self._deliver(envelope, pending, outgoing, now)
            envelope.attempts += 1
            await self._in_thread(self.spool.save, envelope)
        if not self.running:
            return
        reported = await self._notify(envelope, message, now)
        if not envelope.pending() and reported:
            await self._in_thread(self.spool.remove, envelope.id)
            self._forget(envelope.id)
            log.info("{id}: removed from the queue", id=envelope.id)
            return
        if envelope.pending():
            delay = backoff(envelope.attempts, self.settings.retry_first,
                            self.settings.retry_max)
            envelope.next_attempt = min(now + delay, envelope.created + self.settings.max_age)
        else:
            envelope.next_attempt = now + self.settings.retry_first
        await self._in_thread(self.spool.save, envelope)
        self._stamps[envelope.id] = await self._in_thread(self.spool.stamp, envelope.id)
        self._schedule(envelope.id, envelope.next_attempt)

    async def _deliver(self, envelope: Envelope, pending: list[Recipient], message: bytes,
                       now: float) -> None:
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for r in pending:
            by_domain[r.domain].append(r)
        domains = sorted(by_domain)
        attempts = [defer.Deferred.fromCoroutine(
            self.transport.deliver(domain, self._messages(envelope, by_domain[domain], message)))
            for domain in domains]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        for domain, (ok, outcomes) in zip(domains, results):
            if not ok:
                log.failure("delivery to {domain} crashed", outcomes, domain=domain)
                outcomes = {r.address: Outcome(PENDING, None, "4.3.0", "local error in delivery")
                            for r in by_domain[domain]}
            for r in by_domain[domain]:
                outcome = outcomes.get(r.address)
                if outcome is None:
                    continue
                _mark(r, outcome.status, now, outcome.code, outcome.enhanced, outcome.text,
                      outcome.remote_mta)
                r.dsn_relayed = outcome.dsn_relayed
                events.delivery_attempt(
                    queue_id=envelope.id, recipient=r.address, relay=outcome.remote_mta,
                    status=outcome.status, code=outcome.code, enhanced=outcome.enhanced,
                    text=outcome.text, attempt=envelope.attempts + 1, size=len(message),
                    age=max(0.0, now - envelope.created))

    async def _outbound_stage(self, envelope: Envelope, pending: list[Recipient],
                              message: bytes, now: float) -> bytes | None:
        """Mail queued without a client (notices) passes the ``[filters] outbound``
        chain here, before each attempt: Reject fails the recipients (a bounce),
        TempFail or a filter error defers them, Discard drops them silently.
        Returns the copy to send (header edits applied, then DKIM-signed), or
        None when nothing is to be sent this time."""
        if envelope.extra.get("outbound_filters") != "pending":
            return message
        from mailtwist.interfaces import Discard, FilterSession, Reject, TempFail

        chain = getattr(self.dispatcher, "outbound_filters", None)
        if chain:
            addresses = [r.address for r in pending]
            session = FilterSession(role="queue", peer_host="", user=envelope.user,
                                    sender=envelope.sender, recipients=list(addresses),
                                    queue_id=envelope.id)
            result = await chain.run("outbound", session, message, addresses)
            verdict = result.verdict
            if isinstance(verdict, (Reject, TempFail)):
                status = FAILED if isinstance(verdict, Reject) else PENDING
                for r in pending:
                    _mark(r, status, now, verdict.code, verdict.enhanced,
                          f"{verdict.text} (outbound filter {result.filter})")
                return None
            if isinstance(verdict, Discard):
                for r in pending:
                    _mark(r, DELIVERED, now, None, "2.0.0",
                          f"discarded by outbound filter {result.filter}")
                    r.reported = True
                return None
            message = result.message
        signer = getattr(self.dispatcher, "signer", None)
        if envelope.extra.get("sign") and signer is not None:
            message = await self._in_thread(signer, message)
        return message

    def _messages(self, envelope: Envelope, recipients: list[Recipient],
                  message: bytes) -> list[OutgoingMessage]:
        size = self.max_recipients
        return [OutgoingMessage(envelope.sender, recipients[i:i + size], message,
                                envelope.ret, envelope.envid)
                for i in range(0, len(recipients), size)]

    # -- notices ---------------------------------------------------------------

    async def _notify(self, envelope: Envelope, message: bytes, now: float) -> bool:
        """Send the DSNs that are due; False if one could not be delivered."""
        items = []
        final = [r for r in envelope.recipients if r.status != PENDING and not r.reported]
        for r in final:
            if r.status == FAILED and r.wants("FAILURE"):
                items.append(ReportItem(r, "failed"))
            elif r.status == DELIVERED and r.wants("SUCCESS") and not r.dsn_relayed:
                items.append(ReportItem(r, "relayed"))
        delay_due = (not envelope.warned and self.settings.delay_warning > 0
                     and now - envelope.created >= self.settings.delay_warning
                     and bool(envelope.pending()))
        delayed = []
        if delay_due:
            delayed = [ReportItem(r, "delayed") for r in envelope.pending() if r.wants("DELAY")]
        ok = True
        for group in (items, delayed):
            if not group or not envelope.sender:
                continue
            failed = any(item.action == "failed" for item in group)
            report = build_report(
                hostname=self.hostname, to=envelope.sender, items=group,
                headers=header_section(message),
                message=message if failed and envelope.ret == "FULL" else None,
                envid=envelope.envid, arrival=envelope.created,
                retry_until=envelope.created + self.settings.max_age, now=now)
            try:
                await self.dispatcher.send_notice(report, envelope.sender)
            except Exception as e:
                log.error("{id}: could not deliver the notice to {to}: {error}",
                          id=envelope.id, to=envelope.sender, error=e)
                ok = False
                continue
            log.info("{id}: sent {kind} notice to {to}", id=envelope.id,
                     kind="/".join(sorted({i.action for i in group})), to=envelope.sender)
        if ok:
            for r in final:
                r.reported = True
            envelope.warned = envelope.warned or delay_due
        return ok


def _mark(r: Recipient, status: str, now: float, code: int | None, enhanced: str, text: str,
          remote_mta: str | None = None) -> None:
    r.status = status
    r.code = code
    r.enhanced = enhanced
    r.text = text
    r.remote_mta = remote_mta
    r.updated = now


def _temporary_status(enhanced: str | None, default: str) -> str:
    return enhanced if enhanced and enhanced.startswith("4.") else default
