"""Tests for mailtwist.smtp.wire: framing, envelope parsing, sanitising."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailtwist.smtp.wire import (
    Command,
    CommandTooLong,
    DataContent,
    DataEnd,
    Event,
    ParseError,
    PathArgument,
    SMTPFramer,
    is_valid_helo,
    parse_mail_from,
    parse_rcpt_to,
    parse_size_param,
    sanitize_header_text,
    split_address,
)

TERMINATOR = b"\r\n.\r\n"


def drain(framer: SMTPFramer) -> list[Event]:
    """Pull events until the framer needs more input."""
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def run_session(
    chunks: Iterable[bytes], framer: SMTPFramer | None = None
) -> list[Event]:
    """Feed chunks, entering DATA mode after each DATA command, like the protocol."""
    framer = framer or SMTPFramer()
    events: list[Event] = []
    for chunk in chunks:
        framer.receive_data(chunk)
        while (event := framer.next_event()) is not None:
            events.append(event)
            if event == Command(b"DATA"):
                framer.start_data()
    return events


def feed_data(
    wire: bytes, chunk_sizes: Iterable[int] = (), framer: SMTPFramer | None = None
) -> list[Event]:
    """Feed ``wire`` in DATA mode, cut into the given chunk sizes (rest at once)."""
    framer = framer or SMTPFramer()
    framer.start_data()
    events: list[Event] = []
    pos = 0
    for size in chunk_sizes:
        framer.receive_data(wire[pos : pos + size])
        pos += size
        events += drain(framer)
    framer.receive_data(wire[pos:])
    events += drain(framer)
    return events


def content_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataContent))


def ends_of(events: list[Event]) -> list[DataEnd]:
    return [e for e in events if isinstance(e, DataEnd)]


def byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def stuff(body: bytes) -> bytes:
    """Dot-stuff ``body`` as a client does: lines are delimited by CRLF only."""
    return b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")
    )


def normalise(body: bytes) -> bytes:
    """Reference normalisation: every CRLF, bare CR and bare LF becomes CRLF."""
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i : i + 2] == b"\r\n":
            i += 2
            out += b"\r\n"
        elif body[i : i + 1] in (b"\r", b"\n"):
            i += 1
            out += b"\r\n"
        else:
            out += body[i : i + 1]
            i += 1
    return bytes(out)


def reference_end_count(stream: bytes) -> int:
    """DataEnds expected when DATA restarts right after every terminator."""
    count = 0
    wire = b"\r\n" + stream
    pos = wire.find(TERMINATOR)
    while pos >= 0:
        count += 1
        # The terminator's final CRLF stands in for the next DATA's CRLF.
        pos = wire.find(TERMINATOR, pos + 3)
    return count


# Bodies biased towards the bytes that matter for framing.
interesting_bodies = st.lists(
    st.sampled_from(
        [
            b"\r\n",
            b"\r",
            b"\n",
            b".",
            b"..",
            b"\r\n.",
            b"\n.\n",
            b"a",
            b"xyz",
            b"\x00",
            b"\xff",
        ]
    ),
    max_size=40,
).map(b"".join)
bodies = st.one_of(st.binary(max_size=300), interesting_bodies)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=16), max_size=60)


class CommandFramingTests(SynchronousTestCase):
    def test_pipelined_commands_come_one_at_a_time(self) -> None:
        framer = SMTPFramer()
        rest = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        framer.receive_data(b"EHLO client.example\r\n" + rest)
        self.assertEqual(framer.next_event(), Command(b"EHLO client.example"))
        self.assertEqual(framer.buffered, len(rest))
        self.assertEqual(framer.next_event(), Command(b"MAIL FROM:<a@example.org>"))
        self.assertEqual(framer.next_event(), Command(b"RCPT TO:<b@example.org>"))
        self.assertEqual(framer.next_event(), Command(b"DATA"))
        self.assertIsNone(framer.next_event())
        self.assertEqual(framer.buffered, 0)

    def test_flood_without_line_end_is_reported_after_max_skip(self) -> None:
        """Guards item 11: past max_skip bytes without a line end the framer says
        flood (the server then closes with 421); a line end before resets it."""
        framer = SMTPFramer(max_command_line=10, max_skip=100)
        framer.receive_data(b"x" * 60)
        self.assertIsNone(framer.next_event())
        framer.receive_data(b"x" * 30 + b"\r\n")
        self.assertEqual(framer.next_event(), CommandTooLong())
        framer.receive_data(b"x" * 60)
        self.assertIsNone(framer.next_event())
        framer.receive_data(b"x" * 60)
        self.assertEqual(framer.next_event(), CommandTooLong(flood=True))
        self.assertEqual(framer.buffered, 0)

    def test_partial_line_waits_for_line_end(self) -> None:
        framer = SMTPFramer()
        framer.receive_data(b"NO")
        self.assertIsNone(framer.next_event())
        framer.receive_data(b"OP\r")
        self.assertIsNone(framer.next_event())
        framer.receive_data(b"\n")
        self.assertEqual(framer.next_event(), Command(b"NOOP"))

    def test_bare_lf_ends_command_line(self) -> None:
        self.assertEqual(
            run_session([b"HELO a\nNOOP\r\n"]),
            [Command(b"HELO a", bare_lf=True), Command(b"NOOP")],
        )

    def test_only_one_trailing_cr_is_stripped(self) -> None:
        self.assertEqual(run_session([b"NOOP\r\r\n"]), [Command(b"NOOP\r")])

    def test_empty_line_is_an_empty_command(self) -> None:
        self.assertEqual(run_session([b"\r\n"]), [Command(b"")])

    def test_starttls_discards_pipelined_plaintext(self) -> None:
        framer = SMTPFramer()
        injected = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<x@example.org>\r\n"
        framer.receive_data(b"STARTTLS\r\n" + injected)
        self.assertEqual(framer.next_event(), Command(b"STARTTLS"))
        self.assertEqual(framer.discard_buffer(), injected)
        self.assertIsNone(framer.next_event())
        self.assertEqual(framer.buffered, 0)
        framer.receive_data(b"EHLO tls.example\r\n")
        self.assertEqual(framer.next_event(), Command(b"EHLO tls.example"))

    def test_line_at_limit_is_accepted(self) -> None:
        framer = SMTPFramer(max_command_line=10)
        self.assertEqual(
            run_session([b"x" * 10 + b"\r\n", b"y" * 10 + b"\n"], framer),
            [Command(b"x" * 10), Command(b"y" * 10, bare_lf=True)],
        )

    def test_overlong_command_then_next_command_parses(self) -> None:
        for line_end in (b"\r\n", b"\n"):
            framer = SMTPFramer(max_command_line=10)
            events = run_session([b"x" * 11 + line_end + b"NOOP\r\n"], framer)
            self.assertEqual(events, [CommandTooLong(), Command(b"NOOP")])

    def test_overlong_command_memory_is_bounded(self) -> None:
        framer = SMTPFramer(max_command_line=10)
        events = []
        for _ in range(1000):
            framer.receive_data(b"z" * 7)
            events += drain(framer)
            self.assertLessEqual(framer.buffered, 12)
        self.assertEqual(events, [])
        framer.receive_data(b"zz\r\nQUIT\r\n")
        self.assertEqual(drain(framer), [CommandTooLong(), Command(b"QUIT")])

    def test_overlong_command_byte_by_byte(self) -> None:
        framer = SMTPFramer(max_command_line=4)
        events = run_session(byte_chunks(b"abcdefgh\r\nabcd\r\nabcde\r\n"), framer)
        self.assertEqual(events, [CommandTooLong(), Command(b"abcd"), CommandTooLong()])

    @given(
        lines=st.lists(
            st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=10
        ),
        sizes=chunk_sizes,
    )
    def test_chunking_does_not_change_commands(
        self, lines: list[bytes], sizes: list[int]
    ) -> None:
        stream = b"".join(line + b"\r\n" for line in lines)
        framer = SMTPFramer(max_command_line=8)
        events: list[Event] = []
        pos = 0
        for size in sizes:
            framer.receive_data(stream[pos : pos + size])
            pos += size
            events += drain(framer)
        framer.receive_data(stream[pos:])
        events += drain(framer)
        expected = [
            Command(line) if len(line) <= 8 else CommandTooLong() for line in lines
        ]
        self.assertEqual(events, expected)


class DataFramingTests(SynchronousTestCase):
    def test_in_data_follows_mode(self) -> None:
        framer = SMTPFramer()
        self.assertFalse(framer.in_data)
        framer.start_data()
        self.assertTrue(framer.in_data)
        self.assertRaises(RuntimeError, framer.start_data)
        framer.receive_data(b"hi\r\n.\r\n")
        self.assertEqual(framer.next_event(), DataContent(b"hi\r\n"))
        self.assertTrue(framer.in_data)
        self.assertEqual(framer.next_event(), DataEnd(overlong_line=False, size=4))
        self.assertFalse(framer.in_data)

    def test_empty_message(self) -> None:
        events = feed_data(b".\r\n")
        self.assertEqual(events, [DataEnd(overlong_line=False, size=0)])

    def test_empty_message_byte_by_byte(self) -> None:
        events = feed_data(b".\r\nQUIT\r\n", [1] * 9)
        self.assertEqual(
            events, [DataEnd(overlong_line=False, size=0), Command(b"QUIT")]
        )

    def test_single_empty_line(self) -> None:
        events = feed_data(b"\r\n.\r\n")
        self.assertEqual(
            events, [DataContent(b"\r\n"), DataEnd(overlong_line=False, size=2)]
        )

    def test_dot_unstuffing(self) -> None:
        wire = b"..leading\r\nmid.dle\r\n...two\r\n..\r\n.x\r\n.\r\n"
        events = feed_data(wire)
        self.assertEqual(
            content_of(events), b".leading\r\nmid.dle\r\n..two\r\n.\r\nx\r\n"
        )
        self.assertEqual(len(ends_of(events)), 1)

    def test_dot_then_bare_cr_at_start_is_stuffing(self) -> None:
        self.assertEqual(content_of(feed_data(b".\rx\r\n.\r\n")), b"\r\nx\r\n")

    def test_terminator_at_every_split_point(self) -> None:
        wire = b"Subject: t\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n"
        expected = [
            b"Subject: t\r\n\r\n.dot\r\nbody\r\n",
            [DataEnd(overlong_line=False, size=26)],
            [Command(b"QUIT")],
        ]
        for split in range(len(wire) + 1):
            events = feed_data(wire, [split])
            self.assertEqual(
                [
                    content_of(events),
                    ends_of(events),
                    [e for e in events if isinstance(e, Command)],
                ],
                expected,
                f"split at {split}",
            )
            self.assertIsInstance(events[-2], DataEnd)

    def test_byte_by_byte(self) -> None:
        wire = b"..a\r\nb\r\n.\r\nMAIL FROM:<a@example.org>\r\n"
        events = feed_data(wire, [1] * len(wire))
        self.assertEqual(content_of(events), b".a\r\nb\r\n")
        self.assertEqual(
            events[-2:],
            [
                DataEnd(overlong_line=False, size=7),
                Command(b"MAIL FROM:<a@example.org>"),
            ],
        )

    def test_smuggling_sequences_do_not_end_data(self) -> None:
        for fake in (
            b"\n.\n",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r.\r",
            b"\n.\r",
            b"\r\n.\r",
        ):
            body = b"first" + fake + b"MAIL FROM:<evil@example.org>\r\nsecond"
            for sizes in ([], [1] * len(body)):
                framer = SMTPFramer()
                events = feed_data(body, sizes, framer)
                self.assertEqual(ends_of(events), [], f"{fake!r} ended DATA")
                self.assertTrue(framer.in_data)
                framer.receive_data(b"\r\n.\r\nMAIL FROM:<a@example.org>\r\n")
                events = drain(framer)
                self.assertEqual(len(ends_of(events)), 1)
                self.assertEqual(events[-1], Command(b"MAIL FROM:<a@example.org>"))

    def test_bare_line_ends_are_normalised_to_crlf(self) -> None:
        events = feed_data(b"a\nb\rc\r\r\n\n.\n.\r\n" + TERMINATOR)
        self.assertEqual(content_of(events), b"a\r\nb\r\nc\r\n\r\n\r\n.\r\n.\r\n\r\n")
        self.assertEqual(len(ends_of(events)), 1)

    def test_dot_after_bare_lf_is_not_unstuffed(self) -> None:
        events = feed_data(b"a\n..b\r\n.\r\n")
        self.assertEqual(content_of(events), b"a\r\n..b\r\n")

    def test_pipelined_commands_after_data_stay_buffered(self) -> None:
        framer = SMTPFramer()
        framer.receive_data(b"DATA\r\nbody\r\n.\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(framer.next_event(), Command(b"DATA"))
        framer.start_data()
        self.assertEqual(framer.next_event(), DataContent(b"body\r\n"))
        self.assertEqual(framer.next_event(), DataEnd(overlong_line=False, size=6))
        self.assertEqual(framer.buffered, len(b"QUIT\r\nNOOP\r\n"))
        self.assertEqual(framer.next_event(), Command(b"QUIT"))
        self.assertEqual(framer.next_event(), Command(b"NOOP"))

    def test_session_with_data(self) -> None:
        events = run_session(
            [b"MAIL FROM:<a@example.org>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"]
        )
        self.assertEqual(
            events,
            [
                Command(b"MAIL FROM:<a@example.org>"),
                Command(b"DATA"),
                DataContent(b"hello\r\n"),
                DataEnd(overlong_line=False, size=7),
                Command(b"QUIT"),
            ],
        )

    def test_content_streams_without_waiting_for_line_end(self) -> None:
        framer = SMTPFramer()
        framer.start_data()
        framer.receive_data(b"x" * 100_000)
        self.assertEqual(drain(framer), [DataContent(b"x" * 100_000)])
        self.assertEqual(framer.buffered, 0)
        framer.receive_data(b"y\r\n.\r")
        self.assertEqual(drain(framer), [DataContent(b"y")])
        self.assertEqual(framer.buffered, 4)
        framer.receive_data(b"\n")
        self.assertEqual(
            drain(framer),
            [DataContent(b"\r\n"), DataEnd(overlong_line=True, size=100_003)],
        )

    def test_overlong_line_flagged_but_data_continues(self) -> None:
        framer = SMTPFramer(max_data_line=10)
        wire = b"short\r\n" + b"x" * 11 + b"\r\nafter\r\n.\r\nQUIT\r\n"
        events = feed_data(wire, framer=framer)
        self.assertEqual(
            content_of(events), b"short\r\n" + b"x" * 11 + b"\r\nafter\r\n"
        )
        self.assertEqual(
            events[-2:], [DataEnd(overlong_line=True, size=27), Command(b"QUIT")]
        )

    def test_line_at_data_limit_is_not_overlong(self) -> None:
        framer = SMTPFramer(max_data_line=10)
        wire = (b"x" * 10 + b"\r\n") * 3 + b"\r\n.\r\n"
        for sizes in ([], [1] * len(wire), [5] * 7):
            events = feed_data(wire, sizes, SMTPFramer(max_data_line=10))
            self.assertEqual(ends_of(events), [DataEnd(overlong_line=False, size=38)])
        self.assertFalse(ends_of(feed_data(wire, framer=framer))[0].overlong_line)

    def test_overlong_line_across_chunks(self) -> None:
        wire = b"ab\r\n" + b"x" * 11 + b"\r\n.\r\n"
        for sizes in ([1] * len(wire), [3, 4, 5], [6]):
            events = feed_data(wire, sizes, SMTPFramer(max_data_line=10))
            self.assertTrue(ends_of(events)[0].overlong_line, sizes)

    def test_overlong_line_inside_a_chunk(self) -> None:
        wire = b"ab\r\n" + b"x" * 11 + b"\r\n" + b"cd\r\n" * 5 + b".\r\n"
        events = feed_data(wire, framer=SMTPFramer(max_data_line=10))
        self.assertTrue(ends_of(events)[0].overlong_line)

    def test_overlong_flag_resets_per_message(self) -> None:
        framer = SMTPFramer(max_data_line=3)
        self.assertTrue(
            ends_of(feed_data(b"xxxx\r\n.\r\n", framer=framer))[0].overlong_line
        )
        self.assertEqual(
            ends_of(feed_data(b"xx\r\n.\r\n", framer=framer)),
            [DataEnd(overlong_line=False, size=4)],
        )

    def test_bare_line_ends_count_as_line_ends_for_length(self) -> None:
        events = feed_data(
            b"xxx\nxxx\rxxx\r\n.\r\n", framer=SMTPFramer(max_data_line=3)
        )
        self.assertFalse(ends_of(events)[0].overlong_line)

    def test_hold_back_is_at_most_four_bytes(self) -> None:
        framer = SMTPFramer()
        framer.start_data()
        for tail in (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r"):
            framer.receive_data(b"data" + tail)
            drain(framer)
            self.assertEqual(framer.buffered, len(tail))
            framer.receive_data(b"!")
            drain(framer)

    def test_large_message_in_big_chunks(self) -> None:
        line = b"y" * 76 + b"\r\n"
        body = b"." + line * 20_000
        wire = stuff(body) + TERMINATOR
        events = feed_data(wire, [65536] * (len(wire) // 65536))
        self.assertEqual(content_of(events), body + b"\r\n")
        self.assertEqual(
            ends_of(events), [DataEnd(overlong_line=False, size=len(body) + 2)]
        )

    @settings(max_examples=300)
    @given(body=bodies, sizes=chunk_sizes)
    def test_stuffed_body_round_trips(self, body: bytes, sizes: list[int]) -> None:
        framer = SMTPFramer()
        events = feed_data(stuff(body) + TERMINATOR + b"NOOP\r\n", sizes, framer)
        self.assertEqual(content_of(events), normalise(body) + b"\r\n")
        self.assertEqual(
            events[-2:],
            [
                DataEnd(overlong_line=False, size=len(normalise(body)) + 2),
                Command(b"NOOP"),
            ],
        )
        self.assertEqual(len(ends_of(events)), 1)
        self.assertFalse(framer.in_data)

    @settings(max_examples=300)
    @given(
        stream=st.one_of(st.binary(max_size=300), interesting_bodies), sizes=chunk_sizes
    )
    def test_no_data_end_without_real_terminator(
        self, stream: bytes, sizes: list[int]
    ) -> None:
        events = feed_data(stream, sizes)
        ends = len(ends_of(events))
        self.assertEqual(ends, 1 if TERMINATOR in b"\r\n" + stream else 0)

    @settings(max_examples=300)
    @given(
        stream=st.one_of(st.binary(max_size=300), interesting_bodies), sizes=chunk_sizes
    )
    def test_data_ends_match_terminators_when_data_restarts(
        self, stream: bytes, sizes: list[int]
    ) -> None:
        framer = SMTPFramer()
        framer.start_data()
        events: list[Event] = []
        pos = 0
        for size in [*sizes, len(stream)]:
            framer.receive_data(stream[pos : pos + size])
            pos += size
            while (event := framer.next_event()) is not None:
                events.append(event)
                if isinstance(event, DataEnd):
                    framer.start_data()
        self.assertEqual(len(ends_of(events)), reference_end_count(stream))
        content = content_of(events)
        self.assertEqual(content.count(b"\r"), content.count(b"\r\n"))
        self.assertEqual(content.count(b"\n"), content.count(b"\r\n"))
        self.assertLessEqual(framer.buffered, 4)


class ParseMailFromTests(SynchronousTestCase):
    def assertParses(
        self, arg: bytes, address: str, params: dict[str, str | None] | None = None
    ) -> None:
        self.assertEqual(parse_mail_from(arg), PathArgument(address, params or {}))

    def assertRejected(self, arg: bytes) -> None:
        self.assertRaises(ParseError, parse_mail_from, arg)

    def test_simple(self) -> None:
        self.assertParses(b"FROM:<alice@example.org>", "alice@example.org")

    def test_keyword_case_and_space_after_colon(self) -> None:
        self.assertParses(b"from: <alice@example.org>", "alice@example.org")
        self.assertParses(b"From:<alice@example.org>  ", "alice@example.org")

    def test_null_reverse_path(self) -> None:
        self.assertParses(b"FROM:<>", "")
        self.assertParses(b"FROM:<> SIZE=10", "", {"SIZE": "10"})

    def test_params(self) -> None:
        self.assertParses(
            b"FROM:<a@example.org> size=123 BODY=8BITMIME SMTPUTF8 AUTH=<> ENVID=x=y",
            "a@example.org",
            {
                "SIZE": "123",
                "BODY": "8BITMIME",
                "SMTPUTF8": None,
                "AUTH": "<>",
                "ENVID": "x=y",
            },
        )

    def test_source_route_is_stripped(self) -> None:
        self.assertParses(
            b"FROM:<@a.example,@b.example:user@d.example>", "user@d.example"
        )

    def test_malformed_source_route(self) -> None:
        for arg in (
            b"FROM:<@a.example user@d.example>",
            b"FROM:<@a.example,b.example:user@d.example>",
            b"FROM:<@:user@d.example>",
            b"FROM:<@a.example:>",
        ):
            self.assertRejected(arg)

    def test_quoted_local_part(self) -> None:
        self.assertParses(b'FROM:<"john doe"@example.org>', '"john doe"@example.org')
        self.assertParses(
            b'FROM:<"a>b\\"c@d"@example.org> SIZE=1',
            '"a>b\\"c@d"@example.org',
            {"SIZE": "1"},
        )

    def test_malformed_quoted_local_part(self) -> None:
        for arg in (
            b'FROM:<"unterminated@example.org>',
            b'FROM:<"a"b@example.org>',
            b'FROM:<"a"@>',
        ):
            self.assertRejected(arg)

    def test_utf8(self) -> None:
        self.assertParses(
            "FROM:<jürgen@bücher.example>".encode(), "jürgen@bücher.example"
        )

    def test_invalid_utf8(self) -> None:
        self.assertRejected(b"FROM:<j\xfcrgen@example.org>")
        self.assertRejected(b"FROM:<a@ex\xc3ample.org>")

    def test_domain_literals(self) -> None:
        self.assertParses(b"FROM:<user@[192.0.2.1]>", "user@[192.0.2.1]")
        self.assertParses(b"FROM:<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]")
        for literal in (
            b"[192.0.2.300]",
            b"[2001:db8::1]",
            b"[IPv6:fe80::1%eth0]",
            b"[x:y]",
            b"[]",
        ):
            self.assertRejected(b"FROM:<user@" + literal + b">")

    def test_missing_brackets_is_tolerated(self) -> None:
        self.assertParses(b"FROM:alice@example.org", "alice@example.org")
        self.assertParses(
            b"FROM:alice@example.org SIZE=5", "alice@example.org", {"SIZE": "5"}
        )

    def test_missing_or_broken_brackets(self) -> None:
        for arg in (
            b"FROM:",
            b"FROM:<a@example.org",
            b"FROM:a@example.org>",
            b"FROM:<a@example.org>x",
        ):
            self.assertRejected(arg)

    def test_wrong_keyword(self) -> None:
        for arg in (
            b"TO:<a@example.org>",
            b"FROM <a@example.org>",
            b"FROM :<a@example.org>",
            b"",
        ):
            self.assertRejected(arg)

    def test_address_without_domain(self) -> None:
        for arg in (
            b"FROM:<alice>",
            b"FROM:<postmaster>",
            b"FROM:<alice@>",
            b"FROM:<@example.org>",
        ):
            self.assertRejected(arg)

    def test_spaces_inside_path(self) -> None:
        for arg in (
            b"FROM:<a b@example.org>",
            b"FROM:<a@exa mple.org>",
            b"FROM:< a@example.org>",
        ):
            self.assertRejected(arg)

    def test_control_characters(self) -> None:
        for char in (b"\r", b"\n", b"\x00", b"\t", b"\x7f", b"\x1b"):
            self.assertRejected(b"FROM:<a" + char + b"b@example.org>")
            self.assertRejected(b"FROM:<ab@example.org> SIZE=1" + char)
        self.assertRejected("FROM:<a\u0085b@example.org>".encode())

    def test_invalid_domains(self) -> None:
        for domain in (
            b"-a.example",
            b"a-.example",
            b"a..example",
            b".example",
            b"a_b.example",
            b"a!.example",
        ):
            self.assertRejected(b"FROM:<x@" + domain + b">")
        self.assertRejected(b"FROM:<x@" + b"a" * 64 + b".example>")

    def test_length_limits(self) -> None:
        self.assertParses(
            b"FROM:<" + b"l" * 64 + b"@example.org>", "l" * 64 + "@example.org"
        )
        # Local parts over RFC 5321's 64 octets (SRS, VERP) are accepted, as
        # Postfix does; only the whole path is limited.
        srs = "SRS0=HHH=TT=sender.example=" + "l" * 60
        self.assertParses(f"FROM:<{srs}@forwarder.example>".encode(),
                          f"{srs}@forwarder.example")
        domain = ".".join(["d" * 61] * 3) + ".example"  # 192 octets
        fits = "l" * (254 - len(domain) - 1) + "@" + domain
        self.assertEqual(len(fits), 254)
        self.assertParses(b"FROM:<" + fits.encode() + b">", fits)
        self.assertRejected(b"FROM:<l" + fits.encode() + b">")

    def test_malformed_params(self) -> None:
        for params in (
            b"=1",
            b"SIZE=",
            b"-SIZE=1",
            b"SI_ZE=1",
            b"SIZE=1 size=2",
            b"BODY=\xc3\xa9",
            b"K\xc3\xa9Y",
        ):
            self.assertRejected(b"FROM:<a@example.org> " + params)


class ParseRcptToTests(SynchronousTestCase):
    def test_simple_with_params(self) -> None:
        self.assertEqual(
            parse_rcpt_to(
                b"TO:<b@example.org> NOTIFY=NEVER ORCPT=rfc822;b@example.org"
            ),
            PathArgument(
                "b@example.org", {"NOTIFY": "NEVER", "ORCPT": "rfc822;b@example.org"}
            ),
        )

    def test_postmaster_without_domain(self) -> None:
        for arg in (
            b"TO:<postmaster>",
            b"to:<PostMaster>",
            b"TO: <Postmaster>",
            b"TO:postmaster",
        ):
            self.assertEqual(parse_rcpt_to(arg), PathArgument("postmaster", {}))

    def test_postmaster_with_domain_is_kept(self) -> None:
        self.assertEqual(
            parse_rcpt_to(b"TO:<Postmaster@Example.org>").address,
            "Postmaster@Example.org",
        )

    def test_rejected(self) -> None:
        for arg in (
            b"TO:<>",
            b"TO:",
            b"TO:<bob>",
            b"FROM:<b@example.org>",
            b"TO:<b@example.org> NOTIFY=NEVER NOTIFY=SUCCESS",
            b"TO:<b@example.org>\r\nRSET",
        ):
            self.assertRaises(ParseError, parse_rcpt_to, arg)

    def test_error_is_a_value_error_with_reason(self) -> None:
        error = self.assertRaises(ParseError, parse_rcpt_to, b"TO:<>")
        self.assertIsInstance(error, ValueError)
        self.assertTrue(str(error))


class AddressHelperTests(SynchronousTestCase):
    def test_split_address(self) -> None:
        self.assertEqual(split_address("Alice@Example.ORG"), ("Alice", "example.org"))
        self.assertEqual(split_address('"a@b"@Example.org'), ('"a@b"', "example.org"))
        self.assertEqual(split_address("postmaster"), ("postmaster", ""))
        self.assertEqual(split_address(""), ("", ""))

    def test_parse_size_param(self) -> None:
        self.assertEqual(parse_size_param("0"), 0)
        self.assertEqual(parse_size_param("26214400"), 26214400)
        for bad in (None, "", "-1", "+1", " 1", "1.5", "1e3", "\u0661", "12a"):
            self.assertRaises(ParseError, parse_size_param, bad)

    def test_parse_size_param_huge(self) -> None:
        self.assertEqual(parse_size_param("9" * 30), 10**30 - 1)
        self.assertRaises(ParseError, parse_size_param, "9" * 5000)


class SanitizeTests(SynchronousTestCase):
    def test_crlf_injection_is_neutralised(self) -> None:
        result = sanitize_header_text(b"evil.example\r\nX-Injected: yes\r\n\r\nbody")
        self.assertNotIn("\r", result)
        self.assertNotIn("\n", result)
        self.assertEqual(result, "evil.example X-Injected: yes body")

    def test_control_characters_removed(self) -> None:
        self.assertEqual(
            sanitize_header_text("a\x00b\tc\x1b[31md\x7fe"), "a b c [31md e"
        )

    def test_non_ascii_replaced(self) -> None:
        self.assertEqual(sanitize_header_text("bücher\u0085"), "b?cher?")
        self.assertEqual(sanitize_header_text(b"b\xc3\xbccher"), "b?cher")
        self.assertEqual(sanitize_header_text(b"bad\xff\xfe"), "bad??")

    def test_collapse_and_truncate(self) -> None:
        self.assertEqual(sanitize_header_text("  a    b  "), "a b")
        self.assertEqual(sanitize_header_text("x" * 500), "x" * 200)
        self.assertEqual(sanitize_header_text("abc def", limit=4), "abc")
        self.assertEqual(sanitize_header_text(""), "")

    @given(st.one_of(st.binary(), st.text()), st.integers(min_value=0, max_value=50))
    def test_output_is_always_safe(self, text: bytes | str, limit: int) -> None:
        result = sanitize_header_text(text, limit)
        self.assertLessEqual(len(result), limit)
        self.assertTrue(all(" " <= char <= "~" for char in result), repr(result))
        self.assertNotIn("  ", result)

    def test_is_valid_helo(self) -> None:
        for good in (
            b"client.example",
            b"[192.0.2.1]",
            b"  x  ",
            "bücher.example".encode(),
        ):
            self.assertTrue(is_valid_helo(good), good)
        for bad in (b"", b"   ", b"a\rb", b"a\nb", b"a\x00", b"a\tb", b"\x7f"):
            self.assertFalse(is_valid_helo(bad), bad)
