"""Where each account's Maildir lives: ``<data_dir>/mail/<domain>/<local part>/``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import quote

from mailtwist.storage.maildir import Maildir

_SAFE = "!#$&'*+-=?^_`{|}~.@"


def mailbox_dirname(part: str) -> str:
    """One path component for an address part: never empty, '.', '..' or with '/'."""
    name = quote(part.lower(), safe=_SAFE)
    if not name or name.startswith("."):
        name = "%2E" + name[1:] if name else "%00"
    return name


class MailStore:
    """Maps canonical account addresses to their Maildir++ under one root."""

    def __init__(self, root: str | os.PathLike, hostname: str | None = None) -> None:
        self.root = Path(root)
        self.hostname = hostname or socket.gethostname()

    def path_for(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.root / mailbox_dirname(domain) / mailbox_dirname(local)

    def maildir(self, address: str) -> Maildir:
        """The account's Maildir (created on first use)."""
        maildir = Maildir(self.path_for(address), hostname=self.hostname)
        maildir.ensure()
        return maildir
