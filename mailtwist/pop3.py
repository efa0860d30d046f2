"""The POP3 server (RFC 1939, 2449 CAPA, 2595 STLS, 5034 AUTH PLAIN) over a user's INBOX.

Twisted's ``POP3`` advertises joke capabilities, has no STLS, accepts passwords
on plaintext connections, dot-stuffs per chunk (and never the first line),
crashes on bad DELE arguments and answers pipelined commands out of order when
a reply is asynchronous. This subclass keeps its idle timeout and the
``IMailbox`` contract but frames input with :class:`LineBuffer` and runs one
command at a time: while a command waits on a Deferred (login, a message read,
UPDATE) no further input is interpreted, so replies come in order (PIPELINING
is honest) and STLS can drop the plaintext pipelined behind it.

The mailbox is :class:`MaildirMailbox`, a ``twisted.mail.pop3.IMailbox`` over
a scan of the INBOX taken at login. All file I/O runs in the thread pool. DELE
and the Seen flag of RETR'd messages are applied only at QUIT (the UPDATE
state); a session that ends any other way leaves the Maildir untouched.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import threading
from io import BytesIO
from typing import Any, Callable, Sequence

from twisted.cred import credentials, error as cred_error
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail.pop3 import POP3, IMailbox
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailtwist.config import Config
from mailtwist.serial import SerialCommands
from mailtwist.storage.maildir import Folder, MessageInfo
from mailtwist.storage.store import MailStore
from mailtwist.throttle import ensure_throttle, LoginThrottle, LoginThrottled

log = Logger()

MAX_LINE = 1024
MAX_PAUSED_INPUT = 64 * 1024

PLAINTEXT_DISALLOWED = (
    b"[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections;"
    b" use STLS first."
)
AUTH_FAILED = b"[AUTH] Authentication failed."
IN_USE = b"[IN-USE] Mailbox is locked by another POP3 session."
TEMP_FAILURE = b"[SYS/TEMP] Internal error, try again later."
THROTTLED = b"[SYS/TEMP] Too many failed logins, try again later."
NO_SUCH_MESSAGE = b"no such message"
_BAD_LINE = object()
"""next_command's result for a line with a bare CR, bare LF or NUL."""


class MailboxInUse(Exception):
    """Another POP3 session holds this mailbox (RFC 2449 ``[IN-USE]``)."""


class LineTooLong(Exception):
    """A command line exceeded the limit."""


class LineBuffer:
    """Splits received bytes into command lines (sans-IO).

    Lines end with CRLF; a bare LF ends a line too, and :attr:`bare_line_end`
    says so, for the session to refuse it. :meth:`clear` drops all input not
    yet returned, which is how STLS discards pipelined plaintext.
    """

    def __init__(self, max_length: int = MAX_LINE) -> None:
        self.max_length = max_length
        self._data = b""
        self.bare_line_end = False
        """Whether the last line returned ended in a bare LF (no CR before it)."""

    def feed(self, data: bytes) -> None:
        self._data += data

    def next_line(self) -> bytes | None:
        """The next complete line without its terminator, or None if none yet.

        Raises LineTooLong for a line (complete or not) over the limit.
        """
        end = self._data.find(b"\n")
        if end < 0:
            if len(self._data) > self.max_length + 1:
                raise LineTooLong()
            return None
        line, self._data = self._data[:end], self._data[end + 1:]
        self.bare_line_end = not line.endswith(b"\r")
        if not self.bare_line_end:
            line = line[:-1]
        if len(line) > self.max_length:
            raise LineTooLong()
        return line

    def clear(self) -> None:
        self._data = b""

    def __len__(self) -> int:
        return len(self._data)


def format_uidl(uid: int, uidvalidity: int) -> bytes:
    """Dovecot's default ``pop3_uidl_format`` ``%08Xu%08Xv``.

    Dovecot's ``X`` modifier prints ``%llx``, i.e. lowercase hex, so a mailbox
    migrated with its ``dovecot-uidlist`` keeps the UIDLs clients remember.
    """
    return b"%08x%08x" % (uid, uidvalidity)


