"""Tests for mailtwist.imap.mime: ENVELOPE, BODYSTRUCTURE, BODY[section].

The corpus in ``tests/corpus/mime`` is stored with LF line endings so it can
be read and edited; :func:`load` turns it into CRLF, as messages reach the
IMAP server.  Every output is checked by a strict reader of IMAP
s-expressions (:func:`read_sexp`) that verifies quoting and literal lengths.
"""

from __future__ import annotations

import base64
import functools
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailtwist.imap import mime
from mailtwist.imap.mime import (
    MAX_DEPTH,
    MAX_HEADER_FIELDS,
    MAX_PARTS,
    ParsedMessage,
    SectionSpec,
    decode_header_value,
    imap_string,
    parse_section_spec,
    partial,
)

CORPUS = Path(__file__).parent / "corpus" / "mime"
CORPUS_NAMES = sorted(path.name for path in CORPUS.glob("*.eml"))


def load(name: str) -> bytes:
    """A corpus message with CRLF line endings."""
    return (CORPUS / name).read_bytes().replace(b"\n", b"\r\n")


def parse(name: str) -> ParsedMessage:
    return ParsedMessage.parse(load(name))


# --------------------------------------------------------------------------
# A strict reader for the IMAP s-expressions the module writes
# --------------------------------------------------------------------------


class SexpError(ValueError):
    """The bytes are not one well-formed IMAP parenthesised list."""


Sexp = Any
"""What :func:`read_sexp` yields: None, int, bytes or a list of those."""


def read_sexp(data: bytes) -> list[Sexp]:
    """Parse one parenthesised list that must span all of ``data``.

    NIL becomes None, numbers int, strings bytes.  Items are separated by one
    space, except that lists may follow each other directly (as bodies in a
    multipart and addresses in an address list do).  Quoted strings must not
    hold CR, LF, NUL or 8-bit octets and may only escape ``"`` and ``\\``;
    literal lengths must be exact and literals must not hold NUL.
    """
    value, pos = _read_item(data, 0)
    if pos != len(data) or not isinstance(value, list):
        raise SexpError(f"trailing data or not a list at {pos}")
    return value


def _read_item(data: bytes, pos: int) -> tuple[Sexp, int]:
    if pos >= len(data):
        raise SexpError("unexpected end")
    c = data[pos:pos + 1]
    if c == b"(":
        items: list[Sexp] = []
        pos += 1
        while True:
            if data[pos:pos + 1] == b")":
                return items, pos + 1
            if items:
                if data[pos:pos + 1] == b" ":
                    pos += 1
                elif not (isinstance(items[-1], list) and data[pos:pos + 1] == b"("):
                    raise SexpError(f"missing separator at {pos}")
            item, pos = _read_item(data, pos)
            items.append(item)
    if c == b'"':
        out = bytearray()
        pos += 1
        while True:
            if pos >= len(data):
                raise SexpError("unterminated quoted string")
            b = data[pos]
            if b == 0x22:
                return bytes(out), pos + 1
            if b == 0x5C:
                if data[pos + 1:pos + 2] not in (b'"', b"\\"):
                    raise SexpError(f"bad escape at {pos}")
                out.append(data[pos + 1])
                pos += 2
                continue
            if b in (0x00, 0x0A, 0x0D) or b >= 0x80:
                raise SexpError(f"octet {b:#x} not allowed in a quoted string at {pos}")
            out.append(b)
            pos += 1
    if c == b"{":
        close = data.find(b"}\r\n", pos)
        if close < 0 or not data[pos + 1:close].isdigit():
            raise SexpError(f"bad literal at {pos}")
        size = int(data[pos + 1:close])
        start = close + 3
        value = data[start:start + size]
        if len(value) != size:
            raise SexpError("literal runs past the end")
        if b"\x00" in value:
            raise SexpError("NUL in a literal")
        return value, start + size
    end = pos
    while end < len(data) and data[end:end + 1] not in (b" ", b"(", b")"):
        end += 1
    atom = data[pos:end]
    if atom == b"NIL":
        return None, end
    if atom.isdigit():
        return int(atom), end
    raise SexpError(f"unexpected atom {atom!r} at {pos}")


def is_multipart(body: list[Sexp]) -> bool:
    return isinstance(body[0], list)


def is_message(body: list[Sexp]) -> bool:
    return (not is_multipart(body) and isinstance(body[0], bytes)
            and isinstance(body[1], bytes) and body[0].lower() == b"message"
            and body[1].lower() == b"rfc822")


def subparts(body: list[Sexp]) -> list[list[Sexp]]:
    """The bodies of a multipart: the lists before its subtype."""
    children = []
    for item in body:
        if not isinstance(item, list):
            break
        children.append(item)
    return children


def walk(body: list[Sexp]) -> Iterator[tuple[str, list[Sexp]]]:
    """Yield (section path, body) for every part RFC 3501 numbers.

    A non-multipart body at the top level or inside a message/rfc822 is its
    own part 1.
    """
    def children(node: list[Sexp], prefix: str) -> Iterator[tuple[str, list[Sexp]]]:
        if is_multipart(node):
            for number, child in enumerate(subparts(node), 1):
                yield from visit(child, f"{prefix}{number}")
        else:
            yield from visit(node, f"{prefix}1")

    def visit(node: list[Sexp], here: str) -> Iterator[tuple[str, list[Sexp]]]:
        yield here, node
        if is_multipart(node):
            yield from children(node, here + ".")
        elif is_message(node):
            inner = node[8]
            assert isinstance(inner, list)
            yield from children(inner, here + ".")

    if is_multipart(body):
        yield from children(body, "")
    else:
        yield from visit(body, "1")


def present(message: ParsedMessage, spec: str) -> bytes:
    """``message.section(spec)``, which must exist."""
    data = message.section(spec)
    if data is None:
        raise AssertionError(f"no section {spec!r}")
    return data


def nesting(value: Sexp) -> int:
    """How deeply lists nest in ``value``."""
    if not isinstance(value, list):
        return 0
    return 1 + max((nesting(item) for item in value), default=0)


def exercise(test: SynchronousTestCase, raw: bytes) -> ParsedMessage:
    """Run every FETCH/SEARCH item and check it against the others."""
    message = ParsedMessage.parse(raw)
    envelope = read_sexp(message.envelope())
    test.assertEqual(len(envelope), 10)
    body = read_sexp(message.bodystructure(extensible=False))
    structure = read_sexp(message.bodystructure())
    test.assertEqual(message.section(""), raw)
    test.assertEqual(present(message, "HEADER") + present(message, "TEXT"), raw)
    test.assertTrue(present(message, "HEADER.FIELDS (From Subject)").endswith(b"\r\n"))
    test.assertTrue(present(message, "HEADER.FIELDS.NOT (Subject)").endswith(b"\r\n"))
    paths = [path for path, _ in walk(structure)]
    test.assertEqual(paths, [path for path, _ in walk(body)])
    for path, node in walk(structure):
        data = present(message, path)
        present(message, path + ".MIME")
        if is_multipart(node):
            continue
        size = node[6]
        test.assertEqual(size, len(data), path)
        media = node[0]
        if is_message(node):
            test.assertEqual(node[9], data.count(b"\n"), path)
            header = present(message, path + ".HEADER")
            text = present(message, path + ".TEXT")
            test.assertEqual(header + text, data, path)
            test.assertEqual(len(node[7]), 10, path)
        elif isinstance(media, bytes) and media.lower() == b"text":
            test.assertEqual(node[7], data.count(b"\n"), path)
    last = paths[-1] if paths else "1"
    for missing in (last + ".9", "999"):
        if missing not in paths:
            test.assertIsNone(message.section(missing))
    message.header_fields()
    message.text_for_search()
    test.assertFalse(message.degraded)
    return message


