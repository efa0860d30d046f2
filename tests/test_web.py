"""The [web] listener: Thunderbird autoconfig, Outlook autodiscover, MTA-STS policy."""

from __future__ import annotations

import urllib.error
import urllib.request
from xml.etree import ElementTree as ET

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.config import ConfigError, load_config
from mailtwist.web import AUTODISCOVER_OUTLOOK, AUTODISCOVER_RESPONSE
from tests.support import DOMAIN, ServerMixin

WEB = {"listen": ["tcp:0:interface=127.0.0.1"]}
ALICE = f"alice@{DOMAIN}"


def http(port: int, path: str, data: bytes | None = None,
         method: str | None = None) -> tuple[int, bytes]:
    """One request with urllib (blocking: run it in a thread); (status, body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method=method)
    if data is not None:
        request.add_header("Content-Type", "text/xml")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def autodiscover_request(address: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
        'outlook/requestschema/2006"><Request>'
        f"<EMailAddress>{address}</EMailAddress>"
        "<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/"
        "outlook/responseschema/2006a</AcceptableResponseSchema>"
        "</Request></Autodiscover>"
    ).encode()


class WebConfigTests(unittest.SynchronousTestCase):
    def test_off_by_default(self):
        self.assertEqual(load_config(None).web.listen, [])

    def test_twistd_option(self):
        from mailtwist.tap import Options

        options = Options()
        options.parseOptions(["--web", "tcp:8080", "--web", "tcp:8081:interface=::1"])
        config = load_config(None, options.overrides())
        self.assertEqual(config.web.listen, ["tcp:8080", "tcp:8081:interface=::1"])

    def test_bad_key_is_named(self):
        with self.assertRaises(ConfigError) as e:
            load_config(None, {"web": {"metric": True}})
        self.assertIn("web.metric", str(e.exception))


# Thunderbird's autoconfig format (wiki.mozilla.org/Thunderbird:Autoconfiguration:
# ConfigFileFormat): element -> (allowed children, required children).
THUNDERBIRD_FORMAT = {
    "clientConfig": ({"emailProvider"}, {"emailProvider"}),
    "emailProvider": ({"domain", "displayName", "displayShortName", "incomingServer",
                       "outgoingServer", "documentation"},
                      {"domain", "incomingServer", "outgoingServer"}),
    "incomingServer": ({"hostname", "port", "socketType", "username", "authentication",
                        "password", "pop3"},
                       {"hostname", "port", "socketType", "username", "authentication"}),
    "outgoingServer": ({"hostname", "port", "socketType", "username", "authentication",
                        "password", "addThisServer", "useGlobalPreferredServer"},
                       {"hostname", "port", "socketType", "username", "authentication"}),
}
THUNDERBIRD_VALUES = {
    "socketType": {"plain", "SSL", "STARTTLS"},
    "authentication": {"password-cleartext", "password-encrypted", "NTLM", "GSSAPI",
                       "client-IP-address", "TLS-client-cert", "OAuth2", "none"},
}
# Outlook's POX autodiscover response (responseschema/2006a), the parts we use.
OUTLOOK_FORMAT = {
    "Autodiscover": ({"Response"}, {"Response"}),
    "Response": ({"User", "Account", "Error"}, {"Account"}),
    "Account": ({"AccountType", "Action", "Protocol", "RedirectAddr", "RedirectUrl"},
                {"AccountType", "Action", "Protocol"}),
    "Protocol": ({"Type", "Server", "Port", "DomainRequired", "LoginName", "SPA", "SSL",
                  "Encryption", "AuthRequired", "DomainName"},
                 {"Type", "Server", "Port", "LoginName"}),
}
OUTLOOK_VALUES = {
    "AccountType": {"email"}, "Action": {"settings", "redirectAddr", "redirectUrl"},
    "Type": {"IMAP", "POP3", "SMTP"}, "DomainRequired": {"on", "off"},
    "SPA": {"on", "off"}, "SSL": {"on", "off"}, "AuthRequired": {"on", "off"},
    "Encryption": {"None", "SSL", "TLS", "Auto"},
}


def format_errors(element: ET.Element, structure: dict, values: dict) -> list[str]:
    """What in *element*'s tree does not follow *structure* (element -> allowed and
    required children; namespaces ignored) and *values* (leaf -> allowed text)."""
    errors = []
    tag = element.tag.rpartition("}")[2]
    children = [c.tag.rpartition("}")[2] for c in element]
    if tag in structure:
        allowed, required = structure[tag]
        errors += [f"{tag}: unexpected {c}" for c in children if c not in allowed]
        errors += [f"{tag}: no {r}" for r in sorted(required - set(children))]
        errors += [f"{tag}: {r} twice" for r in sorted(required)
                   if children.count(r) > 1 and r not in ("domain", "incomingServer",
                                                            "outgoingServer", "Protocol")]
    elif children:
        errors.append(f"{tag}: a leaf with children")
    elif tag == "port" or tag == "Port":
        if not (element.text or "").isdigit() or not 0 < int(element.text) < 65536:
            errors.append(f"{tag}: not a port: {element.text!r}")
    elif tag in values and element.text not in values[tag]:
        errors.append(f"{tag}: {element.text!r} not one of {sorted(values[tag])}")
    elif not (element.text or "").strip():
        errors.append(f"{tag}: empty")
    for child in element:
        errors += format_errors(child, structure, values)
    return errors


class FormatValidatorTests(unittest.SynchronousTestCase):
    def test_validator_finds_errors(self):
        """The checker used below really refuses malformed documents."""
        root = ET.fromstring("<clientConfig><emailProvider><domain>d</domain>"
                             "<incomingServer><hostname/><port>0</port>"
                             "<socketType>TLS</socketType><bogus>x</bogus></incomingServer>"
                             "</emailProvider></clientConfig>")
        errors = format_errors(root, THUNDERBIRD_FORMAT, THUNDERBIRD_VALUES)
        for expected in ("emailProvider: no outgoingServer", "incomingServer: unexpected bogus",
                         "incomingServer: no username", "hostname: empty",
                         "port: not a port", "socketType: 'TLS' not one of"):
            self.assertTrue(any(e.startswith(expected) for e in errors), (expected, errors))


class AutoconfigTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_server(web=WEB)
        self.web = self.port("web")

    def get(self, path: str, **kwargs) -> defer.Deferred:
        return self.in_thread(http, self.web, path, **kwargs)

    def servers(self, root: ET.Element, tag: str) -> dict[tuple[str, str], ET.Element]:
        provider = root.find("emailProvider")
        return {(s.get("type"), s.findtext("socketType")): s for s in provider.findall(tag)}

    @defer.inlineCallbacks
    def test_thunderbird_autoconfig(self):
        status, body = yield self.get(f"/mail/config-v1.1.xml?emailaddress={ALICE}")
        self.assertEqual(status, 200)
        root = ET.fromstring(body)
        self.assertEqual(root.tag, "clientConfig")
        provider = root.find("emailProvider")
        self.assertEqual(provider.get("id"), DOMAIN)
        self.assertEqual(provider.findtext("domain"), DOMAIN)
        incoming = self.servers(root, "incomingServer")
        expected = {("imap", "SSL"): "imaps", ("imap", "STARTTLS"): "imap",
                    ("pop3", "SSL"): "pop3s", ("pop3", "STARTTLS"): "pop3"}
        self.assertEqual(set(incoming), set(expected))
        for key, role in expected.items():
            server = incoming[key]
            self.assertEqual(server.findtext("hostname"), "mx.example.test")
            self.assertEqual(int(server.findtext("port")), self.port(role))
            self.assertEqual(server.findtext("username"), ALICE)
            self.assertEqual(server.findtext("authentication"), "password-cleartext")
        # implicit TLS is offered first (RFC 8314)
        first = provider.find("incomingServer")
        self.assertEqual((first.get("type"), first.findtext("socketType")), ("imap", "SSL"))
        outgoing = self.servers(root, "outgoingServer")
        self.assertEqual(int(outgoing[("smtp", "SSL")].findtext("port")),
                         self.port("submissions"))
        self.assertEqual(int(outgoing[("smtp", "STARTTLS")].findtext("port")),
                         self.port("submission"))
        self.assertNotIn(str(self.port("smtp")),
                         [s.findtext("port") for s in outgoing.values()])

    @defer.inlineCallbacks
    def test_documents_follow_the_clients_formats(self):
        """Both answers follow the format their client reads: Thunderbird's
        clientConfig 1.1 and Outlook's POX response, every element known, every
        required one there, every value one the client accepts."""
        status, body = yield self.get(f"/mail/config-v1.1.xml?emailaddress={ALICE}")
        root = ET.fromstring(body)
        self.assertEqual((status, root.tag, root.get("version")), (200, "clientConfig", "1.1"))
        self.assertEqual(format_errors(root, THUNDERBIRD_FORMAT, THUNDERBIRD_VALUES), [])
        for server in root.iter("incomingServer"):
            self.assertIn(server.get("type"), ("imap", "pop3"))
        for server in root.iter("outgoingServer"):
            self.assertEqual(server.get("type"), "smtp")
        status, body = yield self.get("/autodiscover/autodiscover.xml",
                                      data=autodiscover_request(ALICE))
        self.assertEqual(status, 200)
        self.assertEqual(format_errors(ET.fromstring(body), OUTLOOK_FORMAT, OUTLOOK_VALUES),
                         [])

    @defer.inlineCallbacks
    def test_well_known_path(self):
        status, body = yield self.get(
            f"/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress={ALICE}")
        self.assertEqual(status, 200)
        self.assertEqual(ET.fromstring(body).find("emailProvider").get("id"), DOMAIN)

    @defer.inlineCallbacks
    def test_other_domains_are_not_found(self):
        status, _ = yield self.get("/mail/config-v1.1.xml?emailaddress=eve@elsewhere.test")
        self.assertEqual(status, 404)
        status, _ = yield self.get("/mail/config-v1.1.xml")
        self.assertEqual(status, 404)
        status, _ = yield self.get("/nothing-here")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_outlook_autodiscover(self):
        for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
            status, body = yield self.get(path, data=autodiscover_request(ALICE))
            self.assertEqual(status, 200, path)
            root = ET.fromstring(body)
            self.assertEqual(root.tag, f"{{{AUTODISCOVER_RESPONSE}}}Autodiscover")
            ns = {"a": AUTODISCOVER_OUTLOOK}
            account = root.find("a:Response/a:Account", ns)
            self.assertEqual(account.findtext("a:AccountType", namespaces=ns), "email")
            protocols = {p.findtext("a:Type", namespaces=ns): p
                         for p in account.findall("a:Protocol", ns)}
            self.assertEqual(set(protocols), {"IMAP", "POP3", "SMTP"})
            for kind, role in (("IMAP", "imaps"), ("POP3", "pop3s"), ("SMTP", "submissions")):
                protocol = protocols[kind]
                self.assertEqual(protocol.findtext("a:Server", namespaces=ns), "mx.example.test")
                self.assertEqual(int(protocol.findtext("a:Port", namespaces=ns)),
                                 self.port(role))
                self.assertEqual(protocol.findtext("a:LoginName", namespaces=ns), ALICE)
                self.assertEqual(protocol.findtext("a:SSL", namespaces=ns), "on")
                self.assertEqual(protocol.findtext("a:Encryption", namespaces=ns), "SSL")

    @defer.inlineCallbacks
    def test_autodiscover_refuses_other_domains_and_bad_requests(self):
        path = "/autodiscover/autodiscover.xml"
        status, _ = yield self.get(path, data=autodiscover_request("eve@elsewhere.test"))
        self.assertEqual(status, 404)
        status, _ = yield self.get(path, data=b"<not xml")
        self.assertEqual(status, 400)
        status, _ = yield self.get(path)
        self.assertEqual(status, 405)

    @defer.inlineCallbacks
    def test_mta_sts_policy(self):
        status, body = yield self.get("/.well-known/mta-sts.txt")
        self.assertEqual(status, 200)
        lines = body.decode().splitlines()
        self.assertEqual(lines[0], "version: STSv1")
        self.assertIn("mx: mx.example.test", lines)


class StartTLSOnlyTests(ServerMixin, unittest.TestCase):
    """Only the roles the server has are advertised, with STARTTLS where that is all."""

    @defer.inlineCallbacks
    def test_only_served_roles(self):
        listen = {role: "none" for role in ("submissions", "imaps", "pop3", "pop3s")}
        yield self.start_server(web={**WEB, "metrics": False}, listen=listen)
        status, body = yield self.in_thread(
            http, self.port("web"), f"/mail/config-v1.1.xml?emailaddress={ALICE}")
        self.assertEqual(status, 200)
        provider = ET.fromstring(body).find("emailProvider")
        servers = [(s.get("type"), s.findtext("socketType"), int(s.findtext("port")))
                   for s in provider if s.tag in ("incomingServer", "outgoingServer")]
        self.assertEqual(servers, [("imap", "STARTTLS", self.port("imap")),
                                   ("smtp", "STARTTLS", self.port("submission"))])
        status, _ = yield self.in_thread(http, self.port("web"), "/metrics")
        self.assertEqual(status, 404)


class HTTPSTests(ServerMixin, unittest.TestCase):
    """``ssl:`` without a key serves HTTPS with the [tls] certificate (Outlook needs it)."""

    @defer.inlineCallbacks
    def test_https_with_the_server_certificate(self):
        from tests.support import client_tls_context

        yield self.start_server(web={"listen": ["ssl:0:interface=127.0.0.1"]})
        url = f"https://127.0.0.1:{self.port('web')}/.well-known/mta-sts.txt"

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10,
                                        context=client_tls_context()) as response:
                return response.read()

        body = yield self.in_thread(fetch)
        self.assertIn(b"mx: mx.example.test", body)
