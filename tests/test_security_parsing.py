"""Issue 6, parser hardening against a real server: items 9, 11, 12 and 13.

Every test talks to the real service on 127.0.0.1 with raw sockets or real
client libraries; the framers themselves are tested in
tests/test_imap_wire.py and tests/test_smtp_wire.py, and fuzzed in
tests/test_fuzz.py.
"""

from __future__ import annotations

import base64
import email
import os
import re
import socket
from pathlib import Path

from twisted.internet import defer

from mailtwist import mutf7
from mailtwist.imap.wire import MAX_LINE, MAX_SKIP
from tests.imap_support import ALICE, IMAPTestCase, RawIMAP
from tests.support import DOMAIN, PASSWORD, read_some, record_peak


def lines_until_quiet(sock: socket.socket, wait: float = 0.5) -> list[bytes]:
    """The non-empty lines received until the peer is quiet for *wait* seconds."""
    return [line for line in read_some(sock, wait).split(b"\r\n") if line]


class CommandHygieneTests(IMAPTestCase):
    """Item 9 for IMAP and POP3: bare CR, bare LF and NUL in command lines."""

    server_options = {"allow_plaintext_auth": True}

    def test_imap_refuses_bare_line_ends_and_nul(self):
        """Guards item 9 for IMAP: a command line ending in a bare LF, or holding a
        bare CR or NUL, is answered BAD and not executed (no folder appears), and
        the session goes on."""
        def check():
            raw = self.raw(tls=False)
            home = self.server.store.path_for(ALICE)
            before = sorted(os.listdir(home))
            for i, wire in enumerate([b"CREATE one\n", b"CREATE two\rx CREATE three\r\n",
                                      b"CREATE fo\x00ur\r\n", b"CREATE five\r\r\n",
                                      b'CREATE "si\rx"\r\n', b"CREATE {5+}\nseven\r\n"]):
                tag = b"t%d" % i
                raw.send(tag + b" " + wire)
                reply = raw.until(tag)
                self.assertEqual(len(reply), 1, (wire, reply))
                self.assertTrue(reply[0].startswith(tag + b" BAD Bare CR, bare LF or NUL"),
                                (wire, reply))
            self.assertEqual(raw.command(b"n", b"NOOP")[-1], b"n OK NOOP completed.")
            self.assertEqual(sorted(os.listdir(home)), before)
        return self.in_thread(check)

    def test_imap_login_with_bare_lf_is_not_executed(self):
        """Guards item 9 for IMAP: LOGIN on a line ending in bare LF does not log in."""
        def check():
            raw = self.raw(tls=False, login=False)
            raw.send(b'a LOGIN "%s" "%s"\n' % (ALICE.encode(), PASSWORD.encode()))
            self.assertTrue(raw.until(b"a")[-1].startswith(b"a BAD"))
            self.assertTrue(raw.command(b"b", b"SELECT INBOX")[-1].startswith(b"b BAD"))
        return self.in_thread(check)

    def test_imap_idle_and_authenticate_lines_with_bare_lf_cancel(self):
        """Guards item 9 for IMAP continuations: a bare-LF line while IDLE or
        AUTHENTICATE waits ends them with BAD (no login from a bare-LF line)."""
        def check():
            raw = self.raw(tls=False)
            raw.command(b"s", b"SELECT INBOX")
            raw.send(b"i IDLE\r\n")
            self.assertEqual(raw.line(), b"+ idling")
            raw.send(b"DONE\n")
            self.assertEqual(raw.until(b"i")[-1], b"i BAD Expected DONE.")
            raw = self.raw(tls=False, login=False)
            raw.send(b"a AUTHENTICATE PLAIN\r\n")
            self.assertEqual(raw.line(), b"+ ")
            raw.send(base64.b64encode(b"\0%s\0%s" % (ALICE.encode(), PASSWORD.encode()))
                     + b"\n")
            self.assertEqual(raw.until(b"a")[-1], b"a BAD Authentication cancelled.")
            self.assertTrue(raw.command(b"b", b"SELECT INBOX")[-1].startswith(b"b BAD"))
        return self.in_thread(check)

    def test_pop3_refuses_bare_line_ends_and_nul(self):
        """Guards item 9 for POP3: USER/PASS/NOOP lines with a bare LF, bare CR or
        NUL get -ERR and are not executed (no login), CRLF lines still work."""
        def check():
            with socket.create_connection(("127.0.0.1", self.port("pop3")), timeout=10) as sock:
                self.assertTrue(read_some(sock, 0.3).startswith(b"+OK"))
                for wire in (b"USER %s\n" % ALICE.encode(), b"USER %s\rNOOP\r\n" % ALICE.encode(),
                             b"USER %s\x00\r\n" % ALICE.encode()):
                    sock.sendall(wire)
                    self.assertEqual(lines_until_quiet(sock, 0.3),
                                     [(b"-ERR Bare CR, bare LF or NUL in command; lines must end"
                                       b" with CRLF.")], wire)
                # USER was never accepted, so PASS has nothing to go with.
                sock.sendall(b"PASS %s\r\n" % PASSWORD.encode())
                self.assertTrue(lines_until_quiet(sock, 0.3)[0].startswith(b"-ERR"))
                sock.sendall(b"USER %s\r\nPASS %s\r\nSTAT\r\n" % (ALICE.encode(),
                                                                    PASSWORD.encode()))
                replies = lines_until_quiet(sock, 1.0)
                self.assertEqual([r[:3] for r in replies], [b"+OK"] * 3, replies)
        return self.in_thread(check)