# --------------------------------------------------------------------------
# Strings, partials, header decoding, section specifiers
# --------------------------------------------------------------------------


class ImapStringTests(SynchronousTestCase):
    def test_nil(self) -> None:
        self.assertEqual(imap_string(None), b"NIL")

    def test_quoted_with_escapes(self) -> None:
        self.assertEqual(imap_string(b'say "hi" \\o/'), b'"say \\"hi\\" \\\\o/"')
        self.assertEqual(imap_string(""), b'""')
        self.assertEqual(imap_string("NIL"), b'"NIL"')

    def test_literal_for_line_breaks_and_8bit(self) -> None:
        self.assertEqual(imap_string(b"a\r\nb"), b"{4}\r\na\r\nb")
        self.assertEqual(imap_string("Grüße"), b"{7}\r\nGr\xc3\xbc\xc3\x9fe")
        self.assertEqual(imap_string(b"\xff"), b"{1}\r\n\xff")

    def test_nul_is_replaced(self) -> None:
        self.assertEqual(imap_string(b"a\x00b"), b"{5}\r\na\xef\xbf\xbdb")

    def test_long_values_are_literals(self) -> None:
        self.assertTrue(imap_string(b"x" * 5000).startswith(b"{5000}\r\n"))

    @given(st.binary(max_size=300))
    def test_any_bytes_read_back(self, value: bytes) -> None:
        self.assertEqual(read_sexp(b"(" + imap_string(value) + b")"),
                         [value.replace(b"\x00", "\ufffd".encode())])


class PartialTests(SynchronousTestCase):
    def test_slices(self) -> None:
        data = b"0123456789"
        self.assertEqual(partial(data, 0, 4), b"0123")
        self.assertEqual(partial(data, 8, 100), b"89")
        self.assertEqual(partial(data, 3, None), b"3456789")
        self.assertEqual(partial(data, 10, 5), b"")
        self.assertEqual(partial(data, 50, None), b"")
        self.assertEqual(partial(data, 2, 0), b"")

    def test_negative_is_an_error(self) -> None:
        self.assertRaises(ValueError, partial, b"abc", -1, 2)
        self.assertRaises(ValueError, partial, b"abc", 0, -2)

    @given(st.binary(max_size=50), st.integers(0, 60), st.none() | st.integers(0, 60))
    def test_is_a_bounded_slice(self, data: bytes, start: int, length: int | None) -> None:
        result = partial(data, start, length)
        self.assertEqual(result, data[start:][:length] if length is not None else data[start:])
        self.assertTrue(data.startswith(result, min(start, len(data))))


class DecodeHeaderValueTests(SynchronousTestCase):
    def test_encoded_words(self) -> None:
        self.assertEqual(decode_header_value(b"=?utf-8?q?Caf=C3=A9?= au lait"), "Café au lait")
        self.assertEqual(decode_header_value(b"=?ISO-8859-1?B?QW5kcukg?="), "André ")

    def test_space_between_words_is_dropped(self) -> None:
        raw = load("rfc2047-subject.eml").split(b"Subject:", 1)[1].split(b"\r\nMIME", 1)[0]
        self.assertEqual(decode_header_value(raw).strip(), "Café crème brûlée")

    def test_character_split_across_words(self) -> None:
        self.assertEqual(decode_header_value(b"=?utf-8?b?w6==?= =?UTF-8?B?qQ==?="), "é")
        self.assertEqual(decode_header_value(b"=?utf-8?b?ww==?= =?utf-8?b?qQ==?="), "é")

    def test_tolerance(self) -> None:
        self.assertEqual(decode_header_value(b"=?x-unknown?q?caf=C3=A9?="), "café")
        self.assertEqual(decode_header_value(b"=?base64?q?x?="), "x")
        self.assertEqual(decode_header_value(b"=?utf-8?q?open"), "=?utf-8?q?open")
        self.assertEqual(decode_header_value(b"M\xc3\xbcller"), "Müller")
        self.assertEqual(decode_header_value(b"M\xfcller"), "Müller")
        self.assertEqual(decode_header_value(b"=?utf-8*en?q?hi?="), "hi")

    @given(st.binary(max_size=200))
    def test_never_raises(self, raw: bytes) -> None:
        self.assertIsInstance(decode_header_value(raw), str)


class SectionSpecTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_section_spec(""), SectionSpec((), ""))
        self.assertEqual(parse_section_spec("header"), SectionSpec((), "HEADER"))
        self.assertEqual(parse_section_spec("1.2.TEXT"), SectionSpec((1, 2), "TEXT"))
        self.assertEqual(parse_section_spec("3.MIME"), SectionSpec((3,), "MIME"))
        self.assertEqual(parse_section_spec("12"), SectionSpec((12,), ""))
        self.assertEqual(parse_section_spec('HEADER.FIELDS (From "To" x-Y)'),
                         SectionSpec((), "HEADER.FIELDS", ("from", "to", "x-y")))
        self.assertEqual(parse_section_spec("2.header.fields.not (Subject)"),
                         SectionSpec((2,), "HEADER.FIELDS.NOT", ("subject",)))

    def test_invalid(self) -> None:
        for spec in ("0", "1.", ".1", "1..2", "01", "MIME", "FOO", "1.BAR", "HEADER.FIELDS",
                     "HEADER.FIELDS ()", "HEADER.FIELDS From", "HEADER.FIELDS (a(b))", "1x"):
            self.assertRaises(ValueError, parse_section_spec, spec)
            self.assertRaises(ValueError, ParsedMessage.parse(b"").section, spec)


def from_list(value: bytes) -> Sexp:
    """The ENVELOPE "from" of a message whose From field is ``value``."""
    return read_sexp(ParsedMessage.parse(b"From: " + value + b"\r\n\r\n").envelope())[2]


