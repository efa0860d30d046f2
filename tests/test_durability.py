"""Durability (issue 6): 250 only after fsync, crash safety, tmp/ clean-up."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.directory import FileDirectory
from mailtwist.storage import maildir as maildir_module
from mailtwist.storage.maildir import Maildir
from tests.support import DOMAIN, PASSWORD, ServerMixin

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
HOSTNAME = "mx.example.test"


class _TracingOS:
    """Stands in for the ``os`` module inside mailtwist.storage.maildir and
    records, in order, the file-system calls that matter for durability."""

    def __init__(self, events: list[tuple], lock: threading.Lock) -> None:
        self._events = events
        self._lock = lock
        self._paths: dict[int, str] = {}

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _record(self, *event) -> None:
        with self._lock:
            self._events.append(event)

    def open(self, path, flags, mode=0o777, **kwargs) -> int:
        fd = os.open(path, flags, mode, **kwargs)
        self._paths[fd] = os.path.abspath(os.fspath(path))
        return fd

    def write(self, fd: int, data) -> int:
        written = os.write(fd, data)
        self._record("write", self._paths.get(fd))
        return written

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._record("fsync", self._paths.get(fd))

    def link(self, src, dst, **kwargs) -> None:
        os.link(src, dst, **kwargs)
        self._record("publish", os.fspath(src), os.fspath(dst))

    def rename(self, src, dst, **kwargs) -> None:
        os.rename(src, dst, **kwargs)
        self._record("publish", os.fspath(src), os.fspath(dst))


class FsyncBeforeReplyTests(ServerMixin, unittest.TestCase):
    """The 250 at the end of DATA comes only after the message is durable."""

    @defer.inlineCallbacks
    def test_250_only_after_file_and_directory_fsync(self):
        """Guards: write → fsync(file) → link/rename into new/ → fsync(new/) all
        happen before the client reads 250; dropping or reordering any fails."""
        yield self.start_server()
        events: list[tuple] = []
        lock = threading.Lock()
        self.patch(maildir_module, "os", _TracingOS(events, lock))

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.ehlo("c.test")
                client.mail("s@remote.test")
                client.rcpt(f"alice@{DOMAIN}")
                reply = client.data(b"Subject: durable\r\n\r\nkeep me\r\n")
                with lock:
                    events.append(("reply", reply[0]))
                return reply

        code, _ = yield self.in_thread(send)
        self.assertEqual(code, 250)
        [delivered] = self.maildir_files(f"alice@{DOMAIN}")
        self.assertEqual(delivered.parent.name, "new")
        new_dir = str(delivered.parent)
        tmp_file = str(delivered.parent.parent / "tmp" / delivered.name)

        def index(event: tuple) -> int:
            self.assertIn(event, events)
            return len(events) - 1 - events[::-1].index(event)

        last_write = index(("write", tmp_file))
        file_sync = index(("fsync", tmp_file))
        published = index(("publish", tmp_file, str(delivered)))
        dir_sync = index(("fsync", new_dir))
        reply = index(("reply", 250))
        self.assertLess(last_write, file_sync, events)
        self.assertLess(file_sync, published, events)
        self.assertLess(published, dir_sync, events)
        self.assertLess(dir_sync, reply, events)


class AllOrNothingTests(ServerMixin, unittest.TestCase):
    """Item 4: several local recipients, one of them unwritable."""

    @defer.inlineCallbacks
    def test_no_250_unless_stored_for_every_recipient(self):
        """Guards item 4: with three local recipients and the middle one's tmp/
        unusable, DATA gets 4xx and the copies already written for the others
        are removed (a retry must not duplicate them); once the Maildir is
        repaired the same server stores exactly one copy for each."""
        yield self.start_server(accounts=("alice", "bob", "carol"))
        recipients = [f"{name}@{DOMAIN}" for name in ("alice", "bob", "carol")]
        tmp = self.server.store.maildir(recipients[1]).root / "tmp"
        tmp.rmdir()
        tmp.write_text("not a directory")

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.ehlo("c.test")
                client.mail("s@remote.test")
                for rcpt in recipients:
                    client.rcpt(rcpt)
                return client.data(b"Subject: all or nothing\r\n\r\nthree copies\r\n")

        code, text = yield self.in_thread(send)
        self.assertEqual(code // 100, 4, text)
        for rcpt in recipients:
            self.assertEqual(self.maildir_files(rcpt), [], rcpt)
        tmp.unlink()
        tmp.mkdir()
        code, text = yield self.in_thread(send)
        self.assertEqual(code, 250, text)
        for rcpt in recipients:
            [copy] = self.maildir_files(rcpt)
            self.assertIn(b"three copies", copy.read_bytes())


class TmpCleanupTests(unittest.TestCase):
    """`Maildir.clean_tmp`: crash leftovers go, live deliveries stay."""

    def setUp(self) -> None:
        self.maildir = Maildir(self.mktemp(), hostname=HOSTNAME)
        self.maildir.ensure()
        self.maildir.create_folder("Lists")
        self.counter = itertools.count(1)

    def plant(self, folder_dir: Path, pid: int, host: str = HOSTNAME) -> Path:
        q = next(self.counter)
        path = folder_dir / "tmp" / f"{int(time.time())}.M1P{pid}Q{q}.{host},S=3,W=3"
        path.write_bytes(b"par")
        return path

    def dead_pid(self) -> int:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        return proc.pid

    def test_leftovers_of_dead_writers_removed(self):
        """Guards crash recovery: files from this host that predate this process
        and whose writer is dead (or an earlier process with our PID, as in a
        container) are removed from INBOX and folders; a live process's file and
        another host's stay."""
        folder = self.maildir.folder_path("Lists")
        dead = self.dead_pid()
        gone = [self.plant(self.maildir.root, dead), self.plant(folder, dead),
                self.plant(self.maildir.root, os.getpid())]
        live = self.plant(self.maildir.root, os.getppid())
        other_host = self.plant(folder, dead, host="other.example")
        self.patch(maildir_module, "_PROCESS_START", time.time() + 10)
        self.assertEqual(self.maildir.clean_tmp(), 3)
        for path in gone:
            self.assertFalse(path.exists(), path)
        for path in (live, other_host):
            self.assertTrue(path.exists(), path)

    def test_files_newer_than_this_process_kept_for_36_hours(self):
        """Guards live deliveries: nothing created since this process started is
        removed, whoever wrote it, until it is 36 hours old (Dovecot's rule)."""
        folder = self.maildir.folder_path("Lists")
        dead = self.dead_pid()
        self.patch(maildir_module, "_PROCESS_START", time.time() - 10)
        kept = [self.plant(self.maildir.root, os.getpid()), self.plant(folder, dead),
                self.plant(folder, os.getppid(), host="other.example")]
        self.assertEqual(self.maildir.clean_tmp(), 0)
        for path in kept:
            self.assertTrue(path.exists(), path)
        self.assertEqual(self.maildir.clean_tmp(now=time.time() + 37 * 3600), 3)
        self.assertEqual(list((self.maildir.root / "tmp").iterdir()), [])
        self.assertEqual(list((folder / "tmp").iterdir()), [])


