"""The optional HTTP listener ([web]): client autoconfiguration, the MTA-STS
policy and Prometheus metrics.

- ``GET /mail/config-v1.1.xml?emailaddress=ADDR`` and
  ``GET /.well-known/autoconfig/mail/config-v1.1.xml``: Thunderbird's autoconfig;
- ``POST /autodiscover/autodiscover.xml`` (any case): Outlook's autodiscover;
- ``GET /.well-known/mta-sts.txt``: the MTA-STS policy (RFC 8461);
- ``GET /metrics``: Prometheus.

Autoconfig answers only for local domains (404 otherwise) and advertises the
listeners the server has, with the ports they listen on.  Everything that
reads files (the domain list, the queue size) runs in the I/O thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from xml.etree import ElementTree as ET

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import resource, server

from mailtwist.config import Config
from mailtwist.dnsrecords import mta_sts_policy

log = Logger()

AUTODISCOVER_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK = ("http://schemas.microsoft.com/exchange/autodiscover/outlook/"
                        "responseschema/2006a")
MAX_BODY = 64 * 1024

# (role, protocol, implicit TLS), most preferred first (RFC 8314: implicit TLS).
SERVICES = (
    ("imaps", "imap", True), ("imap", "imap", False),
    ("pop3s", "pop3", True), ("pop3", "pop3", False),
    ("submissions", "smtp", True), ("submission", "smtp", False),
)


class WebResource(resource.Resource):
    """Dispatches on the request path; one leaf resource for the whole site."""

    isLeaf = True

    def __init__(self, config: Config, is_local_domain: Callable[[str], bool],
                 ports: Callable[[], dict[str, int]], metrics: Any, reactor: Any,
                 threadpool: Any) -> None:
        super().__init__()
        self.config = config
        self.is_local_domain = is_local_domain
        self.ports = ports
        self.metrics = metrics
        self.reactor = reactor
        self.threadpool = threadpool

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1").rstrip("/")
        method = request.method
        autoconfig = self.config.web.autoconfig
        if path == "/metrics" and self.metrics is not None and self.config.web.metrics:
            if method not in (b"GET", b"HEAD"):
                return self._error(request, 405, "use GET")
            return self._in_thread(request, self._metrics)
        if autoconfig and path in ("/mail/config-v1.1.xml",
                                   "/.well-known/autoconfig/mail/config-v1.1.xml"):
            if method not in (b"GET", b"HEAD"):
                return self._error(request, 405, "use GET")
            address = _arg(request, b"emailaddress")
            return self._in_thread(request, self._thunderbird, address, _host(request),
                                   self._services())
        if autoconfig and path.lower() == "/autodiscover/autodiscover.xml":
            if method != b"POST":
                return self._error(request, 405, "use POST")
            body = request.content.read(MAX_BODY + 1) if request.content else b""
            return self._in_thread(request, self._autodiscover, body, self._services())
        if autoconfig and path == "/.well-known/mta-sts.txt":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return mta_sts_policy(self.config).encode()
        return self._error(request, 404, "not found")

    # -- helpers --------------------------------------------------------------------

    def _error(self, request: server.Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()

    def _in_thread(self, request: server.Request, f: Callable, *args: Any) -> int:
        """Run *f* (returning (code, content type, body)) in the pool; answer when done."""
        d = deferToThreadPool(self.reactor, self.threadpool, f, *args)
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(result: tuple[int, bytes, bytes]) -> None:
            if gone:
                return
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("web request {path} failed", failure, path=request.path)
            if not gone:
                answer((500, b"text/plain", b"internal error\n"))

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    def _domain_of(self, address: str | None) -> str | None:
        if not address or address.count("@") != 1:
            return None
        local, domain = address.split("@")
        domain = domain.strip().lower().rstrip(".")
        if not local or not domain or not self.is_local_domain(domain):
            return None
        return domain

    def _services(self) -> list[tuple[str, str, bool, int]]:
        """(role, protocol, implicit TLS, port) of the served roles; on the reactor thread."""
        ports = self.ports()
        return [(role, proto, tls, ports[role]) for role, proto, tls in SERVICES
                if role in ports]

    # -- the answers (run in a thread) ----------------------------------------------

    def _metrics(self) -> tuple[int, bytes, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST

        return 200, CONTENT_TYPE_LATEST.encode(), self.metrics.render()

    def _thunderbird(self, address: str | None, host: str | None,
                     services: list) -> tuple[int, bytes, bytes]:
        domain = self._domain_of(address)
        if domain is None and not address and host:
            # autoconfig.DOMAIN/mail/config-v1.1.xml without an address
            candidate = host.removeprefix("autoconfig.")
            domain = self._domain_of(f"x@{candidate}")
        if domain is None:
            return 404, b"text/plain", b"no such domain here\n"
        username = address if address else "%EMAILADDRESS%"
        return 200, b"application/xml; charset=utf-8", thunderbird_xml(
            self.config.hostname, domain, username, services)

    def _autodiscover(self, body: bytes, services: list) -> tuple[int, bytes, bytes]:
        address = _autodiscover_address(body) if len(body) <= MAX_BODY else None
        if address is None:
            return 400, b"text/plain", b"expected an autodiscover request with EMailAddress\n"
        if self._domain_of(address) is None:
            return 404, b"text/plain", b"no such domain here\n"
        return 200, b"application/xml; charset=utf-8", autodiscover_xml(
            self.config.hostname, address, services)


def _arg(request: server.Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace").strip() if values else None


def _host(request: server.Request) -> str | None:
    raw = request.getHeader(b"host")
    if not raw:
        return None
    host = raw.decode("latin-1").strip().lower()
    return host.rsplit(":", 1)[0] if not host.endswith("]") else None


def _autodiscover_address(body: bytes) -> str | None:
    """EMailAddress from an Outlook autodiscover request (no DTDs or entities)."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rpartition("}")[2] == "EMailAddress" and element.text:
            return element.text.strip()
    return None


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = text
    return element


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def thunderbird_xml(hostname: str, domain: str, username: str,
                    services: list[tuple[str, str, bool, int]]) -> bytes:
    """Thunderbird's clientConfig v1.1 for *domain*."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider")
    provider.set("id", domain)
    _sub(provider, "domain", domain)
    _sub(provider, "displayName", f"{domain} mail")
    _sub(provider, "displayShortName", domain)
    for _, proto, tls, port in services:
        tag = "outgoingServer" if proto == "smtp" else "incomingServer"
        server_el = _sub(provider, tag)
        server_el.set("type", proto)
        _sub(server_el, "hostname", hostname)
        _sub(server_el, "port", str(port))
        _sub(server_el, "socketType", "SSL" if tls else "STARTTLS")
        _sub(server_el, "authentication", "password-cleartext")
        _sub(server_el, "username", username)
    return _xml(root)


def autodiscover_xml(hostname: str, address: str,
                     services: list[tuple[str, str, bool, int]]) -> bytes:
    """Outlook's autodiscover response: one Protocol per kind, the preferred listener."""
    ET.register_namespace("", AUTODISCOVER_RESPONSE)
    root = ET.Element(f"{{{AUTODISCOVER_RESPONSE}}}Autodiscover")
    response = ET.SubElement(root, f"{{{AUTODISCOVER_OUTLOOK}}}Response")
    ns = f"{{{AUTODISCOVER_OUTLOOK}}}"
    account = _sub(response, f"{ns}Account")
    _sub(account, f"{ns}AccountType", "email")
    _sub(account, f"{ns}Action", "settings")
    seen: set[str] = set()
    for _, proto, tls, port in services:
        if proto in seen:
            continue
        seen.add(proto)
        protocol = _sub(account, f"{ns}Protocol")
        _sub(protocol, f"{ns}Type", {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}[proto])
        _sub(protocol, f"{ns}Server", hostname)
        _sub(protocol, f"{ns}Port", str(port))
        _sub(protocol, f"{ns}DomainRequired", "off")
        _sub(protocol, f"{ns}LoginName", address)
        _sub(protocol, f"{ns}SPA", "off")
        _sub(protocol, f"{ns}SSL", "on")
        _sub(protocol, f"{ns}Encryption", "SSL" if tls else "TLS")
        _sub(protocol, f"{ns}AuthRequired", "on")
    return _xml(root)


def build_site(config: Config, is_local_domain: Callable[[str], bool],
               ports: Callable[[], dict[str, int]], metrics: Any, reactor: Any,
               threadpool: Any) -> server.Site:
    """The twisted.web Site of the [web] listener."""
    site = server.Site(WebResource(config, is_local_domain, ports, metrics, reactor,
                                   threadpool))
    site.noisy = False
    site.displayTracebacks = False
    return site
