"""IMAP SEARCH (RFC 3501 section 6.4.4) as a sans-IO parser and evaluator.

:func:`parse_search` turns the argument bytes of ``SEARCH`` / ``UID SEARCH``
into a :class:`SearchProgram`; :func:`evaluate` runs it over the messages of
a mailbox and returns the matching sequence numbers.  Nothing here does I/O:
the server decides where messages and their text come from.

Decisions where RFC 3501 leaves room (Dovecot is the reference):

- The arguments are the logical command text, literals inline as
  ``{n}\\r\\n`` (or ``{n+}``, or a bare LF) followed by the ``n`` octets, and
  without the CRLF that ends the command.
- Without ``CHARSET`` strings are read as UTF-8 (as RFC 9051 does).  Strings
  are matched as case-insensitive substrings: for UTF-8 after canonical
  Unicode case folding (NFD, casefold, NFC, so "STRASSE" finds "Straße" and
  a decomposed "é" finds a composed one); for ``CHARSET US-ASCII`` only A-Z
  fold (i;ascii-casemap) and an 8-bit octet in a string is a syntax error.
- Header values are RFC 2047-decoded before matching.  FROM, TO, CC and BCC
  match anywhere in the whole decoded value.  A header key matches if any
  field of that name matches, so an empty string means "the field exists"
  (for SUBJECT "" as for HEADER).  TEXT searches the decoded header fields as
  ``name: value`` lines and the body text; BODY only the body text.
- BEFORE, ON and SINCE compare the date of the internal date in UTC (Dovecot
  uses the server's local time zone; UTC makes results independent of where
  the server runs).  SENTBEFORE, SENTON and SENTSINCE use the date of the
  first Date: field in its own time zone and, as Dovecot does, fall back to
  the internal date when Date: is missing or unparsable.
- Sequence sets keep ``*`` until evaluation, where it becomes the highest
  sequence number or UID (``max_uid`` if given).  Numbers beyond the mailbox
  match nothing instead of failing; ``$`` (SEARCHRES) is not supported.
- OR chains, NOT NOT and redundant parentheses are flattened while parsing,
  so the ``OR OR OR ... a b c d`` lists that clients build for many terms are
  cheap.  What is left may nest at most :data:`MAX_DEPTH` levels, and at
  most :data:`MAX_PENDING` parentheses, NOTs and ORs may wait for their keys
  at once.  The parser is iterative and no regular expression is built from
  client input, so work stays linear and no input raises RecursionError.
- MODSEQ (RFC 7162) accepts the optional entry name and type and compares
  the message's ``modseq``: per-flag mod-sequences are not kept, so the
  message's own is used, as RFC 7162 section 3.1.5 allows.
- With a :class:`SearchIndex` (the folder's message cache), header keys
  (FROM ... SUBJECT, HEADER, the header half of TEXT) and SENT* are answered
  from it for UTF-8 searches, and no message file is opened for them; a
  US-ASCII search reads the cached header block instead. Only BODY and TEXT
  read message files. :func:`evaluate` can run over a mailbox in chunks
  (``max_seq``/``max_uid`` give ``*``), so the server bounds its memory and
  the time of each step.
- Parser leniency: runs of spaces, spaces inside parentheses, keys that touch
  parentheses (``NOT(SEEN)``) and 8-bit octets in quoted strings and atoms.
"""

from __future__ import annotations

import bisect
import datetime
import email.utils
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "MAX_DEPTH",
    "MAX_PENDING",
    "SUPPORTED_CHARSETS",
    "All",
    "And",
    "DateKey",
    "FlagKey",
    "HeaderKey",
    "ModSeqKey",
    "Not",
    "Or",
    "RecentKey",
    "SearchKey",
    "SearchMessage",
    "SearchProgram",
    "SearchSyntaxError",
    "SearchableText",
    "SequenceKey",
    "SizeKey",
    "TextKey",
    "UnsupportedCharset",
    "SearchIndex",
    "evaluate",
    "fold",
    "header_date",
    "parse_search",
]

MAX_DEPTH = 100
"""Deepest nesting of AND / OR / NOT after flattening."""

MAX_PENDING = 10_000
"""Most parentheses, NOTs and ORs that may wait for their keys at once."""

SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
"""For the ``[BADCHARSET (...)]`` response code, in this order."""

_MAX_NZ = 2**32 - 1
_MAX_NUMBER64 = 2**63 - 1
_UTC = datetime.UTC


class SearchSyntaxError(ValueError):
    """The search arguments are malformed; answer tagged BAD with the message.

    The message is one line of printable ASCII, safe to put in a response.
    """


