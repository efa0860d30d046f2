"""Sans-IO pieces of the SMTP server: framing, argument parsing, sanitising.

Nothing here touches a transport or the reactor.  The Twisted protocol feeds
received bytes to :class:`SMTPFramer`, pulls events one at a time and acts on
them; the byte-level rules that are easy to get wrong (SMTP smuggling,
dot-stuffing, line limits, envelope syntax) can therefore be tested in
isolation.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "Command",
    "CommandTooLong",
    "DataContent",
    "DataEnd",
    "Event",
    "ParseError",
    "PathArgument",
    "SMTPFramer",
    "is_valid_helo",
    "parse_mail_from",
    "parse_rcpt_to",
    "parse_size_param",
    "sanitize_header_text",
    "split_address",
]


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command line, without its line ending.

    ``bare_lf`` is true when the line ended in LF without CR (RFC 5321 requires
    CRLF; the protocol decides whether to tolerate it).
    """

    line: bytes
    bare_lf: bool = False


@dataclass(frozen=True)
class CommandTooLong:
    """A command line over the limit was received and discarded.

    Emitted once the line's terminating LF has been seen, so that the reply
    to it stays in step with the client's pipelined commands.  ``flood`` is
    True instead when more than the framer's ``max_skip`` bytes came without a
    line end: no client does that, so the server ends the session.
    """

    flood: bool = False


@dataclass(frozen=True)
class DataContent:
    """A chunk of message content: dot-unstuffed, CRLF line endings only.

    Chunks are not aligned to lines.
    """

    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """The terminating ``<CRLF>.<CRLF>`` was seen; the framer is back in
    command mode.

    ``overlong_line`` is true if some content line (after normalisation,
    excluding its CRLF) exceeded ``max_data_line``; ``size`` is the total
    length of all :class:`DataContent` chunks of this message.
    """

    overlong_line: bool
    size: int


Event = Command | CommandTooLong | DataContent | DataEnd

_TERMINATOR = b"\r\n.\r\n"
_END_AT_START = b".\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SMTPFramer:
    """Split an SMTP byte stream into commands and message content.

    Use :meth:`receive_data` to add bytes and call :meth:`next_event` until
    it returns ``None``.  Commands come out one per call and the rest stays
    buffered, so the caller can switch to DATA mode (:meth:`start_data`) or
    drop pipelined plaintext (:meth:`discard_buffer`, for STARTTLS) before
    the following bytes are interpreted.

    Command mode: a line ends at LF (a CR before it is stripped), so bare LF
    is tolerated.  A line longer than ``max_command_line`` octets (excluding
    the line ending) yields one :class:`CommandTooLong`; it is never buffered
    beyond the limit.

    DATA mode: the only terminator is ``CRLF . CRLF`` on the wire, where the
    CRLF ending the DATA command counts as the first CRLF; only CRLF starts a
    line for dot-unstuffing.  A bare LF or bare CR is content and is
    normalised to CRLF, so the stored message holds no bare line ends and
    re-stuffing it on relay protects downstream servers whatever line ends
    they honour (the SMTP-smuggling defence, both directions).  Content is
    streamed: at most four bytes are held back while waiting to see whether
    they start the terminator.
    """

    def __init__(
        self, max_command_line: int = 2048, max_data_line: int = 65536,
        max_skip: int = 1 << 20,
    ) -> None:
        if max_command_line < 1 or max_data_line < 1:
            raise ValueError("line limits must be positive")
        self._max_command_line = max_command_line
        self._max_skip = max_skip
        self._skipped = 0
        self._max_data_line = max_data_line
        self._buf = bytearray()
        self._in_data = False
        self._skipping = False
        self._at_data_start = False
        self._line_len = 0
        self._overlong = False
        self._size = 0
        self._pending_end: DataEnd | None = None

    @property
    def in_data(self) -> bool:
        """True from :meth:`start_data` until :class:`DataEnd` is returned."""
        return self._in_data

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet turned into events."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self._buf += data

    def start_data(self) -> None:
        """Interpret the following bytes as message content (after 354)."""
        if self._in_data:
            raise RuntimeError("already in DATA mode")
        self._in_data = True
        self._at_data_start = True
        self._line_len = 0
        self._overlong = False
        self._size = 0

    def discard_buffer(self) -> bytes:
        """Forget all buffered input and return it.

        Used on STARTTLS, where anything pipelined in plaintext after the
        command must not be interpreted once TLS is up.  A partly skipped
        overlong command line is forgotten too.
        """
        dropped = bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        return dropped

    def next_event(self) -> Event | None:
        """Parse the next event from the buffer; ``None`` if more is needed."""
        if self._pending_end is not None:
            end, self._pending_end = self._pending_end, None
            self._in_data = False
            return end
        if self._in_data:
            return self._next_data_event()
        return self._next_command_event()

    def _next_command_event(self) -> Event | None:
        buf = self._buf
        if self._skipping:
            newline = buf.find(b"\n")
            if newline < 0:
                self._skipped += len(buf)
                buf.clear()
                if self._skipped > self._max_skip:
                    return CommandTooLong(flood=True)
                return None
            del buf[: newline + 1]
            self._skipping = False
            self._skipped = 0
            return CommandTooLong()
        limit = self._max_command_line
        # A line of `limit` octets plus CR LF fits in limit + 2 bytes.
        newline = buf.find(b"\n", 0, limit + 2)
        if newline < 0:
            if len(buf) < limit + 2:
                return None
            self._skipping = True
            return self._next_command_event()
        line = bytes(buf[:newline])
        del buf[: newline + 1]
        bare_lf = not line.endswith(b"\r")
        if not bare_lf:
            line = line[:-1]
        if len(line) > limit:
            return CommandTooLong()
        return Command(line, bare_lf)

    def _next_data_event(self) -> Event | None:
        buf = self._buf
        if self._at_data_start:
            head = bytes(buf[:3])
            if _END_AT_START.startswith(head):
                if len(head) < 3:
                    return None
                del buf[:3]
                return self._finish_data()
            self._at_data_start = False
            if head.startswith(b"."):
                del buf[:1]
        end = buf.find(_TERMINATOR)
        if end >= 0:
            # The terminator's first CRLF ends the last content line.
            content = self._normalise(buf[: end + 2])
            del buf[: end + len(_TERMINATOR)]
            if not content:
                return self._finish_data()
            self._pending_end = DataEnd(self._overlong, self._size)
            return DataContent(content)
        cut = len(buf) - _partial_terminator_len(buf)
        if cut <= 0:
            return None
        content = self._normalise(buf[:cut])
        del buf[:cut]
        return DataContent(content)

    def _finish_data(self) -> DataEnd:
        self._in_data = False
        return DataEnd(self._overlong, self._size)

    def _normalise(self, raw: bytearray) -> bytes:
        """Unstuff dots after CRLF, turn bare CR/LF into CRLF, account size.

        ``raw`` never ends inside a CRLF nor with a CRLF-dot whose meaning
        is still open, and does not start right after a CRLF; so a trailing
        CR is bare and every ``CRLF .`` in it is a stuffed dot.
        """
        content = bytes(raw.replace(b"\r\n.", b"\r\n"))
        crlf = content.count(b"\r\n")
        if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
            content = _LINE_END.sub(b"\r\n", content)
        self._size += len(content)
        self._check_line_lengths(content)
        return content

    def _check_line_lengths(self, content: bytes) -> None:
        limit = self._max_data_line
        last_lf = content.rfind(b"\n")
        if last_lf < 0:
            self._line_len += len(content)
        else:
            # Complete lines are content[:last_lf - 1]; the first one
            # continues the line carried over from the previous chunk.
            complete = last_lf - 1
            if not self._overlong and self._line_len + complete > limit:
                lines = content[:complete].split(b"\r\n")
                if (
                    self._line_len + len(lines[0]) > limit
                    or max(map(len, lines)) > limit
                ):
                    self._overlong = True
            self._line_len = len(content) - last_lf - 1
        if self._line_len > limit:
            self._overlong = True


