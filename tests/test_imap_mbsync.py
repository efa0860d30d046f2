"""A full two-way sync with mbsync (isync, from Debian) against the IMAP server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.imap_support import ALICE, PASSWORD, IMAPTestCase, message
from tests.support import require_program


class MbsyncTests(IMAPTestCase):

    def setUp(self):
        self.mbsync = require_program(self, "mbsync")
        return super().setUp()

    def write_config(self) -> tuple[Path, Path]:
        local = self.data_dir.parent / "local"
        local.mkdir()
        config = self.data_dir.parent / "mbsyncrc"
        config.write_text(
            f"IMAPAccount test\nHost 127.0.0.1\nPort {self.port('imaps')}\nUser {ALICE}\n"
            f'Pass "{PASSWORD}"\nSSLType IMAPS\nCertificateFile {self.data_dir}/tls/cert.pem\n\n'
            f"IMAPStore remote\nAccount test\n\n"
            f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
            f"Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n"
            f"Expunge Both\nSyncState *\n")
        return config, local

    def run_mbsync(self, config: Path) -> None:
        result = subprocess.run([self.mbsync, "-c", str(config), "-a"], capture_output=True,
                                timeout=120, check=False)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    @staticmethod
    def local_messages(folder: Path) -> dict[bytes, str]:
        """Subject line -> Maildir flag letters of every message in a local folder."""
        result = {}
        for sub in ("new", "cur"):
            for name in os.listdir(folder / sub):
                subject = next(line for line in (folder / sub / name).read_bytes().splitlines()
                               if line.startswith(b"Subject:"))
                result[subject] = name.partition(":2,")[2]
        return result

    def server_messages(self, client, folder: str) -> dict[bytes, tuple]:
        client.select_folder(folder)
        fetched = client.fetch(client.search(), ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        return {data[b"BODY[HEADER.FIELDS (SUBJECT)]"].strip(): tuple(
            f for f in data[b"FLAGS"] if f != b"\\Recent") for data in fetched.values()}

    def test_two_way_sync_with_flag_changes_on_both_sides(self):
        def check():
            self.deliver(message("one"))
            self.deliver(message("two"), flags="S")
            config, local = self.write_config()
            self.run_mbsync(config)
            inbox = local / "INBOX"
            self.assertEqual(self.local_messages(inbox),
                             {b"Subject: one": "", b"Subject: two": "S"})
            self.assertTrue((local / "Sent" / "cur").is_dir())

            with self.imapclient() as client:
                client.select_folder("INBOX")
                client.add_flags(client.search(["SUBJECT", "one"]), [b"\\Flagged"])
            [two] = [inbox / "cur" / n for n in os.listdir(inbox / "cur")]
            two.rename(two.with_name(two.name.replace(":2,S", ":2,RS")))
            (inbox / "new" / "1700000000.local1.near").write_bytes(
                message("three").replace(b"\r\n", b"\n"))
            for sub in ("cur", "new", "tmp"):
                (local / "Projects" / sub).mkdir(parents=True, exist_ok=True)
            (local / "Projects" / "new" / "1700000001.local2.near").write_bytes(
                message("plan").replace(b"\r\n", b"\n"))
            self.run_mbsync(config)

            self.assertEqual(self.local_messages(inbox),
                             {b"Subject: one": "F", b"Subject: two": "RS", b"Subject: three": ""})
            with self.imapclient() as client:
                self.assertEqual(self.server_messages(client, "INBOX"),
                                 {b"Subject: one": (b"\\Flagged",),
                                  b"Subject: two": (b"\\Answered", b"\\Seen"),
                                  b"Subject: three": ()})
                self.assertEqual(self.server_messages(client, "Projects"),
                                 {b"Subject: plan": ()})
                client.select_folder("INBOX")
                client.delete_messages(client.search(["SUBJECT", "one"]))
                client.expunge()
                client.add_flags(client.search(["SUBJECT", "three"]), [b"\\Seen"])
            self.run_mbsync(config)
            self.assertEqual(self.local_messages(inbox),
                             {b"Subject: two": "RS", b"Subject: three": "S"})
            self.run_mbsync(config)
            with self.imapclient() as client:
                self.assertEqual(self.server_messages(client, "INBOX"),
                                 {b"Subject: two": (b"\\Answered", b"\\Seen"),
                                  b"Subject: three": (b"\\Seen",)})
            self.assertEqual(self.local_messages(inbox),
                             {b"Subject: two": "RS", b"Subject: three": "S"})
        return self.in_thread(check)
