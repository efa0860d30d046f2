"""``mailtwist check``: the self-audit against a real server and a DNS server on
loopback; the good setup is all OK, each planted problem is its FAIL line."""

from __future__ import annotations

import datetime
import io
import os
import socket
import ssl
import threading
from contextlib import redirect_stdout
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.names import dns
from twisted.trial import unittest

from mailtwist import check
from mailtwist.cli import main
from mailtwist.config import ROLES, load_config
from mailtwist.dkim import public_records
from mailtwist.dnsrecords import configured_ports, expected_records
from mailtwist.queue.service import dkim_key_dir
from tests.dnsserver import TestDNSServer, free_port, listen_scripted
from tests.support import DOMAIN, ServerMixin

HOST = "mx.example.test"
NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def make_certificate(hostname: str, not_after: datetime.datetime,
                     names: list[str] | None = None) -> tuple[bytes, bytes]:
    """(leaf + CA chain PEM, leaf key PEM): a leaf issued by a throwaway CA."""
    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start = min(not_after - 30 * DAY, datetime.datetime.now(datetime.UTC) - DAY)
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(start).not_valid_after(not_after + 365 * DAY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name(hostname)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(start).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in (names or [hostname])]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem


def findings(report: check.Report, status: str) -> list[str]:
    return [f"{s.title}: {f.text}" for s in report.sections for f in s.findings
            if f.status == status]


class CertificateTests(unittest.TestCase):
    """The certificate rules on a fixed 'now' (no wall clock in the assertions)."""

    def statuses(self, pem: bytes, hostname: str = HOST, now=NOW) -> list[tuple[str, str]]:
        section = check.Section("cert")
        check.check_certificate(pem, hostname, now, section)
        return [(f.status, f.text) for f in section.findings]

    def test_expiry_thresholds(self):
        """Over 14 days left is OK, under 14 days WARN, expired FAIL."""
        pem, _ = make_certificate(HOST, NOW + 20 * DAY)
        self.assertEqual(self.statuses(pem)[0][0], "OK")
        self.assertEqual(self.statuses(pem, now=NOW + 7 * DAY)[0],
                         ("WARN", "certificate expires in 13 day(s), on 2030-06-21"))
        self.assertEqual(self.statuses(pem, now=NOW + 21 * DAY)[0],
                         ("FAIL", "certificate expired on 2030-06-21"))

    def test_host_name_and_issuer(self):
        """The certificate must name the host (wildcards for one label); self-signed
        is a warning."""
        pem, _ = make_certificate(HOST, NOW + 90 * DAY, names=["*.example.test"])
        self.assertIn(("OK", f"certificate names {HOST}"), self.statuses(pem))
        self.assertEqual(self.statuses(pem, hostname="a.b.example.test")[1][0], "FAIL")
        self.assertEqual(self.statuses(pem)[2][0], "OK")
        from mailtwist.tls import make_self_signed

        self_signed, _ = make_self_signed(HOST)
        self.assertEqual(self.statuses(self_signed)[2][0], "WARN")


class ProbeFailureTests(unittest.TestCase):
    """Probes against servers that do the wrong thing."""

    def test_old_tls_versions_accepted_fail(self):
        """A listener that still speaks TLS 1.0/1.1 is a FAIL line."""
        base = Path(self.mktemp())
        base.mkdir()
        cert_pem, key_pem = make_certificate(HOST, NOW)
        (base / "cert.pem").write_bytes(cert_pem)
        (base / "key.pem").write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(base / "cert.pem", base / "key.pem")
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        versions: list[str] = []

        def serve() -> None:
            for _ in range(4):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        versions.append(tls.version())
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        section = check.Section("tls")
        check._tls_versions("tls", "127.0.0.1", listener.getsockname()[1], HOST, 5,
                            section, None)
        thread.join(10)
        if "TLSv1" not in versions:
            self.skipTest("this system's OpenSSL cannot do TLS 1.0 at all")
        self.assertEqual(section.findings[0].status, "FAIL")
        self.assertIn("accepts TLS 1.0", section.findings[0].text)

    @defer.inlineCallbacks
    def test_open_relay_fails(self):
        """An SMTP server that takes any recipient is reported as an open relay."""
        port = free_port("127.0.0.1")
        listen_scripted(self, "127.0.0.1", port)
        section = check.Section("relay")
        yield defer.maybeDeferred(lambda: None)
        from twisted.internet.threads import deferToThread

        yield deferToThread(check._relay_probe, "127.0.0.1", port, DOMAIN, 5, section)
        self.assertEqual(section.findings[0].status, "FAIL")
        self.assertIn(f"open relay: accepted mail for probe@{check.OUTSIDE}",
                      section.findings[0].text)


