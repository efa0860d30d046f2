"""The SMTP client: one connection to one remote host, one or more transactions.

twisted.mail's ``ESMTPClient`` sends one command at a time (no PIPELINING),
has no DSN parameters, stuffs dots per chunk and reports per-recipient replies
only through a callback with the whole transaction; so the conversation is
ours, written as a coroutine over :class:`ClientProtocol`, which only turns
bytes into :class:`~mailtwist.outbound.wire.Reply` objects.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailtwist.queue.envelope import DELIVERED, FAILED, PENDING, Recipient
from mailtwist.outbound.wire import (
    ProtocolError,
    Reply,
    ReplyParser,
    dot_stuff,
    parse_ehlo,
    xtext_encode,
)

TLS_MODES = ("none", "may", "encrypt", "verify")


class HostError(Exception):
    """This host cannot take the mail now (or ever, if *permanent*); the
    recipients it concerns keep this as their last error."""

    def __init__(self, text: str, enhanced: str = "4.4.2", reply: Reply | None = None,
                 permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced
        self.reply = reply
        self.permanent = permanent


@dataclass
class Outcome:
    """What became of one recipient in one delivery attempt."""

    status: str
    code: int | None
    enhanced: str
    text: str
    remote_mta: str | None = None
    dsn_relayed: bool = False

    @classmethod
    def from_reply(cls, reply: Reply, status: str, host: str | None) -> Outcome:
        default = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}[reply.code // 100]
        return cls(status, reply.code, reply.enhanced or default, str(reply), host)


@dataclass
class SessionSettings:
    """How to talk to one host."""

    helo_name: str
    tls_mode: str = "may"
    tls_creator: Callable[[str], Any] | None = None
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass
class OutgoingMessage:
    """One transaction's worth: a sender, some recipients of one route, the content."""

    sender: str
    recipients: list[Recipient]
    message: bytes
    ret: str | None = None
    envid: str | None = None
    payload: bytes | None = field(default=None, repr=False)

    def data(self) -> bytes:
        if self.payload is None:
            self.payload = dot_stuff(self.message)
        return self.payload


