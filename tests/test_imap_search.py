"""Tests for mailtwist.imap.search: IMAP SEARCH parsing and evaluation."""

from __future__ import annotations

import datetime
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailtwist.imap import search as search_module
from mailtwist.imap.mime import ParsedMessage
from mailtwist.imap.search import (
    MAX_DEPTH,
    MAX_PENDING,
    All,
    And,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    Not,
    Or,
    RecentKey,
    SearchProgram,
    SearchSyntaxError,
    SequenceKey,
    SizeKey,
    TextKey,
    UnsupportedCharset,
    evaluate,
    parse_search,
)

UTC = datetime.UTC
DAY = datetime.datetime(2024, 3, 10, 12, 0, tzinfo=UTC)


@dataclass(eq=False)
class FakeMessage:
    """A SearchMessage whose text is a real ParsedMessage, counting parses."""

    seq: int
    uid: int
    flags: frozenset[str] = frozenset()
    size: int = 1000
    internaldate: datetime.datetime = DAY
    recent: bool = False
    modseq: int = 1
    raw: bytes = b"Subject: nothing\r\n\r\nnothing\r\n"
    parse_calls: int = field(default=0)

    def parsed(self) -> ParsedMessage:
        self.parse_calls += 1
        return ParsedMessage.parse(self.raw)


@dataclass(eq=False)
class BareMessage:
    """A SearchMessage without ``modseq`` and which must never be parsed."""

    seq: int
    uid: int
    flags: frozenset[str] = frozenset()
    size: int = 1000
    internaldate: datetime.datetime = DAY
    recent: bool = False

    def parsed(self) -> ParsedMessage:
        raise AssertionError("a flag-only search parsed a message")


@dataclass(eq=False)
class ReadCounter:
    """How many message attributes a search has read."""

    reads: int = 0


class CountingMessage:
    """A flag-only SearchMessage (never parsed) that counts attribute reads."""

    def __init__(self, counter: ReadCounter, seq: int, uid: int,
                 flags: frozenset[str] = frozenset(), size: int = 1000) -> None:
        self._counter = counter
        self._seq, self._uid, self._flags, self._size = seq, uid, flags, size

    def _read(self, value: object) -> Any:
        self._counter.reads += 1
        return value

    seq = property(lambda self: self._read(self._seq))
    uid = property(lambda self: self._read(self._uid))
    flags = property(lambda self: self._read(self._flags))
    size = property(lambda self: self._read(self._size))
    internaldate = property(lambda self: self._read(DAY))
    recent = property(lambda self: self._read(False))

    def parsed(self) -> ParsedMessage:
        raise AssertionError("a flag-only search parsed a message")


