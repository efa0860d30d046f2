"""Reload without restart: SIGHUP / ``mailtwist reload`` re-read the config file,
certificate, filters and directory while sessions stay connected; a bad new
config is refused and the old one stays; a renewed certificate file is noticed."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import smtplib
import socket
import ssl
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

from imapclient import IMAPClient
from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailtwist import cli
from mailtwist.config import ROLES, Config, load_config
from mailtwist.directory import FileDirectory
from mailtwist.reload import PID_FILE, ReloadService, Reloader
from mailtwist.tap import build_service
from mailtwist.tls import ServerTLS, fingerprint, load_server_tls, make_self_signed

from .support import DOMAIN, PASSWORD, client_tls_context

ALICE = f"alice@{DOMAIN}"
SERVED = ("smtp", "imaps")


def peer_fingerprint(port: int) -> str:
    """SHA-256 of the certificate a new TLS connection to *port* is served."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with client_tls_context().wrap_socket(sock) as tls:
            return fingerprint_of(tls)


def fingerprint_of(tls: ssl.SSLSocket) -> str:
    return hashlib.sha256(tls.getpeercert(binary_form=True)).digest().hex(":").upper()


def write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = make_self_signed(name)
    (directory / f"{name}.crt").write_bytes(cert)
    (directory / f"{name}.key").write_bytes(key)
    return directory / f"{name}.crt", directory / f"{name}.key"


