"""A folder's indexes: mod-sequences (``mailtwist-index``) and the message cache.

**The mod-sequence index** (CONDSTORE/QRESYNC, RFC 7162) lives next to
``dovecot-uidlist`` and holds, for one UIDVALIDITY, each message's
mod-sequence with the Maildir flag letters it had then, and the UIDs expunged
with the mod-sequence of their expunge (for QRESYNC's ``VANISHED
(EARLIER)``). It is plain text, one record a line, appended to and compacted
now and then (temp file, fsync, rename)::

    mailtwist-index 1 <uidvalidity> <highestmodseq>
    mailtwist-index 2 <uidvalidity> <highestmodseq> <expunged-floor>
    +<uid> <modseq> <flag letters>
    -<uid> <modseq>

(the first header form is written while nothing was forgotten, the second
once the expunge log was trimmed). A later record for a UID replaces an
earlier one. HIGHESTMODSEQ is the largest of the header's and the records'
mod-sequences. A last line without its newline (a write cut short) is
dropped; any other damage, a missing file or another UIDVALIDITY means the
index is rebuilt from the Maildir.

*Rebuilding without a UIDVALIDITY change.* RFC 7162 forbids HIGHESTMODSEQ
going down while UIDVALIDITY stays, and a client that saw mod-sequence N
must see every later change above N. A lost or damaged index forgets N, so
a rebuilt one starts from a *seed* guaranteed to be above any number handed
out before: the current time in microseconds (and at least the highest
mod-sequence still readable from a damaged file's header). Mod-sequences
grow by one per change, so the old numbers stay below the seed unless the
folder saw more than one change per microsecond on average since its
previous rebuild, or the clock went back meanwhile. Every message of a
rebuilt index gets the seed, and the expunge log restarts with the seed as
its *floor* (below). Only a folder that never held a message (UIDNEXT 1),
or whose index belongs to another UIDVALIDITY, starts again from 1.

*The expunge log is bounded.* At most :data:`MAX_EXPUNGED` expunged UIDs
are kept (those expunged last); the highest mod-sequence of the ones
dropped is the *floor*. A client resynchronising from a mod-sequence below
the floor is sent every UID it may know that no longer exists, a superset
RFC 7162 section 3.2.5.2 allows (see :func:`missing_ranges`).

**The message cache** (:class:`MessageCache`, ``mailtwist-cache.sqlite``)
keeps per message what SEARCH and FETCH need without opening the file; it is
described with the class.

Every method blocks; the caller runs them in the mail-io pool.
"""

from __future__ import annotations

import bisect
import errno
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from mailtwist.storage.maildir import _fsync, _write_atomic

INDEX_NAME = "mailtwist-index"
VERSION = 2
_VERSIONS = (1, 2)
_MAGIC = b"mailtwist-index"
COMPACT_SLACK = 1000
"""Records beyond twice the live entries (plus this) trigger a compaction."""

MAX_EXPUNGED = 50_000
"""Expunged UIDs remembered for VANISHED (EARLIER); older ones raise the floor."""


def time_seed() -> int:
    """A mod-sequence above any handed out before a rebuild: now, in microseconds."""
    return time.time_ns() // 1000


def trim_expunged(expunged: dict[int, int], floor: int, keep: int | None = None) -> int:
    """Drop all but the *keep* latest expunges (by mod-sequence) from *expunged*
    when it has grown a tenth beyond; return the new floor."""
    keep = MAX_EXPUNGED if keep is None else keep
    if len(expunged) <= keep + keep // 10:
        return floor
    ordered = sorted(expunged.items(), key=lambda item: item[1])
    for uid, modseq in ordered[:len(ordered) - keep]:
        del expunged[uid]
        floor = max(floor, modseq)
    return floor


