"""TLS policy of every listener: TLS 1.2+ only, AEAD ciphers, no compression or
renegotiation; checked with Python's ssl client and with nmap's ssl-enum-ciphers."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.config import ConfigError
from mailtwist.tls import SERVER_CIPHERS, ServerTLS, load_server_tls, make_self_signed

from .support import ServerMixin, require_program

# The IANA names nmap prints for SERVER_CIPHERS (TLS 1.2) and OpenSSL's TLS 1.3 suites.
ALLOWED_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
ALLOWED_TLS13 = {"TLS_AKE_WITH_AES_128_GCM_SHA256", "TLS_AKE_WITH_AES_256_GCM_SHA384",
                 "TLS_AKE_WITH_CHACHA20_POLY1305_SHA256",
                 "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                 "TLS_CHACHA20_POLY1305_SHA256"}


def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers only *version* (and any cipher, SECLEVEL=0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """TLS version negotiated with 127.0.0.1:*port* (ssl.SSLError if refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock) as tls:
            return tls.version()


def client_can_speak(version: ssl.TLSVersion) -> bool:
    """Whether this machine's OpenSSL can negotiate *version* at all: a permissive
    Python server in a thread accepts the same client or not. Without this
    control a refused handshake could be the client's doing, not ours."""
    cert, key = make_self_signed("localhost")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(cert)
        (Path(d) / "k.pem").write_bytes(key)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.set_ciphers("ALL:@SECLEVEL=0")
        try:
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1
        except (ValueError, ssl.SSLError):
            return False
        server_ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            return handshake(port, old_client(version)) is not None
        except (ssl.SSLError, OSError):
            return False
        finally:
            thread.join(5)
            listener.close()


class PolicyTests(unittest.TestCase):
    """The context itself, without a network."""

    def material(self):
        d = Path(self.mktemp())
        d.mkdir()
        cert, key = make_self_signed("mx.example.test")
        (d / "cert.pem").write_bytes(cert)
        (d / "key.pem").write_bytes(key)
        return d / "cert.pem", d / "key.pem"

    def test_context_options(self):
        """No compression, no renegotiation, server cipher order, no SSLv3/TLS 1.0/1.1."""
        tls = ServerTLS(load_server_tls(*self.material()))
        options = tls.getContext().set_options(0)  # returns the options in force
        for flag in (SSL.OP_NO_COMPRESSION, SSL.OP_NO_RENEGOTIATION,
                     SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1,
                     SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & flag, hex(flag))

    def test_interfaces(self):
        """The listeners' TLS object is a Twisted connection creator and context factory."""
        tls = ServerTLS(load_server_tls(*self.material()))
        verifyObject(IOpenSSLServerConnectionCreator, tls)
        verifyObject(IOpenSSLContextFactory, tls)

    def test_mismatched_key_names_both_files(self):
        """A key of another certificate is refused in one line naming both files."""
        cert, _ = self.material()
        other_cert, other_key = self.material()
        with self.assertRaises(ConfigError) as caught:
            load_server_tls(cert, other_key)
        self.assertIn(str(other_key), str(caught.exception))
        self.assertIn(str(cert), str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_switch_keeps_old_connections(self):
        """switch() changes the context of new connections only."""
        tls = ServerTLS(load_server_tls(*self.material()))
        before = tls.serverConnectionForTLS(None)
        tls.switch(load_server_tls(*self.material()))
        after = tls.serverConnectionForTLS(None)
        self.assertIsNot(before.get_context(), after.get_context())
        self.assertIs(after.get_context(), tls.getContext())


class HandshakeTests(ServerMixin, unittest.TestCase):
    """Real handshakes with the implicit-TLS and STARTTLS listeners."""

    def setUp(self):
        return self.start_server()

    def assert_refused(self, port: int, version: ssl.TLSVersion):
        if not client_can_speak(version):
            raise unittest.SkipTest(f"this OpenSSL cannot negotiate {version.name} even "
                                    f"with a permissive server; nothing to check")
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            handshake(port, old_client(version))

    def test_tls10_refused(self):
        """A TLS 1.0-only client cannot connect to imaps."""
        return self.in_thread(self.assert_refused, self.port("imaps"), ssl.TLSVersion.TLSv1)

    def test_tls11_refused(self):
        """A TLS 1.1-only client cannot connect to submissions."""
        return self.in_thread(self.assert_refused, self.port("submissions"),
                              ssl.TLSVersion.TLSv1_1)

    def test_tls12_and_13_accepted(self):
        """TLS 1.2 and 1.3 clients are served on pop3s."""
        def check():
            for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                  (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
                self.assertEqual(handshake(self.port("pop3s"), old_client(version)), name)
        return self.in_thread(check)

    def test_cbc_and_rsa_key_exchange_refused(self):
        """TLS 1.2 with only CBC or static-RSA suites fails; an AEAD suite works."""
        def check():
            for ciphers in ("ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA",
                            "AES128-GCM-SHA256:AES256-SHA256"):
                ctx = old_client(ssl.TLSVersion.TLSv1_2)
                ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
                with self.assertRaises((ssl.SSLError, ConnectionError)):
                    handshake(self.port("imaps"), ctx)
            ctx = old_client(ssl.TLSVersion.TLSv1_2)
            ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
            self.assertEqual(handshake(self.port("imaps"), ctx), "TLSv1.2")
        return self.in_thread(check)

    def test_starttls_refuses_tls11(self):
        """SMTP STARTTLS (the same context) refuses a TLS 1.1-only client."""
        def check():
            if not client_can_speak(ssl.TLSVersion.TLSv1_1):
                raise unittest.SkipTest("this OpenSSL cannot negotiate TLS 1.1 at all")
            with smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=10) as client:
                client.ehlo("client.example")
                with self.assertRaises((ssl.SSLError, ConnectionError,
                                        smtplib.SMTPServerDisconnected)):
                    client.starttls(context=old_client(ssl.TLSVersion.TLSv1_1))
            with smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=10) as client:
                client.ehlo("client.example")
                client.starttls(context=old_client(ssl.TLSVersion.TLSv1_2))
                self.assertEqual(client.sock.version(), "TLSv1.2")
        return self.in_thread(check)


