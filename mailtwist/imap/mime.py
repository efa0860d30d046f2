"""The MIME side of IMAP4rev1: ENVELOPE, BODY/BODYSTRUCTURE and BODY[section].

Sans-IO: a message goes in as bytes, wire-ready IMAP fragments come out.  One
offset-based pass splits the message into parts (headers end at the first
empty line, boundaries are found with ``bytes.find``), so every size and every
section is an exact slice of the stored octets and a 25 MB message with
attachments costs a few scans at C speed.

Where RFC 3501 leaves room, Dovecot's behaviour is the reference:

- Type, subtype, parameter names and values keep the case they have in the
  message; a missing or unparsable Content-Type is ``"text" "plain"
  ("charset" "us-ascii")``; a default transfer encoding is ``"7bit"``.
- A boundary line is a line that starts with ``--`` and a boundary of any
  enclosing multipart (longest match wins), as Dovecot does; a boundary of an
  outer multipart ends every part nested inside it.  A missing closing
  boundary ends the parts at the end of the message.
- RFC 2231 continuations (``name*0*=``, ``name*1*=``) are merged into one
  ``name*`` parameter whose value stays percent-encoded, as Dovecot's
  rfc2231 parser does; nothing is charset-decoded.
- ENVELOPE strings are the raw header text: encoded words stay encoded,
  8-bit text goes out as a literal.  The subject and display names are
  cleaned "for humans" (folding and runs of white space collapse to one
  space).  Broken addresses fall back to ``MISSING_MAILBOX`` and
  ``MISSING_DOMAIN`` like Dovecot's ``fill_missing`` mode.

Sizes and sections are octets as stored.  Messages are expected with CRLF
line endings; bare LF is tolerated (it ends lines and header blocks, and
belongs to a boundary delimiter like CRLF) but is not converted.

Deliberate differences from Dovecot, each for a client's sake:

- A multipart without a usable boundary, or in which no part is found, is
  presented as one ``text/plain`` part so the text can still be read (IMAP
  has no syntax for a multipart without parts).
- Parts below the nesting limit (:data:`MAX_DEPTH`) or past the part limit
  (:data:`MAX_PARTS`) are not split further; a multipart or message/rfc822
  there is presented as ``application/octet-stream`` so that no client
  expects an envelope that is not written.
- When a header field occurs more than once, the first one counts, for the
  envelope as for Content-* fields.

Limits keep hostile messages cheap (every scan is linear): at most
:data:`MAX_HEADER_FIELDS` fields per header are parsed (the rest stay in
the header's octets), address fields are read up to 64 KiB and Content-*
fields up to 128 KiB.
"""

from __future__ import annotations

import binascii
import codecs
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADER_FIELDS",
    "MAX_PARTS",
    "ParsedMessage",
    "SectionSpec",
    "decode_header_value",
    "imap_string",
    "parse_section_spec",
    "partial",
]

MAX_DEPTH = 100
"""Multipart / message/rfc822 nesting deeper than this is not split."""

MAX_PARTS = 10000
"""No more MIME parts than this are split out of one message."""

_BOUNDARY_MAX = 80
_STRUCTURED_MAX = 128 * 1024
_QUOTED_MAX = 1024
_NUL_REPLACEMENT = "\ufffd".encode()

_CR, _LF, _SP, _TAB = 0x0D, 0x0A, 0x20, 0x09

# --------------------------------------------------------------------------
# IMAP strings and partial fetches
# --------------------------------------------------------------------------

_NEEDS_LITERAL = re.compile(rb"[\r\n\x80-\xff]")


def imap_string(value: bytes | str | None) -> bytes:
    """Encode ``value`` as an IMAP nstring: NIL, a quoted string or a literal.

    Quoted strings cannot carry CR, LF or 8-bit octets (RFC 3501 section 9,
    ``QUOTED-CHAR``), so those and long values become ``{n}\\r\\n`` literals.
    NUL is allowed in neither form and is replaced with U+FFFD.
    """
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    if b"\x00" in value:
        value = value.replace(b"\x00", _NUL_REPLACEMENT)
    if len(value) > _QUOTED_MAX or _NEEDS_LITERAL.search(value):
        return b"{%d}\r\n%s" % (len(value), value)
    escaped = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + escaped + b'"'


def partial(data: bytes, start: int, length: int | None) -> bytes:
    """Return the ``<start.length>`` slice of a FETCH BODY[...] (RFC 3501 6.4.5).

    Starting past the end gives the empty string, and a length reaching past
    the end gives what there is.  Negative numbers cannot be written in IMAP
    and raise :class:`ValueError`.
    """
    if start < 0 or (length is not None and length < 0):
        raise ValueError("partial offsets cannot be negative")
    if start >= len(data):
        return b""
    if length is None:
        return data[start:]
    return data[start:start + length]


# --------------------------------------------------------------------------
# Header values
# --------------------------------------------------------------------------


def _unfold(value: bytes) -> bytes:
    """Remove line breaks and surrounding white space from a header value."""
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    return value.strip(b" \t")


_SPACES = re.compile(rb" {2,}")


def _for_humans(value: bytes) -> bytes:
    """Clean text for a person: no line breaks, single spaces, trimmed.

    This is what Dovecot does to the subject and display names in ENVELOPE.
    """
    value = value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\t", b" ")
    if b"\x00" in value:
        value = value.replace(b"\x00", _NUL_REPLACEMENT)
    return _SPACES.sub(b" ", value).strip(b" ")


