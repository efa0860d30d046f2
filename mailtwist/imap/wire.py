"""IMAP command framing and argument syntax, sans-IO.

:class:`CommandFramer` turns received bytes into events: a complete command
(its text pieces with the literals between them), a request to send a
continuation, a literal that is too big, a command refused, a flood.  It
never buffers more than one command, and the size of one command is bounded
before its bytes are read: the text of a command by ``max_line``, text plus
literals by ``max_line`` too, except for APPEND, whose message literal may be
``append_limit`` octets.

A synchronising literal (``{n}``) that is too big is refused before the client
sends it (the client waits for our ``+``), so the command is dropped without
reading anything more.  A non-synchronising literal (``{n+}``, RFC 7888) that
is too big is already on its way: it is read and discarded in constant
memory, together with the rest of that command, so the connection stays in
step, and the command is answered NO/BAD. We never close the connection for
it (RFC 7888 section 4 allows either).  A literal size that is not a number
up to 2^32-1 (``{-1}``, ``{18446744073709551616}``) is answered BAD without a
continuation; if it was non-synchronising, the length of what follows is
unknown and the connection is closed.

Command lines must end in CRLF: a bare CR, bare LF or NUL in command text is
answered BAD (RFC 3501 section 2.2 requires CRLF; an intermediary that splits
lines differently must not be able to make us see another command).  Command
text over ``max_line`` is answered BAD at once and skipped, in constant
memory, up to its line end (Dovecot's "Too long argument"); after
``max_skip`` bytes without a line end the connection is closed.

:func:`tokenize` parses a command's arguments into atoms, strings and
parenthesised lists; the helpers below interpret those tokens.  Twisted's
``IMAP4Server`` argument parsers are not used: they reject escaped quotes in
quoted strings, accept any literal size and know no LITERAL+, and parse one
argument at a time through Deferreds, which cannot discard a command's
remaining literals.
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from dataclasses import dataclass

__all__ = [
    "Atom",
    "BadCommand",
    "Command",
    "CommandFramer",
    "ContinuationNeeded",
    "LineTooLong",
    "Literal",
    "LiteralTooBig",
    "ParseError",
    "Rejected",
    "String",
    "format_sequence_set",
    "parse_command",
    "parse_date_time",
    "parse_sequence_set",
    "raw_arguments",
    "tokenize",
    "valid_tag",
]

MAX_LINE = 64 * 1024
"""Bytes of command text (and, except for APPEND, of literals too) per command."""

MAX_SKIP = 1024 * 1024
"""Bytes of one over-long line skipped (answered BAD) before the connection is closed."""

MAX_LITERAL = 2**32 - 1
"""The largest literal size that is a number at all (RFC 3501 ``number``)."""

_LITERAL_MARK = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?$")
_ANY_MARK = re.compile(rb"\{[^{}]*\}\r?$")
_TAG = re.compile(rb"[\x21-\x7e]+")


def valid_tag(tag: bytes) -> bool:
    """True if *tag* is a syntactically valid IMAP tag (RFC 3501 ``tag``)."""
    return bool(tag) and _TAG.fullmatch(tag) is not None and not any(
        c in tag for c in b'+(){%*"\\')


class ParseError(ValueError):
    """The client's command is malformed (answer BAD)."""


class BadCommand(ParseError):
    """The tag or command name is missing or malformed; ``tag`` if there was one."""

    def __init__(self, message: str, tag: bytes | None) -> None:
        super().__init__(message)
        self.tag = tag


class Literal(bytes):
    """The octets of a literal received inside a command."""


@dataclass
class Command:
    """One complete command: text pieces alternating with :class:`Literal` data."""

    parts: list[bytes]


@dataclass
class ContinuationNeeded:
    """The client announced a synchronising literal: send ``+``."""


@dataclass
class LiteralTooBig:
    """A literal over the limit; the command is being dropped.

    ``tag`` is the command's tag (or None if the line had none) and
    ``append`` says whether the command is APPEND (answer ``NO [TOOBIG]``).
    """

    tag: bytes | None
    append: bool
    size: int
    limit: int


@dataclass
class Rejected:
    """The framer refused the command (answer ``BAD reason``); it is being dropped.

    Bare CR, bare LF or NUL in a command line, command text over the limit, or
    a literal size that is no number. With ``fatal`` the input cannot be
    resynchronised (a non-synchronising literal of unknown length follows):
    the connection must be closed after the answer.
    """

    tag: bytes | None
    reason: str
    fatal: bool = False


@dataclass
class LineTooLong:
    """More than ``max_skip`` bytes without a line end: close the connection."""


Event = Command | ContinuationNeeded | LiteralTooBig | Rejected | LineTooLong