_BARE_LF = re.compile(rb"(?<!\r)\n")


def dot_stuff(message: bytes) -> bytes:
    """The multi-line response body for *message*: CRLF line ends, every line
    starting with '.' (the first too) dot-stuffed, ending with ``.\\r\\n``."""
    message = _BARE_LF.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def top_of_message(message: bytes, lines: int) -> bytes:
    """The header, the blank line and the first *lines* body lines (RFC 1939 TOP)."""
    message = _BARE_LF.sub(b"\r\n", message)
    if message.startswith(b"\r\n"):
        position = 2
    else:
        separator = message.find(b"\r\n\r\n")
        if separator < 0:
            return message
        position = separator + 4
    for _ in range(lines):
        end = message.find(b"\r\n", position)
        if end < 0:
            return message
        position = end + 2
    return message[:position]


def parse_number(argument: bytes) -> int | None:
    """A non-negative decimal argument, or None if it is not one."""
    if not argument or len(argument) > 10 or not argument.isdigit():
        return None
    return int(argument)


class MailboxLocks:
    """Which mailboxes have a POP3 session now: one session per mailbox.

    A key is the Maildir's path.  Besides this process's own record, the lock
    is an ``flock`` on ``mailtwist-pop3.lock`` in the Maildir, so the worker
    processes of ``workers = N`` (and a second server on the same data) exclude
    each other too; the kernel drops it if the process dies.
    """

    LOCK_FILE = "mailtwist-pop3.lock"

    def __init__(self) -> None:
        self._held: dict[str, int | None] = {}
        self._guard = threading.Lock()  # taken in the pool, released on the reactor

    def acquire(self, key: str) -> bool:
        """Take *key*; False if another session (here or in another process) holds it."""
        with self._guard:
            return self._acquire(key)

    def _acquire(self, key: str) -> bool:
        if key in self._held:
            return False
        try:
            fd = os.open(os.path.join(key, self.LOCK_FILE),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:
            fd = None  # no Maildir yet: nothing to share, this process's record suffices
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
        self._held[key] = fd
        return True

    def release(self, key: str) -> None:
        with self._guard:
            fd = self._held.pop(key, None)
        if fd is not None:
            os.close(fd)

    def __contains__(self, key: object) -> bool:
        return key in self._held


DEFAULT_LOCKS = MailboxLocks()
"""The process-wide registry used unless :func:`register_pop3` is given another."""


@implementer(IMailbox)
class MaildirMailbox:
    """A POP3 session's view of an INBOX: the messages present at login.

    Indexes are 0-based as ``IMailbox`` wants. Deletions and retrievals are
    only recorded here; :meth:`sync` applies them (removing DELE'd messages and
    flagging RETR'd ones Seen) in the thread pool.
    """

    def __init__(self, folder: Folder, messages: Sequence[MessageInfo], uidvalidity: int,
                 reactor: IReactorThreads, threadpool: ThreadPool,
                 on_logout: Callable[[], None] | None = None) -> None:
        self.folder = folder
        self.messages = list(messages)
        self.uidvalidity = uidvalidity
        self.reactor = reactor
        self.threadpool = threadpool
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()
        self._on_logout = on_logout

    def info(self, index: int) -> MessageInfo:
        """The message at *index*; ValueError if there is none or it is deleted."""
        if not 0 <= index < len(self.messages) or index in self.deleted:
            raise ValueError(f"no message {index}")
        return self.messages[index]

    def live(self) -> list[tuple[int, MessageInfo]]:
        """(index, info) of every message not marked deleted."""
        return [(i, m) for i, m in enumerate(self.messages) if i not in self.deleted]

    def listMessages(self, i: int | None = None) -> int | list[int]:
        if i is None:
            return [0 if n in self.deleted else m.vsize for n, m in enumerate(self.messages)]
        return self.info(i).vsize

    def getMessage(self, i: int) -> defer.Deferred:
        """A Deferred firing with a file of the message in CRLF form."""
        return self.read(i).addCallback(BytesIO)

    def getUidl(self, i: int) -> bytes:
        return format_uidl(self.info(i).uid, self.uidvalidity)

    def deleteMessage(self, i: int) -> None:
        self.info(i)
        self.deleted.add(i)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def read(self, i: int, transform: Callable[[bytes], bytes] | None = None) -> defer.Deferred:
        """Read message *i* (CRLF line ends) in the thread pool, applying
        *transform* there too so large messages are not reworked on the reactor.
        The whole message is held in memory; fine up to the SMTP size limit."""
        info = self.info(i)

        def read_blocking() -> bytes:
            data = self.folder.read_message_crlf(info)
            return transform(data) if transform is not None else data

        return deferToThreadPool(self.reactor, self.threadpool, read_blocking)

    def mark_retrieved(self, i: int) -> None:
        """Remember that message *i* was RETR'd, so UPDATE flags it Seen."""
        self.info(i)
        self.retrieved.add(i)

    def sync(self) -> defer.Deferred:
        """Apply the UPDATE state; fires with the list of messages that could
        not be removed (empty on full success)."""
        doomed = [self.messages[i] for i in sorted(self.deleted)]
        seen = [self.messages[i] for i in sorted(self.retrieved - self.deleted)
                if "S" not in self.messages[i].flags]
        d = deferToThreadPool(self.reactor, self.threadpool, self._update_blocking, doomed, seen)
        d.addCallback(self._log_update)
        return d

    def _update_blocking(self, doomed: list[MessageInfo],
                         seen: list[MessageInfo]) -> tuple[list[MessageInfo], list[str]]:
        not_removed: list[MessageInfo] = []
        problems: list[str] = []
        try:
            self.folder.remove_many(doomed)
        except OSError:
            for info in doomed:
                try:
                    self.folder.remove(info)
                except OSError as e:
                    not_removed.append(info)
                    problems.append(f"removing {info.base}: {e}")
        for info in seen:
            try:
                self.folder.mark_seen(info)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"flagging {info.base} Seen: {e}")
        return not_removed, problems

    def _log_update(self, result: tuple[list[MessageInfo], list[str]]) -> list[MessageInfo]:
        not_removed, problems = result
        for problem in problems:
            log.warn("POP3 UPDATE of {folder}: {problem}", folder=self.folder, problem=problem)
        return not_removed

    def logout(self) -> None:
        """End of session: release the mailbox lock (idempotent)."""
        on_logout, self._on_logout = self._on_logout, None
        if on_logout is not None:
            on_logout()