def missing_ranges(present: Sequence[int], low: int, high: int) -> Iterator[tuple[int, int]]:
    """Ranges of UIDs in low..high that are not in the ascending *present*
    (what a client may still know but no longer exists)."""
    i = bisect.bisect_left(present, low)
    start = low
    while start <= high:
        nxt = present[i] if i < len(present) else high + 1
        if nxt > start:
            yield start, min(nxt - 1, high)
        start = max(start, nxt + 1)
        i += 1


_LETTER_KEYS: dict[frozenset[str], str] = {}


def letters_key(letters: Iterable[str]) -> str:
    """Flag letters as the index stores them: sorted, printable ASCII only."""
    if isinstance(letters, frozenset):
        key = _LETTER_KEYS.get(letters)
        if key is None:
            key = "".join(sorted(c for c in letters if "!" <= c <= "~"))
            if len(_LETTER_KEYS) < 4096:
                _LETTER_KEYS[letters] = key
        return key
    return "".join(sorted(c for c in letters if "!" <= c <= "~"))


class CorruptIndex(ValueError):
    """The index file cannot be used."""


class ForeignIndex(CorruptIndex):
    """The index file belongs to another UIDVALIDITY."""


def _parse_header(line: bytes) -> tuple[int, int, int, int]:
    """(version, uidvalidity, highest, floor) of a header line; CorruptIndex if bad."""
    header = line.split(b" ")
    if len(header) not in (4, 5) or header[0] != _MAGIC:
        raise CorruptIndex("bad header")
    try:
        numbers = [int(x) for x in header[1:]]
    except ValueError:
        raise CorruptIndex("bad header") from None
    version = numbers[0]
    if version not in _VERSIONS or len(header) != (4 if version == 1 else 5):
        raise CorruptIndex(f"unknown version {version}")
    return version, numbers[1], numbers[2], numbers[3] if version == 2 else 0


def _salvage_highest(path: pathlib.Path) -> int:
    """The HIGHESTMODSEQ in a damaged index's header, if it can still be read."""
    try:
        with open(path, "rb") as f:
            first = f.readline(200).rstrip(b"\n")
        return _parse_header(first)[2]
    except (OSError, CorruptIndex):
        return 0


