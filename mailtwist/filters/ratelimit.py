"""Rate limits per client address, authenticated user and envelope sender (the
``ratelimit`` filter), answered with 4xx like Postfix's anvil limits.

Counted events: connections (connect stage), messages (MAIL) and recipients
(RCPT).  Each limit is a number of events per window (0: off); a refused event
is not counted, so a client that keeps trying gets through again as soon as
its rate drops below the limit.  Windows are *sliding* (the events of the last
``window`` seconds) or *fixed* (counters reset every ``window`` seconds).
Time comes from the reactor clock.  Memory is bounded: each table keeps at
most ``max_keys`` keys, evicting the least recently used, and a key whose
events are all older than the window is dropped.  See docs/builtin-filters.md.

With ``workers = N`` (N > 1) the events are counted in one SQLite file in the
filter's state directory (:class:`SharedEvents`) instead of memory, so the
limits hold for the server as a whole, not per process.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailtwist.filters import Filter, FilterConfigError, FilterFactory
from mailtwist.filters.dnsbl import (
    IPNetwork,
    check_positive,
    client_ip,
    in_networks,
    parse_networks,
)
from mailtwist.interfaces import CONTINUE, TempFail

log = Logger()


class Counter:
    """Events per key within a window; sliding (timestamps) or fixed (start, count)."""

    def __init__(self, limit: int, window: float, sliding: bool, max_keys: int) -> None:
        self.limit = limit
        self.window = window
        self.sliding = sliding
        self.max_keys = max_keys
        self.keys: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def hit(self, key: str, now: float, count: int = 1) -> bool:
        """Record *count* events for *key* if they fit in the limit; False when over."""
        if not self.limit:
            return True
        entry = self.keys.get(key)
        if self.sliding:
            if entry is None:
                entry = deque()
            while entry and entry[0] <= now - self.window:
                entry.popleft()
            if len(entry) + count > self.limit:
                self._store(key, entry)
                return False
            entry.extend([now] * count)
        else:
            if entry is None or now >= entry[0] + self.window or now < entry[0]:
                entry = [now - (now % self.window), 0]
            if entry[1] + count > self.limit:
                self._store(key, entry)
                return False
            entry[1] += count
        self._store(key, entry)
        return True

    def _store(self, key: str, entry: Any) -> None:
        self.keys[key] = entry
        self.keys.move_to_end(key)
        while len(self.keys) > self.max_keys:
            self.keys.popitem(last=False)

    def expire(self, now: float) -> int:
        """Drop keys with no event inside the window; the number dropped."""
        if self.sliding:
            stale = [key for key, entry in self.keys.items()
                     if not entry or entry[-1] <= now - self.window]
        else:
            stale = [key for key, entry in self.keys.items()
                     if entry[0] + self.window <= now]
        for key in stale:
            del self.keys[key]
        return len(stale)


class SharedEvents:
    """The events of every limit in one SQLite file that the worker processes share.

    One event is checked against all its limits and recorded in a single
    ``BEGIN IMMEDIATE`` transaction, so two processes cannot both take the last
    slot. Losing this file in a crash only forgets recent events, so it is not
    fsynced (``synchronous = OFF``). Blocking: call it in a thread.
    """

    def __init__(self, path: str, max_window: float) -> None:
        self.path = path
        self.max_window = max_window
        self._local = threading.local()
        self._next_purge = 0.0

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = OFF")
            db.execute("CREATE TABLE IF NOT EXISTS events "
                       "(name TEXT NOT NULL, key TEXT NOT NULL, ts REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS events_by_key ON events (name, key, ts)")
            self._local.db = db
        return db

    def check(self, wanted: list[tuple[str, str, int, float, bool]], now: float) -> int | None:
        """Record one event for each (limit name, key, limit, window, sliding) if all
        fit; else record nothing and return the index of the first that is full."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, (name, key, limit, window, sliding) in enumerate(wanted):
                if sliding:
                    query = "SELECT COUNT(*) FROM events WHERE name=? AND key=? AND ts>?"
                    since = now - window
                else:
                    query = "SELECT COUNT(*) FROM events WHERE name=? AND key=? AND ts>=?"
                    since = now - (now % window)
                (count,) = db.execute(query, (name, key, since)).fetchone()
                if count + 1 > limit:
                    db.execute("ROLLBACK")
                    return i
            db.executemany("INSERT INTO events VALUES (?, ?, ?)",
                           [(name, key, now) for name, key, *_ in wanted])
            if now >= self._next_purge:
                self._next_purge = now + 60
                db.execute("DELETE FROM events WHERE ts < ?", (now - self.max_window,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return None


@dataclass(frozen=True)
class Limit:
    """One configured limit: the setting's name, what it counts and its counter."""

    setting: str
    what: str         # "connections", "messages", "recipients"
    who: str          # "client", "user", "sender"
    counter: Counter


class RateLimitFilter(Filter):
    """Counts connections, messages and recipients; 4xx above a limit."""

    name = "ratelimit"

    def __init__(self, limits: Sequence[Limit], trusted: Sequence[IPNetwork] = (),
                 ipv6_prefix: int = 64, reactor=None, shared: SharedEvents | None = None,
                 threadpool=None, threads_reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.shared = shared
        self.threadpool = threadpool
        self.threads_reactor = threads_reactor if threads_reactor is not None else reactor
        self.limits = list(limits)
        self.trusted = tuple(trusted)
        self.ipv6_prefix = ipv6_prefix
        self.reactor = reactor
        self._next_expiry = 0.0

    def _client(self, session) -> str | None:
        """The client key: the address, or its network for IPv6; None when exempt."""
        address = client_ip(session)
        if address is None:
            return session.peer_host or None
        if in_networks(address, self.trusted):
            return None
        if address.version == 6 and self.ipv6_prefix < 128:
            return str(ipaddress.ip_network(f"{address}/{self.ipv6_prefix}", strict=False))
        return str(address)

    def _check(self, session, what: str, code: int, sender: str | None = None):
        """Count one event of *what* against every applicable limit."""
        now = self.reactor.seconds()
        if now >= self._next_expiry:
            self._next_expiry = now + 60
            for limit in self.limits:
                limit.counter.expire(now)
        client = self._client(session)
        if client is None:
            return CONTINUE
        keys = {"client": None if session.user else client,
                "user": session.user.lower() if session.user else None,
                "sender": None}
        if sender is not None:
            keys["sender"] = sender.lower() or "<>"
        if self.shared is not None:
            return self._check_shared(keys, what, code, now)
        counted = []
        for limit in self.limits:
            key = keys[limit.who]
            if limit.what != what or key is None or not limit.counter.limit:
                continue
            if not limit.counter.hit(key, now):
                self._undo(counted, now)
                return self._refuse(limit, key, code)
            counted.append((limit, key))
        return CONTINUE

    def _check_shared(self, keys: dict, what: str, code: int, now: float):
        """Like the in-memory check, in the SharedEvents file (a Deferred)."""
        applicable = [(limit, keys[limit.who]) for limit in self.limits
                      if limit.what == what and keys[limit.who] is not None
                      and limit.counter.limit]
        if not applicable:
            return CONTINUE
        wanted = [(limit.setting, key, limit.counter.limit, limit.counter.window,
                   limit.counter.sliding) for limit, key in applicable]
        d = deferToThreadPool(self.threads_reactor, self.threadpool, self.shared.check,
                              wanted, now)

        def decided(full: int | None):
            if full is None:
                return CONTINUE
            limit, key = applicable[full]
            return self._refuse(limit, key, code)

        return d.addCallback(decided)

    @staticmethod
    def _undo(counted: list, now: float) -> None:
        """Take back the events already counted for a refused one."""
        for limit, key in counted:
            entry = limit.counter.keys.get(key)
            if entry is None:
                continue
            if limit.counter.sliding and entry and entry[-1] == now:
                entry.pop()
            elif not limit.counter.sliding and entry[1] > 0:
                entry[1] -= 1

    def _refuse(self, limit: Limit, key: str, code: int) -> TempFail:
        counter = limit.counter
        log.info("ratelimit: {who} {key} over {setting} ({limit} {what} per {window} s)",
                 who=limit.who, key=key, setting=limit.setting, limit=counter.limit,
                 what=limit.what, window=counter.window)
        who = {"client": f"client [{key}]", "user": f"user {key}",
               "sender": f"sender <{'' if key == '<>' else key}>"}[limit.who]
        text = (f"Error: too many {limit.what} from {who} (limit {counter.limit} per "
                f"{_seconds(counter.window)}, {limit.setting}), try again later")
        return TempFail(text, code, "4.7.0" if code == 421 else "4.7.1")

    def connect(self, session):
        return self._check(session, "connections", 421)

    def mail_from(self, session, sender):
        # session.sender is only set once MAIL is accepted
        return self._check(session, "messages", 450, sender)

    def rcpt_to(self, session, recipient):
        return self._check(session, "recipients", 452, session.sender)


def _seconds(window: float) -> str:
    return f"{int(window)} s" if window == int(window) else f"{window} s"


_LIMITS = [
    ("client_connections", "connections", "client", "client_window"),
    ("client_messages", "messages", "client", "client_window"),
    ("client_recipients", "recipients", "client", "client_window"),
    ("user_messages", "messages", "user", "user_window"),
    ("user_recipients", "recipients", "user", "user_window"),
    ("sender_messages", "messages", "sender", "sender_window"),
    ("sender_recipients", "recipients", "sender", "sender_window"),
]


def _build(settings: dict[str, Any], context: Any = None) -> RateLimitFilter:
    check_positive(settings, *(s for s, *_ in _LIMITS), allow_zero=True)
    check_positive(settings, "client_window", "user_window", "sender_window", "max_keys")
    if settings["window_type"] not in ("sliding", "fixed"):
        raise FilterConfigError("window_type", f"must be sliding or fixed, got "
                                               f"{settings['window_type']!r}")
    if not 16 <= settings["ipv6_prefix"] <= 128:
        raise FilterConfigError("ipv6_prefix", "must be 16 to 128")
    sliding = settings["window_type"] == "sliding"
    limits = [Limit(setting, what, who,
                    Counter(settings[setting], float(settings[window]), sliding,
                            settings["max_keys"]))
              for setting, what, who, window in _LIMITS if settings[setting]]
    shared = None
    threadpool = getattr(context, "threadpool", None)
    if getattr(context, "workers", 1) > 1 and threadpool is not None:
        longest = max((limit.counter.window for limit in limits), default=60.0)
        shared = SharedEvents(os.path.join(str(context.state_dir), "events.sqlite"), longest)
    return RateLimitFilter(limits,
                           trusted=parse_networks("trusted_networks",
                                                  settings["trusted_networks"]),
                           ipv6_prefix=settings["ipv6_prefix"],
                           reactor=getattr(context, "reactor", None),
                           shared=shared, threadpool=threadpool)


ratelimit = FilterFactory(
    "ratelimit", _build,
    description="connection, message and recipient rate limits per client, user and sender",
    defaults={"client_connections": 0, "client_messages": 0, "client_recipients": 0,
              "user_messages": 0, "user_recipients": 0,
              "sender_messages": 0, "sender_recipients": 0,
              "client_window": 60, "user_window": 3600, "sender_window": 3600,
              "window_type": "sliding", "ipv6_prefix": 64, "trusted_networks": [],
              "max_keys": 100000},
)