class LogCapture:
    """mailtwist's log lines while a test runs."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace", "").startswith("mailtwist."):
            self.lines.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class ReloadCase(unittest.TestCase):
    """A server started from a TOML file, as twistd does; the test edits the file."""

    @defer.inlineCallbacks
    def start(self, extra: str = "", install_signal: bool = False):
        if not hasattr(self, "base"):
            self.base = Path(self.mktemp()).resolve()
        self.data_dir = self.base / "data"
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "domains").write_text(f"{DOMAIN}\n")
        self.config_path = self.base / "mailtwist.toml"
        self.write_config(extra)
        self.log = LogCapture(self)
        self.server = build_service(load_config(self.config_path), reactor)
        self.server.directory.add_account(ALICE, PASSWORD)
        self.server.reload_service.install_signal = install_signal
        self.server.startService()
        self.addCleanup(self.server.stopService)
        for listeners in self.server.listeners.values():
            for listener in listeners:
                yield listener.listening

    def write_config(self, extra: str = "") -> None:
        listen = "\n".join(
            f'{role} = "{"tcp:0:interface=127.0.0.1" if role in SERVED else "none"}"'
            for role in ROLES)
        self.config_path.write_text(
            f'data_dir = "{self.data_dir}"\nhostname = "mx.example.test"\n'
            f"bcrypt_rounds = 4\n{extra}\n[listen]\n{listen}\n[auth]\nfailure_delay = 0\n")

    def port(self, role: str) -> int:
        return self.server.port_of(role)

    def ehlo_size(self) -> int:
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
            client.ehlo("client.example")
            return int(client.esmtp_features["size"])


class SighupTests(ReloadCase):
    @defer.inlineCallbacks
    def test_sighup_new_user_and_certificate_while_imap_stays(self):
        """SIGHUP: a new user logs in, new connections get the new certificate, and an
        IMAP session opened before keeps working (on its old certificate)."""
        yield self.start(install_signal=True)
        old_fp = self.server.tls.fingerprint

        def open_session():
            client = IMAPClient("127.0.0.1", port=self.port("imaps"), ssl=True,
                                ssl_context=client_tls_context(), timeout=15)
            client.login(ALICE, PASSWORD)
            client.select_folder("INBOX")
            return client
        client = yield deferToThread(open_session)
        self.addCleanup(lambda: deferToThread(client.logout))
        self.assertEqual(fingerprint_of(client._imap.sock), old_fp)

        cert, key = write_pair(self.base, "renewed.example.test")
        self.write_config(f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
        # As `mailtwist user add` does: another process edits the passwd-file.
        other = FileDirectory(self.data_dir)
        other.bcrypt_rounds = 4
        other.add_account(f"carol@{DOMAIN}", PASSWORD)
        new_fp = load_server_tls(cert, key).fingerprint
        self.assertNotEqual(new_fp, old_fp)

        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if self.server.tls.fingerprint == new_fp:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.server.tls.fingerprint, new_fp)
        self.assertEqual(self.log.matching("reload refused"), [])

        served = yield deferToThread(peer_fingerprint, self.port("imaps"))
        self.assertEqual(served, new_fp)

        def carol_logs_in():
            carol = IMAPClient("127.0.0.1", port=self.port("imaps"), ssl=True,
                               ssl_context=client_tls_context(), timeout=15)
            carol.login(f"carol@{DOMAIN}", PASSWORD)
            carol.logout()
        yield deferToThread(carol_logs_in)

        def old_session_still_works():
            client.noop()
            self.assertEqual(client.search(["ALL"]), [])
            self.assertEqual(fingerprint_of(client._imap.sock), old_fp)
        yield deferToThread(old_session_still_works)

    @defer.inlineCallbacks
    def test_signal_handler_restored_on_stop(self):
        """The SIGHUP handler is ours while running and the previous one after stop."""
        before = signal.getsignal(signal.SIGHUP)
        yield self.start(install_signal=True)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        yield self.server.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class RefusedTests(ReloadCase):
    @defer.inlineCallbacks
    def test_broken_toml_is_refused_and_old_settings_stay(self):
        """Broken TOML: reload() is False, one "reload refused:" line, nothing changed."""
        yield self.start('[smtp]\nmax_message_size = 1000000\n')
        old_fp = self.server.tls.fingerprint
        self.config_path.write_text("[smtp\nmax_message_size = 2000000\n")
        self.assertFalse(self.server.reload())
        refused = self.log.matching("reload refused:")
        self.assertEqual(len(refused), 1, self.log.lines)
        self.assertIn(str(self.config_path), refused[0])
        self.assertIn("not valid TOML", refused[0])
        self.assertNotIn("\n", refused[0])
        self.assertEqual(self.server.config.smtp.max_message_size, 1000000)
        self.assertEqual(self.server.tls.fingerprint, old_fp)
        size = yield deferToThread(self.ehlo_size)
        self.assertEqual(size, 1000000)

    @defer.inlineCallbacks
    def test_bad_certificate_refuses_the_whole_reload(self):
        """A new config whose certificate does not load changes nothing, not even
        the limits it also changed."""
        yield self.start('[smtp]\nmax_message_size = 1000000\n')
        old_fp = self.server.tls.fingerprint
        bad = self.base / "bad.pem"
        bad.write_text("not a certificate\n")
        _, key = write_pair(self.base, "other.example.test")
        self.write_config(f'[smtp]\nmax_message_size = 2000000\n'
                          f'[tls]\ncert = "{bad}"\nkey = "{key}"\n')
        self.assertFalse(self.server.reload())
        refused = self.log.matching("reload refused:")
        self.assertEqual(len(refused), 1, self.log.lines)
        self.assertIn("tls.cert", refused[0])
        self.assertEqual(self.server.config.smtp.max_message_size, 1000000)
        self.assertEqual(self.server.tls.fingerprint, old_fp)

    @defer.inlineCallbacks
    def test_unknown_filter_is_refused(self):
        """A filter that is not installed refuses the reload; the old chains stay."""
        yield self.start()
        before = self.server.session_factories[0][1].filters
        self.write_config('[filters]\nsmtp = ["no_such_filter"]\n')
        self.assertFalse(self.server.reload())
        self.assertEqual(len(self.log.matching("reload refused: filter 'no_such_filter'")), 1,
                         self.log.lines)
        self.assertIs(self.server.session_factories[0][1].filters, before)


    @defer.inlineCallbacks
    def test_bad_directory_settings_are_refused(self):
        """A postmaster that is no address, or '@' as plus separator, refuses the
        reload (load_config checks them) and the running values stay."""
        yield self.start()
        for extra, named in (('postmaster = "not an address"', "postmaster"),
                             ('plus_separator = "@"', "plus_separator")):
            self.log.lines.clear()
            self.write_config(extra)
            self.assertFalse(self.server.reload())
            refused = self.log.matching("reload refused:")
            self.assertEqual(len(refused), 1, self.log.lines)
            self.assertIn(named, refused[0])
        self.assertIsNone(self.server.config.postmaster)
        self.assertEqual(self.server.config.plus_separator, "+")
        self.assertEqual(self.server.directory.plus_separator, "+")


class AppliedTests(ReloadCase):
    @defer.inlineCallbacks
    def test_limits_apply_to_new_sessions(self):
        """A new [smtp] max_message_size is advertised to sessions opened after reload."""
        yield self.start('[smtp]\nmax_message_size = 1000000\n')
        self.write_config('[smtp]\nmax_message_size = 2000000\n')
        self.assertTrue(self.server.reload())
        size = yield deferToThread(self.ehlo_size)
        self.assertEqual(size, 2000000)

    @defer.inlineCallbacks
    def test_starttls_serves_the_new_certificate(self):
        """STARTTLS on port 25 uses the certificate of the last reload too."""
        yield self.start()
        cert, key = write_pair(self.base, "starttls.example.test")
        self.write_config(f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
        self.assertTrue(self.server.reload())

        def starttls_fingerprint() -> str:
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.starttls(context=client_tls_context())
                return fingerprint_of(client.sock)
        served = yield deferToThread(starttls_fingerprint)
        self.assertEqual(served, load_server_tls(cert, key).fingerprint)

    @defer.inlineCallbacks
    def test_listener_change_needs_restart(self):
        """A changed [listen] is not applied; the log says a restart is needed."""
        yield self.start()
        port = self.port("smtp")
        self.config_path.write_text(self.config_path.read_text().replace(
            'smtp = "tcp:0:interface=127.0.0.1"', 'smtp = "tcp:0:interface=127.0.0.2"'))
        self.assertTrue(self.server.reload())
        warned = self.log.matching("need")
        self.assertTrue(any("listen" in line and "restart" in line for line in warned),
                        self.log.lines)
        self.assertEqual(self.port("smtp"), port)
        self.assertEqual(self.server.config.listen["smtp"], ["tcp:0:interface=127.0.0.1"])

    @defer.inlineCallbacks
    def test_filters_are_rebuilt(self):
        """After enabling header_folder and reloading, flagged mail goes to Junk."""
        yield self.start()
        message = (b"From: x@example.org\r\nTo: alice@example.test\r\nSubject: s\r\n"
                   b"X-Spam-Flag: YES\r\n\r\nbody\r\n")

        def send():
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.sendmail("x@example.org", [ALICE], message)
        box = self.server.store.path_for(ALICE)
        yield deferToThread(send)
        self.assertEqual(len(list((box / "new").iterdir())), 1)
        self.write_config('[filters]\nsmtp = ["header_folder"]\n')
        self.assertTrue(self.server.reload())
        yield deferToThread(send)
        self.assertEqual(len(list((box / "new").iterdir())), 1)
        self.assertEqual(len(list((box / ".Junk" / "new").iterdir())), 1)


class DefaultCertificateTests(ReloadCase):
    @defer.inlineCallbacks
    def test_removing_tls_falls_back_to_the_self_signed_default(self):
        """Dropping [tls] on reload serves the data directory's self-signed certificate,
        made then if the server started with another one."""
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        cert, key = write_pair(self.base, "custom.example.test")
        yield self.start(f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
        self.assertFalse((self.data_dir / "tls" / "cert.pem").exists())
        self.write_config()
        self.assertTrue(self.server.reload())
        default = load_server_tls(self.data_dir / "tls" / "cert.pem",
                                  self.data_dir / "tls" / "key.pem").fingerprint
        served = yield deferToThread(peer_fingerprint, self.port("imaps"))
        self.assertEqual(served, default)


class PidFileTests(ReloadCase):
    @defer.inlineCallbacks
    def test_pid_file_written_and_removed(self):
        """The server writes its pid to DATA_DIR/mailtwist.pid and removes it on stop."""
        yield self.start()
        path = self.data_dir / PID_FILE
        self.assertEqual(path.read_text().strip(), str(os.getpid()))
        yield self.server.stopService()
        self.assertFalse(path.exists())

    def run_cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_cli_reload_signals_the_server(self):
        """`mailtwist reload` finds the pid file and the server reloads."""
        yield self.start(install_signal=True)
        self.write_config('[smtp]\nmax_message_size = 3000000\n')
        status, out, err = self.run_cli("reload", "--data-dir", str(self.data_dir))
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"pid {os.getpid()}", out)
        for _ in range(100):
            if self.server.config.smtp.max_message_size == 3000000:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.server.config.smtp.max_message_size, 3000000)

    def test_cli_reload_not_running(self):
        """Without a pid file, or with a stale one, the command says it is not running."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir()
        status, _, err = self.run_cli("reload", "--data-dir", str(data_dir))
        self.assertEqual(status, 1)
        self.assertIn("not running", err)
        self.assertEqual(err.count("\n"), 1)
        # A pid that cannot be running: above the kernel's pid_max.
        (data_dir / PID_FILE).write_text("99999999\n")
        status, _, err = self.run_cli("reload", "--data-dir", str(data_dir))
        self.assertEqual(status, 1)
        self.assertIn("stale pid file", err)