def peak_memory(run: Callable[[], object]) -> int:
    """The most memory (in octets) that Python had allocated during ``run()``."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def mailbox(*specs: dict) -> list[FakeMessage]:
    """Messages numbered 1..n with UIDs 10, 20, ... and the given attributes."""
    return [FakeMessage(seq=i, uid=i * 10, **spec) for i, spec in enumerate(specs, start=1)]


def search(query: bytes, messages: Sequence, max_uid: int | None = None) -> list[int]:
    return evaluate(parse_search(query), messages, max_uid)


def message(headers: str, body: str = "body\r\n", **attributes) -> dict:
    """Attributes of a message with these header lines (``\\n``-separated) and body."""
    raw = headers.strip("\n").replace("\n", "\r\n").encode() + b"\r\n\r\n" + body.encode()
    return {"raw": raw, **attributes}


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


class ParseTests(SynchronousTestCase):
    """The key tree, the charset and the program's needs."""

    def test_single_key(self) -> None:
        program = parse_search(b"ALL")
        self.assertEqual(program, SearchProgram("UTF-8", All(), False, False))

    def test_keys_are_case_insensitive(self) -> None:
        self.assertEqual(parse_search(b"uNsEeN").root, FlagKey("\\Seen", False))
        self.assertEqual(parse_search(b"charset utf-8 subject x").charset, "UTF-8")

    def test_top_level_is_and_in_order(self) -> None:
        self.assertEqual(parse_search(b"SEEN LARGER 5 UID 7").root,
                         And((FlagKey("\\Seen", True), SizeKey(True, 5),
                              SequenceKey(True, ((7, 7),)))))

    def test_new_and_old(self) -> None:
        self.assertEqual(parse_search(b"NEW").root,
                         And((RecentKey(True), FlagKey("\\Seen", False))))
        self.assertEqual(parse_search(b"OLD").root, RecentKey(False))

    def test_not_not_cancels(self) -> None:
        self.assertEqual(parse_search(b"NOT NOT NOT SEEN").root, Not(FlagKey("\\Seen", True)))

    def test_or_chains_flatten_in_written_order(self) -> None:
        keys = tuple(FlagKey(f, True) for f in ("\\Seen", "\\Draft", "\\Flagged", "\\Deleted"))
        for query in (b"OR OR OR SEEN DRAFT FLAGGED DELETED",
                      b"OR SEEN OR DRAFT OR FLAGGED DELETED",
                      b"OR (OR SEEN DRAFT) (OR FLAGGED DELETED)"):
            self.assertEqual(parse_search(query).root, Or(keys), query)

    def test_parentheses_flatten(self) -> None:
        self.assertEqual(parse_search(b"((SEEN)) (DRAFT (FLAGGED))").root,
                         And((FlagKey("\\Seen", True), FlagKey("\\Draft", True),
                              FlagKey("\\Flagged", True))))

    def test_or_inside_not(self) -> None:
        self.assertEqual(parse_search(b"NOT (OR SEEN DRAFT)").root,
                         Not(Or((FlagKey("\\Seen", True), FlagKey("\\Draft", True)))))

    def test_lenient_spacing_around_parentheses(self) -> None:
        expected = parse_search(b"NOT (SEEN DRAFT)").root
        for query in (b"NOT(SEEN DRAFT)", b"  NOT  ( SEEN  DRAFT )  "):
            self.assertEqual(parse_search(query).root, expected, query)

    def test_charset(self) -> None:
        self.assertEqual(parse_search(b"CHARSET us-ascii ALL").charset, "US-ASCII")
        self.assertEqual(parse_search(b'CHARSET "UTF-8" ALL').charset, "UTF-8")
        self.assertEqual(parse_search(b"CHARSET {5}\r\nutf-8 ALL").charset, "UTF-8")
        self.assertEqual(parse_search(b"ALL").charset, "UTF-8")

    def test_unsupported_charset(self) -> None:
        for query in (b"CHARSET KOI8-R SUBJECT x", b"CHARSET ISO-8859-1 ALL", b'CHARSET "" ALL',
                      b"CHARSET \xff ALL", b'CHARSET "UTF-8\xff" ALL'):
            self.assertRaises(UnsupportedCharset, parse_search, query)

    def test_quoted_string_escapes(self) -> None:
        self.assertEqual(parse_search(b'SUBJECT "a \\"b\\" \\\\c"').root,
                         HeaderKey("subject", 'a "b" \\c'))

    def test_literals(self) -> None:
        self.assertEqual(parse_search(b"SUBJECT {5}\r\nhello").root, HeaderKey("subject", "hello"))
        self.assertEqual(parse_search(b"SUBJECT {5+}\r\nhello SEEN").root,
                         And((HeaderKey("subject", "hello"), FlagKey("\\Seen", True))))
        self.assertEqual(parse_search(b"BODY {4}\r\n(a\")").root, TextKey('(a")', False))
        self.assertEqual(parse_search(b"OR FROM {3}\r\nbob (TO {0}\r\n)").root,
                         Or((HeaderKey("from", "bob"), HeaderKey("to", ""))))

    def test_literal_with_utf8(self) -> None:
        text = "Grüße".encode()
        query = b"CHARSET UTF-8 SUBJECT {%d}\r\n%s" % (len(text), text)
        self.assertEqual(parse_search(query).root, HeaderKey("subject", "Grüße"))

    def test_header_key(self) -> None:
        self.assertEqual(parse_search(b'HEADER X-Spam-Flag ""').root, HeaderKey("x-spam-flag", ""))
        self.assertEqual(parse_search(b'HEADER "Message-ID" <a@b>').root,
                         HeaderKey("message-id", "<a@b>"))

    def test_dates(self) -> None:
        feb = datetime.date(1994, 2, 1)
        for query in (b"SINCE 1-Feb-1994", b"SINCE 01-feb-1994", b'SINCE "1-FEB-1994"'):
            self.assertEqual(parse_search(query).root, DateKey(False, "since", feb), query)
        self.assertEqual(parse_search(b"SENTBEFORE 29-Feb-2024").root,
                         DateKey(True, "before", datetime.date(2024, 2, 29)))

    def test_sequence_sets(self) -> None:
        self.assertEqual(parse_search(b"1,3:5,*,7:*,9:2").root,
                         SequenceKey(False, ((1, 1), (3, 5), (None, None), (7, None), (9, 2))))
        self.assertEqual(parse_search(b"UID 4294967295").root,
                         SequenceKey(True, ((4294967295, 4294967295),)))

    def test_number_limits(self) -> None:
        self.assertEqual(parse_search(b"LARGER 9223372036854775807").root,
                         SizeKey(True, 2**63 - 1))
        self.assertEqual(parse_search(b"SMALLER 007").root, SizeKey(False, 7))

    def test_modseq(self) -> None:
        self.assertEqual(parse_search(b"MODSEQ 620162338").root, ModSeqKey(620162338))
        self.assertEqual(parse_search(b'MODSEQ "/flags/\\\\draft" all 0').root,
                         ModSeqKey(0, "/flags/\\draft", "all"))
        self.assertEqual(parse_search(b'MODSEQ "/flags/$Junk" PRIV 5').root,
                         ModSeqKey(5, "/flags/$Junk", "priv"))

    def test_uses_modseq(self) -> None:
        self.assertTrue(parse_search(b"OR SEEN NOT (DRAFT MODSEQ 5)").uses_modseq())
        self.assertFalse(parse_search(b"OR SEEN NOT (DRAFT LARGER 5)").uses_modseq())

    def test_needs(self) -> None:
        cases = {
            b"SEEN LARGER 3 UID 1:* SINCE 1-Jan-2020 MODSEQ 3": (False, False),
            b"NOT FROM a": (True, False),
            b"OR SEEN HEADER X-A b": (True, False),
            b"SENTON 1-Jan-2020": (True, False),
            b"BODY x": (False, True),
            b"TEXT x": (True, True),
        }
        for query, needs in cases.items():
            program = parse_search(query)
            self.assertEqual((program.needs_headers, program.needs_body), needs, query)

    def test_long_or_chain_is_accepted(self) -> None:
        count = 5000
        query = b"OR " * count + b" ".join(b"HEADER Message-ID <%d@x>" % i
                                           for i in range(count + 1))
        root = parse_search(query).root
        assert isinstance(root, Or)
        self.assertEqual(len(root.keys), count + 1)
        self.assertEqual(root.keys[-1], HeaderKey("message-id", f"<{count}@x>"))

    def test_redundant_deep_parentheses_are_accepted(self) -> None:
        depth = MAX_DEPTH * 20
        self.assertEqual(parse_search(b"(" * depth + b"SEEN" + b")" * depth).root,
                         FlagKey("\\Seen", True))