def _text_codec(charset: str | None) -> str | None:
    """The name of a text codec for a MIME charset, or None if unknown."""
    if not charset:
        return None
    name = charset.strip().strip('"').split("*", 1)[0].lower()
    if name in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", "default"):
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_text(data: bytes, charset: str | None) -> str:
    """Decode ``data`` in ``charset``, or as UTF-8 then Latin-1 when unknown."""
    codec = _text_codec(charset)
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except Exception:  # noqa: BLE001 - a codec may fail in its own ways
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_base64(data: bytes) -> bytes:
    """Decode base64 leniently: stray characters and bad padding are ignored."""
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    rest = len(cleaned) % 4
    if rest == 1:
        cleaned = cleaned[:-1]
    elif rest:
        cleaned += b"=" * (4 - rest)
    try:
        return binascii.a2b_base64(cleaned)
    except (binascii.Error, ValueError):
        return b""


_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")


def decode_header_value(raw: bytes) -> str:
    """Decode RFC 2047 encoded words for SEARCH matching, tolerating junk.

    Folding is removed, white space between adjacent encoded words is
    dropped, adjacent words in one charset are joined before decoding (so a
    character split across two words survives), unknown charsets fall back to
    UTF-8 or Latin-1, and raw 8-bit text is read as UTF-8 where it is valid.
    """
    raw = raw.replace(b"\r\n", b"").replace(b"\n", b"")
    out: list[str] = []
    pending_charset: bytes | None = None
    pending: list[bytes] = []

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            out.append(_decode_text(b"".join(pending), (pending_charset or b"").decode("latin-1")))
            pending.clear()
        pending_charset = None

    pos = 0
    previous_was_word = False
    for match in _ENCODED_WORD.finditer(raw):
        between = raw[pos:match.start()]
        if between and not (previous_was_word and between.strip(b" \t") == b""):
            flush()
            out.append(_decode_text(between, None))
        charset = match.group(1).split(b"*", 1)[0].lower()
        text = match.group(3)
        if match.group(2) in b"bB":
            decoded = _decode_base64(text)
        else:
            decoded = binascii.a2b_qp(text, header=True)
        if pending_charset is not None and charset != pending_charset:
            flush()
        pending_charset = charset
        pending.append(decoded)
        pos = match.end()
        previous_was_word = True
    flush()
    if pos < len(raw):
        out.append(_decode_text(raw[pos:], None))
    return "".join(out)


# --------------------------------------------------------------------------
# Content-* header parsing (RFC 2045, 2183, 2231)
# --------------------------------------------------------------------------

_TOKEN = re.compile(rb"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+")
_COMMENTS = re.compile(rb"\((?:[^()\\]|\\.)*\)")
_QUOTED_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"?', re.S)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.S)

Params = list[tuple[bytes, bytes]]


def _strip_comments(value: bytes) -> bytes:
    """Remove (non-nested) RFC 822 comments; good enough for MIME tokens."""
    return _COMMENTS.sub(b" ", value) if b"(" in value else value


def _is_token(value: bytes) -> bool:
    return _TOKEN.fullmatch(value) is not None


def _unquote(content: bytes) -> bytes:
    return _QUOTED_PAIR.sub(rb"\1", content) if b"\\" in content else content


def _drop_trailing_comment(value: bytes) -> bytes:
    """``us-ascii (Plain text)`` -> ``us-ascii``."""
    value = value.rstrip(b" \t")
    if value.endswith(b")"):
        start = value.rfind(b"(")
        if start >= 0:
            value = value[:start].rstrip(b" \t")
    return value


def _parse_params(text: bytes) -> Params:
    """Parse ``*(";" name "=" value)``, skipping to the next ``;`` on junk.

    Unquoted values run to the next ``;`` (Dovecot stops at the first
    non-token octet; being lenient keeps unquoted file names with spaces).
    """
    params: Params = []
    n = len(text)
    i = 0
    while i < n:
        semi = text.find(b";", i)
        if semi < 0:
            break
        i = semi + 1
        next_semi = text.find(b";", i)
        eq = text.find(b"=", i, n if next_semi < 0 else next_semi)
        if eq < 0:
            continue
        name = _strip_comments(text[i:eq]).strip(b" \t")
        if not _is_token(name):
            i = eq + 1
            continue
        j = eq + 1
        while j < n and text[j] in (_SP, _TAB):
            j += 1
        quoted = _QUOTED_STRING.match(text, j)
        if quoted is not None:
            params.append((name, _unquote(quoted.group(1))))
            i = quoted.end()
        else:
            end = text.find(b";", j)
            if end < 0:
                end = n
            params.append((name, _drop_trailing_comment(text[j:end]).strip(b" \t")))
            i = end
    return _merge_rfc2231(params)


def _merge_rfc2231(params: Params) -> Params:
    """Merge RFC 2231 continuations the way Dovecot's rfc2231_parse does.

    ``key*0``, ``key*1*`` ... become one ``key`` (or ``key*`` when any piece
    is extended) after the plain parameters, sorted by key; values stay
    percent-encoded.  Pieces with gaps in their numbering are left alone.
    """
    plain: Params = []
    pieces: list[tuple[bytes, int, bool, bytes]] = []
    for key, value in params:
        star = key.find(b"*")
        if star < 0:
            plain.append((key, value))
            continue
        rest = key[star + 1:]
        digits = rest[:len(rest) - len(rest.lstrip(b"0123456789"))]
        marker = rest[len(digits):]
        if marker not in (b"", b"*") or len(digits) > 9:
            plain.append((key, value))
            continue
        extended = marker == b"*" or not rest
        pieces.append((key[:star], int(digits) if digits else 0, extended, value))
    if not pieces:
        return plain
    pieces.sort(key=lambda piece: (piece[0].lower(), piece[1]))
    merged: Params = []
    i = 0
    while i < len(pieces):
        base = pieces[i][0].lower()
        j = i
        while j < len(pieces) and pieces[j][0].lower() == base:
            j += 1
        group = pieces[i:j]
        if [piece[1] for piece in group] != list(range(len(group))):
            for key, idx, extended, value in group:
                suffix = b"*%d*" % idx if extended else b"*%d" % idx
                merged.append((key + suffix, value))
        else:
            any_extended = any(piece[2] for piece in group)
            value = b"''" if any_extended and not group[0][2] else b""
            for _key, _idx, extended, piece_value in group:
                if any_extended and not extended:
                    piece_value = piece_value.replace(b"%", b"%25")
                value += piece_value
            merged.append((group[0][0] + (b"*" if any_extended else b""), value))
        i = j
    return plain + merged


