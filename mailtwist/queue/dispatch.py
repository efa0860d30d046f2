"""Accepting a message durably: local copies into Maildirs, the rest into the spool.

The SMTP session hands every accepted message here and answers 250 only when
:meth:`Dispatcher.deliver` fires, that is when every local copy and the spool
entry for the remote recipients are on stable storage.  If one part fails,
the part already written is removed, so the client's retry after our 4xx
duplicates nothing.  Notices from the queue (DSNs) come in the same way.
"""

from __future__ import annotations

import errno
import re
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailtwist.delivery import DeliveryError, LocalDelivery, Mailbox
from mailtwist.queue.envelope import Envelope, Recipient
from mailtwist.queue.spool import Spool, new_id

log = Logger()

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


def header_section(message: bytes) -> bytes:
    """The header section of a CRLF (or LF) message, without the blank line."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end >= 0:
            return message[: end + len(separator) // 2]
    return message


def received_count(message: bytes) -> int:
    """How many Received headers the message carries (RFC 5321 6.3 loop detection)."""
    return len(_RECEIVED.findall(header_section(message)))


class Dispatcher:
    """Routes one accepted message to Maildirs and the outbound spool."""

    def __init__(self, local: LocalDelivery, spool: Spool, directory, reactor,
                 threadpool: ThreadPool, signer: Callable[[bytes], bytes] | None = None) -> None:
        self.local = local
        self.spool = spool
        self.directory = directory
        self.reactor = reactor
        self.threadpool = threadpool
        self.signer = signer
        self.runner = None
        #: the [filters] outbound chain; mail queued without a client (notices)
        #: passes it in the queue runner, before each delivery attempt
        self.outbound_filters = None

    def deliver(self, message: bytes, sender: str, mailboxes: Iterable[Mailbox],
                remote: Iterable[Recipient] = (), *, ret: str | None = None,
                envid: str | None = None, user: str | None = None, sign: bool = False,
                queue_id: str | None = None,
                outbound_message: bytes | None = None,
                filter_later: bool = False) -> defer.Deferred:
        """Fire with the spool entry's Envelope (None if nothing went to the spool)
        once everything is durable; fail with DeliveryError otherwise.
        *outbound_message* is the copy for the spool when the outbound filters
        edited its headers (it is signed instead of *message*).  With
        *filter_later* the spool entry is marked for the outbound filters of the
        queue runner and signed only after them."""
        remote = _unique(remote)
        envelope = None
        if remote:
            now = self.reactor.seconds()
            envelope = Envelope(id=queue_id or new_id(), sender=sender, recipients=remote,
                                created=now, next_attempt=now, ret=ret, envid=envid, user=user)
            if filter_later:
                envelope.extra["outbound_filters"] = "pending"
                envelope.extra["sign"] = sign
                sign = False
        d = deferToThreadPool(self.reactor, self.threadpool, self._deliver_blocking,
                              message, sender, list(mailboxes), envelope, sign,
                              outbound_message)
        d.addCallback(self._queued)
        return d

    def _deliver_blocking(self, message: bytes, sender: str, mailboxes: list[Mailbox],
                          envelope: Envelope | None, sign: bool,
                          outbound_message: bytes | None = None) -> Envelope | None:
        if envelope is not None:
            spooled = message if outbound_message is None else outbound_message
            if sign and self.signer is not None:
                spooled = self.signer(spooled)
            try:
                self.spool.enqueue(spooled, envelope)
            except OSError as e:
                log.error("cannot write the queue entry: {error}", error=e)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DeliveryError("Insufficient system storage", enhanced="4.3.1") from e
                raise DeliveryError("Local error in processing: cannot write queue") from e
        try:
            if mailboxes:
                self.local.deliver_blocking(message, sender, mailboxes)
        except BaseException:
            if envelope is not None:
                try:
                    self.spool.remove(envelope.id)
                except OSError as e:
                    log.error("could not remove queue entry {id}: {error}",
                              id=envelope.id, error=e)
            raise
        return envelope

    def _queued(self, envelope: Envelope | None) -> Envelope | None:
        if envelope is not None and self.runner is not None:
            self.runner.queued(envelope)
        return envelope

    def route(self, address: str) -> tuple[list[Mailbox], list[Recipient]]:
        """Local mailboxes and remote recipients for one address (blocking lookups
        are in memory: the directory is parsed already)."""
        domain = address.rpartition("@")[2]
        if not domain or not self.directory.is_local_domain(domain):
            return [], [Recipient(address)]
        resolution = self.directory.resolve(address)
        if resolution is None:
            return [], []
        return ([Mailbox(a, address) for a in resolution.local],
                [Recipient(a) for a in resolution.remote])

    def send_notice(self, report: bytes, to: str) -> defer.Deferred:
        """Deliver a DSN (null sender) to *to*, locally or through the queue."""
        mailboxes, remote = self.route(to)
        if not mailboxes and not remote:
            log.warn("no mailbox for notice to {to}; dropped", to=to)
            return defer.succeed(None)
        return self.deliver(report, "", mailboxes, remote, sign=True,
                            filter_later=bool(remote and self.outbound_filters))


def _unique(recipients: Iterable[Recipient]) -> list[Recipient]:
    seen: dict[str, Recipient] = {}
    for r in recipients:
        seen.setdefault(r.address.lower(), r)
    return list(seen.values())
