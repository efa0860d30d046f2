"""Maildir++ storage shared by SMTP delivery, POP3 and IMAP.

The on-disk layout and metadata follow Dovecot's conventions
(``dovecot-uidlist`` version 3, ``dovecot-keywords``, the
``dovecot-uidlist.lock`` dotlock, modified UTF-7 folder names and
``,S=``/``,W=`` sizes in file names) so mailboxes can be migrated between
mailtwist and Dovecot in both directions.

A corrupted or hostile Maildir must not crash a session nor leak files
from elsewhere: only regular files in ``new/`` and ``cur/`` are messages
(symbolic links, directories, FIFOs and sockets there are ignored, as are
``new``/``cur`` themselves when they are symbolic links), message files are
opened with ``O_NOFOLLOW`` and must be regular files, folder directories that
are symbolic links are not folders, delivery never writes through a ``tmp``,
``new`` or ``cur`` that is a symbolic link, and a file that cannot be read is sized
from its ``stat`` instead of failing the scan. UIDs come from the uidlist's
next-UID counter, never from the clock, so they keep growing when the clock
goes back.

Every method blocks; the protocol layers call them through ``deferToThread``.
Updates of shared metadata are serialised by a per-folder ``threading.Lock``
inside this process and by the dotlock between processes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import pathlib
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import unicodedata
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from twisted.logger import Logger

from mailtwist import mutf7

__all__ = [
    "FLAG_LETTERS",
    "LETTER_FLAGS",
    "SPECIAL_FOLDERS",
    "Folder",
    "FolderNotFound",
    "InvalidFolderName",
    "LockError",
    "Maildir",
    "MessageInfo",
    "validate_folder_name",
]

_log = Logger()

FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS: dict[str, str] = {v: k for k, v in FLAG_LETTERS.items()}
_FLAG_LETTERS_LOWER = {k.lower(): v for k, v in FLAG_LETTERS.items()}

SPECIAL_FOLDERS = frozenset({"Sent", "Drafts", "Trash", "Junk", "Archive"})

LOCK_TIMEOUT = 10.0
LOCK_STALE_AFTER = 120.0
MAX_COMPONENT_LENGTH = 200
_NAME_MAX = 255
_MAX_KEYWORDS = 26
_MISSING_RELISTS = 3

UIDLIST_NAME = "dovecot-uidlist"
KEYWORDS_NAME = "dovecot-keywords"
_UIDVALIDITY_NAME = "mailtwist-uidvalidity"
_DOVECOT_UIDVALIDITY_NAME = "dovecot-uidvalidity"
_DELETED_PREFIX = "..mailtwist-deleted-"

_FORBIDDEN_NAME_CHARS = frozenset("\\*%")
_KEYWORD_SPECIALS = frozenset('(){ %*"\\]')
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
)
_PROCESS_START = time.time()
_LOCK_HOSTNAME = socket.gethostname()


class InvalidFolderName(ValueError):
    """A folder name that cannot be mapped safely onto the Maildir++ layout."""


class FolderNotFound(LookupError):
    """The requested folder does not exist."""


class LockError(OSError):
    """A dotlock could not be acquired in time, or was taken over while held."""


# --- folder names -------------------------------------------------------


def _mutf7_encode(text: str) -> str:
    return mutf7.encode(text)


def _mutf7_decode(text: str) -> str:
    """Decode a directory name component; ValueError naming it if not canonical."""
    try:
        return mutf7.decode(text)
    except ValueError as e:
        raise ValueError(f"bad modified UTF-7 {text!r}: {e}") from None


def _dir_name(canonical: str) -> str:
    """Return the Maildir++ directory name of a canonical, non-INBOX folder name."""
    return "." + ".".join(_mutf7_encode(c) for c in canonical.split("/"))


def validate_folder_name(name: str) -> str:
    """Check an API-level folder name and return its canonical form.

    Components are separated by ``/``; a first component spelled INBOX in any
    case is normalised to ``INBOX``.  Raises `InvalidFolderName` for anything
    that could escape the Maildir root or cannot be stored in Maildir++.
    """
    if not isinstance(name, str):
        raise InvalidFolderName(f"folder name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidFolderName("folder name is empty")
    if name.startswith("/"):
        raise InvalidFolderName(f"folder name {name!r} must not start with '/'")
    if name.endswith("/"):
        raise InvalidFolderName(f"folder name {name!r} must not end with '/'")
    components = name.split("/")
    for comp in components:
        if not comp:
            raise InvalidFolderName(f"folder name {name!r} has an empty component")
        if comp in (".", ".."):
            raise InvalidFolderName(f"folder name {name!r} must not contain {comp!r} components")
        if "." in comp:
            raise InvalidFolderName(
                f"folder name {name!r} must not contain '.': it is the on-disk "
                "hierarchy separator of Maildir++ (use '/' for subfolders)"
            )
        for ch in comp:
            if ch in _FORBIDDEN_NAME_CHARS:
                raise InvalidFolderName(f"folder name {name!r} must not contain {ch!r}")
            if unicodedata.category(ch) in ("Cc", "Cs"):
                raise InvalidFolderName(
                    f"folder name {name!r} must not contain control character U+{ord(ch):04X}"
                )
        if len(comp) > MAX_COMPONENT_LENGTH:
            raise InvalidFolderName(
                f"folder name component {comp[:20]!r}... is longer than "
                f"{MAX_COMPONENT_LENGTH} characters"
            )
    if components[0].upper() == "INBOX":
        components[0] = "INBOX"
    canonical = "/".join(components)
    if canonical != "INBOX" and len(_dir_name(canonical).encode("ascii")) > _NAME_MAX:
        raise InvalidFolderName(
            f"folder name {name[:40]!r}... is too long once encoded for the file system"
        )
    return canonical


def _decode_dir_name(dir_name: str) -> str | None:
    """Map a ``.Name`` directory back to its folder name, or None if it is not one of ours."""
    if not dir_name.startswith(".") or dir_name.startswith(_DELETED_PREFIX):
        return None
    try:
        decoded = "/".join(_mutf7_decode(c) for c in dir_name[1:].split("."))
        canonical = validate_folder_name(decoded)
    except ValueError:
        return None
    if canonical == "INBOX" or _dir_name(canonical) != dir_name:
        return None
    return canonical


# --- small file-system helpers ------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of data, looping over short writes."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync(fd: int) -> None:
    """Flush a file descriptor to stable storage (a seam for failure tests)."""
    os.fsync(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    """Make directory entry changes (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: os.PathLike[str] | str) -> None:
    """Best-effort removal used while cleaning up after an earlier error."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _mkdir(path: pathlib.Path) -> bool:
    """Create one directory race-safely; return whether this call created it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
        return False
    return True