class SyntaxErrorTests(SynchronousTestCase):
    """Malformed input raises SearchSyntaxError with a useful message."""

    def assert_syntax_error(self, query: bytes, fragment: str = "") -> None:
        error = self.assertRaises(SearchSyntaxError, parse_search, query)
        self.assertIn(fragment.lower(), str(error).lower(), query)

    def test_errors(self) -> None:
        cases = {
            b"": "at least one search key",
            b"   ": "at least one search key",
            b"CHARSET UTF-8": "at least one search key",
            b"CHARSET": "missing its argument",
            b"FOO": "unknown search key 'FOO'",
            b"SEEN CHARSET UTF-8 ALL": "unknown search key 'CHARSET'",
            b"(SEEN": "missing ')'",
            b"SEEN)": "unexpected ')'",
            b"(SEEN))": "unexpected ')'",
            b"()": "empty",
            b"NOT": "NOT needs a search key",
            b"(NOT)": "NOT needs a search key",
            b"OR SEEN": "OR needs two search keys",
            b"SUBJECT": "missing its argument",
            b"SUBJECT ": "missing its argument",
            b"HEADER Subject": "missing its argument",
            b"HEADER Sub:ject x": "not a header field name",
            b'HEADER "" x': "not a header field name",
            b'SUBJECT "abc': "not closed",
            b'SUBJECT "a\\b"': "escaped",
            b'SUBJECT "a"b': "expected a space",
            b'SUBJECT {3}\r\nabcd': "expected a space",
            b"SUBJECT {5}\r\nabc": "shorter",
            b"SUBJECT {3}abc": "malformed literal",
            b"SUBJECT {x}\r\nabc": "malformed literal",
            b"SUBJECT {99999999999}\r\nabc": "too large",
            b"SUBJECT {1}\r\n\x00": "NUL",
            b"SUBJECT a\\b": "not an atom",
            b"SUBJECT a*": "not an atom",
            b"SINCE": "missing its argument",
            b"SINCE 1994-02-01": "not a date",
            b"SINCE 1-Fbr-1994": "not a date",
            b"SINCE 1-Feb-94": "not a date",
            b"SINCE 31-Feb-1994": "not a valid date",
            b"SINCE 0-Feb-1994": "not a valid date",
            b"ON 1-Feb-0000": "not a valid date",
            b"LARGER": "missing its argument",
            b"LARGER x": "needs a number",
            b"LARGER -1": "needs a number",
            b"LARGER 9223372036854775808": "too large",
            b"SMALLER 99999999999999999999999999999999999999": "too large",
            b"0": "not a message number",
            b"1:0": "not a message number",
            b"01": "not a message number",
            b"1,,2": "not a message number",
            b"1:2:3": "not a message number or range",
            b"4294967296": "too large",
            b"UID 99999999999999999999": "too large",
            b"UID": "missing its argument",
            b"UID x": "not a message number",
            b"$": "SEARCHRES",
            b"UID $": "SEARCHRES",
            b"KEYWORD": "missing its argument",
            b"KEYWORD \\Seen": "not a keyword atom",
            b'KEYWORD "$Junk"': "not a keyword atom",
            b"KEYWORD a]": "not a keyword atom",
            b"MODSEQ": "missing its argument",
            b"MODSEQ x": "needs a number",
            b'MODSEQ "/x/y" all 5': "entry name",
            b'MODSEQ "/flags/\\\\Seen" both 5': "priv, shared or all",
            b'MODSEQ "/flags/\\\\Seen" all': "missing its argument",
            b"MODSEQ 9223372036854775808": "too large",
            b"CHARSET US-ASCII SUBJECT caf\xc3\xa9": "US-ASCII",
            b"CHARSET UTF-8 SUBJECT \"caf\xe9\"": "not valid UTF-8",
            b"SUBJECT \xff": "not valid UTF-8",
        }
        for query, fragment in cases.items():
            self.assert_syntax_error(query, fragment)

    def test_error_messages_are_one_printable_line(self) -> None:
        error = self.assertRaises(SearchSyntaxError, parse_search, b"X\r\n\x00\xff")
        self.assertTrue(str(error).isascii() and str(error).isprintable(), str(error))

    def test_deep_nesting_is_refused(self) -> None:
        query = b"NOT (OR SEEN " * (MAX_DEPTH + 1) + b"DRAFT" + b")" * (MAX_DEPTH + 1)
        self.assert_syntax_error(query, "nested too deeply")

    def test_nesting_at_the_limit_is_accepted(self) -> None:
        levels = (MAX_DEPTH - 1) // 2
        query = b"NOT (OR SEEN " * levels + b"DRAFT" + b")" * levels
        parse_search(query)

    def test_very_deep_input_does_not_recurse(self) -> None:
        for query in (b"(" * 100_000 + b"SEEN", b"NOT " * 100_000 + b"SEEN",
                      b"OR " * 100_000 + b"SEEN " * 100_001):
            self.assert_syntax_error(query, f"at most {MAX_PENDING}")


# --------------------------------------------------------------------------
# Evaluation of keys that need no message text
# --------------------------------------------------------------------------