class ClientProtocol(protocol.Protocol):
    """Bytes in, replies out; the conversation awaits :meth:`reply`."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.waiting: deque[defer.Deferred] = deque()
        self.lost: Failure | None = None
        self.secure = False

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ProtocolError as e:
            self._fail_all(Failure(e))
            self.transport.abortConnection()
            return
        for reply in replies:
            if self.waiting:
                self.waiting.popleft().callback(reply)
            else:
                self.replies.append(reply)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        self._fail_all(reason)

    def _fail_all(self, reason: Failure) -> None:
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            d.errback(reason)

    def reply(self, timeout: float) -> defer.Deferred:
        """The next reply; fails on timeout (and drops the connection) or loss."""
        if self.replies:
            return defer.succeed(self.replies.popleft())
        if self.lost is not None:
            return defer.fail(self.lost)

        def cancel(d: defer.Deferred) -> None:
            if d in self.waiting:
                self.waiting.remove(d)
            if self.transport is not None:
                self.transport.abortConnection()

        d = defer.Deferred(cancel)
        self.waiting.append(d)
        d.addTimeout(timeout, self.clock)
        return d

    def send(self, *lines: bytes) -> None:
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def close(self) -> None:
        if self.transport is not None and self.lost is None:
            self.transport.loseConnection()


def _describe(failure: Failure | BaseException) -> str:
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    if isinstance(error, ProtocolError):
        return f"protocol error: {error}"
    text = str(error) or error.__class__.__name__
    return text.replace("\n", " ")[:300]


class Session:
    """One conversation with one host; fills :attr:`results` as replies come in,
    so whatever was settled before a failure is kept."""

    def __init__(self, proto: ClientProtocol, host: str, settings: SessionSettings) -> None:
        self.proto = proto
        self.host = host
        self.settings = settings
        self.extensions: dict[str, str] = {}
        self.results: dict[str, Outcome] = {}
        self.stage = "greeting"

    async def _reply(self, timeout: float | None = None) -> Reply:
        try:
            reply = await self.proto.reply(timeout or self.settings.command_timeout)
        except Exception as e:
            raise HostError(f"lost connection with {self.host} while {self.stage}: "
                            f"{_describe(e)}") from None
        if reply.code == 421:
            raise HostError(f"{self.host} said: {reply}", reply.enhanced or "4.4.2", reply)
        return reply

    async def _command(self, line: bytes, stage: str) -> Reply:
        self.stage = stage
        self.proto.send(line)
        return await self._reply()

    async def run(self, messages: list[OutgoingMessage]) -> dict[str, Outcome]:
        """Greet, secure, log in, then run each transaction; HostError when the host
        cannot be used (results of earlier transactions stay in :attr:`results`)."""
        greeting = await self._reply()
        if greeting.code != 220:
            raise HostError(f"host {self.host} refused to talk to me: {greeting}",
                            greeting.enhanced or "4.4.2", greeting)
        self.proto.secure = self.settings.implicit_tls
        await self._ehlo()
        await self._starttls()
        if self.settings.auth is not None:
            await self._login(*self.settings.auth)
        for message in messages:
            await self._transaction(message)
        self.stage = "quitting"
        self.proto.send(b"QUIT")
        self.proto.close()
        return self.results

    async def _ehlo(self, stage: str = "greeting") -> None:
        name = self.settings.helo_name.encode("ascii")
        reply = await self._command(b"EHLO " + name, stage)
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            remote_name = reply.lines[0].split(" ")[0].lower()
        else:
            reply = await self._command(b"HELO " + name, "greeting")
            if reply.code != 250:
                raise HostError(f"host {self.host} refused HELO: {reply}",
                                reply.enhanced or "4.4.2", reply)
            self.extensions = {}
            remote_name = reply.lines[0].split(" ")[0].lower()
        if remote_name == self.settings.helo_name.lower():
            raise HostError(f"mail for {self.host} loops back to myself", "5.4.6",
                            permanent=True)

    async def _starttls(self) -> None:
        mode = self.settings.tls_mode
        if self.proto.secure or mode == "none":
            return
        if "STARTTLS" not in self.extensions:
            if mode in ("encrypt", "verify"):
                raise HostError(f"TLS is required, but {self.host} does not offer STARTTLS",
                                "4.7.4")
            return
        reply = await self._command(b"STARTTLS", "starting TLS")
        if reply.code != 220:
            if mode in ("encrypt", "verify"):
                raise HostError(f"{self.host} refused STARTTLS: {reply}", "4.7.4", reply)
            return
        self.proto.transport.startTLS(self.settings.tls_creator(self.host))
        self.proto.secure = True
        await self._ehlo("in the TLS handshake")

    async def _login(self, user: str, password: str) -> None:
        if not self.proto.secure:
            raise HostError(f"not sending the relay password to {self.host} without TLS",
                            "4.7.10")
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or not mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await self._command(f"AUTH PLAIN {token}".encode(), "authenticating")
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN", "authenticating")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user.encode()), "authenticating")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password.encode()),
                                            "authenticating")
        else:
            raise HostError(f"{self.host} offers no AUTH mechanism we know "
                            f"({' '.join(mechanisms)})", "4.7.0")
        if reply.code != 235:
            raise HostError(f"authentication with {self.host} failed: {reply}", "4.7.0", reply)

    def _mail_line(self, message: OutgoingMessage) -> bytes:
        ext = self.extensions
        line = f"MAIL FROM:<{message.sender}>"
        if "SIZE" in ext:
            line += f" SIZE={len(message.message)}"
        if "8BITMIME" in ext and not message.message.isascii():
            line += " BODY=8BITMIME"
        if "SMTPUTF8" in ext and not _addresses_ascii(message):
            line += " SMTPUTF8"
        if "DSN" in ext:
            if message.ret:
                line += f" RET={message.ret}"
            if message.envid:
                line += f" ENVID={xtext_encode(message.envid)}"
        return line.encode("utf-8")

    def _rcpt_line(self, recipient: Recipient) -> bytes:
        line = f"RCPT TO:<{recipient.address}>"
        if "DSN" in self.extensions:
            if recipient.notify:
                line += f" NOTIFY={','.join(recipient.notify)}"
            if recipient.orcpt:
                kind, _, address = recipient.orcpt.partition(";")
                line += f" ORCPT={kind};{xtext_encode(address)}"
        return line.encode("utf-8")

    def _settle(self, recipients: list[Recipient], reply: Reply, status: str) -> None:
        for r in recipients:
            self.results[r.address] = Outcome.from_reply(reply, status, self.host)

    def _fail(self, recipients: list[Recipient], text: str, enhanced: str) -> None:
        for r in recipients:
            self.results[r.address] = Outcome(FAILED, None, enhanced, text, self.host)

    async def _transaction(self, message: OutgoingMessage) -> None:
        ext = self.extensions
        rcpts = message.recipients
        size_limit = ext.get("SIZE", "")
        if size_limit.isdigit() and 0 < int(size_limit) < len(message.message):
            self._fail(rcpts, f"message size {len(message.message)} exceeds the limit "
                              f"{size_limit} of {self.host}", "5.3.4")
            return
        if not _addresses_ascii(message) and "SMTPUTF8" not in ext:
            self._fail(rcpts, f"{self.host} does not support SMTPUTF8, needed for "
                              "a non-ASCII address", "5.6.7")
            return
        lines = [self._mail_line(message)] + [self._rcpt_line(r) for r in rcpts]
        accepted: list[Recipient] = []
        self.stage = "sending MAIL FROM and RCPT TO"
        if "PIPELINING" in ext:
            self.proto.send(*lines, b"DATA")
            replies = [await self._reply() for _ in range(len(lines) + 1)]
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self._command(lines[0], "sending MAIL FROM")
            rcpt_replies, data_reply = [], None
            if mail_reply.code == 250:
                for line in lines[1:]:
                    rcpt_replies.append(await self._command(line, "sending RCPT TO"))
        if mail_reply.code != 250:
            if mail_reply.temporary:
                raise HostError(f"{self.host} said: {mail_reply}",
                                mail_reply.enhanced or "4.0.0", mail_reply)
            self._settle(rcpts, mail_reply, FAILED)
            return
        for recipient, reply in zip(rcpts, rcpt_replies):
            if reply.code in (250, 251):
                accepted.append(recipient)
            else:
                self._settle([recipient], reply, PENDING if reply.temporary else FAILED)
        if data_reply is None and accepted:
            data_reply = await self._command(b"DATA", "sending DATA")
        if data_reply is None:
            return
        if data_reply.code != 354:
            if accepted:
                self._settle(accepted, data_reply,
                             PENDING if data_reply.temporary else FAILED)
            return
        self.stage = "sending the message"
        if not accepted:
            self.proto.send(b".")
            await self._reply()
            return
        self.proto.transport.write(message.data())
        self.stage = "waiting for the end of data reply"
        final = await self._reply(self.settings.data_timeout)
        if final.positive:
            self._settle(accepted, final, DELIVERED)
            if "DSN" in ext:
                for r in accepted:
                    self.results[r.address].dsn_relayed = True
        else:
            self._settle(accepted, final, PENDING if final.temporary else FAILED)


def _addresses_ascii(message: OutgoingMessage) -> bool:
    return message.sender.isascii() and all(r.address.isascii() for r in message.recipients)