def _parse_content_type(value: bytes) -> tuple[bytes, bytes, Params] | None:
    """``type/subtype`` and parameters, or None when the type is unusable."""
    head, semi, _ = value.partition(b";")
    media, slash, subtype = _strip_comments(head).partition(b"/")
    media, subtype = media.strip(b" \t"), subtype.strip(b" \t")
    if not slash or not _is_token(media) or not _is_token(subtype):
        return None
    return media, subtype, _parse_params(value[len(head):]) if semi else []


def _parse_token_and_params(value: bytes) -> tuple[bytes, Params] | None:
    """A leading token (Content-Disposition type) and its parameters."""
    head, semi, _ = value.partition(b";")
    token = _strip_comments(head).strip(b" \t")
    if not _is_token(token):
        return None
    return token, _parse_params(value[len(head):]) if semi else []


def _parse_language(value: bytes) -> list[bytes] | None:
    """Content-Language tags (RFC 3282), up to the first malformed one."""
    tags = []
    for item in _strip_comments(value).split(b","):
        item = item.strip(b" \t")
        if not _is_token(item):
            break
        tags.append(item)
    return tags or None


def _parse_transfer_encoding(value: bytes) -> bytes | None:
    token = _strip_comments(value).strip(b" \t")
    return token if _is_token(token) else None


# --------------------------------------------------------------------------
# Addresses (RFC 5322 section 3.4), tolerant
# --------------------------------------------------------------------------

_ADDRESS_MAX = 64 * 1024

# Token kinds: words, or the special character itself.
_ATOM, _QUOTED, _COMMENT, _LITERAL = 1, 2, 3, 4
_DOT, _AT, _COMMA, _COLON, _SEMICOLON, _LT, _GT = b".@,:;<>"

Token = tuple[int, bytes]


@dataclass
class _Address:
    name: bytes | None
    route: bytes | None
    mailbox: bytes | None
    host: bytes | None


_ADDRESS_TOKEN = re.compile(
    rb'(?P<space>[ \t\r\n]+)'
    rb'|"(?P<quoted>(?:[^"\\]|\\.)*)"?'
    rb"|(?P<comment>\()"
    rb"|(?P<literal>\[[^\]]*\]?)"
    rb"|(?P<special>[<>@,;:.])"
    rb'|(?P<atom>[^ \t\r\n"(\[<>@,;:.]+)', re.S)
_COMMENT_STOP = re.compile(rb"[()\\]")


def _tokenize_address(value: bytes) -> list[Token]:
    """Split an address field into atoms, quoted strings, comments,
    domain literals and specials; unterminated constructs run to the end."""
    tokens: list[Token] = []
    n = len(value)
    i = 0
    while i < n:
        match = _ADDRESS_TOKEN.match(value, i)
        assert match is not None
        kind = match.lastgroup
        i = match.end()
        if kind == "special":
            tokens.append((value[i - 1], b""))
        elif kind == "atom":
            tokens.append((_ATOM, match.group()))
        elif kind == "quoted":
            text = _unquote(match.group("quoted")).replace(b"\r", b"").replace(b"\n", b"")
            tokens.append((_QUOTED, text))
        elif kind == "comment":
            depth, start = 1, i
            while depth:
                stop = _COMMENT_STOP.search(value, i)
                if stop is None:
                    i = n
                    break
                i = stop.end()
                if stop.group() == b"\\":
                    i += 1
                else:
                    depth += 1 if stop.group() == b"(" else -1
            tokens.append((_COMMENT, value[start:i - 1 if depth == 0 else n]))
        elif kind == "literal":
            tokens.append((_LITERAL, match.group()))
    return tokens


def _join_phrase(tokens: list[Token]) -> bytes:
    """Words joined by single spaces, dots glued on (``John Q. Public``)."""
    words: list[bytes] = []
    for kind, text in tokens:
        if kind == _DOT and words:
            words[-1] += b"."
        elif kind == _ATOM or kind == _QUOTED:
            words.append(text)
    return b" ".join(words)


def _join_tight(tokens: list[Token]) -> bytes:
    """Local part or domain: atoms, quoted text, literals and dots, no spaces."""
    return b"".join(b"." if kind == _DOT else text for kind, text in tokens
                    if kind in (_ATOM, _QUOTED, _LITERAL, _DOT))


def _index(tokens: list[Token], kind: int) -> int:
    for k, token in enumerate(tokens):
        if token[0] == kind:
            return k
    return -1


def _route(tokens: list[Token]) -> bytes | None:
    """``@a,@b`` from the tokens between ``<@`` and ``:``."""
    hops: list[list[Token]] = [[]]
    for token in tokens:
        if token[0] == _AT:
            hops.append([])
        else:
            hops[-1].append(token)
    return b",".join(b"@" + hop for hop in map(_join_tight, hops) if hop) or None