class CommandFramer:
    """Splits a byte stream into IMAP commands (RFC 3501 section 2.2, RFC 7888).

    Command lines must end in CRLF; a line with a bare CR, a bare LF or NUL
    is refused (:class:`Rejected`) rather than guessed at, so that no proxy
    or client in front of us can read a different command out of the same
    bytes. A command whose text grows past ``max_line`` is refused at once
    and the rest of it skipped in constant memory, like Dovecot does; if
    ``max_skip`` bytes arrive without a line end the connection is hopeless
    (:class:`LineTooLong`). Literals and the size checks are described in
    the module docstring.
    """

    def __init__(self, max_line: int = MAX_LINE, append_limit: int = 25 * 1024 * 1024,
                 max_skip: int = MAX_SKIP) -> None:
        self.max_line = max_line
        self.append_limit = append_limit
        self.max_skip = max_skip
        self._buffer = bytearray()
        self._parts: list[bytes] = []
        self._text = 0
        self._literals = 0
        self._literal_left = 0
        self._literal: bytearray | None = None
        self._discarding = False
        self._skipped = 0
        self._closed = False

    def feed(self, data: bytes) -> None:
        if not self._closed:
            self._buffer += data

    def clear(self) -> None:
        """Forget all input not yet returned, and any half-read command (STARTTLS)."""
        self._buffer.clear()
        self._reset()

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def held(self) -> int:
        """Bytes held for the command being framed: unparsed input and a partial literal."""
        return len(self._buffer) + (len(self._literal) if self._literal is not None else 0)

    def _reset(self) -> None:
        self._parts = []
        self._text = 0
        self._literals = 0
        self._literal_left = 0
        self._literal = None
        self._discarding = False
        self._skipped = 0

    def _command_words(self) -> list[bytes]:
        first = self._parts[0] if self._parts else b""
        return first.split(None, 2)

    def _tag(self, line: bytes | bytearray = b"") -> bytes | None:
        """The current command's tag if it has a valid one (from *line* if it is the first)."""
        first = self._parts[0] if self._parts else bytes(line[:256])
        words = first.split(b" ", 1)
        # Only a tag with a space after it within what is always read before a
        # line counts as too long is complete, however the line arrived.
        if len(words) < 2 or len(words[0]) > min(200, self.max_line) or not valid_tag(words[0]):
            return None
        return words[0]

    def _is_append(self) -> bool:
        words = self._command_words()
        return len(words) >= 2 and words[1].upper() == b"APPEND"

    def _literal_limit(self) -> tuple[int, bool]:
        """The largest literal acceptable now, and whether the command is APPEND."""
        append = self._is_append()
        if append:
            return min(self.append_limit, self.max_line + self.append_limit - self._literals), True
        return self.max_line - self._text - self._literals, False

    def _reject(self, tag: bytes | None, reason: str, mark: re.Match[bytes] | None) -> Rejected:
        """Refuse the command whose current line ends in *mark*; skip what remains of it.

        A synchronising literal is never sent without our ``+``, so the
        command ends here; a non-synchronising one is read and dropped.
        """
        self._reset()
        if mark is not None and mark.group(2):
            self._discarding = True
            self._literal_left = int(mark.group(1))
        return Rejected(tag, reason)

    def _close(self) -> None:
        """Out of step with the client for good: read nothing more."""
        self._closed = True
        self._buffer.clear()
        self._reset()

    def _end_skipped_line(self, line: bytes) -> None:
        """A skipped line ended: skip its LITERAL+ data too, or the command ends.

        A synchronising literal is never sent without our ``+``; a size of
        no valid number is not counted either (the client waits, or the
        connection is out of step anyway).
        """
        self._skipped = 0
        mark = _LITERAL_MARK.search(line)
        if mark is not None and mark.group(2) and int(mark.group(1)) <= MAX_LITERAL:
            self._literal_left = int(mark.group(1))
        else:
            self._reset()

    def next_event(self) -> Event | None:
        """The next event, or None until more input arrives."""
        while not self._closed:
            if self._literal_left:
                if not self._buffer:
                    return None
                take = min(self._literal_left, len(self._buffer))
                if self._literal is not None:
                    self._literal += self._buffer[:take]
                del self._buffer[:take]
                self._literal_left -= take
                if self._literal_left:
                    return None
                if self._literal is not None:
                    self._parts.append(Literal(self._literal))
                    self._literal = None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if self._discarding:
                    if len(self._buffer) > 64:
                        # Keep only what could still be the start of a {n} marker.
                        self._skipped += len(self._buffer) - 32
                        del self._buffer[:-32]
                    if self._skipped > self.max_skip:
                        self._close()
                        return LineTooLong()
                    return None
                if self._text + len(self._buffer) > self.max_line + 2:
                    tag = self._tag(self._buffer)
                    self._reset()
                    self._discarding = True
                    return Rejected(tag, "Command line too long")
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            bare_lf = not line.endswith(b"\r")
            if not bare_lf:
                line = line[:-1]
            if self._discarding:
                self._end_skipped_line(line)
                continue
            if self._text + end > self.max_line + 2:
                # What the check above catches when the line comes in smaller
                # reads: answered the same, whatever the chunking.
                tag = self._tag(line)
                self._reset()
                self._discarding = True
                self._end_skipped_line(line)
                return Rejected(tag, "Command line too long")
            tag = self._tag(line)
            mark = _LITERAL_MARK.search(line)
            if mark is not None and int(mark.group(1)) > MAX_LITERAL:
                mark = None
            if mark is None and _ANY_MARK.search(line):
                # "{-1}", "{99999999999999999999999}", "{1 +}": no literal we
                # can count, and a non-synchronising one cannot be skipped.
                fatal = line.endswith(b"+}")
                self._reset()
                if fatal:
                    self._close()
                return Rejected(tag, "Invalid literal size", fatal)
            if bare_lf or b"\r" in line or b"\0" in line:
                return self._reject(tag, "Bare CR, bare LF or NUL in command line", mark)
            self._text += len(line)
            if self._text + (0 if self._is_append() else self._literals) > self.max_line:
                return self._reject(tag, "Command line too long", mark)
            if mark is None:
                self._parts.append(line)
                parts, self._parts = self._parts, []
                self._reset()
                return Command(parts)
            size = int(mark.group(1))
            synchronising = not mark.group(2)
            self._parts.append(line[:mark.start()])
            limit, append = self._literal_limit()
            if size > limit:
                self._reset()
                if not synchronising:
                    self._discarding = True
                    self._literal_left = size
                return LiteralTooBig(tag, append, size, max(limit, 0))
            self._literals += size
            self._literal_left = size
            self._literal = bytearray()
            if size == 0:
                self._parts.append(Literal(b""))
                self._literal = None
            if synchronising:
                return ContinuationNeeded()
        return None