def nmap_scan(nmap: str, port: int) -> str:
    """nmap's ssl-enum-ciphers report for 127.0.0.1:*port* ("+" runs the script on
    a port nmap does not know as TLS, without slow version detection)."""
    result = subprocess.run(
        [nmap, "-Pn", "-n", "-p", str(port), "--script", "+ssl-enum-ciphers",
         "127.0.0.1"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"nmap failed ({result.returncode}): {result.stderr}")
    return result.stdout


def parse_ssl_enum(report: str) -> dict[str, list[str]]:
    """TLS version -> cipher names, plus "compressors" and "least strength"."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in report.splitlines():
        line = raw.lstrip("|_ ").rstrip()
        if line.startswith(("TLSv", "SSLv")) and line.endswith(":"):
            current = line[:-1]
            sections[current] = []
        elif line.startswith("least strength:"):
            sections["least strength"] = [line.split(":", 1)[1].strip()]
        elif line.startswith("compressors:"):
            current = "compressors"
            sections[current] = []
        elif line.startswith(("ciphers:", "cipher preference:", "warnings:")):
            continue
        elif current is not None and line.startswith("TLS_"):
            sections[current].append(line.split()[0])
        elif current == "compressors" and line:
            sections[current].append(line)
    return sections


class ScannerTests(ServerMixin, unittest.TestCase):
    """An outside TLS scanner (nmap's ssl-enum-ciphers) grades the listeners."""

    def setUp(self):
        self.nmap = require_program(self, "nmap")
        return self.start_server()

    def test_scanner_sees_only_modern_tls(self):
        """nmap sees TLS 1.2/1.3 only, AEAD suites only, no compression, grade A."""
        def scan():
            report = nmap_scan(self.nmap, self.port("imaps"))
            found = parse_ssl_enum(report)
            versions = {k for k in found if k.startswith(("TLS", "SSL"))}
            self.assertTrue(versions, report)
            self.assertLessEqual(versions, {"TLSv1.2", "TLSv1.3"}, report)
            self.assertIn("TLSv1.2", versions, report)
            self.assertLessEqual(set(found["TLSv1.2"]), ALLOWED_TLS12, report)
            self.assertTrue(found["TLSv1.2"], report)
            if "TLSv1.3" in found:
                self.assertLessEqual(set(found["TLSv1.3"]), ALLOWED_TLS13, report)
            self.assertEqual(found.get("compressors", ["NULL"]), ["NULL"], report)
            self.assertEqual(found.get("least strength"), ["A"], report)
        return self.in_thread(scan)


class CipherListTests(unittest.TestCase):
    def test_server_ciphers_are_aead_with_forward_secrecy(self):
        """Every TLS 1.2 suite we offer is ECDHE with GCM or ChaCha20-Poly1305."""
        for name in SERVER_CIPHERS.split(":"):
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20-POLY1305" in name, name)
