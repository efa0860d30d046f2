"""The IMAP avatar: one user's folders, subscriptions and special-use folders.

:class:`IMAPAccount` provides Twisted's ``IAccount`` (so the realm can hand it
out like the POP3 and SMTP avatars) and richer coroutine methods the server
uses. Folder names here are canonical folder names (``/`` separated, INBOX
upper-case, already validated by :func:`mailtwist.imap.names.mailbox_name`).

Two small files in the Maildir root hold IMAP-only state, each rewritten
atomically under a per-account lock:

- ``subscriptions``: Dovecot's format, so a user migrated either way keeps
  the subscriptions (Dovecot's ``subscription-file.c``): version 2 is a
  ``V<TAB>2`` line and an empty line, then one mailbox a line in UTF-8 with
  its hierarchy levels separated by TABs, each level tab-escaped (``\x01``
  followed by ``1``, ``t``, ``r``, ``n`` or ``0`` for \x01, TAB, CR, LF and
  NUL). That is what we write. A file without the version line (Dovecot's
  version 1, and mailtwist before) has one name a line in modified UTF-7
  with ``/`` or, as Maildir++ namespaces have it, ``.`` between levels;
  it is read and rewritten as version 2 at the next change;
- ``mailtwist-special-use``: ``name<TAB>\\Attr ...`` lines for folders given
  special-use attributes with CREATE-SPECIAL-USE. Without a line, the folders
  Sent, Drafts, Trash, Junk and Archive carry the attribute of their name.

Those five folders are created (and subscribed) at login when missing, as
Dovecot's ``auto = subscribe`` does, so clients find them at once.
"""

from __future__ import annotations

import errno
import os
import pathlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail.imap4 import IAccount
from zope.interface import implementer

from mailtwist.imap.mailbox import FolderGone, FolderRegistry, SharedFolder
from mailtwist.imap.names import (
    InvalidName,
    decode_mutf7,
    encode_mutf7,
    list_pattern,
    mailbox_name,
)
from mailtwist.storage.maildir import (
    SPECIAL_FOLDERS,
    FolderNotFound,
    InvalidFolderName,
    Maildir,
    _write_atomic,
    validate_folder_name,
)

log = Logger()

SUBSCRIPTIONS_NAME = "subscriptions"
SPECIAL_USE_NAME = "mailtwist-special-use"
SPECIAL_USE_ATTRIBUTES = ("\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash")
"""Attributes CREATE-SPECIAL-USE accepts (\\All and \\Flagged need virtual folders)."""

_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.Lock:
    with _file_locks_guard:
        return _file_locks.setdefault(path, threading.Lock())