# --- tokens --------------------------------------------------------------


class Atom(bytes):
    """An atom (also NIL, numbers, sequence sets, flags, BODY[...] items)."""


class String(bytes):
    """A quoted string or a literal."""


Token = Atom | String | list

_SPECIAL = frozenset(b' ()"')


def tokenize(parts: list[bytes]) -> list[Token]:
    """Parse command arguments into atoms, strings and nested lists.

    Atoms may contain ``[...]`` sections with spaces and parentheses inside
    (``BODY[HEADER.FIELDS (To From)]<0.100>``). Runs of spaces are accepted.
    """
    stack: list[list[Token]] = [[]]
    parts = list(parts)
    k = 0
    while k < len(parts):
        part = parts[k]
        k += 1
        if isinstance(part, Literal):
            stack[-1].append(String(part))
            continue
        i, n = 0, len(part)
        while i < n:
            c = part[i]
            if c == 0x20:
                i += 1
            elif c == 0x28:
                stack.append([])
                i += 1
            elif c == 0x29:
                if len(stack) == 1:
                    raise ParseError("unbalanced ')'")
                done = stack.pop()
                stack[-1].append(done)
                i += 1
            elif c == 0x22:
                value, i = _quoted(part, i)
                stack[-1].append(String(value))
            else:
                start = i
                depth = 0
                while i < n:
                    c = part[i]
                    if depth:
                        if c == 0x5D:
                            depth -= 1
                        elif c == 0x5B:
                            depth += 1
                        elif c == 0x22:
                            _, i = _quoted(part, i)
                            continue
                    elif c in _SPECIAL:
                        break
                    elif c == 0x5B:
                        depth += 1
                    elif c < 0x20 or c == 0x7F:
                        raise ParseError("control character in atom")
                    i += 1
                if depth and k < len(parts) and isinstance(parts[k], Literal):
                    # A header-fld-name sent as a literal inside BODY[HEADER.FIELDS
                    # (...)]: splice it in quoted and go on scanning the atom.
                    part = part[start:] + _quote(parts[k]) + (
                        parts[k + 1] if k + 1 < len(parts) else b"")
                    k += 2
                    i, n = 0, len(part)
                    continue
                if depth:
                    raise ParseError("unbalanced '['")
                stack[-1].append(Atom(part[start:i]))
    if len(stack) != 1:
        raise ParseError("unbalanced '('")
    return stack[0]


