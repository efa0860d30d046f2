"""Shared test fixtures: the real service on 127.0.0.1 port 0 with a temp data dir."""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from mailtwist.config import ROLES, ConfigError, load_config
from mailtwist.filters import chain as chain_module
from mailtwist.tap import MailService, build_service

DOMAIN = "example.test"
PASSWORD = "correct horse battery staple"
SERVED_ROLES = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")


def client_tls_context() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ServerMixin:
    """Starts mailtwist for a test and stops it afterwards."""

    server: MailService

    @defer.inlineCallbacks
    def start_server(self, accounts=("alice", "bob"), **overrides):
        self.data_dir = Path(self.mktemp()).resolve()
        settings = {
            "data_dir": str(self.data_dir),
            "hostname": "mx.example.test",
            "bcrypt_rounds": 4,
            "listen": {role: ["tcp:0:interface=127.0.0.1"] if role in SERVED_ROLES else "none"
                       for role in ROLES},
            "auth": {"failure_delay": 0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "domains").write_text(f"{DOMAIN}\n")
        self.config = load_config(None, settings)
        self.server = build_service(self.config, reactor)
        self.directory = self.server.directory
        for name in accounts:
            self.directory.add_account(f"{name}@{DOMAIN}", PASSWORD)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        for listeners in self.server.listeners.values():
            for listener in listeners:
                yield listener.listening
        return self.server

    def port(self, role: str) -> int:
        return self.server.port_of(role)

    def maildir_files(self, account: str, folder_dir: str = "") -> list[Path]:
        """Message files of *account* (INBOX, or the '.Folder' dir given), new and cur."""
        base = self.server.store.path_for(account) / folder_dir
        return sorted(p for sub in ("new", "cur") if (base / sub).is_dir()
                      for p in (base / sub).iterdir())

    def in_thread(self, f, *args, **kwargs) -> defer.Deferred:
        return deferToThread(f, *args, **kwargs)


def raw_exchange(port: int, chunks: list[bytes], timeout: float = 5.0) -> bytes:
    """Send each chunk on one plain TCP connection and return all that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = bytearray(sock.recv(4096))
        for chunk in chunks:
            sock.sendall(chunk)
            received += read_some(sock)
        return bytes(received)


def read_some(sock: socket.socket, wait: float = 0.5) -> bytes:
    """Whatever arrives until the peer is quiet for *wait* seconds or closes."""
    data = bytearray()
    sock.settimeout(wait)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, TimeoutError):
        pass
    return bytes(data)


def require_program(testcase, name: str) -> str:
    path = shutil.which(name)
    if path is None:
        testcase.skipTest(f"{name} is not installed (.ci/run installs it)")
    return path


def read_line(sock: socket.socket) -> bytes:
    """One CRLF line, read byte by byte so nothing is buffered past it."""
    line = bytearray()
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def record_peak(factory, measure) -> list[int]:
    """Wrap *factory*'s sessions so every dataReceived records *measure(session)*.

    A TLS listener's factory is unwrapped to the protocol factory behind it."""
    factory = getattr(factory, "wrappedFactory", factory)
    peaks: list[int] = []
    build = factory.buildProtocol

    def buildProtocol(addr):
        session = build(addr)
        received = session.dataReceived

        def dataReceived(data):
            received(data)
            peaks.append(measure(session))
        session.dataReceived = dataReceived
        peaks.append(0)
        return session
    factory.buildProtocol = buildProtocol
    return peaks


class InlineReactor(Clock):
    """A Clock that also runs callFromThread calls at once."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


class InlineThreadPool:
    """Runs deferToThreadPool work synchronously (bcrypt at 4 rounds is quick)."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def capture_chain_log(testcase) -> list[dict]:
    """The events the filter chain logs for the rest of *testcase*."""
    events: list[dict] = []
    testcase.patch(chain_module, "log", Logger(observer=events.append))
    return events


def logged_text(events: list[dict]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def output_until(proc, done, timeout: float = 60) -> str:
    """What *proc* writes to its stdout pipe until ``done(output)``, EOF or *timeout*."""
    output, deadline = "", time.monotonic() + timeout
    while not done(output) and time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], 1)[0]:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode("utf-8", "replace")
        if not chunk:
            break
        output += chunk
    return output


def assert_one_line_config_errors(testcase, build, cases: dict) -> None:
    """Each ``build(settings)`` of *cases* raises a one-line ConfigError starting
    with its key."""
    for expected, settings in cases.items():
        with testcase.assertRaises(ConfigError) as caught:
            build(settings)
        message = str(caught.exception)
        testcase.assertTrue(message.startswith(expected), message)
        testcase.assertNotIn("\n", message)