class FlagAndAttributeTests(SynchronousTestCase):
    """Flags, sizes, dates, RECENT and MODSEQ: every key both ways."""

    def setUp(self) -> None:
        self.messages = [
            BareMessage(1, 10, frozenset({"\\Seen", "\\Answered"}), size=100, recent=True),
            BareMessage(2, 20, frozenset({"\\Flagged", "$Junk"}), size=200),
            BareMessage(3, 30, frozenset({"\\Deleted", "\\Draft", "\\Seen"}), size=300,
                        recent=True),
            BareMessage(4, 40, frozenset(), size=400),
        ]

    def check(self, query: bytes, expected: list[int]) -> None:
        self.assertEqual(search(query, self.messages), expected, query)

    def test_system_flags(self) -> None:
        self.check(b"ALL", [1, 2, 3, 4])
        self.check(b"ANSWERED", [1])
        self.check(b"UNANSWERED", [2, 3, 4])
        self.check(b"DELETED", [3])
        self.check(b"UNDELETED", [1, 2, 4])
        self.check(b"DRAFT", [3])
        self.check(b"UNDRAFT", [1, 2, 4])
        self.check(b"FLAGGED", [2])
        self.check(b"UNFLAGGED", [1, 3, 4])
        self.check(b"SEEN", [1, 3])
        self.check(b"UNSEEN", [2, 4])

    def test_keywords_are_case_insensitive(self) -> None:
        self.check(b"KEYWORD $Junk", [2])
        self.check(b"KEYWORD $JUNK", [2])
        self.check(b"KEYWORD $NotJunk", [])
        self.check(b"UNKEYWORD $junk", [1, 3, 4])
        self.check(b"KEYWORD Seen", [])

    def test_recent_new_old(self) -> None:
        self.check(b"RECENT", [1, 3])
        self.check(b"OLD", [2, 4])
        self.messages[0].flags = frozenset()
        self.check(b"NEW", [1])
        self.check(b"NOT NEW", [2, 3, 4])

    def test_sizes(self) -> None:
        self.check(b"LARGER 200", [3, 4])
        self.check(b"LARGER 199", [2, 3, 4])
        self.check(b"SMALLER 200", [1])
        self.check(b"SMALLER 201", [1, 2])
        self.check(b"LARGER 0", [1, 2, 3, 4])
        self.check(b"SMALLER 0", [])
        self.check(b"LARGER 9223372036854775807", [])

    def test_internal_date_uses_the_utc_day(self) -> None:
        eastern = datetime.timezone(datetime.timedelta(hours=-5))
        self.messages[0].internaldate = datetime.datetime(2024, 3, 10, 23, 30, tzinfo=eastern)
        self.messages[1].internaldate = datetime.datetime(2024, 3, 11, 0, 0, tzinfo=UTC)
        self.messages[2].internaldate = datetime.datetime(2024, 3, 10, 23, 59, 59, tzinfo=UTC)
        self.messages[3].internaldate = datetime.datetime(2024, 3, 12, 0, 0)
        self.check(b"ON 11-Mar-2024", [1, 2])
        self.check(b"ON 10-Mar-2024", [3])
        self.check(b"BEFORE 11-Mar-2024", [3])
        self.check(b"BEFORE 10-Mar-2024", [])
        self.check(b"SINCE 11-Mar-2024", [1, 2, 4])
        self.check(b"SINCE 12-Mar-2024", [4])
        self.check(b"SINCE 13-Mar-2024", [])

    def test_modseq(self) -> None:
        messages = mailbox({"modseq": 5}, {"modseq": 9}, {"modseq": 10})
        self.assertEqual(search(b"MODSEQ 9", messages), [2, 3])
        self.assertEqual(search(b'MODSEQ "/flags/\\\\Seen" shared 10', messages), [3])
        self.assertEqual(search(b"MODSEQ 11", messages), [])
        self.assertEqual(search(b"MODSEQ 0", messages), [1, 2, 3])

    def test_modseq_absent_counts_as_zero(self) -> None:
        self.check(b"MODSEQ 0", [1, 2, 3, 4])
        self.check(b"MODSEQ 1", [])

    def test_combinations(self) -> None:
        self.check(b"SEEN NOT DELETED", [1])
        self.check(b"OR FLAGGED DRAFT", [2, 3])
        self.check(b"OR FLAGGED OR DRAFT ANSWERED", [1, 2, 3])
        self.check(b"OR (SEEN RECENT) (LARGER 350)", [1, 3, 4])
        self.check(b"NOT (OR SEEN FLAGGED)", [4])
        self.check(b"OR NOT SEEN NOT RECENT", [2, 4])
        self.check(b"(SEEN (RECENT (NOT ANSWERED)))", [3])
        self.check(b"NOT ALL", [])
        self.check(b"OR ALL NOT ALL", [1, 2, 3, 4])

    def test_result_is_sorted_by_sequence_number(self) -> None:
        self.assertEqual(search(b"ALL", list(reversed(self.messages))), [1, 2, 3, 4])


