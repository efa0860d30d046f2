"""What IMAP sessions share about a folder, and each session's view of it.

A :class:`SharedFolder` exists once per folder directory in the process (the
:class:`FolderRegistry` hands it out) and holds the folder's messages as the
last scan saw them, with their flags as IMAP names. Every change to that
state (a message that appeared, changed flags or was expunged) gets the next
number of a per-folder mod-sequence and goes into a change log. A session's
:class:`View` is the sequence of UIDs the session's client knows, plus the
mod-sequence up to which it has been told; at the points where RFC 3501
allows untagged EXISTS/EXPUNGE/FETCH, :meth:`View.sync` replays the log from
there. So the work per session is proportional to what changed, not to the
folder's size. The same numbers are CONDSTORE's MODSEQ (RFC 7162): each
message's mod-sequence (with its flag letters) and the expunged UIDs are
persisted in the folder's ``mailtwist-index`` (:mod:`mailtwist.storage.index`),
appended in the pool before the folder lock is released, so a restart goes on
from the highest number given out. The first scan of a folder in the process
compares the Maildir with the index: messages it does not know, or whose flag
letters differ (changed by another program meanwhile), get a new number, and
UIDs it knows that are gone are recorded as expunged.

Changes made by sessions in this process (STORE, EXPUNGE, APPEND, COPY,
MOVE) are applied to the shared state directly. Changes from elsewhere
(delivery, POP3, other programs) are found by :meth:`SharedFolder.refresh`:
it stats ``new/``, ``cur/`` and the metadata files and only rescans when
something changed (or changed less than a second before the last scan, since
a directory's mtime cannot tell two changes within one clock tick apart).
While a session IDLEs in the folder, refresh runs every
:data:`POLL_INTERVAL` seconds.

Each folder also has a message cache (:class:`MessageCache`,
``mailtwist-cache.sqlite``) of what SEARCH and FETCH ENVELOPE/BODY/
BODYSTRUCTURE need without opening message files. A row is made when a
message is first parsed (FETCH, SEARCH) and by a warm-up that runs through
the folder in chunks of :data:`WARM_CHUNK` after a scan found new messages
(one folder at a time in the process, paced to about half a core);
rows of expunged messages are dropped with the index records. SEARCH runs in
the pool in chunks of :data:`SEARCH_CHUNK` messages (fewer,
:data:`BODY_SEARCH_CHUNK`, when it reads bodies), answering header keys with
SQL over the cached, folded values of the chunk's UID range.

All Maildir I/O runs in the mail-io thread pool. Scans and changes of one
folder are serialised by the folder's ``DeferredLock`` (so one ``Folder``
object is never used by two threads at once); message reads take no lock.
The shared state is only mutated on the reactor thread while that lock is
held, so a scan's diff may read it from the pool thread.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import itertools
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailtwist.imap.fetch import CACHED_ITEMS, FetchEntry, FetchItem, render
from mailtwist.imap.mime import ParsedMessage, decode_header_value
from mailtwist.imap.search import SearchProgram, evaluate, fold, header_date
from mailtwist.imap.wire import format_sequence_set
from mailtwist.storage.index import (
    CACHE_NAME,
    FIELD_SEP,
    INDEX_NAME,
    NAME_SEP,
    SEARCH_COLUMNS,
    CachedMessage,
    MessageCache,
    ModseqIndex,
    base_key,
    letters_key,
    missing_ranges,
    open_index,
    trim_expunged,
)
from mailtwist.storage.maildir import (
    FLAG_LETTERS,
    KEYWORDS_NAME,
    LETTER_FLAGS,
    UIDLIST_NAME,
    Folder,
    FolderNotFound,
    Maildir,
    MessageInfo,
)

log = Logger()

POLL_INTERVAL = 0.5
"""Seconds between checks for changes while a session IDLEs in the folder."""

MTIME_SLACK = 1.0
"""A directory changed less than this many seconds before a scan is rescanned next time."""

MAX_LOG = 200_000
"""Changes kept for sessions that have not caught up; beyond, they resynchronise fully."""

APPLY_CHUNK = 2000
"""Changes applied to the shared state per reactor turn, so big ones do not stall others."""

TRIM_CHUNK = 20000
"""Log entries dropped per trim at most."""

SYNC_CHUNK = 5000
"""Changes turned into untagged responses per call of View.sync, for the same reason."""

KEEP_UNSELECTED = 32
"""Folders kept loaded after their last session left (STATUS, APPEND to Sent, ...)."""

WARM_UP = True
"""Fill the message cache in the background after a scan found new messages."""

WARM_CHUNK = 500
"""Messages the warm-up looks at (and parses if not cached) per pool call."""

FILL_BATCH = 50
"""Messages parsed into the cache per transaction (and per hold of the fill lock)."""

WARM_SLICE = 0.01
"""Seconds the warm-up parses before it rests as long (it sleeps, releasing the
GIL), so that it takes at most about half a core from the sessions."""

SEARCH_CHUNK = 5000
"""Messages a SEARCH evaluates per pool call when it reads no message bodies."""

BODY_SEARCH_CHUNK = 200
"""Messages a SEARCH evaluates per pool call when it reads bodies (BODY, TEXT)."""

def _renderer_fingerprint() -> str:
    """A digest of the code whose output the message cache keeps (MIME rendering,
    SEARCH folding, the row layout): caches made by other code start afresh."""
    from mailtwist.imap import mime, search
    digest = hashlib.blake2b(digest_size=8)
    for module in (mime, search, sys.modules[__name__]):
        try:
            with open(module.__file__ or "", "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update((module.__name__ or "").encode())
    return digest.hexdigest()


SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}

NEW, FLAGS, EXPUNGE = "new", "flags", "expunge"


class FolderGone(Exception):
    """The folder was deleted or renamed, or its UIDVALIDITY changed."""


class KeywordLimit(Exception):
    """No keyword letter is left in this folder (Maildir allows 26)."""


def canonical_flag(flag: str) -> str | None:
    """A system flag in its canonical spelling, a keyword as is; None for \\Recent
    and unknown system flags."""
    if flag.startswith("\\"):
        return _SYSTEM_BY_LOWER.get(flag.lower())
    return flag


@dataclass(slots=True, eq=False)
class Message:
    """One message of a folder as the sessions share it."""

    info: MessageInfo
    flags: frozenset[str]
    modseq: int
    recent_owner: object | None = None

    @property
    def uid(self) -> int:
        return self.info.uid


class Change(NamedTuple):
    """One entry of a folder's change log."""

    modseq: int
    kind: str
    uid: int
    origin: object | None
    message: Message | None


class FlagCodec:
    """Maildir flag letters to IMAP flag names for one keywords mapping (cached)."""

    def __init__(self, keywords: dict[str, str]) -> None:
        self.keywords = keywords
        self._cache: dict[frozenset[str], frozenset[str]] = {}

    def names(self, letters: frozenset[str]) -> frozenset[str]:
        names = self._cache.get(letters)
        if names is None:
            result = []
            for letter in letters:
                name = LETTER_FLAGS.get(letter) or self.keywords.get(letter)
                if name is not None:
                    result.append(name)
            names = self._cache[letters] = frozenset(result)
        return names