def register_pop3(realm: Any, store: MailStore, reactor: IReactorThreads,
                  threadpool: ThreadPool, locks: MailboxLocks | None = None) -> MailboxLocks:
    """Teach *realm* to hand out :class:`MaildirMailbox` avatars for IMailbox.

    The lock is taken before the INBOX scan and released by the avatar's
    ``logout`` (QUIT or connection loss) or when opening fails.
    """
    locks = DEFAULT_LOCKS if locks is None else locks

    def open_blocking(address: str, key: str) -> tuple[Folder, list[MessageInfo], int]:
        """Lock (an flock: file I/O, so here in the pool), then scan the INBOX."""
        if not locks.acquire(key):
            raise MailboxInUse(address)
        try:
            folder = store.maildir(address).folder("INBOX")
            return folder, folder.scan(), folder.uidvalidity
        except BaseException:
            locks.release(key)
            raise

    def open_mailbox(address: str) -> defer.Deferred:
        key = str(store.path_for(address))

        def opened(result: tuple[Folder, list[MessageInfo], int]) -> MaildirMailbox:
            folder, messages, uidvalidity = result
            return MaildirMailbox(folder, messages, uidvalidity, reactor, threadpool,
                                  on_logout=lambda: locks.release(key))

        d = deferToThreadPool(reactor, threadpool, open_blocking, address, key)
        return d.addCallback(opened)

    realm.register(IMailbox, open_mailbox)
    return locks