class AddressTests(SynchronousTestCase):
    """Address parsing, checked against what Dovecot's message-address
    parser gives in its fill-missing mode."""

    def test_well_formed(self) -> None:
        self.assertEqual(from_list(b'"foo bar" <user@domain>'),
                         [[b"foo bar", None, b"user", b"domain"]])
        self.assertEqual(from_list(b"John Q. Public <jqp@x.test>"),
                         [[b"John Q. Public", None, b"jqp", b"x.test"]])
        self.assertEqual(from_list(b"user@domain (Real Name)"),
                         [[b"Real Name", None, b"user", b"domain"]])
        self.assertEqual(from_list(b'"john doe"@x.test, a@[192.0.2.1]'),
                         [[None, None, b"john doe", b"x.test"], [None, None, b"a", b"[192.0.2.1]"]])
        self.assertEqual(from_list(b"(a (nested) comment) a@b"),
                         [[b"a (nested) comment", None, b"a", b"b"]])

    def test_routes(self) -> None:
        self.assertEqual(from_list(b"<@route@route2:user@domain>"),
                         [[None, b"@route,@route2", b"user", b"domain"]])
        self.assertEqual(from_list(b"hello <@route ,@route2:user@domain>"),
                         [[b"hello", b"@route,@route2", b"user", b"domain"]])

    def test_groups(self) -> None:
        self.assertEqual(from_list(b"g: <@a,@b:u@d>, x@y;, z@w"), [
            [None, None, b"g", None], [None, b"@a,@b", b"u", b"d"], [None, None, b"x", b"y"],
            [None, None, None, None], [None, None, b"z", b"w"]])
        self.assertEqual(from_list(b"unclosed: a@b"),
                         [[None, None, b"unclosed", None], [None, None, b"a", b"b"],
                          [None, None, None, None]])

    def test_missing_parts_are_filled(self) -> None:
        self.assertEqual(from_list(b"user (hello)"), [[b"hello", None, b"user", b"MISSING_DOMAIN"]])
        self.assertEqual(from_list(b"hello <user>"), [[b"hello", None, b"user", b"MISSING_DOMAIN"]])
        self.assertEqual(from_list(b"foo.bar"), [[None, None, b"foo.bar", b"MISSING_DOMAIN"]])
        self.assertEqual(from_list(b"@domain"), [[None, None, b"", b"domain"]])
        self.assertEqual(from_list(b'"only a name"'),
                         [[b"only a name", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"]])
        self.assertEqual(from_list(b"<a@b"), [[None, None, b"a", b"b"]])

    def test_nothing_to_show(self) -> None:
        self.assertIsNone(from_list(b""))
        self.assertIsNone(from_list(b"(only a comment)"))
        self.assertIsNone(from_list(b" , ,"))

    def test_display_names_are_cleaned_not_decoded(self) -> None:
        self.assertEqual(from_list(b"=?utf-8?q?J=C3=B6rg?=\r\n  \tM\xc3\xbcller <j@x>"),
                         [["=?utf-8?q?J=C3=B6rg?= Müller".encode(), None, b"j", b"x"]])


# --------------------------------------------------------------------------
# The corpus, with expected answers
# --------------------------------------------------------------------------

ALICE = b'((NIL NIL "alice" "example.test"))'
TEXT_PLAIN = b'"text" "plain" ("charset" "us-ascii") NIL NIL'


def plain(size: int, lines: int, encoding: bytes = b"7bit",
          extension: bytes = b"NIL NIL NIL NIL") -> bytes:
    """The BODYSTRUCTURE of a default text/plain part."""
    return b'(%s "%s" %d %d %s)' % (TEXT_PLAIN, encoding, size, lines, extension)


class CorpusTests(SynchronousTestCase):
    def expect_envelope(self, name: str, expected: bytes) -> None:
        self.assertEqual(parse(name).envelope(), expected)

    def expect_structure(self, name: str, expected: bytes) -> None:
        self.assertEqual(parse(name).bodystructure(), expected)

    def test_every_message_is_consistent(self) -> None:
        self.assertGreaterEqual(len(CORPUS_NAMES), 20)
        for name in CORPUS_NAMES:
            exercise(self, load(name))

    def test_bare_lf_gives_the_same_parts(self) -> None:
        for name in CORPUS_NAMES:
            lf = ParsedMessage.parse((CORPUS / name).read_bytes())
            crlf = parse(name)
            self.assertFalse(lf.degraded)
            structure = read_sexp(crlf.bodystructure())
            for path, _ in walk(structure):
                for spec in (path, path + ".MIME"):
                    self.assertEqual(present(lf, spec).replace(b"\n", b"\r\n"),
                                     crlf.section(spec), (name, spec))
            self.assertEqual(lf.envelope(), crlf.envelope(), name)

    def test_simple_text(self) -> None:
        message = parse("simple-text.eml")
        self.assertEqual(message.envelope(), (
            b'("Mon, 3 Nov 2025 10:00:00 +0100" "Lunch?"'
            b' (("Alice Example" NIL "alice" "example.test"))'
            b' (("Alice Example" NIL "alice" "example.test"))'
            b' (("Alice Example" NIL "alice" "example.test"))'
            b' (("Bob" NIL "bob" "example.test")) NIL NIL NIL "<lunch-1@example.test>")'))
        self.assertEqual(message.bodystructure(),
                         b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 42 3'
                         b' NIL NIL NIL NIL)')
        self.assertEqual(message.bodystructure(extensible=False),
                         b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 42 3)')
        self.assertEqual(message.section("1"), b"Shall we have lunch at noon?\r\n-- \r\nAlice\r\n")
        self.assertEqual(message.section("TEXT"), message.section("1"))
        self.assertEqual(message.section("1.MIME"), message.section("HEADER"))
        self.assertIsNone(message.section("2"))
        self.assertIsNone(message.section("1.1"))
        self.assertIsNone(message.section("1.HEADER"))
        self.assertEqual(message.header_fields()[:2], [
            ("date", b"Mon, 3 Nov 2025 10:00:00 +0100"),
            ("from", b"Alice Example <alice@example.test>")])

    def test_no_headers(self) -> None:
        message = parse("no-headers.eml")
        self.assertEqual(message.envelope(), b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")
        self.assertEqual(message.bodystructure(), plain(45, 2))
        self.assertEqual(message.section("HEADER"), b"\r\n")
        self.assertEqual(message.header_fields(), [])

    def test_headers_only(self) -> None:
        message = parse("headers-only.eml")
        self.assertEqual(message.bodystructure(), plain(0, 0))
        self.assertEqual(message.section("HEADER"), load("headers-only.eml"))
        self.assertEqual(message.section("TEXT"), b"")

    def test_content_type_trailing_semicolon(self) -> None:
        self.expect_structure("content-type-trailing-semicolon.eml", plain(54, 1, b"8bit"))

    def test_content_type_garbage(self) -> None:
        self.expect_structure("content-type-garbage.eml",
                              plain(22, 1, extension=b'NIL ("inline" NIL) NIL NIL'))

    def test_eight_bit_headers_are_literals(self) -> None:
        message = parse("eight-bit-headers.eml")
        joerg = b'(({13}\r\nJ\xc3\xb6rg M\xc3\xbcller NIL "joerg" "example.test"))'
        self.assertEqual(message.envelope(), (
            b"(NIL {17}\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln " + joerg + b" " + joerg
            + b" " + joerg + b' (({4}\r\nZo\xc3\xab NIL "zoe" "example.test")) NIL NIL NIL NIL)'))
        self.assertEqual(read_sexp(message.envelope())[1], "Grüße aus Köln".encode())

    def test_rfc2047_stays_encoded(self) -> None:
        self.expect_envelope("rfc2047-subject.eml", (
            b'(NIL "=?utf-8?q?Caf=C3=A9?= =?utf-8?b?IGNyw6htZQ==?= =?iso-8859-1?q?_br=FBl=E9e?="'
            + b' (("=?ISO-8859-1?Q?Andr=E9?= Pirard" NIL "PIRARD" "vm1.ulg.ac.be"))' * 3
            + b' (("Keld =?utf-8?q?J=C3=B8rn?= Simonsen" NIL "keld" "example.test"))'
            b" NIL NIL NIL NIL)"))
        subject = dict(parse("rfc2047-subject.eml").header_fields())["subject"]
        self.assertEqual(decode_header_value(subject), "Café crème brûlée")

    def test_rfc2231_continuations_merge_like_dovecot(self) -> None:
        self.expect_structure("rfc2231-filename.eml", (
            b"(" + plain(15, 0)
            + b"(\"application\" \"pdf\" (\"name*\" \"utf-8''%E2%82%AC%20rates.pdf\") NIL NIL"
            b' "base64" 28 NIL ("attachment" ("size" "15" "filename*"'
            b" \"utf-8''%E2%82%AC%20rates%20for%202025.pdf\")) NIL NIL)"
            b' "mixed" ("boundary" "rfc2231") NIL NIL NIL)'))
        self.assertEqual(base64.b64decode(present(parse("rfc2231-filename.eml"), "2")),
                         "%PDF-1.4\n%äüöß\n".encode())

    def test_nested_alternative_with_attachment(self) -> None:
        message = parse("nested-alternative.eml")
        self.assertEqual(message.bodystructure(), (
            b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 52 1'
            b" NIL NIL NIL NIL)"
            b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 80 0 NIL NIL NIL NIL)'
            b' "alternative" ("boundary" "inner-boundary") NIL NIL NIL)'
            b'("image" "png" ("name" "chart.png") "<chart@example.test>" NIL "base64" 98'
            b' NIL ("attachment" ("filename" "chart.png")) NIL NIL)'
            b' "mixed" ("boundary" "outer-boundary") NIL NIL NIL)'))
        self.assertEqual(message.bodystructure(extensible=False), (
            b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 52 1)'
            b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 80 0) "alternative")'
            b'("image" "png" ("name" "chart.png") "<chart@example.test>" NIL "base64" 98)'
            b' "mixed")'))
        self.assertEqual(message.section("1.1"),
                         b"Hello Bob,\r\nthe report is attached. Caf=C3=A9 at 10?")
        self.assertTrue(present(message, "1.2").endswith(b"</html>"))
        self.assertEqual(message.section("1.2.MIME"), (
            b'Content-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"))
        self.assertTrue(present(message, "1").startswith(b"--inner-boundary\r\n"))
        self.assertTrue(present(message, "1").endswith(b"--inner-boundary--\r\n"))
        self.assertEqual(base64.b64decode(present(message, "2"))[:4], b"\x89PNG")
        self.assertTrue(present(message, "TEXT").endswith(b"no client shows.\r\n"))
        self.assertIsNone(message.section("3"))
        self.assertIsNone(message.section("2.1.1"))
        self.assertIsNone(message.section("1.TEXT"))
        self.assertEqual(message.text_for_search(),
                         "Hello Bob,\r\nthe report is attached. Café at 10?\n"
                         "Hello Bob, the report is attached.")

    def test_attached_message(self) -> None:
        message = parse("attached-message.eml")
        carol = b'(("Carol" NIL "carol" "example.test"))'
        self.assertEqual(message.bodystructure(), (
            b"(" + plain(21, 0)
            + b'("message" "rfc822" NIL NIL "the original" "7bit" 369'
            b' ("Sun, 2 Nov 2025 18:00:00 +0100" "plans" ' + carol + b" " + carol + b" " + carol
            + b' ((NIL NIL "alice" "example.test")) NIL NIL NIL "<plans@example.test>")'
            b" (" + plain(10, 0)
            + b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 17 0 NIL NIL NIL NIL)'
            b' "alternative" ("boundary" "orig") NIL NIL NIL) 17 NIL NIL NIL NIL)'
            b' "mixed" ("boundary" "fwd") NIL NIL NIL)'))
        self.assertTrue(present(message, "2").startswith(b"Date: Sun, 2 Nov 2025"))
        self.assertTrue(present(message, "2.HEADER").endswith(b'boundary="orig"\r\n\r\n'))
        self.assertEqual(message.section("2.HEADER.FIELDS (subject FROM)"),
                         b"From: Carol <carol@example.test>\r\nSubject: plans\r\n\r\n")
        self.assertEqual(message.section("2.MIME"),
                         b"Content-Type: message/rfc822\r\n"
                         b"Content-Description: the original\r\n\r\n")
        self.assertEqual(message.section("2.1"), b"The plans.")
        self.assertEqual(message.section("2.2"), b"<p>The plans.</p>")
        self.assertEqual(message.section("2.2.MIME"),
                         b"Content-Type: text/html; charset=us-ascii\r\n\r\n")
        self.assertIsNone(message.section("2.3"))
        self.assertIsNone(message.section("1.HEADER"))
        self.assertIn("subject: plans", message.text_for_search())
        self.assertIn("The plans.", message.text_for_search())

    def test_missing_close_boundary(self) -> None:
        message = parse("missing-close-boundary.eml")
        self.assertEqual(message.bodystructure(), (
            b"(" + plain(10, 0) + plain(68, 2) + b' "mixed" ("boundary" "cut") NIL NIL NIL)'))
        self.assertTrue(present(message, "2").endswith(b"without a closing boundary\r\n"))

    def test_boundary_case_and_quotes(self) -> None:
        message = parse("boundary-case-quotes.eml")
        self.assertEqual(message.bodystructure(), (
            b'(("Text" "PLAIN" ("Charset" "ISO-8859-1" "Format" "Flowed") NIL NIL "7bit" 13 0'
            b' NIL NIL NIL NIL) "Mixed" ("boundary" "=_MiXeD Case; with \\"quotes\\"")'
            b" NIL NIL NIL)"))
        self.assertEqual(message.section("1"), b"Case is kept.")

    def test_groups_and_empty_to(self) -> None:
        self.expect_envelope("group-and-empty-to.eml", (
            b'(NIL "groups"' + b' (("Alice" NIL "alice" "example.test"))' * 3 + b" NIL"
            b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
            b' ((NIL NIL "Team" NIL)(NIL NIL "bob" "example.test")("Carol C." NIL "carol"'
            b' "example.test")(NIL NIL NIL NIL)(NIL NIL "dave" "example.test")) NIL NIL)'))

    def test_from_empty_angle(self) -> None:
        missing = b' ((NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'
        self.expect_envelope("from-empty-angle.eml",
                            b'(NIL "null sender"' + missing * 3 + b" NIL NIL NIL NIL NIL)")

    def test_from_bare_word(self) -> None:
        foo = b' ((NIL NIL "foo" "MISSING_DOMAIN"))'
        self.expect_envelope("from-bare-word.eml", (
            b'(NIL "no domain"' + foo
            + b' (("foo bar" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))' + foo
            + b" NIL NIL NIL NIL NIL)"))

    def test_from_unterminated_quote(self) -> None:
        self.expect_envelope("from-unterminated-quote.eml", (
            b'(NIL "broken quotes"'
            + b' (("unterminated" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))' * 2
            + b' (("Alice <alice@example.test>" NIL "MISSING_MAILBOX" "MISSING_DOMAIN"))'
            b" NIL NIL NIL NIL NIL)"))

    def test_header_without_colon(self) -> None:
        message = parse("header-without-colon.eml")
        self.assertEqual(message.envelope(), (
            b'(NIL "still found and folded" ' + ALICE + b" " + ALICE + b" " + ALICE
            + b" NIL NIL NIL NIL NIL)"))
        self.assertEqual([name for name, _ in message.header_fields()], ["from", "subject"])
        self.assertEqual(dict(message.header_fields())["subject"], b"still found and folded")
        self.assertEqual(message.section("HEADER.FIELDS (SUBJECT)"),
                         b"Subject: still found\r\n and folded\r\n\r\n")
        self.assertEqual(message.section("HEADER.FIELDS.NOT (Subject)"),
                         b"From: alice@example.test\r\n"
                         b"This header line has no colon at all\r\n\r\n")

    def test_preamble_and_epilogue(self) -> None:
        message = parse("preamble-epilogue.eml")
        self.assertEqual(message.section("1"), b"only part")
        text = present(message, "TEXT")
        self.assertTrue(text.startswith(b"Preamble line one."))
        self.assertTrue(text.endswith(b"Epilogue line two.\r\n"))

    def test_multipart_without_boundary_is_readable_text(self) -> None:
        message = parse("multipart-no-boundary.eml")
        self.assertEqual(message.bodystructure(), plain(81, 5))
        self.assertIn("The client still gets to read this.", message.text_for_search())
        self.assertEqual(message.section("1"), message.section("TEXT"))

    def test_part_header_cut_by_boundary(self) -> None:
        message = parse("part-without-blank-line.eml")
        empty_envelope = b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
        self.assertEqual(message.bodystructure(), (
            b"(" + plain(0, 0, extension=b'NIL ("inline" NIL) NIL NIL')
            + b'("message" "rfc822" NIL NIL NIL "7bit" 0 ' + empty_envelope
            + b" " + plain(0, 0) + b" 0 NIL NIL NIL NIL)"
            + plain(4, 0) + b' "mixed" ("boundary" "b") NIL NIL NIL)'))
        self.assertEqual(message.section("1.MIME"),
                         b"Content-Type: text/plain\r\nContent-Disposition: inline")
        self.assertEqual(message.section("1"), b"")
        self.assertEqual(message.section("2.1"), b"")
        self.assertEqual(message.section("3"), b"last")

    def test_digest_parts_default_to_messages(self) -> None:
        message = parse("digest.eml")
        structure = read_sexp(message.bodystructure())
        self.assertEqual(structure[0][:2], [b"message", b"rfc822"])
        self.assertEqual(structure[0][7][1], b"first")
        self.assertEqual(structure[1][:2], [b"text", b"plain"])
        self.assertEqual(structure[2], b"digest")
        self.assertEqual(message.section("1.TEXT"), b"First message.")

    def test_extension_fields(self) -> None:
        self.expect_structure("extension-fields.eml", (
            b'("text" "x-custom" ("charset" "us-ascii" "note" "say \\"hi\\"") "<part@example.test>"'
            b' "a description" "7BIT" 7 1 "Q2hlY2sgSW50ZWdyaXR5IQ==" ("INLINE" ("Foo" "Bar"))'
            b' ("en-GB" "fi") "http://example.test/part.txt")'))

    def test_text_for_search_decodes(self) -> None:
        text = parse("encoded-text.eml").text_for_search()
        self.assertIn("Grüße aus Köln!", text)
        self.assertIn("Olé from Lisboa.", text)
        self.assertIn("Tom & Jerry", text)
        self.assertNotIn("color", text)
        self.assertNotIn("secret", text)
        self.assertNotIn("<p>", text)


# --------------------------------------------------------------------------
# Behaviour on generated messages
# --------------------------------------------------------------------------


def multipart(boundary: bytes, *parts: bytes, close: bool = True, header: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    if close:
        body += b"--" + boundary + b"--\r\n"
    return (header + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
            + body)


TEXT_PART = b"Content-Type: text/plain\r\n\r\n"


class StructureTests(SynchronousTestCase):
    def test_outer_boundary_closes_inner_parts(self) -> None:
        inner = multipart(b"inner", TEXT_PART + b"one", TEXT_PART + b"two", close=False)
        raw = multipart(b"outer", inner, TEXT_PART + b"three")
        message = exercise(self, raw)
        self.assertEqual(message.section("1.2"), b"two\r\n")
        self.assertEqual(message.section("2"), b"three")

    def test_longest_boundary_wins(self) -> None:
        inner = multipart(b"ab", TEXT_PART + b"inner")
        raw = multipart(b"a", inner, TEXT_PART + b"outer")
        message = exercise(self, raw)
        self.assertEqual(message.section("1.1"), b"inner")
        self.assertEqual(message.section("2"), b"outer")

    def test_longest_boundary_wins_even_when_outer(self) -> None:
        inner = multipart(b"a", TEXT_PART + b"inner", close=False)
        raw = multipart(b"ab", inner, TEXT_PART + b"outer")
        message = exercise(self, raw)
        self.assertEqual(message.section("1.1"), b"inner\r\n")
        self.assertEqual(message.section("2"), b"outer")
        self.assertIsNone(message.section("3"))

    def test_boundary_with_trailing_garbage_still_matches(self) -> None:
        raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b junk\r\n"
               + TEXT_PART + b"x\r\n--b--\r\n")
        self.assertEqual(exercise(self, raw).section("1"), b"x")

    def test_boundary_on_first_body_line(self) -> None:
        raw = multipart(b"b", TEXT_PART + b"x")
        message = exercise(self, raw)
        self.assertEqual(message.section("1"), b"x")
        self.assertEqual(message.section("1.MIME"), TEXT_PART)

    def test_deep_nesting_is_limited(self) -> None:
        depth = MAX_DEPTH * 5
        raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                       for i in range(depth)) + b"\r\nleaf\r\n"
        message = exercise(self, raw)
        structure = message.bodystructure()
        self.assertEqual(nesting(read_sexp(structure)), MAX_DEPTH + 1)
        self.assertIn(b'"application" "octet-stream"', structure)

    def test_deep_messages_are_limited(self) -> None:
        raw = b"Content-Type: message/rfc822\r\n\r\n" * (MAX_DEPTH * 5) + b"\r\nleaf\r\n"
        message = exercise(self, raw)
        self.assertEqual(message.bodystructure().count(b'"message" "rfc822"'), MAX_DEPTH)
        self.assertIsNotNone(message.section(".".join(["1"] * MAX_DEPTH)))

    def test_part_count_is_limited(self) -> None:
        raw = multipart(b"b", *([TEXT_PART + b"x"] * (MAX_PARTS + 50)))
        message = ParsedMessage.parse(raw)
        children = subparts(read_sexp(message.bodystructure()))
        self.assertEqual(len(children), MAX_PARTS - 1)
        self.assertEqual(message.section(str(MAX_PARTS - 1)), b"x")
        self.assertIsNone(message.section(str(MAX_PARTS)))
        self.assertFalse(message.degraded)

    def test_content_headers_need_mime(self) -> None:
        raw = b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n"
        self.assertIn(b'"7bit"', ParsedMessage.parse(raw).bodystructure())
        raw = b"MIME-Version: 1.0\r\n" + raw
        self.assertIn(b'"base64"', ParsedMessage.parse(raw).bodystructure())

    def test_first_occurrence_counts(self) -> None:
        raw = (b"Subject: first\r\nSubject: second\r\nContent-Type: text/html\r\n"
               b"Content-Type: image/gif\r\n\r\nx")
        message = ParsedMessage.parse(raw)
        self.assertEqual(read_sexp(message.envelope())[1], b"first")
        self.assertEqual(read_sexp(message.bodystructure())[:2], [b"text", b"html"])

    def test_header_fields_section_is_case_insensitive_and_keeps_order(self) -> None:
        raw = b"To: a@b\r\nfrom: c@d\r\nX-Y: 1\r\nFROM: e@f\r\n\r\nbody"
        message = ParsedMessage.parse(raw)
        self.assertEqual(message.section("HEADER.FIELDS (From)"),
                         b"from: c@d\r\nFROM: e@f\r\n\r\n")
        self.assertEqual(message.section("HEADER.FIELDS.NOT (from to)"), b"X-Y: 1\r\n\r\n")
        self.assertEqual(message.section("HEADER.FIELDS (Nothing)"), b"\r\n")

    def test_header_fields_section_terminates_last_line(self) -> None:
        message = ParsedMessage.parse(b"Subject: no newline")
        self.assertEqual(message.section("HEADER.FIELDS (subject)"),
                         b"Subject: no newline\r\n\r\n")

    def test_mixed_line_endings(self) -> None:
        raw = (b"Content-Type: multipart/mixed; boundary=m\n\r\n--m\n"
               b"Content-Type: text/plain\r\n\nbare\n--m\r\n\r\ncrlf\r\n--m--\n")
        message = exercise(self, raw)
        self.assertEqual(message.section("1"), b"bare")
        self.assertEqual(message.section("2"), b"crlf")

    def test_nul_and_8bit_in_content_fields(self) -> None:
        raw = (b"Content-Type: text/pl\xc3\xa4in; name=\"a\x00b\"\r\n"
               b"Content-Description: caf\xc3\xa9\r\n\r\nx")
        structure = read_sexp(exercise(self, raw).bodystructure())
        self.assertEqual(structure[1], "pläin".encode())
        self.assertEqual(structure[4], "café".encode())

    def test_empty_message(self) -> None:
        message = exercise(self, b"")
        self.assertEqual(message.bodystructure(), plain(0, 0))
        self.assertEqual(message.section("1"), b"")

    def test_safety_net(self) -> None:
        message = ParsedMessage.parse(b"Subject: x\r\n\r\nbody")
        message._root = None  # type: ignore[assignment]
        self.assertEqual(message.envelope(), b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")
        read_sexp(message.bodystructure())
        self.assertTrue(message.degraded)


# --------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------


@dataclass
class Leaf:
    subtype: str
    body: bytes


@dataclass
class Multipart:
    subtype: str
    parts: list[Leaf | Multipart | Message]
    preamble: bytes
    epilogue: bytes
    boundary_prefix: str


@dataclass
class Message:
    inner: Leaf | Multipart | Message


BODY_LINES = st.lists(st.text("abcxyz 019.é", max_size=20), max_size=4)
BOUNDARY_CHARS = "abcXYZ019'()+,./:=? "

leaves = st.builds(Leaf, st.sampled_from(["plain", "html", "X-Custom"]),
                   BODY_LINES.map(lambda lines: "\r\n".join(lines).encode()))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.builds(Multipart, st.sampled_from(["mixed", "alternative", "Related"]),
                  st.lists(children, min_size=1, max_size=4),
                  BODY_LINES.map(lambda lines: "\r\n".join(lines).encode()),
                  BODY_LINES.map(lambda lines: "\r\n".join(lines).encode()),
                  st.text(BOUNDARY_CHARS, max_size=10)),
        st.builds(Message, children)),
    max_leaves=12)


