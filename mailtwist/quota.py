"""Mailbox quotas at SMTP delivery: which accounts cannot take more mail.

Checked at RCPT, like Dovecot's LMTP does (552 5.2.2, permanent): an account
already at its quota, or one that a message of the size the client declared
with ``MAIL FROM ... SIZE=`` would take over it, refuses that recipient only.
A message accepted at RCPT is delivered even if it takes the mailbox a little
over its quota, so a message for several recipients is never refused for one
of them after DATA, when SMTP could only refuse it for all. Measuring usage
lists the Maildir, so it runs in the mail-io thread pool.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailtwist.directory import FileDirectory
from mailtwist.storage.store import MailStore


class QuotaChecker:
    """Answers whether local accounts can take *incoming* more bytes."""

    def __init__(self, directory: FileDirectory, store: MailStore, reactor,
                 threadpool: ThreadPool) -> None:
        self.directory = directory
        self.store = store
        self.reactor = reactor
        self.threadpool = threadpool

    def over_quota(self, accounts: Iterable[str], incoming: int = 0) -> defer.Deferred:
        """Fire with the accounts (of *accounts*) that cannot take the message."""
        limited = []
        for address in accounts:
            account = self.directory.get_account(address)
            if account is not None and account.quota_bytes > 0:
                limited.append((address, account.quota_bytes))
        if not limited:
            return defer.succeed([])
        return deferToThreadPool(self.reactor, self.threadpool, self._measure, limited, incoming)

    def _measure(self, limited: list[tuple[str, int]], incoming: int) -> list[str]:
        full = []
        for address, quota in limited:
            usage = self.store.maildir(address).quota_usage()
            if usage >= quota or usage + incoming > quota:
                full.append(address)
        return full