def _mailbox(tokens: list[Token]) -> _Address | None:
    """One mailbox (name-addr or addr-spec) from its tokens, gaps filled in
    with Dovecot's MISSING_MAILBOX and MISSING_DOMAIN."""
    words = [token for token in tokens if token[0] != _COMMENT]
    if not words:
        return None
    comments = [text for kind, text in tokens if kind == _COMMENT]
    name: bytes | None = None
    route: bytes | None = None
    mailbox: bytes | None = None
    host: bytes | None = None
    angle = _index(words, _LT)
    if angle >= 0:
        name = _join_phrase(words[:angle]) or None
        inner = words[angle + 1:]
        close = _index(inner, _GT)
        if close >= 0:
            inner = inner[:close]
        colon = _index(inner, _COLON)
        if inner and inner[0][0] == _AT and colon >= 0:
            route = _route(inner[1:colon])
            inner = inner[colon + 1:]
        at = _index(inner, _AT)
        if at < 0:
            mailbox = _join_tight(inner) or None
        else:
            mailbox, host = _join_tight(inner[:at]), _join_tight(inner[at + 1:])
    else:
        at = _index(words, _AT)
        if at >= 0:
            mailbox, host = _join_tight(words[:at]), _join_tight(words[at + 1:])
            name = comments[-1] if comments else None
        else:
            kinds = [kind for kind, _ in words]
            dot_atom = (set(kinds) <= {_ATOM, _DOT}
                        and not any(a == b == _ATOM for a, b in pairwise(kinds)))
            if dot_atom and _ATOM in kinds:
                mailbox = _join_tight(words)
                name = comments[-1] if comments else None
            else:
                name = _join_phrase(words) or None
    return _Address(name, route, b"MISSING_MAILBOX" if mailbox is None else mailbox,
                    host or b"MISSING_DOMAIN")


def _mailbox_end(tokens: list[Token], i: int, in_group: bool) -> int:
    """Index of the comma (or group-ending semicolon) that ends a mailbox."""
    in_angle = False
    n = len(tokens)
    while i < n:
        kind = tokens[i][0]
        if kind == _LT:
            in_angle = True
        elif kind == _GT:
            in_angle = False
        elif not in_angle and (kind == _COMMA or (in_group and kind == _SEMICOLON)):
            break
        i += 1
    return i


_PHRASE_KINDS = frozenset((_ATOM, _QUOTED, _COMMENT, _DOT))


def _parse_addresses(value: bytes) -> list[_Address]:
    """An address list; a group becomes RFC 3501's start and end markers."""
    tokens = _tokenize_address(value)
    result: list[_Address] = []
    n = len(tokens)
    i = 0
    while i < n:
        j = i
        while j < n and tokens[j][0] in _PHRASE_KINDS:
            j += 1
        if j < n and tokens[j][0] == _COLON:
            result.append(_Address(None, None, _join_phrase(tokens[i:j]), None))
            i = j + 1
            while i < n and tokens[i][0] != _SEMICOLON:
                k = _mailbox_end(tokens, i, True)
                address = _mailbox(tokens[i:k])
                if address is not None:
                    result.append(address)
                i = k + 1 if k < n and tokens[k][0] == _COMMA else k
            result.append(_Address(None, None, None, None))
            i += 1
            continue
        k = _mailbox_end(tokens, i, False)
        address = _mailbox(tokens[i:k])
        if address is not None:
            result.append(address)
        i = k + 1
    return result


def _address_list(value: bytes | None) -> bytes:
    """An ENVELOPE address list; only the first 64 KiB of a field count."""
    if value is None:
        return b"NIL"
    addresses = _parse_addresses(value[:_ADDRESS_MAX])
    if not addresses:
        return b"NIL"
    out = [b"("]
    for address in addresses:
        name = None if address.name is None else _for_humans(address.name)
        out.append(b"(%s %s %s %s)" % (
            imap_string(name), imap_string(address.route),
            imap_string(address.mailbox), imap_string(address.host)))
    out.append(b")")
    return b"".join(out)


# --------------------------------------------------------------------------
# The part tree
# --------------------------------------------------------------------------

_LEAF, _MULTIPART, _MESSAGE, _OPAQUE = range(4)

MAX_HEADER_FIELDS = 10000
"""Header fields past this many in one header are kept as octets only."""


class _Field(NamedTuple):
    """One header field (continuation lines included) as offsets."""

    name: str | None
    start: int
    value_start: int
    end: int


@dataclass(eq=False)
class _Part:
    """A MIME part as offsets into the raw message.

    ``raw[start:header_end]`` is its header (``fields_end`` excludes the
    empty line), ``raw[header_end:end]`` its body.
    """

    start: int
    fields_end: int = 0
    header_end: int = 0
    end: int = 0
    fields: list[_Field] = field(default_factory=list)
    kind: int = _LEAF
    content_type: tuple[bytes, bytes, Params] | None = None
    boundary: bytes = b""
    content: dict[str, bytes] = field(default_factory=dict)
    children: list[_Part] = field(default_factory=list)


@dataclass(eq=False)
class _Boundary:
    """An open multipart's boundary and what is known of its next line.

    ``next_line`` is where it next starts a line (-1: not found yet);
    no line before ``clear_until`` starts with it.
    """

    value: bytes
    owner: _Part
    next_line: int = -1
    clear_until: int = 0


@dataclass(eq=False)
class _Hit:
    """A boundary line: the CRLF before it belongs to the delimiter."""

    boundary: _Boundary
    delim_start: int
    line_start: int
    line_end: int
    close: bool


_HEADER_BLANK = re.compile(rb"\n\r?\n")
_FIELD = re.compile(
    rb"(?:([\x21-\x39\x3b-\x7e]+)[ \t]*:())?[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*")