class Renderer:
    """Writes a tree as a message; boundaries end in a unique ``_n_`` so
    none is a prefix of another."""

    def __init__(self) -> None:
        self.count = 0

    def render(self, node: Leaf | Multipart | Message) -> bytes:
        if isinstance(node, Leaf):
            return b"Content-Type: text/%s\r\n\r\n%s" % (node.subtype.encode(), node.body)
        if isinstance(node, Message):
            return b"Content-Type: message/rfc822\r\n\r\n" + self.render(node.inner)
        self.count += 1
        boundary = b"%s_%d_" % (node.boundary_prefix.encode(), self.count)
        body = node.preamble + b"\r\n" if node.preamble else b""
        for part in node.parts:
            body += b"--" + boundary + b"\r\n" + self.render(part) + b"\r\n"
        body += b"--" + boundary + b"--"
        if node.epilogue:
            body += b"\r\n" + node.epilogue
        return (b'Content-Type: multipart/%s; boundary="%s"\r\n\r\n'
                % (node.subtype.encode(), boundary) + body)


INSERTS = st.sampled_from([
    b"\r\n", b"--", b"\n", b"\r", b";", b'"', b"(", b"<", b":", b"\x00", b"\xff", b"=?",
    b"--outer-boundary\r\n", b"--fwd--", b"\r\n\r\n", b" ", b"*0*=",
]) | st.binary(max_size=8)