def _message(n: int) -> tuple[str, bytes]:
    """Message number n: a unique Message-ID and a body carrying its own checksum."""
    lines = [f"line {i} of message {n}: " + "abcdefghij" * (n % 7 + i % 5)
             for i in range(20 + n % 40)]
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    msgid = f"<{n}.storm@durability.test>"
    text = (f"Message-ID: {msgid}\nSubject: storm {n}\nX-Checksum: {digest}\n\n{body}")
    return msgid, text.encode()


_MSGID = re.compile(rb"^Message-ID: (<[0-9]+\.storm@durability\.test>)$", re.MULTILINE)
_CHECKSUM = re.compile(rb"^X-Checksum: ([0-9a-f]{64})$", re.MULTILINE)


class _Server:
    """One ``twistd -n mailtwist`` process on a data directory, SMTP only."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log
        args = [*TWISTD, "-n", f"--logfile={log}", "--pidfile=", "mailtwist",
                "--data-dir", str(data_dir), "--hostname", HOSTNAME,
                "--smtp", "tcp:0:interface=127.0.0.1"]
        for role in ("submission", "submissions", "imap", "imaps", "pop3", "pop3s"):
            args += [f"--{role}", "none"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, cwd=str(data_dir.parent), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        """Poll the log for pattern (bounded); fail if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text() if self.log.exists() else ""
            match = re.search(pattern, text)
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server log:\n{text}")

    def smtp_port(self) -> int:
        return int(self.wait_for(r"smtp listening on \S+ \(127\.0\.0\.1:([0-9]+)\)")[1])

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