class ReceivedHeaderTests(IMAPTestCase):
    """Item 9 for SMTP: client-supplied names in the headers we write."""

    @staticmethod
    def smtp(port: int, lines: list[bytes]) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            received = bytearray(read_some(sock, 0.3))
            sock.sendall(b"".join(lines))  # PIPELINING; QUIT closes
            received += read_some(sock, 5)
            return bytes(received)

    @defer.inlineCallbacks
    def test_helo_reaches_received_header_sanitised(self):
        """Guards item 9: EHLO names with CR, LF, NUL, tab, escape sequences,
        non-ASCII and 1,500 octets never put a line break, a control or a
        non-ASCII octet into the Received header, which stays a bounded size;
        command lines with CR, LF or NUL are refused before they are a name."""
        helos = [b"evil\rX-Injected: yes", b"evil\nX-Injected: yes", b"ev\x00il",
                 "h\u00e9llo.\u4f8b\u3048.test".encode(), b"long-" + b"a" * 1500,
                 b"x\tX-Tab: 1\x7f\x1b[31m"]
        for i, helo in enumerate(helos):
            wire = [b"EHLO " + helo + b"\r\n", b"MAIL FROM:<s@remote.test>\r\n",
                    f"RCPT TO:<alice+h{i}@{DOMAIN}>\r\n".encode(),
                    b"DATA\r\n", b"Subject: helo %d\r\n\r\nbody\r\n.\r\n" % i, b"QUIT\r\n"]
            reply = yield self.in_thread(self.smtp, self.port("smtp"), wire)
            if re.search(rb"[\x00\r\n]", helo):
                self.assertIn(b"\r\n500 5.5.2 ", reply)
                self.assertNotIn(b"250 2.0.0", reply)
            else:
                self.assertIn(b"250 2.0.0", reply, reply)
        sender = '"we ird\\"\\\\x"@r\u00e9mote.test'.encode()
        wire = [b"EHLO c.test\r\n", b"MAIL FROM:<" + sender + b"> SMTPUTF8\r\n",
                f"RCPT TO:<alice+\u00e9@{DOMAIN}>\r\n".encode(), b"DATA\r\n",
                b"Subject: sender\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"]
        reply = yield self.in_thread(self.smtp, self.port("smtp"), wire)
        self.assertIn(b"250 2.0.0", reply)
        files = self.maildir_files(ALICE)
        self.assertEqual(len(files), 4)
        utf8 = [p.read_bytes() for p in files if b"Subject: sender" in p.read_bytes()]
        self.assertEqual(len(utf8), 1)
        self.assertIn(b"Return-Path: <" + sender + b">\n", utf8[0].replace(b"\r\n", b"\n"))
        for path in files:
            raw = path.read_bytes().replace(b"\r\n", b"\n")  # Maildir stores LF
            head = raw.split(b"\n\n", 1)[0]
            self.assertNotIn(b"X-Injected", head)
            self.assertFalse(re.search(rb"(^|\n)X-Tab", head), head)
            match = re.search(rb"Received:(.*?)\n(?=\S)", head, re.DOTALL)
            self.assertIsNotNone(match, head)
            received = match.group(0)[:-1]
            self.assertTrue(received.isascii(), received)
            self.assertIsNone(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", received.replace(
                b"\n\t", b"")), received)
            self.assertEqual(received.count(b"\n"), 2, received)
            self.assertLess(len(received), 600)
            parsed = email.message_from_bytes(raw)
            self.assertEqual(len(parsed.get_all("Received")), 1)
            self.assertIsNone(parsed["X-Injected"])
            self.assertIsNone(parsed["X-Tab"])


