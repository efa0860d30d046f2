"""Greylisting at RCPT (the ``greylist`` filter), like postgrey.

The triplet is (client network, envelope sender, recipient): the client's /24
(IPv4) or /64 (IPv6) by default, so that a sender's pool of outgoing servers
counts as one client.  The first time a triplet is seen the recipient is
refused with ``451 4.7.1``; a retry after ``delay`` seconds and within
``retry_window`` passes, and the triplet is then remembered for ``expire``
seconds (renewed on every use).  A client network with ``auto_whitelist``
passed triplets is let through for any triplet.

State lives in an SQLite database in the filter's state directory, used only
from the server's thread pool (never on the reactor), so it survives restarts;
expired entries are purged every ``purge_interval`` seconds and the number of
pending triplets is capped at ``max_entries``.  A database error lets the mail
through (and is logged): greylisting is a nuisance filter, not a gate that may
lose mail.  See docs/builtin-filters.md.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailtwist.filters import Filter, FilterConfigError, FilterFactory
from mailtwist.filters.dnsbl import (
    IPNetwork,
    check_positive,
    client_ip,
    dnswl_listed,
    in_networks,
    parse_networks,
)
from mailtwist.interfaces import CONTINUE, TempFail

log = Logger()

DB_NAME = "greylist.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL,
    PRIMARY KEY (client, sender, recipient));
CREATE INDEX IF NOT EXISTS triplets_last_seen ON triplets (passed, last_seen);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY, passed INTEGER NOT NULL, last_seen REAL NOT NULL);
"""


@dataclass(frozen=True)
class Decision:
    """The answer for one triplet: pass, or wait *retry_in* more seconds."""

    passed: bool
    retry_in: int = 0
    why: str = ""


def normalize_sender(sender: str) -> str:
    """The sender as the triplet stores it: lower case, BATV (``prvs=...=``)
    stripped and digit runs of the local part as ``#`` (VERP/bounce addresses
    change on every message; postgrey does the same)."""
    sender = sender.strip().lower()
    if "@" not in sender:
        return sender
    local, _, domain = sender.rpartition("@")
    local = re.sub(r"^(prvs|btv1|msprvs1)=[^=]+=", "", local)
    return re.sub(r"\d+", "#", local) + "@" + domain