class ModseqIndex:
    """The mod-sequences of one folder, in memory and on disk."""

    def __init__(self, path: pathlib.Path | str, uidvalidity: int) -> None:
        self.path = pathlib.Path(path)
        self.uidvalidity = uidvalidity
        self.highest = 1
        self.messages: dict[int, tuple[int, str]] = {}
        self.expunged: dict[int, int] = {}
        self.floor = 0
        """Expunges at or below this mod-sequence may have been forgotten."""
        self.dirty = False
        """The file lags behind (a write failed): the next append rewrites it whole."""
        self._records = 0

    # -- reading

    @classmethod
    def load(cls, path: pathlib.Path | str, uidvalidity: int) -> ModseqIndex:
        """The index at *path*; FileNotFoundError or CorruptIndex if unusable."""
        path = pathlib.Path(path)
        with open(path, "rb") as f:
            data = f.read()
        return cls.parse(path, data, uidvalidity)

    @classmethod
    def parse(cls, path: pathlib.Path | str, data: bytes, uidvalidity: int) -> ModseqIndex:
        """Parse the file's content; CorruptIndex if it is damaged or for another UIDVALIDITY."""
        lines = data.split(b"\n")
        if len(lines) < 2:
            raise CorruptIndex("no header")
        lines.pop()  # after the last newline: empty, or a record cut short
        version, file_uidvalidity, highest, floor = _parse_header(lines[0])
        if file_uidvalidity != uidvalidity:
            raise ForeignIndex(f"UIDVALIDITY {file_uidvalidity}, folder has {uidvalidity}")
        index = cls(path, uidvalidity)
        messages, expunged = index.messages, index.expunged
        for number, line in enumerate(lines[1:], 2):
            fields = line.split(b" ")
            try:
                kind, uid, modseq = line[:1], int(fields[0][1:]), int(fields[1])
                if uid <= 0 or modseq <= 0:
                    raise ValueError
                if kind == b"+" and len(fields) == 3:
                    letters = fields[2].decode("ascii")
                    if letters_key(letters) != letters:
                        raise ValueError
                    messages[uid] = (modseq, letters)
                    expunged.pop(uid, None)
                elif kind == b"-" and len(fields) == 2:
                    messages.pop(uid, None)
                    expunged[uid] = modseq
                else:
                    raise ValueError
            except (ValueError, IndexError, UnicodeDecodeError):
                raise CorruptIndex(f"bad record on line {number}") from None
            highest = max(highest, modseq)
        index.highest = max(highest, 1)
        index.floor = trim_expunged(expunged, floor)
        index._records = len(lines) - 1
        return index

    # -- changing

    def set(self, uid: int, modseq: int, letters: Iterable[str]) -> bytes:
        """Record a message's new mod-sequence and flags; the record to append."""
        text = letters_key(letters)
        self.messages[uid] = (modseq, text)
        self.expunged.pop(uid, None)
        self.highest = max(self.highest, modseq)
        return b"+%d %d %s\n" % (uid, modseq, text.encode("ascii"))

    def expunge(self, uid: int, modseq: int) -> bytes:
        """Record an expunge; the record to append."""
        self.messages.pop(uid, None)
        self.expunged[uid] = modseq
        self.highest = max(self.highest, modseq)
        self.floor = trim_expunged(self.expunged, self.floor)
        return b"-%d %d\n" % (uid, modseq)

    def serialize(self) -> bytes:
        """The whole index, compacted."""
        if self.floor:
            out = [b"%s 2 %d %d %d\n" % (_MAGIC, self.uidvalidity, self.highest, self.floor)]
        else:
            out = [b"%s 1 %d %d\n" % (_MAGIC, self.uidvalidity, self.highest)]
        out += [b"-%d %d\n" % item for item in sorted(self.expunged.items())]
        out += [b"+%d %d %s\n" % (uid, modseq, letters.encode("ascii"))
                for uid, (modseq, letters) in sorted(self.messages.items())]
        return b"".join(out)

    def write(self) -> None:
        """Replace the file with the compacted index (temp file, fsync, rename)."""
        try:
            _write_atomic(self.path, self.serialize())
        except OSError:
            self.dirty = True
            raise
        self.dirty = False
        self._records = len(self.messages) + len(self.expunged)

    def append(self, records: list[bytes]) -> None:
        """Append records durably; compact instead when the file has grown too much
        (or rewrite it whole after a failed write)."""
        if not records:
            return
        self._records += len(records)
        if self.dirty or not self.path.exists() or \
                self._records > 2 * (len(self.messages) + len(self.expunged)) + COMPACT_SLACK:
            self.write()
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            try:
                _drop_partial_line(fd)
                data = memoryview(b"".join(records))
                while data:
                    data = data[os.write(fd, data):]
                _fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.dirty = True
            raise