class UnsupportedCharset(ValueError):
    """CHARSET names a charset we do not search in.

    Answer ``NO [BADCHARSET (UTF-8 US-ASCII)]`` (see :data:`SUPPORTED_CHARSETS`).
    """


# --------------------------------------------------------------------------
# The key tree
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class All:
    """ALL: every message."""


@dataclass(frozen=True, slots=True)
class FlagKey:
    """A flag is set (``present``) or not; ``flag`` is ``\\Seen``-style or a keyword.

    System flags are compared exactly, keywords case-insensitively.
    """

    flag: str
    present: bool


@dataclass(frozen=True, slots=True)
class RecentKey:
    """RECENT (``present``) or OLD."""

    present: bool


@dataclass(frozen=True, slots=True)
class SizeKey:
    """LARGER (size > ``size``) or SMALLER (size < ``size``)."""

    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class DateKey:
    """BEFORE/ON/SINCE on the internal date, or SENT* on Date: when ``sent``."""

    sent: bool
    relation: Literal["before", "on", "since"]
    date: datetime.date


@dataclass(frozen=True, slots=True)
class SequenceKey:
    """A sequence set of message numbers, or of UIDs when ``uid``.

    ``ranges`` holds ``(first, last)`` pairs as written; ``None`` is ``*``.
    """

    uid: bool
    ranges: tuple[tuple[int | None, int | None], ...]


@dataclass(frozen=True, slots=True)
class HeaderKey:
    """A header field (lower-case name) whose decoded value contains ``text``."""

    field: str
    text: str


@dataclass(frozen=True, slots=True)
class TextKey:
    """BODY (body text only) or TEXT (``headers`` too) contains ``text``."""

    text: str
    headers: bool


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """MODSEQ: the message's mod-sequence is at least ``modseq`` (RFC 7162)."""

    modseq: int
    entry_name: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class And:
    """Every key matches (a parenthesised list or the top level); order is free."""

    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """At least one key matches; a flattened chain of OR, so two or more keys."""

    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The key does not match."""

    key: SearchKey


SearchKey = (All | FlagKey | RecentKey | SizeKey | DateKey | SequenceKey | HeaderKey
             | TextKey | ModSeqKey | And | Or | Not)


@dataclass
class SearchProgram:
    """A parsed SEARCH: what to match, and what the evaluation will need."""

    charset: str
    root: SearchKey
    needs_headers: bool
    needs_body: bool

    def uses_modseq(self) -> bool:
        """Whether MODSEQ occurs, so the reply needs ``(MODSEQ n)`` (RFC 7162)."""
        stack: list[SearchKey] = [self.root]
        while stack:
            key = stack.pop()
            if isinstance(key, ModSeqKey):
                return True
            if isinstance(key, (And, Or)):
                stack.extend(key.keys)
            elif isinstance(key, Not):
                stack.append(key.key)
        return False


class SearchableText(Protocol):
    """What ``SearchMessage.parsed()`` returns (``mime.ParsedMessage`` does)."""

    def header_fields(self) -> list[tuple[str, bytes]]:
        """Top-level fields as (lower-case name, unfolded raw value)."""

    def text_for_search(self) -> str:
        """Decoded body text."""


class SearchIndex(Protocol):
    """Header data of the messages being evaluated, kept by the server.

    Each method may answer None for a message it does not know; the
    evaluator then falls back to ``SearchMessage.parsed()``.
    """

    def header_match(self, uid: int, field: str, needle: str) -> bool | None:
        """Whether a field *field* of message *uid* contains *needle* (folded as
        :func:`fold` does)."""

    def header_text_match(self, uid: int, needle: str) -> bool | None:
        """Whether the message's ``name: value`` header lines contain *needle*."""

    def sent_date(self, uid: int) -> datetime.date | None | bool:
        """The day of its Date: field, None without a usable one, False if unknown."""


class SearchMessage(Protocol):
    """One message of the mailbox, as the server hands it to :func:`evaluate`.

    ``flags`` use IMAP names with system flags spelt canonically
    (``\\Seen``).  ``internaldate`` should be aware; naive means UTC.  An
    optional ``modseq: int`` attribute is read with a default of 0.
    ``parsed()`` is called at most once per message and evaluation, and only
    for messages that cheaper keys did not already decide.
    """

    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: datetime.datetime
    recent: bool

    def parsed(self) -> SearchableText:
        """The message's header fields and body text."""


# --------------------------------------------------------------------------
# Reading the argument bytes
# --------------------------------------------------------------------------