class _Storm:
    """Parallel smtplib senders of numbered messages, recording every 250 read."""

    def __init__(self, limit: int) -> None:
        self.numbers = itertools.count(1)
        self.limit = limit
        self.lock = threading.Lock()
        self.sent: set[int] = set()
        self.acked: set[int] = set()

    def _next(self) -> int | None:
        with self.lock:
            n = next(self.numbers)
            if n > self.limit:
                return None
            self.sent.add(n)
            return n

    def _sender(self, port: int, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.ehlo("storm.test")
                    while not stop.is_set():
                        n = self._next()
                        if n is None:
                            return
                        rcpt = ("alice", "bob")[n % 2]
                        client.mail("s@remote.test")
                        client.rcpt(f"{rcpt}@{DOMAIN}")
                        code, _ = client.data(_message(n)[1].replace(b"\n", b"\r\n"))
                        if code == 250:
                            with self.lock:
                                self.acked.add(n)
            except (OSError, smtplib.SMTPException):
                stop.wait(0.05)

    def round(self, server: _Server, kill_after: int, senders: int = 4) -> None:
        """Send until kill_after more messages are acknowledged, then SIGKILL the
        server while the senders are still going."""
        port = server.smtp_port()
        with self.lock:
            target = len(self.acked) + kill_after
        stop = threading.Event()
        threads = [threading.Thread(target=self._sender, args=(port, stop), daemon=True)
                   for _ in range(senders)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with self.lock:
                    if len(self.acked) >= target or len(self.sent) >= self.limit:
                        break
                time.sleep(0.01)
            server.stop(signal.SIGKILL)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        with self.lock:
            if len(self.acked) < target:
                raise AssertionError(f"only {len(self.acked)} of {target} messages acknowledged")


class CrashTests(unittest.TestCase):
    """kill -9 during a delivery storm, restart, repeat."""

    def test_kill_9_during_storm(self):
        """Guards: every message whose 250 the client read survives SIGKILL
        exactly once and intact; nothing is delivered twice; tmp/ is cleaned of
        the dead processes' leftovers at the next start, a live writer's file
        is kept."""
        data_dir = Path(self.mktemp()).resolve() / "data"
        data_dir.mkdir(parents=True)
        (data_dir / "domains").write_text(f"{DOMAIN}\n")
        directory = FileDirectory(data_dir)
        directory.bcrypt_rounds = 4
        for name in ("alice", "bob"):
            directory.add_account(f"{name}@{DOMAIN}", PASSWORD)
        servers: list[_Server] = []

        def kill_all() -> None:
            for server in servers:
                server.stop(signal.SIGKILL)

        self.addCleanup(kill_all)

        def start() -> _Server:
            servers.append(_Server(data_dir, data_dir.parent / f"run{len(servers)}.log"))
            return servers[-1]

        storm = _Storm(limit=400)
        maildirs = [data_dir / "mail" / DOMAIN / name for name in ("alice", "bob")]
        planted: list[Path] = []
        live_file = None
        for kill_after in (50, 100, 70):
            server = start()
            storm.round(server, kill_after)
            # What a delivery cut short at this moment would leave behind.
            path = maildirs[0] / "tmp" / f"{int(time.time())}.M1P{server.proc.pid}" \
                f"Q{len(planted) + 900000}.{HOSTNAME},S=4,W=4"
            path.write_bytes(b"half")
            planted.append(path)
            if live_file is None:
                live_file = maildirs[1] / "tmp" / f"{int(time.time())}.M1P{os.getpid()}" \
                    f"Q1.{HOSTNAME},S=4,W=4"
                live_file.write_bytes(b"busy")

        server = start()
        server.wait_for(r"tmp/ cleanup done: [0-9]+ leftover")
        server.stop(signal.SIGTERM)

        self.assertGreaterEqual(len(storm.acked), 220)
        for path in planted:
            self.assertFalse(path.exists(), path)
        self.assertTrue(live_file.exists())
        live_file.unlink()
        for maildir in maildirs:
            self.assertEqual(sorted((maildir / "tmp").iterdir()), [])

        found: dict[int, int] = {}
        for maildir in maildirs:
            for sub in ("new", "cur"):
                for path in (maildir / sub).iterdir():
                    data = path.read_bytes()
                    msgid = _MSGID.search(data)
                    self.assertIsNotNone(msgid, path)
                    n = int(msgid[1][1:].split(b".")[0])
                    header, _, body = data.partition(b"\n\n")
                    self.assertEqual(body, _message(n)[1].partition(b"\n\n")[2], path)
                    checksum = _CHECKSUM.search(header)
                    self.assertEqual(checksum[1].decode(), hashlib.sha256(body).hexdigest())
                    self.assertIn(f"{('alice', 'bob')[n % 2]}/{sub}", str(path))
                    found[n] = found.get(n, 0) + 1
        self.assertEqual({n: c for n, c in found.items() if c != 1}, {})
        self.assertEqual(sorted(storm.acked - found.keys()), [])
        self.assertLessEqual(found.keys(), storm.sent)