def _write_atomic(path: pathlib.Path, data: bytes, lock: _DotLock | None = None) -> tuple[int, ...]:
    """Replace path with data via temp file + fsync + rename; return the new file's stamp.

    If a lock is given it is verified just before the rename so a writer whose
    lock was broken as stale never clobbers the new holder's work.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            _fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if lock is not None:
            lock.verify()
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_OPEN_MESSAGE = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | _O_CLOEXEC)


def _open_regular(path: os.PathLike[str] | str) -> BinaryIO:
    """Open a message file for reading: never through a symbolic link, and only
    if it is a regular file (a FIFO would block, a device leak)."""
    fd = os.open(path, _OPEN_MESSAGE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_sizes(path: pathlib.Path) -> tuple[int, int]:
    """Return (on-disk size, size with every line ending as CRLF) by reading the file."""
    size = lf = crlf = 0
    prev_cr = False
    with _open_regular(path) as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            lf += chunk.count(b"\n")
            crlf += chunk.count(b"\r\n")
            if prev_cr and chunk[:1] == b"\n":
                crlf += 1
            prev_cr = chunk[-1:] == b"\r"
    return size, size + lf - crlf


def _crlf_size(data: bytes) -> int:
    """Length of data once every bare LF becomes CRLF (matches read_message_crlf)."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _sanitize_hostname(hostname: str) -> str:
    """Escape a host name for use in Maildir file names, as Dovecot does.

    ``/`` becomes ``\\057`` and ``:`` ``\\072``; any other byte outside
    ``[A-Za-z0-9._-]`` is escaped the same way so nothing can break the
    ``,S=``/``:2,`` syntax or the line-based uidlist.
    """
    out = []
    for byte in hostname.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch.isascii() and (ch.isalnum() or ch in "._-"):
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out) or "localhost"


_counter = itertools.count(1)
_counter_lock = threading.Lock()


def _unique_base(hostname: str, size: int, vsize: int) -> str:
    """Return a Dovecot-style unique base name ``secs.MusecsPpidQn.host,S=..,W=..``."""
    with _counter_lock:
        q = next(_counter)
    secs, nsecs = divmod(time.time_ns(), 1_000_000_000)
    return f"{secs}.M{nsecs // 1000}P{os.getpid()}Q{q}.{hostname},S={size},W={vsize}"


_BASE_TIME = re.compile(r"^([0-9]+)\.M([0-9]+)P[0-9]+(?:Q([0-9]+))?\.")


def _arrival_key(base: str, mtime_ns: int) -> tuple[int, int]:
    """Order in which new messages get UIDs: the delivery time in a Maildir
    name of ours or Dovecot's (``secs.Musecs...``, then our per-process
    counter), else the file's time.  Not the mtime alone: APPEND and COPY set it
    to the INTERNALDATE, and a COPY of 1:3 must number its copies in order."""
    match = _BASE_TIME.match(base)
    if match is None:
        return mtime_ns, 0
    secs, usecs, q = match.groups()
    return int(secs) * 1_000_000_000 + int(usecs) * 1000, int(q or 0)


_BASE_PID_HOST = re.compile(r"^[0-9]+\.M[0-9]+P([0-9]+)Q[0-9]+\.([^,:]+)")
TMP_MAX_AGE = 36 * 3600


