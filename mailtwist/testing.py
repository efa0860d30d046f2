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

A recorded SMTP session (``C:``/``S:`` lines as in the RFCs, or the
``->``/``<-`` transcript swaks prints) is replayed line by line with
:meth:`FilterTestServer.replay` or :func:`run_session`; the
:class:`SessionResult` pairs every client command with the reply this server
gave and the one recorded, so ``result.mismatches`` shows where it differs.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
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


@dataclass(frozen=True)
class Exchange:
    """One step of a replayed session: what the client sent (*command*: the
    command line, ``""`` for the greeting, ``"<message>"`` for the DATA content
    up to its final dot), the reply this server gave (*code* is None when the
    step was not sent because the session had ended or DATA was refused) and
    the *recorded* reply code, if the recording has one."""

    command: str
    code: int | None
    enhanced: str | None
    text: str
    recorded: int | None


@dataclass
class SessionResult:
    """A replayed session: every :class:`Exchange` in order, and the mail
    stored, queued and quarantined afterwards (as in :class:`SendResult`)."""

    exchanges: list[Exchange]
    stored: dict[str, list[StoredMessage]] = field(default_factory=dict)
    queued: list[QueuedMessage] = field(default_factory=list)
    quarantined: list[QuarantinedMessage] = field(default_factory=list)

    @property
    def codes(self) -> list[int | None]:
        """The reply codes, one per exchange (the greeting first)."""
        return [e.code for e in self.exchanges]

    @property
    def mismatches(self) -> list[Exchange]:
        """The exchanges whose reply code differs from the recorded one."""
        return [e for e in self.exchanges if e.recorded is not None and e.recorded != e.code]

    def reply_to(self, command: str) -> Exchange:
        """The first exchange whose command starts with *command* (any case),
        e.g. ``"RCPT"`` or ``"<message>"``; KeyError if there is none."""
        for e in self.exchanges:
            if e.command.upper().startswith(command.upper()):
                return e
        raise KeyError(f"no {command!r} in the replayed session")


@dataclass
class _Step:
    command: str
    lines: list[str]
    recorded: int | None = None


_CLIENT = (re.compile(r"^C: ?(.*)$"), re.compile(r"^ ?-> ?(.*)$"))
_SERVER = (re.compile(r"^S: ?(.*)$"), re.compile(r"^ ?<(?:-|\*\*) *(.*)$"))
_REPLY = re.compile(r"^(\d{3})([ -]|$)")


def parse_session(transcript: str | bytes) -> list[_Step]:
    """The steps of a recorded SMTP session: client lines (``C: `` or swaks'
    `` -> ``) grouped into commands and DATA content, each with the code of
    its recorded reply (``S: `` or swaks' ``<- ``/``<** ``).  Blank lines and
    swaks' ``===`` notes are skipped; anything else is a ValueError naming
    the line, and so are TLS lines (``~>``, ``<~``), which cannot be replayed."""
    if isinstance(transcript, bytes):
        transcript = transcript.decode("utf-8", "surrogateescape")
    greeting = _Step("", [])
    steps = [greeting]
    waiting = [greeting]  # steps whose recorded reply is still to come
    message: _Step | None = None
    for number, raw in enumerate(transcript.split("\n"), 1):  # not splitlines(): \f is data
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith(("===", "***")):
            continue
        if line.lstrip().startswith(("~>", "<~")):
            raise ValueError(f"line {number}: TLS lines cannot be replayed: {line!r}")
        client = next((m for m in (p.match(line) for p in _CLIENT) if m), None)
        if client is not None:
            text = client.group(1)
            if message is not None:
                message.lines.append(text)
                if text == ".":
                    message = None
                continue
            step = _Step(text, [text])
            steps.append(step)
            waiting.append(step)
            verb = text.split(" ", 1)[0].upper()
            if verb == "STARTTLS":
                raise ValueError(f"line {number}: STARTTLS cannot be replayed in plain text")
            if verb == "DATA":
                message = _Step("<message>", [])
                steps.append(message)
                waiting.append(message)
            continue
        server = next((m for m in (p.match(line) for p in _SERVER) if m), None)
        if server is None:
            raise ValueError(f"line {number}: neither a client nor a server line: {line!r}")
        reply = _REPLY.match(server.group(1))
        if reply is None:
            raise ValueError(f"line {number}: not an SMTP reply: {line!r}")
        if reply.group(2) != "-" and waiting:
            waiting.pop(0).recorded = int(reply.group(1))
    if message is not None:
        raise ValueError("the DATA content has no final '.' line")
    return steps