def _drop_partial_line(fd: int) -> None:
    """Truncate a last line that lacks its newline, so appends start a fresh line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    if os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - 65536)
    tail = os.pread(fd, size - start, start)
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, start + cut + 1 if cut >= 0 else 0)


def rebuild(path: pathlib.Path | str, uidvalidity: int,
            messages: Iterable[tuple[int, Iterable[str]]], seed: int = 1) -> ModseqIndex:
    """A fresh index: every (uid, letters) at mod-sequence *seed*, which is also
    the expunge log's floor; written to disk if possible (otherwise it is
    marked dirty and kept in memory)."""
    index = ModseqIndex(path, uidvalidity)
    index.highest = seed
    index.floor = seed if seed > 1 else 0
    for uid, letters in messages:
        index.messages[uid] = (seed, letters_key(letters))
    try:
        index.write()
    except OSError:
        pass
    return index


def open_index(path: pathlib.Path | str, uidvalidity: int,
               messages: Iterable[tuple[int, Iterable[str]]],
               uidnext: int | None = None) -> tuple[ModseqIndex, str | None]:
    """The folder's index, rebuilt from *messages* when missing or unusable; and
    why it was rebuilt (None if it was loaded).

    A rebuild starts from a time seed (see the module docstring) unless the
    index belonged to another UIDVALIDITY or the folder never held a message
    (*uidnext* 1); then from 1.
    """
    path = pathlib.Path(path)
    seed = 1
    try:
        return ModseqIndex.load(path, uidvalidity), None
    except FileNotFoundError:
        reason = "missing"
        if uidnext != 1:
            seed = time_seed()
    except ForeignIndex as e:
        reason = str(e)
    except (CorruptIndex, OSError) as e:
        reason = str(e)
        seed = max(time_seed(), _salvage_highest(path) + 1)
    index = rebuild(path, uidvalidity, messages, seed)
    if index.dirty:
        reason += "; could not be written"
    return index, reason


# --- the message cache -------------------------------------------------------

CACHE_NAME = "mailtwist-cache.sqlite"
CACHE_VERSION = 1
SEARCH_COLUMNS = {"from": "h_from", "to": "h_to", "cc": "h_cc", "bcc": "h_bcc",
                  "subject": "h_subject"}
"""Header fields with a column of their own (folded, decoded values)."""

FIELD_SEP, NAME_SEP = "\x1e", "\x1f"
"""Separators in the ``fields`` column: ``name NAME_SEP value`` joined by FIELD_SEP
(and between the values of a field that occurs more than once); values have
them replaced by spaces, and a needle containing one is not searched here."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    uid INTEGER PRIMARY KEY,
    base TEXT NOT NULL,
    vsize INTEGER NOT NULL,
    h_from TEXT, h_to TEXT, h_cc TEXT, h_bcc TEXT, h_subject TEXT,
    sent TEXT,
    message_id TEXT,
    fields TEXT NOT NULL,
    header BLOB NOT NULL,
    envelope BLOB,
    body BLOB,
    bodystructure BLOB
);
"""
_ROW_COLUMNS = ("uid", "base", "vsize", "h_from", "h_to", "h_cc", "h_bcc", "h_subject", "sent",
                "message_id", "fields", "header", "envelope", "body", "bodystructure")
_INSERT = (f"INSERT OR REPLACE INTO messages ({', '.join(_ROW_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_ROW_COLUMNS))})")
_FETCH_COLUMNS = "uid, base, vsize, sent, header, envelope, body, bodystructure"
_TEXT_HEADERS = "replace(replace(fields, char(31), ': '), char(30), char(10))"


class CachedMessage:
    """What the cache holds for one message (the wire-ready FETCH items).

    ENVELOPE, BODY and BODYSTRUCTURE are None in a row made for SEARCH
    alone (they cost more than the rest together); FETCH completes it.
    """

    __slots__ = ("uid", "base", "vsize", "sent", "header", "envelope", "body", "bodystructure")

    def __init__(self, uid: int, base: str, vsize: int, sent: str | None, header: bytes,
                 envelope: bytes | None, body: bytes | None,
                 bodystructure: bytes | None) -> None:
        self.uid, self.base, self.vsize, self.sent = uid, base, vsize, sent
        self.header = bytes(header)
        self.envelope = None if envelope is None else bytes(envelope)
        self.body = None if body is None else bytes(body)
        self.bodystructure = None if bodystructure is None else bytes(bodystructure)

    @property
    def complete(self) -> bool:
        """Whether the FETCH items are there too."""
        return self.envelope is not None


def base_key(base: str) -> str:
    """A Maildir base name as the cache stores it: names that are not valid
    UTF-8 on disk (decoded with surrogate escapes) are stored escaped."""
    try:
        base.encode("utf-8")
        return base
    except UnicodeEncodeError:
        return "\\x" + base.encode("utf-8", "surrogateescape").hex()


def _printable_row(row: tuple) -> tuple:
    """The row with text SQLite cannot store (lone surrogates) replaced."""
    return tuple(value.encode("utf-8", "replace").decode("utf-8")
                 if isinstance(value, str) else value for value in row)


def _identity(path: pathlib.Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _field_has(fields: str | None, name: str, needle: str) -> bool:
    """SQL function: a field called *name* in a ``fields`` value contains *needle*."""
    if fields is None:
        return False
    key = FIELD_SEP + name + NAME_SEP
    text = FIELD_SEP + fields
    pos = text.find(key)
    while pos != -1:
        begin = pos + len(key)
        end = text.find(FIELD_SEP, begin)
        if needle in (text[begin:] if end == -1 else text[begin:end]):
            return True
        pos = text.find(key, begin)
    return False


class MessageCache:
    """A folder's persistent cache of what SEARCH and FETCH need, in SQLite.

    One file per folder, ``mailtwist-cache.sqlite`` next to
    ``dovecot-uidlist`` (WAL journal, ``synchronous=NORMAL``: it is a cache,
    a lost tail is refilled). A row per message, keyed by UID and carrying
    the Maildir base name: RFC822.SIZE, the raw top-level header block, the
    rendered ENVELOPE, BODY and BODYSTRUCTURE, and for SEARCH the decoded,
    case-folded values of From, To, Cc, Bcc and Subject, of every field
    (``fields``, for ``HEADER name value`` and TEXT), the Date: field's day
    and the Message-ID. The folding is the caller's (SEARCH's); a substring
    test on folded text is then a plain ``instr()``, which (unlike LIKE) is
    right for non-ASCII text too.

    The file is only a cache: delete it and it is rebuilt; a schema
    version, UIDVALIDITY or *renderer* (a fingerprint of the code that
    renders and folds, so a fixed ENVELOPE is never served stale) other than
    ours, or a damaged file, means it is thrown away and started afresh. A UID is never reused within a
    UIDVALIDITY, so a row stays right for its message; rows of expunged
    messages are removed with :meth:`forget`, and a row whose base name does
    not match the message asked for is ignored.

    Every method blocks and may be called from any pool thread: a
    ``threading.Lock`` serialises the use of the one connection. Queries take
    UID ranges so that callers work through a big folder in chunks.
    """

    def __init__(self, path: pathlib.Path | str, uidvalidity: int,
                 renderer: str = "") -> None:
        self.path = pathlib.Path(path)
        self.uidvalidity = uidvalidity
        self.renderer = renderer
        """Names the code that made the rows (a different one starts afresh)."""
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self.broken: str | None = None
        """Why the cache is unusable (then every lookup misses), or None."""

    # -- opening

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is not None and self._identity != _identity(self.path):
            # Deleted or replaced by an administrator: start afresh.
            self._db.close()
            self._db = None
        if self._db is not None or self.broken is not None:
            return self._db
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError) as e:
            # One retry from scratch: a damaged file or a leftover journal.
            self._discard()
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as again:
                self.broken = f"{e}; then {again}"
        return self._db

    def _open(self) -> sqlite3.Connection:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            os.close(os.open(self.path, flags, 0o600))
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            os.unlink(self.path)  # a symbolic link planted where the cache goes
            os.close(os.open(self.path, flags | os.O_EXCL, 0o600))
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False,
                             isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta"))
            wanted = {"version": str(CACHE_VERSION), "uidvalidity": str(self.uidvalidity),
                      "renderer": self.renderer}
            if meta != wanted:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM messages")
                db.execute("DELETE FROM meta")
                db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
                db.execute("COMMIT")
            db.create_function("mt_field_has", 3, _field_has, deterministic=True)
        except BaseException:
            db.close()
            raise
        self._identity = _identity(self.path)
        return db

    def _discard(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the connection (the file stays)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            db = self._connection()
            if db is None:
                return []
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                self._failed(e)
                return []

    def _failed(self, error: Exception) -> None:
        """A query failed on a damaged file: start afresh next time (lock held)."""
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return
        self._discard()

    # -- reading

    def known(self, low: int, high: int) -> dict[int, str]:
        """UID -> base name (as :func:`base_key` gives it) of the rows for UIDs low..high."""
        return dict(self._query("SELECT uid, base FROM messages WHERE uid BETWEEN ? AND ?",
                                (low, high)))

    def get(self, uid: int, base: str) -> CachedMessage | None:
        """The row of message *uid* (None if missing or for another file)."""
        rows = self._query(f"SELECT {_FETCH_COLUMNS} FROM messages WHERE uid = ?", (uid,))
        if not rows or rows[0][1] != base_key(base):
            return None
        return CachedMessage(*rows[0])

    def get_many(self, uids: Sequence[int]) -> dict[int, CachedMessage]:
        """The rows of these UIDs (check the base names with :func:`base_key`)."""
        found: dict[int, CachedMessage] = {}
        for start in range(0, len(uids), 500):
            part = uids[start:start + 500]
            sql = (f"SELECT {_FETCH_COLUMNS} FROM messages "
                   f"WHERE uid IN ({','.join('?' * len(part))})")
            found.update((row[0], CachedMessage(*row)) for row in self._query(sql, part))
        return found

    def get_range(self, low: int, high: int) -> dict[int, CachedMessage]:
        """The rows for UIDs low..high."""
        return {row[0]: CachedMessage(*row) for row in self._query(
            f"SELECT {_FETCH_COLUMNS} FROM messages WHERE uid BETWEEN ? AND ?", (low, high))}

    def match_header(self, field: str, needle: str, low: int, high: int) -> set[int]:
        """UIDs in low..high with a *field* whose folded value contains the folded *needle*."""
        column = SEARCH_COLUMNS.get(field)
        if column is not None:
            sql = (f"SELECT uid FROM messages WHERE uid BETWEEN ? AND ? "
                   f"AND instr({column}, ?) > 0")
            args: tuple = (low, high, needle)
        else:
            sql = ("SELECT uid FROM messages WHERE uid BETWEEN ? AND ? "
                   "AND instr(fields, ?) > 0 AND instr(fields, ?) > 0 "
                   "AND mt_field_has(fields, ?, ?)")
            args = (low, high, field + NAME_SEP, needle, field, needle)
        return {row[0] for row in self._query(sql, args)}

    def match_header_text(self, needle: str, low: int, high: int) -> set[int]:
        """UIDs in low..high whose ``name: value`` header lines contain *needle* (TEXT)."""
        sql = (f"SELECT uid FROM messages WHERE uid BETWEEN ? AND ? "
               f"AND instr({_TEXT_HEADERS}, ?) > 0")
        return {row[0] for row in self._query(sql, (low, high, needle))}

    # -- writing

    def put(self, rows: Iterable[tuple]) -> None:
        """Store rows (in :data:`_ROW_COLUMNS` order) in one transaction."""
        rows = list(rows)

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.executemany(_INSERT, rows)
            except UnicodeEncodeError:
                # A file name or header that is not valid UTF-8 (rare): escape it.
                db.executemany(_INSERT, [_printable_row((row[0], base_key(row[1]), *row[2:]))
                                         for row in rows])

        if rows:
            self._write(insert)

    def forget(self, uids: Iterable[int]) -> None:
        """Remove the rows of expunged messages."""
        uids = [(uid,) for uid in uids]
        if uids:
            self._write(lambda db: db.executemany("DELETE FROM messages WHERE uid = ?", uids))

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> None:
        """Run *work* in one write transaction; a damaged file starts afresh."""
        with self._lock:
            db = self._connection()
            if db is None:
                return
            try:
                db.execute("BEGIN IMMEDIATE")
                work(db)
                db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._failed(e)
