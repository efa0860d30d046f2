"""Local delivery: one accepted message into each recipient's Maildir, durably.

``Maildir.deliver`` writes tmp/, fsyncs, renames into new/ and fsyncs the
directory; here we do that for every mailbox of a transaction in a worker
thread and roll back the copies already written when one fails, so the client's
retry after our 4xx does not duplicate mail.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailtwist.storage.store import MailStore

log = Logger()


@dataclass(frozen=True)
class Mailbox:
    """One local copy to write: the account, the address the mail was sent to,
    and (chosen by filters) the folder and Maildir flag letters."""

    account: str
    original: str
    folder: str = "INBOX"
    flags: str = ""


class DeliveryError(Exception):
    """Delivery failed; *temporary* says whether the sender should retry."""

    def __init__(self, message: str, temporary: bool = True, enhanced: str = "4.3.0") -> None:
        super().__init__(message)
        self.temporary = temporary
        self.enhanced = enhanced


def _header_value(address: str) -> bytes:
    return address.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")


class LocalDelivery:
    """Writes messages into Maildirs from a thread pool."""

    def __init__(self, store: MailStore, reactor, threadpool: ThreadPool) -> None:
        self.store = store
        self.reactor = reactor
        self.threadpool = threadpool

    def deliver(self, message: bytes, sender: str, mailboxes: Iterable[Mailbox]) -> defer.Deferred:
        """Fire with None once every copy is on stable storage, or fail with DeliveryError."""
        return deferToThreadPool(
            self.reactor, self.threadpool, self.deliver_blocking, message, sender, list(mailboxes)
        )

    def deliver_blocking(self, message: bytes, sender: str, mailboxes: list[Mailbox]) -> None:
        written: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        try:
            for box in mailboxes:
                if box.account in seen:
                    continue
                seen.add(box.account)
                headers = (
                    b"Return-Path: <" + _header_value(sender) + b">\r\n"
                    b"Delivered-To: " + _header_value(box.original) + b"\r\n"
                )
                maildir = self.store.maildir(box.account)
                if box.folder != "INBOX":
                    _ensure_folder(maildir, box.folder)
                base = maildir.deliver(headers + message, folder=box.folder, flags=box.flags)
                written.append((box.account, box.folder, base))
        except OSError as e:
            self._roll_back(written)
            log.error("delivery to {account} failed: {error}", account=box.account, error=e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DeliveryError("Insufficient system storage", enhanced="4.3.1") from e
            raise DeliveryError("Local error in processing: cannot write mailbox") from e

    def _roll_back(self, written: list[tuple[str, str, str]]) -> None:
        for account, folder, base in written:
            folder_path = self.store.maildir(account).folder_path(folder)
            for path in [*(folder_path / "new").glob(base + "*"),
                         *(folder_path / "cur").glob(base + "*")]:
                try:
                    path.unlink()
                except OSError as e:
                    log.error("could not remove partial delivery {path}: {error}",
                              path=path, error=e)


def _ensure_folder(maildir, folder: str) -> None:
    """Create a folder a filter files into, if it does not exist yet."""
    from mailtwist.storage.maildir import FolderNotFound

    try:
        maildir.folder(folder)
    except FolderNotFound:
        try:
            maildir.create_folder(folder)
        except FileExistsError:
            pass
