"""Start-up: config parsing, one-line errors, the twistd plugin and the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from mailtwist.config import ConfigError, default_listeners, load_config, sample_config
from tests.support import output_until

ROOT = Path(__file__).resolve().parent.parent


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*args: str, cwd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*TWISTD, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class ConfigTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def assertConfigError(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config(self.write(text))
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_defaults_without_a_file(self):
        config = load_config(None, {"data_dir": "d"})
        self.assertEqual(config.smtp.max_message_size, 25 * 1024 * 1024)
        self.assertFalse(config.allow_plaintext_auth)
        self.assertEqual(config.data_dir, Path.cwd() / "d")

    def test_unprivileged_ports(self):
        self.assertEqual(default_listeners(unprivileged=True)["smtp"], ["tcp:10025"])
        self.assertEqual(default_listeners(unprivileged=True)["pop3s"], ["ssl:10995"])
        self.assertEqual(default_listeners(unprivileged=False)["submissions"], ["ssl:465"])

    def test_errors_name_the_key(self):
        self.assertConfigError("colour = 1\n", "unknown key 'colour'", "allowed:")
        self.assertConfigError("[smtp]\nmax_message_size = -1\n", "smtp.max_message_size",
                               "positive integer")
        self.assertConfigError("[smtp]\nmax_mesage_size = 1\n", "smtp.max_mesage_size",
                               "unknown key")
        self.assertConfigError("[listen]\nsmpt = \"tcp:25\"\n", "listen.smpt", "unknown")
        self.assertConfigError("allow_plaintext_auth = \"yes\"\n", "allow_plaintext_auth",
                               "true or false")
        self.assertConfigError("hostname = \"bad host\"\n", "hostname")
        self.assertConfigError("data_dir = [\n", "not valid TOML")

    def test_file_then_overrides(self):
        path = self.write('hostname = "mx.file.test"\n[listen]\nsmtp = ["tcp:2525"]\n')
        config = load_config(path, {"hostname": "mx.cli.test", "listen": {"pop3": ["none"]}})
        self.assertEqual(config.hostname, "mx.cli.test")
        self.assertEqual(config.listen["smtp"], ["tcp:2525"])
        self.assertEqual(config.listen["pop3"], [])

    def test_sample_config_is_valid(self):
        load_config(self.write(sample_config()))


class TwistdTests(unittest.TestCase):
    """The real ``twistd mailtwist`` command in a subprocess."""

    def test_plugin_is_listed(self):
        result = twistd("--help", cwd=str(ROOT))
        self.assertIn("mailtwist", result.stdout)

    def assertStartupError(self, args: list[str], *fragments: str) -> None:
        cwd = self.mktemp()
        os.mkdir(cwd)
        result = twistd("-n", "mailtwist", *args, cwd=cwd)
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("mailtwist: error: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_bad_config_file(self):
        bad = Path(self.mktemp()).resolve()
        bad.write_text("[smtp]\nmax_recipients = 0\n")
        self.assertStartupError(["--config", str(bad)], str(bad), "smtp.max_recipients")

    def test_missing_config_file(self):
        self.assertStartupError(["--config", "/nonexistent/mailtwist.toml"], "not found")

    def test_bad_endpoint(self):
        self.assertStartupError(["--data-dir", "d", "--smtp", "bogus:25"], "listen.smtp",
                                "bogus:25")

    def test_unreadable_certificate(self):
        cfg = Path(self.mktemp()).resolve()
        cfg.write_text('[tls]\ncert = "/nonexistent/cert.pem"\n')
        self.assertStartupError(["--config", str(cfg), "--data-dir", "d"], "tls.cert",
                                "/nonexistent/cert.pem")

    def test_embedded_default_starts(self):
        cwd = Path(self.mktemp())
        cwd.mkdir()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        args = [*TWISTD, "-n", "mailtwist"]
        for role in ("smtp", "submission", "submissions", "pop3", "pop3s"):
            args += [f"--{role}", "tcp:0:interface=127.0.0.1"]
        args += ["--imap", "none", "--imaps", "none"]
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)
        output = output_until(proc, lambda out: out.count(" listening on ") >= 5)
        self.assertEqual(output.count(" listening on "), 5, output)
        self.assertIn("fingerprint", output)
        self.assertIn("demo@example.test", output)
        self.assertTrue((cwd / "mailtwist-data" / "tls" / "cert.pem").exists())
        self.assertIn("demo@example.test:", (cwd / "mailtwist-data" / "users").read_text())


class PrivilegedStartTests(unittest.TestCase):
    """Listeners bind in privilegedStartService, before twistd's --uid switch, so a
    server started as root can listen on port 25 and then run unprivileged."""

    def test_binds_before_privileges_are_dropped_and_only_once(self):
        from twisted.internet import reactor

        from mailtwist.tap import build_service
        settings = {"data_dir": str(Path(self.mktemp()).resolve()), "hostname": "mx.test",
                    "listen": {"smtp": ["tcp:0:interface=127.0.0.1"], "submission": "none",
                               "submissions": "none", "imap": "none", "imaps": "none",
                               "pop3": "none", "pop3s": "none"}}
        server = build_service(load_config(None, settings), reactor)
        [listener] = server.listeners["smtp"]
        server.privilegedStartService()
        self.assertIsNotNone(listener.port)
        port = listener.port
        server.startService()
        self.addCleanup(server.stopService)
        self.assertIs(listener.port, port)
