"""Black-box RFC 3501 compliance checks found by driving the server by hand:
corners of the grammar that real clients and compliance suites reach."""

from __future__ import annotations

from twisted.internet import defer

from tests.imap_support import IMAPTestCase, message, ok


class HeaderListLiteralTests(IMAPTestCase):
    """``header-fld-name = astring``: a header name may come as a literal."""

    @defer.inlineCallbacks
    def test_header_fields_name_as_literal(self):
        """BODY[HEADER.FIELDS (From {7+}Subject)] is answered, not refused as
        an unbalanced '[' (guards the literal splice in wire.tokenize)."""
        self.deliver(message("literal names"))

        def run():
            raw = self.raw()
            assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
            plus = raw.command(
                b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (From {7+}\r\nSubject)] UID)")
            raw.send(b"g FETCH 1 (BODY.PEEK[HEADER.FIELDS ({7}\r\n")
            cont = raw.line()
            raw.send(b"Subject)])\r\n")
            sync = raw.until(b"g")
            return plus, cont, sync

        plus, cont, sync = yield self.in_thread(run)
        self.assertEqual(plus[-1], b"f OK FETCH completed.")
        self.assertTrue(plus[0].startswith(b"* 1 FETCH (BODY[HEADER.FIELDS (FROM SUBJECT)] {"),
                        plus)
        self.assertIn(b"\r\nFrom: Carol <carol@example.test>\r\nSubject: literal names\r\n\r\n",
                      plus[0])
        self.assertTrue(plus[0].endswith(b" UID 1)"), plus)
        self.assertTrue(cont.startswith(b"+ "), cont)
        self.assertEqual(sync[-1], b"g OK FETCH completed.")
        self.assertIn(b"BODY[HEADER.FIELDS (SUBJECT)] {", sync[0])
        self.assertIn(b"Subject: literal names\r\n\r\n", sync[0])


class SelectResponseTests(IMAPTestCase):
    """What SELECT and EXAMINE must say (RFC 3501 6.3.1, RFC 7162 3.1.2.1)."""

    def test_highestmodseq_on_every_select_and_examine(self):
        """A server that persists MODSEQs sends [HIGHESTMODSEQ] on every SELECT
        and EXAMINE, even when the client never enabled CONDSTORE (as Dovecot)."""
        self.deliver(message("modseq"))

        def check():
            client = self.imap()
            ok(client.select("INBOX"))
            selected = client.untagged_responses.get("HIGHESTMODSEQ")
            ok(client.select("INBOX", readonly=True))
            examined = client.untagged_responses.get("HIGHESTMODSEQ")
            return selected, examined

        def verify(result):
            selected, examined = result
            self.assertIsNotNone(selected)
            self.assertGreaterEqual(int(selected[-1]), 1)
            self.assertIsNotNone(examined)
            self.assertEqual(examined[-1], selected[-1])

        return self.in_thread(check).addCallback(verify)


class HeaderListEchoTests(IMAPTestCase):
    """The header list echoed in BODY[HEADER.FIELDS (...)] stays valid syntax."""

    def test_names_that_are_not_atoms_are_echoed_quoted(self):
        """("X Y" Subject) comes back as ("X Y" SUBJECT), not as three names, and
        a name with a quote stays a quoted string that IMAPClient can parse."""
        self.deliver(message("echo"))

        def check():
            raw = self.raw()
            raw.command(b"s", b"SELECT INBOX")
            spaced = raw.command(b"f", b'FETCH 1 (BODY.PEEK[HEADER.FIELDS ("X Y" Subject)])')
            quoted = raw.command(b"g", b'FETCH 1 (BODY.PEEK[HEADER.FIELDS ("X\\"Y")])')
            with self.imapclient() as client:
                client.select_folder("INBOX")
                parsed = client.fetch([1], ['BODY.PEEK[HEADER.FIELDS ("X Y" SUBJECT)]'])
            return spaced, quoted, parsed

        def verify(result):
            spaced, quoted, parsed = result
            self.assertTrue(spaced[0].startswith(
                b'* 1 FETCH (BODY[HEADER.FIELDS ("X Y" SUBJECT)] {'), spaced)
            self.assertTrue(quoted[0].startswith(
                b'* 1 FETCH (BODY[HEADER.FIELDS ("X\\"Y")] {2}'), quoted)
            self.assertEqual(quoted[-1], b"g OK FETCH completed.")
            self.assertEqual(parsed[1][b'BODY[HEADER.FIELDS ("X Y" SUBJECT)]'],
                             b"Subject: echo\r\n\r\n")

        return self.in_thread(check).addCallback(verify)


class CopyOrderTests(IMAPTestCase):
    """UIDPLUS COPYUID (RFC 4315): copies are numbered in source order."""

    def test_copy_of_older_mail_keeps_source_order(self):
        """Guards UID order on COPY: the copies keep each message's INTERNALDATE
        (older and older here, against UID order), yet copy n gets the n-th new
        UID, as with Dovecot."""
        def check():
            client = self.imap()
            for n, date in enumerate(("01-Jan-2026", "01-Jan-2020", "01-Jan-2010")):
                ok(client.append("INBOX", "(\\Seen)", f'"{date} 12:00:00 +0000"',
                                 message(f"m{n}")))
            ok(client.select("INBOX"))
            return ok(client.copy("1:3", "Archive"))

        def verify(reply):
            code = reply[0].split(b"]")[0]
            self.assertTrue(code.startswith(b"[COPYUID "), reply)
            _, _, source, target = code.split()
            self.assertEqual((source, target), (b"1:3", b"1:3"))

        return self.in_thread(check).addCallback(verify)