class SequenceSetTests(SynchronousTestCase):
    """Message numbers and UIDs, with ranges and ``*``."""

    def setUp(self) -> None:
        self.messages = [BareMessage(seq, seq * 10) for seq in range(1, 6)]

    def check(self, query: bytes, expected: list[int], max_uid: int | None = None) -> None:
        self.assertEqual(search(query, self.messages, max_uid), expected, query)

    def test_message_numbers(self) -> None:
        self.check(b"2", [2])
        self.check(b"2,4", [2, 4])
        self.check(b"2:4", [2, 3, 4])
        self.check(b"4:2", [2, 3, 4])
        self.check(b"1,3:4,2", [1, 2, 3, 4])
        self.check(b"6", [])
        self.check(b"4:4294967295", [4, 5])

    def test_star(self) -> None:
        self.check(b"*", [5])
        self.check(b"3:*", [3, 4, 5])
        self.check(b"*:3", [3, 4, 5])
        self.check(b"9:*", [5])
        self.check(b"NOT *", [1, 2, 3, 4])

    def test_uids(self) -> None:
        self.check(b"UID 20", [2])
        self.check(b"UID 15:35", [2, 3])
        self.check(b"UID 35:15", [2, 3])
        self.check(b"UID 21", [])
        self.check(b"UID 1,20,40:45", [2, 4])

    def test_uid_star_is_the_highest_uid(self) -> None:
        self.check(b"UID *", [5])
        self.check(b"UID 100:*", [5])
        self.check(b"UID 40:*", [4, 5])
        self.check(b"UID 40:*", [4], max_uid=45)

    def test_star_in_an_empty_mailbox(self) -> None:
        for query in (b"*", b"1:*", b"UID *", b"UID 1:*", b"NOT *", b"ALL"):
            self.assertEqual(search(query, []), [], query)

    def test_sets_and_flags(self) -> None:
        self.messages[2].flags = frozenset({"\\Seen"})
        self.check(b"1:4 UNSEEN", [1, 2, 4])
        self.check(b"OR 5 SEEN", [3, 5])

    def test_huge_ranges_are_not_expanded(self) -> None:
        """Sequence sets stay (first, last) ranges however wide they are.

        Fails if a set were expanded into its numbers anywhere: the parsed
        key must hold the ranges as written, the membership test must get
        the merged ranges, and the memory a search takes must not grow with
        the width of the range (an expanded 1:2000000 takes over 50 MB, a
        difference the 64 KiB allowance cannot hide).
        """
        messages = [BareMessage(seq, seq) for seq in range(1, 20_001)]
        query = b"UID " + b",".join(b"%d:%d" % (i * 1000, i * 1000 + 1) for i in range(1, 30))
        query += b",4294967295:1"
        written = tuple((i * 1000, i * 1000 + 1) for i in range(1, 30)) + ((4294967295, 1),)
        self.assertEqual(parse_search(query).root, SequenceKey(True, written))
        self.assertEqual(parse_search(b"1:4294967295").root,
                         SequenceKey(False, ((1, 4294967295),)))

        tables: list[list[tuple[int, int]]] = []
        in_ranges = search_module._in_ranges

        def watched(ranges: list[tuple[int, int]]) -> Callable[[int], bool]:
            tables.append(list(ranges))
            return in_ranges(ranges)

        self.patch(search_module, "_in_ranges", watched)
        peak_memory(lambda: search(b"UID 1:20000", messages))
        narrow = peak_memory(lambda: search(b"UID 1:20000", messages))
        wide = peak_memory(lambda: search(b"UID 1:2000000", messages))
        self.assertLessEqual(wide, narrow + 64 * 1024)
        self.assertEqual(len(search(query, messages)), 20_000)
        self.assertEqual(len(search(b"1:4294967295", messages)), 20_000)
        self.assertEqual(tables, [[(1, 20_000)]] * 2 + [[(1, 2_000_000)]]
                         + [[(1, 4294967295)]] * 2)


# --------------------------------------------------------------------------
# Evaluation of keys that read the message
# --------------------------------------------------------------------------


class HeaderAndTextTests(SynchronousTestCase):
    """FROM, TO, CC, BCC, SUBJECT, HEADER, BODY, TEXT and SENT*."""

    def setUp(self) -> None:
        self.messages = mailbox(
            message("From: Bob Smith <bob@example.test>\nTo: alice@example.test\n"
                    "Cc: Carol <carol@example.test>\nSubject: Quarterly report\n"
                    "X-Priority: 1\nDate: Sun, 10 Mar 2024 23:30:00 -0500",
                    "Numbers are up.\r\n"),
            message("From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.test>\n"
                    "To: bob@example.test\nBcc: secret@example.test\n"
                    "Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgQmVybGlu?=\n"
                    "Date: Mon, 11 Mar 2024 08:00:00 +0100",
                    "Stra\u00dfe und Caf\u00e9\r\n"),
            message("From: dave@example.test\nSubject: no date here\nX-Priority:",
                    "Nothing about reports.\r\n",
                    internaldate=datetime.datetime(2024, 3, 9, 5, 0, tzinfo=UTC)),
        )

    def check(self, query: bytes, expected: list[int]) -> None:
        self.assertEqual(search(query, self.messages), expected, query)

    def test_address_headers(self) -> None:
        self.check(b"FROM bob", [1])
        self.check(b'FROM "BOB SMITH"', [1])
        self.check(b"FROM example.test", [1, 2, 3])
        self.check(b"FROM mallory", [])
        self.check(b"TO bob@", [2])
        self.check(b"TO carol", [])
        self.check(b"CC carol", [1])
        self.check(b"CC bob", [])
        self.check(b"BCC secret", [2])
        self.check(b"BCC alice", [])

    def test_subject(self) -> None:
        self.check(b"SUBJECT report", [1])
        self.check(b"SUBJECT REPORT", [1])
        self.check(b"SUBJECT invoice", [])

    def test_rfc2047_values_match_decoded_text(self) -> None:
        self.check(b'CHARSET UTF-8 SUBJECT "gr\xc3\xbc\xc3\x9fe aus"', [2])
        self.check(b'CHARSET UTF-8 FROM "J\xc3\x9cRGEN"', [2])
        self.check(b"SUBJECT R3LDvMOfZSBhdXMgQmVybGlu", [])

    def test_unicode_case_folding(self) -> None:
        self.check(b"CHARSET UTF-8 SUBJECT GR\xc3\x9cSSE", [2])
        self.check(b"CHARSET UTF-8 BODY strasse", [2])
        self.check(b"CHARSET UTF-8 BODY CAFE\xcc\x81", [2])
        self.check(b"CHARSET UTF-8 BODY cafe", [])

    def test_us_ascii_folds_only_ascii_letters(self) -> None:
        self.check(b"CHARSET US-ASCII BODY STRA", [2])
        self.check(b"CHARSET US-ASCII BODY strasse", [])
        self.check(b"CHARSET US-ASCII SUBJECT AUS", [2])

    def test_header(self) -> None:
        self.check(b"HEADER X-Priority 1", [1])
        self.check(b"HEADER x-priority 2", [])
        self.check(b'HEADER "X-Priority" ""', [1, 3])
        self.check(b'HEADER X-Missing ""', [])
        self.check(b'SUBJECT ""', [1, 2, 3])
        self.check(b'CC ""', [1])

    def test_body(self) -> None:
        self.check(b"BODY numbers", [1])
        self.check(b"BODY report", [3])
        self.check(b"BODY bob", [])
        self.check(b'BODY ""', [1, 2, 3])

    def test_text_searches_headers_and_body(self) -> None:
        self.check(b"TEXT report", [1, 3])
        self.check(b"TEXT numbers", [1])
        self.check(b"TEXT secret@", [2])
        self.check(b"TEXT x-priority", [1, 3])
        self.check(b"TEXT zebra", [])

    def test_sent_dates_use_the_date_header_in_its_own_zone(self) -> None:
        self.check(b"SENTON 10-Mar-2024", [1])
        self.check(b"SENTON 11-Mar-2024", [2])
        self.check(b"SENTBEFORE 11-Mar-2024", [1, 3])
        self.check(b"SENTSINCE 11-Mar-2024", [2])
        self.check(b"SENTSINCE 10-Mar-2024", [1, 2])

    def test_sent_dates_fall_back_to_internal_date(self) -> None:
        self.check(b"SENTON 9-Mar-2024", [3])
        self.messages[0].raw = self.messages[0].raw.replace(b"Sun, 10 Mar", b"Garbage 99")
        self.check(b"SENTON 10-Mar-2024", [1])
        self.messages[0].internaldate = datetime.datetime(2020, 1, 1, tzinfo=UTC)
        self.check(b"SENTON 1-Jan-2020", [1])

    def test_literal_search_string(self) -> None:
        self.check(b"SUBJECT {9}\r\nquarterly", [1])
        self.check(b"CHARSET UTF-8 BODY {7}\r\nstra\xc3\x9fe", [2])

    def test_combinations(self) -> None:
        self.check(b"OR FROM dave SUBJECT report", [1, 3])
        self.check(b"FROM example NOT BODY numbers", [2, 3])
        self.check(b"OR (FROM bob BODY zebra) (TO bob SENTSINCE 11-Mar-2024)", [2])

    def test_broken_messages_do_not_break_search(self) -> None:
        messages = mailbox({"raw": b""}, {"raw": b"\x00\xff\r\n\r\n"},
                           {"raw": b"Subject: =?x-bogus?Q?=ZZ?=\r\nDate: \xff\r\n\r\n"})
        self.assertEqual(search(b"TEXT x SENTON 10-Mar-2024 SUBJECT a", messages), [])
        self.assertEqual(search(b'SENTON 10-Mar-2024 TEXT ""', messages), [1, 2, 3])