class LiveCheckTests(ServerMixin, unittest.TestCase):
    """``mailtwist check`` against a running server and a loopback DNS server."""

    @defer.inlineCallbacks
    def setup_site(self, *, publish_dkim: bool = True, cert_expiry=None, **overrides):
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        not_after = cert_expiry or datetime.datetime.now(datetime.UTC) + 90 * DAY
        cert_pem, key_pem = make_certificate(HOST, not_after)
        cert, key = base / "cert.pem", base / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        os.chmod(key, 0o600)
        yield self.start_server(tls={"cert": str(cert), "key": str(key)}, **overrides)
        os.chmod(self.data_dir, 0o700)
        self.dns = TestDNSServer()
        self.dns.start()
        self.addCleanup(self.dns.stop)
        listen = "\n".join(
            f'{role} = "tcp:{self.port(role)}:interface=127.0.0.1"' if role in
            self.server.listeners else f'{role} = "none"' for role in ROLES)
        self.check_config = base / "check.toml"
        self.check_config.write_text(
            f'data_dir = "{self.data_dir}"\nhostname = "{HOST}"\n'
            f'allow_plaintext_auth = {"true" if overrides.get("allow_plaintext_auth") else "false"}\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
            f'[outbound]\ndns_servers = ["{self.dns.address}"]\ndns_timeout = 5\n'
            f'[listen]\n{listen}\n')
        self.cli("dkim", "keygen", DOMAIN, "--algorithm", "ed25519", "--selector", "ed1")
        config = load_config(self.check_config)
        records = expected_records(config, DOMAIN, public_records(dkim_key_dir(config), DOMAIN),
                                   configured_ports(config))
        for record in records:
            if "._domainkey." in record.name and not publish_dkim:
                continue
            if record.type == "MX":
                self.dns.mx(record.name, 10, HOST)
            elif record.type == "TXT":
                self.dns.txt(record.name, record.value)
            else:
                priority, weight, port, target = record.value.split()
                self.dns.add(record.name, dns.Record_SRV(int(priority), int(weight), int(port),
                                                         target.rstrip(".")))
        self.dns.a(HOST, "127.0.0.1")
        self.dns.add("1.0.0.127.in-addr.arpa", dns.Record_PTR(HOST))
        if os.geteuid() == 0:
            # The check warns about a root-owned data dir (the server would run as root).
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, 65534, 65534, follow_symlinks=False)

    def cli(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["--config", str(self.check_config), *argv])
        return code, out.getvalue()

    @defer.inlineCallbacks
    def test_good_setup_is_all_ok(self):
        """A CA-signed certificate, TLS-only passwords, no relay and every DNS record
        published: every line is OK and the exit status is 0."""
        yield self.setup_site()
        code, out = yield self.in_thread(self.cli, "check", "--timeout", "5")
        self.assertEqual([line for line in out.splitlines()
                          if line.startswith(("WARN", "FAIL"))], [], out)
        self.assertEqual(code, 0, out)
        for text in ("no open relay", "TLS 1.0 and 1.1 refused", "LOGINDISABLED before STARTTLS",
                     "USER refused before STLS", "AUTH not offered before TLS",
                     f"PTR of 127.0.0.1 is {HOST}", "DKIM ed1._domainkey.example.test published",
                     "DMARC _dmarc.example.test published", "SPF example.test published",
                     f"MX {DOMAIN} published", "AUTH offered after STARTTLS"):
            self.assertIn(text, out)
        self.assertRegex(out, r"\n0 FAIL, 0 WARN, \d+ OK\n$")

    @defer.inlineCallbacks
    def test_bad_setup_fails_where_it_should(self):
        """Plaintext passwords allowed, an expired certificate and an unpublished
        DKIM record are each reported as FAIL with a fix, and the exit status is 1."""
        yield self.setup_site(publish_dkim=False, allow_plaintext_auth=True,
                              cert_expiry=datetime.datetime.now(datetime.UTC) - DAY)
        code, out = yield self.in_thread(self.cli, "check", "--timeout", "5")
        self.assertEqual(code, 1, out)
        config = load_config(self.check_config)
        report = yield self.in_thread(check.run_check, config, timeout=5)
        failed = findings(report, "FAIL")
        submission = f"submission listener 127.0.0.1:{self.port('submission')}"
        expected = [
            ("Configuration: allow_plaintext_auth = true: passwords may cross the network"
            " unencrypted"),
            f"{submission}: AUTH offered before TLS: passwords may be sent unencrypted",
            (f"imap listener 127.0.0.1:{self.port('imap')}: LOGIN allowed before STARTTLS"
            " (no LOGINDISABLED): passwords may be sent unencrypted"),
            (f"pop3 listener 127.0.0.1:{self.port('pop3')}: USER accepted before STLS:"
            " passwords may be sent unencrypted"),
            f"DNS for {DOMAIN}: DKIM ed1._domainkey.{DOMAIN} missing",
        ]
        for line in expected:
            self.assertIn(line, failed)
        [expired] = [f for f in failed if "expired on" in f]
        self.assertTrue(expired.startswith(f"Certificate {config.cert_path}: certificate"))
        self.assertEqual(len(failed), len(expected) + 1, failed)
        self.assertIn("to fix: remove allow_plaintext_auth", out)
        self.assertIn("to fix: publish: ed1._domainkey.example.test. IN TXT", out)

    @defer.inlineCallbacks
    def test_renewed_certificate_not_yet_served(self):
        """A certificate file renewed under a running server: each TLS listener
        still serves the old one, a WARN saying to restart."""
        yield self.setup_site()
        config = load_config(self.check_config)
        cert_pem, key_pem = make_certificate(HOST, datetime.datetime.now(datetime.UTC)
                                             + 80 * DAY)
        config.cert_path.write_bytes(cert_pem)
        config.key_path.write_bytes(key_pem)
        report = yield self.in_thread(check.run_check, config, timeout=5)
        warned = findings(report, "WARN")
        stale = [w for w in warned if "presents a different certificate" in w]
        self.assertEqual(len(stale), 7, warned)
        self.assertEqual(len(stale), len(warned))
        self.assertEqual(findings(report, "FAIL"), [])

    def test_config_that_does_not_load(self):
        """A config with an error is one FAIL line, exit status 1."""
        path = Path(self.mktemp())
        path.write_text("bcrypt_rounds = 2\n")
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["--config", str(path), "check"])
        self.assertEqual(code, 1)
        self.assertIn("FAIL  the configuration does not load:", out.getvalue())
        self.assertIn("bcrypt_rounds", out.getvalue())