class GreylistStore:
    """The triplet database; every method blocks, so call them in a thread."""

    def __init__(self, directory: Path, max_entries: int) -> None:
        self.path = Path(directory) / DB_NAME
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def decide(self, client: str, sender: str, recipient: str, now: float, delay: float,
               retry_window: float, expire: float, auto_whitelist: int) -> Decision:
        """Look the triplet up, record what happened, and say whether it passes."""
        with self._lock:
            db = self._open()
            with db:
                db.execute("BEGIN IMMEDIATE")
                return self._decide(db, client, sender, recipient, now, delay, retry_window,
                                    expire, auto_whitelist)

    @staticmethod
    def _decide(db: sqlite3.Connection, client: str, sender: str, recipient: str,
                now: float, delay: float, retry_window: float, expire: float,
                auto_whitelist: int) -> Decision:
        if auto_whitelist:
            row = db.execute("SELECT passed, last_seen FROM clients WHERE client = ?",
                             (client,)).fetchone()
            if row and row[0] >= auto_whitelist and now - row[1] < expire:
                db.execute("UPDATE clients SET last_seen = ? WHERE client = ?", (now, client))
                return Decision(True, why="auto-whitelisted client")
        key = (client, sender, recipient)
        row = db.execute("SELECT first_seen, last_seen, passed FROM triplets WHERE "
                         "client = ? AND sender = ? AND recipient = ?", key).fetchone()
        if row is not None:
            first_seen, last_seen, passed = row
            if passed and now - last_seen < expire:
                db.execute("UPDATE triplets SET last_seen = ? WHERE client = ? AND "
                           "sender = ? AND recipient = ?", (now, *key))
                return Decision(True, why="known triplet")
            waited = now - first_seen
            if not passed and delay <= waited <= retry_window:
                db.execute("UPDATE triplets SET last_seen = ?, passed = 1 WHERE client = ? "
                           "AND sender = ? AND recipient = ?", (now, *key))
                db.execute("INSERT INTO clients (client, passed, last_seen) VALUES (?, 1, ?) "
                           "ON CONFLICT (client) DO UPDATE SET passed = passed + 1, "
                           "last_seen = excluded.last_seen", (client, now))
                return Decision(True, why=f"retried after {int(waited)} s")
            if not passed and 0 <= waited < delay:
                return Decision(False, max(1, int(delay - waited + 0.999)), "too early")
        # new, expired, or retried too late: (re)start the clock
        db.execute("INSERT OR REPLACE INTO triplets (client, sender, recipient, first_seen, "
                   "last_seen, passed) VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now))
        return Decision(False, max(1, int(delay + 0.999)), "new triplet")

    def purge(self, now: float, retry_window: float, expire: float) -> int:
        """Delete expired entries and cap pending ones; the number of rows deleted."""
        with self._lock:
            db = self._open()
            with db:
                db.execute("BEGIN IMMEDIATE")
                deleted = db.execute("DELETE FROM triplets WHERE (passed = 1 AND last_seen < ?)"
                                     " OR (passed = 0 AND first_seen < ?)",
                                     (now - expire, now - retry_window)).rowcount
                deleted += db.execute("DELETE FROM clients WHERE last_seen < ?",
                                      (now - expire,)).rowcount
                pending = db.execute("SELECT COUNT(*) FROM triplets WHERE passed = 0"
                                     ).fetchone()[0]
                if pending > self.max_entries:
                    deleted += db.execute(
                        "DELETE FROM triplets WHERE rowid IN (SELECT rowid FROM triplets "
                        "WHERE passed = 0 ORDER BY first_seen LIMIT ?)",
                        (pending - self.max_entries,)).rowcount
                return deleted

    def count(self) -> int:
        """The number of stored triplets (for tests and operators)."""
        with self._lock:
            return self._open().execute("SELECT COUNT(*) FROM triplets").fetchone()[0]


class GreylistFilter(Filter):
    """Refuses the first delivery attempt of an unknown triplet with a 451."""

    name = "greylist"

    def __init__(self, store: GreylistStore, *, delay: float = 300, retry_window: float = 2 * 86400,
                 expire: float = 35 * 86400, auto_whitelist: int = 5, ipv4_prefix: int = 24,
                 ipv6_prefix: int = 64, trusted: Sequence[IPNetwork] = (),
                 sender_domains: Sequence[str] = (), recipients: Sequence[str] = (),
                 purge_interval: float = 3600, reactor=None, threadpool=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.delay = delay
        self.retry_window = retry_window
        self.expire = expire
        self.auto_whitelist = auto_whitelist
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.trusted = tuple(trusted)
        self.sender_domains = {d.lower().lstrip("@").rstrip(".") for d in sender_domains}
        self.recipients = {r.lower() for r in recipients}
        self.purge_interval = purge_interval
        self.reactor = reactor
        self.threadpool = threadpool
        self._next_purge = 0.0
        self.purging: defer.Deferred | None = None

    def client_key(self, session) -> str | None:
        """The client network of the triplet, e.g. "192.0.2.0/24"; None for non-IP peers."""
        address = client_ip(session)
        if address is None:
            return None
        prefix = self.ipv4_prefix if address.version == 4 else self.ipv6_prefix
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def exempt(self, session, recipient: str) -> str:
        """Why this recipient is not greylisted ("" when it is)."""
        if session.user:
            return "authenticated"
        if in_networks(client_ip(session), self.trusted):
            return "trusted network"
        if dnswl_listed(session):
            return "DNSWL-listed client"
        sender = (session.sender or "").lower()
        if sender and sender.rpartition("@")[2].rstrip(".") in self.sender_domains:
            return "whitelisted sender domain"
        rcpt = recipient.lower()
        if rcpt in self.recipients or "@" + rcpt.rpartition("@")[2] in self.recipients:
            return "whitelisted recipient"
        return ""

    def _in_thread(self, func, *args):
        pool = self.threadpool or self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, func, *args)

    def rcpt_to(self, session, recipient):
        client = self.client_key(session)
        if client is None or self.exempt(session, recipient):
            return CONTINUE
        now = self.reactor.seconds()
        sender = normalize_sender(session.sender or "")
        d = self._in_thread(self.store.decide, client, sender, recipient.lower(), now,
                            self.delay, self.retry_window, self.expire, self.auto_whitelist)
        d.addCallbacks(self._verdict, self._failed,
                       callbackArgs=(client, sender, recipient), errbackArgs=(client,))
        if now >= self._next_purge:
            self._next_purge = now + self.purge_interval
            self._purge(now)
        return d

    def _verdict(self, decision: Decision, client: str, sender: str, recipient: str):
        if decision.passed:
            log.debug("greylist: pass {client} <{sender}> -> <{rcpt}> ({why})",
                      client=client, sender=sender, rcpt=recipient, why=decision.why)
            return CONTINUE
        log.info("greylist: {client} <{sender}> -> <{rcpt}> greylisted ({why})",
                 client=client, sender=sender, rcpt=recipient, why=decision.why)
        return TempFail(f"Greylisted, try again in {decision.retry_in} seconds", 451, "4.7.1")

    def _failed(self, failure, client: str):
        log.failure("greylist: database error for {client}; letting the mail through",
                    failure, client=client)
        return CONTINUE

    def _purge(self, now: float) -> None:
        """Purge expired entries in the background (``self.purging`` fires when done)."""
        def done(deleted: int) -> None:
            if deleted:
                log.info("greylist: purged {n} expired entries", n=deleted)

        d = self._in_thread(self.store.purge, now, self.retry_window, self.expire)
        d.addCallbacks(done, lambda f: log.failure("greylist: purge failed", f))
        self.purging = d

    def close(self) -> None:
        """Close the database (tests; the server just exits)."""
        self.store.close()


def _build(settings: dict[str, Any], context: Any = None) -> GreylistFilter:
    check_positive(settings, "retry_window", "expire", "purge_interval", "max_entries")
    check_positive(settings, "delay", "auto_whitelist", allow_zero=True)
    if settings["retry_window"] <= settings["delay"]:
        raise FilterConfigError("retry_window", "must be longer than delay")
    if not 8 <= settings["ipv4_prefix"] <= 32:
        raise FilterConfigError("ipv4_prefix", "must be 8 to 32")
    if not 16 <= settings["ipv6_prefix"] <= 128:
        raise FilterConfigError("ipv6_prefix", "must be 16 to 128")
    for key in ("whitelist_sender_domains", "whitelist_recipients"):
        for item in settings[key]:
            if not isinstance(item, str) or not item.strip():
                raise FilterConfigError(key, f"expected non-empty strings, got {item!r}")
    state_dir = getattr(context, "state_dir", None)
    if state_dir is None:
        raise FilterConfigError(None, "needs the server's state directory (build it with a "
                                      "FilterContext)")
    return GreylistFilter(
        GreylistStore(Path(state_dir), settings["max_entries"]),
        delay=settings["delay"], retry_window=settings["retry_window"],
        expire=settings["expire"], auto_whitelist=settings["auto_whitelist"],
        ipv4_prefix=settings["ipv4_prefix"], ipv6_prefix=settings["ipv6_prefix"],
        trusted=parse_networks("trusted_networks", settings["trusted_networks"]),
        sender_domains=settings["whitelist_sender_domains"],
        recipients=settings["whitelist_recipients"],
        purge_interval=settings["purge_interval"],
        reactor=getattr(context, "reactor", None), threadpool=getattr(context, "threadpool",
                                                                      None))


greylist = FilterFactory(
    "greylist", _build,
    description="greylisting of (client network, sender, recipient) at RCPT, like postgrey",
    defaults={"delay": 300, "retry_window": 2 * 86400, "expire": 35 * 86400,
              "auto_whitelist": 5, "ipv4_prefix": 24, "ipv6_prefix": 64,
              "trusted_networks": [], "whitelist_sender_domains": [],
              "whitelist_recipients": [], "purge_interval": 3600, "max_entries": 100000},
)