class FloodTests(IMAPTestCase):
    """Item 11 for IMAP: over-long commands, floods, absurd literals, APPENDLIMIT."""

    server_options = {"smtp": {"max_message_size": 200_000}}

    def test_overlong_command_is_bad_and_session_goes_on(self):
        """Guards item 11 for IMAP: a command longer than the line limit gets
        BAD at once, the rest of its line is skipped, and the next command runs."""
        def check():
            raw = self.raw()
            raw.send(b"a NOOP " + b"x" * (MAX_LINE + 1000) + b"\r\nb NOOP\r\n")
            self.assertEqual(raw.until(b"a"), [b"a BAD Command line too long."])
            self.assertEqual(raw.until(b"b"), [b"b OK NOOP completed."])
        return self.in_thread(check)

    @defer.inlineCallbacks
    def test_megabytes_without_crlf_close_with_bounded_memory(self):
        """Guards item 11 for IMAP: 5 MB without a line end is answered BAD, then
        BYE once MAX_SKIP bytes are skipped, and the connection closes; the
        framer never holds more than a line plus one read."""
        peaks = record_peak(self.server.listeners["imap"][0].factory,
                            lambda s: s.framer.held)

        def flood():
            with socket.create_connection(("127.0.0.1", self.port("imap")), timeout=10) as sock:
                received = bytearray(read_some(sock, 0.3))
                try:
                    sock.sendall(b"a NOOP ")
                    for _ in range(80):
                        sock.sendall(b"x" * 65536)
                except OSError:
                    pass
                received += read_some(sock, 1.0)
                return bytes(received)
        data = yield self.in_thread(flood)
        lines = data.split(b"\r\n")
        self.assertEqual(lines[1:], [b"a BAD Command line too long.",
                                     b"* BYE Command line too long.", b""])
        self.assertTrue(peaks)
        self.assertLessEqual(max(peaks), MAX_LINE + 2 + 65536)
        self.assertGreater(MAX_SKIP, MAX_LINE)

    def test_absurd_literal_sizes(self):
        """Guards item 11 for IMAP: {4294967295}, {18446744073709551616}, {-1} and
        {99999999999999999999999} get BAD without a "+" continuation and the
        session goes on; a non-synchronising one of no valid size ends it."""
        def check():
            raw = self.raw()
            for i, size in enumerate([b"4294967295", b"18446744073709551616", b"-1",
                                      b"99999999999999999999999", b"1 ", b"x"]):
                tag = b"t%d" % i
                reply = raw.command(tag, b"LOGIN {%s}" % size)
                self.assertEqual(len(reply), 1, reply)
                self.assertTrue(reply[0].startswith(tag + b" BAD"), reply)
                self.assertEqual(raw.command(b"n", b"NOOP"), [b"n OK NOOP completed."])
            raw.send(b"t LOGIN {4294967295+}\r\n")
            self.assertEqual(raw.until(b"t"), [b"t BAD Literal too big."])
            raw.close()
            for size in (b"18446744073709551616+", b"-1+", b"99999999999999999999999+",
                         b"1 +"):
                raw = self.raw()
                raw.send(b"t LOGIN {%s}\r\nn NOOP\r\n" % size)
                self.assertEqual(raw.until(b"t"), [b"t BAD Invalid literal size."])
                self.assertEqual(raw.line(), b"* BYE Cannot resynchronise with the client.")
                self.assertRaises(EOFError, raw.line)
        return self.in_thread(check)

    def test_append_over_the_limit(self):
        """Guards item 11 (RFC 7889): APPENDLIMIT is advertised; APPEND over it is
        NO [TOOBIG] before any literal octet is read (no "+"), and with LITERAL+
        the octets are skipped without being held; nothing is stored."""
        limit = self.config.smtp.max_message_size
        peaks = record_peak(self.server.listeners["imaps"][0].factory,
                            lambda s: s.framer.held)

        def check():
            raw = self.raw()
            caps = raw.command(b"c", b"CAPABILITY")[0]
            self.assertIn(b"APPENDLIMIT=%d" % limit, caps)
            self.assertEqual(raw.command(b"a", b"APPEND INBOX {%d}" % (limit + 1)),
                             [b"a NO [TOOBIG] Message too big (at most %d octets)." % limit])
            raw.send(b"b APPEND INBOX {%d+}\r\n" % (limit * 5))
            self.assertEqual(raw.until(b"b"),
                             [b"b NO [TOOBIG] Message too big (at most %d octets)." % limit])
            for _ in range(5):
                raw.send(b"x" * limit)
            raw.send(b"\r\n")
            self.assertEqual(raw.command(b"n", b"NOOP"), [b"n OK NOOP completed."])
        d = self.in_thread(check)

        def stored(_):
            self.assertEqual(self.maildir_files(ALICE), [])
            self.assertLess(max(peaks), limit // 2)
        d.addCallback(stored)
        return d



def tree(root: Path) -> set[str]:
    """Every path under *root* (relative, directories marked with a trailing '/')."""
    found = set()
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        for name in dirs:
            found.add(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            if not re.fullmatch(r".*\.sqlite-(wal|shm|journal)", name):  # come and go
                found.add(os.path.normpath(os.path.join(rel, name)))
    return found


HOSTILE_NAMES = [
    b'".."', b'"../x"', b'"a/../../b"', b'"/etc"', b'"a//b"', b'"./x"', b'"x/."',
    b'".hidden"', b'"a.b"', b'"..x"', b'"INBOX/../../x"', b'"%"', b'"*"', b'"a\\\\b"',
    b'"&AC4ALg-"', b'"&AC4ALg-/x"', b'"a&AC8-b"', b'"&AC8-etc"', b'"&AAA-"', b'"&AAo-"',
    b'"&ABs-"', b'"&2D0-"', b'"&ANw"', b'"&ANwA3A"', b'"&AGEAYgBj-"',
    b'"&AC4-"', b'"&Jjo-&Jjo-"', b"{3+}\r\na\x00b", b"{3+}\r\na\x01b", b"{4+}\r\na\xc3\xa9b",
    b'"' + b"a" * 250 + b'"',
    b'"' + mutf7.encode("\u00e9" * 150).encode() + b'"',
    b'"' + mutf7.encode("/".join(["\u00e9" * 40] * 8)).encode() + b'"',
]
"""Mailbox names that must never reach the file system as a path outside the
user's Maildir: traversal, Maildir++ separators, NUL and controls (also
hidden in modified UTF-7 shifts), non-canonical and broken mUTF-7, and names
whose directory would be too long."""


class NameTests(IMAPTestCase):
    """Item 12: mailbox names, keywords and address extensions vs the file system."""

    def assert_contained(self, before: set[str], root: Path, home: Path, what) -> set[str]:
        """Only sane paths inside *home* appeared under *root*; the new tree."""
        after = tree(root)
        prefix = os.path.relpath(home, root) + "/"
        for path in after - before:
            self.assertTrue(path.startswith(prefix), (what, path))
            self.assertNotIn("..", path.split("/"), (what, path))
            self.assertIsNone(re.search(r"[\x00-\x1f\x7f]", path), (what, path))
            self.assertTrue((root / path).resolve().is_relative_to(home), (what, path))
        return after

    def test_hostile_mailbox_names_touch_nothing_outside(self):
        """Guards item 12: CREATE, RENAME (both ends), SELECT, STATUS, APPEND,
        COPY, MOVE, SUBSCRIBE and DELETE with traversal names, NUL, controls
        and malicious modified UTF-7 are refused with NO or BAD, and after each
        attempt the file system under the server's temp dir has no new path
        (checked after every command)."""
        def check():
            root = self.data_dir.parent
            raw = self.raw()
            self.assertTrue(raw.command(b"c", b"CREATE Safe")[-1].startswith(b"c OK"))
            raw.command(b"s", b"SELECT INBOX")
            raw.send(b"a APPEND INBOX {6+}\r\nhello\n\r\n")
            self.assertTrue(raw.until(b"a")[-1].startswith(b"a OK"))
            before = tree(root)
            for i, name in enumerate(HOSTILE_NAMES):
                for command in (b"CREATE %s", b"RENAME Safe %s", b"RENAME %s Other",
                                b"SELECT %s", b"EXAMINE %s", b"STATUS %s (MESSAGES)",
                                b"APPEND %s {2+}\r\nhi", b"COPY 1 %s", b"MOVE 1 %s",
                                b"SUBSCRIBE %s", b"DELETE %s", b"SELECT INBOX"):
                    tag = b"t%d" % i
                    reply = raw.command(tag, command.replace(b"%s", name))
                    if command != b"SELECT INBOX":
                        self.assertRegex(reply[-1], rb"^t\d+ (NO|BAD) ", (name, command, reply))
                    self.assertEqual(tree(root), before, (name, command))
            self.assertEqual(raw.command(b"n", b"NOOP")[-1], b"n OK NOOP completed.")
        return self.in_thread(check)

    def test_hostile_keywords_stay_keywords(self):
        """Guards item 12 for keywords: STORE and APPEND with keywords holding
        '/', ':', '..', ',' or a Maildir flag separator only change the message
        file's flag letters and dovecot-keywords; every file stays a sane path
        inside the Maildir, and the keywords read back unchanged."""
        def check():
            root = self.data_dir.parent
            home = self.server.store.path_for(ALICE)
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            raw.send(b"a APPEND INBOX (../../x) {6+}\r\nhello\n\r\n")
            self.assertTrue(raw.until(b"a")[-1].startswith(b"a OK"))
            before = self.assert_contained(tree(root), root, home, "append")
            dirs = {p for p in before if p.endswith("/")}
            keywords = [b"a/b", b"../../etc", b"c:d", b":2,S", b"x,y", b"..", b"/", b"~/.ssh"]
            for i, keyword in enumerate(keywords):
                reply = raw.command(b"k%d" % i, b"STORE 1 +FLAGS (%s)" % keyword)
                self.assertTrue(reply[-1].startswith(b"k%d OK" % i), reply)
                before = self.assert_contained(before, root, home, keyword)
                self.assertEqual({p for p in before if p.endswith("/")}, dirs, keyword)
            reply = raw.command(b"f", b"FETCH 1 FLAGS")
            for keyword in [b"../../x", *keywords]:
                self.assertIn(keyword, reply[0])
            for path in (home / "cur").iterdir():
                self.assertRegex(path.name, r"^[^/]+:2,[A-Za-z]*$")
        return self.in_thread(check)

    @defer.inlineCallbacks
    def test_address_extensions_land_in_the_inbox(self):
        """Guards item 12 for address extensions: mail to alice+../../x@,
        alice+a/b@, alice+.Sent@ and alice+..@ is delivered to alice's INBOX
        and creates no path outside her Maildir nor any folder."""
        root = self.data_dir.parent
        home = self.server.store.path_for(ALICE)
        self.deliver(b"Subject: first\r\n\r\nhi\r\n")
        before = tree(root)
        extensions = ["../../x", "a/b", ".Sent", "..", "../../../../tmp/evil", "a/../../b"]
        wire = b"EHLO c.test\r\n"
        for extension in extensions:
            wire += (b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice+%s@%s>\r\nDATA\r\n"
                     b"Subject: ext\r\n\r\nbody\r\n.\r\n" % (extension.encode(), DOMAIN.encode()))
        wire += b"QUIT\r\n"
        reply = yield self.in_thread(ReceivedHeaderTests.smtp, self.port("smtp"), [wire])
        self.assertEqual(reply.count(b"250 2.0.0"), len(extensions), reply)
        after = self.assert_contained(before, root, home, "smtp")
        self.assertEqual({p for p in after - before if p.endswith("/")}, set())
        self.assertEqual(len(self.maildir_files(ALICE)), len(extensions) + 1)
        self.assertFalse(os.path.exists("/tmp/evil"))


def deep_multipart(depth: int) -> bytes:
    """*depth* multiparts, each the only part of the one above."""
    head = b"".join(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\nMIME-Version: 1.0\r\n" + head + b"\r\ninnermost" + tail


def deep_messages(depth: int) -> bytes:
    """*depth* message/rfc822 parts, each the body of the one above."""
    return (b"Subject: nested\r\nMIME-Version: 1.0\r\n"
            + b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" * depth + b"\r\nbody\r\n")


def many_parts(count: int) -> bytes:
    return (b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b"
            b"\r\n\r\n" + b"--b\r\n\r\nx\r\n" * count + b"--b--\r\n")


def many_parameters(count: int) -> bytes:
    params = b"".join(b";\r\n p%d=v%d" % (i, i) for i in range(count))
    return (b"Subject: params\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b"
            + params + b"\r\n\r\n--b\r\nContent-Type: text/plain" + params
            + b"\r\nContent-Disposition: attachment" + params + b"\r\n\r\nx\r\n--b--\r\n")


def huge_header_line(size: int) -> bytes:
    return (b"From: " + b"a" * size + b"@example.test\r\nTo: " + b"<b@x>, " * (size // 7)
            + b"\r\nSubject: " + b"s" * size + b"\r\nContent-Type: text/plain; charset=\""
            + b"c" * size + b"\"\r\n\r\nbody\r\n")


def paren_depth(data: bytes) -> int:
    """Deepest parenthesis nesting outside quoted strings (literals are rare here)."""
    depth = deepest = 0
    quoted = escaped = False
    for byte in data:
        if quoted:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                quoted = False
        elif byte == 0x22:
            quoted = True
        elif byte == 0x28:
            depth += 1
            deepest = max(deepest, depth)
        elif byte == 0x29:
            depth -= 1
    return deepest


class MimeBombTests(IMAPTestCase):
    """Item 13: hostile MIME over a real IMAP session."""

    def fetch_all(self, raw: RawIMAP, seq: int) -> dict[bytes, bytes]:
        """BODYSTRUCTURE, BODY, ENVELOPE, a deep section and the session after."""
        replies = {}
        for tag, item in ((b"bs", b"BODYSTRUCTURE"), (b"b", b"BODY"), (b"e", b"ENVELOPE"),
                          (b"s", b"BODY.PEEK[" + b".".join([b"1"] * 10000) + b"]"),
                          (b"m", b"BODY.PEEK[" + b".".join([b"1"] * 90) + b".MIME]"),
                          (b"h", b"BODY.PEEK[HEADER]"), (b"t", b"BODY.PEEK[1.TEXT]")):
            reply = raw.command(tag, b"FETCH %d %s" % (seq, item))
            self.assertEqual(reply[-1], tag + b" OK FETCH completed.", (seq, item[:40]))
            self.assertFalse(any(line.startswith(b"* BAD") for line in reply), reply[:1])
            replies[tag] = b"\r\n".join(reply[:-1])
        self.assertEqual(raw.command(b"n", b"NOOP")[-1], b"n OK NOOP completed.")
        return replies

    def test_bombs_are_capped_and_the_session_stays_usable(self):
        """Guards item 13: 10,000-deep multiparts and message/rfc822s, 100,000
        parts, 100,000 parameters and 1 MB header lines are answered (FETCH
        BODYSTRUCTURE, BODY, ENVELOPE, BODY[1.1.1...]) with a structure capped
        at MAX_DEPTH nesting and MAX_PARTS parts, never an internal error, and
        the session goes on."""
        from mailtwist.imap.mime import MAX_DEPTH, MAX_PARTS
        bombs = [deep_multipart(10_000), deep_messages(10_000), many_parts(100_000),
                 many_parameters(100_000), huge_header_line(1024 * 1024)]
        for bomb in bombs:
            self.deliver(bomb)

        def check():
            raw = self.raw()
            raw.command(b"x", b"EXAMINE INBOX")
            results = [self.fetch_all(raw, seq) for seq in range(1, len(bombs) + 1)]
            return results
        d = self.in_thread(check)

        def verify(results):
            deep, nested, parts, params, header = results
            for tag in (b"bs", b"b"):
                self.assertLessEqual(paren_depth(deep[tag]), MAX_DEPTH + 5)
                self.assertGreaterEqual(paren_depth(deep[tag]), MAX_DEPTH // 2)
                self.assertLessEqual(paren_depth(nested[tag]), 3 * MAX_DEPTH + 10)
                # One '"text" "plain"' (or octet-stream) per part, at most MAX_PARTS.
                leaves = len(re.findall(rb'\("text" "plain"', parts[tag]))
                self.assertGreater(leaves, 100)
                self.assertLessEqual(leaves, MAX_PARTS)
                self.assertIn(b'"p99"', params[tag])
            self.assertIn(b"ENVELOPE", header[b"e"])
        d.addCallback(verify)
        return d