class LazinessTests(SynchronousTestCase):
    """Message text is read only when cheaper keys leave the answer open."""

    def setUp(self) -> None:
        self.messages = mailbox(*({"flags": frozenset({"\\Seen"} if i % 4 == 0 else ())}
                                  for i in range(20)))

    def parse_counts(self) -> list[int]:
        return [m.parse_calls for m in self.messages]

    def test_flag_only_search_never_parses(self) -> None:
        search(b"OR SEEN NOT LARGER 5 SINCE 1-Jan-2000 UID 1:* MODSEQ 0", self.messages)
        self.assertEqual(self.parse_counts(), [0] * 20)

    def test_cheap_keys_run_first(self) -> None:
        search(b"SUBJECT nothing TEXT nothing SEEN", self.messages)
        self.assertEqual(self.parse_counts(), [1 if i % 4 == 0 else 0 for i in range(20)])

    def test_each_message_is_parsed_at_most_once(self) -> None:
        search(b"OR SUBJECT zebra TEXT zebra BODY zebra SENTON 1-Jan-2000 HEADER X a",
               self.messages)
        self.assertEqual(self.parse_counts(), [1] * 20)

    def test_or_stops_at_the_first_match(self) -> None:
        search(b"OR BODY nothing UNSEEN", self.messages)
        self.assertEqual(self.parse_counts(), [1 if i % 4 == 0 else 0 for i in range(20)])

    def test_not_short_circuits_inside(self) -> None:
        search(b"NOT (SEEN BODY nothing)", self.messages)
        self.assertEqual(self.parse_counts(), [1 if i % 4 == 0 else 0 for i in range(20)])


