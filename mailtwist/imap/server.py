"""The IMAP4rev1 server (RFC 3501) and its extensions, over the Maildir++ store.

``IMAPServer`` subclasses Twisted's ``IMAP4Server`` for its place in the
protocol hierarchy, its idle timeout (``TimeoutMixin``) and the cred
contract (the realm hands out an ``IAccount`` avatar), but replaces the rest,
because too much of it is wrong for a server that faces the Internet:

- Input: pipelined plaintext after STARTTLS was executed inside TLS, literal
  sizes were unbounded, LITERAL+ unknown, quoted-string escapes broken. Here
  the sans-IO :class:`~mailtwist.imap.wire.CommandFramer` frames commands
  with bounded literals, and one command runs at a time: while a command
  waits on a Deferred nothing further is interpreted (the transport is paused
  if input piles up), so responses stay in order and STARTTLS discards
  whatever was pipelined behind it.
- Commands: APPEND without flags failed, partial FETCH returned the whole
  body, FETCH BODY[] never set \\Seen, SELECT lacked UIDNEXT/UNSEEN/
  PERMANENTFLAGS, SEARCH broke on Python 3 and was quadratic, mUTF-7
  decoding yielded ``../`` or NUL. Every handler is ours, on the shared
  folder state of :mod:`mailtwist.imap.mailbox`; MIME comes from
  :mod:`mailtwist.imap.mime`, SEARCH from :mod:`mailtwist.imap.search`.

Untagged EXISTS, RECENT and FETCH (flag changes) are sent before the tagged
response of every command in the selected state, and immediately while the
session IDLEs; EXPUNGE too, except during FETCH, STORE and SEARCH (not
their UID forms), when RFC 3501 7.4.1 forbids it. Long FETCH responses are
written in batches, pausing while the client does not read.

CONDSTORE and QRESYNC (RFC 7162) use the folder's persisted mod-sequences
(:mod:`mailtwist.storage.index`). CONDSTORE is enabled per session by ENABLE,
``SELECT (CONDSTORE)`` or the first command that uses a mod-sequence (FETCH
MODSEQ or CHANGEDSINCE, STORE UNCHANGEDSINCE, SEARCH MODSEQ); from then on
untagged FETCH responses carry MODSEQ. QRESYNC needs ENABLE; then expunges
are announced as ``VANISHED`` and SELECT accepts the QRESYNC parameter.

Before TLS, LOGIN and AUTHENTICATE are refused with ``[PRIVACYREQUIRED]`` and
CAPABILITY shows LOGINDISABLED and no AUTH= mechanism, unless the config
allows plaintext authentication.
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.cred import credentials
from twisted.cred import error as cred_error
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail.imap4 import IAccount, IMAP4Server
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailtwist.config import Config
from mailtwist.filters.mailbox import notify_mailbox
from mailtwist.imap.account import IMAPAccount, Listing, MailboxError
from mailtwist.imap.fetch import FetchEntry, FetchItem, parse_fetch_items, render
from mailtwist.imap.mailbox import (
    SYNC_CHUNK,
    FolderGone,
    FolderRegistry,
    KeywordLimit,
    SharedFolder,
    View,
    canonical_flag,
    flag_announcements,
)
from mailtwist.imap.names import (
    DELIMITER,
    InvalidName,
    list_pattern,
    mailbox_name,
    wire_name,
)
from mailtwist.imap.search import (
    SearchSyntaxError,
    UnsupportedCharset,
    parse_search,
)
from mailtwist.imap.wire import (
    Atom,
    BadCommand,
    Command,
    CommandFramer,
    ContinuationNeeded,
    LineTooLong,
    LiteralTooBig,
    ParseError,
    Rejected,
    String,
    astring,
    format_sequence_set,
    parse_command,
    parse_date_time,
    parse_sequence_set,
    raw_arguments,
    split_first_word,
    tokenize,
)
from mailtwist.limits import extend_timeout
from mailtwist.serial import SerialCommands
from mailtwist.storage.store import MailStore
from mailtwist.throttle import ensure_throttle, LoginThrottle, LoginThrottled

log = Logger()

PREAUTH_TIMEOUT = 180
"""Dovecot's: 3 minutes to log in (config: [limits] imap_login_timeout)."""
AUTH_TIMEOUT = 31 * 60
"""RFC 3501 5.4: at least 30 minutes of inactivity before an autologout
(config: [limits] imap_idle_timeout; both constants are its defaults)."""
MAX_PAUSED_INPUT = 1024 * 1024
MAX_ERRORS = 20
MAX_AUTH_FAILURES = 3
BATCH_MESSAGES = 500
BATCH_OCTETS = 4 * 1024 * 1024

_NO_REPLY = object()
_KEYWORD_SPECIALS = frozenset(b'(){ %*"\\]')


class No(Exception):
    """Answer the command NO; *text* may start with a ``[CODE]``."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


class Bad(Exception):
    """Answer the command BAD."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


