"""Testing filters against the real pipeline, for plugin authors' trial tests.

:class:`FilterTestServer` starts the real mailtwist service on 127.0.0.1 (port 0,
a temporary data directory from the test case) with the given filters enabled
for one listener role, sends with the stdlib's smtplib from a thread, and reads
back what was stored.  :func:`run_message` does it all for one message::

    from twisted.trial import unittest
    from mailtwist.testing import run_message

    class MyFilterTests(unittest.TestCase):
        async def test_rejects(self):
            result = await run_message(self, [MyFilter()], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
            self.assertEqual((result.code, result.enhanced), (550, "5.7.1"))
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mailtwist.config import ROLES, load_config
from mailtwist.filters.chain import DEFAULT_TIMEOUT, FilterChain
from mailtwist.interfaces import IFilter, IFilterFactory

DOMAIN = "example.test"
PASSWORD = "test password"


@dataclass(frozen=True)
class StoredMessage:
    """One message file: its folder, Maildir flag letters and content (LF endings)."""

    folder: str
    flags: str
    content: bytes


@dataclass
class SendResult:
    """How the server answered: *stage* is where the exchange ended ("connect",
    "helo", "auth", "mail", "rcpt" or "data") and *code*/*enhanced*/*text* that reply."""

    stage: str
    code: int
    enhanced: str | None
    text: str
    rcpt_replies: list[tuple[int, str]] = field(default_factory=list)
    stored: dict[str, list[StoredMessage]] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.stage == "data" and self.code == 250


def _split_reply(code: int, message: bytes | str) -> tuple[int, str | None, str]:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return code, first, rest
    return code, None, text


def _filter_objects(filters: Iterable[object]) -> list[IFilter]:
    result = []
    for flt in filters:
        if IFilterFactory.providedBy(flt):
            flt = flt.build({})
        if not IFilter.providedBy(flt):
            raise TypeError(f"{flt!r} provides neither IFilter nor IFilterFactory")
        result.append(flt)
    return result


class FilterTestServer:
    """The real service with *filters* (IFilter objects, or IFilterFactory objects
    built with default settings) on one SMTP *role*, for one trial test.

    With ``filters=None`` the filters come from ``config["filters"]`` instead,
    exactly as from a ``[filters]`` table of mailtwist.toml.  *config* holds
    further mailtwist.toml keys.
    """

    def __init__(self, testcase, filters: Sequence[object] | None = (), role: str = "smtp",
                 accounts: Sequence[str] = ("alice", "bob"), timeout: float = DEFAULT_TIMEOUT,
                 clock=None, config: Mapping[str, Any] | None = None) -> None:
        self.testcase = testcase
        self.role = role
        self.accounts = [f"{a}@{DOMAIN}" if "@" not in a else a for a in accounts]
        self.chain = (None if filters is None else
                      FilterChain(_filter_objects(filters), timeout=timeout, clock=clock))
        self.settings = dict(config or {})
        self.server = None

    @defer.inlineCallbacks
    def start(self):
        """Start listening; fires with self.  Stopped by the test case's cleanup."""
        from twisted.internet import reactor

        from mailtwist.tap import build_service

        self.data_dir = Path(self.testcase.mktemp()).resolve()
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "domains").write_text(f"{DOMAIN}\n")
        settings = {
            "data_dir": str(self.data_dir), "hostname": "mx.example.test",
            "bcrypt_rounds": 4, "allow_plaintext_auth": True,
            "auth": {"failure_delay": 0},
            "listen": {r: ["tcp:0:interface=127.0.0.1"] if r == self.role else "none"
                       for r in ROLES},
            **self.settings,
        }
        self.config = load_config(None, settings)
        chains = {self.role: self.chain} if self.chain is not None else None
        self.server = build_service(self.config, reactor, filters=chains)
        for account in self.accounts:
            self.server.directory.add_account(account, PASSWORD)
        self.server.startService()
        self.testcase.addCleanup(self.server.stopService)
        yield self.server.listeners[self.role][0].listening
        return self

    @property
    def port(self) -> int:
        return self.server.port_of(self.role)

    def send(self, message: bytes, sender: str = f"sender@{DOMAIN}",
             recipients: Sequence[str] = (f"alice@{DOMAIN}",), helo: str = "client.example.test",
             login: str | None = None) -> defer.Deferred:
        """One SMTP session (AUTH as *login* first if given); fires with a SendResult
        whose ``stored`` lists every account's messages afterwards."""
        return deferToThread(self._send_and_read, message, sender, list(recipients), helo,
                             login)

    def _send_and_read(self, *args) -> SendResult:
        result = self._send_blocking(*args)
        result.stored = {a: self.stored(a) for a in self.accounts}
        return result

    def _send_blocking(self, message: bytes, sender: str, recipients: list[str], helo: str,
                       login: str | None) -> SendResult:
        client = smtplib.SMTP(timeout=30)
        try:
            code, text = client.connect("127.0.0.1", self.port)
            if code != 220:
                return SendResult("connect", *_split_reply(code, text))
            code, text = client.ehlo(helo)
            if code != 250:
                return SendResult("helo", *_split_reply(code, text))
            if login is not None:
                try:
                    code, text = client.login(login, PASSWORD)
                except smtplib.SMTPAuthenticationError as e:
                    return SendResult("auth", *_split_reply(e.smtp_code, e.smtp_error))
            code, text = client.mail(sender)
            if code != 250:
                return SendResult("mail", *_split_reply(code, text))
            replies = [client.rcpt(r) for r in recipients]
            accepted = [r for r in replies if r[0] in (250, 251)]
            if not accepted:
                code, text = replies[-1]
                return SendResult("rcpt", *_split_reply(code, text), rcpt_replies=replies)
            code, text = client.data(message)
            result = SendResult("data", *_split_reply(code, text), rcpt_replies=replies)
            client.quit()
            return result
        except smtplib.SMTPDataError as e:
            return SendResult("data", *_split_reply(e.smtp_code, e.smtp_error))
        finally:
            client.close()

    def stored(self, account: str) -> list[StoredMessage]:
        """Every message in every folder of *account* (small test mailboxes only)."""
        maildir = self.server.store.maildir(f"{account}@{DOMAIN}" if "@" not in account
                                            else account)
        result = []
        for folder in maildir.list_folders():
            path = maildir.folder_path(folder)
            for sub in ("new", "cur"):
                directory = path / sub
                if not directory.is_dir():
                    continue
                for file in sorted(directory.iterdir()):
                    flags = file.name.partition(":2,")[2]
                    result.append(StoredMessage(folder, flags, file.read_bytes()))
        return result


@defer.inlineCallbacks
def run_message(testcase, filters: Sequence[object], message: bytes,
                sender: str = f"sender@{DOMAIN}",
                recipients: Sequence[str] = (f"alice@{DOMAIN}",), role: str = "smtp",
                **kwargs):
    """Start a FilterTestServer with *filters*, send *message*; fires with a SendResult."""
    server = yield FilterTestServer(testcase, filters, role=role, **kwargs).start()
    result = yield server.send(message, sender, recipients)
    return result
