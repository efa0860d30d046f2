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

The newer stages work the same way: ``outbound=[...]`` enables filters for the
outbound stage (send to a remote address with ``login=`` on the submission
role; ``result.queued`` shows what would leave, the queue runner is held),
``mailbox=[...]`` for IMAP mailbox events (:meth:`FilterTestServer.move` and
:meth:`FilterTestServer.copy` run a real imaplib session and fire once the
filters were told), and ``result.quarantined`` lists what a Quarantine
verdict kept back.
"""

from __future__ import annotations

import imaplib
import smtplib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mailtwist.config import ROLES, load_config
from mailtwist.filters.chain import DEFAULT_TIMEOUT, FilterChain
from mailtwist.interfaces import IFilter, IFilterFactory, MailboxEvent

DOMAIN = "example.test"
PASSWORD = "test password"


@dataclass(frozen=True)
class StoredMessage:
    """One message file: its folder, Maildir flag letters and content (LF endings)."""

    folder: str
    flags: str
    content: bytes


@dataclass(frozen=True)
class QueuedMessage:
    """One outbound spool entry: what would leave for remote recipients (after
    the outbound filters and DKIM signing)."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    content: bytes


@dataclass(frozen=True)
class QuarantinedMessage:
    """One quarantine entry (:class:`mailtwist.quarantine.QuarantineEntry` is
    *entry*) and the message kept."""

    id: str
    entry: Any
    content: bytes

    @property
    def reason(self) -> str:
        return self.entry.reason


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
    queued: list[QueuedMessage] = field(default_factory=list)
    quarantined: list[QuarantinedMessage] = field(default_factory=list)

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


def _record_events(chain: FilterChain) -> FilterChain:
    """Make *chain* remember the mailbox events it is told about (``events``)
    and the notifications it started (``running``)."""
    chain.events = []
    chain.running = []
    notify = chain.notify

    def recording_notify(event: MailboxEvent) -> defer.Deferred:
        chain.events.append(event)
        d = notify(event)
        chain.running.append(d)
        return d

    chain.notify = recording_notify
    return chain


class FilterTestServer:
    """The real service with *filters* (IFilter objects, or IFilterFactory objects
    built with default settings) on one SMTP *role*, for one trial test.

    *outbound* and *mailbox* enable filters for the outbound stage and for
    IMAP mailbox events (an IMAP listener is started too).  With
    ``filters=None`` the filters come from ``config["filters"]`` instead,
    exactly as from a ``[filters]`` table of mailtwist.toml.  *config* holds
    further mailtwist.toml keys.  The queue runner is held: mail for remote
    recipients stays in the spool (``SendResult.queued``).
    """

    def __init__(self, testcase, filters: Sequence[object] | None = (), role: str = "smtp",
                 accounts: Sequence[str] = ("alice", "bob"), timeout: float = DEFAULT_TIMEOUT,
                 clock=None, config: Mapping[str, Any] | None = None,
                 outbound: Sequence[object] | None = None,
                 mailbox: Sequence[object] | None = None) -> None:
        self.testcase = testcase
        self.role = role
        self.accounts = [f"{a}@{DOMAIN}" if "@" not in a else a for a in accounts]
        self.chain = (None if filters is None else
                      FilterChain(_filter_objects(filters), timeout=timeout, clock=clock))
        self.outbound_chain = (None if outbound is None else
                               FilterChain(_filter_objects(outbound), timeout=timeout,
                                           clock=clock))
        self.mailbox_chain = (None if mailbox is None else
                              FilterChain(_filter_objects(mailbox), timeout=timeout,
                                          clock=clock))
        self.with_imap = mailbox is not None or filters is None
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
            "listen": {r: ["tcp:0:interface=127.0.0.1"]
                       if r == self.role or (r == "imap" and self.with_imap) else "none"
                       for r in ROLES},
            **self.settings,
        }
        self.config = load_config(None, settings)
        chains = {self.role: self.chain} if self.chain is not None else {}
        if self.outbound_chain is not None:
            chains["outbound"] = self.outbound_chain
        if self.mailbox_chain is not None:
            chains["mailbox"] = self.mailbox_chain
        self.server = build_service(self.config, reactor, filters=chains)
        # the chain the IMAP listener tells (from config["filters"] with filters=None)
        self.mailbox_chain = _record_events(self.server.filter_chains["mailbox"])
        self.server.queue.disownServiceParent()  # held: remote mail stays in the spool
        for account in self.accounts:
            self.server.directory.add_account(account, PASSWORD)
        self.server.startService()
        self.testcase.addCleanup(self.server.stopService)
        for listeners in self.server.listeners.values():
            for listener in listeners:
                yield listener.listening
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
        result.queued = self.queued()
        result.quarantined = self.quarantined()
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

    def queued(self) -> list[QueuedMessage]:
        """Every entry of the outbound spool (blocking: call from a thread)."""
        spool = self.server.queue.spool
        result = []
        for entry_id in spool.ids():
            envelope = spool.load(entry_id)
            result.append(QueuedMessage(entry_id, envelope.sender,
                                        tuple(r.address for r in envelope.recipients),
                                        spool.read_message(entry_id)))
        return result

    def quarantined(self) -> list[QuarantinedMessage]:
        """Every quarantine entry (blocking: call from a thread)."""
        store = self.server.quarantine
        return [QuarantinedMessage(i, store.load(i), store.read_message(i))
                for i in store.ids()]

    @property
    def mailbox_events(self) -> list[MailboxEvent]:
        """The mailbox events the ``mailbox`` filters were told about, in order."""
        return list(self.mailbox_chain.events)

    def move(self, account: str, source: str, destination: str, uids: str = "1:*"
             ) -> defer.Deferred:
        """UID MOVE *uids* of *account* from *source* to *destination* with imaplib
        (creating *destination* if needed); fires with the tagged reply's text
        once the mailbox filters have finished with the events."""
        return self._imap(account, "MOVE", source, destination, uids)

    def copy(self, account: str, source: str, destination: str, uids: str = "1:*"
             ) -> defer.Deferred:
        """Like :meth:`move`, with UID COPY."""
        return self._imap(account, "COPY", source, destination, uids)

    @defer.inlineCallbacks
    def _imap(self, account: str, command: str, source: str, destination: str, uids: str):
        if "imap" not in self.server.listeners:
            raise RuntimeError("no IMAP listener: give FilterTestServer mailbox=[...]")
        address = f"{account}@{DOMAIN}" if "@" not in account else account
        text = yield deferToThread(self._imap_blocking, address, command, source,
                                   destination, uids)
        yield defer.DeferredList(list(self.mailbox_chain.running))
        return text

    def _imap_blocking(self, address: str, command: str, source: str, destination: str,
                       uids: str) -> str:
        client = imaplib.IMAP4("127.0.0.1", self.server.port_of("imap"))
        try:
            client.login(address, PASSWORD)
            client.create(destination)  # NO when it exists: fine
            status, _ = client.select(source)
            if status != "OK":
                raise RuntimeError(f"cannot select {source}")
            # _simple_command returns the tagged reply's text (uid() would not)
            status, data = client._simple_command("UID", command, uids,
                                                  client._quote(destination))
            if status != "OK":
                raise RuntimeError(f"UID {command} failed: {data!r}")
            client.logout()
            return (data[-1] or b"").decode("utf-8", "replace") if data else ""
        finally:
            try:
                client.shutdown()
            except OSError:
                pass

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