def _partial_terminator_len(buf: bytearray) -> int:
    """Length of the longest tail of ``buf`` that could begin a terminator."""
    for length in range(len(_TERMINATOR) - 1, 0, -1):
        if buf.endswith(_TERMINATOR[:length]):
            return length
    return 0


# --------------------------------------------------------------------------
# MAIL FROM / RCPT TO arguments
# --------------------------------------------------------------------------


class ParseError(ValueError):
    """A client-supplied argument is malformed; the message says why."""


@dataclass(frozen=True)
class PathArgument:
    """A parsed MAIL FROM or RCPT TO argument.

    ``address`` is ``""`` for the null reverse-path; otherwise the mailbox
    as sent (source route removed, quotes kept, UTF-8 decoded).  ``params``
    maps upper-cased ESMTP keywords to their value, ``None`` without ``=``.
    """

    address: str
    params: dict[str, str | None]


# RFC 5321 4.5.3.1.1 limits a local part to 64 octets but asks that limits be
# avoided where possible; SRS and VERP senders exceed it and Postfix accepts
# them, so on the wire only the path length below applies (our own accounts
# keep the 64-octet limit: mailtwist/directory.py).
# RFC 5321 4.5.3.1.3: a path is at most 256 octets including "<" and ">".
MAX_ADDRESS = 254
_MAX_DOMAIN = 255
_MAX_LABEL = 63

_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
# Non-ASCII text is allowed from U+00A0 on: C1 controls are still controls.
_UTF8 = "\u00a0-\U0010ffff"
_DOT_STRING = re.compile(rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.\-{_UTF8}]+")
_QUOTED_STRING = re.compile(rf'"(?:[ !#-\[\]-~{_UTF8}]|\\[ -~])*"')
_LABEL = re.compile(rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}-]*[A-Za-z0-9{_UTF8}])?")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 excludes "=" from esmtp-value; accepted anyway, as real clients
# send it and the keyword is split off at the first "=".
_VALUE = re.compile(r"[!-~]+")


def parse_mail_from(arg: bytes) -> PathArgument:
    """Parse the argument of MAIL, e.g. ``b"FROM:<a@b.c> SIZE=123"``."""
    return _parse_path_argument(arg, b"FROM:", is_mail=True)


