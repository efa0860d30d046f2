"""A folder's mod-sequence index (CONDSTORE/QRESYNC, RFC 7162), ``mailtwist-index``.

The file lives next to ``dovecot-uidlist`` and holds, for one UIDVALIDITY,
each message's mod-sequence with the Maildir flag letters it had then, and
the UIDs expunged with the mod-sequence of their expunge (for QRESYNC's
``VANISHED (EARLIER)``). It is plain text, one record a line, appended to and
compacted now and then (temp file, fsync, rename)::

    mailtwist-index 1 <uidvalidity> <highestmodseq>
    +<uid> <modseq> <flag letters>
    -<uid> <modseq>

A later record for a UID replaces an earlier one. HIGHESTMODSEQ is the
largest of the header's and the records' mod-sequences. A last line without
its newline (a write cut short) is dropped; any other damage, a missing file
or another UIDVALIDITY means the index is rebuilt from the Maildir: every
message at mod-sequence 1, HIGHESTMODSEQ 1, no expunged UIDs.

Every method blocks; the caller runs them in the mail-io pool, one thread at
a time per folder (under the folder's lock).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

from mailtwist.storage.maildir import _fsync, _write_atomic

INDEX_NAME = "mailtwist-index"
VERSION = 1
_MAGIC = b"mailtwist-index"
COMPACT_SLACK = 1000
"""Records beyond twice the live entries (plus this) trigger a compaction."""


def letters_key(letters: Iterable[str]) -> str:
    """Flag letters as the index stores them: sorted, printable ASCII only."""
    return "".join(sorted(c for c in letters if "!" <= c <= "~"))


class CorruptIndex(ValueError):
    """The index file cannot be used."""


class ModseqIndex:
    """The mod-sequences of one folder, in memory and on disk."""

    def __init__(self, path: pathlib.Path | str, uidvalidity: int) -> None:
        self.path = pathlib.Path(path)
        self.uidvalidity = uidvalidity
        self.highest = 1
        self.messages: dict[int, tuple[int, str]] = {}
        self.expunged: dict[int, int] = {}
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
        header = lines[0].split(b" ")
        if len(header) != 4 or header[0] != _MAGIC:
            raise CorruptIndex("bad header")
        try:
            version, file_uidvalidity, highest = (int(x) for x in header[1:])
        except ValueError:
            raise CorruptIndex("bad header") from None
        if version != VERSION:
            raise CorruptIndex(f"unknown version {version}")
        if file_uidvalidity != uidvalidity:
            raise CorruptIndex(f"UIDVALIDITY {file_uidvalidity}, folder has {uidvalidity}")
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
        return b"-%d %d\n" % (uid, modseq)

    def serialize(self) -> bytes:
        """The whole index, compacted."""
        out = [b"%s %d %d %d\n" % (_MAGIC, VERSION, self.uidvalidity, self.highest)]
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
            messages: Iterable[tuple[int, Iterable[str]]]) -> ModseqIndex:
    """A fresh index: every (uid, letters) at mod-sequence 1; written to disk if
    possible (otherwise it is marked dirty and kept in memory)."""
    index = ModseqIndex(path, uidvalidity)
    for uid, letters in messages:
        index.messages[uid] = (1, letters_key(letters))
    try:
        index.write()
    except OSError:
        pass
    return index


def open_index(path: pathlib.Path | str, uidvalidity: int,
               messages: Iterable[tuple[int, Iterable[str]]]) -> tuple[ModseqIndex, str | None]:
    """The folder's index, rebuilt from *messages* when missing or unusable; and
    why it was rebuilt (None if it was loaded)."""
    try:
        return ModseqIndex.load(path, uidvalidity), None
    except FileNotFoundError:
        reason = "missing"
    except (CorruptIndex, OSError) as e:
        reason = str(e)
    index = rebuild(path, uidvalidity, messages)
    if index.dirty:
        reason += "; could not be written"
    return index, reason