def _read_reply(reader) -> tuple[int, str | None, str] | None:
    """One (possibly multi-line) reply, split; None when the server closed."""
    texts = []
    while True:
        line = reader.readline()
        if not line:
            return None
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        texts.append(line[4:])
        if line[3:4] != "-":
            return _split_reply(int(line[:3]), "\n".join(texts))


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
             login: str | None = None, starttls: bool = False) -> defer.Deferred:
        """One SMTP session (STARTTLS first if *starttls*, then AUTH as *login* if
        given); fires with a SendResult whose ``stored`` lists every account's
        messages afterwards.  The server's certificate is not verified."""
        return deferToThread(self._send_and_read, message, sender, list(recipients), helo,
                             login, starttls)

    def _send_and_read(self, *args) -> SendResult:
        result = self._send_blocking(*args)
        result.stored = {a: self.stored(a) for a in self.accounts}
        result.queued = self.queued()
        result.quarantined = self.quarantined()
        return result

    def _send_blocking(self, message: bytes, sender: str, recipients: list[str], helo: str,
                       login: str | None, starttls: bool = False) -> SendResult:
        client = smtplib.SMTP(timeout=30)
        try:
            code, text = client.connect("127.0.0.1", self.port)
            if code != 220:
                return SendResult("connect", *_split_reply(code, text))
            code, text = client.ehlo(helo)
            if code != 250:
                return SendResult("helo", *_split_reply(code, text))
            if starttls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # the test server's self-signed one
                client._host = "127.0.0.1"  # smtplib's SNI name, set only by its __init__
                client.starttls(context=context)
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

    def replay(self, transcript: str | bytes) -> defer.Deferred:
        """Replay a recorded SMTP session (see :func:`parse_session`) on one
        connection, one step at a time; fires with a :class:`SessionResult`.
        The DATA content is sent only after a 354, and nothing is sent after
        the server closed the connection (a 421, or QUIT)."""
        steps = parse_session(transcript)
        return deferToThread(self._replay_and_read, steps)

    def _replay_and_read(self, steps: list[_Step]) -> SessionResult:
        result = SessionResult(self._replay_blocking(steps))
        result.stored = {a: self.stored(a) for a in self.accounts}
        result.queued = self.queued()
        result.quarantined = self.quarantined()
        return result

    def _replay_blocking(self, steps: list[_Step]) -> list[Exchange]:
        exchanges = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock, \
                sock.makefile("rb") as reader:
            open_, last = True, None
            for step in steps:
                sendable = open_ and (step.command != "<message>" or last == 354)
                if not sendable:
                    exchanges.append(Exchange(step.command, None, None, "", step.recorded))
                    continue
                if step.lines:
                    sock.sendall(b"".join(line.encode("utf-8", "surrogateescape") + b"\r\n"
                                          for line in step.lines))
                reply = _read_reply(reader)
                if reply is None:
                    open_ = False
                    exchanges.append(Exchange(step.command, None, None, "", step.recorded))
                    continue
                code, enhanced, text = reply
                last = code
                exchanges.append(Exchange(step.command, code, enhanced, text, step.recorded))
                if code == 421 or step.command.upper() == "QUIT":
                    open_ = False
        return exchanges

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


@defer.inlineCallbacks
def run_session(testcase, filters: Sequence[object], transcript: str | bytes,
                role: str = "smtp", **kwargs):
    """Start a FilterTestServer with *filters*, replay the recorded SMTP
    session *transcript*; fires with a SessionResult."""
    parse_session(transcript)  # a bad recording fails before a server starts
    server = yield FilterTestServer(testcase, filters, role=role, **kwargs).start()
    result = yield server.replay(transcript)
    return result