class POP3Server(SerialCommands, POP3):
    """One POP3 session. See the module docstring for what differs from Twisted."""

    max_paused_input = MAX_PAUSED_INPUT
    max_errors = 10
    max_auth_failures = 3
    authorization_commands = frozenset({b"CAPA", b"USER", b"PASS", b"AUTH", b"APOP", b"STLS",
                                        b"QUIT"})
    transaction_commands = frozenset({b"CAPA", b"STAT", b"LIST", b"UIDL", b"TOP", b"RETR",
                                      b"DELE", b"RSET", b"NOOP", b"QUIT"})

    def __init__(self, portal: Portal | None, config: Config, tls_context: Any = None,
                 implicit_tls: bool = False, reactor: Any = None,
                 throttle: LoginThrottle | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.portal = portal
        self.throttle = ensure_throttle(throttle, config, reactor)
        self.config = config
        self.tls_context = tls_context
        self.secure = implicit_tls
        self.reactor = reactor
        self.callLater = reactor.callLater
        self.timeOut = config.pop3_idle_timeout
        self.lines = LineBuffer(MAX_LINE)
        self.mbox: MaildirMailbox | None = None
        self.errors = 0
        self.auth_failures = 0
        self._user: bytes | None = None
        self._sasl_pending = False
        self._disconnected = False
        self._update: defer.Deferred | None = None

    # Connection and framing

    def connectionMade(self) -> None:
        self.successResponse(b"mailtwist POP3 server ready.")
        self.setTimeout(self.timeOut)
        log.debug("POP3 connection from {peer}", peer=self.transport.getPeer())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Release the mailbox; a QUIT's UPDATE still running releases it when done."""
        self._disconnected = True
        self.connected = False
        self.setTimeout(None)
        if self._update is None:
            self._logout()

    def _logout(self) -> None:
        on_logout, self._onLogout = self._onLogout, None
        if on_logout is not None:
            on_logout()

    def dataReceived(self, data: bytes) -> None:
        if self._disconnected or self.transport.disconnecting:
            return
        self.lines.feed(data)
        self.run_commands()

    def next_command(self) -> bytes | object | None:
        try:
            line = self.lines.next_line()
        except LineTooLong:
            self.failResponse(b"Line too long.")
            self.transport.loseConnection()
            return None
        if line is not None and (self.lines.bare_line_end or b"\r" in line or b"\0" in line):
            return _BAD_LINE
        return line

    def handle_command(self, command: bytes | object) -> defer.Deferred | None:
        if command is _BAD_LINE:
            # RFC 1939 requires CRLF; a line a proxy might split differently is refused.
            self._sasl_pending = False
            return self._protocol_error(b"Bare CR, bare LF or NUL in command; lines must end"
                                        b" with CRLF.")
        return self.lineReceived(command)

    def buffered_input(self) -> int:
        return len(self.lines)

    def command_failed(self, failure: Failure) -> None:
        log.failure("POP3 command failed", failure)
        if not self._disconnected:
            self.failResponse(TEMP_FAILURE)

    def lineReceived(self, line: bytes) -> defer.Deferred | None:
        """Dispatch one command; a Deferred result holds back further input."""
        self.resetTimeout()
        if self._sasl_pending:
            self._sasl_pending = False
            return self._auth_plain(line.strip())
        command, _, argument = line.partition(b" ")
        command = command.upper()
        if self.mbox is not None:
            commands = self.transaction_commands
        else:
            commands = self.authorization_commands
        if command not in commands:
            known = command in self.transaction_commands or command in self.authorization_commands
            return self._protocol_error(b"Command not valid in this state." if known
                                        else b"Unknown command.")
        handler = getattr(self, "do_" + command.decode("ascii"))
        return handler(argument)

    def successResponse(self, message: bytes | str = b"") -> None:
        if isinstance(message, str):
            message = message.encode("utf-8")
        self.transport.write(b"+OK " + message + b"\r\n" if message else b"+OK\r\n")

    def failResponse(self, message: bytes | str = b"") -> None:
        if isinstance(message, str):
            message = message.encode("utf-8")
        self.transport.write(b"-ERR " + message + b"\r\n" if message else b"-ERR\r\n")

    def _protocol_error(self, message: bytes) -> None:
        """Answer a bad command; too many of them end the session."""
        self.failResponse(message)
        self.errors += 1
        if self.errors >= self.max_errors:
            self.failResponse(b"Too many bad commands, closing connection.")
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.failResponse(b"Disconnected for inactivity.")
        self.transport.loseConnection()

    def shutdown_notice(self) -> None:
        """The server is stopping (mailtwist/shutdown.py): -ERR and close."""
        if self._disconnected or self.transport is None:
            return
        self.failResponse(b"Server shutting down")
        self.transport.loseConnection()

    # AUTHORIZATION state

    @property
    def auth_allowed(self) -> bool:
        """Passwords may be sent now: over TLS, or when the admin allows plaintext."""
        return self.secure or self.config.allow_plaintext_auth

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self.auth_allowed:
                caps += [b"USER", b"SASL PLAIN"]
            if self.tls_context is not None and not self.secure:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION mailtwist")
        return caps

    def do_CAPA(self, argument: bytes) -> None:
        self.transport.write(b"".join(
            [b"+OK Capability list follows\r\n"]
            + [cap + b"\r\n" for cap in self.listCapabilities()]
            + [b".\r\n"]
        ))

    def do_STLS(self, argument: bytes) -> None:
        if argument.strip():
            return self._protocol_error(b"STLS takes no arguments.")
        if self.secure:
            return self.failResponse(b"TLS is already active.")
        if self.tls_context is None:
            return self.failResponse(b"TLS is not available.")
        self.successResponse(b"Begin TLS negotiation")
        self.lines.clear()
        self._user = None
        self.transport.startTLS(self.tls_context)
        self.secure = True

    def do_USER(self, argument: bytes) -> None:
        if not self.auth_allowed:
            return self.failResponse(PLAINTEXT_DISALLOWED)
        user = argument.strip()
        if not user:
            return self._protocol_error(b"USER needs a name.")
        self._user = user
        self.successResponse()

    def do_PASS(self, argument: bytes) -> defer.Deferred | None:
        if not self.auth_allowed:
            return self.failResponse(PLAINTEXT_DISALLOWED)
        if self._user is None:
            return self._protocol_error(b"No USER given.")
        user, self._user = self._user, None
        return self._login(user, argument)

    def do_APOP(self, argument: bytes) -> None:
        self.failResponse(b"APOP is not supported.")

    def do_AUTH(self, argument: bytes) -> defer.Deferred | None:
        words = argument.split()
        if not words:
            mechanisms = b"PLAIN\r\n" if self.auth_allowed else b""
            self.transport.write(b"+OK\r\n" + mechanisms + b".\r\n")
            return None
        if not self.auth_allowed:
            return self.failResponse(PLAINTEXT_DISALLOWED)
        if words[0].upper() != b"PLAIN":
            return self.failResponse(b"Unsupported authentication mechanism.")
        if len(words) > 2:
            return self._protocol_error(b"Syntax error.")
        if len(words) == 2:
            return self._auth_plain(words[1])
        self._sasl_pending = True
        self.transport.write(b"+ \r\n")
        return None

    def _auth_plain(self, response: bytes) -> defer.Deferred | None:
        if response == b"*":
            return self.failResponse(b"Authentication cancelled.")
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return self._protocol_error(b"Invalid base64 data.")
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return self._protocol_error(b"Invalid AUTH PLAIN response.")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            d = self.throttle.reject(self._peer_address(), authcid)
            d.addErrback(self._login_failed)
            return d
        return self._login(authcid, password)

    def _peer_address(self) -> str:
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", peer))

    def _login(self, user: bytes, password: bytes) -> defer.Deferred:
        if self.portal is None:
            return self._login_failed(Failure(cred_error.UnauthorizedLogin("no portal")))
        d = self.throttle.login(self.portal, self._peer_address(),
                                credentials.UsernamePassword(user, password), None, IMailbox)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(user,))
        return d

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]], user: bytes) -> None:
        _, avatar, logout = result
        if self._disconnected:
            logout()
            return
        self.mbox = avatar
        self._onLogout = logout
        log.info("POP3 login {user!r} from {peer}", user=user, peer=self.transport.getPeer())
        self.successResponse(b"Logged in.")

    def _login_failed(self, failure: Failure) -> None:
        """Answer a failed login; the throttle has already waited its delay."""
        if failure.check(MailboxInUse):
            return self.failResponse(IN_USE)
        if failure.check(LoginThrottled):
            log.info("POP3 login from {peer} refused: too many failed logins",
                     peer=self.transport.getPeer())
            if not self._disconnected:
                self.failResponse(THROTTLED)
                self.transport.loseConnection()
            return None
        if not failure.check(cred_error.LoginFailed):
            log.failure("POP3 login error", failure)
            return self.failResponse(TEMP_FAILURE)
        self.auth_failures += 1
        log.info("POP3 failed login from {peer}", peer=self.transport.getPeer())
        return self._report_auth_failure()

    def _report_auth_failure(self) -> None:
        if self._disconnected:
            return
        self.failResponse(AUTH_FAILED)
        if self.auth_failures >= self.max_auth_failures:
            self.transport.loseConnection()

    def do_QUIT(self, argument: bytes) -> defer.Deferred | None:
        if self.mbox is None:
            self.successResponse(b"Logging out.")
            self.transport.loseConnection()
            return None
        self._update = self.mbox.sync()
        self._update.addCallbacks(self._updated, self._update_failed)
        return self._update

    def _updated(self, not_removed: list[MessageInfo]) -> None:
        self._update = None
        self._logout()
        if not_removed:
            self.failResponse(b"[SYS/TEMP] Some deleted messages were not removed.")
        else:
            self.successResponse(b"Logging out.")
        self.transport.loseConnection()

    def _update_failed(self, failure: Failure) -> None:
        self._update = None
        self._logout()
        log.failure("POP3 UPDATE failed", failure)
        self.failResponse(b"[SYS/TEMP] Some deleted messages were not removed.")
        self.transport.loseConnection()

    # TRANSACTION state

    def _message_index(self, argument: bytes) -> int | None:
        """0-based index of the live message numbered *argument*, else None."""
        number = parse_number(argument)
        if number is None or number < 1:
            return None
        try:
            self.mbox.info(number - 1)
        except ValueError:
            return None
        return number - 1

    def _drop_summary(self) -> bytes:
        live = self.mbox.live()
        return b"%d messages (%d octets)" % (len(live), sum(m.vsize for _, m in live))

    def do_STAT(self, argument: bytes) -> None:
        if argument.strip():
            return self._protocol_error(b"STAT takes no arguments.")
        live = self.mbox.live()
        self.successResponse(b"%d %d" % (len(live), sum(m.vsize for _, m in live)))

    def do_LIST(self, argument: bytes) -> None:
        return self._listing(argument, lambda i, m: b"%d" % m.vsize)

    def do_UIDL(self, argument: bytes) -> None:
        return self._listing(argument, lambda i, m: self.mbox.getUidl(i))

    def _listing(self, argument: bytes, value: Callable[[int, MessageInfo], bytes]) -> None:
        words = argument.split()
        if len(words) > 1:
            return self._protocol_error(b"Syntax error.")
        if words:
            index = self._message_index(words[0])
            if index is None:
                return self.failResponse(NO_SUCH_MESSAGE)
            return self.successResponse(b"%d %s" % (index + 1, value(index, self.mbox.info(index))))
        lines = [b"+OK " + self._drop_summary() + b"\r\n"]
        lines += [b"%d %s\r\n" % (i + 1, value(i, m)) for i, m in self.mbox.live()]
        lines.append(b".\r\n")
        self.transport.write(b"".join(lines))

    def do_RETR(self, argument: bytes) -> defer.Deferred | None:
        words = argument.split()
        if len(words) != 1:
            return self._protocol_error(b"Syntax error: RETR message-number.")
        index = self._message_index(words[0])
        if index is None:
            return self.failResponse(NO_SUCH_MESSAGE)
        size = self.mbox.info(index).vsize
        d = self.mbox.read(index, dot_stuff)
        d.addCallback(self._send_message, b"%d octets" % size)
        d.addCallback(lambda _: self.mbox.mark_retrieved(index))
        d.addErrback(self._read_failed)
        return d

    def do_TOP(self, argument: bytes) -> defer.Deferred | None:
        words = argument.split()
        if len(words) != 2:
            return self._protocol_error(b"Syntax error: TOP message-number lines.")
        index = self._message_index(words[0])
        if index is None:
            return self.failResponse(NO_SUCH_MESSAGE)
        lines = parse_number(words[1])
        if lines is None:
            return self.failResponse(b"Invalid line count.")
        d = self.mbox.read(index, lambda message: dot_stuff(top_of_message(message, lines)))
        d.addCallback(self._send_message, b"Top of message follows")
        d.addErrback(self._read_failed)
        return d

    def _send_message(self, body: bytes, status: bytes) -> None:
        if not self._disconnected:
            self.transport.write(b"+OK " + status + b"\r\n" + body)

    def _read_failed(self, failure: Failure) -> None:
        if failure.check(FileNotFoundError):
            self.failResponse(b"Message is no longer available.")
        elif failure.check(PermissionError, IsADirectoryError):
            # A damaged store, not a bug: one line for the operator, no traceback.
            log.error("POP3 cannot read a message: {error}", error=failure.getErrorMessage())
            self.failResponse(TEMP_FAILURE)
        else:
            log.failure("POP3 message read failed", failure)
            self.failResponse(TEMP_FAILURE)

    def do_DELE(self, argument: bytes) -> None:
        words = argument.split()
        if len(words) != 1:
            return self._protocol_error(b"Syntax error: DELE message-number.")
        index = self._message_index(words[0])
        if index is None:
            return self.failResponse(NO_SUCH_MESSAGE)
        self.mbox.deleteMessage(index)
        self.successResponse(b"Marked to be deleted.")

    def do_RSET(self, argument: bytes) -> None:
        self.mbox.undeleteMessages()
        self.successResponse(self._drop_summary())

    def do_NOOP(self, argument: bytes) -> None:
        self.successResponse()


class POP3Factory(protocol.ServerFactory):
    """Builds :class:`POP3Server` sessions.

    *tls_context* enables STLS; with *implicit_tls* (pop3s, the factory
    wrapped in ``TLSMemoryBIOFactory``) sessions count as secure from the
    start. *threadpool* is kept for symmetry with the other protocol
    factories; the file I/O itself runs in the avatars' pool.
    """

    protocol = POP3Server

    def __init__(self, portal: Portal, config: Config, tls_context: Any = None,
                 implicit_tls: bool = False, reactor: IReactorTime | None = None,
                 threadpool: ThreadPool | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.throttle = ensure_throttle(throttle, config, reactor)
        self.portal = portal
        self.config = config
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.reactor = reactor
        self.threadpool = threadpool

    def buildProtocol(self, addr: Any) -> POP3Server:
        session = self.protocol(self.portal, self.config, tls_context=self.tls_context,
                                implicit_tls=self.implicit_tls, reactor=self.reactor,
                                throttle=self.throttle)
        session.factory = self
        return session