@dataclass
class ScanResult:
    """What a scan found, computed in the pool thread against the shared state."""

    stamp: tuple
    trusted: bool
    uidvalidity: int
    uidnext: int
    keywords: dict[str, str]
    reset: bool
    new: list[Message]
    changed: list[tuple[Message, MessageInfo, frozenset[str]]]
    moved: list[tuple[Message, MessageInfo]]
    expunged: list[int]
    infos_by_base: dict[str, int] | None = None
    index: ModseqIndex | None = None
    index_rebuilt: str | None = None
    index_gone: list[int] | None = None


def _stat_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SharedFolder:
    """One folder's messages, flags and change log, shared by all sessions."""

    def __init__(self, registry: FolderRegistry, maildir: Maildir, name: str, path: str) -> None:
        self.registry = registry
        self.reactor = registry.reactor
        self.pool = registry.pool
        self.maildir = maildir
        self.name = name
        self.path = path
        self.folder: Folder | None = None
        self.lock = defer.DeferredLock()
        self.messages: dict[int, Message] = {}
        self.uids: list[int] = []
        self.uidvalidity = 0
        self.uidnext = 1
        self.modseq = 0
        self.index: ModseqIndex | None = None
        self.expunged_modseqs: dict[int, int] = {}
        self.expunged_floor = 0
        self._index_pending: list[tuple] = []
        self._cache: MessageCache | None = None
        self._cache_guard = threading.Lock()
        self._fill_lock = threading.Lock()
        self.log: deque[Change] = deque()
        self.log_floor = 0
        self.keywords: dict[str, str] = {}
        self.codec = FlagCodec({})
        self.keyword_version = 0
        self.views: dict[View, None] = {}
        self.gone = False
        self._loaded = False
        self._stamp: tuple | None = None
        self._trusted = False
        self._queued_refresh: _Waiters | None = None
        # The last change of the Maildir was ours (STORE, EXPUNGE, the move
        # to cur/): _stamp was taken after it, so equal times need no rescan
        # until they are old enough to verify once (see _scan_blocking).
        self._own = False
        self._own_change = False
        self._idlers = 0
        self._poller: LoopingCall | None = None

    def __repr__(self) -> str:
        return f"<SharedFolder {self.name!r} {len(self.uids)} messages>"

    # -- running things

    def _run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.pool, function, *args)

    async def _locked(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run *function* (a coroutine function) holding the folder lock."""
        await self.lock.acquire()
        try:
            if self.gone:
                raise FolderGone(self.name)
            return await function(*args)
        finally:
            try:
                if self._own_change and not self.gone:
                    self._own_change = False
                    self._stamp = (await self._run(self._dir_stamp))[0]
                    self._trusted, self._own = False, True
                await self._flush_index()
            finally:
                self.lock.release()

    async def _flush_index(self) -> None:
        """Write the mod-sequence changes made under the lock to the index file."""
        records, self._index_pending = self._index_pending, []
        index = self.index
        if not records or index is None or self.gone:
            return
        try:
            await self._run(self._persist_blocking, index, records)
        except OSError:
            # the index is marked dirty and rewritten whole at the next change
            log.failure("writing the index of {folder}", folder=self.name)

    def _persist_blocking(self, index: ModseqIndex, records: list[tuple]) -> None:
        """Drop the cache rows of expunged messages, then append to the index."""
        gone = [r[1] for r in records if r[0] == "-"]
        if gone and (cache := self.cache_blocking()) is not None:
            cache.forget(gone)
        _index_write_blocking(index, records)

    def cache_blocking(self) -> MessageCache | None:
        """The folder's message cache for the current UIDVALIDITY (None if unusable
        or the folder was not scanned yet)."""
        if not self.uidvalidity:
            return None
        with self._cache_guard:
            cache = self._cache
            if cache is None or cache.uidvalidity != self.uidvalidity:
                if cache is not None:
                    cache.close()
                cache = self._cache = MessageCache(os.path.join(self.path, CACHE_NAME),
                                                   self.uidvalidity, RENDERER)
        return cache if cache.broken is None else None

    def _open_blocking(self) -> Folder:
        if self.folder is None:
            self.folder = self.maildir.folder(self.name)
        return self.folder

    # -- scanning

    def _dir_stamp(self) -> tuple[tuple, bool]:
        """Stat what a change would touch; and whether the times are old enough to trust."""
        keys = (
            _stat_key(os.path.join(self.path, "new")),
            _stat_key(os.path.join(self.path, "cur")),
            _stat_key(os.path.join(self.path, UIDLIST_NAME)),
            _stat_key(os.path.join(self.path, KEYWORDS_NAME)),
        )
        newest = max((k[2] for k in keys if k is not None), default=0) / 1e9
        return keys, time.time() - newest > MTIME_SLACK

    def _scan_blocking(self, force: bool) -> ScanResult | None:
        """Rescan if anything changed (or *force*); diff against the shared state."""
        folder = self._open_blocking()
        stamp, trusted = self._dir_stamp()
        if not force and self._loaded and stamp == self._stamp:
            if self._trusted:
                return None
            # Times this fresh could hide another process's change made in
            # the same clock tick, so they are not trusted, except right after
            # our own change: then one scan verifies them once they are older
            # than MTIME_SLACK. Busy sessions on one folder do not rescan it
            # after each other's STOREs.
            if self._own and not trusted:
                return None
        if not os.path.isdir(self.path):
            raise FolderNotFound(self.name)
        infos = folder.scan()
        keywords = folder.keywords()
        uidvalidity = folder.uidvalidity
        reset = self._loaded and uidvalidity != self.uidvalidity
        codec = self.codec if keywords == self.keywords else FlagCodec(keywords)
        messages = {} if reset else self.messages
        recode = codec is not self.codec
        new, changed, moved = [], [], []
        kept = 0
        for info in infos:
            m = messages.get(info.uid)
            if m is None:
                new.append(Message(info, codec.names(info.flags), 0))
                continue
            kept += 1
            if m.info is not info or recode:
                flags = codec.names(info.flags)
                if flags != m.flags:
                    changed.append((m, info, flags))
                elif m.info is not info:
                    moved.append((m, info))
        expunged: list[int] = []
        if kept < len(messages):
            present = {info.uid for info in infos}
            expunged = [uid for uid in self.uids if uid not in present]
        result = ScanResult(stamp, trusted, uidvalidity, folder.uidnext, keywords, reset,
                            new, changed, moved, expunged,
                            {m.info.base: m.uid for m in new})
        if reset or not self._loaded or self.index is None:
            self._load_index_blocking(result, infos)
        return result

    def _load_index_blocking(self, result: ScanResult, infos: list[MessageInfo]) -> None:
        """Open (or rebuild) the index and take the known mod-sequences from it.

        New messages it knows with the same flag letters keep their number;
        the others keep 0 and are numbered by :meth:`_apply`.
        """
        index, reason = open_index(os.path.join(self.path, INDEX_NAME), result.uidvalidity,
                                   ((info.uid, info.flags) for info in infos), result.uidnext)
        known = index.messages
        for m in result.new:
            entry = known.get(m.uid)
            if entry is not None and entry[1] == letters_key(m.info.flags):
                m.modseq = entry[0]
        present = {info.uid for info in infos}
        result.index, result.index_rebuilt = index, reason
        result.index_gone = [uid for uid in known if uid not in present]

    async def refresh(self, force: bool = False) -> None:
        """Bring the shared state up to date with the Maildir (cheap if nothing changed).

        Refreshes asked for while one is queued behind the folder lock share
        it: a scan that *starts* after a request has seen every change made
        before it, which is all RFC 3501 asks of a command. Without this,
        sessions busy on one folder rescan it once each after every change.
        The waiters are told in a loop, not by a chain of lock hand-overs
        (that recursed once hundreds of sessions waited).
        """
        if force:
            await self._locked(self._refresh_locked, True)
            return
        queued = self._queued_refresh
        if queued is None:
            queued = self._queued_refresh = _Waiters()
            d = defer.Deferred.fromCoroutine(self._locked(self._run_queued, queued))
            d.addErrback(self._queued_failed, queued)
        await queued.wait()

    def _queued_failed(self, failure: Failure, queued: "_Waiters") -> None:
        """A queued refresh that failed before or while scanning (the folder is
        gone, say) fails for every session waiting on it."""
        if self._queued_refresh is queued:
            self._queued_refresh = None
        if not queued.fired:
            queued.fire(failure)

    async def _run_queued(self, queued: "_Waiters") -> None:
        if self._queued_refresh is queued:
            self._queued_refresh = None  # started: later requests queue another scan
        await self._refresh_locked(False)
        queued.fire(None)

    async def _refresh_locked(self, force: bool = False) -> ScanResult | None:
        try:
            result = await self._run(self._scan_blocking, force)
        except FolderNotFound:
            self.vanish()
            raise FolderGone(self.name) from None
        if result is not None:
            await self._apply(result)
        return result

    async def _pause(self, count: int) -> None:
        """Let the reactor serve other sessions every APPLY_CHUNK changes."""
        if count % APPLY_CHUNK == APPLY_CHUNK - 1:
            await deferLater(self.reactor, 0, lambda: None)

    async def _apply(self, result: ScanResult, origin: object | None = None) -> None:
        """Take a scan's differences into the shared state and tell the views.

        Called with the lock held. Big change sets are applied over several
        reactor turns; every change is logged as it is applied, so a view
        that syncs meanwhile sees a consistent prefix.
        """
        if result.reset:
            log.warn("UIDVALIDITY of {path} changed; sessions must reselect", path=self.path)
            self._invalidate_views()
            self.messages, self.uids, self.log = {}, [], deque()
            self.log_floor = self.modseq
            self._loaded = False
        if result.index is not None:
            self._take_index(result)
        if result.keywords != self.keywords:
            self.keywords = result.keywords
            self.codec = FlagCodec(result.keywords)
            self.keyword_version += 1
        log_changes = self._loaded
        messages = self.messages
        changed_any = bool(result.expunged or result.changed or result.new)
        for i, uid in enumerate(result.expunged):
            m = messages.pop(uid, None)
            if m is not None:
                self._record(EXPUNGE, m, origin)
            await self._pause(i)
        if result.expunged:
            self.uids = [uid for uid in self.uids if uid in messages]
        for i, (m, info, flags) in enumerate(result.changed):
            m.info, m.flags = info, flags
            self._record(FLAGS, m, origin)
            await self._pause(i)
        for m, info in result.moved:
            if info.flags != m.info.flags:
                self._index_pending.append(("+", m.uid, m.modseq, info.flags))
            m.info = info
        arrived = result.new
        if not log_changes:
            messages.update((m.uid, m) for m in arrived)
        for i, m in enumerate(arrived if log_changes else ()):
            messages[m.uid] = m
            self._record(NEW, m, origin)
            await self._pause(i)
        if arrived:
            uids = [m.uid for m in arrived]
            if self.uids and uids[0] < self.uids[-1]:
                self.uids = sorted(self.uids + uids)
            else:
                self.uids.extend(uids)
        self.uidvalidity = result.uidvalidity
        self.uidnext = max(result.uidnext, self.uidnext if not result.reset else 0)
        self._stamp, self._trusted = result.stamp, result.trusted
        self._own = False
        self._loaded = True
        if arrived and log_changes:
            self._assign_recent(arrived)
        if changed_any and log_changes:
            self._trim_log()
            self.notify()
        if arrived:
            self.start_warm_up()

    def _take_index(self, result: ScanResult) -> None:
        """Adopt a freshly opened index; number what it did not know (reactor, locked)."""
        index = result.index
        assert index is not None
        if result.index_rebuilt is not None:
            log.info("Rebuilt the mod-sequence index of {path} ({reason})",
                     path=self.path, reason=result.index_rebuilt)
        self.index = index
        self._index_pending = []
        self.modseq = max(index.highest, 1)
        self.log, self.log_floor = deque(), self.modseq
        self.expunged_modseqs = dict(index.expunged)
        self.expunged_floor = index.floor
        unknown = [m for m in result.new if m.modseq == 0]
        if unknown or result.index_gone:
            self.modseq += 1
            for m in unknown:
                m.modseq = self.modseq
                self._index_pending.append(("+", m.uid, self.modseq, m.info.flags))
            for uid in result.index_gone or ():
                self.expunged_modseqs[uid] = self.modseq
                self._index_pending.append(("-", uid, self.modseq))
            self.expunged_floor = trim_expunged(self.expunged_modseqs, self.expunged_floor)
            self.log_floor = self.modseq

    def _record(self, kind: str, message: Message, origin: object | None) -> None:
        self.modseq += 1
        message.modseq = self.modseq
        self.log.append(Change(self.modseq, kind, message.uid, origin, message))
        if kind == EXPUNGE:
            self.expunged_modseqs[message.uid] = self.modseq
            self.expunged_floor = trim_expunged(self.expunged_modseqs, self.expunged_floor)
            self._index_pending.append(("-", message.uid, self.modseq))
        else:
            self._index_pending.append(("+", message.uid, self.modseq, message.info.flags))

    def vanished_since(self, modseq: int) -> list[int]:
        """UIDs known to be expunged after *modseq*, ascending (a subset of
        :meth:`vanished_set`'s when *modseq* is below the log's floor)."""
        return sorted(uid for uid, m in self.expunged_modseqs.items() if m > modseq)

    def vanished_set(self, modseq: int,
                     within: list[tuple[int | None, int | None]] | None = None) -> bytes:
        """QRESYNC's VANISHED (EARLIER) for a client at *modseq*, as a sequence
        set limited to the UID ranges *within* (``None`` is ``*``); b"" if none.

        Below the expunge log's floor the exact answer is forgotten, so every
        UID under UIDNEXT in *within* that no longer exists is sent (RFC 7162
        section 3.2.5.2 allows such a superset).
        """
        top = max(self.uidnext - 1, 0)
        spans = _merge_ranges(within, top) if within is not None else [(1, top)]
        if modseq >= self.expunged_floor:
            uids = self.vanished_since(modseq)
            if within is not None:
                uids = [u for u in uids if _in_spans(spans, u)]
            return format_sequence_set(uids)
        out = []
        for low, high in spans:
            for a, b in missing_ranges(self.uids, low, high):
                out.append(b"%d" % a if a == b else b"%d:%d" % (a, b))
        return b",".join(out)

    def _trim_log(self) -> None:
        """Drop log entries every view has seen; cap the rest at MAX_LOG.

        At most TRIM_CHUNK entries go per call, so a big backlog is trimmed
        over several changes instead of in one long reactor turn.
        """
        floor = min((view.modseq for view in self.views), default=self.modseq)
        log = self.log
        for _ in range(TRIM_CHUNK):
            if not log or (log[0].modseq > floor and len(log) <= MAX_LOG):
                break
            self.log_floor = log.popleft().modseq

    def changes_since(self, modseq: int, limit: int | None = None) -> list[Change] | None:
        """Up to *limit* log entries after *modseq*, or None if some were already dropped."""
        if modseq < self.log_floor:
            return None
        if not self.log or self.log[-1].modseq <= modseq:
            return []
        start = bisect.bisect_right(self.log, modseq, key=lambda c: c.modseq)
        end = None if limit is None else start + limit
        return list(itertools.islice(self.log, start, end))

    def expunged_message(self, uid: int) -> Message | None:
        """The last state of a message expunged since some view last synced."""
        for change in reversed(self.log):
            if change.uid == uid and change.kind == EXPUNGE:
                return change.message
        return None

    def notify(self) -> None:
        for view in list(self.views):
            if view.on_change is not None:
                view.on_change()

    # -- \Recent

    def _assign_recent(self, arrived: list[Message]) -> None:
        """New messages in new/ are recent to the first read-write view, which
        moves them to cur/ so that no other session sees them as recent."""
        owner = next((v for v in self.views if not v.readonly), None)
        if owner is None:
            return
        claimed = [m for m in arrived if m.info.subdir == "new" and m.recent_owner is None]
        for m in claimed:
            m.recent_owner = owner
        if claimed:
            self._schedule_move([m.uid for m in claimed])

    def claim_recent(self, view: View) -> set[int]:
        """Recent messages for a view being selected (see the module docstring)."""
        unowned = [m for m in self.messages.values()
                   if m.info.subdir == "new" and m.recent_owner is None]
        if view.readonly:
            return {m.uid for m in unowned}
        for m in unowned:
            m.recent_owner = view
        if unowned:
            self._schedule_move([m.uid for m in unowned])
        return {m.uid for m in unowned}

    def _schedule_move(self, uids: list[int]) -> None:
        d = defer.Deferred.fromCoroutine(self._locked(self._move_to_cur, uids))
        d.addErrback(lambda f: None if f.check(FolderGone) else log.failure(
            "moving new messages to cur/ in {folder}", f, folder=self.name))

    async def _move_to_cur(self, uids: list[int]) -> None:
        infos = [m.info for uid in uids if (m := self.messages.get(uid)) is not None
                 and m.info.subdir == "new"]
        moved = await self._run(self._move_blocking, infos)
        self._own_change = True
        for info in moved:
            m = self.messages.get(info.uid)
            if m is not None:
                m.info = info

    def _move_blocking(self, infos: list[MessageInfo]) -> list[MessageInfo]:
        folder = self._open_blocking()
        moved = []
        for info in infos:
            try:
                moved.append(folder.add_flags(info, ()))
            except FileNotFoundError:
                pass
        return moved

    # -- changes made by sessions

    async def store(self, uids: Iterable[int], mode: str, flags: Iterable[str],
                    origin: object | None, unchanged_since: int | None = None) -> list[int]:
        """Set (``mode`` "set"), add ("add") or remove ("remove") flags (IMAP names).

        With *unchanged_since* (CONDSTORE), messages whose mod-sequence is
        higher are left alone; their UIDs are returned.
        """
        return await self._locked(self._store_locked, list(uids), mode, list(flags), origin,
                                  unchanged_since)

    async def _store_locked(self, uids: list[int], mode: str, flags: list[str],
                            origin: object | None, unchanged_since: int | None = None
                            ) -> list[int]:
        targets = []
        modified = []
        for uid in uids:
            m = self.messages.get(uid)
            if m is not None:
                if unchanged_since is not None and m.modseq > unchanged_since:
                    modified.append(uid)
                else:
                    targets.append((m.info, m.flags))
        if not targets:
            return modified
        keywords, updated = await self._run(self._store_blocking, targets, mode, flags)
        self._own_change = True
        if keywords != self.keywords:
            self.keywords = keywords
            self.codec = FlagCodec(keywords)
            self.keyword_version += 1
        changed = False
        for i, (info, names) in enumerate(updated):
            m = self.messages.get(info.uid)
            if m is None:
                continue
            m.info = info
            if names != m.flags:
                m.flags = names
                self._record(FLAGS, m, origin)
                changed = True
            await self._pause(i)
        if changed:
            self._trim_log()
            self.notify()
        return modified

    def _letters_blocking(self, folder: Folder, flags: Iterable[str], create: bool,
                          strict: bool = True) -> set[str]:
        """Maildir letters for IMAP flag names; KeywordLimit if *strict* and one
        more keyword does not fit (otherwise it is left out)."""
        letters = set()
        for flag in flags:
            letter = FLAG_LETTERS.get(flag)
            if letter is None:
                letter = folder.keyword_letter(flag, create=create)
                if letter is None:
                    if create and strict:
                        raise KeywordLimit(flag)
                    continue
            letters.add(letter)
        return letters

    def _store_blocking(self, targets: list[tuple[MessageInfo, frozenset[str]]], mode: str,
                        flags: list[str]
                        ) -> tuple[dict[str, str], list[tuple[MessageInfo, frozenset[str]]]]:
        """Rename the files; the new infos with their flags as IMAP names."""
        folder = self._open_blocking()
        letters = self._letters_blocking(folder, flags, create=mode != "remove")
        updated = []
        for info, _ in targets:
            current = info.flags
            try:
                if mode == "add":
                    if letters <= current:
                        continue
                    updated.append(folder.add_flags(info, letters))
                elif mode == "remove":
                    if not letters & current:
                        continue
                    updated.append(folder.remove_flags(info, letters))
                else:
                    lower = {c for c in current if c.islower() or c in "DFRST"}
                    if lower == letters:
                        continue
                    keep = {c for c in current if not (c.islower() or c in "DFRST")}
                    updated.append(folder.set_flags(info, letters | keep))
            except FileNotFoundError:
                continue
        keywords = folder.keywords()
        codec = self.codec if keywords == self.keywords else FlagCodec(keywords)
        return keywords, [(info, codec.names(info.flags)) for info in updated]

    async def expunge(self, uids: Iterable[int] | None, origin: object | None,
                      only_deleted: bool = True) -> None:
        """Remove messages (those of *uids*, or all) that carry \\Deleted (or all of them)."""
        await self._locked(self._expunge_locked, None if uids is None else list(uids),
                           origin, only_deleted)

    async def _expunge_locked(self, uids: list[int] | None, origin: object | None,
                              only_deleted: bool) -> None:
        candidates = self.uids if uids is None else uids
        doomed = []
        for uid in candidates:
            m = self.messages.get(uid)
            if m is not None and (not only_deleted or "\\Deleted" in m.flags):
                doomed.append(m)
        if not doomed:
            return
        infos = [m.info for m in doomed]
        try:
            await self._run(lambda: self._open_blocking().remove_many(infos))
        except OSError:
            await self._refresh_locked(force=True)
            raise
        self._own_change = True
        for i, m in enumerate(doomed):
            if self.messages.pop(m.uid, None) is not None:
                self._record(EXPUNGE, m, origin)
            await self._pause(i)
        self.uids = [uid for uid in self.uids if uid in self.messages]
        self._trim_log()
        self.notify()

    async def append(self, data: bytes, flags: list[str], mtime: float | None,
                     origin: object | None = None) -> int | None:
        """Deliver a message into the folder; its UID (None if another process
        expunged it before we could learn it)."""
        return await self._locked(self._append_locked, data, flags, mtime, origin)

    async def _append_locked(self, data: bytes, flags: list[str], mtime: float | None,
                             origin: object | None) -> int | None:
        result, bases = await self._run(self._deliver_blocking, [(data, flags, mtime)])
        await self._apply(result, origin)
        return result.infos_by_base.get(bases[0]) if bases[0] else None

    def _deliver_blocking(self, items: list[tuple[bytes, list[str], float | None]]
                          ) -> tuple[ScanResult, list[str | None]]:
        folder = self._open_blocking()
        bases = []
        for data, flags, mtime in items:
            letters = "".join(sorted(self._letters_blocking(folder, flags, create=True)))
            bases.append(folder.deliver(data, letters, mtime))
        return self._scan_blocking(force=True), bases

    async def copy_from(self, source: SharedFolder, uids: list[int],
                        origin: object | None = None) -> list[tuple[int, int]]:
        """Copy messages of *source* into this folder with their flags and
        internal date; (source UID, new UID) pairs in source UID order."""
        items = [(uid, m.info, m.flags) for uid in uids
                 if (m := source.messages.get(uid)) is not None]
        if not items:
            return []
        return await self._locked(self._copy_locked, source, items, origin)

    async def _copy_locked(self, source: SharedFolder, items: list, origin: object | None
                           ) -> list[tuple[int, int]]:
        result, pairs = await self._run(self._copy_blocking, source, items)
        await self._apply(result, origin)
        mapping = result.infos_by_base or {}
        return [(uid, mapping[base]) for uid, base in pairs if base in mapping]

    def _copy_blocking(self, source: SharedFolder, items: list
                       ) -> tuple[ScanResult, list[tuple[int, str]]]:
        folder = self._open_blocking()
        reader = source._open_blocking()
        pairs = []
        for uid, info, flags in items:
            try:
                data = reader.read_message(info)
                mtime = info.mtime
            except FileNotFoundError:
                continue
            letters = "".join(sorted(self._letters_blocking(folder, sorted(flags), create=True,
                                                            strict=False)))
            pairs.append((uid, folder.deliver(data, letters, mtime)))
        return self._scan_blocking(force=True), pairs

    # -- reading (no lock: paths in MessageInfo, and Folder follows renames)

    def read_blocking(self, info: MessageInfo) -> bytes:
        """The message with CRLF line ends; FileNotFoundError if it is gone."""
        return self._open_blocking().read_message_crlf(info)

    # -- the message cache (pool threads, no folder lock)

    def render_blocking(self, entries: list[FetchEntry], items: list[FetchItem],
                        uid_first: bool) -> list[bytes | None]:
        """FETCH responses (None for a message whose file is gone or unreadable),
        with ENVELOPE/BODY/BODYSTRUCTURE from the cache when it has them."""
        cache = None
        kinds = {item.kind for item in items}
        if kinds & CACHED_ITEMS:
            cache = self.cache_blocking()
        fill: list[tuple] = []

        def on_parsed(entry: FetchEntry, parsed: ParsedMessage) -> None:
            try:
                fill.append(cache_row(entry.uid, entry.info.base, entry.info.vsize, parsed))
            except Exception as e:  # noqa: BLE001 - the FETCH itself must still answer
                log.warn("Not caching message {uid} of {folder}: {error!r}",
                         uid=entry.uid, folder=self.name, error=e)

        rows = cache.get_many([e.uid for e in entries]) if cache is not None else {}
        out: list[bytes | None] = []
        for entry in entries:
            cached = rows.get(entry.uid)
            if cached is not None and (cached.base != base_key(entry.info.base)
                                       or not cached.complete):
                cached = None
            try:
                out.append(render(entry, items, uid_first, self.read_blocking, cached,
                                  on_parsed if cache is not None and cached is None else None))
            except OSError:
                out.append(None)
        if fill and cache is not None:
            cache.put(fill)
        return out

    def fill_blocking(self, messages: list[tuple[int, MessageInfo]], paced: bool = False,
                      full: bool = True) -> int:
        """Make cache rows for the messages (ascending UIDs) that have none;
        how many were made. Without *full* (for SEARCH) the rows lack the
        FETCH items, which cost more than the rest together.

        Works in batches of :data:`FILL_BATCH` under the folder's fill lock,
        so the warm-up and a SEARCH never parse the same message twice.
        *paced* (the warm-up) rests as long as it worked every
        :data:`WARM_SLICE` seconds, outside the lock.
        """
        cache = self.cache_blocking()
        if cache is None or not messages:
            return 0
        made = 0
        rest_at = time.monotonic() + WARM_SLICE
        for start in range(0, len(messages), FILL_BATCH):
            batch = messages[start:start + FILL_BATCH]
            with self._fill_lock:
                known = cache.known(batch[0][0], batch[-1][0])
                rows = []
                for uid, info in batch:
                    if known.get(uid) == base_key(info.base):
                        continue
                    try:
                        raw = self.read_blocking(info)
                    except OSError:
                        continue
                    try:
                        rows.append(cache_row(uid, info.base, info.vsize,
                                              ParsedMessage.parse(raw), full))
                    except Exception as e:  # noqa: BLE001 - one odd message must not stop it
                        log.warn("Not caching message {uid} of {folder}: {error!r}",
                                 uid=uid, folder=self.name, error=e)
                cache.put(rows)
                made += len(rows)
            if paced and rows and time.monotonic() >= rest_at:
                time.sleep(WARM_SLICE)
                rest_at = time.monotonic() + WARM_SLICE
        return made

    def start_warm_up(self) -> None:
        """Have the cache filled for the whole folder in the background (one
        folder at a time in the process, see :meth:`FolderRegistry.warm_up`)."""
        if WARM_UP and not self.gone:
            self.registry.warm_up(self)

    async def _warm_up(self) -> None:
        after = 0
        while not self.gone and getattr(self.pool, "started", True):
            uids = self.uids
            start = bisect.bisect_right(uids, after)
            chunk = [(u, m.info) for u in uids[start:start + WARM_CHUNK]
                     if (m := self.messages.get(u)) is not None]
            if not chunk:
                return
            await self._run(self.fill_blocking, chunk, True)
            after = chunk[-1][0]

    async def search(self, program: SearchProgram, uids: list[int],
                     messages: list[Message | None], recent: set[int]) -> list[int]:
        """Sequence numbers of the messages (the session's *uids*, in order, and
        their *messages*) that match, evaluated in the pool chunk by chunk."""
        if not uids:
            return []
        chunk_size = BODY_SEARCH_CHUNK if program.needs_body else SEARCH_CHUNK
        max_seq, max_uid = len(uids), uids[-1]
        result: list[int] = []
        for start in range(0, len(uids), chunk_size):
            part = [(seq, u, m) for seq, (u, m) in enumerate(
                zip(uids[start:start + chunk_size], messages[start:start + chunk_size]),
                start + 1) if m is not None]
            if part:
                result += await self._run(self._search_blocking, program, part, recent,
                                          max_seq, max_uid)
        return result

    def _search_blocking(self, program: SearchProgram, part: list[tuple[int, int, Message]],
                         recent: set[int], max_seq: int, max_uid: int) -> list[int]:
        index = None
        if program.needs_headers:
            self.fill_blocking([(u, m.info) for _, u, m in part], full=False)
            cache = self.cache_blocking()
            if cache is not None:
                index = _ChunkIndex(cache, part)
        items = [_SearchItem(seq, u, m, u in recent, self, index) for seq, u, m in part]
        return evaluate(program, items, max_uid=max_uid, max_seq=max_seq, index=index)

    # -- sessions

    def attach(self, view: View) -> None:
        self.views[view] = None

    def detach(self, view: View) -> None:
        self.views.pop(view, None)
        if view.idling:
            self.stop_idle(view)
        for m in self.messages.values():
            if m.recent_owner is view:
                m.recent_owner = None
        self._trim_log()

    def start_idle(self, view: View) -> None:
        view.idling = True
        self._idlers += 1
        if self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(POLL_INTERVAL, now=False)

    def stop_idle(self, view: View) -> None:
        if not view.idling:
            return
        view.idling = False
        self._idlers -= 1
        if self._idlers <= 0 and self._poller is not None:
            poller, self._poller = self._poller, None
            self._idlers = 0
            poller.stop()

    def _poll(self) -> None:
        if self.lock.locked or self.gone:
            return
        d = defer.Deferred.fromCoroutine(self.refresh())
        d.addErrback(lambda f: None if f.check(FolderGone) else log.failure(
            "checking {folder} for changes", f, folder=self.name))

    def vanish(self) -> None:
        """The folder no longer exists here: every view must go."""
        if self.gone:
            return
        self.gone = True
        self.registry.forget(self)
        if self._poller is not None:
            poller, self._poller = self._poller, None
            poller.stop()
        self._invalidate_views()

    def _invalidate_views(self) -> None:
        for view in list(self.views):
            view.invalid = True
        self.notify()

    # -- summaries

    def counts(self) -> tuple[int, int, int]:
        """(messages, recent, unseen) for STATUS; recent counts unclaimed messages in new/."""
        recent = unseen = 0
        for m in self.messages.values():
            if "\\Seen" not in m.flags:
                unseen += 1
            if m.recent_owner is None and m.info.subdir == "new":
                recent += 1
        return len(self.uids), recent, unseen

    def flag_names(self) -> list[str]:
        return [*SYSTEM_FLAGS, *sorted(self.keywords.values())]


class View:
    """One session's numbering of a selected folder and what it was told."""

    def __init__(self, shared: SharedFolder, readonly: bool) -> None:
        self.shared = shared
        self.readonly = readonly
        self.uids: list[int] = list(shared.uids)
        self.modseq = shared.modseq
        self.keyword_version = shared.keyword_version
        self.recent: set[int] = set()
        self.ghosts: dict[int, Message] = {}
        self.pending_expunge: set[int] = set()
        self.on_change: Callable[[], None] | None = None
        self.idling = False
        self.invalid = False
        self.told_recent = 0
        self.condstore = False
        self.qresync = False

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i + 1
        return None

    def message(self, uid: int) -> Message | None:
        """The message as shared, or its last state if expunged but not yet announced."""
        m = self.shared.messages.get(uid)
        if m is None:
            m = self.ghosts.get(uid) or self.shared.expunged_message(uid)
        return m

    def is_expunged(self, uid: int) -> bool:
        return uid not in self.shared.messages

    def resolve(self, ranges: list[tuple[int | None, int | None]], uid: bool) -> list[int]:
        """UIDs of a sequence set (message numbers, or UIDs when *uid*), ascending.

        Raises ValueError for a message number beyond the mailbox. In a UID
        set ``*`` is the highest UID, so ``n:*`` always includes it (RFC 3501).
        """
        uids = self.uids
        if not uids:
            if not uid and any(a is not None or b is not None for a, b in ranges):
                raise ValueError("no messages")
            return []
        spans = []
        if uid:
            star = uids[-1]
            for a, b in ranges:
                lo, hi = sorted((star if a is None else a, star if b is None else b))
                start = bisect.bisect_left(uids, lo)
                end = bisect.bisect_right(uids, hi)
                if start < end:
                    spans.append((start, end))
        else:
            star = len(uids)
            for a, b in ranges:
                lo, hi = sorted((star if a is None else a, star if b is None else b))
                if hi > star:
                    raise ValueError("message number beyond the mailbox")
                spans.append((lo - 1, hi))
        spans.sort()
        result: list[int] = []
        last_end = 0
        for start, end in spans:
            start = max(start, last_end)
            if start < end:
                result.extend(uids[start:end])
                last_end = end
        return result

    def sync(self, allow_expunge: bool, limit: int | None = None) -> tuple[list[bytes], bool]:
        """Untagged responses (without CRLFs) that bring the client up to date,
        and whether it now is: with a *limit*, only that many changes are
        taken, and the caller calls again (after letting the reactor run)."""
        shared = self.shared
        lines: list[bytes] = []
        if self.keyword_version != shared.keyword_version:
            self.keyword_version = shared.keyword_version
            lines += flag_announcements(shared)
        changes = shared.changes_since(self.modseq, limit)
        done = True
        if changes is None:
            changes = self._full_resync()
            self.modseq = shared.modseq
        elif limit is not None and len(changes) == limit and changes[-1].modseq < shared.modseq:
            self.modseq = changes[-1].modseq
            done = False
        else:
            self.modseq = shared.modseq
        arrived: dict[int, None] = {}
        updated: dict[int, None] = {}
        last = self.uids[-1] if self.uids else 0
        for change in changes:
            uid = change.uid
            if change.kind == NEW:
                if uid > last:
                    arrived[uid] = None
            elif change.kind == EXPUNGE:
                updated.pop(uid, None)
                if uid in arrived:
                    del arrived[uid]
                    continue
                if self.seq(uid) is not None and uid not in self.pending_expunge:
                    self.pending_expunge.add(uid)
                    if change.message is not None:
                        self.ghosts[uid] = change.message
            elif change.origin is not self and uid not in arrived:
                updated[uid] = None
        if allow_expunge and self.pending_expunge:
            lines += self.expunge_lines()
        if arrived:
            self.uids.extend(sorted(arrived))
            for uid in arrived:
                m = shared.messages.get(uid)
                if m is not None and (m.recent_owner is self or (
                        self.readonly and m.recent_owner is None and m.info.subdir == "new")):
                    self.recent.add(uid)
            lines.append(b"* %d EXISTS" % len(self.uids))
        if arrived or len(self.recent) != self.told_recent:
            self.told_recent = len(self.recent)
            lines.append(b"* %d RECENT" % len(self.recent))
        for uid in updated:
            seq = self.seq(uid)
            m = shared.messages.get(uid)
            if seq is not None and m is not None:
                modseq = b" MODSEQ (%d)" % m.modseq if self.condstore else b""
                lines.append(b"* %d FETCH (UID %d FLAGS %s%s)"
                             % (seq, uid, self.flag_list(m), modseq))
        return lines, done

    def _full_resync(self) -> list[Change]:
        """Changes reconstructed by comparing with the shared state (log overflowed)."""
        shared = self.shared
        changes = []
        for uid in self.uids:
            m = shared.messages.get(uid)
            if m is None:
                if uid not in self.pending_expunge:
                    changes.append(Change(0, EXPUNGE, uid, None, self.message(uid)))
            else:
                changes.append(Change(0, FLAGS, uid, None, m))
        last = self.uids[-1] if self.uids else 0
        start = bisect.bisect_right(shared.uids, last)
        for uid in shared.uids[start:]:
            changes.append(Change(0, NEW, uid, None, shared.messages[uid]))
        return changes

    def expunge_lines(self) -> list[bytes]:
        """Announce the pending expunges, highest number first (or as one
        ``VANISHED`` once QRESYNC is enabled), and renumber."""
        pending = self.pending_expunge
        if self.qresync:
            lines = [b"* VANISHED " + format_sequence_set(sorted(pending))]
        else:
            positions = sorted((bisect.bisect_left(self.uids, uid) for uid in pending),
                               reverse=True)
            lines = [b"* %d EXPUNGE" % (p + 1) for p in positions]
        self.uids = [uid for uid in self.uids if uid not in pending]
        self.recent -= pending
        self.told_recent = min(self.told_recent, len(self.recent))
        self.ghosts.clear()
        pending.clear()
        return lines

    def flag_list(self, message: Message) -> bytes:
        return _flag_list(message.flags, message.uid in self.recent)