class InitChecklistTests(unittest.TestCase):
    """``mailtwist init`` ends with a checklist: DNS records, firewall lines, next
    commands, all consistent with the config it wrote."""

    def init(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        import sys
        from contextlib import redirect_stderr

        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main(["--config", str(self.config_path), *argv])
        finally:
            sys.stdin = old_stdin
        return code, out.getvalue(), err.getvalue()

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.config_path = self.base / "mailtwist.toml"

    def test_checklist_matches_the_config(self):
        """The printed zone lines are the records `mailtwist dns` expects (DKIM key
        included), the nftables/ufw lines open exactly the configured ports, and the
        next commands include start and check; the admin account exists."""
        from tests.test_dns_records import parse_zone

        code, out, err = self.init("--data-dir", str(self.base / "data"), "init",
                                   "--domain", "example.org", "--hostname", "mail.example.org",
                                   "--admin", "boss@example.org", "--password-stdin",
                                   stdin="a long admin password\n")
        self.assertEqual((code, err), (0, ""), out)
        config = load_config(self.config_path)
        self.assertEqual(config.data_dir, self.base / "data")
        keys = public_records(dkim_key_dir(config), "example.org")
        self.assertEqual(len(keys), 1)
        dns_part = out.split("1. Publish", 1)[1].split("\n2. ", 1)[0]
        zone = "\n".join(line[3:] for line in dns_part.splitlines()[1:] if line.strip())
        want = expected_records(config, "example.org", keys, configured_ports(config))
        got = parse_zone(zone)
        self.assertEqual(got, [(r.name, r.type, r.value) for r in want])

        ports = sorted(set(configured_ports(config).values()))
        nft = [line.strip() for line in out.splitlines() if line.strip().startswith("nft ")]
        self.assertEqual(nft, [(f"nft add rule inet filter input tcp dport"
                               f" {{ {', '.join(map(str, ports))} }} accept")])
        ufw = [line.strip() for line in out.splitlines() if line.strip().startswith("ufw ")]
        self.assertEqual(ufw, [f"ufw allow {port}/tcp" for port in ports])
        commands = out.split("3. Next commands:", 1)[1]
        self.assertIn(f"twistd -n mailtwist --config {self.config_path}", commands)
        self.assertIn(f"mailtwist --config {self.config_path} check", commands)
        self.assertNotIn("user add", commands)
        from mailtwist.directory import FileDirectory, check_password

        account = FileDirectory(config.data_dir).get_account("boss@example.org")
        self.assertTrue(check_password("a long admin password", account.password_hash))
        for path in [config.data_dir, *config.data_dir.rglob("*")]:
            if path.name not in ("domains", "aliases"):
                mode = path.stat().st_mode & 0o777
                self.assertEqual(mode & 0o077, 0, f"{path} {mode:o}")

    def test_existing_certificate(self):
        """--cert/--key are checked and written into [tls]; no self-signed one is made."""
        cert_pem, key_pem = make_certificate("mail.example.org",
                                             datetime.datetime.now(datetime.UTC)
                                             + 90 * DAY)
        cert, key = self.base / "fullchain.pem", self.base / "privkey.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        code, out, err = self.init("--data-dir", str(self.base / "data"), "init",
                                   "--cert", str(cert), "--key", str(key))
        self.assertEqual((code, err), (0, ""))
        config = load_config(self.config_path)
        self.assertEqual((config.tls_cert, config.tls_key), (cert, key))
        self.assertFalse((config.data_dir / "tls").exists())
        self.assertIn("mailtwist --config", out)
        self.assertIn("user add alice@example.org", out)
        key.write_bytes(make_certificate("x", NOW)[1])
        self.config_path = self.base / "other.toml"
        code, out, err = self.init("init", "--cert", str(cert), "--key", str(key))
        self.assertEqual(code, 1)
        self.assertIn("does not match", err)
        self.assertFalse(self.config_path.exists())