class BoundedWorkTests(SynchronousTestCase):
    """Flag searches do bounded work per message, counted rather than timed.

    Seconds depend on the machine; reads of message attributes do not.
    bench/imap_search.py prints how long these searches take.
    """

    READS_PER_MESSAGE = 8
    """At most this many attribute reads per message for the query below."""

    def flag_mailbox(self, count: int, counter: ReadCounter) -> list[CountingMessage]:
        """``count`` messages cycling through four flag sets; sizes spread
        over 0-100,000 so that LARGER 50000 holds for the later half."""
        flag_sets = [frozenset(), frozenset({"\\Seen"}), frozenset({"\\Seen", "\\Flagged"}),
                     frozenset({"\\Deleted", "$Junk"})]
        step = 100_000 // count
        return [CountingMessage(counter, i, i * 3, flag_sets[i % 4], size=i * step)
                for i in range(1, count + 1)]

    def test_flag_search_on_100000_messages(self) -> None:
        """A 100,000-message mailbox is searched by flags alone, in linear work.

        Fails if a flag-only search parses a message (``parsed()`` raises),
        if the answer is wrong, or if the work per message grows with the
        mailbox, say because ``*`` or the range table were worked out again
        for each message: the attribute reads per message would pass
        :attr:`READS_PER_MESSAGE` at 1,000 messages already, before the
        100,000-message search is tried.
        """
        program = parse_search(b"UNSEEN NOT DELETED OR FLAGGED LARGER 50000 1:*")
        reads = {}
        for count in (1_000, 100_000):
            counter = ReadCounter()
            messages = self.flag_mailbox(count, counter)
            result = evaluate(program, messages)
            expected = [i for i in range(4, count + 1, 4) if i * (100_000 // count) > 50_000]
            self.assertEqual(len(expected), count // 8)
            self.assertEqual(result, expected)
            self.assertLessEqual(counter.reads, self.READS_PER_MESSAGE * count, count)
            reads[count] = counter.reads
        self.assertLessEqual(reads[100_000], 100 * reads[1_000] * 1.1)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

FLAG_NAMES = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Junk", "Work"]
Model = Callable[[BareMessage, "tuple[int, int] | None"], bool]


@st.composite
def mailboxes(draw: st.DrawFn) -> list[BareMessage]:
    """Up to 12 messages with random flags, sizes, RECENT and growing UIDs."""
    count = draw(st.integers(0, 12))
    uid = 0
    messages = []
    for seq in range(1, count + 1):
        uid += draw(st.integers(1, 3))
        flags = frozenset(draw(st.sets(st.sampled_from(FLAG_NAMES))))
        messages.append(BareMessage(seq, uid, flags, size=draw(st.integers(0, 20)),
                                    recent=draw(st.booleans())))
    return messages


def _has(flag: str) -> Model:
    return lambda m, top: flag.lower() in {f.lower() for f in m.flags}


def _negated(model: Model) -> Model:
    return lambda m, top: not model(m, top)


def _flag_leaf() -> st.SearchStrategy[tuple[bytes, Model]]:
    system = [(name, f"\\{name.title()}") for name in
              ("SEEN", "ANSWERED", "FLAGGED", "DELETED", "DRAFT")]
    leaves: list[tuple[bytes, Model]] = []
    for name, flag in system:
        leaves.append((name.encode(), _has(flag)))
        leaves.append((b"UN" + name.encode(), _negated(_has(flag))))
    for keyword in ("$junk", "WORK", "Absent"):
        leaves.append((b"KEYWORD " + keyword.encode(), _has(keyword)))
        leaves.append((b"UNKEYWORD " + keyword.encode(), _negated(_has(keyword))))
    leaves += [
        (b"ALL", lambda m, top: True),
        (b"RECENT", lambda m, top: m.recent),
        (b"OLD", lambda m, top: not m.recent),
        (b"NEW", lambda m, top: m.recent and "\\Seen" not in m.flags),
    ]
    return st.sampled_from(leaves)


def _size_leaf() -> st.SearchStrategy[tuple[bytes, Model]]:
    def build(larger: bool, size: int) -> tuple[bytes, Model]:
        if larger:
            return b"LARGER %d" % size, lambda m, top: m.size > size
        return b"SMALLER %d" % size, lambda m, top: m.size < size
    return st.builds(build, st.booleans(), st.integers(0, 21))


def _set_leaf() -> st.SearchStrategy[tuple[bytes, Model]]:
    number = st.one_of(st.integers(1, 40), st.none())

    def build(uid: bool, ranges: list[tuple[int | None, int | None]]) -> tuple[bytes, Model]:
        def show(n: int | None) -> bytes:
            return b"*" if n is None else b"%d" % n
        text = b",".join(show(a) if a == b else show(a) + b":" + show(b) for a, b in ranges)

        def model(m: BareMessage, top: tuple[int, int] | None) -> bool:
            if top is None:
                return False
            star = top[1] if uid else top[0]
            value = m.uid if uid else m.seq
            for a, b in ranges:
                low, high = sorted((star if a is None else a, star if b is None else b))
                if low <= value <= high:
                    return True
            return False
        return (b"UID " if uid else b"") + text, model
    return st.builds(build, st.booleans(), st.lists(st.tuples(number, number), min_size=1,
                                                      max_size=4))


def search_keys(max_leaves: int) -> st.SearchStrategy[tuple[bytes, Model]]:
    """Random search keys as text, each with a model predicate to check against."""
    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        def negate(child: tuple[bytes, Model]) -> tuple[bytes, Model]:
            text, model = child
            return b"NOT " + text, _negated(model)

        def either(a: tuple[bytes, Model], b: tuple[bytes, Model]) -> tuple[bytes, Model]:
            return (b"OR " + a[0] + b" " + b[0],
                    lambda m, top: a[1](m, top) or b[1](m, top))

        def group(items: list[tuple[bytes, Model]]) -> tuple[bytes, Model]:
            return (b"(" + b" ".join(text for text, _ in items) + b")",
                    lambda m, top: all(model(m, top) for _, model in items))
        return st.one_of(children.map(negate), st.builds(either, children, children),
                         st.lists(children, min_size=1, max_size=3).map(group))
    leaves = st.one_of(_flag_leaf(), _size_leaf(), _set_leaf())
    return st.recursive(leaves, extend, max_leaves=max_leaves)


MAILBOXES = mailboxes()
SMALL_KEYS = search_keys(max_leaves=4)
KEYS = search_keys(max_leaves=12)


TOKENS = [
    b"ALL", b"SEEN", b"UNSEEN", b"NOT", b"OR", b"(", b")", b"NEW", b"OLD", b"RECENT",
    b"SUBJECT", b"FROM", b"HEADER", b"BODY", b"TEXT", b"SINCE", b"SENTON", b"KEYWORD",
    b"LARGER", b"SMALLER", b"UID", b"MODSEQ", b"CHARSET", b"UTF-8", b"US-ASCII", b"KOI8-R",
    b"1", b"0", b"*", b"1:*", b"5:2", b"4294967296", b"$", b"1-Feb-1994", b"31-Feb-1994",
    b'"quoted"', b'"\\"', b'"', b"{3}\r\nabc", b"{3+}\r\nab", b"{2}", b"\xc3\xa9", b"\xff",
    b'"/flags/\\\\Seen"', b"all", b"priv", b"X-Head", b"\x00", b"\r\n", b"",
]


class PropertyTests(SynchronousTestCase):
    """Fuzzing the parser and checking the algebra of the evaluator."""

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes_parse_or_fail_cleanly(self, data: bytes) -> None:
        self.parse_or_fail_cleanly(data)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from(TOKENS), max_size=25),
           st.sampled_from([b" ", b"", b"  "]))
    def test_token_soup_parses_or_fails_cleanly(self, tokens: list[bytes], sep: bytes) -> None:
        self.parse_or_fail_cleanly(sep.join(tokens))

    def parse_or_fail_cleanly(self, data: bytes) -> None:
        try:
            program = parse_search(data)
        except (SearchSyntaxError, UnsupportedCharset) as error:
            self.assertTrue(str(error).isascii() and str(error).isprintable(), str(error))
        else:
            evaluate(program, mailbox({}, {"flags": frozenset({"\\Seen"})}))

    @settings(max_examples=100, deadline=None)
    @given(MAILBOXES, SMALL_KEYS)
    def test_not_not_is_identity(self, messages: list[BareMessage],
                                 key: tuple[bytes, Model]) -> None:
        text, _ = key
        self.assertEqual(search(b"NOT NOT " + text, messages), search(text, messages))
        self.assertEqual(search(b"NOT (NOT " + text + b")", messages), search(text, messages))

    @settings(max_examples=200, deadline=None)
    @given(MAILBOXES, SMALL_KEYS, SMALL_KEYS)
    def test_or_is_union_and_is_intersection(self, messages: list[BareMessage],
                                             one: tuple[bytes, Model],
                                             other: tuple[bytes, Model]) -> None:
        first, second = one[0], other[0]
        a, b = set(search(first, messages)), set(search(second, messages))
        self.assertEqual(search(b"OR " + first + b" " + second, messages), sorted(a | b))
        self.assertEqual(search(b"(" + first + b") " + second, messages), sorted(a & b))
        everything = {m.seq for m in messages}
        self.assertEqual(search(b"NOT (" + first + b")", messages), sorted(everything - a))

    @settings(max_examples=200, deadline=None)
    @given(MAILBOXES, KEYS)
    def test_evaluation_matches_a_model(self, messages: list[BareMessage],
                                        key: tuple[bytes, Model]) -> None:
        text, model = key
        highest = (max(m.seq for m in messages), max(m.uid for m in messages)) if messages else None
        expected = [m.seq for m in messages if model(m, highest)]
        self.assertEqual(search(text, messages), expected, text)


@dataclass
class TableIndex:
    """A SearchIndex over a dict of per-UID header values (what the server's
    message cache provides), counting its answers."""

    values: dict[int, dict[str, str]]
    sent: dict[int, datetime.date | None] = field(default_factory=dict)
    answers: int = 0

    def header_match(self, uid: int, field: str, needle: str) -> bool | None:
        if uid not in self.values:
            return None
        self.answers += 1
        value = self.values[uid].get(field)
        return value is not None and needle in value

    def header_text_match(self, uid: int, needle: str) -> bool | None:
        if uid not in self.values:
            return None
        self.answers += 1
        return any(needle in f"{name}: {value}" for name, value in self.values[uid].items())

    def sent_date(self, uid: int) -> datetime.date | None | bool:
        return self.sent.get(uid, False) if uid in self.values else False


class SearchIndexTests(SynchronousTestCase):
    """Header keys answered by a SearchIndex, and evaluation in chunks."""

    def test_index_answers_header_keys_without_parsing(self) -> None:
        """With an index, FROM/HEADER/SENT* never parse a message it knows."""
        messages = [BareMessage(1, 10), BareMessage(2, 20)]
        index = TableIndex({10: {"from": "carol", "x-tag": "red"}, 20: {"from": "dave"}},
                           {10: datetime.date(2024, 1, 5), 20: None})
        self.assertEqual(evaluate(parse_search(b"FROM carol"), messages, index=index), [1])
        self.assertEqual(evaluate(parse_search(b"HEADER X-Tag RED"), messages, index=index), [1])
        self.assertEqual(evaluate(parse_search(b"SENTSINCE 1-Jan-2024"), messages,
                                  index=index), [1, 2])  # 2 falls back to its internal date
        self.assertEqual(evaluate(parse_search(b"NOT FROM dave"), messages, index=index), [1])
        self.assertGreater(index.answers, 0)

    def test_unknown_messages_and_us_ascii_fall_back_to_parsing(self) -> None:
        """Messages the index lacks, and US-ASCII searches, parse the message."""
        messages = mailbox(message("From: carol\r\n"), message("From: dave\r\n"))
        index = TableIndex({10: {"from": "nobody"}})
        self.assertEqual(evaluate(parse_search(b"FROM dave"), messages, index=index), [2])
        self.assertEqual([m.parse_calls for m in messages], [0, 1])
        self.assertEqual(evaluate(parse_search(b"CHARSET US-ASCII FROM carol"), messages,
                                  index=index), [1])
        self.assertEqual(messages[0].parse_calls, 1)

    def test_text_uses_the_index_for_headers_and_parses_for_the_body(self) -> None:
        """TEXT matches indexed header lines without parsing; else reads the body."""
        messages = mailbox(message("Subject: x\r\n", "needle\r\n"),
                           message("Subject: needle\r\n", "nothing\r\n"))
        index = TableIndex({10: {"subject": "x"}, 20: {"subject": "needle"}})
        self.assertEqual(evaluate(parse_search(b"TEXT needle"), messages, index=index), [1, 2])
        self.assertEqual([m.parse_calls for m in messages], [1, 0])

    def test_chunks_give_the_same_answer_as_the_whole(self) -> None:
        """With max_seq and max_uid, ``*`` means the mailbox's last message in every chunk."""
        messages = [BareMessage(i, 10 * i, flags=frozenset({"\\Seen"}) if i % 2 else frozenset())
                    for i in range(1, 11)]
        for query in (b"*", b"5:*", b"UID 70:*", b"SEEN 3:*", b"NOT 2:*", b"UID *"):
            program = parse_search(query)
            whole = evaluate(program, messages)
            chunked = []
            for start in range(0, 10, 3):
                chunked += evaluate(program, messages[start:start + 3], max_uid=100, max_seq=10)
            self.assertEqual(chunked, whole, query)
