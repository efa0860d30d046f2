"""FETCH: the attribute list a client asks for, and the responses, sans-IO.

Rendering takes the message octets from a loader, so the server runs it in
the mail-io pool when the items need the file (bodies, ENVELOPE,
BODYSTRUCTURE) or its mtime (INTERNALDATE), and on the reactor when they
need neither (FLAGS, UID, RFC822.SIZE): ``UID FETCH 1:* (FLAGS)`` on a big
folder reads no message file.

ENVELOPE, BODY and BODYSTRUCTURE come from the folder's message cache
(:class:`mailtwist.storage.index.MessageCache`) when it has the message:
then the file is not opened either. A message parsed for lack of a cache
row is handed to *on_parsed*, so that the server can fill the row.

Fixes over Twisted's FETCH: ``<start.length>`` returns just that slice,
BODY[...] and RFC822(.TEXT) set \\Seen unless PEEKed (and the new FLAGS are
sent with the response), and 8-bit header text always goes out as literals
(via :mod:`mailtwist.imap.mime`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailtwist.imap.mime import ParsedMessage, SectionSpec, parse_section_spec, partial
from mailtwist.imap.wire import Atom, ParseError, Token, format_date_time

SIMPLE_ITEMS = frozenset({
    b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY",
    b"BODYSTRUCTURE", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT", b"MODSEQ",
})
MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_NEEDS_FILE = frozenset({b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"RFC822", b"RFC822.HEADER",
                         b"RFC822.TEXT", b"SECTION"})
_NEEDS_PARSE = frozenset({b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"RFC822.HEADER",
                          b"RFC822.TEXT"})
CACHED_ITEMS = frozenset({b"ENVELOPE", b"BODY", b"BODYSTRUCTURE"})
"""Items the message cache answers without the file."""
_SECTION = re.compile(rb"(BODY|BODY\.PEEK)\[(.*)\](?:<([0-9]{1,10})\.([0-9]{1,10})>)?",
                      re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class FetchItem:
    """One requested item; ``kind`` is the item name or ``SECTION`` for BODY[...]."""

    kind: bytes
    section: str = ""
    start: int | None = None
    length: int | None = None
    peek: bool = True
    key: bytes = b""
    spec: SectionSpec | None = None
    """``section`` parsed once per command, not once per message."""

    @property
    def needs_file(self) -> bool:
        return self.kind in _NEEDS_FILE

    @property
    def sets_seen(self) -> bool:
        return not self.peek


def parse_fetch_items(token: Token) -> list[FetchItem]:
    """The items of a FETCH: a macro, one item, or a parenthesised list."""
    if isinstance(token, Atom) and token.upper() in MACROS:
        return [FetchItem(name, key=name) for name in MACROS[token.upper()]]
    tokens = token if isinstance(token, list) else [token]
    if not tokens:
        raise ParseError("empty fetch attribute list")
    items = []
    for item in tokens:
        if not isinstance(item, Atom):
            raise ParseError("invalid fetch attribute")
        items.append(_parse_item(item))
    return items


def _parse_item(atom: bytes) -> FetchItem:
    name = atom.upper()
    if name in SIMPLE_ITEMS:
        return FetchItem(name, peek=name not in (b"RFC822", b"RFC822.TEXT"), key=name)
    match = _SECTION.fullmatch(atom)
    if match is None:
        raise ParseError(f"unknown fetch attribute {atom[:40].decode('ascii', 'replace')}")
    spec_text = match.group(2).decode("ascii", "replace")
    try:
        spec = parse_section_spec(spec_text)
    except ValueError as e:
        raise ParseError(str(e)) from None
    start = length = None
    if match.group(3) is not None:
        start, length = int(match.group(3)), int(match.group(4))
        if length == 0:
            raise ParseError("partial length must not be zero")
    canonical = ".".join(str(n) for n in spec.path)
    if spec.text:
        canonical = f"{canonical}.{spec.text}" if canonical else spec.text
    if spec.fields:
        canonical += " (" + " ".join(_header_name(f) for f in spec.fields) + ")"
    key = b"BODY[" + canonical.encode("ascii", "replace") + b"]"
    if start is not None:
        key += b"<%d>" % start
    peek = match.group(1).upper() == b"BODY.PEEK"
    return FetchItem(b"SECTION", spec_text, start, length, peek, key, spec)


_ATOM_SPECIALS = frozenset('(){ %*"\\]')


def _header_name(name: str) -> str:
    """A header-list name as echoed in the FETCH response: upper-cased, and
    quoted unless it is an atom, so that ``("X Y")`` does not come back as
    two names nor ``("X\\"Y")`` as broken syntax (RFC 3501 header-fld-name)."""
    name = name.upper()
    if name and all(" " < c <= "~" and c not in _ATOM_SPECIALS for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(data), data)


@dataclass
class FetchEntry:
    """One message to render: number, UID, flags as sent, and the storage info."""

    seq: int
    uid: int
    flags: bytes
    info: object
    modseq: int = 0
    include_flags: bool = False


def render(entry: FetchEntry, items: list[FetchItem], uid_first: bool,
           load: Callable[[object], bytes] | None, cached: Any = None,
           on_parsed: Callable[[FetchEntry, ParsedMessage], None] | None = None) -> bytes:
    """One ``* n FETCH (...)`` response; *load* reads the message (CRLF) when needed.

    *cached* (a :class:`~mailtwist.storage.index.CachedMessage` or None)
    answers ENVELOPE, BODY and BODYSTRUCTURE. Raises FileNotFoundError if the
    message file is gone.
    """
    raw: bytes | None = None
    parsed: ParsedMessage | None = None
    out: list[bytes] = []
    names: set[bytes] = set()
    if uid_first:
        out.append(b"UID %d" % entry.uid)
        names.add(b"UID")
    if entry.include_flags and not any(i.kind == b"FLAGS" for i in items):
        out.append(b"FLAGS " + entry.flags)
        names.add(b"FLAGS")
    for item in items:
        kind = item.kind
        if kind in names and kind != b"SECTION":
            continue
        names.add(kind)
        if cached is not None and kind in CACHED_ITEMS:
            out.append(kind + b" " + (cached.envelope if kind == b"ENVELOPE" else
                                      cached.body if kind == b"BODY" else cached.bodystructure))
            continue
        if item.needs_file and raw is None:
            raw = load(entry.info)
        if parsed is None and (kind in _NEEDS_PARSE or (kind == b"SECTION" and item.section)):
            parsed = ParsedMessage.parse(raw)
            if on_parsed is not None:
                on_parsed(entry, parsed)
        if kind == b"FLAGS":
            out.append(b"FLAGS " + entry.flags)
        elif kind == b"UID":
            out.append(b"UID %d" % entry.uid)
        elif kind == b"INTERNALDATE":
            out.append(b"INTERNALDATE " + format_date_time(entry.info.mtime))
        elif kind == b"RFC822.SIZE":
            out.append(b"RFC822.SIZE %d" % entry.info.vsize)
        elif kind == b"MODSEQ":
            out.append(b"MODSEQ (%d)" % entry.modseq)
        elif kind == b"ENVELOPE":
            out.append(b"ENVELOPE " + parsed.envelope())
        elif kind == b"BODY":
            out.append(b"BODY " + parsed.bodystructure(extensible=False))
        elif kind == b"BODYSTRUCTURE":
            out.append(b"BODYSTRUCTURE " + parsed.bodystructure(extensible=True))
        elif kind == b"RFC822":
            out.append(b"RFC822 " + _literal(raw))
        elif kind == b"RFC822.HEADER":
            out.append(b"RFC822.HEADER " + _literal(parsed.section("HEADER") or b""))
        elif kind == b"RFC822.TEXT":
            out.append(b"RFC822.TEXT " + _literal(parsed.section("TEXT") or b""))
        else:
            data = raw if not item.section else (parsed.section(item.spec or item.section) or b"")
            if item.start is not None:
                data = partial(data, item.start, item.length)
            out.append(item.key + b" " + _literal(data))
    return b"* %d FETCH (%s)\r\n" % (entry.seq, b" ".join(out))