class MailboxError(Exception):
    """A mailbox operation refused: answer ``NO [code] text``."""

    def __init__(self, code: bytes | None, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _write_lines(path: str, lines: Iterable[str]) -> None:
    _write_atomic(pathlib.Path(path), "".join(line + "\n" for line in lines).encode("utf-8"))


SUBSCRIPTIONS_V2 = "V\t2\n\n"
_TAB_ESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\x00"}
_TAB_ESCAPED = {v: "\x01" + k for k, v in _TAB_ESCAPES.items()}


def _tab_escape(text: str) -> str:
    return "".join(_TAB_ESCAPED.get(ch, ch) for ch in text)


def _tab_unescape(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x01" and i + 1 < len(text):
            out.append(_TAB_ESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_subscriptions(data: bytes) -> set[str]:
    """Canonical folder names in a ``subscriptions`` file (either version);
    names that are not valid folder names are skipped."""
    text = data.decode("utf-8", "replace")
    names = set()
    if text.startswith(SUBSCRIPTIONS_V2):
        for line in text[len(SUBSCRIPTIONS_V2):].split("\n"):
            if not line:
                continue
            try:
                names.add(validate_folder_name(
                    "/".join(_tab_unescape(level) for level in line.split("\t"))))
            except ValueError:
                continue
        return names
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            decoded = decode_mutf7(line.encode("ascii"))
            names.add(validate_folder_name(decoded.replace(".", "/")))
        except (ValueError, UnicodeEncodeError):
            continue
    return names


def format_subscriptions(names: Iterable[str]) -> bytes:
    """A version 2 ``subscriptions`` file for canonical folder names."""
    lines = sorted("\t".join(_tab_escape(level) for level in name.split("/"))
                   for name in names)
    return (SUBSCRIPTIONS_V2 + "".join(line + "\n" for line in lines)).encode("utf-8")


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()]


def _rename_in(name: str, old: str, new: str) -> str:
    """*name* with the subtree *old* renamed to *new* (unchanged outside it)."""
    if name == old:
        return new
    if name.startswith(old + "/"):
        return new + name[len(old):]
    return name


@dataclass
class Listing:
    """A snapshot for LIST/LSUB: folders, subscriptions and special-use attributes."""

    existing: set[str]
    subscribed: set[str]
    special: dict[str, tuple[str, ...]]
    parents: set[str] = field(default_factory=set)
    subscribed_parents: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.parents = _ancestors(self.existing)
        self.subscribed_parents = _ancestors(self.subscribed)


def _ancestors(names: Iterable[str]) -> set[str]:
    result = set()
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            result.add("/".join(parts[:i]))
    return result


@implementer(IAccount)
class IMAPAccount:
    """One authenticated user's mailboxes."""

    def __init__(self, address: str, maildir: Maildir, registry: FolderRegistry,
                 quota: Callable[[], int] | None = None) -> None:
        self.address = address
        self.maildir = maildir
        self.registry = registry
        self.quota = quota
        self.root = str(maildir.root)
        self._lock = _lock_for(self.root)

    def __repr__(self) -> str:
        return f"<IMAPAccount {self.address}>"

    def _run(self, function: Any, *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.registry.reactor, self.registry.pool, function, *args)

    # -- state files (blocking)

    def _subscriptions_blocking(self) -> set[str]:
        try:
            with open(os.path.join(self.root, SUBSCRIPTIONS_NAME), "rb") as f:
                return parse_subscriptions(f.read())
        except FileNotFoundError:
            return set()

    def _save_subscriptions(self, names: set[str]) -> None:
        _write_atomic(pathlib.Path(self.root, SUBSCRIPTIONS_NAME), format_subscriptions(names))

    def _special_blocking(self) -> dict[str, tuple[str, ...]]:
        """Folder name -> special-use attributes (explicit ones override the defaults)."""
        result = {name: ("\\" + name,) for name in SPECIAL_FOLDERS}
        for line in _read_lines(os.path.join(self.root, SPECIAL_USE_NAME)):
            encoded, _, attrs = line.partition("\t")
            try:
                name = validate_folder_name(decode_mutf7(encoded.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                continue
            result[name] = tuple(a for a in attrs.split() if a in SPECIAL_USE_ATTRIBUTES)
        return result

    def _explicit_special_blocking(self) -> dict[str, str]:
        result = {}
        for line in _read_lines(os.path.join(self.root, SPECIAL_USE_NAME)):
            encoded, _, attrs = line.partition("\t")
            result[encoded] = attrs
        return result

    def _save_special(self, entries: dict[str, str]) -> None:
        _write_lines(os.path.join(self.root, SPECIAL_USE_NAME),
                     [f"{name}\t{attrs}" for name, attrs in sorted(entries.items())])

    # -- login

    def prepare_blocking(self) -> None:
        """Create the special-use folders that are missing, subscribed.

        On a full disk (ENOSPC, EDQUOT) this is skipped with a log line and
        tried again at the next login: reading mail needs no new folder.
        """
        with self._lock:
            try:
                created = []
                for name in sorted(SPECIAL_FOLDERS):
                    if not self.maildir.folder_path(name).is_dir():
                        self.maildir.folder(name)
                        created.append(name)
                if created:
                    # a new mailbox: INBOX is subscribed too (LSUB and
                    # LIST (SUBSCRIBED) list it, as with Dovecot)
                    names = self._subscriptions_blocking()
                    self._save_subscriptions(names | set(created) | {"INBOX"})
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warn("cannot create the special-use folders of {address}: {error}",
                         address=self.address, error=e)

    # -- quota (RFC 9208: one root "" covering every folder, STORAGE only)

    def _quota_blocking(self) -> tuple[int, int]:
        """(bytes used, limit in bytes; 0 is unlimited), read from the directory now."""
        limit = self.quota() if self.quota is not None else 0
        return (self.maildir.quota_usage() if limit else 0), limit

    async def quota_usage(self) -> tuple[int, int]:
        return await self._run(self._quota_blocking)

    async def check_quota(self, incoming: int) -> None:
        """MailboxError OVERQUOTA if *incoming* more bytes would exceed the quota."""
        used, limit = await self.quota_usage()
        if limit and used + incoming > limit:
            raise MailboxError(b"OVERQUOTA", "Quota exceeded.")

    # -- the richer API used by the server

    async def listing(self) -> Listing:
        return await self._run(self._listing_blocking)

    def _listing_blocking(self) -> Listing:
        existing = set(self.maildir.list_folders())
        with self._lock:
            subscribed = self._subscriptions_blocking()
            special = self._special_blocking()
        return Listing(existing, subscribed, {k: v for k, v in special.items() if v})

    def folder(self, name: str) -> SharedFolder:
        return self.registry.get(self.maildir, name)

    async def open(self, name: str) -> SharedFolder:
        """The shared state of an existing folder, refreshed; MailboxError if none."""
        shared = self.folder(name)
        try:
            await shared.refresh()
        except FolderGone:
            raise MailboxError(b"NONEXISTENT", "Mailbox does not exist.") from None
        return shared

    async def create_folder(self, name: str, use: tuple[str, ...] = ()) -> None:
        for attr in use:
            if attr not in SPECIAL_USE_ATTRIBUTES:
                raise MailboxError(b"USEATTR", f"Special-use attribute {attr} is not supported.")
        await self._run(self._create_blocking, name, use)

    def _create_blocking(self, name: str, use: tuple[str, ...]) -> None:
        if name == "INBOX":
            raise MailboxError(b"ALREADYEXISTS", "INBOX always exists.")
        try:
            self.maildir.create_folder(name)
        except FileExistsError:
            raise MailboxError(b"ALREADYEXISTS", "Mailbox already exists.") from None
        except InvalidFolderName as e:
            raise MailboxError(b"CANNOT", str(e)) from None
        if use:
            with self._lock:
                entries = self._explicit_special_blocking()
                entries[encode_mutf7(name).decode("ascii")] = " ".join(use)
                self._save_special(entries)

    async def delete_folder(self, name: str) -> None:
        if name == "INBOX":
            raise MailboxError(b"CANNOT", "INBOX cannot be deleted.")
        path = str(self.maildir.folder_path(name))
        await self._run(self._delete_blocking, name)
        shared = self.registry._folders.get(path)
        if shared is not None:
            shared.vanish()

    def _delete_blocking(self, name: str) -> None:
        try:
            self.maildir.delete_folder(name)
        except FolderNotFound:
            raise MailboxError(b"NONEXISTENT", "Mailbox does not exist.") from None
        with self._lock:
            entries = self._explicit_special_blocking()
            key = encode_mutf7(name).decode("ascii")
            if key in entries:
                del entries[key]
                self._save_special(entries)

    async def rename_folder(self, old: str, new: str) -> None:
        if new == "INBOX":
            raise MailboxError(b"ALREADYEXISTS", "INBOX always exists.")
        if old == "INBOX":
            await self._rename_inbox(new)
            return
        old_path = str(self.maildir.folder_path(old))
        await self._run(self._rename_blocking, old, new)
        for shared in self.registry.under(old_path):
            shared.vanish()

    def _rename_blocking(self, old: str, new: str) -> None:
        try:
            self.maildir.rename_folder(old, new)
        except FolderNotFound:
            raise MailboxError(b"NONEXISTENT", "Mailbox does not exist.") from None
        except FileExistsError:
            raise MailboxError(b"ALREADYEXISTS", "Target mailbox already exists.") from None
        except (InvalidFolderName, ValueError) as e:
            raise MailboxError(b"CANNOT", str(e)) from None
        with self._lock:
            names = self._subscriptions_blocking()
            renamed = {_rename_in(n, old, new) for n in names}
            if renamed != names:
                self._save_subscriptions(renamed)
            entries = self._explicit_special_blocking()
            moved = {}
            for key, attrs in entries.items():
                try:
                    name = validate_folder_name(decode_mutf7(key.encode("ascii")))
                except (ValueError, UnicodeEncodeError):
                    moved[key] = attrs
                    continue
                moved[encode_mutf7(_rename_in(name, old, new)).decode("ascii")] = attrs
            if moved != entries:
                self._save_special(moved)

    async def _rename_inbox(self, new: str) -> None:
        """RFC 3501: move every INBOX message into a new folder; INBOX stays, empty."""
        await self._run(self._create_blocking, new, ())
        inbox = await self.open("INBOX")
        target = await self.open(new)
        uids = list(inbox.uids)
        copied = await target.copy_from(inbox, uids)
        await inbox.expunge([src for src, _ in copied], None, only_deleted=False)

    async def subscribe_folder(self, name: str) -> None:
        await self._run(self._edit_subscriptions, name, True)

    async def unsubscribe_folder(self, name: str) -> None:
        await self._run(self._edit_subscriptions, name, False)

    def _edit_subscriptions(self, name: str, add: bool) -> None:
        with self._lock:
            names = self._subscriptions_blocking()
            if add and name not in names:
                self._save_subscriptions(names | {name})
            elif not add:
                if name not in names:
                    raise MailboxError(b"NONEXISTENT", "Mailbox is not subscribed.")
                self._save_subscriptions(names - {name})

    # -- IAccount

    @staticmethod
    def _name(name: bytes | str) -> str:
        if isinstance(name, bytes):
            return mailbox_name(name)
        try:
            return validate_folder_name(name)
        except InvalidFolderName as e:
            raise InvalidName(str(e)) from None

    def addMailbox(self, name: bytes | str, mbox: Any = None) -> defer.Deferred:
        if mbox is not None:
            return defer.fail(NotImplementedError("mailboxes are Maildir folders"))
        return self.create(name)

    def create(self, pathspec: bytes | str) -> defer.Deferred:
        return _deferred(self.create_folder(self._name(pathspec)), True)

    def delete(self, name: bytes | str) -> defer.Deferred:
        return _deferred(self.delete_folder(self._name(name)), True)

    def rename(self, oldname: bytes | str, newname: bytes | str) -> defer.Deferred:
        return _deferred(self.rename_folder(self._name(oldname), self._name(newname)), True)

    def subscribe(self, name: bytes | str) -> defer.Deferred:
        return _deferred(self.subscribe_folder(self._name(name)), True)

    def unsubscribe(self, name: bytes | str) -> defer.Deferred:
        return _deferred(self.unsubscribe_folder(self._name(name)), True)

    def select(self, name: bytes | str, rw: bool = True) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.open(self._name(name)))

    def isSubscribed(self, name: bytes | str) -> defer.Deferred:
        folder = self._name(name)
        d = self._run(self._subscriptions_blocking)
        return d.addCallback(lambda names: folder in names)

    def listMailboxes(self, ref: bytes, wildcard: bytes) -> defer.Deferred:
        matcher = list_pattern(ref if isinstance(ref, bytes) else ref.encode(),
                               wildcard if isinstance(wildcard, bytes) else wildcard.encode())

        def pick(listing: Listing) -> list[tuple[str, SharedFolder]]:
            if matcher is None:
                return []
            names = sorted(n for n in listing.existing if matcher.fullmatch(n))
            return [(n, self.folder(n)) for n in names]

        return defer.Deferred.fromCoroutine(self.listing()).addCallback(pick)

    def logout(self) -> None:
        """Nothing to release: folders are shared and held by the sessions' views."""


def _deferred(coroutine: Any, value: Any) -> defer.Deferred:
    """A Deferred firing with *value* once *coroutine* is done (for IAccount)."""
    return defer.Deferred.fromCoroutine(coroutine).addCallback(lambda _: value)