class _Splitter:
    """Builds the part tree in one forward pass over the message.

    Searches only move forward, so the next empty line and each open
    boundary's next occurrence are remembered: every octet is scanned a
    bounded number of times however the parts are nested.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.stack: list[_Boundary] = []
        self.count = 0
        self.blank_lf = -1

    def parse(self) -> _Part:
        part, _ = self._part(0, None, 0)
        return part

    def _match(self, line: int) -> _Hit | None:
        """The hit if the line at ``line`` starts with ``--`` and the longest
        matching boundary of an open multipart (Dovecot's boundary_find)."""
        raw = self.raw
        if not raw.startswith(b"--", line):
            return None
        segment = raw[line + 2:line + 2 + _BOUNDARY_MAX + 8]
        lf = segment.find(b"\n")
        if lf >= 0:
            segment = segment[:lf]
            if segment.endswith(b"\r"):
                segment = segment[:-1]
            if len(segment) > 2 and segment.endswith(b"--"):
                segment = segment[:-2]
        best: _Boundary | None = None
        for entry in reversed(self.stack):
            size = len(entry.value)
            if (size <= len(segment) and segment.startswith(entry.value)
                    and (best is None or len(best.value) < size)):
                best = entry
                if size == len(segment):
                    break
        if best is None:
            return None
        after = line + 2 + len(best.value)
        delim = line
        if delim > 0 and raw[delim - 1] == _LF:
            delim -= 1
            if delim > 0 and raw[delim - 1] == _CR:
                delim -= 1
        newline = raw.find(b"\n", line)
        line_end = len(raw) if newline < 0 else newline + 1
        return _Hit(best, delim, line, line_end, raw[after:after + 2] == b"--")

    def _next_line(self, entry: _Boundary, pos: int, limit: int) -> int:
        """Start of the first line in [pos, limit) that begins with ``--``
        and ``entry``'s boundary, or -1.

        Searching only up to ``limit`` (where an enclosing boundary was
        already found) keeps an unclosed inner multipart from rescanning
        the rest of the message.
        """
        if entry.next_line >= pos:
            return entry.next_line if entry.next_line < limit else -1
        start = max(pos, entry.clear_until)
        if start >= limit:
            return -1
        raw = self.raw
        needle = b"\n--" + entry.value
        if start == 0 and raw.startswith(needle[1:]):
            found = 0
        else:
            found = raw.find(needle, start - 1 if start > 0 else 0, limit - 1 + len(needle))
            found = -1 if found < 0 else found + 1
        if found < 0:
            entry.clear_until = limit
            return -1
        entry.next_line = found
        return found

    def _find(self, pos: int) -> _Hit | None:
        """The first boundary line starting at or after ``pos``."""
        limit = len(self.raw) + 1
        while self.stack:
            best = -1
            for entry in self.stack:
                line = self._next_line(entry, pos, limit if best < 0 else best)
                if line >= 0:
                    best = line
            if best < 0:
                return None
            hit = self._match(best)
            if hit is not None:
                return hit
            pos = best + 1
        return None

    def _header(self, start: int) -> tuple[int, int, _Hit | None]:
        """Find where a header ends: (fields end, body start, boundary hit).

        The header ends after the first empty line, at the end of the data,
        or (leaving no body) just before a boundary line of an open
        multipart.
        """
        raw = self.raw
        n = len(raw)
        if start >= n:
            return n, n, None
        if raw.startswith(b"\r\n", start):
            return start, start + 2, None
        if raw[start] == _LF:
            return start, start + 1, None
        if self.blank_lf < start:
            found = _HEADER_BLANK.search(raw, start)
            self.blank_lf = n if found is None else found.start()
        fields_end = n if self.blank_lf >= n else self.blank_lf + 1
        hit = self._find(start)
        if hit is not None and hit.line_start <= fields_end:
            cut = max(start, hit.delim_start)
            return cut, cut, hit
        if fields_end >= n:
            return n, n, None
        body_start = fields_end + (2 if raw[fields_end] == _CR else 1)
        return fields_end, body_start, None

    def _fields(self, start: int, end: int) -> list[_Field]:
        fields: list[_Field] = []
        for match in _FIELD.finditer(self.raw, start, end):
            if match.start() >= end or len(fields) >= MAX_HEADER_FIELDS:
                break
            name = match.group(1)
            if name is None:
                fields.append(_Field(None, match.start(), match.end(), match.end()))
            else:
                fields.append(_Field(name.decode("ascii").lower(), match.start(),
                                     match.start(2), match.end()))
        return fields

    def _part(self, start: int, parent: _Part | None, depth: int) -> tuple[_Part, _Hit | None]:
        self.count += 1
        fields_end, body_start, hit = self._header(start)
        part = _Part(start, fields_end, body_start)
        part.fields = self._fields(start, fields_end)
        self._interpret(part, parent, depth)
        if hit is not None:
            part.end = body_start
            if part.kind == _MULTIPART:
                part.kind = _LEAF
                part.content_type = None
            elif part.kind == _MESSAGE:
                self.count += 1
                part.children = [_Part(body_start, body_start, body_start, body_start)]
            return part, hit
        if part.kind == _MULTIPART:
            return part, self._multipart_body(part, depth)
        if part.kind == _MESSAGE:
            child, hit = self._part(body_start, part, depth + 1)
            part.children = [child]
            part.end = child.end
            return part, hit
        hit = self._find(body_start)
        part.end = len(self.raw) if hit is None else max(body_start, hit.delim_start)
        return part, hit

    def _multipart_body(self, part: _Part, depth: int) -> _Hit | None:
        """Split a multipart body into its children; returns the hit that
        ended it when that belongs to an enclosing multipart."""
        n = len(self.raw)
        body_start = part.header_end
        entry = _Boundary(part.boundary, part)
        level = len(self.stack)
        self.stack.append(entry)
        try:
            hit = self._find(body_start)
            while (hit is not None and hit.boundary is entry and not hit.close
                   and self.count < MAX_PARTS):
                child, hit = self._part(hit.line_end, part, depth + 1)
                part.children.append(child)
            if hit is not None and hit.boundary is entry:
                del self.stack[level:]
                epilogue = hit.line_end
                hit = self._find(epilogue)
                part.end = n if hit is None else max(epilogue, hit.delim_start)
            else:
                part.end = n if hit is None else max(body_start, hit.delim_start)
        finally:
            del self.stack[level:]
        if not part.children:
            part.kind = _LEAF
            part.content_type = None
        return hit

    def _interpret(self, part: _Part, parent: _Part | None, depth: int) -> None:
        """Read the Content-* fields and decide how the part is split.

        As in Dovecot, Content-* fields count in a part of a multipart, or
        where a MIME-Version or Content-Type field is present.
        """
        raw = self.raw
        in_multipart = parent is not None and parent.kind == _MULTIPART
        content: dict[str, bytes] = {}
        mime_version = False
        for f in part.fields:
            if f.name is None:
                continue
            if f.name.startswith("content-"):
                if f.name not in content:
                    end = min(f.end, f.value_start + _STRUCTURED_MAX)
                    content[f.name] = _unfold(raw[f.value_start:end])
            elif f.name == "mime-version":
                mime_version = True
        if not (in_multipart or mime_version or "content-type" in content):
            return
        part.content = content
        limited = depth >= MAX_DEPTH or self.count >= MAX_PARTS
        value = content.get("content-type")
        if value is None:
            if in_multipart and parent is not None and _subtype_is(parent, b"digest"):
                part.kind = _OPAQUE if limited else _MESSAGE
            return
        parsed = _parse_content_type(value)
        if parsed is None:
            return
        media, subtype, params = parsed
        media_lower = media.lower()
        if media_lower == b"multipart":
            boundary = next((v for k, v in params if k.lower() == b"boundary"), b"")
            if not boundary:
                return
            part.content_type = parsed
            part.boundary = boundary[:_BOUNDARY_MAX]
            part.kind = _OPAQUE if limited else _MULTIPART
            return
        part.content_type = parsed
        if media_lower == b"message" and subtype.lower() == b"rfc822":
            part.kind = _OPAQUE if limited else _MESSAGE


def _subtype_is(part: _Part, subtype: bytes) -> bool:
    return part.content_type is not None and part.content_type[1].lower() == subtype


# --------------------------------------------------------------------------
# BODY[section] specifiers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionSpec:
    """A parsed ``BODY[<section>]`` specifier.

    ``path`` is the part number list (empty for the top level), ``text`` one
    of ``""``, ``"HEADER"``, ``"TEXT"``, ``"MIME"``, ``"HEADER.FIELDS"`` or
    ``"HEADER.FIELDS.NOT"``, and ``fields`` the lower-cased field names.
    """

    path: tuple[int, ...]
    text: str
    fields: tuple[str, ...] = ()


_FIELD_LIST_ITEM = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)')