@st.composite
def corpus_mutations(draw: st.DrawFn) -> bytes:
    """A corpus message damaged by a few random edits."""
    value = bytearray(load(draw(st.sampled_from(CORPUS_NAMES))))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(value)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate", "truncate"]))
        if action == "insert":
            value[where:where] = draw(INSERTS)
        elif action == "delete":
            del value[where:where + draw(st.integers(1, 40))]
        elif action == "duplicate":
            value[where:where] = value[where:where + draw(st.integers(1, 80))]
        else:
            del value[where:]
    return bytes(value)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.binary(max_size=3000))
    def test_random_bytes(self, raw: bytes) -> None:
        exercise(self, raw)

    @FUZZ
    @given(st.lists(st.sampled_from([
        b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
        b"Content-Type: text/plain;\r\n", b"From: <>\r\n", b"To: g:;\r\n", b"\r\n", b"\n",
        b"--b\r\n", b"--b--\r\n", b"--b", b"x\r\n", b" folded\r\n", b"Subject: \xff\r\n",
        b'Content-Disposition: a; filename*0*=x; filename*1="y"\r\n', b"\r",
    ]), max_size=40).map(b"".join))
    def test_mime_shaped_noise(self, raw: bytes) -> None:
        exercise(self, raw)

    @FUZZ
    @given(corpus_mutations())
    def test_mutated_corpus(self, raw: bytes) -> None:
        exercise(self, raw)

    @FUZZ
    @given(trees)
    def test_generated_trees_round_trip(self, tree: Leaf | Multipart | Message) -> None:
        raw = b"Subject: generated\r\n" + Renderer().render(tree)
        message = exercise(self, raw)
        self.check_node(message, tree, read_sexp(message.bodystructure()), "")

    def check_node(self, message: ParsedMessage, node: Leaf | Multipart | Message,
                   body: list[Sexp], path: str) -> None:
        """Compare a parsed body with the tree; ``path`` is the section of
        the message/rfc822 part holding ``node`` (empty at the top)."""
        prefix = path + "." if path else ""
        if isinstance(node, Multipart):
            children = subparts(body)
            self.assertEqual(len(children), len(node.parts))
            self.assertEqual(body[len(children)], node.subtype.encode())
            for number, (child, part) in enumerate(zip(children, node.parts, strict=True), 1):
                here = f"{prefix}{number}"
                self.check_part(message, part, child, here)
        else:
            self.check_part(message, node, body, prefix + "1")

    def check_part(self, message: ParsedMessage, node: Leaf | Multipart | Message,
                   body: list[Sexp], path: str) -> None:
        if isinstance(node, Leaf):
            self.assertEqual(body[:2], [b"text", node.subtype.encode()])
            self.assertEqual(message.section(path), node.body)
        elif isinstance(node, Message):
            self.assertTrue(is_message(body))
            inner = body[8]
            assert isinstance(inner, list)
            self.check_node(message, node.inner, inner, path)
        else:
            self.assertTrue(is_multipart(body))
            self.check_node(message, node, body, path)