class ResolverAndTargetTests(unittest.TestCase):
    """The blocking pieces the check is built on."""

    @defer.inlineCallbacks
    def test_blocking_resolver(self):
        """Answers (a TXT over 512 bytes too), NXDOMAIN as DNSNameError, and a server
        that timed out is skipped afterwards."""
        from twisted.internet.threads import deferToThread
        from twisted.names.error import DNSNameError

        server = TestDNSServer()
        server.start()
        self.addCleanup(server.stop)
        big = "v=DKIM1; k=rsa; p=" + "A" * 1500
        server.txt("big.example.test", big)
        server.a(HOST, "192.0.2.25")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))  # receives, never answers
            dead = silent.getsockname()
            resolver = check.BlockingResolver([dead, ("127.0.0.1", server.port)], timeout=0.5)

            def lookups():
                answers, _, _ = resolver.query(HOST, dns.A)
                text, _, _ = resolver.query("big.example.test", dns.TXT)
                with self.assertRaises(DNSNameError):
                    resolver.query("nothing.example.test", dns.MX)
                return answers, text

            answers, text = yield deferToThread(lookups)
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.25"])
        self.assertEqual(b"".join(text[0].payload.data).decode(), big)
        self.assertEqual(resolver.dead, {dead})

    def test_listener_targets(self):
        """Wildcard or missing interfaces mean this host; --server replaces every host;
        non-TCP listeners are skipped."""
        config = load_config(None, {"listen": {
            "smtp": "tcp:port=25:interface=192.0.2.1", "submission": "tcp:587",
            "submissions": "none", "imap": r"tcp6:143:interface=\:\:", "imaps": "none",
            "pop3": "unix:/run/pop3", "pop3s": "ssl:995:interface=0.0.0.0"}})
        self.assertEqual(check.listener_targets(config, None),
                         [("smtp", "192.0.2.1", 25), ("submission", "127.0.0.1", 587),
                          ("imap", "::1", 143), ("pop3s", "127.0.0.1", 995)])
        self.assertEqual({host for _, host, _ in check.listener_targets(config, "mx.test")},
                         {"mx.test"})

    def test_truncated_answer_is_asked_again_over_tcp(self):
        """A UDP answer with the TC bit is retried over TCP (RFC 7766)."""
        def reply(data: bytes, truncated: bool) -> bytes:
            query = dns.Message()
            query.fromStr(data)
            answer = dns.Message(id=query.id, answer=1, trunc=int(truncated), maxSize=0)
            answer.queries = query.queries
            if not truncated:
                answer.answers = [dns.RRHeader(b"big.example.test", dns.TXT, dns.IN, 60,
                                               dns.Record_TXT(b"v=spf1 ", *[b"a" * 200] * 3))]
            return answer.toStr()

        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket()
            try:
                tcp.bind(udp.getsockname())
                break
            except OSError:
                udp.close()
                tcp.close()
        self.addCleanup(udp.close)
        self.addCleanup(tcp.close)
        tcp.listen(1)

        def serve() -> None:
            data, peer = udp.recvfrom(65535)
            udp.sendto(reply(data, True), peer)
            conn, _ = tcp.accept()
            with conn:
                stream = conn.makefile("rb")
                length = int.from_bytes(stream.read(2), "big")
                answer = reply(stream.read(length), False)
                conn.sendall(len(answer).to_bytes(2, "big") + answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        resolver = check.BlockingResolver([udp.getsockname()], timeout=5)
        answers, _, _ = resolver.query("big.example.test", dns.TXT)
        thread.join(5)
        self.assertEqual(b"".join(answers[0].payload.data), b"v=spf1 " + b"a" * 600)