def parse_section_spec(spec: str) -> SectionSpec:
    """Parse a section specifier; raise :class:`ValueError` if malformed.

    A malformed specifier is the client's syntax error (a BAD reply), not a
    missing part, so it is told apart from :meth:`ParsedMessage.section`
    returning None.
    """
    s = spec.strip()
    path: list[int] = []
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        j = i
        while j < len(s) and "0" <= s[j] <= "9":
            j += 1
        if s[i] == "0":
            raise ValueError(f"part numbers start at 1: {spec!r}")
        path.append(int(s[i:j]))
        if j == len(s):
            i = j
            break
        if s[j] != ".":
            raise ValueError(f"bad section {spec!r}")
        i = j + 1
        if i == len(s):
            raise ValueError(f"bad section {spec!r}")
    rest = s[i:]
    upper = rest.upper()
    if upper in ("", "HEADER", "TEXT"):
        return SectionSpec(tuple(path), upper)
    if upper == "MIME":
        if not path:
            raise ValueError("MIME needs a part number")
        return SectionSpec(tuple(path), upper)
    for text in ("HEADER.FIELDS.NOT", "HEADER.FIELDS"):
        if upper.startswith(text):
            names = rest[len(text):].strip()
            if not (names.startswith("(") and names.endswith(")")):
                raise ValueError(f"bad header list in {spec!r}")
            inner = names[1:-1]
            items = []
            for match in _FIELD_LIST_ITEM.finditer(inner):
                item = match.group(1)
                if item is not None:
                    item = re.sub(r"\\(.)", r"\1", item)
                else:
                    item = match.group(2)
                items.append(item.lower())
            if not items or _FIELD_LIST_ITEM.sub("", inner).strip():
                raise ValueError(f"bad header list in {spec!r}")
            return SectionSpec(tuple(path), text, tuple(items))
    raise ValueError(f"bad section {spec!r}")


# --------------------------------------------------------------------------
# The message
# --------------------------------------------------------------------------