# --------------------------------------------------------------------------
# Bounded work, counted rather than timed
# --------------------------------------------------------------------------
#
# Seconds depend on the machine, so these tests count work instead: function
# calls (sys.setprofile reports Python and C calls alike) and the octets that
# forward searches and copies read.  Work that is linear grows about ten
# times when the input does; the rescans that the limits in mailtwist.imap.mime
# prevent grow about a hundred times.  bench/imap_mime.py prints the timings.

GROWTH_LIMIT = 15
"""How much more work ten times the input may cost: linear is about 10x."""


def message_with_attachments(attachment_size: int) -> bytes:
    """A text part and four base64 attachments of ``attachment_size``
    random (but seeded, so always the same) octets each."""
    rng = random.Random(attachment_size)
    chunks = [(b"From: a@example.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
               b'Content-Type: multipart/mixed; boundary="big"\r\n\r\n'
               b"--big\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n")]
    for number in range(4):
        chunks.append(b"--big\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Transfer-Encoding: base64\r\n"
                      b'Content-Disposition: attachment; filename="f%d"\r\n\r\n' % number)
        chunks.append(base64.encodebytes(rng.randbytes(attachment_size))
                      .replace(b"\n", b"\r\n"))
    chunks.append(b"--big--\r\n")
    return b"".join(chunks)


