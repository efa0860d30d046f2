"""IMAP command framing and argument syntax, sans-IO.

:class:`CommandFramer` turns received bytes into events: a complete command
(its text pieces with the literals between them), a request to send a
continuation, a literal that is too big, a line that is too long.  It never
buffers more than one command, and the size of one command is bounded before
its bytes are read: the text of a command by ``max_line``, text plus literals
by ``max_line`` too, except for APPEND, whose message literal may be
``append_limit`` octets.

A synchronising literal (``{n}``) that is too big is refused before the client
sends it (the client waits for our ``+``), so the command is dropped without
reading anything more.  A non-synchronising literal (``{n+}``, RFC 7888) that
is too big is already on its way: it is read and discarded in constant
memory, together with the rest of that command, so the connection stays in
step, and the command is answered NO/BAD. We never close the connection for
it (RFC 7888 section 4 allows either).

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
    "String",
    "format_sequence_set",
    "parse_command",
    "parse_date_time",
    "parse_sequence_set",
    "raw_arguments",
    "tokenize",
]

MAX_LINE = 64 * 1024
"""Bytes of command text (and, except for APPEND, of literals too) per command."""

_LITERAL_MARK = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?$")


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
class LineTooLong:
    """The command text exceeds the limit; the connection cannot be resynchronised."""


Event = Command | ContinuationNeeded | LiteralTooBig | LineTooLong


class CommandFramer:
    """Splits a byte stream into IMAP commands (RFC 3501 section 2.2, RFC 7888)."""

    def __init__(self, max_line: int = MAX_LINE, append_limit: int = 25 * 1024 * 1024) -> None:
        self.max_line = max_line
        self.append_limit = append_limit
        self._buffer = bytearray()
        self._parts: list[bytes] = []
        self._text = 0
        self._literals = 0
        self._literal_left = 0
        self._literal: bytearray | None = None
        self._discarding = False
        self._too_long = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def clear(self) -> None:
        """Forget all input not yet returned, and any half-read command (STARTTLS)."""
        self._buffer.clear()
        self._reset()

    def __len__(self) -> int:
        return len(self._buffer)

    def _reset(self) -> None:
        self._parts = []
        self._text = 0
        self._literals = 0
        self._literal_left = 0
        self._literal = None
        self._discarding = False

    def _command_words(self) -> list[bytes]:
        first = self._parts[0] if self._parts else b""
        return first.split(None, 2)

    def _is_append(self) -> bool:
        words = self._command_words()
        return len(words) >= 2 and words[1].upper() == b"APPEND"

    def _literal_limit(self) -> tuple[int, bool]:
        """The largest literal acceptable now, and whether the command is APPEND."""
        append = self._is_append()
        if append:
            return min(self.append_limit, self.max_line + self.append_limit - self._literals), True
        return self.max_line - self._text - self._literals, False

    def next_event(self) -> Event | None:
        """The next event, or None until more input arrives."""
        if self._too_long:
            return None
        while True:
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
                if len(self._buffer) > self.max_line + 2 and not self._discarding:
                    self._too_long = True
                    return LineTooLong()
                if self._discarding and len(self._buffer) > 64:
                    # Keep only what could still be the start of a {n} marker.
                    del self._buffer[:-32]
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            mark = _LITERAL_MARK.search(line)
            if not self._discarding:
                self._text += len(line)
                if self._text + (0 if self._is_append() else self._literals) > self.max_line:
                    self._too_long = True
                    return LineTooLong()
            if mark is None:
                if self._discarding:
                    self._reset()
                    continue
                self._parts.append(line)
                parts, self._parts = self._parts, []
                self._reset()
                return Command(parts)
            size = int(mark.group(1))
            synchronising = not mark.group(2)
            if self._discarding:
                self._literal_left = size
                continue
            self._parts.append(line[:mark.start()])
            limit, append = self._literal_limit()
            if size > limit:
                words = self._command_words()
                tag = words[0] if words else None
                if synchronising:
                    self._reset()
                else:
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
    for part in parts:
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
                if depth:
                    raise ParseError("unbalanced '['")
                stack[-1].append(Atom(part[start:i]))
    if len(stack) != 1:
        raise ParseError("unbalanced '('")
    return stack[0]


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


_TAG = re.compile(rb"[\x21-\x7e]+")


def parse_command(parts: list[bytes]) -> tuple[bytes, bytes, list[bytes]]:
    """Split off the tag and the command name: (tag, NAME, remaining parts).

    Raises :class:`BadCommand`.
    """
    first = parts[0] if parts else b""
    words = first.split(b" ", 2)
    tag = words[0]
    if not tag or not _TAG.fullmatch(tag) or b"+" in tag or any(c in tag for c in b'(){%*"\\'):
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