@implementer(IPushProducer)
class _Pacer:
    """Registered with the transport during long responses to learn when to pause."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: defer.Deferred | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def wait(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        if self._waiting is None:
            self._waiting = defer.Deferred()
        return self._waiting


def _flag_arguments(tokens: list[Any]) -> list[str]:
    """Flags of STORE or APPEND: system flags canonical, keywords validated."""
    flags = []
    for token in tokens:
        if not isinstance(token, Atom) or not token:
            raise Bad(b"Invalid flag.")
        text = bytes(token).decode("ascii", "replace")
        if token.startswith(b"\\"):
            name = canonical_flag(text)
            if name is None:
                if token.lower() == b"\\recent":
                    raise Bad(b"\\Recent cannot be changed.")
                raise Bad(b"Invalid system flag.")
        else:
            if any(c < 0x21 or c > 0x7E or c in _KEYWORD_SPECIALS for c in token):
                raise Bad(b"Invalid keyword.")
            if len(token) > 200:
                raise Bad(b"Keyword too long.")
            name = text
        if name not in flags:
            flags.append(name)
    return flags


class IMAPServer(SerialCommands, IMAP4Server):
    """One IMAP session. See the module docstring for what differs from Twisted."""

    max_paused_input = MAX_PAUSED_INPUT

    def __init__(self, portal: Portal | None, config: Config, tls_context: Any = None,
                 implicit_tls: bool = False, reactor: Any = None,
                 threadpool: ThreadPool | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        super().__init__(chal={}, contextFactory=tls_context)
        if reactor is None:
            from twisted.internet import reactor
        self.throttle = ensure_throttle(throttle, config, reactor)
        self.portal = portal
        self.config = config
        self.tls_context = tls_context
        self.secure = implicit_tls
        self.reactor = reactor
        self.callLater = reactor.callLater
        self.threadpool = threadpool
        self.timeOut = config.limits.imap_login_timeout
        self.min_data_rate = config.limits.min_data_rate
        self._release_session: Callable[[], None] | None = None
        self.append_limit = config.smtp.max_message_size
        self.framer = CommandFramer(append_limit=self.append_limit)
        self.state = "unauth"
        self.account: IMAPAccount | None = None
        self.view: View | None = None
        self.errors = 0
        self.auth_failures = 0
        self._logout_avatar: Callable[[], None] | None = None
        self._continuation: Callable[[list[bytes]], Any] | None = None
        self._idle_tag: bytes | None = None
        self._pushing = False
        self._disconnected = False
        self.condstore = False
        self.qresync = False

    # -- connection and framing

    def connectionMade(self) -> None:
        sessions = getattr(self.factory, "sessions", None)
        if sessions is not None:
            sessions.add(self)
        self.setTimeout(self.timeOut)
        self._write(b"* OK [CAPABILITY " + b" ".join(self.capability_list())
                    + b"] mailtwist IMAP4rev1 ready.")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._disconnected = True
        sessions = getattr(self.factory, "sessions", None)
        if sessions is not None:
            sessions.discard(self)
        self.setTimeout(None)
        release, self._release_session = self._release_session, None
        if release is not None:
            release()
        self._unselect()
        logout, self._logout_avatar = self._logout_avatar, None
        if logout is not None:
            logout()

    def timeoutConnection(self) -> None:
        self._write(b"* BYE Autologout; connection idle too long.")
        self.transport.loseConnection()

    def shutdown_notice(self) -> None:
        """The server is stopping (mailtwist/shutdown.py): BYE and close."""
        if self._disconnected or self.transport is None:
            return
        self._write(b"* BYE Server shutting down")
        self.transport.loseConnection()

    def _write(self, line: bytes) -> None:
        if not self._disconnected:
            self.transport.write(line + b"\r\n")

    def _write_lines(self, lines: list[bytes]) -> None:
        if lines and not self._disconnected:
            self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def dataReceived(self, data: bytes) -> None:
        if self._disconnected or self.transport.disconnecting:
            return
        # The idle timer restarts per complete command (handle_command); bytes
        # only earn credit, so a trickled line or literal is cut (limits.py).
        extend_timeout(self, len(data) / self.min_data_rate)
        self.framer.feed(data)
        self.run_commands()

    def next_command(self) -> Any:
        return self.framer.next_event()

    def handle_command(self, command: Any) -> defer.Deferred | None:
        if isinstance(command, Command):
            self.resetTimeout()
        return self._handle_event(command)

    def buffered_input(self) -> int:
        return len(self.framer)

    def command_failed(self, failure: Failure) -> None:
        log.failure("IMAP command failed", failure)
        self._write(b"* BAD Internal error.")

    def _handle_event(self, event: Any) -> defer.Deferred | None:
        if isinstance(event, Command):
            handler, self._continuation = self._continuation, None
            if handler is not None:
                return handler(event.parts)
            return self._command(event.parts)
        if isinstance(event, ContinuationNeeded):
            self._write(b"+ Ready for literal data")
        elif isinstance(event, LiteralTooBig):
            tag = event.tag or b"*"
            if event.append:
                self._write(tag + b" NO [TOOBIG] Message too big (at most %d octets)."
                            % self.append_limit)
            else:
                self._write(tag + b" BAD Literal too big.")
        elif isinstance(event, Rejected):
            handler, self._continuation = self._continuation, None
            if event.fatal:
                self._write((event.tag or b"*") + b" BAD " + event.reason.encode() + b".")
                self._write(b"* BYE Cannot resynchronise with the client.")
                self.transport.loseConnection()
            elif handler is not None:
                # IDLE or AUTHENTICATE waiting for a line: "*" cancels either.
                return handler([b"*"])
            else:
                self._protocol_error(event.tag or b"*", event.reason.encode() + b".")
        elif isinstance(event, LineTooLong):
            self._write(b"* BYE Command line too long.")
            self.transport.loseConnection()
        return None

    def _protocol_error(self, tag: bytes, text: bytes) -> None:
        self._write(tag + b" BAD " + text)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self._write(b"* BYE Too many bad commands.")
            self.transport.loseConnection()

    # -- dispatch

    def _command(self, parts: list[bytes]) -> defer.Deferred | None:
        try:
            tag, name, rest = parse_command(parts)
        except BadCommand as e:
            self._protocol_error(e.tag or b"*", str(e).encode("ascii", "replace").capitalize()
                                 + b".")
            return None
        uid = False
        if name == b"UID":
            sub, rest = split_first_word(rest)
            name = sub.upper()
            uid = True
            if name not in UID_COMMANDS:
                self._protocol_error(tag, b"Unknown UID command.")
                return None
        spec = COMMANDS.get(name)
        if spec is None:
            self._protocol_error(tag, b"Unknown command.")
            return None
        method = getattr(self, spec[0].__name__)
        states = spec[1]
        if self.state not in states:
            if self.state == "auth" and "selected" in states:
                self._protocol_error(tag, b"No mailbox selected.")
            else:
                self._protocol_error(tag, b"Command not valid in this state.")
            return None
        allow_expunge = uid or name not in (b"FETCH", b"STORE", b"SEARCH")
        work = method(tag, rest, uid)
        return defer.Deferred.fromCoroutine(self._run(tag, name, work, allow_expunge))

    async def _run(self, tag: bytes, name: bytes, work: Awaitable[Any], allow_expunge: bool
                   ) -> None:
        status, text = b"OK", name + b" completed."
        try:
            result = await work
            if result is _NO_REPLY:
                return
            if result is not None:
                text = result
        except Bad as e:
            status, text = b"BAD", e.text
            self.errors += 1
        except ParseError as e:
            status, text = b"BAD", str(e).encode("ascii", "replace").capitalize() + b"."
            self.errors += 1
        except No as e:
            status, text = b"NO", e.text
        except InvalidName as e:
            status, text = b"NO", b"[CANNOT] Invalid mailbox name: " + str(e).encode(
                "ascii", "replace")
        except MailboxError as e:
            code = b"[" + e.code + b"] " if e.code else b""
            status, text = b"NO", code + e.text.encode("ascii", "replace")
        except KeywordLimit:
            status, text = b"NO", b"[LIMIT] No more keywords can be defined in this mailbox."
        except FolderGone:
            self._mailbox_gone()
            return
        except OSError as e:
            if e.errno == errno.EDQUOT:
                log.error("IMAP {name} failed: {error}", name=name, error=e)
                status, text = b"NO", b"[OVERQUOTA] Disk quota exceeded."
            elif e.errno == errno.ENOSPC:  # as Dovecot: a full disk is a quota
                log.error("IMAP {name} failed: {error}", name=name, error=e)
                status, text = b"NO", b"[OVERQUOTA] Not enough disk space."
            else:
                log.failure("IMAP {name} failed", name=name)
                status, text = b"NO", b"[SERVERBUG] Internal error, try again later."
        except Exception:  # noqa: BLE001 - answered NO [SERVERBUG] and logged
            log.failure("IMAP {name} failed", name=name)
            status, text = b"NO", b"[SERVERBUG] Internal error, try again later."
        if self._disconnected:
            return
        await self._announce(allow_expunge)
        if self._disconnected:
            return
        if self.errors >= MAX_ERRORS and status == b"BAD":
            self._write(tag + b" BAD " + text)
            self._write(b"* BYE Too many bad commands.")
            self.transport.loseConnection()
            return
        self._write(tag + b" " + status + b" " + text)

    async def _announce(self, allow_expunge: bool = True, idle: bool = False) -> None:
        """Send the untagged updates of the selected mailbox, a chunk per reactor turn.

        An IDLE push (*idle*) stops when the IDLE ends: DONE's own
        announcement sends the rest before the tagged response.
        """
        while True:
            view = self.view
            if view is None or self._disconnected or (idle and self._idle_tag is None):
                return
            if view.invalid:
                self._mailbox_gone()
                return
            lines, done = view.sync(allow_expunge, SYNC_CHUNK)
            self._write_lines(lines)
            if done:
                return
            await deferLater(self.reactor, 0, lambda: None)

    def _mailbox_gone(self) -> None:
        self._write(b"* BYE [UNAVAILABLE] The selected mailbox was deleted, renamed or reset.")
        self._unselect()
        self.transport.loseConnection()

    def _unselect(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            view.on_change = None
            view.shared.detach(view)
        if self.state == "selected":
            self.state = "auth"

    # -- capabilities

    @property
    def auth_allowed(self) -> bool:
        return self.secure or self.config.allow_plaintext_auth

    def capability_list(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"SASL-IR", b"LITERAL+", b"ID", b"ENABLE", b"IDLE"]
        if self.state == "unauth":
            if self.tls_context is not None and not self.secure:
                caps.append(b"STARTTLS")
            caps.append(b"AUTH=PLAIN" if self.auth_allowed else b"LOGINDISABLED")
        else:
            caps += [b"NAMESPACE", b"UNSELECT", b"CHILDREN", b"UIDPLUS", b"MOVE",
                     b"SPECIAL-USE", b"CREATE-SPECIAL-USE", b"APPENDLIMIT=%d" % self.append_limit,
                     b"QUOTA", b"QUOTA=RES-STORAGE", b"CONDSTORE", b"QRESYNC"]
        return caps

    def listCapabilities(self) -> list[bytes]:
        return self.capability_list()

    # -- any state

    async def do_CAPABILITY(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        self._write(b"* CAPABILITY " + b" ".join(self.capability_list()))

    async def do_NOOP(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        if self.view is not None:
            await self.view.shared.refresh()

    async def do_LOGOUT(self, tag: bytes, parts: list[bytes], uid: bool) -> object:
        _no_arguments(parts)
        self._write(b"* BYE Logging out.")
        self._write(tag + b" OK LOGOUT completed.")
        self.state = "logout"
        self._unselect()
        self.transport.loseConnection()
        return _NO_REPLY

    async def do_ID(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) != 1 or not (isinstance(args[0], list) or args[0].upper() == b"NIL"):
            raise Bad(b"ID takes NIL or a parameter list.")
        self._write(b'* ID ("name" "mailtwist" "vendor" "mailtwist" "support-url" NIL)')

    # -- not authenticated

    async def do_STARTTLS(self, tag: bytes, parts: list[bytes], uid: bool) -> object:
        _no_arguments(parts)
        if self.secure:
            raise Bad(b"TLS is already active.")
        if self.tls_context is None:
            raise No(b"TLS is not available.")
        self._write(tag + b" OK Begin TLS negotiation now.")
        self.framer.clear()
        self.transport.startTLS(self.tls_context)
        self.secure = True
        return _NO_REPLY

    async def do_LOGIN(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes:
        args = tokenize(parts)
        if len(args) != 2:
            raise Bad(b"LOGIN takes a user name and a password.")
        user, password = astring(args[0], "user"), astring(args[1], "password")
        if not self.auth_allowed:
            raise No(b"[PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS;"
                     b" use STARTTLS first.")
        return await self._login(user, password)

    async def do_AUTHENTICATE(self, tag: bytes, parts: list[bytes], uid: bool) -> object:
        args = tokenize(parts)
        if not args or len(args) > 2 or not isinstance(args[0], Atom):
            raise Bad(b"AUTHENTICATE takes a mechanism and an optional initial response.")
        if not self.auth_allowed:
            raise No(b"[PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS;"
                     b" use STARTTLS first.")
        if args[0].upper() != b"PLAIN":
            raise No(b"Unsupported authentication mechanism.")
        if len(args) == 2:
            return await self._auth_plain(astring(args[1], "initial response"))
        self._write(b"+ ")

        def response(parts: list[bytes]) -> defer.Deferred:
            line = parts[0] if len(parts) == 1 else b""
            return defer.Deferred.fromCoroutine(
                self._run(tag, b"AUTHENTICATE", self._auth_plain(line.strip()), True))

        self._continuation = response
        return _NO_REPLY

    async def _auth_plain(self, response: bytes) -> bytes:
        if response == b"*":
            raise Bad(b"Authentication cancelled.")
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            raise Bad(b"Invalid base64 data.") from None
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            raise Bad(b"Invalid PLAIN response.")
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            await self._guarded_login(self.throttle.reject(self._peer_address(), authcid))
        return await self._login(authcid, password)

    async def _login(self, user: bytes, password: bytes) -> bytes:
        if self.portal is None:
            raise No(b"[UNAVAILABLE] Authentication is not available.")
        creds = credentials.UsernamePassword(user, password)
        _, avatar, logout = await self._guarded_login(
            self.throttle.login(self.portal, self._peer_address(), creds, None, IAccount))
        if self._disconnected:
            logout()
            return b""
        limiter = getattr(getattr(self, "factory", None), "limiter", None)
        if limiter is not None:
            release = limiter.open_session("imap", avatar.address, self._peer_address())
            if release is None:
                logout()
                log.info("IMAP login {user} from {peer} refused: too many sessions",
                         user=avatar.address, peer=self.transport.getPeer())
                self._write(b"* BYE [UNAVAILABLE] Too many connections for this user "
                            b"from your address.")
                self.transport.loseConnection()
                return _NO_REPLY  # type: ignore[return-value]
            self._release_session = release
        self.account = avatar
        self._logout_avatar = logout
        self.state = "auth"
        self.setTimeout(self.config.limits.imap_idle_timeout)
        log.info("IMAP login {user} from {peer}", user=avatar.address,
                 peer=self.transport.getPeer())
        return b"[CAPABILITY " + b" ".join(self.capability_list()) + b"] Logged in."

    def _peer_address(self) -> str:
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", peer))

    async def _guarded_login(self, attempt: defer.Deferred) -> Any:
        """Await a throttled login (the shared LoginThrottle has already waited its
        delay on failure) and turn failures into IMAP answers."""
        try:
            return await attempt
        except LoginThrottled:
            log.info("IMAP login from {peer} refused: too many failed logins",
                     peer=self.transport.getPeer())
            if not self._disconnected:
                self.reactor.callLater(0, self._too_many_failures)
            raise No(b"[UNAVAILABLE] Too many failed logins; try again later.") from None
        except cred_error.LoginFailed:
            self.auth_failures += 1
            log.info("IMAP failed login from {peer}", peer=self.transport.getPeer())
            if self.auth_failures >= MAX_AUTH_FAILURES and not self._disconnected:
                self.reactor.callLater(0, self._too_many_failures)
            raise No(b"[AUTHENTICATIONFAILED] Authentication failed.") from None

    def _too_many_failures(self) -> None:
        self._write(b"* BYE Too many failed logins.")
        self.transport.loseConnection()

    # -- authenticated: mailboxes

    def _mailbox(self, token: Any) -> str:
        if not isinstance(token, (Atom, String)):
            raise Bad(b"Expected a mailbox name.")
        return mailbox_name(bytes(token))

    async def do_NAMESPACE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        self._write(b'* NAMESPACE (("" "/")) NIL NIL')

    async def do_ENABLE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if not args or not all(isinstance(a, Atom) for a in args):
            raise Bad(b"ENABLE takes capability names.")
        enabled = []
        for name in (bytes(a).upper() for a in args):
            if name == b"CONDSTORE" and not self.condstore:
                self._enable_condstore()
                enabled.append(name)
            elif name == b"QRESYNC" and not self.qresync:
                self.qresync = True
                self._enable_condstore()
                enabled.append(name)
        self._write(b" ".join([b"* ENABLED", *enabled]))

    def _enable_condstore(self) -> None:
        """Turn CONDSTORE on; announce HIGHESTMODSEQ if a mailbox is selected (RFC 7162 3.1)."""
        if self.condstore:
            return
        self.condstore = True
        view = self.view
        if view is not None:
            view.condstore = True
            self._write(b"* OK [HIGHESTMODSEQ %d] Highest." % view.shared.modseq)

    async def do_CREATE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) not in (1, 2):
            raise Bad(b"CREATE takes a mailbox name and optional parameters.")
        name = self._mailbox(args[0])
        use: tuple[str, ...] = ()
        if len(args) == 2:
            params = args[1]
            if (not isinstance(params, list) or len(params) != 2
                    or not isinstance(params[0], Atom) or params[0].upper() != b"USE"
                    or not isinstance(params[1], list)
                    or not all(isinstance(a, Atom) for a in params[1])):
                raise Bad(b"Unknown CREATE parameters.")
            texts = [bytes(a).decode("ascii", "replace") for a in params[1]]
            use = tuple("\\" + t[1:].capitalize() if t.startswith("\\") else t for t in texts)
        await self.account.create_folder(name, use)

    async def do_DELETE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        name = self._single_mailbox(parts, b"DELETE")
        if self.view is not None and self.view.shared.name == name:
            self._unselect()
            self._write(b"* OK [CLOSED] Mailbox closed.")
        await self.account.delete_folder(name)

    async def do_RENAME(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) != 2:
            raise Bad(b"RENAME takes two mailbox names.")
        old, new = self._mailbox(args[0]), self._mailbox(args[1])
        if self.view is not None and old != "INBOX" and (
                self.view.shared.name == old or self.view.shared.name.startswith(old + "/")):
            self._unselect()
            self._write(b"* OK [CLOSED] Mailbox closed.")
        await self.account.rename_folder(old, new)

    def _single_mailbox(self, parts: list[bytes], command: bytes) -> str:
        args = tokenize(parts)
        if len(args) != 1:
            raise Bad(command + b" takes one mailbox name.")
        return self._mailbox(args[0])

    async def do_SUBSCRIBE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        await self.account.subscribe_folder(self._single_mailbox(parts, b"SUBSCRIBE"))

    async def do_UNSUBSCRIBE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        await self.account.unsubscribe_folder(self._single_mailbox(parts, b"UNSUBSCRIBE"))

    async def do_LIST(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        selection: set[bytes] = set()
        returns: set[bytes] = set()
        if args and isinstance(args[0], list):
            selection = {bytes(a).upper() for a in args[0] if isinstance(a, Atom)}
            args = args[1:]
        if len(args) == 4 and isinstance(args[2], Atom) and args[2].upper() == b"RETURN" \
                and isinstance(args[3], list):
            returns = {bytes(a).upper() for a in args[3] if isinstance(a, Atom)}
            args = args[:2]
        if len(args) != 2:
            raise Bad(b"LIST takes a reference and a mailbox pattern.")
        reference = astring(args[0], "reference")
        patterns = args[1] if isinstance(args[1], list) else [args[1]]
        patterns = [astring(p, "pattern") for p in patterns]
        if patterns == [b""] and not selection:
            self._write(b'* LIST (\\Noselect) "/" ""')
            return
        listing = await self.account.listing()
        self._write_lines(self._list_lines(listing, reference, patterns, selection, returns,
                                           b"LIST"))

    async def do_LSUB(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) != 2:
            raise Bad(b"LSUB takes a reference and a mailbox pattern.")
        reference, pattern = astring(args[0], "reference"), astring(args[1], "pattern")
        listing = await self.account.listing()
        self._write_lines(self._list_lines(listing, reference, [pattern], {b"SUBSCRIBED"},
                                           set(), b"LSUB"))

    def _list_lines(self, listing: Listing, reference: bytes, patterns: list[bytes],
                    selection: set[bytes], returns: set[bytes], command: bytes) -> list[bytes]:
        matchers = [m for p in patterns if (m := list_pattern(reference, p)) is not None]
        subscribed_only = b"SUBSCRIBED" in selection
        special_only = b"SPECIAL-USE" in selection
        if subscribed_only:
            candidates = set(listing.subscribed)
            wildcard_percent = any(b"%" in p for p in patterns)
            if wildcard_percent:
                candidates |= listing.subscribed_parents
        else:
            candidates = listing.existing | listing.parents
        children = set(listing.parents)
        names = sorted(candidates, key=lambda n: (n != "INBOX", n))
        lines = []
        for name in names:
            if not any(m.fullmatch(name) for m in matchers):
                continue
            attributes: list[bytes] = []
            exists = name in listing.existing
            if command == b"LSUB":
                if name not in listing.subscribed:
                    attributes.append(b"\\Noselect")
            else:
                if subscribed_only and name not in listing.subscribed:
                    continue
                if not exists:
                    attributes.append(b"\\Noselect" if name in children else b"\\NonExistent")
                attributes.append(b"\\HasChildren" if name in children else b"\\HasNoChildren")
                if name in listing.subscribed and (subscribed_only or b"SUBSCRIBED" in returns):
                    attributes.append(b"\\Subscribed")
            special = listing.special.get(name, ()) if exists else ()
            if special_only and not special:
                continue
            if command == b"LIST":
                attributes += [a.encode("ascii") for a in special]
            lines.append(b"* " + command + b" (" + b" ".join(attributes) + b') "'
                         + DELIMITER.encode() + b'" ' + wire_name(name))
        return lines

    async def do_STATUS(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise Bad(b"STATUS takes a mailbox name and a list of items.")
        name = self._mailbox(args[0])
        wanted = []
        for item in args[1]:
            if not isinstance(item, Atom) or item.upper() not in STATUS_ITEMS:
                raise Bad(b"Unknown STATUS item.")
            wanted.append(item.upper())
        if b"HIGHESTMODSEQ" in wanted:
            self._enable_condstore()
        shared = await self.account.open(name)
        messages, recent, unseen = shared.counts()
        values = {b"MESSAGES": messages, b"RECENT": recent, b"UIDNEXT": shared.uidnext,
                  b"UIDVALIDITY": shared.uidvalidity, b"UNSEEN": unseen,
                  b"APPENDLIMIT": self.append_limit, b"HIGHESTMODSEQ": shared.modseq}
        self._write(b"* STATUS " + wire_name(name) + b" ("
                    + b" ".join(b"%s %d" % (item, values[item]) for item in wanted) + b")")

    async def do_GETQUOTAROOT(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        name = self._single_mailbox(parts, b"GETQUOTAROOT")
        await self.account.open(name)
        used, limit = await self.account.quota_usage()
        if not limit:
            self._write(b"* QUOTAROOT " + wire_name(name))
            return
        self._write_lines([b'* QUOTAROOT %s ""' % wire_name(name), _quota_line(used, limit)])

    async def do_GETQUOTA(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        args = tokenize(parts)
        if len(args) != 1:
            raise Bad(b"GETQUOTA takes a quota root.")
        used, limit = await self.account.quota_usage()
        if astring(args[0], "quota root") != b"" or not limit:
            raise No(b"[NONEXISTENT] No such quota root.")
        self._write(_quota_line(used, limit))

    async def do_SETQUOTA(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        raise No(b"[NOPERM] Quotas are set by the administrator.")

    async def do_SELECT(self, tag: bytes, parts: list[bytes], uid: bool,
                        readonly: bool = False) -> bytes:
        args = tokenize(parts)
        if len(args) not in (1, 2) or (len(args) == 2 and not isinstance(args[1], list)):
            raise Bad(b"SELECT takes a mailbox name and optional parameters.")
        name = self._mailbox(args[0])
        resync = self._select_parameters(args[1]) if len(args) == 2 else None
        if self.view is not None:
            self._unselect()
            self._write(b"* OK [CLOSED] Previous mailbox closed.")
        if len(args) == 2:
            self._enable_condstore()
        shared = await self.account.open(name)
        view = View(shared, readonly)
        view.condstore, view.qresync = self.condstore, self.qresync
        shared.attach(view)
        view.recent = shared.claim_recent(view)
        view.told_recent = len(view.recent)
        self.view = view
        self.state = "selected"
        lines = flag_announcements(shared)
        if readonly:
            lines[1] = b"* OK [PERMANENTFLAGS ()] Read-only mailbox."
        lines += [b"* %d EXISTS" % view.exists, b"* %d RECENT" % len(view.recent)]
        unseen = next((i + 1 for i, u in enumerate(view.uids)
                       if "\\Seen" not in shared.messages[u].flags), None)
        if unseen is not None:
            lines.append(b"* OK [UNSEEN %d] First unseen." % unseen)
        lines += [b"* OK [UIDVALIDITY %d] UIDs valid." % shared.uidvalidity,
                  b"* OK [UIDNEXT %d] Predicted next UID." % shared.uidnext]
        # RFC 7162 3.1.2.1: with MODSEQs persisted, every SELECT/EXAMINE says
        # HIGHESTMODSEQ, CONDSTORE enabled or not (Dovecot does the same).
        lines.append(b"* OK [HIGHESTMODSEQ %d] Highest." % shared.modseq)
        if resync is not None and resync[0] == shared.uidvalidity:
            lines += self._resync_lines(view, *resync[1:])
        self._write_lines(lines)
        mode = b"READ-ONLY" if readonly else b"READ-WRITE"
        return b"[" + mode + b"] " + (b"EXAMINE" if readonly else b"SELECT") + b" completed."

    def _select_parameters(self, params: list[Any]
                           ) -> tuple[int, int, list[tuple[int | None, int | None]] | None] | None:
        """SELECT's ``(CONDSTORE)`` or ``(QRESYNC (uidvalidity modseq [known-uids
        [seq-match]]))``: the QRESYNC values, if given (seq-match is not needed:
        the answer is exact, or a superset once the expunge log was trimmed)."""
        resync = None
        i = 0
        while i < len(params):
            word = params[i]
            name = bytes(word).upper() if isinstance(word, Atom) else b""
            if name == b"CONDSTORE":
                i += 1
            elif name == b"QRESYNC" and i + 1 < len(params) and isinstance(params[i + 1], list):
                if not self.qresync:
                    raise Bad(b"QRESYNC must be enabled first.")
                values = params[i + 1]
                if not 2 <= len(values) <= 4 or not all(isinstance(v, Atom) for v in values[:3]):
                    raise Bad(b"Invalid QRESYNC parameter.")
                uidvalidity = _number(values[0], b"UIDVALIDITY")
                modseq = _number(values[1], b"mod-sequence")
                known = None
                if len(values) >= 3:
                    known = parse_sequence_set(values[2])
                resync = (uidvalidity, modseq, known)
                i += 2
            else:
                raise Bad(b"Unknown SELECT parameter.")
        return resync

    def _resync_lines(self, view: View, modseq: int,
                      known: list[tuple[int | None, int | None]] | None) -> list[bytes]:
        """QRESYNC: what changed since *modseq*: VANISHED (EARLIER) (of the
        *known* UID ranges, if given), then FETCH for changed messages."""
        shared = view.shared
        lines = []
        vanished = shared.vanished_set(modseq, known)
        if vanished:
            lines.append(b"* VANISHED (EARLIER) " + vanished)
        for seq, u in enumerate(view.uids, 1):
            m = shared.messages.get(u)
            if m is not None and m.modseq > modseq:
                lines.append(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))"
                             % (seq, u, view.flag_list(m), m.modseq))
        return lines

    async def do_EXAMINE(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes:
        return await self.do_SELECT(tag, parts, uid, readonly=True)

    async def do_APPEND(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes:
        args = tokenize(parts)
        if len(args) < 2 or not isinstance(args[-1], String):
            raise Bad(b"APPEND takes a mailbox, optional flags and date, and a literal.")
        name = self._mailbox(args[0])
        flags: list[str] = []
        mtime = None
        rest = args[1:-1]
        if rest and isinstance(rest[0], list):
            flags = _flag_arguments(rest[0])
            rest = rest[1:]
        if rest and isinstance(rest[0], String):
            mtime = parse_date_time(bytes(rest[0]))
            rest = rest[1:]
        if rest:
            raise Bad(b"Unexpected APPEND arguments.")
        message = bytes(args[-1])
        if not message:
            raise No(b"Cannot append an empty message.")
        if len(message) > self.append_limit:
            raise No(b"[TOOBIG] Message too big (at most %d octets)." % self.append_limit)
        target = self.account.folder(name)
        try:
            await target.refresh()
        except FolderGone:
            raise No(b"[TRYCREATE] Mailbox does not exist.") from None
        await self.account.check_quota(len(message))
        new_uid = await target.append(message, flags, mtime)
        if new_uid is not None:
            notify_mailbox(getattr(self.factory, "mailbox_filters", None), self.account.address,
                           "append", None, target, [(None, new_uid)])
        if new_uid is None:
            return b"APPEND completed."
        return b"[APPENDUID %d %d] APPEND completed." % (target.uidvalidity, new_uid)

    # -- selected state

    async def do_CHECK(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        await self.view.shared.refresh()

    async def do_CLOSE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        view = self.view
        self._unselect()
        if not view.readonly:
            await view.shared.expunge(None, view)

    async def do_UNSELECT(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        _no_arguments(parts)
        self._unselect()

    def _writable(self) -> View:
        if self.view.readonly:
            raise No(b"[READ-ONLY] The mailbox is selected read-only.")
        return self.view

    async def do_EXPUNGE(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        view = self._writable()
        uids = None
        if uid:
            args = tokenize(parts)
            if len(args) != 1:
                raise Bad(b"UID EXPUNGE takes a UID set.")
            uids = view.resolve(parse_sequence_set(args[0]), True)
        else:
            _no_arguments(parts)
        await view.shared.refresh()
        await view.shared.expunge(uids, view)

    def _resolve(self, token: Any, uid: bool) -> list[int]:
        try:
            return self.view.resolve(parse_sequence_set(token), uid)
        except ValueError:
            raise Bad(b"Invalid message sequence number.") from None

    async def do_FETCH(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes | None:
        args = tokenize(parts)
        if len(args) not in (2, 3) or (len(args) == 3 and not isinstance(args[2], list)):
            raise Bad(b"FETCH takes a sequence set, attributes and optional modifiers.")
        view = self.view
        items = parse_fetch_items(args[1])
        changed_since, vanished = None, False
        if len(args) == 3:
            changed_since, vanished = self._fetch_modifiers(args[2], uid)
        wants_modseq = any(item.kind == b"MODSEQ" for item in items)
        if changed_since is not None or wants_modseq:
            self._enable_condstore()
        await view.shared.refresh()
        uids = self._resolve(args[0], uid)
        if self.condstore and not wants_modseq and (
                changed_since is not None
                or (not view.readonly and any(item.sets_seen for item in items))):
            items.append(FetchItem(b"MODSEQ", key=b"MODSEQ"))
        if changed_since is not None:
            if vanished:
                gone = view.shared.vanished_set(changed_since, parse_sequence_set(args[0]))
                if gone:
                    self._write(b"* VANISHED (EARLIER) " + gone)
            uids = [u for u in uids if (m := view.message(u)) is not None
                    and m.modseq > changed_since]
        return await self._fetch(view, uids, items, uid)

    def _fetch_modifiers(self, params: list[Any], uid: bool) -> tuple[int, bool]:
        """FETCH's ``(CHANGEDSINCE n [VANISHED])`` (RFC 7162 3.1.4, 3.2.6)."""
        changed_since, vanished = None, False
        i = 0
        while i < len(params):
            word = params[i]
            name = bytes(word).upper() if isinstance(word, Atom) else b""
            if name == b"CHANGEDSINCE" and i + 1 < len(params):
                changed_since = _number(params[i + 1], b"mod-sequence")
                i += 2
            elif name == b"VANISHED":
                if not uid or not self.qresync:
                    raise Bad(b"VANISHED needs UID FETCH and QRESYNC enabled.")
                vanished = True
                i += 1
            else:
                raise Bad(b"Unknown FETCH modifier.")
        if changed_since is None:
            raise Bad(b"FETCH modifiers need CHANGEDSINCE.")
        return changed_since, vanished

    async def _fetch(self, view: View, uids: list[int], items: list[FetchItem], uid: bool
                     ) -> bytes | None:
        shared = view.shared
        uid_first = uid and not any(item.kind == b"UID" for item in items)
        sets_seen = not view.readonly and any(item.sets_seen for item in items)
        needs_io = any(item.needs_file or item.kind == b"INTERNALDATE" for item in items)
        missing = False
        pacer = _Pacer()
        self.transport.registerProducer(pacer, True)
        try:
            start = 0
            while start < len(uids) and not self._disconnected:
                end, octets = start, 0
                while end < len(uids) and end - start < BATCH_MESSAGES and octets < BATCH_OCTETS:
                    m = view.message(uids[end])
                    octets += m.info.vsize if m is not None and needs_io else 0
                    end += 1
                batch = uids[start:end]
                start = end
                seen_now: set[int] = set()
                if sets_seen:
                    unseen = [u for u in batch if (m := shared.messages.get(u)) is not None
                              and "\\Seen" not in m.flags]
                    if unseen:
                        await shared.store(unseen, "add", ["\\Seen"], view)
                        seen_now = set(unseen)
                entries = []
                for u in batch:
                    m = view.message(u)
                    if m is None:
                        missing = True
                        continue
                    entries.append(FetchEntry(view.seq(u), u, view.flag_list(m), m.info,
                                              m.modseq, u in seen_now))
                if needs_io:
                    chunks = await deferToThreadPool(self.reactor, self.threadpool,
                                                     shared.render_blocking, entries, items,
                                                     uid_first)
                else:
                    chunks = [render(e, items, uid_first, None) for e in entries]
                if any(c is None for c in chunks):
                    missing = True
                if not self._disconnected:
                    self.transport.write(b"".join(c for c in chunks if c is not None))
                await pacer.wait()
                if not needs_io:
                    await deferLater(self.reactor, 0, lambda: None)
        finally:
            if not self._disconnected:
                self.transport.unregisterProducer()
        if missing:
            return b"[EXPUNGEISSUED] Some messages were expunged meanwhile."
        return None

    async def do_STORE(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes | None:
        args = tokenize(parts)
        unchanged_since = None
        if len(args) >= 4 and isinstance(args[1], list):
            modifiers = args.pop(1)
            if (len(modifiers) != 2 or not isinstance(modifiers[0], Atom)
                    or modifiers[0].upper() != b"UNCHANGEDSINCE"):
                raise Bad(b"Unknown STORE modifier.")
            unchanged_since = _number(modifiers[1], b"mod-sequence")
            self._enable_condstore()
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise Bad(b"STORE takes a sequence set, an item and flags.")
        view = self.view
        operation = args[1].upper()
        silent = operation.endswith(b".SILENT")
        if silent:
            operation = operation[:-len(b".SILENT")]
        modes = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        if operation not in modes:
            raise Bad(b"Unknown STORE item.")
        flag_tokens = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        flags = _flag_arguments(flag_tokens)
        self._writable()
        await view.shared.refresh()
        uids = self._resolve(args[0], uid)
        live = [u for u in uids if not view.is_expunged(u)]
        before = {u: m.modseq for u in live if (m := view.message(u)) is not None}
        modified = await view.shared.store(live, modes[operation], flags, view, unchanged_since)
        failed = set(modified)
        if unchanged_since is not None:
            failed.update(u for u in uids if view.is_expunged(u)
                          and (m := view.message(u)) is not None and m.modseq > unchanged_since)
        lines = []
        for u in uids:
            m = view.message(u)
            if m is None or u in failed:
                continue
            uid_part = b"UID %d " % u if uid else b""
            if silent:
                # RFC 7162 3.1.3: with CONDSTORE the new MODSEQ is sent even if .SILENT
                if not self.condstore or before.get(u, m.modseq) == m.modseq:
                    continue
                lines.append(b"* %d FETCH (%sMODSEQ (%d))" % (view.seq(u), uid_part, m.modseq))
            else:
                modseq = b" MODSEQ (%d)" % m.modseq if self.condstore else b""
                lines.append(b"* %d FETCH (%sFLAGS %s%s)"
                             % (view.seq(u), uid_part, view.flag_list(m), modseq))
            if len(lines) >= BATCH_MESSAGES:
                self._write_lines(lines)
                lines = []
                await deferLater(self.reactor, 0, lambda: None)
        self._write_lines(lines)
        if failed:
            numbers = sorted(failed) if uid else sorted(view.seq(u) for u in failed)
            return b"[MODIFIED " + format_sequence_set(numbers) + b"] Conditional STORE failed."
        return None

    async def _copy(self, parts: list[bytes], uid: bool, move: bool = False
                    ) -> tuple[SharedFolder, list, View]:
        args = tokenize(parts)
        if len(args) != 2:
            raise Bad(b"Expected a sequence set and a mailbox name.")
        view = self.view
        uids = self._resolve(args[0], uid)
        name = self._mailbox(args[1])
        target = self.account.folder(name)
        try:
            await target.refresh()
        except FolderGone:
            raise No(b"[TRYCREATE] Mailbox does not exist.") from None
        live = [u for u in uids if not view.is_expunged(u)]
        if not move:
            messages = view.shared.messages
            await self.account.check_quota(sum(messages[u].info.size for u in live))
        pairs = await target.copy_from(view.shared, live)
        return target, pairs, view

    async def do_COPY(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes:
        target, pairs, view = await self._copy(parts, uid)
        notify_mailbox(getattr(self.factory, "mailbox_filters", None), self.account.address,
                       "copy", view.shared.name, target, pairs)
        if not pairs:
            return b"COPY completed."
        return b"[COPYUID %d %s %s] COPY completed." % (
            target.uidvalidity, format_sequence_set([s for s, _ in pairs]),
            format_sequence_set([d for _, d in pairs]))

    async def do_MOVE(self, tag: bytes, parts: list[bytes], uid: bool) -> bytes:
        self._writable()
        target, pairs, view = await self._copy(parts, uid, move=True)
        if pairs:
            self._write(b"* OK [COPYUID %d %s %s] Moved." % (
                target.uidvalidity, format_sequence_set([s for s, _ in pairs]),
                format_sequence_set([d for _, d in pairs])))
            await view.shared.expunge([s for s, _ in pairs], view, only_deleted=False)
            notify_mailbox(getattr(self.factory, "mailbox_filters", None),
                           self.account.address, "move", view.shared.name, target, pairs)
        return b"MOVE completed."

    async def do_SEARCH(self, tag: bytes, parts: list[bytes], uid: bool) -> None:
        try:
            program = parse_search(raw_arguments(parts))
        except UnsupportedCharset:
            raise No(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset.") from None
        except SearchSyntaxError as e:
            raise Bad(str(e).encode("ascii", "replace")) from None
        view = self.view
        uses_modseq = program.uses_modseq()
        if uses_modseq:
            self._enable_condstore()
        await view.shared.refresh()
        uids = list(view.uids)
        messages = [view.message(u) for u in uids]
        seqs = await view.shared.search(program, uids, messages, set(view.recent))
        numbers = [uids[s - 1] for s in seqs] if uid else seqs
        suffix = b""
        if uses_modseq and seqs:
            suffix = b" (MODSEQ %d)" % max(messages[s - 1].modseq for s in seqs)
        self._write(b"* SEARCH" + b"".join(b" %d" % n for n in numbers) + suffix)

    async def do_IDLE(self, tag: bytes, parts: list[bytes], uid: bool) -> object:
        _no_arguments(parts)
        self._write(b"+ idling")
        self._idle_tag = tag
        view = self.view
        if view is not None:
            view.on_change = self._idle_push
            view.shared.start_idle(view)
            self._idle_push()
            d = defer.Deferred.fromCoroutine(view.shared.refresh())
            d.addErrback(lambda f: None if f.check(FolderGone) else log.failure(
                "IDLE refresh", f))
        self._continuation = self._idle_done
        return _NO_REPLY

    def _idle_push(self) -> None:
        """The selected folder changed while idling: send the updates now."""
        if self._pushing or self.view is None or self._idle_tag is None:
            return
        self._pushing = True

        async def push() -> None:
            try:
                await self._announce(True, idle=True)
            finally:
                self._pushing = False

        defer.Deferred.fromCoroutine(push()).addErrback(
            lambda f: log.failure("IDLE push", f))

    def _idle_done(self, parts: list[bytes]) -> defer.Deferred:
        tag, self._idle_tag = self._idle_tag, None
        view = self.view
        if view is not None:
            view.on_change = None
            view.shared.stop_idle(view)
        line = parts[0] if len(parts) == 1 else b""

        async def done() -> None:
            if line.strip().upper() != b"DONE":
                raise Bad(b"Expected DONE.")

        return defer.Deferred.fromCoroutine(self._run(tag, b"IDLE", done(), True))


def _quota_line(used: int, limit: int) -> bytes:
    """An untagged QUOTA response; STORAGE counts units of 1024 octets (RFC 9208)."""
    return b'* QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024)


def _number(token: Any, what: bytes) -> int:
    """A positive 63-bit number argument."""
    if not isinstance(token, Atom) or not token.isdigit() or len(token) > 19:
        raise Bad(b"Invalid " + what + b".")
    return int(token)


def _no_arguments(parts: list[bytes]) -> None:
    if len(parts) > 1 or parts[0].strip():
        raise Bad(b"This command takes no arguments.")


STATUS_ITEMS = frozenset({b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN",
                          b"APPENDLIMIT", b"HIGHESTMODSEQ"})
UID_COMMANDS = frozenset({b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE"})
_ANY = ("unauth", "auth", "selected")
_AUTHED = ("auth", "selected")
_SELECTED = ("selected",)
COMMANDS: dict[bytes, tuple[Callable[..., Awaitable[Any]], tuple[str, ...]]] = {
    b"CAPABILITY": (IMAPServer.do_CAPABILITY, _ANY),
    b"NOOP": (IMAPServer.do_NOOP, _ANY),
    b"LOGOUT": (IMAPServer.do_LOGOUT, _ANY),
    b"ID": (IMAPServer.do_ID, _ANY),
    b"STARTTLS": (IMAPServer.do_STARTTLS, ("unauth",)),
    b"LOGIN": (IMAPServer.do_LOGIN, ("unauth",)),
    b"AUTHENTICATE": (IMAPServer.do_AUTHENTICATE, ("unauth",)),
    b"NAMESPACE": (IMAPServer.do_NAMESPACE, _AUTHED),
    b"ENABLE": (IMAPServer.do_ENABLE, ("auth",)),
    b"CREATE": (IMAPServer.do_CREATE, _AUTHED),
    b"DELETE": (IMAPServer.do_DELETE, _AUTHED),
    b"RENAME": (IMAPServer.do_RENAME, _AUTHED),
    b"SUBSCRIBE": (IMAPServer.do_SUBSCRIBE, _AUTHED),
    b"UNSUBSCRIBE": (IMAPServer.do_UNSUBSCRIBE, _AUTHED),
    b"LIST": (IMAPServer.do_LIST, _AUTHED),
    b"LSUB": (IMAPServer.do_LSUB, _AUTHED),
    b"STATUS": (IMAPServer.do_STATUS, _AUTHED),
    b"GETQUOTAROOT": (IMAPServer.do_GETQUOTAROOT, _AUTHED),
    b"GETQUOTA": (IMAPServer.do_GETQUOTA, _AUTHED),
    b"SETQUOTA": (IMAPServer.do_SETQUOTA, _AUTHED),
    b"SELECT": (IMAPServer.do_SELECT, _AUTHED),
    b"EXAMINE": (IMAPServer.do_EXAMINE, _AUTHED),
    b"APPEND": (IMAPServer.do_APPEND, _AUTHED),
    b"IDLE": (IMAPServer.do_IDLE, _AUTHED),
    b"CHECK": (IMAPServer.do_CHECK, _SELECTED),
    b"CLOSE": (IMAPServer.do_CLOSE, _SELECTED),
    b"UNSELECT": (IMAPServer.do_UNSELECT, _SELECTED),
    b"EXPUNGE": (IMAPServer.do_EXPUNGE, _SELECTED),
    b"FETCH": (IMAPServer.do_FETCH, _SELECTED),
    b"STORE": (IMAPServer.do_STORE, _SELECTED),
    b"COPY": (IMAPServer.do_COPY, _SELECTED),
    b"MOVE": (IMAPServer.do_MOVE, _SELECTED),
    b"SEARCH": (IMAPServer.do_SEARCH, _SELECTED),
}


def register_imap(realm: Any, store: MailStore, reactor: Any, threadpool: ThreadPool,
                  registry: FolderRegistry | None = None, directory: Any = None
                  ) -> FolderRegistry:
    """Teach *realm* to hand out :class:`IMAPAccount` avatars for IAccount.

    The account's Maildir and its special-use folders are made ready in the
    thread pool before the avatar is handed out. With a *directory*, the
    account's ``quota_bytes`` is enforced at APPEND and COPY (read at each
    check, so a changed quota applies at once).
    """
    if registry is None:
        registry = FolderRegistry(reactor, threadpool)

    def quota_of(address: str) -> Callable[[], int] | None:
        if directory is None:
            return None

        def quota() -> int:
            account = directory.get_account(address)
            return account.quota_bytes if account is not None else 0

        return quota

    def open_blocking(address: str) -> IMAPAccount:
        account = IMAPAccount(address, store.maildir(address), registry, quota_of(address))
        account.prepare_blocking()
        return account

    def open_account(address: str) -> defer.Deferred:
        return deferToThreadPool(reactor, threadpool, open_blocking, address)

    realm.register(IAccount, open_account)
    return registry


class IMAPFactory(protocol.ServerFactory):
    """Builds :class:`IMAPServer` sessions (imap with STARTTLS, or imaps).

    *store* is kept for symmetry with the other factories (quota checks will
    need it); folders come from the avatar. ``sessions`` holds the open
    sessions.
    """

    protocol = IMAPServer

    def __init__(self, portal: Portal, config: Config, tls_context: Any = None,
                 implicit_tls: bool = False, reactor: Any = None,
                 threadpool: ThreadPool | None = None, store: MailStore | None = None,
                 throttle: LoginThrottle | None = None, mailbox_filters: Any = None) -> None:
        self.portal = portal
        #: the [filters] mailbox chain, told about COPY, MOVE and APPEND
        self.mailbox_filters = mailbox_filters
        self.config = config
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.reactor = reactor
        self.threadpool = threadpool
        self.store = store
        if reactor is None:
            from twisted.internet import reactor
        self.throttle = ensure_throttle(throttle, config, reactor)
        self.sessions: set[IMAPServer] = set()

    def buildProtocol(self, addr: Any) -> IMAPServer:
        session = self.protocol(self.portal, self.config, tls_context=self.tls_context,
                                implicit_tls=self.implicit_tls, reactor=self.reactor,
                                threadpool=self.threadpool, throttle=self.throttle)
        session.factory = self
        return session
