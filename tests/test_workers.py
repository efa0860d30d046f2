"""``workers = N`` (issue 7): N processes share the listening sockets, with one
queue runner, cross-process POP3 locks, SIGHUP passed on and stop reaching all."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from mailtwist.config import ConfigError, load_config
from mailtwist.directory import FileDirectory
from mailtwist.pop3 import MailboxLocks
from mailtwist.tap import Options

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class WorkerConfigTests(unittest.TestCase):
    def test_workers_key_and_option(self):
        """Guards the `workers` key (positive, bounded) and `--workers` option."""
        self.assertEqual(load_config(None, {}).workers, 1)
        self.assertEqual(load_config(None, {"workers": 2}).workers, 2)
        for bad in (0, -1, "2", 65):
            with self.assertRaises(ConfigError) as raised:
                load_config(None, {"workers": bad})
            self.assertIn("workers", str(raised.exception))
        options = Options()
        options.parseOptions(["--workers", "3"])
        self.assertEqual(options.overrides()["workers"], 3)


class MailboxLockTests(unittest.TestCase):
    def test_flock_excludes_another_lock_table(self):
        """Guards the cross-process POP3 lock: a second lock table (as in another
        worker process; flock works per open file) cannot take a held mailbox."""
        maildir = Path(self.mktemp())
        maildir.mkdir()
        mine, other = MailboxLocks(), MailboxLocks()
        self.assertTrue(mine.acquire(str(maildir)))
        self.assertFalse(mine.acquire(str(maildir)))
        self.assertFalse(other.acquire(str(maildir)))
        mine.release(str(maildir))
        self.assertTrue(other.acquire(str(maildir)))
        other.release(str(maildir))


class WorkerProcessTests(unittest.TestCase):
    """A real ``twistd -n mailtwist`` with ``workers = 2``."""

    def setUp(self):
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.data = self.base / "data"
        self.data.mkdir()
        directory = FileDirectory(self.data)
        directory.bcrypt_rounds = 4
        directory.add_domain("example.test")
        directory.add_account("alice@example.test", "secret")
        directory.add_alias("far@example.test", ["someone@remote.invalid"])
        self.smtp, self.pop3 = free_port(), free_port()
        relay = free_port()  # nothing listens: the delivery attempt fails, and is logged
        config = self.base / "mailtwist.toml"
        config.write_text(
            f'data_dir = "{self.data}"\nhostname = "mx.example.test"\nworkers = 2\n'
            "allow_plaintext_auth = true\nshutdown_timeout = 5\n"
            "[listen]\n"
            f'smtp = "tcp:{self.smtp}:interface=127.0.0.1"\n'
            f'pop3 = "tcp:{self.pop3}:interface=127.0.0.1"\n'
            'submission = "none"\nsubmissions = "none"\nimap = "none"\nimaps = "none"\n'
            'pop3s = "none"\n'
            "[queue]\nscan_interval = 3600\n"
            f'[outbound]\nrelay_host = "127.0.0.1"\nrelay_port = {relay}\n'
            'relay_tls = "none"\n')
        self.log = self.base / "twistd.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "--logfile", str(self.log), "mailtwist",
                      "--config", str(config)],
            cwd=str(self.base), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.stop)
        wait_until(lambda: self.proc.poll() is not None or "@worker1] pop3 listening" in
                   self.text(), 60, "the worker to listen")
        self.assertIsNone(self.proc.poll(), self.text())
        self.workers = wait_until(lambda: children_of(self.proc.pid), 30, "the worker process")

    def text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def send(self, to: str, subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp, timeout=30) as client:
            client.sendmail("bob@sender.test", [to], f"Subject: {subject}\r\n\r\nhi\r\n")

    def inbox_count(self) -> int:
        inbox = self.data / "mail" / "example.test" / "alice"
        return sum(len(os.listdir(inbox / sub)) for sub in ("new", "cur")
                   if (inbox / sub).exists())

    def test_worker_serves_while_main_is_stopped(self):
        """Guards that the worker really accepts on the shared sockets: with the
        main process frozen (SIGSTOP), SMTP and POP3 are still answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            for n in range(5):
                self.send("alice@example.test", f"while stopped {n}")
            pop = poplib.POP3("127.0.0.1", self.pop3, timeout=30)
            pop.user("alice@example.test")
            pop.pass_("secret")
            self.assertEqual(pop.stat()[0], 5)
            pop.quit()
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.assertEqual(self.inbox_count(), 5)

    def test_mail_queued_by_a_worker_is_attempted_by_the_main_process(self):
        """Guards the queue pipe: mail a worker spools for a remote address is
        attempted at once by the main process's runner (the periodic scan is an
        hour away here)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            self.send("far@example.test", "to the world")
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)
        spool = self.data / "queue"
        self.assertTrue(any(spool.rglob("*")), "nothing was spooled")
        wait_until(lambda: "remote.invalid" in self.text() and "attempt" in self.text().lower(),
                   30, "the delivery attempt")

    def test_sighup_reaches_the_workers_and_stop_ends_them(self):
        """Guards that SIGHUP is passed on (both processes reload) and that
        stopping the main process stops every worker."""
        os.kill(self.proc.pid, signal.SIGHUP)
        wait_until(lambda: self.text().count("reload requested") >= 2, 30,
                   "both processes to reload")
        self.proc.terminate()
        # twistd ends cleanly, then exits by the signal that stopped it
        self.assertIn(self.proc.wait(60), (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down", self.text())
        for pid in self.workers:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                       open(f"/proc/{pid}/stat").read().split()[2] == "Z", 30,
                       "the worker to exit")