def hostile_shapes(scale: float) -> dict[str, bytes]:
    """Messages shaped to make a naive parser rescan, backtrack or recurse.

    ``scale`` 1 gives the sizes that bench/imap_mime.py times (1 to 20 MB
    each); the tests count work on much smaller ones.  The comments name
    what keeps each shape linear.
    """
    def times(count: int) -> int:
        return max(1, round(count * scale))

    unclosed = [multipart(b"in%d" % i, TEXT_PART + b"x", close=False)
                for i in range(times(3000))]
    return {
        # Boundary lines are found with one bytes.find of "\n--boundary".
        "dash lines": multipart(b"zzz", b"\r\n" + b"--not-it\r\n" * times(1_000_000)),
        # MAX_HEADER_FIELDS; one regular expression pass over the fields.
        "huge header": b"X-Junk: y\r\n" * times(1_000_000) + b"\r\nbody",
        # The splitter remembers where the next empty line is (blank_lf).
        "no blank line anywhere": (multipart(b"b", *[b"X: y"] * times(5000))
                                   + b"X: y\r\n" * times(200_000)),
        # MAX_PARTS; each boundary's next line is remembered (next_line).
        "many parts": multipart(b"b", *([TEXT_PART + b"x"] * times(8000))),
        # Searches for inner boundaries stop where an outer one was found.
        "unclosed nested parts": multipart(b"outer", *unclosed) + b"y" * times(5_000_000),
        # The outer boundary, found once, is not searched for again per part.
        "nested parts before a long epilogue": multipart(
            b"outer", multipart(b"inner", *([TEXT_PART + b"x"] * times(5000)))
            + b"y" * times(5_000_000)),
        "long line": b"Subject: x\r\n\r\n" + b"-" * times(20_000_000),
        # Address fields are read up to 64 KiB, Content-* fields 128 KiB.
        "long quoted strings": (b'From: "' + b"a" * times(5_000_000)
                                + b'\r\nContent-Type: text/plain; name="'
                                + b"b" * times(5_000_000) + b"\r\n\r\nx"),
        "parentheses": (b"From: " + b"(" * times(1_000_000)
                        + b"\r\nTo: " + b")" * times(1_000_000)),
        "semicolons": b"Content-Type: text/plain" + b";" * times(5_000_000) + b"\r\n\r\nx",
        "white space": (b"Content-Type: text/plain; a=" + b" " * times(5_000_000)
                        + b"x\r\n\r\nx"),
        "commas": b"To: " + b"," * times(5_000_000) + b"\r\n\r\nx",
        "addresses": b"To: " + b"a@b," * times(3_000_000) + b"\r\n\r\nx",
        "encoded words": b"Subject: " + b"=?a?b?" * times(1_000_000) + b"\r\n\r\n",
        # An unclosed <style> hides the rest instead of being searched again.
        "html": (b"Content-Type: text/html\r\n\r\n" + b"<style" * times(200_000)
                 + b"<" * times(1_000_000)),
    }


def fetch_everything(raw: bytes) -> ParsedMessage:
    """What a FETCH of everything and a SEARCH TEXT make the server compute."""
    message = ParsedMessage.parse(raw)
    message.bodystructure()
    message.envelope()
    message.section("TEXT")
    message.text_for_search()
    return message


def count_calls(run: Callable[[], object]) -> int:
    """How many functions (Python or C) ``run()`` calls."""
    calls = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call" or event == "c_call":
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return calls


class OctetMeter:
    """Counts the octets that forward searches and copies read.

    :meth:`install` makes, for one test, the splitter read the message as
    :class:`MeteredBytes` (``find``, ``startswith`` and slices) and wraps the
    ``search`` and ``finditer`` of every regular expression of the module
    (the empty-line search, the header field scanner, the HTML stripper...).
    """

    def __init__(self) -> None:
        self.octets = 0

    def install(self, test: SynchronousTestCase) -> None:
        meter = self

        class MeteredSplitter(mime._Splitter):
            def __init__(self, raw: bytes) -> None:
                super().__init__(MeteredBytes(raw, meter))

        test.patch(mime, "_Splitter", MeteredSplitter)
        for name, value in list(vars(mime).items()):
            if isinstance(value, re.Pattern):
                test.patch(mime, name, MeteredPattern(value, self))
        test.patch(mime, "_HTML_HIDDEN_END", {
            tag: MeteredPattern(pattern, self) for tag, pattern in mime._HTML_HIDDEN_END.items()})

    def measure(self, run: Callable[[], object]) -> int:
        """The octets read while ``run()`` runs."""
        before = self.octets
        run()
        return self.octets - before


