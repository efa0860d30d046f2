"""SpamAssassin's spamd as a data-stage filter (the spamc/spamd protocol).

The filter sends the message to spamd with ``SYMBOLS SPAMC/1.5`` over TCP
(a Twisted protocol, never a blocking socket), reads ``Spam: True ; 7.3 / 5.0``
and the symbol list, and answers:

* ``X-Spam-Status``, ``X-Spam-Score`` and (above ``junk_score``)
  ``X-Spam-Flag: YES`` headers, after removing any the message came with (a
  sender could forge them to fool a later filter or the user's client);
* ``FileInto(junk_folder)`` at or above ``junk_score``;
* ``550 5.7.1`` at or above ``reject_score`` (0: never).

Messages bigger than ``max_size`` and authenticated submissions (unless
``check_authenticated``) are not sent to spamd.  When spamd cannot be reached,
answers garbage or does not answer within ``timeout``, ``on_failure``
decides: ``accept`` (fail open: deliver unchecked, log one line; the
default) or ``tempfail`` (``451 4.7.1``: the client retries later).

The header helpers and the failure policy are shared with the rspamd filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.logger import Logger

from mailtwist.filters import (
    Filter,
    FilterConfigError,
    FilterFactory,
    apply_header_actions,
)
from mailtwist.interfaces import (
    AddHeader,
    Continue,
    FileInto,
    Reject,
    RemoveHeader,
    TempFail,
)

log = Logger()

#: The headers the spam filters add; incoming copies are removed first.
SPAM_HEADERS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Status", "X-Spam-Level")

ON_FAILURE = ("accept", "tempfail")

SCANNER_UNAVAILABLE = TempFail("Spam scanner unavailable, try again later", 451, "4.7.1")


class ScannerError(Exception):
    """The spam scanner could not be asked or gave an answer we cannot use."""


@dataclass(frozen=True)
class SpamResult:
    """What a scanner said about one message."""

    score: float
    threshold: float
    symbols: tuple[str, ...] = ()
    #: rspamd's action ("no action", "add header", ...); "" for spamd
    action: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def remove_spam_headers() -> list[RemoveHeader]:
    """Actions removing every incoming X-Spam-* header we are going to set."""
    return [RemoveHeader(name) for name in SPAM_HEADERS]


def spam_headers(result: SpamResult, is_spam: bool, scanner: str) -> list[AddHeader]:
    """The X-Spam-Status/-Score/-Flag headers for *result* (in the order they
    end up in the message: Flag, Score, Status from the top)."""
    symbols = ",".join(result.symbols) or "none"
    status = (f"{'Yes' if is_spam else 'No'}, score={result.score:.1f} "
              f"required={result.threshold:.1f} tests={symbols} scanner={scanner}")
    headers = [AddHeader("X-Spam-Status", _fold(status)),
               AddHeader("X-Spam-Score", f"{result.score:.1f}")]
    if is_spam:
        headers.append(AddHeader("X-Spam-Flag", "YES"))
    return headers


def _fold(value: str, width: int = 900) -> str:
    """Keep the header line below the 998-octet limit of RFC 5322."""
    return value if len(value) <= width else value[:width - 3] + "..."


class ScannerFilter(Filter):
    """What spamd and rspamd filters share: skipping, forged-header removal and
    the failure policy.  Subclasses implement :meth:`scan` and :meth:`decide`."""

    name = "spam"

    def __init__(self, *, timeout: float, max_size: int, on_failure: str,
                 check_authenticated: bool, junk_folder: str, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.timeout = timeout
        self.max_size = max_size
        self.on_failure = on_failure
        self.check_authenticated = check_authenticated
        self.junk = FileInto(junk_folder)
        self.clock = clock

    def describe(self) -> str:
        """Where the scanner is, for log lines."""
        raise NotImplementedError

    def scan(self, session, message: bytes) -> defer.Deferred:
        """Fires with a SpamResult or fails (ScannerError, connection errors)."""
        raise NotImplementedError

    def decide(self, result: SpamResult, cleanup: list) -> Any:
        """The verdict for *result*; *cleanup* are the header removals."""
        raise NotImplementedError

    def data(self, session, message):
        cleanup = remove_spam_headers()
        if session.user and not self.check_authenticated:
            return Continue(*cleanup)
        if self.max_size and len(message) > self.max_size:
            log.info("{filter}: message {queue_id} of {size} bytes not scanned "
                     "(max_size {max_size})", filter=self.name, queue_id=session.queue_id,
                     size=len(message), max_size=self.max_size)
            return Continue(*cleanup)
        clean = apply_header_actions(message, cleanup)
        d = self.scan(session, clean)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self.decide, self._failed, callbackArgs=(cleanup,),
                       errbackArgs=(session, cleanup))
        return d

    def _failed(self, failure, session, cleanup):
        if failure.check(defer.TimeoutError, error.TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        elif failure.check(ScannerError):
            reason = str(failure.value)
        elif failure.check(error.ConnectError):
            reason = f"cannot connect: {failure.getErrorMessage()}"
        elif failure.check(error.ConnectionLost, error.ConnectionDone):
            reason = f"connection lost: {failure.getErrorMessage()}"
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if self.on_failure == "tempfail":
            log.warn("{filter}: {where}: {reason}; message {queue_id} refused with 451",
                     filter=self.name, where=self.describe(), reason=reason,
                     queue_id=session.queue_id)
            return SCANNER_UNAVAILABLE
        log.warn("{filter}: {where}: {reason}; message {queue_id} accepted unscanned",
                 filter=self.name, where=self.describe(), reason=reason,
                 queue_id=session.queue_id)
        return Continue(*cleanup)


# -- the spamc/spamd protocol ---------------------------------------------------

class SpamdProtocol(protocol.Protocol):
    """One spamc request: ``SYMBOLS SPAMC/1.5``, the message, then the answer
    (``SPAMD/1.1 0 EX_OK``, headers, ``\\r\\n``, the comma-separated symbols).
    ``finished`` fires with a SpamResult or fails with ScannerError."""

    def __init__(self, message: bytes, user: str = "", command: str = "SYMBOLS") -> None:
        self.message = message
        self.user = user
        self.command = command
        self.buffer = b""
        self.finished: defer.Deferred = defer.Deferred(self._cancel)

    def _cancel(self, _d) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def request(self) -> bytes:
        head = [f"{self.command} SPAMC/1.5", f"Content-length: {len(self.message)}"]
        if self.user:
            head.append(f"User: {self.user}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + self.message

    def connectionMade(self) -> None:
        self.transport.write(self.request())

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 1_000_000:
            self._finish(failure=ScannerError("spamd answer too long"))
            return
        try:
            parsed = self._parse(complete=False)
        except ScannerError as e:
            self._finish(failure=e)
            return
        if parsed is not None:
            self._finish(parsed)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.finished.called:
            return
        try:
            parsed = self._parse(complete=True)
        except ScannerError as e:
            self._finish(failure=e)
            return
        self._finish(parsed)

    def _finish(self, result: SpamResult | None = None,
                failure: Exception | None = None) -> None:
        if self.finished.called:
            return
        if failure is None:
            try:
                result = self._parse(complete=True) if result is None else result
            except ScannerError as e:
                failure = e
        if self.transport is not None:
            self.transport.loseConnection()
        if failure is not None:
            self.finished.errback(failure)
        else:
            self.finished.callback(result)

    def _parse(self, complete: bool) -> SpamResult | None:
        """The result once the whole answer is in; None: wait for more."""
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            if b"\r\n" in self.buffer:
                status = self.buffer.split(b"\r\n", 1)[0]
                self._check_status(status)
            if complete:
                raise ScannerError("spamd closed the connection before its answer "
                                   f"was complete ({len(self.buffer)} bytes)")
            return None
        lines = head.decode("utf-8", "replace").split("\r\n")
        self._check_status(lines[0].encode())
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is not None:
            try:
                wanted = int(length)
            except ValueError:
                raise ScannerError(f"spamd sent a bad Content-length: {length!r}") from None
            if len(body) < wanted:
                if complete:
                    raise ScannerError("spamd closed the connection in the middle of "
                                       "its answer")
                return None
            body = body[:wanted]
        elif not complete:
            return None
        if "spam" not in headers:
            raise ScannerError("spamd's answer has no Spam header")
        return parse_spam_header(headers["spam"], body)

    @staticmethod
    def _check_status(status: bytes) -> None:
        text = status.decode("utf-8", "replace").strip()
        parts = text.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("SPAMD/"):
            raise ScannerError(f"not a spamd answer: {text[:80]!r}")
        if parts[1] != "0":
            raise ScannerError(f"spamd refused the request: {text[:200]}")


def parse_spam_header(value: str, body: bytes = b"") -> SpamResult:
    """A SpamResult from ``True ; 7.3 / 5.0`` and the SYMBOLS body."""
    flag, _, scores = value.partition(";")
    score_text, slash, threshold_text = scores.partition("/")
    if flag.strip().lower() not in ("true", "false", "yes", "no") or not slash:
        raise ScannerError(f"spamd sent a bad Spam header: {value[:80]!r}")
    try:
        score, threshold = float(score_text), float(threshold_text)
    except ValueError:
        raise ScannerError(f"spamd sent a bad Spam header: {value[:80]!r}") from None
    text = body.decode("utf-8", "replace").strip()
    symbols = tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()
    return SpamResult(score, threshold, symbols)


class SpamdFilter(ScannerFilter):
    """Scores messages with spamd at the data stage."""

    name = "spamd"

    def __init__(self, host: str = "127.0.0.1", port: int = 783, socket: str = "",
                 user: str = "", junk_score: float = 5.0, reject_score: float = 0.0,
                 reactor: Any = None, **kwargs: Any) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(clock=kwargs.pop("clock", None) or reactor, **kwargs)
        self.host = host
        self.port = port
        self.socket = socket
        self.user = user
        self.junk_score = junk_score
        self.reject_score = reject_score
        self.reactor = reactor

    def describe(self) -> str:
        return f"spamd at {self.socket or f'{self.host}:{self.port}'}"

    def endpoint(self):
        if self.socket:
            return UNIXClientEndpoint(self.reactor, self.socket, timeout=self.timeout)
        return HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)

    def scan(self, session, message):
        proto = SpamdProtocol(message, self.user)
        connecting = connectProtocol(self.endpoint(), proto)

        def cancel(_d):
            if connecting.called:
                proto.finished.cancel()
            else:
                connecting.cancel()
        result = defer.Deferred(cancel)

        def connected(_):
            proto.finished.chainDeferred(result)

        def not_connected(failure):
            if not result.called:
                result.errback(failure)
        connecting.addCallbacks(connected, not_connected)
        return result

    def decide(self, result: SpamResult, cleanup: list):
        is_junk = result.score >= self.junk_score
        if self.reject_score and result.score >= self.reject_score:
            return Reject(f"Message rejected as spam (score {result.score:.1f})", 550, "5.7.1")
        display = SpamResult(result.score, self.junk_score, result.symbols)
        actions = [*cleanup, *spam_headers(display, is_junk, "spamd")]
        if is_junk:
            actions.append(self.junk)
        return Continue(*actions)


# -- settings shared by both scanners -------------------------------------------

def check_common(settings: dict[str, Any]) -> None:
    """FilterConfigError for a bad timeout, max_size, on_failure or junk_folder."""
    if not settings["timeout"] > 0:
        raise FilterConfigError("timeout", "must be more than 0 seconds")
    if settings["max_size"] < 0:
        raise FilterConfigError("max_size", "must be 0 (no limit) or a size in bytes")
    if settings["on_failure"] not in ON_FAILURE:
        raise FilterConfigError("on_failure", f"must be one of {', '.join(ON_FAILURE)}, "
                                              f"got {settings['on_failure']!r}")
    try:
        FileInto(settings["junk_folder"])
    except ValueError as e:
        raise FilterConfigError("junk_folder", str(e)) from None


COMMON_DEFAULTS = {"timeout": 15.0, "max_size": 2_000_000, "on_failure": "accept",
                   "check_authenticated": False, "junk_folder": "Junk"}


def common_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {"timeout": float(settings["timeout"]), "max_size": settings["max_size"],
            "on_failure": settings["on_failure"],
            "check_authenticated": settings["check_authenticated"],
            "junk_folder": settings["junk_folder"]}


def _build(settings: dict[str, Any], context: Any = None) -> SpamdFilter:
    check_common(settings)
    if not settings["socket"] and not settings["host"]:
        raise FilterConfigError("host", "set host (and port) or socket")
    if not 0 < settings["port"] < 65536:
        raise FilterConfigError("port", f"must be 1-65535, got {settings['port']}")
    if settings["junk_score"] <= 0:
        raise FilterConfigError("junk_score", "must be more than 0")
    if settings["reject_score"] < 0:
        raise FilterConfigError("reject_score", "must be 0 (never reject) or a score")
    if settings["reject_score"] and settings["reject_score"] < settings["junk_score"]:
        raise FilterConfigError("reject_score", "must not be below junk_score")
    reactor = getattr(context, "reactor", None)
    return SpamdFilter(host=settings["host"], port=settings["port"], socket=settings["socket"],
                       user=settings["user"], junk_score=float(settings["junk_score"]),
                       reject_score=float(settings["reject_score"]), reactor=reactor,
                       **common_kwargs(settings))


spamd = FilterFactory(
    "spamd", _build,
    description="SpamAssassin spamd: X-Spam-* headers, Junk or reject above a score",
    defaults={"host": "127.0.0.1", "port": 783, "socket": "", "user": "",
              "junk_score": 5.0, "reject_score": 0.0, **COMMON_DEFAULTS},
)
