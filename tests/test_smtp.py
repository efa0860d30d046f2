"""SMTP, submission and submissions against the real service, with real clients."""

from __future__ import annotations

import smtplib
import socket
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import (
    DOMAIN,
    PASSWORD,
    ServerMixin,
    client_tls_context,
    raw_exchange,
    read_some,
    require_program,
)

MESSAGE = (b"From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: hello\r\n"
           b"\r\nHello Alice.\r\n.leading dot line\r\n")


def send_port25(port: int, rcpts: list[str], message: bytes = MESSAGE,
                sender: str = "sender@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.remote.test")
        return client.sendmail(sender, rcpts, message)


class InboundTests(ServerMixin, unittest.TestCase):
    """Port 25: mail from the world for our domains only."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_delivers_to_user_with_trace_headers(self):
        refused = yield self.in_thread(send_port25, self.port("smtp"), [f"alice@{DOMAIN}"])
        self.assertEqual(refused, {})
        [path] = self.maildir_files(f"alice@{DOMAIN}")
        self.assertEqual(path.parent.name, "new")
        content = path.read_bytes()
        self.assertTrue(content.startswith(b"Return-Path: <sender@remote.test>\n"
                                           b"Delivered-To: alice@example.test\n"
                                           b"Received: from client.remote.test ([127.0.0.1])\n"))
        self.assertIn(b"with ESMTP id ", content)
        self.assertIn(b"\n.leading dot line\n", content)
        self.assertNotIn(b"\r\n", content)

    @defer.inlineCallbacks
    def test_alias_catch_all_and_plus_address(self):
        self.directory.add_alias(f"team@{DOMAIN}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"])
        self.directory.add_alias(f"@{DOMAIN}", [f"bob@{DOMAIN}"])
        port = self.port("smtp")
        yield self.in_thread(send_port25, port, [f"team@{DOMAIN}"])
        yield self.in_thread(send_port25, port, [f"whoever@{DOMAIN}"])
        yield self.in_thread(send_port25, port, [f"alice+lists@{DOMAIN}"])
        alice = self.maildir_files(f"alice@{DOMAIN}")
        bob = self.maildir_files(f"bob@{DOMAIN}")
        self.assertEqual(len(alice), 2)
        self.assertEqual(len(bob), 2)
        delivered_to = sorted(p.read_bytes().split(b"\n")[1] for p in alice + bob)
        self.assertEqual(delivered_to, [b"Delivered-To: alice+lists@example.test",
                                        b"Delivered-To: team@example.test",
                                        b"Delivered-To: team@example.test",
                                        b"Delivered-To: whoever@example.test"])

    @defer.inlineCallbacks
    def test_postmaster_always_accepted(self):
        yield self.in_thread(send_port25, self.port("smtp"), ["postmaster", f"postmaster@{DOMAIN}"])
        self.assertEqual(len(self.maildir_files(f"alice@{DOMAIN}")), 1)

    def _rcpt_reply(self, port, rcpt):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.remote.test")
            client.mail("sender@remote.test")
            return client.rcpt(rcpt)

    @defer.inlineCallbacks
    def test_relay_refused(self):
        code, text = yield self.in_thread(self._rcpt_reply, self.port("smtp"), "victim@other.test")
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.7.1 "), text)
        self.assertIn(b"Relay access denied", text)

    @defer.inlineCallbacks
    def test_unknown_user(self):
        code, text = yield self.in_thread(self._rcpt_reply, self.port("smtp"), f"nobody@{DOMAIN}")
        self.assertEqual((code, text[:6]), (550, b"5.1.1 "))

    @defer.inlineCallbacks
    def test_no_auth_on_port_25(self):
        def ehlo():
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.ehlo("c.test")
                return client.esmtp_features
        features = yield self.in_thread(ehlo)
        self.assertNotIn("auth", features)
        for name in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
                     "starttls"):
            self.assertIn(name, features)
        self.assertEqual(features["size"], str(self.config.smtp.max_message_size))

    @defer.inlineCallbacks
    def test_size_enforced_at_mail_and_in_data(self):
        limit = self.config.smtp.max_message_size = 2000

        def attempt():
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.ehlo("c.test")
                declared = client.mail("s@remote.test", [f"SIZE={limit + 1}"])
                client.rset()
                client.mail("s@remote.test")
                client.rcpt(f"alice@{DOMAIN}")
                big = client.data(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 40)
                return declared, big
        declared, big = yield self.in_thread(attempt)
        self.assertEqual(declared[0], 552)
        self.assertEqual((big[0], big[1][:6]), (552, b"5.3.4 "))
        self.assertEqual(self.maildir_files(f"alice@{DOMAIN}"), [])

    @defer.inlineCallbacks
    def test_pipelined_replies_in_order(self):
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
            b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        ])
        codes = [line[:3] for line in data.split(b"\r\n")
                 if line[:3].isdigit() and line[3:4] == b" "]
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"550", b"250", b"354",
                                 b"250", b"221"])
        self.assertEqual(len(self.maildir_files(f"bob@{DOMAIN}")), 1)

    @defer.inlineCallbacks
    def test_bare_lf_smuggling_yields_one_message(self):
        smuggle = (b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<evil@remote.test>\n"
                   b"RCPT TO:<bob@example.test>\nDATA\nSubject: smuggled\n\nhi\n.\n"
                   b"still first\r\n.\r\n")
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO c.test\r\n", b"MAIL FROM:<s@remote.test>\r\n",
            b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n", smuggle, b"QUIT\r\n"])
        self.assertIn(b"250 2.0.0 Ok: queued", data)
        self.assertEqual(self.maildir_files(f"bob@{DOMAIN}"), [])
        [path] = self.maildir_files(f"alice@{DOMAIN}")
        self.assertIn(b"Subject: smuggled", path.read_bytes())

    @defer.inlineCallbacks
    def test_starttls_discards_pipelined_plaintext(self):
        port = self.port("smtp")

        def inject():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                read_some(sock)
                sock.sendall(b"EHLO c.test\r\n")
                read_some(sock)
                sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nNOOP\r\n")
                reply = sock.recv(4096)
                tls = client_tls_context().wrap_socket(sock)
                tls.sendall(b"EHLO c.test\r\n")
                after = read_some(tls)
                tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
                rcpt = read_some(tls)
                return reply, after, rcpt
        reply, after, rcpt = yield self.in_thread(inject)
        self.assertTrue(reply.startswith(b"220 2.0.0"), reply)
        self.assertTrue(after.startswith(b"250-mx.example.test"), after)
        self.assertNotIn(b"STARTTLS", after)
        self.assertTrue(rcpt.startswith(b"503 5.5.1"), rcpt)

    @defer.inlineCallbacks
    def test_disk_error_is_temporary_and_leaves_no_file(self):
        maildir = self.server.store.maildir(f"alice@{DOMAIN}")
        tmp = maildir.root / "tmp"
        tmp.rmdir()
        tmp.write_text("not a directory")

        def send():
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
                client.ehlo("c.test")
                client.mail("s@remote.test")
                client.rcpt(f"bob@{DOMAIN}")
                client.rcpt(f"alice@{DOMAIN}")
                return client.data(MESSAGE)
        code, text = yield self.in_thread(send)
        self.assertEqual(code // 100, 4)
        self.assertTrue(text.startswith(b"4."), text)
        self.assertEqual(self.maildir_files(f"alice@{DOMAIN}"), [])
        self.assertEqual(self.maildir_files(f"bob@{DOMAIN}"), [])

    @defer.inlineCallbacks
    def test_overlong_command_and_garbage(self):
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO " + b"a" * 5000 + b"\r\n", b"FOO\r\n", b"MAIL FROM:<>\r\n",
            b"MAIL FROM:<a@b.test> XYZ=1\r\n", b"RCPT TO:<alice@example.test>\r\n",
            b"EHLO c.test\r\n", b"MAIL FROM:<a b@c>\r\n", b"QUIT\r\n"])
        lines = [line for line in data.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual([line[:9] for line in lines], [
            b"220 mx.ex", b"500 5.5.2", b"500 5.5.2", b"503 5.5.1", b"503 5.5.1",
            b"503 5.5.1", b"250 SMTPU", b"501 5.5.4", b"221 2.0.0"])

    @defer.inlineCallbacks
    def test_directory_changes_seen_without_restart(self):
        from mailtwist.directory import FileDirectory
        cli_view = FileDirectory(self.data_dir)
        cli_view.bcrypt_rounds = 4
        cli_view.add_account(f"carol@{DOMAIN}", PASSWORD)
        code, _ = yield self.in_thread(self._rcpt_reply, self.port("smtp"), f"carol@{DOMAIN}")
        self.assertEqual(code, 250)
        cli_view.delete_account(f"carol@{DOMAIN}")
        code, _ = yield self.in_thread(self._rcpt_reply, self.port("smtp"), f"carol@{DOMAIN}")
        self.assertEqual(code, 550)


class SubmissionTests(ServerMixin, unittest.TestCase):
    """Ports 587 and 465: our users, AUTH only under TLS."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_auth_refused_before_tls_and_accepted_after(self):
        def session():
            with smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=10) as client:
                client.ehlo("c.test")
                before = dict(client.esmtp_features)
                plain_attempt = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
                mail_before = client.docmd("MAIL", "FROM:<alice@example.test>")
                client.starttls(context=client_tls_context())
                client.ehlo("c.test")
                after = dict(client.esmtp_features)
                login = client.login(f"alice@{DOMAIN}", PASSWORD)
                refused = client.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], MESSAGE)
                return before, plain_attempt, mail_before, after, login, refused
        before, plain_attempt, mail_before, after, login, refused = yield self.in_thread(session)
        self.assertNotIn("auth", before)
        self.assertEqual(plain_attempt[0], 538)
        self.assertEqual(mail_before[0], 530)
        self.assertEqual(after["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertEqual(login[0], 235)
        self.assertEqual(refused, {})
        [path] = self.maildir_files(f"bob@{DOMAIN}")
        self.assertIn(b"with ESMTPSA id", path.read_bytes())

    @defer.inlineCallbacks
    def test_implicit_tls_login_methods_and_failures(self):
        def session(method):
            with smtplib.SMTP_SSL("127.0.0.1", self.port("submissions"), timeout=10,
                                  context=client_tls_context()) as client:
                client.ehlo("c.test")
                client.user, client.password = f"alice@{DOMAIN}", PASSWORD
                code, _ = client.auth(method, getattr(client, "auth_" + method.lower()),
                                      initial_response_ok=False)
                return code
        for method in ("PLAIN", "LOGIN"):
            code = yield self.in_thread(session, method)
            self.assertEqual(code, 235)

        def bad():
            with smtplib.SMTP_SSL("127.0.0.1", self.port("submissions"), timeout=10,
                                  context=client_tls_context()) as client:
                client.ehlo("c.test")
                try:
                    client.login(f"alice@{DOMAIN}", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    wrong = e.smtp_code
                try:
                    client.login(f"nobody@{DOMAIN}", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    unknown = e.smtp_code
                return wrong, unknown
        self.assertEqual((yield self.in_thread(bad)), (535, 535))

    @defer.inlineCallbacks
    def test_sender_must_belong_to_user(self):
        def session():
            with smtplib.SMTP_SSL("127.0.0.1", self.port("submissions"), timeout=10,
                                  context=client_tls_context()) as client:
                client.login(f"alice@{DOMAIN}", PASSWORD)
                forged = client.docmd("MAIL", f"FROM:<bob@{DOMAIN}>")
                client.rset()
                plus = client.docmd("MAIL", f"FROM:<alice+x@{DOMAIN}>")
                client.rset()
                own = client.docmd("MAIL", "FROM:<alice@example.test>")
                remote_rcpt = client.docmd("RCPT", "TO:<someone@other.test>")
                return forged, plus, own, remote_rcpt
        forged, plus, own, remote_rcpt = yield self.in_thread(session)
        self.assertEqual(forged[0], 553)
        self.assertEqual(plus[0], 250)
        self.assertEqual(own[0], 250)
        self.assertEqual(remote_rcpt, (250, b"2.1.5 Ok"))

    @defer.inlineCallbacks
    def test_swaks_submission_with_starttls_and_auth(self):
        swaks = require_program(self, "swaks")
        result = yield self.in_thread(subprocess.run, [
            swaks, "--server", f"127.0.0.1:{self.port('submission')}", "--tls",
            "--auth", "PLAIN", "--auth-user", f"alice@{DOMAIN}", "--auth-password", PASSWORD,
            "--from", f"alice@{DOMAIN}", "--to", f"bob@{DOMAIN}", "--header", "Subject: swaks"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [path] = self.maildir_files(f"bob@{DOMAIN}")
        self.assertIn(b"Subject: swaks", path.read_bytes())

    @defer.inlineCallbacks
    def test_curl_smtps(self):
        curl = require_program(self, "curl")
        message = self.mktemp()
        with open(message, "wb") as f:
            f.write(b"Subject: via curl\r\n\r\nhello\r\n")
        result = yield self.in_thread(subprocess.run, [
            curl, "-sS", "-k", f"smtps://127.0.0.1:{self.port('submissions')}",
            "--user", f"alice@{DOMAIN}:{PASSWORD}", "--mail-from", f"alice@{DOMAIN}",
            "--mail-rcpt", f"bob@{DOMAIN}", "-T", message], capture_output=True, text=True,
            timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        [path] = self.maildir_files(f"bob@{DOMAIN}")
        self.assertIn(b"Subject: via curl", path.read_bytes())


class LimitsTests(ServerMixin, unittest.TestCase):
    """Limits that protect the server from a misbehaving client."""

    def setUp(self):
        return self.start_server(smtp={"max_errors": 3, "max_data_line": 1000})

    @defer.inlineCallbacks
    def test_too_many_errors_disconnects(self):
        data = yield self.in_thread(raw_exchange, self.port("smtp"),
                                    [b"BOGUS\r\n"] * 3 + [b"BOGUS\r\n", b"NOOP\r\n"])
        lines = data.split(b"\r\n")
        self.assertEqual([line[:3] for line in lines if line], [b"220", b"500", b"500", b"500",
                                                               b"421"])

    @defer.inlineCallbacks
    def test_overlong_data_line_stays_in_data_mode(self):
        long_line = b"x" * 20000 + b"\r\nMAIL FROM:<evil@remote.test>\r\n"
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"DATA\r\n", b"Subject: long\r\n\r\n" + long_line, b".\r\n", b"NOOP\r\n"])
        self.assertIn(b"\r\n550 5.6.0 ", data)
        self.assertTrue(data.endswith(b"250 2.0.0 Ok\r\n"), data[-200:])
        self.assertEqual(self.maildir_files(f"alice@{DOMAIN}"), [])

    @defer.inlineCallbacks
    def test_received_header_sanitises_helo(self):
        yield self.in_thread(raw_exchange, self.port("smtp"), [
            "EHLO évil\x01host\tname\r\n".encode("utf-8"),
            b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
            b"Subject: x\r\n\r\nx\r\n.\r\n"])
        [path] = self.maildir_files(f"alice@{DOMAIN}")
        received = path.read_bytes().split(b"\n")[2]
        self.assertEqual(received, b"Received: from ?vil host name ([127.0.0.1])")


class LiveDirectoryTests(ServerMixin, unittest.TestCase):
    """The admin CLI changes what a running server accepts, without a restart."""

    def setUp(self):
        return self.start_server()

    def cli(self, *args: str) -> int:
        import contextlib
        import io

        from mailtwist.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return main(["--data-dir", str(self.data_dir), *args])

    def rcpt(self, address: str) -> int:
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
            client.ehlo("c.test")
            client.mail("s@remote.test")
            return client.rcpt(address)[0]

    @defer.inlineCallbacks
    def test_cli_alias_add_and_del(self):
        self.assertEqual((yield self.in_thread(self.rcpt, f"sales@{DOMAIN}")), 550)
        self.assertEqual(self.cli("alias", "add", f"sales@{DOMAIN}", f"bob@{DOMAIN}"), 0)
        self.assertEqual((yield self.in_thread(self.rcpt, f"sales@{DOMAIN}")), 250)
        self.assertEqual(self.cli("alias", "del", f"sales@{DOMAIN}"), 0)
        self.assertEqual((yield self.in_thread(self.rcpt, f"sales@{DOMAIN}")), 550)


class CommandHygieneTests(ServerMixin, unittest.TestCase):
    """Guards RFC 5321's CRLF rule for commands: a bare LF, a bare CR or a NUL in a
    command line is refused, so nothing smuggled that way is ever executed."""

    def setUp(self):
        return self.start_server()

    @defer.inlineCallbacks
    def test_bare_lf_cr_and_nul_refused(self):
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO c.test\r\n", b"NOOP\n", b"NO\rOP\r\n", b"NO\0OP\r\n",
            b"MAIL FROM:<s@remote.test>\nRCPT TO:<alice@example.test>\r\n", b"QUIT\r\n"])
        codes = [line[:9] for line in data.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(codes, [b"220 mx.ex", b"250 SMTPU", b"500 5.5.2", b"500 5.5.2",
                                 b"500 5.5.2", b"500 5.5.2", b"503 5.5.1", b"221 2.0.0"])


class QuotaTests(ServerMixin, unittest.TestCase):
    """Guards mailbox quotas at SMTP delivery (RCPT-time, like Dovecot's LMTP)."""

    def setUp(self):
        return self.start_server(accounts=("alice",))

    def rcpt(self, address: str, size: int | None = None) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10) as client:
            client.ehlo("c.test")
            client.mail("s@remote.test", [f"SIZE={size}"] if size else [])
            return client.rcpt(address)

    @defer.inlineCallbacks
    def test_full_mailbox_refuses_recipient_others_still_accepted(self):
        """A declared SIZE over the quota, or a mailbox already at its quota, refuses
        that recipient at RCPT with 552 5.2.2; a message accepted at RCPT is stored
        even if it takes the mailbox over (never refused after DATA); accounts
        without a quota are unaffected."""
        self.directory.add_account(f"small@{DOMAIN}", PASSWORD, quota_bytes=2000)
        code, _ = yield self.in_thread(self.rcpt, f"small@{DOMAIN}", 5000)
        self.assertEqual(code, 552)
        data = yield self.in_thread(raw_exchange, self.port("smtp"), [
            b"EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<small@example.test>\r\n"
            b"DATA\r\n", b"Subject: fill\r\n\r\n" + b"x" * 2500 + b"\r\n.\r\n"])
        self.assertIn(b"250 2.0.0 Ok: queued", data)
        code, text = yield self.in_thread(self.rcpt, f"small@{DOMAIN}")
        self.assertEqual((code, text[:6]), (552, b"5.2.2 "))
        code, _ = yield self.in_thread(self.rcpt, f"alice@{DOMAIN}", 5000)
        self.assertEqual(code, 250)
        self.assertEqual(len(self.maildir_files(f"small@{DOMAIN}")), 1)