def parse_rcpt_to(arg: bytes) -> PathArgument:
    """Parse the argument of RCPT, e.g. ``b"TO:<a@b.c> NOTIFY=NEVER"``.

    ``<postmaster>`` without a domain (any case) gives ``"postmaster"``.
    """
    return _parse_path_argument(arg, b"TO:", is_mail=False)


def split_address(address: str) -> tuple[str, str]:
    """Split a parsed address into local part and lower-cased domain.

    Splits at the last "@", as a quoted local part may contain one.  An
    address without "@" (the null path, ``postmaster``) gives an empty
    domain.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()


def parse_size_param(value: str | None) -> int:
    """Parse the value of the SIZE parameter (ASCII digits only)."""
    if not value or not value.isascii() or not value.isdigit():
        raise ParseError("SIZE requires a decimal number")
    try:
        return int(value)
    except ValueError:
        raise ParseError("SIZE value is too long") from None


def _parse_path_argument(arg: bytes, keyword: bytes, is_mail: bool) -> PathArgument:
    if _CONTROL_BYTES.search(arg):
        raise ParseError("control characters are not allowed")
    arg = arg.strip(b" ")
    if arg[: len(keyword)].upper() != keyword:
        raise ParseError(f"syntax: expected {keyword.decode()}<address>")
    try:
        rest = arg[len(keyword) :].decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("argument is not valid UTF-8") from None
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        close = _find_path_end(rest)
        path, tail = rest[1:close], rest[close + 1 :]
        if tail and not tail.startswith(" "):
            raise ParseError("unexpected text after the address")
    else:
        # Unbracketed path, tolerated like Postfix does: up to the first space.
        path, _, tail = rest.partition(" ")
        if not path:
            raise ParseError("missing address")
        if "<" in path or ">" in path:
            raise ParseError("malformed address")
    address = _parse_path(path, is_mail)
    return PathArgument(address, _parse_params(tail))


def _find_path_end(text: str) -> int:
    """Index of the ">" closing the path opened at ``text[0]``."""
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            return index
        index += 1
    raise ParseError("missing closing '>'")


def _parse_path(path: str, is_mail: bool) -> str:
    if path == "":
        if is_mail:
            return ""
        raise ParseError("empty recipient address")
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon or not path:
            raise ParseError("malformed source route")
        for hop in route.split(","):
            if not hop.startswith("@") or not _is_valid_domain(hop[1:]):
                raise ParseError("malformed source route")
    if not is_mail and path.lower() == "postmaster":
        return "postmaster"
    if path.startswith('"'):
        match = _QUOTED_STRING.match(path)
        if match is None:
            raise ParseError("malformed quoted local part")
        local, rest = path[: match.end()], path[match.end() :]
        if not rest.startswith("@"):
            raise ParseError("address must be local-part@domain")
        domain = rest[1:]
    else:
        local, at, domain = path.partition("@")
        if not at:
            raise ParseError("address must be local-part@domain")
        if not _DOT_STRING.fullmatch(local):
            raise ParseError("invalid character in local part")
    if not (_is_valid_domain(domain) or _is_valid_address_literal(domain)):
        raise ParseError("invalid domain")
    if len(path.encode()) > MAX_ADDRESS:
        raise ParseError(f"address longer than {MAX_ADDRESS} octets")
    return path


def _is_valid_domain(domain: str) -> bool:
    if not domain or len(domain.encode()) > _MAX_DOMAIN:
        return False
    return all(
        len(label.encode()) <= _MAX_LABEL and _LABEL.fullmatch(label)
        for label in domain.split(".")
    )


def _is_valid_address_literal(domain: str) -> bool:
    """Accept ``[IPv4]`` and ``[IPv6:...]``; other tags are not standard."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    if "%" in inner:
        return False
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        keyword, equals, value = token.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise ParseError(f"malformed parameter {token!r}")
        if equals and not _VALUE.fullmatch(value):
            raise ParseError(f"malformed value for parameter {keyword!r}")
        keyword = keyword.upper()
        if keyword in params:
            raise ParseError(f"duplicate parameter {keyword}")
        params[keyword] = value if equals else None
    return params


# --------------------------------------------------------------------------
# Client-supplied text in headers
# --------------------------------------------------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SPACES = re.compile(r" {2,}")


def sanitize_header_text(text: bytes | str, limit: int = 200) -> str:
    """Make client-supplied text (e.g. the HELO name) safe for a header.

    Control characters, CR and LF included, become spaces so nothing can
    start a new header line; other non-printable or non-ASCII characters
    become "?"; runs of spaces collapse and the result is cut to ``limit``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = _CONTROL_CHARS.sub(" ", text)
    text = _NON_ASCII.sub("?", text)
    text = _SPACES.sub(" ", text).strip(" ")
    return text[:limit].rstrip(" ")


def is_valid_helo(arg: bytes) -> bool:
    """True if a HELO/EHLO argument is non-empty and has no control bytes."""
    arg = arg.strip(b" ")
    return bool(arg) and _CONTROL_BYTES.search(arg) is None