class ParsedMessage:
    """A message parsed once, answering FETCH and SEARCH items from offsets.

    Never raises on malformed input.  Should a bug surface anyway, the
    answer falls back to a plain single-part view and :attr:`degraded` is
    set, so the server can log it instead of dropping the connection.
    """

    def __init__(self, raw: bytes, root: _Part, degraded: bool = False) -> None:
        self.raw = raw
        self.degraded = degraded
        self._root = root
        self._cache: dict[str, bytes] = {}

    @classmethod
    def parse(cls, raw: bytes) -> ParsedMessage:
        """Split ``raw`` (CRLF line endings expected, bare LF tolerated)."""
        raw = bytes(raw)
        try:
            return cls(raw, _Splitter(raw).parse())
        except Exception:  # noqa: BLE001 - the safety net documented above
            return cls(raw, _flat_part(raw), degraded=True)

    # -- FETCH ENVELOPE / BODY / BODYSTRUCTURE ------------------------------

    def envelope(self) -> bytes:
        """The ENVELOPE s-expression (RFC 3501 section 7.4.2), wire-ready."""
        return self._cached("envelope", lambda: _envelope(self.raw, self._root.fields),
                            lambda: b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")

    def bodystructure(self, extensible: bool = True) -> bytes:
        """BODYSTRUCTURE (``extensible``) or BODY, as one parenthesised list."""
        def build() -> bytes:
            out: list[bytes] = []
            _write_body(self.raw, self._root, extensible, out)
            return b"".join(out)

        def fallback() -> bytes:
            out: list[bytes] = []
            _write_body(self.raw, _flat_part(self.raw), extensible, out)
            return b"".join(out)

        return self._cached(f"bodystructure-{extensible}", build, fallback)

    def _cached(self, key: str, build: Callable[[], bytes],
                fallback: Callable[[], bytes]) -> bytes:
        value = self._cache.get(key)
        if value is None:
            try:
                value = build()
            except Exception:  # noqa: BLE001 - see the class docstring
                self.degraded = True
                value = fallback()
            self._cache[key] = value
        return value

    # -- FETCH BODY[section] ------------------------------------------------

    def section(self, spec: str | SectionSpec) -> bytes | None:
        """The octets of ``BODY[spec]``, or None if that part does not exist.

        For None the server sends an empty string, as Dovecot does.
        ``N.HEADER``, ``N.TEXT`` and ``N.HEADER.FIELDS`` need part N to be a
        message/rfc822.  ``HEADER.FIELDS`` answers the matching fields in
        message order followed by an empty line.  A malformed ``spec``
        raises :class:`ValueError` (the client's error: reply BAD); an
        already parsed :class:`SectionSpec` is taken as is.
        """
        parsed = spec if isinstance(spec, SectionSpec) else parse_section_spec(spec)
        raw = self.raw
        if not parsed.path:
            if parsed.text == "":
                return raw
            return self._message_section(self._root, parsed)
        part = self._find(parsed.path)
        if part is None:
            return None
        if parsed.text == "":
            return raw[part.header_end:part.end]
        if parsed.text == "MIME":
            return raw[part.start:part.header_end]
        if part.kind != _MESSAGE:
            return None
        return self._message_section(part.children[0], parsed)

    def _message_section(self, message: _Part, spec: SectionSpec) -> bytes:
        raw = self.raw
        if spec.text == "TEXT":
            return raw[message.header_end:message.end]
        if spec.text == "HEADER":
            return raw[message.start:message.header_end]
        wanted = set(spec.fields)
        keep_matching = spec.text == "HEADER.FIELDS"
        out = []
        for f in message.fields:
            if (f.name in wanted) == keep_matching:
                line = raw[f.start:f.end]
                out.append(line if line.endswith(b"\n") else line + b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def _find(self, path: tuple[int, ...]) -> _Part | None:
        """Follow RFC 3501 part numbers the way Dovecot's imap-msgpart does."""
        part = self._root
        for index, number in enumerate(path):
            more = index + 1 < len(path)
            if part.kind == _MULTIPART:
                if number > len(part.children):
                    return None
                part = part.children[number - 1]
            elif number != 1 or (more and part.kind != _MESSAGE):
                return None
            if more and part.kind == _MESSAGE:
                part = part.children[0]
        return part

    # -- SEARCH -------------------------------------------------------------

    def header_fields(self) -> list[tuple[str, bytes]]:
        """The top-level header as (lower-cased name, unfolded raw value)."""
        raw = self.raw
        return [(f.name, _unfold(raw[f.value_start:f.end]))
                for f in self._root.fields if f.name is not None]

    def text_for_search(self) -> str:
        """Decoded text of the body for SEARCH BODY/TEXT.

        Text parts are transfer-decoded and charset-decoded (bad octets are
        replaced), HTML loses its tags, and headers of attached messages are
        included RFC 2047-decoded.  Other parts are left out.
        """
        out: list[str] = []
        try:
            self._collect_text(self._root, out)
        except Exception:  # noqa: BLE001 - see the class docstring
            self.degraded = True
            return self.raw.decode("utf-8", "replace")
        return "\n".join(out)

    def _collect_text(self, part: _Part, out: list[str]) -> None:
        raw = self.raw
        if part.kind == _MULTIPART:
            for child in part.children:
                self._collect_text(child, out)
            return
        if part.kind == _MESSAGE:
            message = part.children[0]
            for f in message.fields:
                if f.name is not None:
                    value = decode_header_value(_unfold(raw[f.value_start:f.end]))
                    out.append(f"{f.name}: {value}")
            self._collect_text(message, out)
            return
        if part.kind == _OPAQUE:
            return
        media, subtype, params = part.content_type or (b"text", b"plain", [])
        if media.lower() != b"text":
            return
        body = raw[part.header_end:part.end]
        encoding = _parse_transfer_encoding(part.content.get("content-transfer-encoding", b""))
        encoding = (encoding or b"").lower()
        if encoding == b"base64":
            body = _decode_base64(body)
        elif encoding == b"quoted-printable":
            body = binascii.a2b_qp(body)
        charset = next((v for k, v in params if k.lower() == b"charset"), b"")
        text = _decode_text(body, charset.decode("latin-1"))
        if subtype.lower() == b"html":
            text = _html_to_text(text)
        out.append(text)


_HTML_HIDDEN = re.compile(r"<(script|style)\b", re.I)
_HTML_HIDDEN_END = {name: re.compile(rf"</{name}\s*>", re.I) for name in ("script", "style")}
_HTML_TAG = re.compile(r"<[^<>]*>")
_WHITE_SPACE = re.compile(r"\s+")


def _html_to_text(text: str) -> str:
    """Visible text of HTML, roughly: no tags, scripts or style sheets."""
    visible = []
    pos = 0
    while (hidden := _HTML_HIDDEN.search(text, pos)) is not None:
        visible.append(text[pos:hidden.start()])
        close = _HTML_HIDDEN_END[hidden.group(1).lower()].search(text, hidden.end())
        if close is None:
            pos = len(text)
            break
        pos = close.end()
    visible.append(text[pos:])
    text = _HTML_TAG.sub(" ", " ".join(visible))
    return _WHITE_SPACE.sub(" ", html.unescape(text)).strip()


def _flat_part(raw: bytes) -> _Part:
    """A header-less text/plain view of the whole message (the safety net)."""
    return _Part(0, 0, 0, len(raw))


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _first(raw: bytes, fields: list[_Field], name: str) -> bytes | None:
    """The raw value of the first field called ``name``."""
    for f in fields:
        if f.name == name:
            return raw[f.value_start:f.end]
    return None


def _envelope(raw: bytes, fields: list[_Field]) -> bytes:
    """ENVELOPE from a header; Sender and Reply-To default to From."""

    def nstring(name: str) -> bytes:
        value = _first(raw, fields, name)
        return imap_string(None if value is None else _unfold(value))

    def addresses(name: str) -> bytes:
        value = _first(raw, fields, name)
        return _address_list(None if value is None else _unfold(value))

    subject = _first(raw, fields, "subject")
    sender_from = addresses("from")
    sender = addresses("sender")
    reply_to = addresses("reply-to")
    return b"(%s)" % b" ".join([
        nstring("date"),
        imap_string(None if subject is None else _for_humans(subject)),
        sender_from,
        sender_from if sender == b"NIL" else sender,
        sender_from if reply_to == b"NIL" else reply_to,
        addresses("to"),
        addresses("cc"),
        addresses("bcc"),
        nstring("in-reply-to"),
        nstring("message-id"),
    ])


def _params(params: Params, default_charset: bool) -> bytes:
    """A body parameter list; text parts get charset us-ascii by default."""
    items = [imap_string(k) + b" " + imap_string(v) for k, v in params]
    if default_charset and not any(k.lower() == b"charset" for k, _ in params):
        items.append(b'"charset" "us-ascii"')
    if not items:
        return b"NIL"
    return b"(" + b" ".join(items) + b")"


def _extension_tail(part: _Part) -> bytes:
    """Disposition, language and location: common to both body kinds."""
    content = part.content
    disposition = b"NIL"
    value = content.get("content-disposition")
    if value is not None:
        parsed = _parse_token_and_params(value)
        if parsed is not None:
            disposition = b"(%s %s)" % (imap_string(parsed[0]), _params(parsed[1], False))
    language = b"NIL"
    value = content.get("content-language")
    if value is not None:
        tags = _parse_language(value)
        if tags:
            language = b"(" + b" ".join(imap_string(tag) for tag in tags) + b")"
    return b" %s %s %s" % (disposition, language, imap_string(content.get("content-location")))


def _write_body(raw: bytes, part: _Part, extensible: bool, out: list[bytes]) -> None:
    """Append the BODY (or, ``extensible``, BODYSTRUCTURE) list of ``part``."""
    out.append(b"(")
    if part.kind == _MULTIPART:
        for child in part.children:
            _write_body(raw, child, extensible, out)
        _media, subtype, params = part.content_type or (b"multipart", b"mixed", [])
        out.append(b" " + imap_string(subtype))
        if extensible:
            out.append(b" " + _params(params, False))
            out.append(_extension_tail(part))
        out.append(b")")
        return
    content = part.content
    text = False
    if part.kind == _MESSAGE:
        out.append(b'"message" "rfc822" ')
        params = part.content_type[2] if part.content_type else []
        out.append(_params(params, False))
    elif part.kind == _OPAQUE:
        out.append(b'"application" "octet-stream" NIL')
    elif part.content_type is None:
        text = True
        out.append(b'"text" "plain" ("charset" "us-ascii")')
    else:
        media, subtype, params = part.content_type
        text = media.lower() == b"text"
        out.append(b"%s %s %s" % (imap_string(media), imap_string(subtype), _params(params, text)))
    encoding = _parse_transfer_encoding(content.get("content-transfer-encoding", b""))
    out.append(b" %s %s %s %d" % (
        imap_string(content.get("content-id")),
        imap_string(content.get("content-description")),
        imap_string(encoding or b"7bit"),
        part.end - part.header_end))
    if text:
        out.append(b" %d" % raw.count(b"\n", part.header_end, part.end))
    elif part.kind == _MESSAGE:
        message = part.children[0]
        out.append(b" " + _envelope(raw, message.fields) + b" ")
        _write_body(raw, message, extensible, out)
        out.append(b" %d" % raw.count(b"\n", part.header_end, part.end))
    if extensible:
        out.append(b" " + imap_string(content.get("content-md5")))
        out.append(_extension_tail(part))
    out.append(b")")
