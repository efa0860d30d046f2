"""IMAP sans-IO pieces: command framing with literals, tokens, sequence sets,
dates, mailbox names (modified UTF-7), LIST patterns and FETCH items."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailtwist.imap import mime
from mailtwist.imap.fetch import FetchEntry, parse_fetch_items, render
from mailtwist.imap.mime import parse_section_spec
from mailtwist.imap.names import (
    InvalidName,
    decode_mutf7,
    encode_mutf7,
    list_pattern,
    mailbox_name,
)
from mailtwist.imap.wire import (
    Atom,
    BadCommand,
    Command,
    CommandFramer,
    ContinuationNeeded,
    LineTooLong,
    Literal,
    LiteralTooBig,
    ParseError,
    Rejected,
    String,
    format_date_time,
    format_sequence_set,
    parse_command,
    parse_date_time,
    parse_sequence_set,
    raw_arguments,
    tokenize,
)


def events(framer: CommandFramer) -> list:
    out = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


class FramerTests(unittest.TestCase):

    def test_lines_end_in_crlf(self) -> None:
        """Commands are split at CRLF, also across reads."""
        framer = CommandFramer()
        framer.feed(b"a NOOP\r\nb CAPABILITY\r\nc LOG")
        self.assertEqual(events(framer), [Command([b"a NOOP"]), Command([b"b CAPABILITY"])])
        framer.feed(b"OUT\r\n")
        self.assertEqual(events(framer), [Command([b"c LOGOUT"])])

    def test_bare_cr_bare_lf_and_nul_are_refused(self) -> None:
        """Guards issue 6 item 9 for IMAP: a command line with a bare LF ending, a
        bare CR or a NUL is refused (BAD), never executed, and the next command
        is read normally."""
        reason = "Bare CR, bare LF or NUL in command line"
        for bad in (b"a NOOP\n", b"a NOOP\rb LOGOUT\r\n", b"a NO\x00OP\r\n",
                    b"a LOGIN u p\r\r\n", b'a LOGIN "u\rx" p\r\n'):
            framer = CommandFramer()
            framer.feed(bad + b"z NOOP\r\n")
            self.assertEqual(events(framer), [Rejected(b"a", reason), Command([b"z NOOP"])], bad)
        # In a later line of a command too; its announced LITERAL+ data is skipped.
        framer = CommandFramer()
        framer.feed(b"a LOGIN {1+}\r\nu {3+}\n\r\nx z NOOP\r\nb NOOP\r\n")
        self.assertEqual(events(framer), [Rejected(b"a", reason), Command([b"b NOOP"])])
        # A synchronising literal after a refused line is never asked for.
        framer = CommandFramer()
        framer.feed(b"a LOGIN {5}\n")
        self.assertEqual(events(framer), [Rejected(b"a", reason)])
        # Inside literals CR, LF and NUL are data.
        framer = CommandFramer()
        framer.feed(b"a APPEND INBOX {5+}\r\n\r\x00\n.\n\r\n")
        self.assertEqual(events(framer)[0].parts[1], b"\r\x00\n.\n")

    def test_absurd_literal_sizes_are_refused_without_continuation(self) -> None:
        """Guards issue 6 item 11: literal announcements that are no 32-bit number
        get BAD and never a "+" continuation; a non-synchronising one cannot be
        skipped, so it ends the connection; 2^32-1 is a number, just too big."""
        for size in (b"18446744073709551616", b"-1", b"99999999999999999999999", b"", b"1 ",
                     b"0x10", b"4294967296"):
            framer = CommandFramer()
            framer.feed(b"a LOGIN {%s}\r\nb NOOP\r\n" % size)
            self.assertEqual(events(framer), [Rejected(b"a", "Invalid literal size"),
                                              Command([b"b NOOP"])], size)
            framer = CommandFramer()
            framer.feed(b"a LOGIN {%s+}\r\nb NOOP\r\n" % size)
            self.assertEqual(events(framer), [Rejected(b"a", "Invalid literal size", True)], size)
            framer.feed(b"c NOOP\r\n")
            self.assertEqual(events(framer), [])
        framer = CommandFramer()
        framer.feed(b"a LOGIN {4294967295}\r\nt APPEND INBOX {4294967295}\r\nb NOOP\r\n")
        first, second, third = events(framer)
        self.assertEqual((first.tag, first.append, second.tag, second.append),
                         (b"a", False, b"t", True))
        self.assertEqual(third, Command([b"b NOOP"]))

    def test_synchronising_literal_asks_for_continuation(self) -> None:
        framer = CommandFramer()
        framer.feed(b"a LOGIN {5}\r\n")
        self.assertEqual(events(framer), [ContinuationNeeded()])
        framer.feed(b"alice {3}\r\n")
        self.assertEqual(events(framer), [ContinuationNeeded()])
        framer.feed(b"p w\r\n")
        [command] = events(framer)
        self.assertEqual(command.parts, [b"a LOGIN ", b"alice", b" ", b"p w", b""])
        self.assertIsInstance(command.parts[1], Literal)

    def test_non_synchronising_literal_needs_no_continuation(self) -> None:
        framer = CommandFramer()
        framer.feed(b"a APPEND INBOX {4+}\r\nab\r\n\r\nb NOOP\r\n")
        first, second = events(framer)
        self.assertEqual(first.parts, [b"a APPEND INBOX ", b"ab\r\n", b""])
        self.assertEqual(second, Command([b"b NOOP"]))

    def test_literal_split_across_reads(self) -> None:
        framer = CommandFramer()
        framer.feed(b"a APPEND INBOX {10+}\r\n0123")
        self.assertEqual(events(framer), [])
        framer.feed(b"456789\r\n")
        [command] = events(framer)
        self.assertEqual(command.parts[1], b"0123456789")

    def test_zero_length_literal(self) -> None:
        framer = CommandFramer()
        framer.feed(b"a LOGIN {0}\r\n")
        self.assertEqual(events(framer), [ContinuationNeeded()])
        framer.feed(b" x\r\n")
        self.assertEqual(events(framer)[0].parts, [b"a LOGIN ", b"", b" x"])

    def test_too_big_synchronising_literal_is_refused_unread(self) -> None:
        framer = CommandFramer(max_line=100, append_limit=1000)
        framer.feed(b"a LOGIN {101}\r\nb NOOP\r\n")
        self.assertEqual(events(framer), [LiteralTooBig(b"a", False, 101, 87),
                                          Command([b"b NOOP"])])

    def test_too_big_append_literal(self) -> None:
        framer = CommandFramer(max_line=100, append_limit=1000)
        framer.feed(b"t APPEND INBOX {1001}\r\n")
        [event] = events(framer)
        self.assertEqual((event.tag, event.append, event.limit), (b"t", True, 1000))
        framer.feed(b"t APPEND INBOX {1000}\r\n")
        self.assertEqual(events(framer), [ContinuationNeeded()])

    def test_append_literal_may_exceed_the_line_limit(self) -> None:
        framer = CommandFramer(max_line=100, append_limit=1000)
        framer.feed(b"a APPEND INBOX (\\Seen) {500+}\r\n" + b"m" * 500 + b"\r\n")
        [command] = events(framer)
        self.assertEqual(len(command.parts[1]), 500)
        framer.feed(b"b LOGIN {60+}\r\n" + b"u" * 60 + b" {60+}\r\n")
        [event] = events(framer)
        self.assertIsInstance(event, LiteralTooBig)

    def test_too_big_non_synchronising_literal_is_read_and_discarded(self) -> None:
        framer = CommandFramer(max_line=100, append_limit=1000)
        framer.feed(b"a APPEND INBOX {5000+}\r\n")
        [event] = events(framer)
        self.assertIsInstance(event, LiteralTooBig)
        for _ in range(5):
            framer.feed(b"x\r\n" * 333 + b"y")
            self.assertEqual(events(framer), [])
            self.assertLess(len(framer), 100)
        framer.feed(b" {3+}\r\nabc rest of line\r\nb NOOP\r\n")
        self.assertEqual(events(framer), [Command([b"b NOOP"])])

    def test_overlong_line(self) -> None:
        """Guards issue 6 item 11 for IMAP: command text over the limit is answered
        BAD at once and skipped up to its line end without being buffered; the
        next command is read normally."""
        framer = CommandFramer(max_line=50)
        framer.feed(b"a " + b"x" * 60)
        self.assertEqual(events(framer), [Rejected(b"a", "Command line too long")])
        for _ in range(100):
            framer.feed(b"x" * 1000)
            self.assertEqual(events(framer), [])
            self.assertLessEqual(len(framer), 1032)
        framer.feed(b"x\r\nb NOOP\r\n")
        self.assertEqual(events(framer), [Command([b"b NOOP"])])
        framer = CommandFramer(max_line=50)
        framer.feed(b"a LOGIN {30}\r\n" + b"y" * 30 + b" " + b"z" * 30 + b"\r\nb NOOP\r\n")
        self.assertEqual(events(framer), [ContinuationNeeded(),
                                          Rejected(b"a", "Command line too long"),
                                          Command([b"b NOOP"])])

    def test_flood_without_line_end_closes(self) -> None:
        """Guards issue 6 item 11 for IMAP: past ``max_skip`` bytes without a line
        end the framer gives up (LineTooLong, close) having held at most a few
        bytes past the line limit, and reads nothing more."""
        framer = CommandFramer(max_line=50, max_skip=10_000)
        got = []
        peak = 0
        for _ in range(20):
            framer.feed(b"x" * 1000)
            got += events(framer)
            peak = max(peak, len(framer))
        self.assertEqual(got, [Rejected(None, "Command line too long"), LineTooLong()])
        self.assertLessEqual(peak, 1052)
        framer.feed(b"\r\na NOOP\r\n")
        self.assertEqual(events(framer), [])

    def test_discarding_stops_at_a_synchronising_literal(self) -> None:
        """A refused command whose later line announces a synchronising literal
        ends there: the client waits for "+" that never comes, so what it sends
        next is a new command, not literal data to skip."""
        framer = CommandFramer(max_line=100, append_limit=1000)
        framer.feed(b"a APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b" {5}\r\nb NOOP\r\n")
        first, second = events(framer)
        self.assertIsInstance(first, LiteralTooBig)
        self.assertEqual(second, Command([b"b NOOP"]))

    def test_clear_drops_pipelined_input(self) -> None:
        framer = CommandFramer()
        framer.feed(b"a STARTTLS\r\nb LOGIN u p\r\n")
        self.assertEqual(framer.next_event(), Command([b"a STARTTLS"]))
        framer.clear()
        self.assertEqual(events(framer), [])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=30), max_size=8), st.data())
    def test_chunking_does_not_change_events(self, literals: list[bytes], data) -> None:
        stream = b"".join(b"t%d APPEND INBOX {%d+}\r\n%s\r\n" % (i, len(lit), lit)
                          for i, lit in enumerate(literals)) + b"z NOOP\r\n"
        whole = CommandFramer()
        whole.feed(stream)
        expected = events(whole)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        chunked = CommandFramer()
        got = []
        previous = 0
        for cut in cuts + [len(stream)]:
            chunked.feed(stream[previous:cut])
            previous = cut
            got += events(chunked)
        self.assertEqual(got, expected)
        self.assertEqual([bytes(c.parts[1]) for c in expected[:-1]], literals)


class TokenTests(unittest.TestCase):

    def test_tokens(self) -> None:
        tokens = tokenize([b'1:* (FLAGS BODY.PEEK[HEADER.FIELDS (To "From")]<0.100>) "a\\"b" ',
                           Literal(b"lit"), b" NIL"])
        self.assertEqual(tokens, [b"1:*", [b"FLAGS", b'BODY.PEEK[HEADER.FIELDS (To "From")]<0.100>'],
                                  b'a"b', b"lit", b"NIL"])
        self.assertIsInstance(tokens[0], Atom)
        self.assertIsInstance(tokens[2], String)
        self.assertIsInstance(tokens[3], String)

    def test_malformed(self) -> None:
        for bad in [b"(a", b"a)", b'"open', b'"bad \\x escape"', b"BODY[x", b"a\x01b"]:
            self.assertRaises(ParseError, tokenize, [bad])

    def test_command_and_raw_arguments(self) -> None:
        self.assertEqual(parse_command([b"a1 uid fetch 1 FLAGS"]),
                         (b"a1", b"UID", [b"fetch 1 FLAGS"]))
        for bad, tag in [([b""], None), ([b"a+b NOOP"], None), ([b"tag"], b"tag")]:
            with self.assertRaises(BadCommand) as caught:
                parse_command(bad)
            self.assertEqual(caught.exception.tag, tag)
        self.assertEqual(raw_arguments([b"CHARSET UTF-8 SUBJECT ", Literal(b"\xc3\xa9"), b""]),
                         b"CHARSET UTF-8 SUBJECT {2}\r\n\xc3\xa9")

    def test_sequence_sets(self) -> None:
        self.assertEqual(parse_sequence_set(Atom(b"1,3:5,*,7:*")),
                         [(1, 1), (3, 5), (None, None), (7, None)])
        for bad in [b"0", b"1:0", b"a", b"1,,2", b"", b"4294967296", b"-1"]:
            self.assertRaises(ParseError, parse_sequence_set, Atom(bad))
        self.assertEqual(format_sequence_set([1, 2, 3, 7, 9, 10]), b"1:3,7,9:10")
        self.assertEqual(format_sequence_set([5, 3, 4]), b"5,3:4")

    def test_date_time(self) -> None:
        self.assertEqual(parse_date_time(b"17-Jul-1996 02:44:25 -0700"), 837596665.0)
        self.assertEqual(parse_date_time(b" 1-Jan-2020 00:00:00 +0000"), 1577836800.0)
        self.assertEqual(format_date_time(837596665.0), b'"17-Jul-1996 09:44:25 +0000"')
        for bad in [b"32-Jan-2020 00:00:00 +0000", b"1-Foo-2020 00:00:00 +0000",
                    b"1-Jan-2020 00:00 +0000", b"1-Jan-2020 00:00:00 +0099"]:
            self.assertRaises(ParseError, parse_date_time, bad)


class NameTests(unittest.TestCase):

    def test_round_trip(self) -> None:
        for name in ["INBOX", "Entwürfe", "a&b", "日本語/メール", "😀", "~peter/mail"]:
            self.assertEqual(decode_mutf7(encode_mutf7(name)), name)
        self.assertEqual(encode_mutf7("Entwürfe"), b"Entw&APw-rfe")
        self.assertEqual(encode_mutf7("a&b"), b"a&-b")

    def test_tricks_are_refused(self) -> None:
        for raw in [b"&AC4ALg-", b"a&AC8-b", b"&AAA-", b"..", b"a/../b", b"/etc", b"a//b",
                    b"x\x00", b"caf\xc3\xa9", b"&2D0-", b"&Jjo", b"&Jjo-&Jjo-", b"&AGE-",
                    b"a.b", b"&-&AC4-", b"*", b"a%", b"a\tb", b"&ZeVnLIqe"]:
            self.assertRaises(InvalidName, mailbox_name, raw)

    def test_canonical_names(self) -> None:
        self.assertEqual(mailbox_name(b"inbox"), "INBOX")
        self.assertEqual(mailbox_name(b"Inbox/Sub"), "INBOX/Sub")
        self.assertEqual(mailbox_name(b"Foo/"), "Foo")
        self.assertEqual(mailbox_name(b"&ZeVnLIqe-"), "日本語")

    def test_list_patterns(self) -> None:
        match = lambda ref, pat, name: bool(list_pattern(ref, pat).fullmatch(name))
        self.assertTrue(match(b"", b"*", "a/b/c"))
        self.assertTrue(match(b"", b"%", "a"))
        self.assertFalse(match(b"", b"%", "a/b"))
        self.assertTrue(match(b"a/", b"%", "a/b"))
        self.assertTrue(match(b"", b"inbox", "INBOX"))
        self.assertTrue(match(b"", b"&ZeVnLIqe-/*", "日本語/x"))
        self.assertFalse(match(b"", b"a.c", "abc"))
        self.assertIsNone(list_pattern(b"", b"&bad"))


class FetchItemTests(unittest.TestCase):

    def test_macros_and_keys(self) -> None:
        self.assertEqual([i.kind for i in parse_fetch_items(Atom(b"fast"))],
                         [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"])
        items = parse_fetch_items([Atom(b"body.peek[header.fields (subject From)]<5.10>"),
                                   Atom(b"BODY[1.MIME]"), Atom(b"rfc822")])
        self.assertEqual(items[0].key, b"BODY[HEADER.FIELDS (SUBJECT FROM)]<5>")
        self.assertTrue(items[0].peek)
        self.assertEqual((items[0].start, items[0].length), (5, 10))
        self.assertEqual(items[1].key, b"BODY[1.MIME]")
        self.assertFalse(items[1].peek)
        self.assertFalse(items[2].peek)
        for bad in [Atom(b"BODY[0]"), Atom(b"BODY[1.MIME"), Atom(b"FOO"), Atom(b"BODY[]<1.0>"),
                    [], [String(b"FLAGS")]]:
            self.assertRaises(ParseError, parse_fetch_items, bad)

    def test_partial_and_sections(self) -> None:
        raw = b"Subject: x\r\nFrom: a@b\r\n\r\nbody text\r\n"

        class Info:
            vsize = len(raw)
            mtime = 0.0

        entry = FetchEntry(3, 7, b"(\\Seen)", Info())
        items = parse_fetch_items([Atom(b"BODY[]<0.7>"), Atom(b"BODY.PEEK[TEXT]<5.100>"),
                                   Atom(b"BODY[HEADER.FIELDS (FROM)]"), Atom(b"BODY[9]")])
        self.assertEqual(
            render(entry, items, True, lambda info: raw),
            b"* 3 FETCH (UID 7 BODY[]<0> {7}\r\nSubject BODY[TEXT]<5> {6}\r\ntext\r\n "
            b"BODY[HEADER.FIELDS (FROM)] {13}\r\nFrom: a@b\r\n\r\n BODY[9] {0}\r\n)\r\n")

    def test_section_parsed_once_per_command(self) -> None:
        """The BODY[section] spec is parsed with the command, not again per message."""
        raw = b"Subject: x\r\n\r\nbody\r\n"

        class Info:
            vsize = len(raw)
            mtime = 0.0

        items = parse_fetch_items([Atom(b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]")])
        self.assertEqual(items[0].spec, parse_section_spec("HEADER.FIELDS (SUBJECT)"))
        calls = []
        self.patch(mime, "parse_section_spec", lambda spec: calls.append(spec))
        for n in (1, 2):
            self.assertEqual(render(FetchEntry(n, n, b"()", Info()), items, False, lambda i: raw),
                             b"* %d FETCH (BODY[HEADER.FIELDS (SUBJECT)] {14}\r\n"
                             b"Subject: x\r\n\r\n)\r\n" % n)
        self.assertEqual(calls, [])
