"""The durable spool: one message file and one JSON envelope per queued message.

Layout under ``<data_dir>/queue/``::

    tmp/          files being written (never read from)
    ID.msg        the message as it goes on the wire (CRLF, not dot-stuffed)
    ID.json       the envelope; its presence is what makes the entry exist

``enqueue`` writes both files through ``tmp/`` with fsync and renames the
envelope last, then fsyncs the directory: once it returns, a crash loses
nothing.  ``remove`` unlinks the envelope first, so a half-removed entry is
an orphan message file, which :meth:`Spool.clean` deletes later.

Server and CLI coordinate through an ``flock`` on the message file (which is
never replaced): whoever holds it may change or remove the entry.  Every
method blocks; the server calls them from the ``mail-io`` thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
import time
from pathlib import Path

from mailtwist.queue.envelope import Envelope
from mailtwist.storage.maildir import _fsync_dir

_ID = re.compile(r"[0-9A-Za-z]{1,64}")
ORPHAN_AGE = 3600.0


class SpoolError(Exception):
    """A spool entry is missing, malformed or busy; one line for the admin."""


def _write_file(directory: Path, tmp_dir: Path, name: str, data: bytes,
                exclusive: bool) -> None:
    """Write *data* to ``directory/name`` through a fsynced temp file."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = directory / name
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def new_id() -> str:
    """A unique, time-ordered queue id (hex seconds, then random)."""
    return f"{int(time.time()):09X}{os.urandom(5).hex().upper()}"


class SpoolLock:
    """An exclusive claim on one entry; release it with :meth:`release` or ``with``."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SpoolLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Spool:
    """The queue directory of one data directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, entry_id: str, suffix: str) -> Path:
        if not _ID.fullmatch(entry_id):
            raise SpoolError(f"invalid queue id {entry_id!r}")
        return self.root / (entry_id + suffix)

    # -- writing --------------------------------------------------------------

    def enqueue(self, message: bytes, envelope: Envelope) -> str:
        """Store a new entry durably and return its id (``envelope.id`` may change
        if that id is taken)."""
        self.ensure()
        for _ in range(20):
            try:
                _write_file(self.root, self.tmp, envelope.id + ".msg", message, exclusive=True)
                break
            except FileExistsError:
                envelope.id = new_id()
        else:
            raise OSError(errno.EEXIST, "cannot find a free queue id")
        try:
            _write_file(self.root, self.tmp, envelope.id + ".json", envelope.to_json(),
                        exclusive=True)
            _fsync_dir(self.root)
        except BaseException:
            self._unlink(self._path(envelope.id, ".msg"))
            raise
        return envelope.id

    def save(self, envelope: Envelope) -> None:
        """Replace an entry's envelope atomically and durably."""
        path = self._path(envelope.id, ".json")
        if not path.exists():
            raise SpoolError(f"queue entry {envelope.id} no longer exists")
        _write_file(self.root, self.tmp, envelope.id + ".json", envelope.to_json(),
                    exclusive=False)
        _fsync_dir(self.root)

    def remove(self, entry_id: str) -> None:
        """Delete an entry: envelope first, so a crash leaves only an orphan message."""
        self._unlink(self._path(entry_id, ".json"))
        self._unlink(self._path(entry_id, ".msg"))
        _fsync_dir(self.root)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    # -- reading --------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of all committed entries, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name[:-5] for name in names
                      if name.endswith(".json") and _ID.fullmatch(name[:-5]))

    def stamp(self, entry_id: str) -> tuple[int, int] | None:
        """What changes when the envelope is rewritten (None: entry gone)."""
        try:
            st = os.stat(self._path(entry_id, ".json"))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def load(self, entry_id: str) -> Envelope:
        try:
            data = self._path(entry_id, ".json").read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {entry_id}") from None
        return Envelope.from_json(data)

    def message_path(self, entry_id: str) -> Path:
        return self._path(entry_id, ".msg")

    def read_message(self, entry_id: str) -> bytes:
        try:
            return self._path(entry_id, ".msg").read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"queue entry {entry_id} has no message file") from None

    def message_size(self, entry_id: str) -> int:
        try:
            return self._path(entry_id, ".msg").stat().st_size
        except FileNotFoundError:
            return 0

    def read_headers(self, entry_id: str, limit: int = 256 * 1024) -> bytes:
        """The message's header section (up to and without the blank line)."""
        try:
            with open(self._path(entry_id, ".msg"), "rb") as f:
                head = f.read(limit)
        except FileNotFoundError:
            raise SpoolError(f"queue entry {entry_id} has no message file") from None
        end = head.find(b"\r\n\r\n")
        return head[: end + 2] if end >= 0 else head

    # -- locking and housekeeping ---------------------------------------------

    def lock(self, entry_id: str, wait: float = 0.0) -> SpoolLock | None:
        """Claim an entry; None if someone else holds it for longer than *wait*
        seconds.  SpoolError if the entry does not exist."""
        try:
            fd = os.open(self._path(entry_id, ".msg"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {entry_id}") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
        if not self._path(entry_id, ".json").exists():
            os.close(fd)
            raise SpoolError(f"no queue entry {entry_id}")
        return SpoolLock(fd)

    def clean(self, now: float | None = None) -> list[str]:
        """Remove message and temp files left by crashes (older than an hour)."""
        now = time.time() if now is None else now
        removed = []
        try:
            names = set(os.listdir(self.root))
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".msg") and name[:-4] + ".json" not in names:
                removed += self._remove_if_old(self.root / name, now)
        try:
            temps = os.listdir(self.tmp)
        except FileNotFoundError:
            temps = []
        for name in temps:
            removed += self._remove_if_old(self.tmp / name, now)
        return removed

    @staticmethod
    def _remove_if_old(path: Path, now: float) -> list[str]:
        try:
            if now - path.stat().st_mtime > ORPHAN_AGE:
                path.unlink()
                return [path.name]
        except FileNotFoundError:
            pass
        return []
