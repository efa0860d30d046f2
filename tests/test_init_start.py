"""First run on a fresh machine: ``mailtwist init`` then ``twistd -n mailtwist`` is a
working server — SMTP delivers to the admin account that init created and that
account logs in over IMAP (STARTTLS with init's self-signed certificate)."""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests.support import output_until

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
CLI = [sys.executable, "-m", "mailtwist.cli"]
PASSWORD = "correct horse battery"
LISTENING = re.compile(r"(\w+) listening on .* \(127\.0\.0\.1:(\d+)\)")


class InitThenStartTests(unittest.TestCase):
    """Runs the two commands a newcomer runs, as separate processes in an empty
    directory, and uses the result with stdlib clients."""

    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    def init(self) -> str:
        proc = subprocess.run(
            [*CLI, "init", "--domain", "example.org", "--hostname", "mail.example.org",
             "--admin", "postmaster@example.org", "--password-stdin"],
            cwd=self.cwd, env=self.env, input=PASSWORD + "\n", capture_output=True,
            text=True, timeout=120, check=False)
        self.assertEqual((proc.returncode, proc.stderr), (0, ""), proc.stdout)
        return proc.stdout

    def start(self) -> dict[str, int]:
        """``twistd -n mailtwist`` as the checklist says (it finds init's
        ./mailtwist.toml), on loopback ports; the ports it listens on."""
        args = [*TWISTD, "-n", "--pidfile=", "mailtwist"]
        for role in ("smtp", "imap"):
            args += [f"--{role}", "tcp:0:interface=127.0.0.1"]
        for role in ("submission", "submissions", "imaps", "pop3", "pop3s"):
            args += [f"--{role}", "none"]
        proc = subprocess.Popen(args, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)
        output = output_until(proc, lambda out: len(LISTENING.findall(out)) >= 2)
        ports = {role: int(port) for role, port in LISTENING.findall(output)}
        self.assertEqual(set(ports), {"smtp", "imap"}, output)
        return ports

    def test_init_then_start_delivers_and_the_admin_logs_in(self):
        out = self.init()
        # the printed checklist: DNS records, firewall lines, next commands
        self.assertIn("added account postmaster@example.org", out)
        self.assertRegex(out, r"(?m)^\s+example\.org\. IN MX 10 mail\.example\.org\.$")
        self.assertIn("_dmarc.example.org.", out)
        self.assertIn("._domainkey.example.org.", out)
        self.assertIn("nft add rule inet filter input tcp dport { 25,", out)
        self.assertIn("ufw allow 25/tcp", out)
        self.assertIn("twistd -n mailtwist", out)
        self.assertNotIn(PASSWORD, out)

        ports = self.start()
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
            code, text = client.ehlo("client.example.net")
            self.assertEqual(code, 250)
            self.assertTrue(text.startswith(b"mail.example.org"), text)  # init's config
            refused = client.sendmail("someone@example.net", ["postmaster@example.org"],
                                      b"From: someone@example.net\r\n"
                                      b"Subject: first mail\r\n\r\nhello\r\n")
        self.assertEqual(refused, {})

        context = ssl.create_default_context(
            cafile=str(self.cwd / "mailtwist-data" / "tls" / "cert.pem"))
        context.check_hostname = False  # we connect to 127.0.0.1, the cert names mail.example.org
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        try:
            imap.starttls(context)
            self.assertEqual(imap.login("postmaster@example.org", PASSWORD)[0], "OK")
            status, data = imap.select("INBOX")
            self.assertEqual((status, data), ("OK", [b"1"]))
            status, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            self.assertIn(b"Subject: first mail", data[0][1])
            imap.logout()
        finally:
            try:
                imap.shutdown()
            except OSError:  # logout closed it already
                pass