class MeteredBytes(bytes):
    """Message octets that tell an :class:`OctetMeter` what is read of them."""

    meter: OctetMeter

    def __new__(cls, raw: bytes, meter: OctetMeter) -> Self:
        self = super().__new__(cls, raw)
        self.meter = meter
        return self

    def find(self, sub: Any, start: Any = None, end: Any = None) -> int:
        low, high, _ = slice(start, end).indices(len(self))
        found = super().find(sub, low, high)
        self.meter.octets += found + len(sub) - low if found >= 0 else max(0, high - low)
        return found

    def startswith(self, prefix: Any, start: Any = None, end: Any = None) -> bool:
        self.meter.octets += len(prefix)
        return super().startswith(prefix, start, end)

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if isinstance(key, slice):
            self.meter.octets += len(value)
        return value


class MeteredPattern:
    """A compiled regular expression whose forward searches are metered."""

    def __init__(self, pattern: re.Pattern, meter: OctetMeter) -> None:
        self.pattern = pattern
        self.meter = meter

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pattern, name)

    def search(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        match = self.pattern.search(string, pos, endpos)
        self.meter.octets += (match.end() if match else min(endpos, len(string))) - pos
        return match

    def finditer(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Iterator[Any]:
        furthest = pos
        try:
            for match in self.pattern.finditer(string, pos, endpos):
                furthest = match.end()
                yield match
        finally:
            self.meter.octets += furthest - pos


class BoundedWorkTests(SynchronousTestCase):
    """Big and hostile messages cost bounded, linear work (timings: bench/imap_mime.py)."""

    def test_25_mb_with_attachments(self) -> None:
        """A 25 MB message is split whole, and its attachments cost no Python work.

        Fails if attachments were decoded for SEARCH (``_decode_base64`` is
        watched, and the text must be the text part alone), if anything ran
        per line or per chunk of an attachment in Python (the calls would
        grow with attachments 100 times bigger instead of staying put), or
        if the splitter read the octets more than twice over (the one
        forward pass of ``_Splitter``).
        """
        decoded: list[int] = []
        decode = mime._decode_base64

        def watched(data: bytes) -> bytes:
            decoded.append(len(data))
            return decode(data)

        self.patch(mime, "_decode_base64", watched)
        raw = message_with_attachments(4_800_000)
        self.assertGreater(len(raw), 25_000_000)
        message = fetch_everything(raw)
        self.assertFalse(message.degraded)
        structure = read_sexp(message.bodystructure())
        children = subparts(structure)
        self.assertEqual(len(children), 5)
        self.assertEqual(children[0][:2], [b"text", b"plain"])
        for number, child in enumerate(children[1:]):
            self.assertEqual(child[:2], [b"application", b"octet-stream"])
            self.assertEqual(child[5], b"base64")
            self.assertEqual(child[8], [b"attachment", [b"filename", b"f%d" % number]])
            data = present(message, str(number + 2))
            self.assertEqual(child[6], len(data))
            self.assertEqual(len(base64.b64decode(data)), 4_800_000)
        self.assertEqual(read_sexp(message.envelope())[1], b"big")
        self.assertEqual(message.text_for_search(), "see attached")
        self.assertEqual(decoded, [])

        small = message_with_attachments(48_000)
        small_calls = count_calls(functools.partial(fetch_everything, small))
        self.assertLessEqual(count_calls(functools.partial(fetch_everything, raw)), 2 * small_calls)
        meter = OctetMeter()
        meter.install(self)
        self.assertLessEqual(meter.measure(functools.partial(ParsedMessage.parse, raw)), 2 * len(raw))

    def test_hostile_shapes_cost_linear_work(self) -> None:
        """Every hostile shape, ten times bigger, costs about ten times the
        calls and octets read, never a hundred times.

        Fails if a protection against rescanning goes: without the search
        limit in ``_Splitter._next_line`` every unclosed inner multipart
        rescans the rest of the message; without ``blank_lf`` every part of
        "no blank line anywhere" searches to its end for an empty line;
        without ``next_line`` the outer boundary is searched for again,
        past the long epilogue, from every inner part; an HTML stripper
        that looked for ``</style>`` again after each unclosed ``<style``
        rescans the rest; a loop that is quadratic in Python shows in the
        calls.  The caps on fields are checked by the tests below.  The
        shapes are small here, so a regression fails quickly, not slowly.
        """
        meter = OctetMeter()
        meter.install(self)
        work: dict[float, dict[str, tuple[int, int]]] = {}
        for scale in (0.001, 0.01):
            work[scale] = {}
            for name, raw in hostile_shapes(scale).items():
                exercise(self, raw)
                calls = count_calls(functools.partial(fetch_everything, raw))
                octets = meter.measure(functools.partial(fetch_everything, raw))
                work[scale][name] = (calls, octets)
        for name, (calls, octets) in work[0.001].items():
            more_calls, more_octets = work[0.01][name]
            self.assertLessEqual(more_calls, GROWTH_LIMIT * calls, name)
            self.assertLessEqual(more_octets, GROWTH_LIMIT * octets, name)

    def test_address_fields_are_read_up_to_64_kib(self) -> None:
        """Fails if whole address fields were parsed: there would be 20000."""
        raw = b"To: " + b"a@b," * 20_000 + b"\r\n\r\nx"
        to = read_sexp(fetch_everything(raw).envelope())[5]
        self.assertEqual(len(to), 64 * 1024 // len(b"a@b,"))
        self.assertEqual(to[0], [None, None, b"a", b"b"])

    def test_content_fields_are_read_up_to_128_kib(self) -> None:
        """Fails if whole Content-* fields were parsed: the name would be 200 KB."""
        raw = b'Content-Type: text/plain; name="' + b"b" * 200_000 + b'"\r\n\r\nx'
        structure = read_sexp(fetch_everything(raw).bodystructure())
        self.assertEqual(structure[:2], [b"text", b"plain"])
        name = structure[2][1]
        self.assertEqual(name, b"b" * len(name))
        self.assertLess(len(name), 128 * 1024)
        self.assertGreater(len(name), 127 * 1024)

    def test_header_fields_are_limited(self) -> None:
        """Fails if every field were parsed: there would be MAX_HEADER_FIELDS + 500.

        The fields past the limit stay in the header's octets.
        """
        header = b"X-Junk: y\r\n" * (MAX_HEADER_FIELDS + 500)
        message = fetch_everything(header + b"\r\nbody")
        self.assertFalse(message.degraded)
        self.assertEqual(len(message.header_fields()), MAX_HEADER_FIELDS)
        self.assertEqual(message.section("HEADER"), header + b"\r\n")
        self.assertEqual(message.section("TEXT"), b"body")