class CertificateWatchTests(unittest.TestCase):
    """The certificate file changing on disk (ACME renewal), with a fake clock."""

    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.cert, self.key = self.dir / "cert.pem", self.dir / "key.pem"
        self.renew("first.example.test")
        self.tls = ServerTLS(load_server_tls(self.cert, self.key))
        self.clock = task.Clock()
        top = SimpleNamespace(config=Config(data_dir=self.dir))
        self.service = ReloadService(Reloader(top, reactor=reactor), self.tls, clock=self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.log = LogCapture(self)

    def renew(self, name: str, write_key: bool = True) -> str:
        cert, key = make_self_signed(name)
        tmp = self.cert.with_suffix(".tmp")
        tmp.write_bytes(cert)
        os.replace(tmp, self.cert)
        if write_key:
            tmp.write_bytes(key)
            os.replace(tmp, self.key)
        else:
            self.pending_key = key
        return fingerprint(cert)

    def test_renewed_file_is_served_after_the_interval(self):
        """A renewed certificate is picked up at the next check, not before."""
        old = self.tls.fingerprint
        new = self.renew("second.example.test")
        self.clock.advance(self.service.cert_interval - 1)
        self.assertEqual(self.tls.fingerprint, old)
        self.clock.advance(1)
        self.assertEqual(self.tls.fingerprint, new)

    def test_half_written_pair_waits_for_the_key(self):
        """Certificate renewed but key not yet: refused once, switched when the key comes."""
        old = self.tls.fingerprint
        new = self.renew("third.example.test", write_key=False)
        self.clock.advance(self.service.cert_interval)
        self.assertEqual(self.tls.fingerprint, old)
        self.clock.advance(self.service.cert_interval)
        self.assertEqual(len(self.log.matching("certificate reload refused")), 1, self.log.lines)
        tmp = self.key.with_suffix(".tmp")
        tmp.write_bytes(self.pending_key)
        os.replace(tmp, self.key)
        self.clock.advance(self.service.cert_interval)
        self.assertEqual(self.tls.fingerprint, new)


class TwistdTests(unittest.TestCase):
    """The real twistd process: `mailtwist reload` reaches it and stopping cleans up."""

    def test_twistd_reloads_on_mailtwist_reload(self):
        """twistd -n mailtwist installs the SIGHUP handler; `mailtwist reload` makes it
        re-read the config (and refuse a broken one); SIGTERM removes the pid file."""
        import select
        import subprocess
        import sys
        import time

        root = Path(__file__).resolve().parent.parent
        base = Path(self.mktemp()).resolve()
        data_dir = base / "data"
        data_dir.mkdir(parents=True)
        (data_dir / "domains").write_text(f"{DOMAIN}\n")
        config = base / "mailtwist.toml"
        listen = "\n".join(
            f'{role} = "{"tcp:0:interface=127.0.0.1" if role == "smtp" else "none"}"'
            for role in ROLES)
        config.write_text(f'data_dir = "{data_dir}"\nhostname = "mx.example.test"\n'
                          f"bcrypt_rounds = 4\n[listen]\n{listen}\n")
        env = dict(os.environ, PYTHONPATH=str(root))
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile", "", "mailtwist", "--config", str(config)],
            cwd=str(base), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait)
        self.addCleanup(lambda: proc.poll() is None and proc.terminate())
        output = ""

        def wait_for(text: str) -> None:
            nonlocal output
            deadline = time.monotonic() + 60
            while text not in output and time.monotonic() < deadline:
                if select.select([proc.stdout], [], [], 1)[0]:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output += chunk.decode("utf-8", "replace")
            self.assertIn(text, output)

        wait_for(" listening on ")
        pid_path = data_dir / PID_FILE
        for _ in range(100):
            if pid_path.exists():
                break
            time.sleep(0.05)
        self.assertEqual(pid_path.read_text().strip(), str(proc.pid))

        config.write_text(config.read_text() + "[smtp]\nmax_message_size = 1234567\n")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(cli.main(["reload", "--data-dir", str(data_dir)]), 0)
        wait_for("reloaded configuration from")
        config.write_text("[smtp\n")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(cli.main(["reload", "--data-dir", str(data_dir)]), 0)
        wait_for("reload refused: ")
        proc.terminate()
        # twistd ends by re-raising the signal it stopped on.
        self.assertIn(proc.wait(timeout=60), (0, -signal.SIGTERM))
        self.assertFalse(pid_path.exists())