_BARE = re.compile(rb"[^ ()]*")
_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+")
_ASTRING_ATOM = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\]+")
_QUOTED_STOP = re.compile(rb"[\"\\\r\n\x00]")
_LITERAL = re.compile(rb"\{([0-9]+)\+?\}(\r?\n)?")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_SEQ_NUMBER = re.compile(rb"\*|[1-9][0-9]*")
_MONTHS = {name: number for number, name in enumerate(
    (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN",
     b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"), start=1)}


def _show(data: bytes, limit: int = 40) -> str:
    """Render client bytes for an error message: printable ASCII, one line."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data[:limit])
    return text + "..." if len(data) > limit else text


class _Reader:
    """A cursor over the argument bytes that reads IMAP tokens."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def skip_spaces(self) -> bool:
        """Skip spaces; tell whether there were any."""
        start = self.pos
        data = self.data
        while self.pos < len(data) and data[self.pos] == 0x20:
            self.pos += 1
        return self.pos > start

    def bare(self) -> bytes:
        """The bytes up to the next space, parenthesis or the end."""
        match = _BARE.match(self.data, self.pos)
        assert match is not None
        self.pos = match.end()
        return match.group()

    def argument_space(self, what: str) -> None:
        """Require the space (or spaces) that precede an argument of ``what``."""
        if not self.skip_spaces() or self.at_end():
            raise SearchSyntaxError(f"{what} is missing its argument")

    def astring(self, what: str) -> bytes:
        """An atom, quoted string or literal, as raw octets."""
        byte = self.peek()
        if byte == 0x22:
            return self.quoted(what)
        if byte == 0x7B:
            return self.literal(what)
        token = self.bare()
        if not token:
            raise SearchSyntaxError(f"{what} needs a string")
        if not _ASTRING_ATOM.fullmatch(token):
            raise SearchSyntaxError(
                f"{what}: {_show(token)!r} is not an atom; quote it or send a literal")
        return token

    def quoted(self, what: str) -> bytes:
        """A quoted string with ``\\\\`` and ``\\"`` escapes; 8-bit octets allowed."""
        data = self.data
        pos = self.pos + 1
        out: list[bytes] = []
        while True:
            stop = _QUOTED_STOP.search(data, pos)
            if stop is None:
                raise SearchSyntaxError(f"{what}: quoted string is not closed")
            out.append(data[pos:stop.start()])
            char = stop.group()
            pos = stop.end()
            if char == b'"':
                break
            if char != b"\\":
                raise SearchSyntaxError(f"{what}: CR, LF or NUL in a quoted string")
            if pos >= len(data) or data[pos] not in b'"\\':
                raise SearchSyntaxError(
                    f'{what}: only \\" and \\\\ may be escaped in a quoted string')
            out.append(data[pos:pos + 1])
            pos += 1
        self.pos = pos
        self.end_of_string(what)
        return b"".join(out)

    def literal(self, what: str) -> bytes:
        """A ``{n}`` or ``{n+}`` literal followed by a line break and ``n`` octets."""
        match = _LITERAL.match(self.data, self.pos)
        if match is None or match.group(2) is None:
            raise SearchSyntaxError(f"{what}: malformed literal, expected {{n}} and CRLF")
        digits = match.group(1).lstrip(b"0")
        if len(digits) > 10 or int(digits or b"0") > _MAX_NZ:
            raise SearchSyntaxError(f"{what}: literal size is too large")
        size = int(digits or b"0")
        start = match.end()
        if start + size > len(self.data):
            raise SearchSyntaxError(f"{what}: literal is shorter than its {size} octets")
        value = self.data[start:start + size]
        if b"\x00" in value:
            raise SearchSyntaxError(f"{what}: NUL in a literal")
        self.pos = start + size
        self.end_of_string(what)
        return value

    def end_of_string(self, what: str) -> None:
        """A string must be followed by a space, a closing parenthesis or the end."""
        if self.pos < len(self.data) and self.data[self.pos] not in b" )":
            raise SearchSyntaxError(
                f"{what}: expected a space after the string, found "
                f"{_show(self.data[self.pos:self.pos + 10])!r}")


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

_AND_GROUP, _OR_GROUP, _NOT_GROUP = "and", "or", "not"
_TOP, _PAREN, _OR, _NOT = "top", "paren", "OR", "NOT"


class _Group:
    """A mutable AND/OR/NOT node while parsing; frozen into And/Or/Not after."""

    __slots__ = ("kind", "items")

    def __init__(self, kind: str, items: deque) -> None:
        self.kind = kind
        self.items = items


class _Frame:
    """A parenthesis, NOT or OR (or the top level) still collecting keys."""

    __slots__ = ("kind", "items", "count", "depth")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: deque = deque()
        self.count = 0
        self.depth = 0

    @property
    def group(self) -> str:
        if self.kind == _OR:
            return _OR_GROUP
        if self.kind == _NOT:
            return _NOT_GROUP
        return _AND_GROUP


_SYSTEM_FLAGS = {
    b"ANSWERED": ("\\Answered", True), b"UNANSWERED": ("\\Answered", False),
    b"DELETED": ("\\Deleted", True), b"UNDELETED": ("\\Deleted", False),
    b"DRAFT": ("\\Draft", True), b"UNDRAFT": ("\\Draft", False),
    b"FLAGGED": ("\\Flagged", True), b"UNFLAGGED": ("\\Flagged", False),
    b"SEEN": ("\\Seen", True), b"UNSEEN": ("\\Seen", False),
}
_ADDRESS_HEADERS = {b"FROM": "from", b"TO": "to", b"CC": "cc", b"BCC": "bcc",
                    b"SUBJECT": "subject"}
_DATES: dict[bytes, tuple[bool, Literal["before", "on", "since"]]] = {
    b"BEFORE": (False, "before"), b"ON": (False, "on"), b"SINCE": (False, "since"),
    b"SENTBEFORE": (True, "before"), b"SENTON": (True, "on"), b"SENTSINCE": (True, "since"),
}
_ENTRY_TYPES = ("priv", "shared", "all")


class _Parser:
    """Recursive-descent in spirit, with an explicit stack instead of recursion."""

    def __init__(self, data: bytes) -> None:
        self.reader = _Reader(data)
        self.charset = "UTF-8"
        self.needs_headers = False
        self.needs_body = False

    def program(self) -> SearchProgram:
        self.read_charset()
        root = _freeze(self.keys())
        return SearchProgram(self.charset, root, self.needs_headers, self.needs_body)

    def read_charset(self) -> None:
        reader = self.reader
        reader.skip_spaces()
        start = reader.pos
        if reader.bare().upper() != b"CHARSET":
            reader.pos = start
            return
        reader.argument_space("CHARSET")
        name = reader.astring("CHARSET").upper()
        if name.decode("latin-1") not in SUPPORTED_CHARSETS:
            raise UnsupportedCharset(
                f"charset {_show(name)!r} is not supported; use UTF-8 or US-ASCII")
        self.charset = name.decode("ascii")
        if not reader.skip_spaces() and not reader.at_end():
            raise SearchSyntaxError("expected a space after the charset")

    def keys(self) -> object:
        reader = self.reader
        stack = [_Frame(_TOP)]
        while True:
            frame = stack[-1]
            if (frame.kind == _NOT and frame.count == 1) or (frame.kind == _OR
                                                             and frame.count == 2):
                stack.pop()
                self.add(stack[-1], *self.finish(frame))
                continue
            reader.skip_spaces()
            byte = reader.peek()
            if byte is None or byte == 0x29:
                if frame.kind == _TOP:
                    if byte is not None:
                        raise SearchSyntaxError("unbalanced parentheses: unexpected ')'")
                    if not frame.items:
                        raise SearchSyntaxError("SEARCH needs at least one search key")
                    return self.finish(frame)[0]
                if frame.kind == _PAREN:
                    if byte is None:
                        raise SearchSyntaxError("unbalanced parentheses: missing ')'")
                    reader.pos += 1
                    if not frame.items:
                        raise SearchSyntaxError("empty parenthesised list")
                    stack.pop()
                    self.add(stack[-1], *self.finish(frame))
                    continue
                needed = "a search key" if frame.kind == _NOT else "two search keys"
                raise SearchSyntaxError(f"{frame.kind} needs {needed}")
            if byte == 0x28:
                reader.pos += 1
                stack.append(self.pending(stack, _PAREN))
                continue
            token = reader.bare()
            if not token:
                raise SearchSyntaxError(
                    f"expected a search key, found {_show(reader.data[reader.pos:])!r}")
            name = token.upper()
            if name == b"NOT" or name == b"OR":
                stack.append(self.pending(stack, name.decode()))
                continue
            node = self.simple_key(token, name)
            self.add(frame, node, 2 if isinstance(node, _Group) else 1)

    @staticmethod
    def pending(stack: list[_Frame], kind: str) -> _Frame:
        if len(stack) > MAX_PENDING:
            raise SearchSyntaxError(
                f"too many open parentheses, NOTs and ORs (at most {MAX_PENDING})")
        return _Frame(kind)

    @staticmethod
    def add(frame: _Frame, node: object, depth: int) -> None:
        """Put a finished key into ``frame``, merging AND into AND and OR into OR.

        The longer list absorbs the shorter, so an OR chain of n keys merges
        in O(n) (any tree in O(n log n)), and keys keep their written order.
        """
        frame.count += 1
        group = frame.group
        if isinstance(node, _Group) and node.kind == group and group != _NOT_GROUP:
            mine, theirs = frame.items, node.items
            if len(theirs) > len(mine):
                theirs.extendleft(reversed(mine))
                frame.items = theirs
            else:
                mine.extend(theirs)
            frame.depth = max(frame.depth, depth - 1)
        else:
            frame.items.append(node)
            frame.depth = max(frame.depth, depth)

    @staticmethod
    def finish(frame: _Frame) -> tuple[object, int]:
        """The key a complete frame stands for, and its depth."""
        items = frame.items
        if frame.kind == _NOT:
            (item,) = items
            if isinstance(item, _Group) and item.kind == _NOT_GROUP:
                return item.items[0], frame.depth - 1
            node, depth = _Group(_NOT_GROUP, items), frame.depth + 1
        elif len(items) == 1:
            return items[0], frame.depth
        else:
            node, depth = _Group(frame.group, items), frame.depth + 1
        if depth > MAX_DEPTH:
            raise SearchSyntaxError(f"search keys are nested too deeply (at most {MAX_DEPTH})")
        return node, depth

    # -- keys without nested keys -------------------------------------------

    def simple_key(self, token: bytes, name: bytes) -> object:
        first = token[0]
        if 0x30 <= first <= 0x39 or first == 0x2A or first == 0x24:
            return SequenceKey(False, _sequence_set(token, "sequence set"))
        reader = self.reader
        what = _show(token)
        if name in _SYSTEM_FLAGS:
            return FlagKey(*_SYSTEM_FLAGS[name])
        if name == b"ALL":
            return All()
        if name == b"RECENT" or name == b"OLD":
            return RecentKey(name == b"RECENT")
        if name == b"NEW":
            return _Group(_AND_GROUP, deque([RecentKey(True), FlagKey("\\Seen", False)]))
        if name in _ADDRESS_HEADERS:
            self.needs_headers = True
            reader.argument_space(what)
            return HeaderKey(_ADDRESS_HEADERS[name], self.text(reader.astring(what), what))
        if name == b"HEADER":
            self.needs_headers = True
            reader.argument_space(what)
            field = reader.astring(what)
            if not _FIELD_NAME.fullmatch(field):
                raise SearchSyntaxError(f"HEADER: {_show(field)!r} is not a header field name")
            reader.argument_space(what)
            return HeaderKey(field.decode("ascii").lower(),
                             self.text(reader.astring(what), what))
        if name == b"BODY" or name == b"TEXT":
            self.needs_body = True
            self.needs_headers = self.needs_headers or name == b"TEXT"
            reader.argument_space(what)
            return TextKey(self.text(reader.astring(what), what), name == b"TEXT")
        if name in _DATES:
            sent, relation = _DATES[name]
            self.needs_headers = self.needs_headers or sent
            reader.argument_space(what)
            return DateKey(sent, relation, self.date(what))
        if name == b"KEYWORD" or name == b"UNKEYWORD":
            reader.argument_space(what)
            keyword = reader.bare()
            if not _ATOM.fullmatch(keyword):
                raise SearchSyntaxError(f"{what}: {_show(keyword)!r} is not a keyword atom")
            return FlagKey(keyword.decode("ascii"), name == b"KEYWORD")
        if name == b"LARGER" or name == b"SMALLER":
            reader.argument_space(what)
            return SizeKey(name == b"LARGER", _number(reader.bare(), what, _MAX_NUMBER64))
        if name == b"UID":
            reader.argument_space(what)
            return SequenceKey(True, _sequence_set(reader.bare(), "UID"))
        if name == b"MODSEQ":
            return self.modseq()
        raise SearchSyntaxError(f"unknown search key {what!r}")

    def text(self, raw: bytes, what: str) -> str:
        """Decode a search string in the program's charset."""
        if self.charset == "US-ASCII":
            if not raw.isascii():
                raise SearchSyntaxError(
                    f"{what}: 8-bit octets in a US-ASCII string (use CHARSET UTF-8)")
            return raw.decode("ascii")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SearchSyntaxError(f"{what}: the string is not valid UTF-8") from None

    def date(self, what: str) -> datetime.date:
        reader = self.reader
        raw = reader.quoted(what) if reader.peek() == 0x22 else reader.bare()
        match = _DATE.fullmatch(raw)
        month = _MONTHS.get(match.group(2).upper()) if match else None
        if match is None or month is None:
            raise SearchSyntaxError(f"{what}: {_show(raw)!r} is not a date like 1-Feb-1994")
        try:
            return datetime.date(int(match.group(3)), month, int(match.group(1)))
        except ValueError:
            raise SearchSyntaxError(f"{what}: {_show(raw)!r} is not a valid date") from None

    def modseq(self) -> ModSeqKey:
        """``MODSEQ [<entry-name> <entry-type>] <mod-sequence-valzer>`` (RFC 7162)."""
        reader = self.reader
        reader.argument_space("MODSEQ")
        entry_name = entry_type = None
        if reader.peek() in (0x22, 0x7B):
            raw = reader.astring("MODSEQ")
            if not (raw[:7].lower() == b"/flags/" and len(raw) > 7 and raw.isascii()):
                raise SearchSyntaxError(
                    f"MODSEQ: {_show(raw)!r} is not an entry name like \"/flags/\\\\Seen\"")
            entry_name = raw.decode("ascii")
            reader.argument_space("MODSEQ")
            kind = reader.bare().decode("latin-1").lower()
            if kind not in _ENTRY_TYPES:
                raise SearchSyntaxError("MODSEQ: the entry type must be priv, shared or all")
            entry_type = kind
            reader.argument_space("MODSEQ")
        return ModSeqKey(_number(reader.bare(), "MODSEQ", _MAX_NUMBER64),
                         entry_name, entry_type)


def _number(token: bytes, what: str, limit: int) -> int:
    if not token or not token.isdigit():
        raise SearchSyntaxError(f"{what} needs a number, found {_show(token)!r}")
    digits = token.lstrip(b"0")
    if len(digits) > len(str(limit)) or int(digits or b"0") > limit:
        raise SearchSyntaxError(f"{what}: {_show(token)} is too large (at most {limit})")
    return int(digits or b"0")


def _sequence_set(token: bytes, what: str) -> tuple[tuple[int | None, int | None], ...]:
    """Parse ``1,3:5,7:*`` into ``((1, 1), (3, 5), (7, None))``."""
    if not token:
        raise SearchSyntaxError(f"{what} needs a sequence set")
    if b"$" in token:
        raise SearchSyntaxError(f"{what}: $ (SEARCHRES) is not supported")
    ranges = []
    for part in token.split(b","):
        ends = part.split(b":")
        if len(ends) > 2:
            raise SearchSyntaxError(f"{what}: {_show(part)!r} is not a message number or range")
        numbers = [_sequence_number(end, what) for end in ends]
        ranges.append((numbers[0], numbers[-1]))
    return tuple(ranges)


def _sequence_number(token: bytes, what: str) -> int | None:
    if not _SEQ_NUMBER.fullmatch(token):
        raise SearchSyntaxError(f"{what}: {_show(token)!r} is not a message number or *")
    if token == b"*":
        return None
    if len(token) > 10 or int(token) > _MAX_NZ:
        raise SearchSyntaxError(f"{what}: {_show(token)} is too large (at most {_MAX_NZ})")
    return int(token)


def _freeze(node: object) -> SearchKey:
    """Turn parse-time groups into the immutable tree (depth is already bounded)."""
    if not isinstance(node, _Group):
        return node  # type: ignore[return-value]
    if node.kind == _NOT_GROUP:
        return Not(_freeze(node.items[0]))
    keys = tuple(_freeze(item) for item in node.items)
    return And(keys) if node.kind == _AND_GROUP else Or(keys)


def parse_search(args: bytes) -> SearchProgram:
    """Parse the arguments of SEARCH: ``[CHARSET name] key *(SP key)``.

    Raises :class:`UnsupportedCharset` for a CHARSET other than UTF-8 or
    US-ASCII, and :class:`SearchSyntaxError` for anything malformed.
    """
    return _Parser(bytes(args)).program()


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

Predicate = Callable[[SearchMessage], bool]

_COST_CHEAP, _COST_HEADER, _COST_BODY = 1, 20, 100


def fold(text: str) -> str:
    """The canonical caseless form SEARCH compares (for UTF-8 searches)."""
    return _fold_unicode(text)


def header_date(raw: bytes) -> datetime.date | None:
    """The calendar date of a Date: value in its own zone, or None if unusable."""
    return _header_date(raw)


def _fold_unicode(text: str) -> str:
    """Canonical caseless form: NFC(casefold(NFD(text)))."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize(
        "NFC", unicodedata.normalize("NFD", text).casefold())


def _fold_ascii(text: str) -> str:
    """i;ascii-casemap: only A-Z fold, other characters must match exactly."""
    if text.isascii():
        return text.lower()
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def _internal_date(message: SearchMessage) -> datetime.date:
    moment = message.internaldate
    tz = moment.tzinfo
    if tz is not None and tz is not _UTC:
        moment = moment.astimezone(_UTC)
    return moment.date()


def _header_date(raw: bytes) -> datetime.date | None:
    """The calendar date of a Date: value in its own zone, or None if unusable."""
    try:
        parts = email.utils.parsedate_tz(raw.decode("latin-1"))
        if parts is None:
            return None
        return datetime.date(parts[0], parts[1], parts[2])
    except Exception:  # noqa: BLE001 - email.utils raises several kinds on junk
        return None


class _Content:
    """The text of one message, parsed, decoded and folded on first use."""

    __slots__ = ("_message", "_fold", "_parsed", "_values", "_header_text", "_body",
                 "_sent")

    def __init__(self, message: SearchMessage, fold: Callable[[str], str]) -> None:
        self._message = message
        self._fold = fold
        self._parsed: SearchableText | None = None
        self._values: dict[str, list[str]] = {}
        self._header_text: str | None = None
        self._body: str | None = None
        self._sent: datetime.date | None | bool = False

    def parsed(self) -> SearchableText:
        if self._parsed is None:
            self._parsed = self._message.parsed()
        return self._parsed

    def values(self, field: str) -> list[str]:
        """str, decoded values of every field called ``field``."""
        values = self._values.get(field)
        if values is None:
            decode = _decoder()
            values = [self._fold(decode(raw)) for name, raw in self.parsed().header_fields()
                      if name.lower() == field]
            self._values[field] = values
        return values

    def header_text(self) -> str:
        if self._header_text is None:
            decode = _decoder()
            self._header_text = self._fold("\n".join(
                f"{name}: {decode(raw)}" for name, raw in self.parsed().header_fields()))
        return self._header_text

    def body(self) -> str:
        if self._body is None:
            self._body = self._fold(self.parsed().text_for_search())
        return self._body

    def sent_date(self) -> datetime.date:
        if self._sent is False:
            raw = next((raw for name, raw in self.parsed().header_fields()
                        if name.lower() == "date"), None)
            self._sent = _header_date(raw) if raw is not None else None
        return self._sent or _internal_date(self._message)  # type: ignore[return-value]


def _decoder() -> Callable[[bytes], str]:
    """RFC 2047 decoding from the MIME module, imported when first needed."""
    from mailtwist.imap.mime import decode_header_value
    return decode_header_value


class _ContentCache:
    """The content of the message being evaluated; evaluation goes one by one."""

    __slots__ = ("_fold", "_message", "_content")

    def __init__(self, fold: Callable[[str], str]) -> None:
        self._fold = fold
        self._message: SearchMessage | None = None
        self._content: _Content | None = None

    def get(self, message: SearchMessage) -> _Content:
        if message is not self._message or self._content is None:
            self._message = message
            self._content = _Content(message, self._fold)
        return self._content


def _always(message: SearchMessage) -> bool:
    return True


def _all_of(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 2:
        first, second = predicates
        return lambda m: first(m) and second(m)

    def match(message: SearchMessage) -> bool:
        for predicate in predicates:
            if not predicate(message):
                return False
        return True
    return match


def _any_of(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 2:
        first, second = predicates
        return lambda m: first(m) or second(m)

    def match(message: SearchMessage) -> bool:
        for predicate in predicates:
            if predicate(message):
                return True
        return False
    return match


def _in_ranges(ranges: list[tuple[int, int]]) -> Callable[[int], bool]:
    """Membership in sorted, merged, disjoint ranges, by bisection."""
    if len(ranges) == 1:
        low, high = ranges[0]
        return lambda n: low <= n <= high
    starts = [low for low, _ in ranges]
    ends = [high for _, high in ranges]

    def contains(n: int) -> bool:
        index = bisect.bisect_right(starts, n) - 1
        return index >= 0 and n <= ends[index]
    return contains


class _Compiler:
    """Turns a key tree into a predicate, cheapest tests first."""

    def __init__(self, charset: str, messages: Sequence[SearchMessage],
                 max_uid: int | None, max_seq: int | None = None,
                 index: SearchIndex | None = None) -> None:
        self.fold: Callable[[str], str] = (
            _fold_ascii if charset == "US-ASCII" else _fold_unicode)
        self.messages = messages
        self.max_uid = max_uid
        self.max_seq = max_seq
        self.content = _ContentCache(self.fold)
        self.index = index if charset != "US-ASCII" else None

    def compile(self, key: SearchKey) -> tuple[Predicate, int]:
        """A predicate for ``key`` and a rough cost of running it once."""
        if isinstance(key, And):
            return self.combine(key.keys, _all_of, skip=_always)
        if isinstance(key, Or):
            return self.combine(key.keys, _any_of, skip=None)
        if isinstance(key, Not):
            inner, cost = self.compile(key.key)
            return (lambda m: not inner(m)), cost
        if isinstance(key, All):
            return _always, 0
        if isinstance(key, FlagKey):
            return self.flag(key), _COST_CHEAP
        if isinstance(key, RecentKey):
            present = key.present
            return (lambda m: bool(m.recent) == present), _COST_CHEAP
        if isinstance(key, SizeKey):
            size = key.size
            if key.larger:
                return (lambda m: m.size > size), _COST_CHEAP
            return (lambda m: m.size < size), _COST_CHEAP
        if isinstance(key, SequenceKey):
            return self.sequence(key), _COST_CHEAP
        if isinstance(key, ModSeqKey):
            modseq = key.modseq
            return (lambda m: getattr(m, "modseq", 0) >= modseq), _COST_CHEAP
        if isinstance(key, DateKey):
            return self.date(key)
        if isinstance(key, HeaderKey):
            return self.header(key), _COST_HEADER
        if isinstance(key, TextKey):
            return self.text(key), _COST_BODY + (_COST_HEADER if key.headers else 0)
        raise TypeError(f"not a search key: {key!r}")

    def combine(self, keys: tuple[SearchKey, ...],
                join: Callable[[list[Predicate]], Predicate],
                skip: Predicate | None) -> tuple[Predicate, int]:
        compiled = sorted((self.compile(key) for key in keys), key=lambda pc: pc[1])
        if skip is None and any(p is _always for p, _ in compiled):
            return _always, 0
        predicates = [p for p, _ in compiled if p is not skip]
        cost = sum(c for _, c in compiled)
        if not predicates:
            return _always, 0
        if len(predicates) == 1:
            return predicates[0], cost
        return join(predicates), cost

    def flag(self, key: FlagKey) -> Predicate:
        flag, present = key.flag, key.present
        if flag.startswith("\\"):
            if present:
                return lambda m: flag in m.flags
            return lambda m: flag not in m.flags
        lowered = flag.lower()

        def has(message: SearchMessage) -> bool:
            flags = message.flags
            if flag in flags:
                return True
            return any(f.lower() == lowered for f in flags) if flags else False
        if present:
            return has
        return lambda m: not has(m)

    def sequence(self, key: SequenceKey) -> Predicate:
        star = 0
        if any(low is None or high is None for low, high in key.ranges):
            if key.uid:
                star = self.max_uid if self.max_uid is not None else max(
                    (m.uid for m in self.messages), default=0)
            else:
                star = self.max_seq if self.max_seq is not None else max(
                    (m.seq for m in self.messages), default=0)
            if star <= 0:
                return lambda m: False
        spans = sorted((min(a, b), max(a, b)) for a, b in (
            (star if low is None else low, star if high is None else high)
            for low, high in key.ranges))
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        contains = _in_ranges(merged)
        if key.uid:
            return lambda m: contains(m.uid)
        return lambda m: contains(m.seq)

    def date(self, key: DateKey) -> tuple[Predicate, int]:
        day, relation = key.date, key.relation
        if key.sent:
            content, index = self.content, self.index

            def of(message: SearchMessage) -> datetime.date:
                if index is not None:
                    known = index.sent_date(message.uid)
                    if known is not False:
                        return known or _internal_date(message)  # type: ignore[return-value]
                return content.get(message).sent_date()
            cost = _COST_HEADER
        else:
            of, cost = _internal_date, _COST_CHEAP
        if relation == "before":
            return (lambda m: of(m) < day), cost
        if relation == "on":
            return (lambda m: of(m) == day), cost
        return (lambda m: of(m) >= day), cost

    def header(self, key: HeaderKey) -> Predicate:
        field, needle, content, index = key.field, self.fold(key.text), self.content, self.index

        def match(message: SearchMessage) -> bool:
            if index is not None:
                found = index.header_match(message.uid, field, needle)
                if found is not None:
                    return found
            return any(needle in value for value in content.get(message).values(field))
        return match

    def text(self, key: TextKey) -> Predicate:
        needle, content, index = self.fold(key.text), self.content, self.index
        if key.headers:
            def match(message: SearchMessage) -> bool:
                if index is not None:
                    found = index.header_text_match(message.uid, needle)
                    if found:
                        return True
                    if found is None and needle in content.get(message).header_text():
                        return True
                elif needle in content.get(message).header_text():
                    return True
                return needle in content.get(message).body()
            return match
        return lambda m: needle in content.get(m).body()


def evaluate(program: SearchProgram, messages: Sequence[SearchMessage],
             max_uid: int | None = None, max_seq: int | None = None,
             index: SearchIndex | None = None) -> list[int]:
    """The sequence numbers of the matching ``messages``, ascending.

    ``messages`` is the whole mailbox, or a chunk of it when ``max_seq`` and
    ``max_uid`` say what ``*`` is (the highest sequence number and UID):
    otherwise the highest of ``messages``. ``index`` answers header keys
    without parsing messages (see :class:`SearchIndex`).
    """
    if not messages:
        return []
    match, _ = _Compiler(program.charset, messages, max_uid, max_seq,
                         index).compile(program.root)
    result = [m.seq for m in messages if match(m)]
    result.sort()
    return result
