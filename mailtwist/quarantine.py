"""The quarantine: messages a filter held back with a ``Quarantine`` verdict.

Each entry is two files under ``data_dir/quarantine/``: ``ID.msg`` (the
message as the filters left it, CRLF) and ``ID.json`` (its envelope: sender,
the local copies and remote recipients it was meant for, the reason, the
filter and stage).  Both are written like a delivery: a temp file, fsync,
rename into place, fsync of the directory; the message first, so an entry
exists only once its envelope is durable.  The SMTP client gets its 250 only
after that.

``mailtwist quarantine release ID`` delivers an entry to its original
recipients through the normal path (local copies into their Maildirs, remote
recipients into the outbound spool) without asking the filters again, then
removes it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailtwist.delivery import LocalDelivery, Mailbox
from mailtwist.queue.envelope import Envelope, Recipient
from mailtwist.queue.spool import Spool, _fsync_dir, _write_file

_ID = re.compile(r"^[0-9A-F]{8,32}$")


class QuarantineError(Exception):
    """A quarantine entry is missing or unreadable; one line for the admin."""


@dataclass
class QuarantinedCopy:
    """One local copy the message was meant for."""

    account: str
    address: str
    folder: str = "INBOX"
    flags: str = ""


@dataclass
class QuarantineEntry:
    """The envelope of a quarantined message."""

    sender: str
    reason: str
    stage: str
    filter: str | None = None
    local: list[QuarantinedCopy] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    created: float = 0.0
    queue_id: str | None = None
    role: str | None = None
    peer: str | None = None
    user: str | None = None
    sign: bool = False
    ret: str | None = None
    envid: str | None = None
    id: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> QuarantineEntry:
        try:
            raw = json.loads(data)
            raw["local"] = [QuarantinedCopy(**c) for c in raw.get("local", [])]
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise QuarantineError(f"unreadable quarantine envelope: {e}") from None

    @property
    def recipients(self) -> list[str]:
        """Every address it was meant for (local copies by their envelope address)."""
        seen: dict[str, None] = {}
        for copy in self.local:
            seen.setdefault(copy.address, None)
        for address in self.remote:
            seen.setdefault(address, None)
        return list(seen)


def new_quarantine_id() -> str:
    """A unique, time-ordered id (hex seconds, then random)."""
    return f"{int(time.time()):09X}{os.urandom(4).hex().upper()}"


class QuarantineStore:
    """The quarantine directory of one data directory.  The ``*_blocking``
    methods do file I/O and fsync: call them from a thread (:meth:`add` does)."""

    def __init__(self, root: str | os.PathLike[str], reactor: Any = None,
                 threadpool: Any = None) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.reactor = reactor
        self.threadpool = threadpool

    def _path(self, entry_id: str, suffix: str) -> Path:
        if not _ID.fullmatch(entry_id or ""):
            raise QuarantineError(f"invalid quarantine id {entry_id!r}")
        return self.root / (entry_id + suffix)

    # -- writing ----------------------------------------------------------------

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        pool = self.threadpool if self.threadpool is not None else reactor.getThreadPool()
        return deferToThreadPool(reactor, pool, function, *args)

    def add(self, message: bytes, entry: QuarantineEntry) -> defer.Deferred:
        """Store an entry durably in a thread; fires with its id."""
        return self._in_thread(self.add_blocking, message, entry)

    def discard(self, entry_ids: list[str]) -> defer.Deferred:
        """Remove entries just added, in a thread (a later write failed)."""
        return self._in_thread(self.remove_quietly, entry_ids)

    def add_blocking(self, message: bytes, entry: QuarantineEntry) -> str:
        """Store an entry durably (message, then envelope, then the directory)."""
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not entry.created:
            entry.created = time.time()
        for _ in range(20):
            entry.id = new_quarantine_id()
            try:
                _write_file(self.root, self.tmp, entry.id + ".msg", message, exclusive=True)
                break
            except FileExistsError:
                continue
        else:
            raise OSError("cannot find a free quarantine id")
        try:
            _write_file(self.root, self.tmp, entry.id + ".json", entry.to_json(),
                        exclusive=True)
            _fsync_dir(self.root)
        except BaseException:
            self._unlink(self.root / (entry.id + ".msg"))
            raise
        return entry.id

    def remove(self, entry_id: str) -> None:
        """Delete an entry (envelope first, so a half-removed entry is not listed)."""
        envelope, message = self._path(entry_id, ".json"), self._path(entry_id, ".msg")
        if not envelope.exists():
            raise QuarantineError(f"no quarantined message {entry_id}")
        self._unlink(envelope)
        self._unlink(message)
        _fsync_dir(self.root)

    def remove_quietly(self, entry_ids: list[str]) -> None:
        """Roll back entries just added (a later part of the delivery failed)."""
        for entry_id in entry_ids:
            try:
                self.remove(entry_id)
            except (OSError, QuarantineError):
                pass

    def clean_blocking(self, now: float | None = None, max_age: float = 3600.0) -> int:
        """Remove what a crash left: temp files, and messages whose envelope was
        never written (the client was not told 250 for them), once older than
        *max_age* seconds, so that live writes (other workers') are never
        touched. Returns how many files went."""
        now = time.time() if now is None else now
        removed = 0
        candidates = list(self.tmp.iterdir()) if self.tmp.is_dir() else []
        if self.root.is_dir():
            candidates += [p for p in self.root.iterdir() if p.name.endswith(".msg")
                           and not (self.root / (p.name[:-4] + ".json")).exists()]
        for path in candidates:
            try:
                st = path.lstat()
                if not path.is_file() or now - st.st_mtime < max_age:
                    continue
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    # -- reading ----------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every complete entry, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.root.iterdir()
                      if p.name.endswith(".json") and _ID.fullmatch(p.name[:-5]))

    def load(self, entry_id: str) -> QuarantineEntry:
        try:
            data = self._path(entry_id, ".json").read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"no quarantined message {entry_id}") from None
        entry = QuarantineEntry.from_json(data)
        entry.id = entry_id
        return entry

    def read_message(self, entry_id: str) -> bytes:
        try:
            return self._path(entry_id, ".msg").read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"quarantined message {entry_id} has no message "
                                  "file") from None

    # -- release ----------------------------------------------------------------

    def release_blocking(self, entry_id: str, local: LocalDelivery, spool: Spool,
                         signer: Callable[[bytes], bytes] | None = None) -> QuarantineEntry:
        """Deliver an entry to its original recipients without filters (local
        copies durably into their Maildirs, remote recipients into the spool,
        DKIM-signed like the original would have been), then remove it."""
        entry = self.load(entry_id)
        message = self.read_message(entry_id)
        queued = None
        if entry.remote:
            now = time.time()
            envelope = Envelope(id=entry.queue_id or new_quarantine_id(), sender=entry.sender,
                                recipients=[Recipient(a) for a in entry.remote],
                                created=now, next_attempt=now, ret=entry.ret,
                                envid=entry.envid, user=entry.user)
            spooled = signer(message) if entry.sign and signer is not None else message
            queued = spool.enqueue(spooled, envelope)
        try:
            if entry.local:
                local.deliver_blocking(message, entry.sender,
                                       [Mailbox(c.account, c.address, c.folder, c.flags)
                                        for c in entry.local])
        except BaseException:
            if queued is not None:
                spool.remove(queued)
            raise
        self.remove(entry_id)
        return entry
