"""Issue 6 item 3: a full disk gives temporary answers and the service recovers.

The data directory is a small tmpfs mounted by the test (root only; skipped
with the reason otherwise), filled to the last byte by a filler file. While
it is full, SMTP delivery to a local mailbox, submission into the outbound
spool and IMAP APPEND must answer with a temporary, clear error (4xx, never
250 or 5xx; ``NO [OVERQUOTA]``) and leave no partial file behind; once the
filler is removed the same running server accepts each of them again.
"""

from __future__ import annotations

import errno
import imaplib
import os
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import DOMAIN, PASSWORD, ServerMixin, client_tls_context

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
MESSAGE = (f"From: carol@remote.test\r\nTo: {ALICE}\r\nSubject: disk full\r\n\r\n"
           + "A line of body text that takes some room on the disk.\r\n" * 400).encode()


def fill(path: Path) -> None:
    """Append to *path* until the file system is full, to the last byte (again:
    a file the server removed since the last call may have freed some room)."""
    with open(path, "ab", buffering=0) as filler:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            try:
                while True:
                    filler.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def closed_port() -> int:
    """A local TCP port nothing listens on (the outbound relay of the test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smtp_reply(port: int, sender: str, recipient: str, submission: bool = False
               ) -> tuple[int, bytes]:
    """Send MESSAGE and return the first reply that is not a success, or DATA's 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("c.test")
        if submission:
            client.starttls(context=client_tls_context())
            client.ehlo("c.test")
            client.login(ALICE, PASSWORD)
        for code, text in (client.mail(sender), client.rcpt(recipient)):
            if code >= 300:
                return code, text
        try:
            return client.data(MESSAGE)
        except smtplib.SMTPResponseException as e:
            return e.smtp_code, e.smtp_error


class DiskFullTests(ServerMixin, unittest.TestCase):
    """The whole data directory on a full tmpfs; the server started before it filled."""

    @defer.inlineCallbacks
    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a small tmpfs needs root")
        mount = shutil.which("mount")
        if mount is None:
            raise unittest.SkipTest("mount(8) is not installed")
        self.mount_point = Path(self.mktemp() + "-tmpfs").resolve()
        self.mount_point.mkdir(parents=True)
        result = subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(self.mount_point)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise unittest.SkipTest(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(self.mount_point)], check=False)
        (self.mount_point / "domains").write_text(f"{DOMAIN}\n")
        yield self.start_server(
            data_dir=str(self.mount_point),
            outbound={"relay_host": "127.0.0.1", "relay_port": closed_port()})
        self.filler = self.mount_point / "filler"

    def message_files(self) -> list[Path]:
        """Every message file of alice and bob (tmp/, new/, cur/) and of the spool."""
        found = [p for account in (ALICE, BOB) for sub in ("tmp", "new", "cur")
                 for p in (self.server.store.path_for(account) / sub).glob("*")]
        found += self.server.queue.spool.root.rglob("*")
        return sorted(p for p in found if p.is_file())

    def wait_for_quiet_disk(self) -> None:
        """Wait (at most 10 s) until the tmpfs's free space has not changed for
        half a second: the server is done with what the last session wrote."""
        last, stable, deadline = None, 0, time.monotonic() + 10
        while stable < 5 and time.monotonic() < deadline:
            free = os.statvfs(self.mount_point).f_bfree
            stable = stable + 1 if free == last else 0
            last = free
            time.sleep(0.1)

    def imap_append(self, user: str = ALICE) -> defer.Deferred:
        """Log in as *user* (which must work, full disk or not), then APPEND
        MESSAGE to the INBOX over imaps: APPEND's (typ, data)."""
        def append():
            client = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"),
                                       ssl_context=client_tls_context(), timeout=30)
            try:
                typ, data = client.login(user, PASSWORD)
                self.assertEqual(typ, "OK", data)
                return client.append("INBOX", None, None, MESSAGE)
            except imaplib.IMAP4.error as e:
                if client.state != "AUTH":
                    raise AssertionError(f"LOGIN {user} failed: {e}") from e
                return "NO", [str(e).encode()]
            finally:
                try:
                    client.logout()
                except (imaplib.IMAP4.error, OSError):
                    pass
        return self.in_thread(append)

    @defer.inlineCallbacks
    def test_full_disk_is_temporary_everywhere_and_recovers_without_restart(self):
        """Guards the 4xx/`NO [OVERQUOTA]` answers on ENOSPC (SMTP delivery, the
        outbound spool, IMAP APPEND), the clean-up of partial files, and recovery
        once space returns, all on one running server. Bob has used IMAP before
        the disk fills (his folder state exists, so APPEND fails writing the
        message); alice logs in for the first time on the full disk, which must
        still work (creating her special-use folders waits)."""
        smtp, submission = self.port("smtp"), self.port("submission")
        typ, data = yield self.imap_append(BOB)
        self.assertEqual(typ, "OK", data)
        yield self.in_thread(self.wait_for_quiet_disk)
        before = self.message_files()
        fill(self.filler)

        code, text = yield self.in_thread(smtp_reply, smtp, "carol@remote.test", ALICE)
        self.assertEqual(code // 100, 4, (code, text))
        self.assertTrue(text.startswith(b"4.3.1"), text)
        fill(self.filler)
        code, text = yield self.in_thread(
            smtp_reply, submission, ALICE, "dave@remote.test", True)
        self.assertEqual(code // 100, 4, (code, text))
        self.assertTrue(text.startswith(b"4.3.1"), text)
        for user in (ALICE, BOB):
            fill(self.filler)
            typ, data = yield self.imap_append(user)
            self.assertEqual(typ, "NO", (user, data))
            self.assertIn(b"[OVERQUOTA] Not enough disk space.", data[0])
        self.assertEqual(self.message_files(), before)

        self.filler.unlink()
        code, text = yield self.in_thread(smtp_reply, smtp, "carol@remote.test", ALICE)
        self.assertEqual(code, 250, text)
        code, text = yield self.in_thread(
            smtp_reply, submission, ALICE, "dave@remote.test", True)
        self.assertEqual(code, 250, text)
        for user in (ALICE, BOB):
            typ, data = yield self.imap_append(user)
            self.assertEqual(typ, "OK", (user, data))
        self.assertEqual(len(self.maildir_files(ALICE)), 2)
        self.assertEqual(len(self.maildir_files(BOB)), 2)