class _Waiters:
    """Deferreds waiting for one result, fired one after the other."""

    def __init__(self) -> None:
        self._waiting: list[defer.Deferred] = []
        self._result: Any = _PENDING

    @property
    def fired(self) -> bool:
        return self._result is not _PENDING

    def wait(self) -> defer.Deferred:
        if self._result is not _PENDING:
            return defer.fail(self._result) if isinstance(self._result, Failure) \
                else defer.succeed(self._result)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result: Any) -> None:
        self._result = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


_PENDING = object()

_FLAG_LISTS: dict[tuple[frozenset[str], bool], bytes] = {}


def _flag_list(flags: frozenset[str], recent: bool) -> bytes:
    """``(\\Seen kw)`` as sent on the wire; the same few flag sets recur across a
    folder, so `UID FETCH 1:* (FLAGS)` of 100,000 messages formats each once."""
    key = (flags, recent)
    found = _FLAG_LISTS.get(key)
    if found is None:
        names = sorted(flags)
        if recent:
            names.append("\\Recent")
        found = b"(" + " ".join(names).encode("utf-8", "replace") + b")"
        if len(_FLAG_LISTS) >= 4096:
            _FLAG_LISTS.clear()
        _FLAG_LISTS[key] = found
    return found


def _merge_ranges(ranges: list[tuple[int | None, int | None]], top: int
                  ) -> list[tuple[int, int]]:
    """Sorted, merged (low, high) spans of a UID set, ``*`` being *top*, within 1..top."""
    spans = sorted((min(lo, hi), max(lo, hi)) for lo, hi in (
        (top if a is None else a, top if b is None else b) for a, b in ranges))
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        lo, hi = max(lo, 1), min(hi, top)
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _in_spans(spans: list[tuple[int, int]], uid: int) -> bool:
    i = bisect.bisect_right(spans, (uid, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= uid <= spans[i][1]


def _clean(text: str) -> str:
    return text.replace(FIELD_SEP, " ").replace(NAME_SEP, " ")


def cache_row(uid: int, base: str, vsize: int, parsed: ParsedMessage, full: bool = True
              ) -> tuple:
    """A :class:`MessageCache` row for a parsed message (SEARCH's folding);
    without ENVELOPE, BODY and BODYSTRUCTURE unless *full*."""
    fields = [(name.lower(), raw) for name, raw in parsed.header_fields()]
    folded = [(name, _clean(fold(decode_header_value(raw)))) for name, raw in fields]
    columns = []
    for field in SEARCH_COLUMNS:
        values = [value for name, value in folded if name == field]
        columns.append(FIELD_SEP.join(values) if values else None)
    date_raw = next((raw for name, raw in fields if name == "date"), None)
    day = header_date(date_raw) if date_raw is not None else None
    message_id = next((raw for name, raw in fields if name == "message-id"), None)
    return (uid, base, vsize, *columns,
            day.isoformat() if day is not None else None,
            message_id.decode("utf-8", "replace").strip() if message_id is not None else None,
            FIELD_SEP.join(name + NAME_SEP + value for name, value in folded),
            parsed.section("HEADER") or b"",
            parsed.envelope() if full else None,
            parsed.bodystructure(extensible=False) if full else None,
            parsed.bodystructure(extensible=True) if full else None)


class _ChunkIndex:
    """:class:`~mailtwist.imap.search.SearchIndex` over the cache rows of one
    chunk of a SEARCH (a UID range): one SQL query per key and chunk."""

    def __init__(self, cache: MessageCache, part: list[tuple[int, int, Message]]) -> None:
        self.cache = cache
        self.low, self.high = part[0][1], part[-1][1]
        known = cache.known(self.low, self.high)
        self.valid = {u for _, u, m in part if known.get(u) == base_key(m.info.base)}
        self._matches: dict[tuple[str, str], set[int]] = {}
        self._rows: dict[int, CachedMessage] | None = None

    def _usable(self, uid: int, needle: str) -> bool:
        return uid in self.valid and FIELD_SEP not in needle and NAME_SEP not in needle

    def header_match(self, uid: int, field: str, needle: str) -> bool | None:
        if not self._usable(uid, needle):
            return None
        key = (field, needle)
        found = self._matches.get(key)
        if found is None:
            found = self._matches[key] = self.cache.match_header(field, needle,
                                                                 self.low, self.high)
        return uid in found

    def header_text_match(self, uid: int, needle: str) -> bool | None:
        if not self._usable(uid, needle):
            return None
        key = ("", needle)
        found = self._matches.get(key)
        if found is None:
            found = self._matches[key] = self.cache.match_header_text(needle,
                                                                      self.low, self.high)
        return uid in found

    def row(self, uid: int) -> CachedMessage | None:
        if uid not in self.valid:
            return None
        if self._rows is None:
            self._rows = self.cache.get_range(self.low, self.high)
        return self._rows.get(uid)

    def sent_date(self, uid: int) -> datetime.date | None | bool:
        row = self.row(uid)
        if row is None:
            return False
        return datetime.date.fromisoformat(row.sent) if row.sent else None


class _HeaderOnly:
    """SEARCH's view of a message whose header block is cached: the body is
    read only if a BODY or TEXT key needs it."""

    def __init__(self, header: bytes, load: Callable[[], ParsedMessage]) -> None:
        self._header = ParsedMessage.parse(header)
        self._load = load

    def header_fields(self) -> list[tuple[str, bytes]]:
        return self._header.header_fields()

    def text_for_search(self) -> str:
        return self._load().text_for_search()


class _SearchItem:
    """A message as :func:`mailtwist.imap.search.evaluate` sees it (built in the pool)."""

    __slots__ = ("_index", "_info", "_shared", "flags", "modseq", "recent", "seq", "size",
                 "uid")

    def __init__(self, seq: int, uid: int, message: Message, recent: bool,
                 shared: SharedFolder, index: _ChunkIndex | None) -> None:
        self.seq = seq
        self.uid = uid
        self.flags = message.flags
        self.size = message.info.vsize
        self.recent = recent
        self.modseq = message.modseq
        self._info = message.info
        self._shared = shared
        self._index = index

    @property
    def internaldate(self) -> datetime.datetime:
        try:
            stamp = self._info.mtime
        except OSError:
            stamp = 0.0
        return datetime.datetime.fromtimestamp(stamp, datetime.UTC)

    def _load(self) -> ParsedMessage:
        try:
            raw = self._shared.read_blocking(self._info)
        except OSError:
            raw = b""
        return ParsedMessage.parse(raw)

    def parsed(self) -> ParsedMessage | _HeaderOnly:
        row = self._index.row(self.uid) if self._index is not None else None
        if row is not None:
            return _HeaderOnly(row.header, self._load)
        return self._load()


def _index_write_blocking(index: ModseqIndex, records: list[tuple]) -> None:
    """Apply pending (kind, uid, modseq[, letters]) records to the index and append them."""
    lines = [index.set(r[1], r[2], r[3]) if r[0] == "+" else index.expunge(r[1], r[2])
             for r in records]
    index.append(lines)


def flag_announcements(shared: SharedFolder) -> list[bytes]:
    """FLAGS and PERMANENTFLAGS for the folder's current keywords."""
    names = " ".join(shared.flag_names()).encode("utf-8", "replace")
    more = b" \\*" if len(shared.keywords) < 26 else b""
    return [b"* FLAGS (" + names + b")",
            b"* OK [PERMANENTFLAGS (" + names + more + b")] Flags permitted."]


class FolderRegistry:
    """The process's :class:`SharedFolder` objects, one per folder directory.

    Selected folders are kept by their sessions' views; the last
    KEEP_UNSELECTED folders used are kept too, so STATUS or APPEND on a big
    folder does not start from a fresh scan every time.
    """

    def __init__(self, reactor: Any, pool: Any) -> None:
        self.reactor = reactor
        self.pool = pool
        self._folders: weakref.WeakValueDictionary[str, SharedFolder] = (
            weakref.WeakValueDictionary())
        self._recent: OrderedDict[str, SharedFolder] = OrderedDict()
        self._warm_queue: OrderedDict[str, SharedFolder] = OrderedDict()
        self._warming: SharedFolder | None = None

    def warm_up(self, shared: SharedFolder) -> None:
        """Queue a folder for the background cache warm-up. Folders are warmed
        one after the other, so that many folders with new mail (STATUS of
        every folder, deliveries) never tie up more than one pool thread."""
        if shared is self._warming:
            return
        self._warm_queue[shared.path] = shared
        if self._warming is None:
            self._next_warm_up()

    def _next_warm_up(self) -> None:
        while self._warm_queue:
            _, shared = self._warm_queue.popitem(last=False)
            if shared.gone:
                continue
            self._warming = shared
            d = defer.Deferred.fromCoroutine(shared._warm_up())
            d.addErrback(lambda f, name=shared.name: log.failure(
                "filling the message cache of {folder}", f, folder=name))
            d.addBoth(self._warm_up_done)
            return

    def _warm_up_done(self, result: object) -> None:
        self._warming = None
        self._next_warm_up()

    def get(self, maildir: Maildir, name: str) -> SharedFolder:
        """The shared state of folder *name* (validated canonical name) of *maildir*."""
        path = str(maildir.folder_path(name))
        shared = self._folders.get(path)
        if shared is None or shared.gone:
            shared = SharedFolder(self, maildir, name, path)
            self._folders[path] = shared
        self._recent[path] = shared
        self._recent.move_to_end(path)
        while len(self._recent) > KEEP_UNSELECTED:
            self._recent.popitem(last=False)
        return shared

    def forget(self, shared: SharedFolder) -> None:
        if self._folders.get(shared.path) is shared:
            del self._folders[shared.path]
        if self._recent.get(shared.path) is shared:
            del self._recent[shared.path]

    def under(self, path: str) -> list[SharedFolder]:
        """Shared folders at *path* or in Maildir++ subfolders of it (``path.child``)."""
        return [s for key, s in list(self._folders.items())
                if key == path or key.startswith(path + ".")]


RENDERER = _renderer_fingerprint()
"""Stored with the message cache: rows made by other code are not served."""