def _quote(value: bytes) -> bytes:
    """*value* as a quoted string; ParseError if it cannot be one (CR, LF, NUL)."""
    if any(c in value for c in b"\r\n\0"):
        raise ParseError("literal in a section cannot hold CR, LF or NUL")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _quoted(data: bytes, i: int) -> tuple[bytes, int]:
    """Parse the quoted string starting at ``data[i] == '"'``; return it and the end."""
    out = bytearray()
    i += 1
    n = len(data)
    while i < n:
        c = data[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:
            if i + 1 >= n or data[i + 1] not in b'"\\':
                raise ParseError("bad escape in quoted string")
            out.append(data[i + 1])
            i += 2
            continue
        if c == 0:
            raise ParseError("NUL in quoted string")
        out.append(c)
        i += 1
    raise ParseError("unterminated quoted string")


def parse_command(parts: list[bytes]) -> tuple[bytes, bytes, list[bytes]]:
    """Split off the tag and the command name: (tag, NAME, remaining parts).

    Raises :class:`BadCommand`.
    """
    first = parts[0] if parts else b""
    words = first.split(b" ", 2)
    tag = words[0]
    if not valid_tag(tag):
        raise BadCommand("missing or malformed tag", None)
    if len(words) < 2 or not words[1]:
        raise BadCommand("missing command", tag)
    name = words[1].upper()
    rest = words[2] if len(words) == 3 else b""
    return tag, name, [rest, *parts[1:]]


def raw_arguments(parts: list[bytes]) -> bytes:
    """The arguments as the client wrote them, literals inline as ``{n}\\r\\n`` octets."""
    out = bytearray()
    for part in parts:
        if isinstance(part, Literal):
            out += b"{%d}\r\n" % len(part)
        out += part
    return bytes(out)


def split_first_word(parts: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Take the next space-separated word off the text (UID's sub-command)."""
    first = parts[0] if parts else b""
    first = first.lstrip(b" ")
    word, _, rest = first.partition(b" ")
    return word, [rest, *parts[1:]]


# --- argument helpers ----------------------------------------------------


def astring(token: Token, what: str) -> bytes:
    """An astring argument: atom or string."""
    if isinstance(token, (Atom, String)):
        return bytes(token)
    raise ParseError(f"{what}: expected a string")


def number(token: Token, what: str, limit: int = 2**32 - 1) -> int:
    """An unsigned number argument."""
    if isinstance(token, Atom) and token.isdigit() and len(token) <= 20:
        value = int(token)
        if value <= limit:
            return value
    raise ParseError(f"{what}: expected a number")


def parse_sequence_set(token: Token) -> list[tuple[int | None, int | None]]:
    """A sequence set as (first, last) pairs, ``*`` as None (RFC 3501 seq-set)."""
    if not isinstance(token, Atom) or not token:
        raise ParseError("expected a sequence set")
    ranges = []
    for item in token.split(b","):
        first, colon, last = item.partition(b":")
        a = _seq_number(first)
        b = _seq_number(last) if colon else a
        ranges.append((a, b))
    return ranges


def _seq_number(text: bytes) -> int | None:
    if text == b"*":
        return None
    if not text.isdigit() or text.startswith(b"0") or len(text) > 10:
        raise ParseError("invalid sequence set")
    value = int(text)
    if value > 2**32 - 1:
        raise ParseError("invalid sequence set")
    return value


def format_sequence_set(numbers: list[int]) -> bytes:
    """A compact sequence set (``1:3,7``) for numbers in the given order.

    Order is kept, as COPYUID needs the source and destination sets to
    correspond element by element; ranges are only formed of ascending runs.
    """
    out: list[bytes] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(b"%d" % numbers[i] if i == j else b"%d:%d" % (numbers[i], numbers[j]))
        i = j + 1
    return b",".join(out)


_MONTHS = {name: number for number, name in enumerate(
    (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN",
     b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"), start=1)}
_MONTH_NAMES = [b"", *(m.capitalize() for m in _MONTHS)]
_DATE_TIME = re.compile(
    rb"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)


def parse_date_time(value: bytes) -> float:
    """An IMAP date-time (``"17-Jul-1996 02:44:25 -0700"``) as a POSIX timestamp."""
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        raise ParseError("invalid date-time")
    day, month, year, hh, mm, ss, sign, zh, zm = match.groups()
    month_number = _MONTHS.get(month.upper())
    if month_number is None:
        raise ParseError("invalid date-time")
    try:
        moment = datetime.datetime(int(year), month_number, int(day), int(hh), int(mm), int(ss))
    except ValueError:
        raise ParseError("invalid date-time") from None
    offset = (int(zh) * 60 + int(zm)) * 60
    if int(zm) > 59:
        raise ParseError("invalid date-time")
    stamp = calendar.timegm(moment.timetuple())
    return float(stamp - offset if sign == b"+" else stamp + offset)


def format_date_time(stamp: float) -> bytes:
    """A timestamp as a quoted IMAP date-time in UTC."""
    t = time.gmtime(stamp)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, _MONTH_NAMES[t.tm_mon], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
