"""Telling the ``[filters] mailbox`` chain about IMAP COPY, MOVE and APPEND.

The IMAP server calls :func:`notify_mailbox` once a command has succeeded.
The filters run after the command's reply (the client does not wait for a
spam filter to learn), their verdicts are ignored, and their failures are only
logged (see :meth:`FilterChain.notify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailtwist.interfaces import MailboxEvent

log = Logger()


def _reader(folder: Any):
    """A MailboxEvent reader for messages of *folder* (a SharedFolder)."""

    def read(uids: Sequence[int]) -> defer.Deferred:
        # Look the files up on the reactor (the folder's state lives there) ...
        infos = [(uid, message.info) for uid in uids
                 if (message := folder.messages.get(uid)) is not None]

        def read_blocking() -> list[tuple[int, bytes]]:
            # ... and read them in a thread.
            result = []
            for uid, info in infos:
                try:
                    result.append((uid, folder.read_blocking(info)))
                except FileNotFoundError:
                    continue
            return result

        return deferToThreadPool(folder.reactor, folder.pool, read_blocking)

    return read


def notify_mailbox(chain: Any, user: str, kind: str, source: str | None, destination: Any,
                   pairs: Sequence[tuple[int | None, int]]) -> defer.Deferred | None:
    """Tell *chain* that *user*'s messages went into *destination* (a SharedFolder):
    *pairs* are (source UID, new UID), the source UID None for APPEND.  Returns
    the notification's Deferred (never failing), or None without filters."""
    if not chain or not pairs:
        return None
    event = MailboxEvent(
        user=user, kind=kind, source=source, destination=destination.name,
        source_uids=tuple(s for s, _ in pairs if s is not None),
        uids=tuple(d for _, d in pairs), reader=_reader(destination))
    d = chain.notify(event)
    d.addErrback(lambda f: log.failure("mailbox event filters", f))
    return d
