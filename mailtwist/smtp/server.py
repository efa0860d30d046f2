"""The SMTP server: twisted.mail's ESMTP, fed by our sans-IO framer.

Twisted's ESMTP parses with ``LineOnlyReceiver``, which executes plaintext
pipelined after STARTTLS inside TLS, leaves DATA mode on an overlong line,
answers pipelined commands out of order when validation is asynchronous and
turns every end-of-data failure into 550. So this subclass keeps ESMTP's
connection bookkeeping, TLS start and cred login, but takes bytes through
:class:`~mailtwist.smtp.wire.SMTPFramer` and handles one command at a time:
while a command waits on a Deferred (login, delivery) no further input is
interpreted, so replies always come in order and STARTTLS can drop the rest.

Who may send what where is :class:`~mailtwist.smtp.policy.SMTPPolicy`'s
business, not this module's.  The listener's filters
(:class:`~mailtwist.filters.chain.FilterChain`, docs/filters.md) are asked at
connect, HELO/EHLO, AUTH, MAIL, RCPT, end of DATA (before the durable write)
and per local copy; their Reject/TempFail replies go out as given.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Callable

from twisted.cred import credentials, error as cred_error
from twisted.internet import defer, protocol
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.smtp import ESMTP, rfc822date

from mailtwist import events
from mailtwist.delivery import DeliveryError, Mailbox
from mailtwist.filters.chain import FilterChain, StageResult
from mailtwist.dsn import (
    DSNParameterError,
    ReportItem,
    build_report,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
)
from mailtwist.interfaces import (
    AddFlags,
    DeliveryTarget,
    Discard,
    FileInto,
    FilterSession,
    Quarantine,
    Redirect,
    Reject,
    TempFail,
)
from mailtwist.quarantine import QuarantinedCopy, QuarantineEntry, QuarantineStore
from mailtwist.queue.dispatch import header_section, received_count
from mailtwist.queue.envelope import Recipient
from mailtwist.limits import extend_timeout
from mailtwist.smtp.policy import PolicyReject, SMTPPolicy
from mailtwist.throttle import ensure_throttle, LoginThrottle, LoginThrottled
from mailtwist.smtp.wire import (
    Command,
    CommandTooLong,
    DataContent,
    DataEnd,
    ParseError,
    SMTPFramer,
    parse_mail_from,
    parse_rcpt_to,
    parse_size_param,
    sanitize_header_text,
)

log = Logger()

MAX_PAUSED_INPUT = 1024 * 1024


@dataclass
class Transaction:
    """State between MAIL and the end of DATA."""

    sender: str
    smtputf8: bool = False
    mailboxes: list[Mailbox] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    remote: list[Recipient] = field(default_factory=list)
    local_success: list[Recipient] = field(default_factory=list)
    ret: str | None = None
    envid: str | None = None
    content: bytearray = field(default_factory=bytearray)
    declared_size: int = 0
    too_big: bool = False
    discarded: bool = False
    discarded_recipients: int = 0


class MailtwistSMTP(ESMTP):
    """One SMTP session in one role (smtp, submission, submissions)."""

    _ending: tuple[Transaction, str | None] | None = None  # see reply()

    def __init__(self, factory: "SMTPFactory") -> None:
        super().__init__(contextFactory=factory.tls_context)
        self.factory = factory
        self.policy: SMTPPolicy = factory.policy
        limits = factory.config.smtp
        self.limits = limits
        self.timeout = limits.idle_timeout
        # Idle timer on the listener's clock; reset per complete command only,
        # DATA bytes extend it (mailtwist.limits.extend_timeout).
        self.callLater = factory.reactor.callLater
        self.min_data_rate = factory.config.limits.min_data_rate
        self.host = factory.config.hostname
        self.framer = SMTPFramer(limits.max_command_line, limits.max_data_line)
        self.transaction: Transaction | None = None
        self.user: str | None = None
        self.errors = 0
        self._busy = False
        self._paused = False
        self._auth_step: Callable[[bytes], object] | None = None
        self._login_user = b""
        self._quitting = False
        self._processing = False
        self._lost = False
        self.filters: FilterChain = factory.filters
        self.filter_session: FilterSession | None = None

    # -- connection ------------------------------------------------------

    @property
    def secure(self) -> bool:
        return self.factory.implicit_tls or self.startedTLS

    def connectionMade(self) -> None:
        # SMTP.connectionMade would greet at once; the connect filters come first.
        self._helo = None
        self.setTimeout(self.timeout)
        if self.factory.implicit_tls:
            self.canStartTLS = False
        else:
            self.canStartTLS = ITLSTransport.providedBy(self.transport) and self.ctx is not None
        peer = self.transport.getPeer()
        self.filter_session = FilterSession(
            role=self.policy.role, peer_host=self._peer_host().decode("ascii", "replace"),
            peer_port=getattr(peer, "port", None), tls=self.secure)
        if not self.filters:
            self.sendCode(220, self.greeting())
            return
        self._busy = True
        d = self.filters.run("connect", self.filter_session)
        d.addCallback(self._connect_decided)
        d.addErrback(self._internal_error)
        d.addBoth(self._resume)

    def _connect_decided(self, result: StageResult) -> None:
        if result.refused:
            self._refuse(result.verdict)
            self._quitting = True
            self.transport.loseConnection()
            return
        self.sendCode(220, self.greeting())

    def connectionLost(self, reason) -> None:
        self._lost = True
        super().connectionLost(reason)

    # -- graceful shutdown (mailtwist/shutdown.py) -------------------------

    @property
    def in_transaction(self) -> bool:
        """MAIL given and the end of DATA not yet answered (or a reply pending):
        shutdown lets this finish, within its bound."""
        return not self._lost and (self.transaction is not None or self._busy)

    def shutdown_notice(self) -> None:
        """The server is stopping: 421 4.3.2 and close (RFC 5321 3.8)."""
        if self._lost or self.transport is None or self.transport.disconnecting:
            return
        self._quitting = True
        self.reply(421, "4.3.2", f"{self.factory.config.hostname} Service shutting down, "
                                 "closing transmission channel")
        self.transport.loseConnection()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP mailtwist"

    def reply(self, code: int, enhanced: str | None, text: str | list[str]) -> None:
        if self._ending is not None:  # the reply that ends a transaction: one event
            self._transaction_event(code, enhanced)
        lines = [text] if isinstance(text, str) else text
        prefix = f"{enhanced} " if enhanced else ""
        body = b"\n".join((prefix + line).encode("utf-8", "replace") for line in lines)
        self.sendCode(code, body)

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.factory.config.hostname} Error: timeout exceeded")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.framer.receive_data(data)
        self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while not self._busy and not self._quitting:
                event = self.framer.next_event()
                if event is None:
                    break
                if not isinstance(event, DataContent):
                    self.resetTimeout()
                result = self._handle(event)
                if isinstance(result, defer.Deferred):
                    self._busy = True
                    result.addErrback(self._internal_error)
                    result.addBoth(self._resume)
        finally:
            self._processing = False
        if self._busy and not self._paused and self.framer.buffered > MAX_PAUSED_INPUT:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self, _: object) -> None:
        self._busy = False
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        # A Deferred that fired at once resumes the loop already running.
        if (not self._processing and self.transport is not None
                and not self.transport.disconnecting):
            self._process()

    def _internal_error(self, failure) -> None:
        log.failure("internal error in SMTP session", failure)
        self.reply(451, "4.3.0", "Error: local error in processing")

    def _handle(self, event: object) -> defer.Deferred | None:
        if isinstance(event, Command):
            if event.bare_lf or b"\r" in event.line or b"\0" in event.line:
                self._auth_step = None
                self._error(500, "5.5.2", "Error: bare <CR>, bare <LF> or NUL in command; "
                                          "lines must end with <CR><LF>")
                return None
            if self._auth_step is not None:
                return self._auth_response(event.line)
            return self._command(event.line)
        if isinstance(event, CommandTooLong):
            if self._auth_step is not None:
                self._auth_step = None
            if event.flood:
                self.reply(421, "4.7.0", f"{self.factory.config.hostname} Error: line too "
                                         "long; closing connection")
                self._quitting = True
                self.transport.loseConnection()
                return None
            self._error(500, "5.5.2", "Error: line too long")
            return None
        if isinstance(event, DataContent):
            # Credit per byte, not a reset: a byte a minute cannot hold DATA open.
            extend_timeout(self, len(event.data) / self.min_data_rate)
            self._data_content(event.data)
            return None
        if isinstance(event, DataEnd):
            return self._data_end(event)
        raise AssertionError(f"unexpected event {event!r}")

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A client error: counted, and too many of them end the session."""
        self.errors += 1
        if self.errors > self.limits.max_errors:
            self.reply(421, "4.7.0", f"{self.factory.config.hostname} Error: too many errors")
            self._quitting = True
            self.transport.loseConnection()
            return
        self.reply(code, enhanced, text)

    def _command(self, line: bytes) -> defer.Deferred | None:
        verb, _, rest = line.strip().partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        handler = getattr(self, "smtp_" + name, None) if name.isalpha() else None
        if handler is None:
            if name in ("GET", "POST", "HEAD", "CONNECT", "PUT"):
                self.reply(421, "4.7.0", "This is an SMTP server, not a web proxy")
                self._quitting = True
                self.transport.loseConnection()
                return None
            self._error(500, "5.5.2", "Error: command not recognized")
            return None
        return handler(rest.strip())

    def reset_transaction(self) -> None:
        self.transaction = None
        if self.filter_session is not None:
            self.filter_session.reset_envelope()

    # -- filters -----------------------------------------------------------

    def _filtered(self, stage: str, *args: object,
                  then: Callable[[StageResult], object]) -> defer.Deferred | None:
        """Run the filters of *stage*, then *then* with their result (at once,
        without a Deferred, when the listener has no filters)."""
        if not self.filters:
            then(StageResult())
            return None
        d = self.filters.run(stage, self.filter_session, *args)
        d.addCallback(then)
        return d

    def _refuse(self, verdict: Reject | TempFail) -> None:
        self.reply(verdict.code, verdict.enhanced, verdict.text)

    # -- greeting and session commands -------------------------------------

    def smtp_HELO(self, rest: bytes) -> defer.Deferred | None:
        if not rest:
            self._error(501, "5.5.4", "Syntax: HELO hostname")
            return None
        return self._greet(rest, lambda: self.sendCode(250, self.host))

    def smtp_EHLO(self, rest: bytes) -> defer.Deferred | None:
        if not rest:
            self._error(501, "5.5.4", "Syntax: EHLO hostname")
            return None
        return self._greet(rest, self._ehlo_reply)

    def _greet(self, rest: bytes, answer: Callable[[], None]) -> defer.Deferred | None:
        name = sanitize_header_text(rest)

        def decided(result: StageResult) -> None:
            if result.refused:
                self._refuse(result.verdict)
                return
            self._helo = (rest, self._peer_host())
            self.reset_transaction()
            self.filter_session.helo = name
            answer()

        return self._filtered("helo", name, then=decided)

    def _ehlo_reply(self) -> None:
        lines = [self.factory.config.hostname, "PIPELINING",
                 f"SIZE {self.limits.max_message_size}"]
        if self.canStartTLS and not self.startedTLS:
            lines.append("STARTTLS")
        if self._auth_available():
            lines.append("AUTH PLAIN LOGIN")
        if self.policy.offers_dsn:
            lines.append("DSN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        self.reply(250, None, lines)

    def _peer_host(self) -> bytes:
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", peer)).encode("ascii", "replace")

    def smtp_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, rest: bytes) -> None:
        if rest:
            self._error(501, "5.5.4", "Syntax: RSET")
            return
        self.reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def smtp_VRFY(self, rest: bytes) -> None:
        if not rest:
            self._error(501, "5.5.4", "Syntax: VRFY address")
            return
        self.reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, rest: bytes) -> None:
        self._error(502, "5.5.1", "Error: EXPN is not supported")

    def smtp_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0", "Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA RSET "
                                 "NOOP VRFY HELP QUIT; see RFC 5321")

    def smtp_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._quitting = True
        self.transport.loseConnection()

    # -- STARTTLS ----------------------------------------------------------

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if rest:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
        elif self.startedTLS or self.factory.implicit_tls:
            self._error(503, "5.5.1", "Error: TLS already active")
        elif not self.canStartTLS:
            self.reply(454, "4.7.0", "TLS not available due to local problem")
        else:
            self.reply(220, "2.0.0", "Ready to start TLS")
            dropped = self.framer.discard_buffer()
            if dropped:
                log.warn("discarded {n} bytes pipelined after STARTTLS from {peer}",
                         n=len(dropped), peer=self._peer_host())
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            self._helo = None
            self.reset_transaction()
            self.filter_session.tls = True
            self.filter_session.helo = None

    # -- AUTH (RFC 4954) ---------------------------------------------------

    def _auth_available(self) -> bool:
        return (self.policy.offers_auth and self.user is None
                and (self.secure or self.factory.config.allow_plaintext_auth))

    def smtp_AUTH(self, rest: bytes) -> None:
        if self._helo is None:
            self._error(503, "5.5.1", "Error: send EHLO first")
            return
        if not self.policy.offers_auth:
            self._error(503, "5.5.1", "Error: authentication not enabled on this port")
            return
        if self.user is not None:
            self._error(503, "5.5.1", "Error: already authenticated")
            return
        if not (self.secure or self.factory.config.allow_plaintext_auth):
            self._error(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return
        if self.transaction is not None:
            self._error(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism == b"PLAIN":
            self._auth_step = self._auth_plain
            if not initial:
                self.sendCode(334, b"")
                return
        elif mechanism == b"LOGIN":
            self._auth_step = self._auth_login_user
            if not initial:
                self.sendCode(334, base64.b64encode(b"Username:"))
                return
        else:
            self._error(504, "5.5.4", "Error: unsupported authentication mechanism")
            return
        return self._auth_response(initial)

    def _auth_response(self, line: bytes) -> defer.Deferred | None:
        step, self._auth_step = self._auth_step, None
        if line == b"*":
            self._error(501, "5.7.0", "Authentication aborted")
            return None
        if line == b"=":
            decoded = b""
        else:
            try:
                decoded = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                self._error(501, "5.5.2", "Error: invalid base64 data")
                return None
        return step(decoded)

    def _auth_plain(self, decoded: bytes) -> defer.Deferred | None:
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self._error(501, "5.5.2", "Error: malformed PLAIN response")
            return None
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            d = self.factory.throttle.reject(self._peer_host().decode("ascii", "replace"),
                                             authcid)
            d.addErrback(self._login_failed, authcid)
            return d
        return self._login(authcid, password)

    def _auth_login_user(self, decoded: bytes) -> None:
        self._login_user = decoded
        self._auth_step = self._auth_login_password
        self.sendCode(334, base64.b64encode(b"Password:"))

    def _auth_login_password(self, decoded: bytes) -> defer.Deferred:
        return self._login(self._login_user, decoded)

    def _login(self, username: bytes, password: bytes) -> defer.Deferred:
        d = self.factory.throttle.login(
            self.portal, self._peer_host().decode("ascii", "replace"),
            credentials.UsernamePassword(username, password), None, IMessageDelivery)
        d.addCallbacks(self._logged_in, self._login_failed, errbackArgs=(username,))
        return d

    def _logged_in(self, result: tuple) -> defer.Deferred | None:
        _, avatar, logout = result
        user = avatar.address

        def decided(stage: StageResult) -> None:
            if stage.refused:
                logout()
                log.info("SMTP AUTH for {user} from {peer} refused by a filter",
                         user=user, peer=self._peer_host())
                self._refuse(stage.verdict)
                return
            self.user = user
            self.authenticated = True
            self._onLogout = logout
            self.filter_session.user = user
            log.info("SMTP AUTH success for {user} from {peer}", user=user,
                     peer=self._peer_host())
            self.reply(235, "2.7.0", "Authentication successful")

        return self._filtered("auth", user, True, then=decided)

    def _login_failed(self, failure, username: bytes = b"") -> defer.Deferred | None:
        """A failed login, answered after the throttle's delay (already waited)."""
        if failure.check(LoginThrottled):
            log.info("SMTP AUTH from {peer} refused: too many failed logins",
                     peer=self._peer_host())
            self.reply(421, "4.7.0", f"{self.factory.config.hostname} Error: too many "
                                     "failed logins, try again later")
            self._quitting = True
            self.transport.loseConnection()
            return None
        if not failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            return failure
        log.info("SMTP AUTH failure from {peer}", peer=self._peer_host())

        def decided(stage: StageResult) -> None:
            if stage.refused:
                self._refuse(stage.verdict)
            else:
                self._error(535, "5.7.8", "Error: authentication credentials invalid")

        return self._filtered("auth", username.decode("utf-8", "replace"), False,
                              then=decided)

    # -- the mail transaction ----------------------------------------------

    def smtp_MAIL(self, rest: bytes) -> defer.Deferred | None:
        if self._helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self.transaction is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            path = parse_mail_from(rest)
        except ParseError as e:
            self._error(501, "5.5.4", f"Syntax: MAIL FROM:<address>: {e}")
            return
        smtputf8 = False
        size = 0
        dsn: dict[str, str] = {}
        for key, value in path.params.items():
            if key == "SIZE":
                try:
                    size = parse_size_param(value or "")
                except ParseError:
                    self._error(501, "5.5.4", "Error: bad SIZE parameter")
                    return
                if size > self.limits.max_message_size:
                    self.reply(552, "5.3.4", "Error: message size exceeds fixed limit")
                    return
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self._error(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
                    return
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif key == "AUTH":
                pass
            elif key in ("RET", "ENVID") and self.policy.offers_dsn:
                try:
                    dsn[key] = parse_ret(value) if key == "RET" else parse_envid(value)
                except DSNParameterError as e:
                    self._error(501, "5.5.4", f"Error: {e}")
                    return
            else:
                self._error(555, "5.5.4", f"Error: unsupported MAIL parameter {key}")
                return
        if not path.address.isascii() and not smtputf8:
            self.reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
            return
        try:
            self.policy.check_sender(path.address, self.user)
        except PolicyReject as e:
            self.reply(e.code, e.enhanced, e.text)
            return None

        def decided(result: StageResult) -> None:
            if result.refused:
                self._refuse(result.verdict)
                return
            self.transaction = Transaction(sender=path.address, smtputf8=smtputf8,
                                           declared_size=size,
                                           ret=dsn.get("RET"), envid=dsn.get("ENVID"),
                                           discarded=isinstance(result.verdict, Discard))
            self.filter_session.reset_envelope()
            self.filter_session.sender = path.address
            self.reply(250, "2.1.0", "Ok")

        return self._filtered("mail", path.address, then=decided)

    def smtp_RCPT(self, rest: bytes) -> defer.Deferred | None:
        if self.transaction is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        try:
            path = parse_rcpt_to(rest)
        except ParseError as e:
            self._error(501, "5.5.4", f"Syntax: RCPT TO:<address>: {e}")
            return
        notify, orcpt = None, None
        for key, value in path.params.items():
            if key not in ("NOTIFY", "ORCPT") or not self.policy.offers_dsn:
                self._error(555, "5.5.4", f"Error: unsupported RCPT parameter {key}")
                return
            try:
                if key == "NOTIFY":
                    notify = parse_notify(value)
                else:
                    orcpt = parse_orcpt(value)
            except DSNParameterError as e:
                self._error(501, "5.5.4", f"Error: {e}")
                return
        if not path.address.isascii() and not self.transaction.smtputf8:
            self.reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
            return
        txn = self.transaction
        if len(txn.recipients) + txn.discarded_recipients >= self.limits.max_recipients:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return
        try:
            route = self.policy.route_recipient(path.address, self.user)
        except PolicyReject as e:
            self.reply(e.code, e.enhanced, e.text)
            return None

        def decided(result: StageResult) -> None:
            if result.refused:
                self._refuse(result.verdict)
                return
            if isinstance(result.verdict, Discard):
                txn.discarded_recipients += 1
                self.reply(250, "2.1.5", "Ok")
                return
            txn.recipients.append(path.address)
            txn.mailboxes.extend(Mailbox(a, path.address) for a in route.local)
            txn.remote.extend(Recipient(a, orcpt=orcpt, notify=notify) for a in route.remote)
            if route.local and notify and "SUCCESS" in notify:
                txn.local_success.append(Recipient(path.address, orcpt=orcpt, notify=notify))
            self.filter_session.recipients.append(path.address)
            self.reply(250, "2.1.5", "Ok")

        def filter_then_decide(_: object = None) -> defer.Deferred | None:
            return self._filtered("rcpt", path.address, then=decided)

        quota = self.factory.quota
        if quota is None or not route.local:
            return filter_then_decide()

        def checked(full: list[str]) -> defer.Deferred | None:
            if full:
                self.reply(552, "5.2.2", f"<{path.address}>: Recipient mailbox is full")
                return None
            return filter_then_decide()
        return quota.over_quota(route.local, txn.declared_size).addCallback(checked)

    def smtp_DATA(self, rest: bytes) -> None:
        if rest:
            self._error(501, "5.5.4", "Syntax: DATA")
            return
        if self.transaction is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        if not (self.transaction.recipients or self.transaction.discarded_recipients):
            self._error(554, "5.5.1", "Error: no valid recipients")
            return
        self.framer.start_data()
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _data_content(self, data: bytes) -> None:
        txn = self.transaction
        if txn.too_big:
            return
        if len(txn.content) + len(data) > self.limits.max_message_size:
            txn.too_big = True
            txn.content = bytearray()
            return
        txn.content += data

    def _data_end(self, event: DataEnd) -> defer.Deferred | None:
        txn, self.transaction = self.transaction, None
        self._ending = (txn, None)
        if txn.too_big:
            self.reply(552, "5.3.4", "Error: message size exceeds fixed limit")
            return None
        if event.overlong_line:
            self.reply(550, "5.6.0", f"Error: message has a line longer than "
                                     f"{self.limits.max_data_line} bytes")
            return None
        # No bytes() copy of the whole message: the count reads the header
        # section only, and the concatenation below makes the one copy.
        hops = received_count(txn.content) + 1
        if hops > self.factory.config.queue.max_hops:
            self.reply(554, "5.4.6", f"Error: too many hops ({hops}): mail loop?")
            return None
        queue_id = os.urandom(6).hex().upper()
        self._ending = (txn, queue_id)
        message = self.received_header(txn, queue_id) + txn.content
        if txn.discarded or not txn.recipients:
            self._discarded(txn, queue_id)
            return None
        if not self.filters:
            return self._dispatch(txn, queue_id, message, txn.mailboxes, txn.remote)
        self.filter_session.queue_id = queue_id
        d = self._filter_message(txn, queue_id, message)
        d.addBoth(self._envelope_done)
        return d

    def _envelope_done(self, result: object) -> object:
        if self.filter_session is not None:
            self.filter_session.reset_envelope()
        return result

    @defer.inlineCallbacks
    def _dispatch(self, txn: Transaction, queue_id: str, message: bytes,
                  mailboxes: list[Mailbox], remote: list[Recipient],
                  held: list[QuarantineEntry] | None = None):
        """The outbound stage (when remote recipients remain), then write every
        copy and quarantine entry durably, then answer 250 (or the failure)."""
        outbound_copy = None
        outbound = self.factory.outbound_filters
        if remote and outbound:
            self.filter_session.queue_id = queue_id
            stage = yield outbound.run("outbound", self.filter_session, message,
                                       [r.address for r in remote])
            if stage.refused:
                self._refuse(stage.verdict)
                return
            if isinstance(stage.verdict, Discard):
                log.info("{id}: remote recipients {rcpts} discarded by filter {filter} in "
                         "the outbound stage", id=queue_id, filter=stage.filter,
                         rcpts=",".join(r.address for r in remote))
                remote = []
            elif stage.message != message:
                outbound_copy = stage.message
            if self._lost:
                log.info("{id}: client went away while filters ran; nothing stored",
                         id=queue_id)
                return
        if not mailboxes and not remote and not held:
            self._discarded(txn, queue_id)
            return
        quarantined: list[str] = []
        try:
            for entry in held or ():
                quarantined.append((yield self.factory.quarantine.add(message, entry)))
            envelope = None
            if mailboxes or remote:
                kwargs = {} if outbound_copy is None else {"outbound_message": outbound_copy}
                envelope = yield self.factory.delivery.deliver(
                    message, txn.sender, mailboxes, remote, ret=txn.ret, envid=txn.envid,
                    user=self.user, sign=self.user is not None, queue_id=queue_id, **kwargs)
        except Exception:
            failure = Failure()
            if quarantined:
                yield self.factory.quarantine.discard(quarantined)
            self._delivery_failed(failure)
            return
        if held:  # no "delivered" notice for quarantined copies
            delivered = {box.original for box in mailboxes}
            txn.local_success = [r for r in txn.local_success if r.address in delivered]
        for entry_id, entry in zip(quarantined, held or ()):
            log.info("{id}: from=<{sender}> to={rcpts} quarantined as {qid} by filter "
                     "{filter} ({reason})", id=queue_id, sender=txn.sender,
                     rcpts=",".join(entry.recipients), qid=entry_id, filter=entry.filter,
                     reason=entry.reason)
        self._delivered(envelope, txn, queue_id, message)

    def _quarantine_entry(self, txn: Transaction, queue_id: str, result: StageResult,
                          stage: str, local: list[Mailbox], remote: list[Recipient]
                          ) -> QuarantineEntry:
        """The envelope of a message (or local copy) a filter quarantined."""
        verdict = result.verdict
        return QuarantineEntry(
            sender=txn.sender, reason=verdict.reason, stage=stage, filter=result.filter,
            local=[QuarantinedCopy(b.account, b.original, b.folder, b.flags) for b in local],
            remote=[r.address for r in remote], created=self.factory.reactor.seconds(),
            queue_id=queue_id, role=self.policy.role,
            peer=self._peer_host().decode("ascii", "replace"), user=self.user,
            sign=self.user is not None, ret=txn.ret, envid=txn.envid)

    def _discarded(self, txn: Transaction, queue_id: str) -> None:
        log.info("{id}: from=<{sender}> to={rcpts} discarded by a filter",
                 id=queue_id, sender=txn.sender, rcpts=",".join(txn.recipients))
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    @defer.inlineCallbacks
    def _filter_message(self, txn: Transaction, queue_id: str, message: bytes):
        """The data stage, then the delivery stage per local copy, then the write."""
        session = self.filter_session
        result = yield self.filters.run("data", session, message)
        if result.refused:
            self._refuse(result.verdict)
            return
        if isinstance(result.verdict, Discard):
            self._discarded(txn, queue_id)
            return
        if isinstance(result.verdict, Quarantine):
            if self._lost:
                log.info("{id}: client went away while filters ran; nothing stored",
                         id=queue_id)
                return
            entry = self._quarantine_entry(txn, queue_id, result, "data", txn.mailboxes,
                                           txn.remote)
            yield self._dispatch(txn, queue_id, result.message, [], [], [entry])
            return
        message = result.message
        folder, flags, redirect = _delivery_choice(result.actions, "INBOX", "")
        mailboxes, remote = list(txn.mailboxes), list(txn.remote)
        if redirect:
            mailboxes, remote = self._route_all(redirect)
        final: list[Mailbox] = []
        held: list[QuarantineEntry] = []
        for box in mailboxes:
            stage = yield self.filters.run("delivery", session, message,
                                           DeliveryTarget(box.account, box.original))
            if stage.refused:
                self._refuse(stage.verdict)
                return
            if isinstance(stage.verdict, Discard):
                continue
            if isinstance(stage.verdict, Quarantine):
                held.append(self._quarantine_entry(
                    txn, queue_id, stage, "delivery",
                    [Mailbox(box.account, box.original, folder, flags)], []))
                continue
            box_folder, box_flags, box_redirect = _delivery_choice(stage.actions, folder, flags)
            if box_redirect:
                more_boxes, more_remote = self._route_all(box_redirect)
                final += more_boxes
                remote += more_remote
                continue
            final.append(Mailbox(box.account, box.original, box_folder, box_flags))
        if not final and not remote and not held:
            self._discarded(txn, queue_id)
            return
        if self._lost:
            log.info("{id}: client went away while filters ran; nothing stored", id=queue_id)
            return
        yield self._dispatch(txn, queue_id, message, final, remote, held)

    def _route_all(self, addresses: tuple[str, ...]) -> tuple[list[Mailbox], list[Recipient]]:
        """Local copies and remote recipients for a filter's Redirect."""
        mailboxes: list[Mailbox] = []
        remote: list[Recipient] = []
        for address in addresses:
            boxes, rest = self.factory.delivery.route(address)
            if not boxes and not rest:
                log.warn("redirect by a filter to {address}: no such local address; dropped",
                         address=address)
            mailboxes += boxes
            remote += rest
        return mailboxes, remote

    def _delivered(self, envelope, txn: Transaction, queue_id: str, message: bytes) -> None:
        log.info("{id}: from=<{sender}> to={rcpts} size={size} {what}",
                 id=queue_id, sender=txn.sender, rcpts=",".join(txn.recipients),
                 size=len(txn.content), what="queued" if envelope else "delivered")
        self.reply(250, "2.0.0", f"Ok: queued as {envelope.id if envelope else queue_id}")
        if txn.local_success and txn.sender:
            self._notify_local_success(txn, message)

    def _notify_local_success(self, txn: Transaction, message: bytes) -> None:
        """RFC 3461 NOTIFY=SUCCESS for local recipients: a "delivered" report."""
        now = self.factory.reactor.seconds()
        for r in txn.local_success:
            r.status, r.enhanced, r.updated = "delivered", "2.0.0", now
            r.text = f"delivered to mailbox on {self.factory.config.hostname}"
        report = build_report(hostname=self.factory.config.hostname, to=txn.sender,
                              items=[ReportItem(r, "delivered") for r in txn.local_success],
                              headers=header_section(message), envid=txn.envid,
                              arrival=now, now=now)
        d = self.factory.delivery.send_notice(report, txn.sender)
        d.addErrback(lambda f: log.failure("could not send the success notice", f))

    def _delivery_failed(self, failure) -> None:
        if failure.check(DeliveryError):
            e = failure.value
            code = 452 if e.enhanced == "4.3.1" else 451
            self.reply(code if e.temporary else 554, e.enhanced, f"Error: {e}")
            return
        log.failure("delivery failed", failure)
        self.reply(451, "4.3.0", "Error: local error in processing")

    def _transaction_event(self, code: int, enhanced: str | None) -> None:
        (txn, queue_id), self._ending = self._ending, None
        events.smtp_transaction(
            queue_id=queue_id, role=self.policy.role, peer=self._peer_host().decode("ascii"),
            helo=sanitize_header_text(self._helo[0]) if self._helo else None,
            sender=txn.sender, recipients=len(txn.recipients), size=len(txn.content),
            tls=self.secure, user=self.user, code=code, enhanced=enhanced)

    def received_header(self, txn: Transaction, queue_id: str) -> bytes:
        helo = sanitize_header_text(self._helo[0] if self._helo else b"unknown")
        peer = sanitize_header_text(self._peer_host())
        proto = ("UTF8" if txn.smtputf8 else "") + "ESMTP"
        if self.secure:
            proto += "S"
        if self.user is not None:
            proto += "A"
        lines = [f"Received: from {helo} ([{peer}])",
                 f"\tby {self.factory.config.hostname} (mailtwist) with {proto} id {queue_id}"]
        if len(txn.recipients) == 1:
            lines.append(f"\tfor <{sanitize_header_text(txn.recipients[0])}>;"
                         f" {rfc822date().decode()}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{rfc822date().decode()}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _delivery_choice(actions: list, folder: str, flags: str
                     ) -> tuple[str, str, tuple[str, ...]]:
    """Folder, flag letters and redirect addresses after a stage's actions."""
    redirect: tuple[str, ...] = ()
    for action in actions:
        if isinstance(action, FileInto):
            folder = action.folder
        elif isinstance(action, AddFlags):
            flags = "".join(sorted(set(flags) | set(action.letters)))
        elif isinstance(action, Redirect):
            redirect += tuple(a for a in action.addresses if a not in redirect)
    return folder, flags, redirect


class SMTPFactory(protocol.ServerFactory):
    """Builds sessions for one listener role."""

    def __init__(self, config, policy: SMTPPolicy, delivery, portal=None, tls_context=None,
                 implicit_tls: bool = False, reactor=None,
                 filters: FilterChain | None = None,
                 throttle: LoginThrottle | None = None, quota=None,
                 outbound_filters: FilterChain | None = None,
                 quarantine: QuarantineStore | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.quota = quota
        #: the [filters] outbound chain, asked before mail is spooled for remote recipients
        self.outbound_filters = (outbound_filters if outbound_filters is not None
                                 else FilterChain(clock=reactor))
        #: where Quarantine verdicts put messages
        self.quarantine = (quarantine if quarantine is not None else
                           QuarantineStore(config.data_dir / "quarantine", reactor))
        self.filters = filters if filters is not None else FilterChain(clock=reactor)
        self.throttle = ensure_throttle(throttle, config, reactor)
        self.config = config
        self.policy = policy
        self.delivery = delivery
        self.portal = portal
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.reactor = reactor

    def buildProtocol(self, addr) -> MailtwistSMTP:
        p = MailtwistSMTP(self)
        p.portal = self.portal
        return p
