"""Running unprivileged (issue 6 item 20): ``twistd --uid/--gid`` binds a
privileged port as root, then runs as that user with a data directory it owns,
private file modes, and no secret in the (JSON) log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
NOBODY = 65534
# Files meant to be readable by other local programs; the 0700 data dir still hides them.
PUBLIC_FILES = {"domains", "aliases"}


def free_privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (we are root)."""
    for port in range(700, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise unittest.SkipTest("no free port below 1024")


class DropPrivilegesTests(unittest.TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: twistd --uid can only switch users as root")
        self.base = Path(tempfile.mkdtemp(prefix="mailtwist-priv-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        os.chmod(self.base, 0o755)  # the dropped user must reach the data dir inside

    def start(self, port: int) -> subprocess.Popen:
        self.log = self.base / "log.jsonl"
        self.data_dir = self.base / "data"
        args = [*TWISTD, "-n", "--pidfile=", "--uid", str(NOBODY), "--gid", str(NOBODY),
                "--logger", "mailtwist.events.json_observer", "mailtwist",
                "--data-dir", str(self.data_dir), "--hostname", "mx.example.test",
                "--smtp", f"tcp:{port}:interface=127.0.0.1"]
        for role in ("submission", "submissions", "imap", "imaps", "pop3", "pop3s"):
            args += [f"--{role}", "none"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), MAILTWIST_JSON_LOG=str(self.log))
        proc = subprocess.Popen(args, cwd=str(self.base), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(self.stop, proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def records(self) -> list[dict]:
        text = self.log.read_text() if self.log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def wait_for(self, proc: subprocess.Popen, predicate, timeout: float = 60) -> dict:
        """The first JSON log record matching *predicate* (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"not in the log:\n{self.log.read_text() if self.log.exists() else ''}"
                             f"\nstderr: {proc.stderr.read().decode() if proc.poll() is not None else ''}")

    def test_runs_as_user_owning_private_files(self):
        """As root with --uid/--gid: binds port < 1024, then runs as that user; the data
        dir that makeService created (as root) is that user's, mode 0700, secrets 0600,
        and mail received after the switch is stored; the JSON log has the events."""
        port = free_privileged_port()
        proc = self.start(port)
        self.wait_for(proc, lambda r: "smtp listening on" in r.get("message", ""))
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        self.assertEqual(set(uid_line.split()[1:]), {str(NOBODY)})

        demo_user, password = (self.data_dir / "demo-password").read_text().split()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.net")
            refused = client.sendmail("someone@example.net", [demo_user],
                                      b"Subject: after the switch\r\n\r\nhello\r\n")
        self.assertEqual(refused, {})
        event = self.wait_for(proc, lambda r: r.get("event_kind") == "smtp.transaction")
        self.assertEqual((event["code"], event["recipients"], event["peer"]),
                         (250, 1, "127.0.0.1"))
        self.stop(proc)

        data_st = self.data_dir.stat()
        self.assertEqual(stat.S_IMODE(data_st.st_mode), 0o700)
        self.assertEqual((data_st.st_uid, data_st.st_gid), (NOBODY, NOBODY))
        messages = []
        for path in self.data_dir.rglob("*"):
            st = path.lstat()
            self.assertEqual((st.st_uid, st.st_gid), (NOBODY, NOBODY), path)
            mode = stat.S_IMODE(st.st_mode)
            if path.name in PUBLIC_FILES:
                self.assertEqual(mode & 0o022, 0, path)
            else:
                self.assertEqual(mode & 0o077, 0, f"{path} has mode {mode:04o}")
            if path.parent.name in ("new", "cur") and path.is_file():
                messages.append(path)
        self.assertEqual(len(messages), 1)
        for secret in ("users", "demo-password", "tls/key.pem"):
            self.assertEqual(stat.S_IMODE((self.data_dir / secret).stat().st_mode), 0o600)
        self.assertNotIn(password, self.log.read_text())
        self.assertEqual(stat.S_IMODE(self.log.stat().st_mode), 0o600)


class RootAdminTests(unittest.TestCase):
    """Admin commands run as root on a data directory that belongs to the server user."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to create files for another user")
        self.base = Path(self.mktemp()).resolve()
        self.data_dir = self.base / "data"
        self.data_dir.mkdir(parents=True)
        os.chown(self.data_dir, NOBODY, NOBODY)
        os.chmod(self.data_dir, 0o700)

    def test_init_as_root_keeps_the_owner(self):
        """`mailtwist init` as root (certificate, DKIM key, account) leaves every file
        owned by the data directory's owner, so the server can still use them."""
        import io
        from contextlib import redirect_stdout

        from mailtwist.cli import main

        with redirect_stdout(io.StringIO()):
            code = main(["--config", str(self.base / "mailtwist.toml"),
                         "--data-dir", str(self.data_dir), "init", "--domain", "example.org",
                         "--hostname", "mail.example.org"])
        self.assertEqual(code, 0)
        paths = list(self.data_dir.rglob("*"))
        self.assertIn(self.data_dir / "tls" / "key.pem", paths)
        self.assertTrue(any(p.suffix == ".key" for p in paths))
        self.assertEqual([p for p in paths if p.lstat().st_uid != NOBODY], [])

    def test_check_reports_files_of_another_owner(self):
        """`mailtwist check` FAILs when a file in the data dir has another owner."""
        from mailtwist import check
        from mailtwist.config import load_config

        (self.data_dir / "users").write_text("")
        os.chmod(self.data_dir / "users", 0o600)
        config = load_config(None, {"data_dir": str(self.data_dir)})
        section = check.Section("data")
        check.check_data_dir(config, section)
        [failed] = [f for f in section.findings if f.status == "FAIL"]
        self.assertIn("1 file(s)", failed.text)
        self.assertIn("not owned by nobody", failed.text)
        self.assertEqual(failed.fix, f"chown -R nobody: {self.data_dir}")
        os.chown(self.data_dir / "users", NOBODY, NOBODY)
        section = check.Section("data")
        check.check_data_dir(config, section)
        self.assertEqual([f.status for f in section.findings], ["OK"] * 4)