def _pid_is_dead(pid: int) -> bool:
    """Whether no process with this PID runs on this host (False when unsure)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _tmp_is_leftover(name: str, st: os.stat_result, hostname: str, now: float) -> bool:
    """Whether a file in tmp/ can no longer be part of a live delivery.

    ctime is used, not mtime: a delivery may set an old mtime (IMAP APPEND's
    internal date) while the file is still in tmp/, but cannot set ctime.
    A file is a leftover if it is older than `TMP_MAX_AGE` (Dovecot's rule),
    or if its name says it was created on this host (our host name) by a
    process that no longer runs, or by an earlier process with our own PID,
    and it predates this process.
    """
    if st.st_ctime < now - TMP_MAX_AGE:
        return True
    match = _BASE_PID_HOST.match(name)
    if match is None or match[2] != hostname:
        return False
    pid = int(match[1])
    if pid == os.getpid():
        return st.st_ctime < _PROCESS_START - 1
    return st.st_ctime < _PROCESS_START and _pid_is_dead(pid)


_SIZE_FIELD = re.compile(r",S=([0-9]+)(?=,|$)")
_VSIZE_FIELD = re.compile(r",W=([0-9]+)(?=,|$)")


_BOTH_SIZES = re.compile(r",S=([0-9]+),W=([0-9]+)$")


def _name_sizes(base: str) -> tuple[int | None, int | None]:
    """Read the ``,S=`` and ``,W=`` fields of a base name, if present."""
    both = _BOTH_SIZES.search(base)
    if both is not None:  # the usual layout, one search instead of two
        return int(both[1]), int(both[2])
    size = _SIZE_FIELD.search(base)
    vsize = _VSIZE_FIELD.search(base)
    return (int(size[1]) if size else None, int(vsize[1]) if vsize else None)


def _sizes_in_name(base: str) -> bool:
    """Whether the base name carries both sizes (``,S=`` and ``,W=`` with digits)."""
    if ",S=" not in base or ",W=" not in base:
        return False
    return _BOTH_SIZES.search(base) is not None or None not in _name_sizes(base)


def _ext_sizes(ext: tuple[str, ...]) -> tuple[int | None, int | None]:
    """Read the ``S``/``W`` extension fields of a uidlist record."""
    size = vsize = None
    for token in ext:
        key, value = token[:1], token[1:]
        if key == "S" and value.isdigit():
            size = int(value)
        elif key == "W" and value.isdigit():
            vsize = int(value)
    return size, vsize


def _flags_of(filename: str) -> frozenset[str]:
    """Return the flag letters of a file name's ``:2,`` info (empty for ``new/`` names)."""
    return _flags_of_info(filename.partition(":")[2])


@functools.lru_cache(maxsize=1024)
def _flags_of_info(info: str) -> frozenset[str]:
    """Flag letters of an info part such as ``2,FS`` (cached: few distinct values)."""
    if not info.startswith("2,"):
        return frozenset()
    letters = info[2:].split(",", 1)[0]
    return frozenset(c for c in letters if c.isascii() and c.isalpha())


def _info_extra(filename: str) -> str:
    """Return Dovecot's non-standard ``,fields`` after the flags, kept across flag changes."""
    _, _, info = filename.partition(":")
    if not info.startswith("2,"):
        return ""
    _, comma, extra = info[2:].partition(",")
    return comma + extra


def _normalize_flags(flags: Iterable[str]) -> str:
    """Turn flag letters and/or IMAP system flag names into sorted Maildir letters."""
    letters = set()
    for flag in flags:
        letter = _FLAG_LETTERS_LOWER.get(flag.lower()) if flag.startswith("\\") else flag
        if letter is None or len(letter) != 1 or not (letter.isascii() and letter.isalpha()):
            raise ValueError(f"invalid Maildir flag {flag!r}")
        letters.add(letter)
    return "".join(sorted(letters))


def _find_message(folder_path: pathlib.Path, base: str) -> pathlib.Path | None:
    """Look a message up by base name in new/ then cur/ (the order a new->cur move cannot dodge)."""
    prefix = base + ":"
    for sub in ("new", "cur"):
        try:
            it = os.scandir(folder_path / sub)
        except FileNotFoundError:
            continue
        with it:
            for entry in it:
                if entry.name == base or entry.name.startswith(prefix):
                    return folder_path / sub / entry.name
    return None


# --- locking ------------------------------------------------------------


class _PathLock:
    """A process-wide thread lock for one path, shared by every object using that path."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


_path_locks: weakref.WeakValueDictionary[str, _PathLock] = weakref.WeakValueDictionary()
_path_locks_guard = threading.Lock()


def _thread_lock(path: pathlib.Path) -> _PathLock:
    """Return the shared thread lock for path (kept alive by its users)."""
    key = os.path.abspath(path)
    with _path_locks_guard:
        holder = _path_locks.get(key)
        if holder is None:
            holder = _PathLock()
            _path_locks[key] = holder
        return holder


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """Tell files apart even when a freed inode number is reused straight away."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class _DotLock:
    """Dovecot-compatible dotlock: a ``<file>.lock`` created with O_EXCL.

    The lock file holds ``pid:hostname`` like Dovecot's.  A lock older than
    `LOCK_STALE_AFTER` seconds, or one whose holder on this host is dead, is
    considered stale and removed.  The holder keeps its lock file open so the
    inode cannot be recycled for somebody else's lock, which makes the
    ownership check before writes and on release reliable.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.002
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                if time.monotonic() >= deadline:
                    message = f"timed out after {LOCK_TIMEOUT:g}s waiting for lock"
                    raise LockError(errno.EAGAIN, message, str(self.path)) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            try:
                os.write(fd, f"{os.getpid()}:{_LOCK_HOSTNAME}".encode())
            except OSError:
                pass
            self._fd = fd
            return

    def _holder_is_dead(self, st: os.stat_result) -> bool:
        """Whether the lock's owner is a process on this host that no longer runs."""
        try:
            with open(self.path, "rb") as f:
                content = f.read(256).decode("utf-8", "replace")
        except OSError:
            return False
        pid_text, sep, host = content.partition(":")
        if not sep or host != _LOCK_HOSTNAME or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return st.st_mtime < _PROCESS_START - 1
        return _pid_is_dead(pid)

    def _break_if_stale(self) -> bool:
        """Remove the lock if stale; return True if the caller should retry at once."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        if time.time() - st.st_mtime < LOCK_STALE_AFTER and not self._holder_is_dead(st):
            return False
        try:
            again = os.stat(self.path)
            if _file_identity(again) != _file_identity(st):
                return True
            os.unlink(self.path)
        except FileNotFoundError:
            return True
        _log.warn("Removed stale lock {path}", path=str(self.path))
        return True

    def _is_ours(self) -> bool:
        if self._fd is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def verify(self) -> None:
        """Raise LockError unless the lock file on disk is still the one we created."""
        if not self._is_ours():
            raise LockError(errno.ENOLCK, "lock was lost (broken as stale?)", str(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._is_ours():
                _unlink_quietly(self.path)
            else:
                _log.warn("Lock {path} was taken over before release", path=str(self.path))
        finally:
            os.close(self._fd)
            self._fd = None


@contextmanager
def _locked(path: pathlib.Path) -> Iterator[_DotLock]:
    """Hold the thread lock and the dotlock ``<path>.lock`` for the block."""
    lock_path = path.with_name(path.name + ".lock")
    holder = _thread_lock(lock_path)
    with holder.lock:
        dotlock = _DotLock(lock_path)
        dotlock.acquire()
        try:
            yield dotlock
        finally:
            dotlock.release()


# --- uidlist ------------------------------------------------------------


@dataclass(frozen=True)
class _UidList:
    """Parsed ``dovecot-uidlist``; records map base name -> (uid, extension fields) in UID order."""

    uidvalidity: int
    nextuid: int
    guid: str
    extra: tuple[str, ...]
    records: dict[str, tuple[int, tuple[str, ...]]]
    stamp: tuple[int, ...] | None = None
    digest: bytes = b""


def _parse_uidlist(data: bytes) -> _UidList:
    """Parse a version 3 or version 1 uidlist; raise ValueError if the header is unusable."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines.pop()
    if not lines or not lines[0]:
        raise ValueError("empty uidlist")
    header = lines[0].split()
    version = header[0]
    extra: list[str] = []
    guid = ""
    if version == "3":
        uidvalidity = nextuid = None
        for token in header[1:]:
            key, value = token[:1], token[1:]
            if key == "V" and value.isdigit():
                uidvalidity = int(value)
            elif key == "N" and value.isdigit():
                nextuid = int(value)
            elif key == "G":
                guid = value
            else:
                extra.append(token)
        if uidvalidity is None:
            raise ValueError("uidlist header without UIDVALIDITY")
        nextuid = nextuid or 1
    elif version == "1" and len(header) >= 3 and header[1].isdigit() and header[2].isdigit():
        uidvalidity, nextuid = int(header[1]), int(header[2])
    else:
        raise ValueError(f"unsupported uidlist header {lines[0][:60]!r}")

    records: dict[str, tuple[int, tuple[str, ...]]] = {}
    seen_uids: set[int] = set()
    last_uid = 0
    ordered = True
    for line in lines[1:]:
        if version == "3":
            head, sep, filename = line.partition(" :")
            if not sep:
                continue
            fields = head.split()
            if not fields:
                continue
            uid_text, ext = fields[0], tuple(fields[1:])
        else:
            uid_text, sep, filename = line.partition(" ")
            ext = ()
            if not sep:
                continue
        if not uid_text.isdigit():
            continue
        uid = int(uid_text)
        base = filename.partition(":")[0]
        if uid == 0 or not base or base in records or uid in seen_uids:
            continue
        seen_uids.add(uid)
        records[base] = (uid, ext)
        ordered = ordered and uid > last_uid
        last_uid = max(last_uid, uid)
    if not ordered:
        records = dict(sorted(records.items(), key=lambda item: item[1][0]))
    return _UidList(
        uidvalidity=uidvalidity,
        nextuid=max(nextuid, last_uid + 1),
        guid=guid if len(guid) == 32 else uuid.uuid4().hex,
        extra=tuple(extra),
        records=records,
    )


_Listing = dict[str, tuple[str, str]]
"""Base name -> (subdir, current file name)."""


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _serialize_uidlist(state: _UidList) -> bytes:
    """Render a uidlist in Dovecot's version 3 format."""
    header = f"3 V{state.uidvalidity} N{state.nextuid} G{state.guid}"
    lines = [" ".join((header, *state.extra))]
    for base, (uid, ext) in state.records.items():
        lines.append(f"{uid} {' '.join(ext)} :{base}" if ext else f"{uid} :{base}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


# --- messages -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as seen by the last scan; a snapshot, the file may move later."""

    uid: int
    base: str
    subdir: str
    filename: str
    flags: frozenset[str]
    size: int
    vsize: int
    folder_path: pathlib.Path = field(repr=False)
    _mtime: float | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> pathlib.Path:
        """Where the file was when this snapshot was taken."""
        return self.folder_path / self.subdir / self.filename

    @property
    def mtime(self) -> float:
        """Modification time, used as IMAP INTERNALDATE; stat'ed lazily and cached."""
        value = self._mtime
        if value is None:
            try:
                value = os.lstat(self.path).st_mtime
            except FileNotFoundError:
                moved = _find_message(self.folder_path, self.base)
                if moved is None:
                    raise
                value = os.lstat(moved).st_mtime
            object.__setattr__(self, "_mtime", value)
        return value


class Folder:
    """One Maildir folder (INBOX is the Maildir root itself)."""

    def __init__(self, maildir: Maildir, name: str, path: pathlib.Path) -> None:
        self.maildir = maildir
        self.name = name
        self.path = path
        self._uidlist_path = path / UIDLIST_NAME
        self._state: _UidList | None = None
        self._computed_sizes: dict[str, tuple[int, int]] = {}
        self._guessed_sizes: set[str] = set()
        self._infos: dict[str, MessageInfo] = {}
        self._snapshot: tuple[_UidList, _Listing, list[MessageInfo]] | None = None

    def __repr__(self) -> str:
        return f"<Folder {self.name!r} at {str(self.path)!r}>"

    # -- properties

    @property
    def uidvalidity(self) -> int:
        """UIDVALIDITY of the folder (scans first if this object has not yet)."""
        if self._state is None:
            self.scan()
        assert self._state is not None
        return self._state.uidvalidity

    @property
    def uidnext(self) -> int:
        """The UID the next new message will get, as of the last scan."""
        if self._state is None:
            self.scan()
        assert self._state is not None
        return self._state.nextuid

    # -- scanning

    def _list(self) -> _Listing:
        """Map base name -> (subdir, file name) for every message, listing new/ before cur/.

        No per-file stat: the directory entry's type says what is a regular
        file (anything else, symbolic links included, is skipped), and a
        ``new``/``cur`` that is itself a symbolic link is not read.
        """
        found: _Listing = {}
        for sub in ("new", "cur"):
            path = self.path / sub
            try:
                it = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                if os.path.islink(path):
                    _log.warn("Ignoring {path}: a symbolic link", path=str(path))
                    continue
                try:
                    names = [e.name for e in it if e.is_file(follow_symlinks=False)]
                except OSError as e:
                    _log.warn("Cannot list {path}: {error}", path=str(path), error=e)
                    continue
                for name in names:
                    if name[0] == "." or "\n" in name or "\r" in name:
                        continue
                    found[name.partition(":")[0]] = (sub, name)
        return found

    def _load_uidlist(self, verify: bool = False) -> _UidList | None:
        """Read the uidlist, reusing the cached parse when the file is unchanged.

        Unchanged normally means same inode, size and mtime.  Before a
        read-modify-write (verify=True) the content itself is compared, since
        a recycled inode rewritten within one timestamp tick can match those.
        """
        try:
            st = os.stat(self._uidlist_path)
        except FileNotFoundError:
            return None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._state
        if not verify and cached is not None and cached.stamp == stamp:
            return cached
        try:
            with open(self._uidlist_path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = _digest(data)
        if cached is not None and cached.digest == digest:
            return cached if cached.stamp == stamp else replace(cached, stamp=stamp)
        try:
            parsed = _parse_uidlist(data)
        except ValueError as e:
            _log.warn("Ignoring corrupt {path}: {error}", path=str(self._uidlist_path), error=e)
            return None
        return replace(parsed, stamp=stamp, digest=digest)

    def _known_sizes(self, base: str, ext: tuple[str, ...]) -> tuple[int | None, int | None]:
        size, vsize = _name_sizes(base)
        if size is None or vsize is None:
            ext_size, ext_vsize = _ext_sizes(ext)
            size = size if size is not None else ext_size
            vsize = vsize if vsize is not None else ext_vsize
        if size is None or vsize is None:
            computed = self._computed_sizes.get(base)
            if computed is not None:
                size, vsize = computed
        return size, vsize

    def _compute_missing_sizes(self, state: _UidList | None, listing: _Listing) -> bool:
        """Read files whose sizes are not in their name or the uidlist; drop vanished ones.

        Returns whether the uidlist should be rewritten to cache new sizes.
        """
        records = state.records if state is not None else {}
        needs_write = False
        for base, (sub, name) in list(listing.items()):
            if _sizes_in_name(base):
                continue
            ext = records.get(base, (0, ()))[1]
            ext_size, ext_vsize = _ext_sizes(ext)
            if ext_size is not None and ext_vsize is not None:
                continue
            if base in records:
                needs_write = True
            if base in self._computed_sizes:
                continue
            path = self.path / sub / name
            try:
                try:
                    self._computed_sizes[base] = _file_sizes(path)
                except FileNotFoundError:
                    moved = _find_message(self.path, base)
                    if moved is None:
                        del listing[base]
                        continue
                    listing[base] = (moved.parent.name, moved.name)
                    path = moved
                    self._computed_sizes[base] = _file_sizes(moved)
            except OSError as e:
                if isinstance(e, FileNotFoundError):
                    del listing[base]
                    continue
                # Unreadable (permissions, not a regular file any more): size
                # it from lstat for now and do not record that in the uidlist.
                _log.warn("Cannot read {path}: {error}", path=str(path), error=e)
                try:
                    size = os.lstat(path).st_size
                except OSError:
                    size = 0
                self._computed_sizes[base] = (size, size)
                self._guessed_sizes.add(base)
        return needs_write

    def scan(self) -> list[MessageInfo]:
        """List the folder, assign UIDs to new arrivals, and return messages sorted by UID.

        Nothing is moved.  When the uidlist already covers exactly the files
        present, no lock is taken and nothing is written.
        """
        if not self.path.is_dir():
            raise FolderNotFound(self.name)
        listing = self._list()
        state = self._load_uidlist()
        snapshot = self._snapshot
        if snapshot is not None and state is snapshot[0] and listing == snapshot[1]:
            return list(snapshot[2])
        # Reading files to size them can be slow, so it happens before locking.
        needs_write = self._compute_missing_sizes(state, listing)
        if state is not None and not needs_write:
            records = state.records
            if len(records) == len(listing) and all(b in records for b in listing):
                self._state = state
                return self._build(state, listing, {})

        try:
            with _locked(self._uidlist_path) as lock:
                state, listing, mtimes = self._sync_locked(lock)
        except FileNotFoundError as e:
            if not self.path.is_dir():
                raise FolderNotFound(self.name) from e
            raise
        return self._build(state, listing, mtimes)

    def _sync_locked(self, lock: _DotLock) -> tuple[_UidList, _Listing, dict[str, float]]:
        """Bring the uidlist in line with the directories; must hold the uidlist lock."""
        state = self._load_uidlist(verify=True)
        listing = self._list()
        created = state is None
        if state is None:
            state = _UidList(
                uidvalidity=self.maildir._next_uidvalidity(),
                nextuid=1,
                guid=uuid.uuid4().hex,
                extra=(),
                records={},
            )
        missing = {base for base in state.records if base not in listing}
        for _ in range(_MISSING_RELISTS):
            if not missing:
                break
            # readdir() may skip a file that another session renames while we
            # list, so a message must be missing from several listings before
            # it is believed expunged and its UID dropped.
            again = self._list()
            listing.update(again)
            missing = {base for base in missing if base not in again}
        self._compute_missing_sizes(state, listing)

        changed = created
        records: dict[str, tuple[int, tuple[str, ...]]] = {}
        for base, record in state.records.items():
            if base not in listing:
                changed = True
                continue
            if not _sizes_in_name(base):
                ext = self._cache_sizes_in_ext(base, record[1])
                if ext != record[1]:
                    record = (record[0], ext)
                    changed = True
            records[base] = record

        arrivals = []
        mtimes: dict[str, float] = {}
        folder_dir = os.fspath(self.path) + os.sep
        for base, (sub, name) in list(listing.items()):
            if base in records:
                continue
            try:
                st = os.lstat(folder_dir + sub + os.sep + name)
            except FileNotFoundError:
                moved = _find_message(self.path, base)
                try:
                    if moved is None:
                        raise FileNotFoundError(base)
                    st = os.lstat(moved)
                except FileNotFoundError:
                    del listing[base]
                    continue
                listing[base] = (moved.parent.name, moved.name)
            mtimes[base] = st.st_mtime
            arrivals.append((_arrival_key(base, st.st_mtime_ns), listing[base][1], base))
        arrivals.sort()
        nextuid = state.nextuid
        for _, _, base in arrivals:
            ext: tuple[str, ...] = ()
            if not _sizes_in_name(base):
                ext = self._cache_sizes_in_ext(base, ext)
            records[base] = (nextuid, ext)
            nextuid += 1
            changed = True

        new_state = replace(state, nextuid=nextuid, records=records)
        if changed:
            new_state = self._write_uidlist(new_state, lock)
        self._state = new_state
        return new_state, listing, mtimes

    def _cache_sizes_in_ext(self, base: str, ext: tuple[str, ...]) -> tuple[str, ...]:
        """Return ext with S/W fields added from computed sizes, as Dovecot stores them."""
        computed = self._computed_sizes.get(base)
        if computed is None or base in self._guessed_sizes:
            return ext
        ext_size, ext_vsize = _ext_sizes(ext)
        if ext_size is not None and ext_vsize is not None:
            return ext
        kept = tuple(t for t in ext if t[:1] not in ("S", "W"))
        return (*kept, f"S{computed[0]}", f"W{computed[1]}")

    def _build(
        self, state: _UidList, listing: _Listing, mtimes: dict[str, float]
    ) -> list[MessageInfo]:
        """Make MessageInfo objects, reusing those of the previous scan that did not change."""
        previous = self._infos
        current: dict[str, MessageInfo] = {}
        for base, (uid, ext) in state.records.items():
            location = listing.get(base)
            if location is None:
                continue
            sub, name = location
            info = previous.get(base)
            if info is None or info.uid != uid or info.filename != name or info.subdir != sub:
                size, vsize = self._known_sizes(base, ext)
                if size is None or vsize is None:
                    continue
                info = MessageInfo(
                    uid, base, sub, name, _flags_of(name), size, vsize, self.path, mtimes.get(base)
                )
            current[base] = info
        self._infos = current
        result = list(current.values())
        self._snapshot = (state, listing, result)
        return list(result)

    def _drop_records(self, bases: set[str]) -> None:
        """Remove bases from the uidlist (UIDs are never handed out again)."""
        if not bases:
            return
        with _locked(self._uidlist_path) as lock:
            state = self._load_uidlist(verify=True)
            if state is None or not any(b in state.records for b in bases):
                return
            records = {b: r for b, r in state.records.items() if b not in bases}
            self._state = self._write_uidlist(replace(state, records=records), lock)

    def _write_uidlist(self, state: _UidList, lock: _DotLock) -> _UidList:
        """Atomically replace the uidlist; return state stamped as the new file."""
        data = _serialize_uidlist(state)
        stamp = _write_atomic(self._uidlist_path, data, lock)
        return replace(state, stamp=stamp, digest=_digest(data))

    # -- delivery

    def _ensure_subdirs(self) -> None:
        """Recreate missing cur/new/tmp, but never resurrect a deleted folder."""
        if self.name == "INBOX":
            self.maildir.ensure()
            return
        if not self.path.is_dir():
            raise FolderNotFound(self.name)
        created = False
        for sub in ("cur", "new", "tmp"):
            created |= _mkdir(self.path / sub)
        if created:
            _fsync_dir(self.path)

    def deliver(
        self, message: bytes, flags: str | Iterable[str] = "", mtime: float | None = None
    ) -> str:
        """Store message durably and return its base name.

        CRLF line endings are stored as LF.  Without flags the file lands in
        ``new/``, with flags in ``cur/`` with a ``:2,`` suffix.  On any error
        nothing is left behind and the OSError propagates.
        """
        letters = _normalize_flags(flags)
        data = message.replace(b"\r\n", b"\n")
        size, vsize = len(data), _crlf_size(data)
        hostname = self.maildir.hostname
        tmp_dir = self.path / "tmp"
        dest_dir = self.path / ("cur" if letters else "new")
        suffix = f":2,{letters}" if letters else ""

        for directory in (tmp_dir, dest_dir):
            if os.path.islink(directory):
                # Never write through a link planted in the Maildir.
                raise OSError(errno.ELOOP, "a symbolic link is in the way", str(directory))
        base = _unique_base(hostname, size, vsize)
        tmp_path = tmp_dir / base
        open_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        for attempt in itertools.count():
            try:
                fd = os.open(tmp_path, open_flags, 0o600)
                break
            except FileExistsError:
                if attempt >= 10:
                    raise
            except FileNotFoundError:
                if attempt >= 1:
                    raise
                self._ensure_subdirs()
            base = _unique_base(hostname, size, vsize)
            tmp_path = tmp_dir / base

        dest_path: pathlib.Path | None = None
        try:
            try:
                _write_all(fd, data)
                if mtime is not None:
                    os.utime(fd, (mtime, mtime))
                _fsync(fd)
            finally:
                os.close(fd)
            dest_path = self._publish(tmp_path, dest_dir, base, suffix, size, vsize)
            base = dest_path.name.partition(":")[0]
            _fsync_dir(dest_dir)
        except BaseException:
            _unlink_quietly(tmp_path)
            if dest_path is not None:
                _unlink_quietly(dest_path)
            raise
        return base

    def _publish(
        self,
        tmp_path: pathlib.Path,
        dest_dir: pathlib.Path,
        base: str,
        suffix: str,
        size: int,
        vsize: int,
    ) -> pathlib.Path:
        """Move a fully written tmp file into new/ or cur/ without ever overwriting a file."""
        created_dirs = False
        for attempt in itertools.count():
            dest_path = dest_dir / (base + suffix)
            try:
                os.link(tmp_path, dest_path)
            except FileExistsError:
                if attempt >= 10:
                    raise
                base = _unique_base(self.maildir.hostname, size, vsize)
                continue
            except FileNotFoundError:
                if created_dirs or not tmp_path.exists():
                    raise
                self._ensure_subdirs()
                created_dirs = True
                continue
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                if os.path.lexists(dest_path):
                    base = _unique_base(self.maildir.hostname, size, vsize)
                    continue
                os.rename(tmp_path, dest_path)
                return dest_path
            try:
                os.unlink(tmp_path)
            except BaseException:
                _unlink_quietly(dest_path)
                raise
            return dest_path
        raise AssertionError("unreachable")

    # -- reading

    def _locate(self, info: MessageInfo) -> pathlib.Path:
        """Current path of a message, following renames by other sessions."""
        if os.path.lexists(info.path):
            return info.path
        moved = _find_message(self.path, info.base)
        if moved is None:
            raise FileNotFoundError(errno.ENOENT, "message no longer exists", str(info.path))
        return moved

    def open_message(self, info: MessageInfo) -> BinaryIO:
        """Open the message's raw on-disk bytes for streaming.

        Never through a symbolic link, and only a regular file (OSError else).
        """
        try:
            return _open_regular(info.path)
        except FileNotFoundError:
            return _open_regular(self._locate(info))

    def read_message(self, info: MessageInfo) -> bytes:
        """Return the raw on-disk bytes (normally LF line endings)."""
        with self.open_message(info) as f:
            return f.read()

    def read_message_crlf(self, info: MessageInfo) -> bytes:
        """Return the message with every line ending as CRLF, as POP3/IMAP send it."""
        return self.read_message(info).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    # -- flags

    def _change_flags(
        self, info: MessageInfo, compute: Callable[[frozenset[str]], str]
    ) -> MessageInfo:
        """Rename the message into cur/ with flags compute(current flags); the UID is kept."""
        src, sub, name = info.path, info.subdir, info.filename
        for _ in range(10):
            letters = compute(_flags_of(name))
            new_name = f"{info.base}:2,{letters}{_info_extra(name)}"
            updated = replace(info, subdir="cur", filename=new_name, flags=frozenset(letters))
            if sub == "cur" and name == new_name:
                return updated
            try:
                os.rename(src, self.path / "cur" / new_name)
                return updated
            except FileNotFoundError:
                moved = _find_message(self.path, info.base)
                if moved is None:
                    raise FileNotFoundError(
                        errno.ENOENT, "message no longer exists (expunged?)", str(info.path)
                    ) from None
                if moved == src:
                    self._ensure_subdirs()
                src, sub, name = moved, moved.parent.name, moved.name
        raise OSError(errno.EAGAIN, "message kept being renamed by another session", str(info.path))

    def set_flags(self, info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
        """Replace the message's flags (letters or IMAP system flag names)."""
        letters = _normalize_flags(flags)
        return self._change_flags(info, lambda current: letters)

    def add_flags(self, info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
        """Add flags to whatever is on disk now (not to the possibly stale info.flags)."""
        added = _normalize_flags(flags)
        return self._change_flags(info, lambda current: _normalize_flags(current | set(added)))

    def remove_flags(self, info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
        """Remove flags from whatever is on disk now."""
        removed = set(_normalize_flags(flags))
        return self._change_flags(info, lambda current: _normalize_flags(current - removed))

    def mark_seen(self, info: MessageInfo) -> MessageInfo:
        """Add the Seen flag and move the message to cur/ (POP3 RETR)."""
        return self.add_flags(info, "S")

    # -- removal

    def _unlink_message(self, info: MessageInfo) -> None:
        path = info.path
        for _ in range(10):
            try:
                os.unlink(path)
                return
            except FileNotFoundError:
                moved = _find_message(self.path, info.base)
                if moved is None:
                    return
                path = moved
        os.unlink(path)

    def remove(self, info: MessageInfo) -> None:
        """Delete a message (already gone is fine) and drop it from the uidlist."""
        self.remove_many([info])

    def remove_many(self, infos: Iterable[MessageInfo]) -> None:
        """Delete several messages with a single uidlist rewrite (POP3 QUIT, IMAP EXPUNGE)."""
        bases = set()
        for info in infos:
            self._unlink_message(info)
            bases.add(info.base)
        self._drop_records(bases)

    # -- keywords

    def _read_keywords(self) -> dict[int, str]:
        try:
            data = (self.path / KEYWORDS_NAME).read_bytes()
        except FileNotFoundError:
            return {}
        result: dict[int, str] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            index, sep, keyword = line.partition(" ")
            if sep and index.isdigit() and keyword:
                i = int(index)
                if i < _MAX_KEYWORDS and i not in result:
                    result[i] = keyword
        return result

    @staticmethod
    def _lookup_keyword(known: dict[int, str], keyword: str) -> str | None:
        for index, name in known.items():
            if name == keyword:
                return chr(ord("a") + index)
        folded = keyword.casefold()
        for index, name in known.items():
            if name.casefold() == folded:
                return chr(ord("a") + index)
        return None

    def keywords(self) -> dict[str, str]:
        """Return the folder's keyword mapping, letter -> keyword."""
        return {chr(ord("a") + i): kw for i, kw in sorted(self._read_keywords().items())}

    def keyword_letter(self, keyword: str, create: bool = True) -> str | None:
        """Return the letter for an IMAP keyword, allocating one if asked.

        Returns None when the keyword is unknown and create is false, or when
        all 26 letters are taken (Dovecot's limit for Maildir).
        """
        if (
            not keyword
            or len(keyword) > MAX_COMPONENT_LENGTH
            or keyword.startswith("\\")
            or any(not ("!" <= ch <= "~") or ch in _KEYWORD_SPECIALS for ch in keyword)
        ):
            raise ValueError(f"invalid IMAP keyword {keyword!r}")
        letter = self._lookup_keyword(self._read_keywords(), keyword)
        if letter is not None or not create:
            return letter
        # Dovecot writes dovecot-keywords while holding the uidlist lock.
        with _locked(self._uidlist_path) as lock:
            known = self._read_keywords()
            letter = self._lookup_keyword(known, keyword)
            if letter is not None:
                return letter
            free = next((i for i in range(_MAX_KEYWORDS) if i not in known), None)
            if free is None:
                return None
            known[free] = keyword
            data = "".join(f"{i} {kw}\n" for i, kw in sorted(known.items())).encode("utf-8")
            _write_atomic(self.path / KEYWORDS_NAME, data, lock)
            return chr(ord("a") + free)


class Maildir:
    """One user's Maildir++ (INBOX + folders)."""

    def __init__(self, root: str | os.PathLike[str], hostname: str | None = None) -> None:
        self.root = pathlib.Path(os.path.abspath(os.fspath(root)))
        self.hostname = _sanitize_hostname(socket.gethostname() if hostname is None else hostname)

    def __repr__(self) -> str:
        return f"<Maildir {str(self.root)!r}>"

    def ensure(self) -> None:
        """Create the root and its cur/new/tmp if missing."""
        parent = self.root.parent
        if not parent.is_dir():
            os.makedirs(parent, 0o700, exist_ok=True)
        root_created = _mkdir(self.root)
        subs_created = False
        for sub in ("cur", "new", "tmp"):
            subs_created |= _mkdir(self.root / sub)
        if subs_created:
            _fsync_dir(self.root)
        if root_created:
            _fsync_dir(parent)

    def _resolve(self, name: str) -> tuple[str, pathlib.Path]:
        canonical = validate_folder_name(name)
        if canonical == "INBOX":
            return canonical, self.root
        return canonical, self.root / _dir_name(canonical)

    def folder_path(self, name: str) -> pathlib.Path:
        """Directory a folder name maps to (validated; need not exist)."""
        return self._resolve(name)[1]

    def _make_folder(self, path: pathlib.Path, exist_ok: bool) -> None:
        """Create a Maildir++ folder directory with cur/new/tmp and maildirfolder."""
        if path.is_symlink():
            # Never create anything through a link planted in the Maildir.
            raise FileExistsError(errno.EEXIST, "a symbolic link is in the way", str(path))
        created = _mkdir(path)
        if not created and not exist_ok:
            raise FileExistsError(errno.EEXIST, "folder already exists", str(path))
        for sub in ("cur", "new", "tmp"):
            _mkdir(path / sub)
        fd = os.open(path / "maildirfolder", os.O_WRONLY | os.O_CREAT | _O_CLOEXEC, 0o600)
        os.close(fd)
        _fsync_dir(path)
        if created:
            _fsync_dir(self.root)

    def _make_parents(self, canonical: str) -> None:
        components = canonical.split("/")
        for i in range(1, len(components)):
            parent = "/".join(components[:i])
            if parent != "INBOX":
                self._make_folder(self.root / _dir_name(parent), exist_ok=True)

    def folder(self, name: str = "INBOX") -> Folder:
        """Open a folder; INBOX and the special-use folders are created on first use."""
        canonical, path = self._resolve(name)
        if canonical == "INBOX":
            self.ensure()
        elif path.is_symlink():
            raise FolderNotFound(canonical)
        elif not path.is_dir():
            if canonical not in SPECIAL_FOLDERS:
                raise FolderNotFound(canonical)
            self.ensure()
            self._make_folder(path, exist_ok=True)
        return Folder(self, canonical, path)

    def deliver(
        self, message: bytes, folder: str = "INBOX", flags: str = "", mtime: float | None = None
    ) -> str:
        """Store a message durably in folder; return its base name (see `Folder.deliver`)."""
        return self.folder(folder).deliver(message, flags, mtime)

    def clean_tmp(self, now: float | None = None) -> int:
        """Remove leftovers of crashed deliveries from every folder's tmp/.

        See `_tmp_is_leftover` for the rule; files of live deliveries (this
        process's, or another running process's) are never touched.  Returns
        how many files were removed.
        """
        now = time.time() if now is None else now
        removed = 0
        folders = [self.root, *(path for _, path in self._folder_dirs())]
        for folder_path in folders:
            try:
                with os.scandir(folder_path / "tmp") as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    if _tmp_is_leftover(entry.name, st, self.hostname, now):
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as e:
                    _log.warn("cannot remove {path} from tmp/: {error}", path=entry.path, error=e)
        return removed

    def _folder_dirs(self) -> Iterator[tuple[str, pathlib.Path]]:
        try:
            it = os.scandir(self.root)
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                canonical = _decode_dir_name(entry.name)
                if canonical is not None and entry.is_dir(follow_symlinks=False):
                    yield canonical, self.root / entry.name

    def list_folders(self) -> list[str]:
        """Return "INBOX" followed by the other folders, sorted, in '/' notation."""
        return ["INBOX"] + sorted(name for name, _ in self._folder_dirs())

    def create_folder(self, name: str) -> None:
        """Create a folder and any missing parents; FileExistsError if it exists."""
        canonical, path = self._resolve(name)
        if canonical == "INBOX":
            raise FileExistsError(errno.EEXIST, "INBOX always exists", str(self.root))
        self.ensure()
        self._make_parents(canonical)
        self._make_folder(path, exist_ok=False)

    def delete_folder(self, name: str) -> None:
        """Delete a folder and its messages; its subfolders are left alone (RFC 3501)."""
        canonical, path = self._resolve(name)
        if canonical == "INBOX":
            raise ValueError("INBOX cannot be deleted")
        trash = self.root / f"{_DELETED_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise FolderNotFound(canonical) from None
        _fsync_dir(self.root)
        try:
            shutil.rmtree(trash)
        except OSError as e:
            _log.warn("Could not remove deleted folder {path}: {error}", path=str(trash), error=e)

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder together with all of its subfolders."""
        old_c, old_path = self._resolve(old)
        new_c, new_path = self._resolve(new)
        if old_c == "INBOX":
            raise ValueError("renaming INBOX is not supported")
        if new_c == "INBOX":
            raise FileExistsError(errno.EEXIST, "INBOX always exists", str(self.root))
        if new_c == old_c or new_c.startswith(old_c + "/"):
            raise InvalidFolderName(f"cannot rename {old_c!r} to itself or into its own subtree")
        old_dir, new_dir = old_path.name, new_path.name
        moves = [(old_path, new_path)] if old_path.is_dir() else []
        with os.scandir(self.root) as it:
            children = [
                e.name for e in it if e.name.startswith(old_dir + ".") and _decode_dir_name(e.name)
            ]
        for child in sorted(children):
            target = new_dir + child[len(old_dir) :]
            if len(target.encode("ascii")) > _NAME_MAX:
                raise InvalidFolderName(f"renaming would make subfolder {child!r} too long")
            moves.append((self.root / child, self.root / target))
        if not moves:
            raise FolderNotFound(old_c)
        for _, target_path in moves:
            if os.path.lexists(target_path):
                raise FileExistsError(errno.EEXIST, "folder already exists", str(target_path))
        self._make_parents(new_c)
        for source_path, target_path in moves:
            try:
                os.rename(source_path, target_path)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    message = "folder already exists"
                    raise FileExistsError(errno.EEXIST, message, str(target_path)) from e
                raise
        _fsync_dir(self.root)

    def quota_usage(self) -> int:
        """Total on-disk bytes of all messages in all folders."""
        total = 0
        dirs = [self.root] + [path for _, path in self._folder_dirs()]
        for folder_path in dirs:
            for sub in ("new", "cur"):
                try:
                    it = os.scandir(folder_path / sub)
                except FileNotFoundError:
                    continue
                with it:
                    for entry in it:
                        if entry.name.startswith("."):
                            continue
                        try:
                            if not entry.is_file(follow_symlinks=False):
                                continue
                        except OSError:
                            continue
                        size = _name_sizes(entry.name.partition(":")[0])[0]
                        if size is None:
                            try:
                                size = entry.stat(follow_symlinks=False).st_size
                            except FileNotFoundError:
                                continue
                        total += size
        return total

    def _next_uidvalidity(self) -> int:
        """Return a UIDVALIDITY never handed out before in this Maildir.

        It is the current time unless that would repeat or go back, so a
        folder deleted and re-created within a second still gets a new value.
        """
        path = self.root / _UIDVALIDITY_NAME
        with _locked(path) as lock:
            last = 0
            try:
                last = int(path.read_text("ascii").strip() or 0)
            except (FileNotFoundError, ValueError):
                pass
            try:
                dovecot_last = (self.root / _DOVECOT_UIDVALIDITY_NAME).read_text("ascii")
                last = max(last, int(dovecot_last.strip(), 16))
            except (OSError, ValueError):
                pass
            value = max(int(time.time()), last + 1)
            _write_atomic(path, f"{value}\n".encode("ascii"), lock)
        return value
