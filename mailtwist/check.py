"""``mailtwist check``: a self-audit to run after setting a server up.

It reads the config and the data directory, talks to the server's own
listeners the way a client (or a spammer) would, and looks up the DNS
records of every local domain, then prints sections of ``OK``/``WARN``/``FAIL``
lines, each problem with a ``to fix:`` hint.  The exit status is 0 when
nothing FAILed.

This is a one-shot command, so its network I/O is plain blocking sockets:
``smtplib``-style dialogues written out here (so every byte is under our
control), :mod:`ssl` for the TLS probes, and :class:`BlockingResolver`, a tiny
UDP/TCP DNS client that answers ``twisted.names``-style lookups with Deferreds
that have already fired, so the record checks of :mod:`mailtwist.dnsrecords`
run unchanged, without a reactor.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import re
import socket
import ssl
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError

from mailtwist.config import IMPLICIT_TLS_ROLES, ROLES, Config

OK, WARN, FAIL = "OK", "WARN", "FAIL"
EXPIRY_WARN_DAYS = 14
PROBE_HELO = "mailtwist-check.invalid"
OUTSIDE = "relay-test.mailtwist.invalid"

#: Relay-test recipient forms (RFC 5321 section 3.6 and the classic relay
#: tests): ``{local}`` is a local domain.  The first three name an outside
#: destination outright and must be refused; the others end in a local domain,
#: so accepting them may mean local delivery (a catch-all): a warning.
RELAY_FORMS = (
    (f"probe@{OUTSIDE}", True),
    (f"@{{local}}:probe@{OUTSIDE}", True),
    ("probe@[192.0.2.1]", True),
    (f"probe%{OUTSIDE}@{{local}}", False),
    (f'"probe@{OUTSIDE}"@{{local}}', False),
    (f"probe@{OUTSIDE}@{{local}}", False),
    (f"{OUTSIDE}!probe@{{local}}", False),
)


@dataclass
class Finding:
    """One line of the report; *fix* says what to do about a WARN or FAIL."""

    status: str
    text: str
    fix: str = ""


@dataclass
class Section:
    title: str
    findings: list[Finding] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.findings.append(Finding(OK, text))

    def warn(self, text: str, fix: str) -> None:
        self.findings.append(Finding(WARN, text, fix))

    def fail(self, text: str, fix: str) -> None:
        self.findings.append(Finding(FAIL, text, fix))


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    def count(self, status: str) -> int:
        return sum(f.status == status for s in self.sections for f in s.findings)

    @property
    def failed(self) -> bool:
        return self.count(FAIL) > 0

    def format(self) -> str:
        lines: list[str] = []
        for section in self.sections:
            lines.append(f"== {section.title} ==")
            for finding in section.findings:
                lines.append(f"{finding.status:<5} {finding.text}")
                if finding.fix:
                    lines.append(f"      to fix: {finding.fix}")
            lines.append("")
        lines.append(f"{self.count(FAIL)} FAIL, {self.count(WARN)} WARN, {self.count(OK)} OK")
        return "\n".join(lines) + "\n"


# -- configuration and files ----------------------------------------------------------


def check_config(config: Config, domains: list[str] | None, section: Section) -> None:
    """Settings that make a server unsafe or unusable on the Internet (*domains*
    None: they could not be read, said elsewhere)."""
    source = config.source or "no config file: built-in defaults"
    section.ok(f"configuration loads ({source})")
    host = config.hostname
    if "." not in host or host == "localhost" or host.endswith(".localdomain"):
        section.fail(f"hostname {host!r} is not a fully qualified public name",
                     'set hostname = "mail.example.org" (the name in your MX record)')
    else:
        section.ok(f"hostname {host}")
    if config.allow_plaintext_auth:
        section.fail("allow_plaintext_auth = true: passwords may cross the network unencrypted",
                     "remove allow_plaintext_auth (or set it to false) in the config")
    else:
        section.ok("passwords only over TLS (allow_plaintext_auth = false)")
    if not config.listen.get("smtp"):
        section.warn("no smtp listener: this server receives no mail from other servers",
                     'set [listen] smtp = "tcp:25"')
    if not (config.listen.get("submission") or config.listen.get("submissions")):
        section.warn("no submission listener: your users cannot send mail",
                     'set [listen] submissions = "ssl:465" and/or submission = "tcp:587"')
    if config.bcrypt_rounds < 10:
        section.warn(f"bcrypt_rounds = {config.bcrypt_rounds}: password hashes are cheap to crack",
                     "set bcrypt_rounds = 12 (new and changed passwords use it)")
    if domains:
        section.ok(f"local domains: {', '.join(domains)}")
    elif domains is not None:
        section.fail("no local domains: all mail is refused",
                     "mailtwist domain add example.org")
    if (config.data_dir / "demo-password").exists():
        section.warn("the demo account of the embedded default still exists",
                     "mailtwist user del demo@example.test; mailtwist domain del example.test;"
                     f" rm {config.data_dir / 'demo-password'}")


def check_data_dir(config: Config, section: Section, limit: int = 200_000) -> None:
    """Private modes and one owner for everything in the data directory."""
    root = config.data_dir
    try:
        st = root.stat()
    except FileNotFoundError:
        section.fail(f"data directory {root} does not exist", "mailtwist init")
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        section.fail(f"{root} has mode {mode:04o}: other users can read mail and password"
                     " hashes", f"chmod 700 {root}")
    else:
        section.ok(f"{root} has mode {mode:04o}")
    owner = _user_name(st.st_uid)
    if st.st_uid == 0:
        section.warn(f"{root} is owned by root: the server runs with every privilege",
                     f"run twistd --uid mailtwist --gid mailtwist (it hands {root} over"
                     " to that user at start-up)")
    else:
        section.ok(f"{root} is owned by {owner}")
    strangers: list[Path] = []
    for count, (path, path_st) in enumerate(_walk(root)):
        if count >= limit:
            break
        if path_st.st_uid != st.st_uid:
            strangers.append(path)
    if strangers:
        example = strangers[0]
        section.fail(f"{len(strangers)} file(s) in {root} not owned by {owner}, e.g. {example}"
                     f" (owned by {_user_name(example.lstat().st_uid)}): the server may be"
                     " unable to write them",
                     f"chown -R {owner}: {root}")
    else:
        section.ok(f"everything in {root} is owned by {owner}")
    secrets = [root / "users", root / "tls" / "key.pem"]
    if config.tls_key is not None or config.tls_cert is not None:
        secrets.append(config.key_path)
    dkim_dir = config.dkim.key_dir or root / "dkim"
    if dkim_dir.is_dir():
        secrets += sorted(dkim_dir.rglob("*.key"))
    loose = []
    for path in secrets:
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                loose.append(path)
        except OSError:
            continue
    if loose:
        section.fail(f"readable by others: {', '.join(map(str, loose))}",
                     f"chmod 600 {' '.join(map(str, loose))}")
    else:
        section.ok("password hashes and private keys are mode 0600")


def _walk(root: Path):
    """(path, lstat) of everything under *root*; symlinks are not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                yield path, path.lstat()
            except OSError:
                continue


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# -- certificate ------------------------------------------------------------------


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is valid for (SAN, else the common name)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)]


def name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 matching: exact, or a wildcard for exactly the left-most label."""
    pattern, hostname = pattern.rstrip(".").lower(), hostname.rstrip(".").lower()
    if pattern.startswith("*."):
        return "." in hostname and hostname.split(".", 1)[1] == pattern[2:]
    return pattern == hostname


def check_certificate(pem: bytes, hostname: str, now: datetime.datetime,
                      section: Section, where: str = "certificate") -> x509.Certificate | None:
    """Expiry (FAIL when expired, WARN within 14 days), host name, self-signed.
    Returns the (first) certificate checked, None when *pem* holds none."""
    try:
        cert = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as e:
        section.fail(f"{where} is not a PEM certificate ({e})", "set [tls] cert to a PEM file")
        return None
    renew = ("renew it (e.g. certbot renew) and restart the server;"
             " a self-signed one: delete data_dir/tls and restart")
    not_after = _utc(cert.not_valid_after_utc)
    not_before = _utc(cert.not_valid_before_utc)
    days = (not_after - now).total_seconds() / 86400
    if not_after <= now:
        section.fail(f"{where} expired on {not_after:%Y-%m-%d}", renew)
    elif not_before > now:
        section.fail(f"{where} is not valid before {not_before:%Y-%m-%d}",
                     "check the system clock, or the certificate's dates")
    elif days < EXPIRY_WARN_DAYS:
        section.warn(f"{where} expires in {days:.0f} day(s), on {not_after:%Y-%m-%d}", renew)
    else:
        section.ok(f"{where} valid until {not_after:%Y-%m-%d} ({days:.0f} days)")
    names = cert_names(cert)
    if any(name_matches(n, hostname) for n in names):
        section.ok(f"{where} names {hostname}")
    else:
        section.fail(f"{where} does not name {hostname} (it names: {', '.join(names) or '-'})",
                     f"get a certificate for {hostname}, or set hostname to a name it has")
    if cert.issuer == cert.subject:
        section.warn(f"{where} is self-signed: mail clients warn, and senders that verify"
                     " (MTA-STS, DANE) cannot",
                     f"use a CA-signed certificate (e.g. certbot certonly -d {hostname}) and"
                     " set [tls] cert and key")
    else:
        section.ok(f"{where} issued by {cert.issuer.rfc4514_string()}")
    return cert


# -- talking to the listeners -------------------------------------------------------


class ProbeError(Exception):
    """The listener did not answer as the protocol says."""


class LineClient:
    """A blocking line-protocol client (the dialogues are a few lines each)."""

    def __init__(self, host: str, port: int, timeout: float,
                 sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def line(self) -> str:
        data = self.file.readline(65536)
        if not data:
            raise ProbeError("the server closed the connection")
        return data.decode("utf-8", "replace").rstrip("\r\n")

    def smtp_reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self.line()
            if len(line) < 3 or not line[:3].isdigit():
                raise ProbeError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def smtp(self, command: str) -> tuple[int, list[str]]:
        self.send(command)
        return self.smtp_reply()

    def imap(self, tag: str, command: str) -> list[str]:
        self.send(f"{tag} {command}")
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + " "):
                return lines

    def pop3(self, command: str, multiline: bool = False) -> list[str]:
        self.send(command)
        first = self.line()
        lines = [first]
        if multiline and first.startswith("+OK"):
            while (line := self.line()) != ".":
                lines.append(line)
        return lines


def _client_context(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A context that accepts any certificate (the certificate is checked on its own)
    and, with *version*, offers only that TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if version < ssl.TLSVersion.TLSv1_2:
                ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = version
            ctx.maximum_version = version
    return ctx


def _start_tls(kind: str, host: str, port: int, hostname: str, ctx: ssl.SSLContext,
               timeout: float) -> ssl.SSLSocket:
    """Connect, ask for TLS the protocol's way (or not: implicit TLS) and handshake."""
    client = LineClient(host, port, timeout)
    try:
        if kind == "smtp":
            client.smtp_reply()
            client.smtp(f"EHLO {PROBE_HELO}")
            code, lines = client.smtp("STARTTLS")
            if code != 220:
                raise ProbeError(f"STARTTLS answered {code} {' '.join(lines)}")
        elif kind == "imap":
            client.line()
            if not client.imap("t1", "STARTTLS")[-1].upper().startswith("T1 OK"):
                raise ProbeError("STARTTLS refused")
        elif kind == "pop3":
            client.line()
            if not client.pop3("STLS")[0].startswith("+OK"):
                raise ProbeError("STLS refused")
        client.file.close()
        return ctx.wrap_socket(client.sock, server_hostname=hostname)
    except BaseException:
        client.close()
        raise


def _tls_versions(kind: str, host: str, port: int, hostname: str, timeout: float,
                  section: Section, configured_der: bytes | None) -> None:
    """TLS 1.0 and 1.1 must be refused, 1.2 accepted; 1.3 is reported."""
    results: dict[str, str | None] = {}
    presented = None
    for name, version in (("1.0", ssl.TLSVersion.TLSv1), ("1.1", ssl.TLSVersion.TLSv1_1),
                          ("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)):
        try:
            ctx = _client_context(version)
        except (ssl.SSLError, ValueError):
            results[name] = "untestable"
            continue
        try:
            tls = _start_tls(kind, host, port, hostname, ctx, timeout)
        except ssl.SSLError as e:
            reason = getattr(e, "reason", "") or ""
            results[name] = "untestable" if "NO_PROTOCOLS" in reason else None
            continue
        except (OSError, ProbeError) as e:
            results[name] = None if version < ssl.TLSVersion.TLSv1_2 else f"error: {e}"
            continue
        results[name] = tls.version() or "yes"
        presented = presented or tls.getpeercert(binary_form=True)
        tls.close()
    old = [n for n in ("1.0", "1.1") if results.get(n) not in (None, "untestable")]
    if old:
        section.fail(f"accepts TLS {' and '.join(old)} (broken protocol versions)",
                     "mailtwist refuses them: is something else (a TLS proxy) answering on"
                     " this port?")
    else:
        untestable = [n for n in ("1.0", "1.1") if results.get(n) == "untestable"]
        note = f" (this system cannot offer TLS {', '.join(untestable)})" if untestable else ""
        section.ok(f"TLS 1.0 and 1.1 refused{note}")
    modern = [n for n in ("1.2", "1.3") if results.get(n) and results[n] != "untestable"
              and not str(results[n]).startswith("error")]
    if "1.2" in modern:
        section.ok(f"TLS {' and '.join(modern)} accepted")
    else:
        section.fail(f"TLS 1.2 handshake failed ({results.get('1.2')})",
                     "check [tls] cert and key, and the server's log")
    if presented is not None and configured_der is not None and presented != configured_der:
        section.warn("presents a different certificate than the configured one",
                     "mailtwist reload (or restart the server) after renewing the"
                     " certificate")


def _relay_probe(host: str, port: int, local: str, timeout: float, section: Section,
                 forms=RELAY_FORMS, mail_refusal_counts: bool = False) -> None:
    """Unauthenticated MAIL FROM an outside address, RCPT TO the relay-test forms,
    one connection each, never DATA.  Where MAIL itself is refused the probe
    learns nothing, unless *mail_refusal_counts* (submission: 530 before MAIL)."""
    relayed, local_accepts, untested = [], [], []
    for form, outside in forms:
        rcpt = form.format(local=local)
        client = LineClient(host, port, timeout)
        try:
            client.smtp_reply()
            client.smtp(f"EHLO {PROBE_HELO}")
            code, lines = client.smtp(f"MAIL FROM:<probe@{OUTSIDE}>")
            if code != 250:
                if not mail_refusal_counts:
                    untested.append(f"{code} {' '.join(lines)}")
                continue
            code, _ = client.smtp(f"RCPT TO:<{rcpt}>")
            if code in (250, 251):
                (relayed if outside else local_accepts).append(rcpt)
            client.smtp("RSET")
            client.send("QUIT")
        except (OSError, ProbeError) as e:
            untested.append(str(e))
        finally:
            client.close()
    if relayed:
        section.fail(f"open relay: accepted mail for {', '.join(relayed)} without"
                     " authentication", "mailtwist never relays unauthenticated mail: find"
                     " what answers on this port (a proxy, another MTA?), or report a bug")
    elif untested:
        section.warn(f"relay probe inconclusive: {untested[0]}",
                     "make sure the server accepts MAIL FROM other domains on this port")
    else:
        count = sum(outside for _, outside in forms)
        section.ok(f"no open relay (unauthenticated mail for {count} outside address"
                   f" form{'s' if count > 1 else ''} refused)")
    if local_accepts:
        section.warn(f"accepted {', '.join(local_accepts)} (a catch-all takes it locally?)",
                     "make sure such mail stays local: mailtwist alias list")


def probe_smtp(role: str, host: str, port: int, config: Config, local: str,
               timeout: float, section: Section, der: bytes | None) -> None:
    if role in IMPLICIT_TLS_ROLES:
        _implicit(host, port, config, timeout, section, der)
        return
    client = LineClient(host, port, timeout)
    try:
        code, lines = client.smtp_reply()
        if code != 220:
            section.fail(f"banner {code} {' '.join(lines)}", "check the server's log")
            return
        section.ok(f"banner: {code} {lines[0]}")
        code, lines = client.smtp(f"EHLO {PROBE_HELO}")
        if code != 250:
            section.fail(f"EHLO answered {code}", "check the server's log")
            return
        keywords = {line.split(" ", 1)[0].upper() for line in lines[1:]}
        if "STARTTLS" in keywords:
            section.ok("STARTTLS offered")
        else:
            section.fail("STARTTLS not offered: mail to and from this server travels in clear",
                         "configure [tls] cert and key")
        if "AUTH" in keywords:
            section.fail("AUTH offered before TLS: passwords may be sent unencrypted",
                         "remove allow_plaintext_auth from the config")
        else:
            section.ok("AUTH not offered before TLS")
        client.send("QUIT")
    finally:
        client.close()
    if "STARTTLS" in keywords:
        _tls_versions("smtp", host, port, config.hostname, timeout, section, der)
        if role == "submission":
            _auth_after_tls(host, port, config, timeout, section)
    if role == "smtp":
        _relay_probe(host, port, local, timeout, section)
    else:
        _relay_probe(host, port, local, timeout, section, RELAY_FORMS[:1],
                     mail_refusal_counts=True)


def _auth_after_tls(host: str, port: int, config: Config, timeout: float,
                    section: Section) -> None:
    try:
        tls = _start_tls("smtp", host, port, config.hostname, _client_context(), timeout)
    except (OSError, ProbeError) as e:
        section.fail(f"STARTTLS failed: {e}", "check [tls] and the server's log")
        return
    client = LineClient(host, port, timeout, sock=tls)
    try:
        _, lines = client.smtp(f"EHLO {PROBE_HELO}")
        if any(line.upper().startswith("AUTH") for line in lines[1:]):
            section.ok("AUTH offered after STARTTLS")
        else:
            section.fail("AUTH not offered after STARTTLS: your users cannot log in",
                         "check the server's log")
    finally:
        client.close()


def _greeting(section: Section, greeting: str, good: bool) -> bool:
    """Report an IMAP or POP3 listener's greeting; FAIL (and False) unless *good*."""
    if not good:
        section.fail(f"greeting {greeting[:80]!r}", "check the server's log")
        return False
    section.ok(f"greeting: {greeting[:60]}")
    return True


def _tls_offered(section: Section, command: str, offered: bool) -> bool:
    """Report whether the TLS upgrade *command* (STARTTLS, STLS) is offered; *offered*."""
    if offered:
        section.ok(f"{command} offered")
    else:
        section.fail(f"{command} not offered", "configure [tls] cert and key")
    return offered


def probe_imap(role: str, host: str, port: int, config: Config, timeout: float,
               section: Section, der: bytes | None) -> None:
    if role in IMPLICIT_TLS_ROLES:
        _implicit(host, port, config, timeout, section, der)
        return
    client = LineClient(host, port, timeout)
    try:
        greeting = client.line()
        if not _greeting(section, greeting, greeting.upper().startswith("* OK")):
            return
        caps = " ".join(client.imap("c1", "CAPABILITY")).upper().split()
        starttls = _tls_offered(section, "STARTTLS", "STARTTLS" in caps)
        if "LOGINDISABLED" in caps:
            section.ok("LOGINDISABLED before STARTTLS")
        else:
            section.fail("LOGIN allowed before STARTTLS (no LOGINDISABLED): passwords may be"
                         " sent unencrypted", "remove allow_plaintext_auth from the config")
        client.send("c2 LOGOUT")
    finally:
        client.close()
    if starttls:
        _tls_versions("imap", host, port, config.hostname, timeout, section, der)


def probe_pop3(role: str, host: str, port: int, config: Config, timeout: float,
               section: Section, der: bytes | None) -> None:
    if role in IMPLICIT_TLS_ROLES:
        _implicit(host, port, config, timeout, section, der)
        return
    client = LineClient(host, port, timeout)
    try:
        greeting = client.line()
        if not _greeting(section, greeting, greeting.startswith("+OK")):
            return
        caps = [line.upper() for line in client.pop3("CAPA", multiline=True)[1:]]
        stls = _tls_offered(section, "STLS", "STLS" in caps)
        answer = client.pop3("USER mailtwist-check")[0]
        if answer.startswith("+OK"):
            section.fail("USER accepted before STLS: passwords may be sent unencrypted",
                         "remove allow_plaintext_auth from the config")
        else:
            section.ok("USER refused before STLS")
        client.send("QUIT")
    finally:
        client.close()
    if stls:
        _tls_versions("pop3", host, port, config.hostname, timeout, section, der)


def _implicit(host: str, port: int, config: Config, timeout: float, section: Section,
              der: bytes | None) -> None:
    try:
        _start_tls("tls", host, port, config.hostname, _client_context(), timeout).close()
    except (OSError, ProbeError) as e:
        section.fail(f"no TLS handshake: {e}", "check [tls] and the server's log")
        return
    section.ok("implicit TLS handshake")
    _tls_versions("tls", host, port, config.hostname, timeout, section, der)


def listener_targets(config: Config, server: str | None) -> list[tuple[str, str, int]]:
    """(role, host, port) of the first TCP listener of each role: *server* if given,
    else the endpoint's interface (a wildcard interface means this host)."""
    from mailtwist.dnsrecords import endpoint_port

    targets = []
    for role in ROLES:
        for description in config.listen.get(role, []):
            port = endpoint_port(description)
            if port is None:
                continue
            parts = re.split(r"(?<!\\):", description)
            interface = next((p.split("=", 1)[1].replace("\\:", ":") for p in parts
                              if p.startswith("interface=")), "")
            if server:
                host = server
            elif interface in ("", "0.0.0.0"):
                host = "127.0.0.1"
            elif interface == "::":
                host = "::1"
            else:
                host = interface
            targets.append((role, host, port))
            break
    return targets


# -- DNS -------------------------------------------------------------------------


class BlockingResolver:
    """The ``twisted.names`` lookups :mod:`mailtwist.dnsrecords` uses, done with
    blocking sockets; each returns a Deferred that has already fired."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = 5.0) -> None:
        self.servers = servers
        self.timeout = timeout
        self.dead: set[tuple[str, int]] = set()

    def query(self, name: str, rtype: int) -> tuple[list, list, list]:
        """Ask each server in turn; NXDOMAIN raises DNSNameError.  A server that
        timed out once is not asked again (a dozen lookups must not take minutes)."""
        last: Exception = TimeoutError("no DNS server answered")
        for server in self.servers:
            if server in self.dead:
                continue
            try:
                message = self._ask(*server, name, rtype)
            except (OSError, EOFError, ValueError) as e:
                if isinstance(e, (TimeoutError, socket.timeout, ConnectionRefusedError)):
                    self.dead.add(server)
                last = e
                continue
            if message.rCode == dns.ENAME:
                raise DNSNameError(name)
            if message.rCode != dns.OK:
                last = DomainError(f"{name}: rcode {message.rCode}")
                continue
            return message.answers, message.authority, message.additional
        raise last

    def _ask(self, host: str, port: int, name: str, rtype: int) -> dns.Message:
        query = dns.Message(id=random.randrange(1, 65536), recDes=1)
        query.addQuery(name.encode("idna") if not name.isascii() else name.encode(),
                       rtype, dns.IN)
        data = query.toStr()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.sendto(data, (host, port))
            while True:
                packet, _ = sock.recvfrom(65535)
                answer = dns.Message()
                answer.fromStr(packet)
                if answer.id == query.id:
                    break
        if not answer.trunc:
            return answer
        with socket.create_connection((host, port), timeout=self.timeout) as sock:
            sock.sendall(struct.pack("!H", len(data)) + data)
            stream = sock.makefile("rb")
            (length,) = struct.unpack("!H", _read_exactly(stream, 2))
            answer = dns.Message()
            answer.fromStr(_read_exactly(stream, length))
            return answer

    def _lookup(self, name: str, rtype: int) -> defer.Deferred:
        try:
            return defer.succeed(self.query(name, rtype))
        except Exception:  # noqa: BLE001 - handed to the caller as a failure
            return defer.fail()

    def lookupMailExchange(self, name, timeout=None):
        return self._lookup(name, dns.MX)

    def lookupText(self, name, timeout=None):
        return self._lookup(name, dns.TXT)

    def lookupService(self, name, timeout=None):
        return self._lookup(name, dns.SRV)

    def lookupAddress(self, name, timeout=None):
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._lookup(name, dns.AAAA)

    def lookupPointer(self, name, timeout=None):
        return self._lookup(name, dns.PTR)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("short DNS answer over TCP")
    return data


# Which published records a working mail domain cannot do without.
_REQUIRED = ("MX", "SPF", "DKIM", "DMARC")


def _kind(record) -> str:
    if record.type == "MX":
        return "MX"
    if "._domainkey." in record.name:
        return "DKIM"
    if record.name.startswith("_dmarc."):
        return "DMARC"
    if record.type == "TXT" and record.value.startswith("v=spf1"):
        return "SPF"
    if record.name.startswith("_mta-sts."):
        return "MTA-STS"
    if record.name.startswith("_smtp._tls."):
        return "TLSRPT"
    return record.type


def check_dns(config: Config, domain: str, resolver, section: Section) -> None:
    """MX, SPF, DKIM, DMARC (FAIL when missing or wrong), MTA-STS, TLSRPT and SRV
    (WARN), the host's address and its PTR (FAIL when it does not name the host)."""
    from mailtwist.dkim import public_records
    from mailtwist.dnsrecords import check_records, configured_ports, expected_records
    from mailtwist.queue.service import dkim_key_dir

    keys = public_records(dkim_key_dir(config), domain)
    records = expected_records(config, domain, keys, configured_ports(config))
    results: list = []
    check_records(resolver, config.hostname, records, config.outbound.dns_timeout
                  ).addCallback(results.extend)
    if not keys:
        section.fail(f"no DKIM key for {domain}: receivers see unsigned mail",
                     f"mailtwist dkim keygen {domain}, then publish the record it prints")
    host_result, *record_results = results
    srv_missing = []
    for result in record_results:
        kind = _kind(result.record)
        fix = f"publish: {result.record.zone_line()}"
        if kind == "SRV":
            if result.status != "ok":
                srv_missing.append(result.record.name)
            continue
        label = f"{kind} {result.record.name}"
        if result.status == "ok":
            section.ok(f"{label} published")
        elif kind in _REQUIRED:
            section.fail(f"{label} {result.status}{_detail(result)}", fix)
        else:
            section.warn(f"{label} {result.status}{_detail(result)}", fix)
    if srv_missing:
        section.warn(f"{len(srv_missing)} SRV record(s) for mail clients missing or wrong,"
                     f" e.g. {srv_missing[0]}", f"publish the SRV lines of: mailtwist dns {domain}")
    elif any(_kind(r.record) == "SRV" for r in record_results):
        section.ok("SRV records for mail clients published")
    if host_result.status != "ok":
        section.fail(f"{config.hostname} has no A/AAAA record ({host_result.status}"
                     f"{' ' + host_result.detail if host_result.detail else ''})",
                     f"publish: {config.hostname}. IN A <this server's public address>")
        return
    section.ok(f"{config.hostname} has address(es) {', '.join(host_result.found)}")
    for address in host_result.found:
        check_ptr(resolver, config.hostname, address, section)


def _detail(result) -> str:
    if result.found:
        return f" (found: {' | '.join(result.found)})"
    return f" ({result.detail})" if result.detail else ""


def check_ptr(resolver, hostname: str, address: str, section: Section) -> None:
    """The reverse name of *address* must be *hostname* (receivers check it, RFC 8461 aside)."""
    reverse = ipaddress.ip_address(address).reverse_pointer
    names: list[str] = []
    error: list[str] = []

    def found(result) -> None:
        answers, _, _ = result
        names.extend(str(a.payload.name).rstrip(".").lower()
                     for a in answers if a.type == dns.PTR)

    def failed(failure) -> None:
        error.append("missing" if failure.check(DNSNameError, DomainError)
                     else failure.getErrorMessage())

    resolver.lookupPointer(reverse).addCallbacks(found, failed)
    fix = (f"ask whoever runs {address} (your hosting provider) to set its reverse DNS"
           f" (PTR) to {hostname}")
    if hostname.lower() in names:
        section.ok(f"PTR of {address} is {hostname}")
    elif names:
        section.fail(f"PTR of {address} is {', '.join(names)}, not {hostname}", fix)
    else:
        section.fail(f"PTR of {address} {error[0] if error else 'missing'}", fix)


# -- the whole audit ----------------------------------------------------------------


def run_check(config: Config, *, server: str | None = None,
              dns_servers: list[tuple[str, int]] | None = None,
              now: datetime.datetime | None = None, timeout: float = 10.0) -> Report:
    """Audit *config*'s server; blocking (the CLI's own process, never the server's)."""
    from mailtwist.directory import FileDirectory
    from mailtwist.outbound.mx import parse_nameserver, system_nameservers

    now = now or datetime.datetime.now(datetime.UTC)
    report = Report()
    domains: list[str] = []
    unreadable = None
    if config.data_dir.is_dir():
        try:
            domains = FileDirectory(config.data_dir).domains()
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            unreadable = str(e)
    section = report.section("Configuration")
    if unreadable is not None:
        section.fail(f"cannot read the local domains: {unreadable}",
                     "run mailtwist check as root or as the server's user")
    check_config(config, None if unreadable is not None else domains, section)
    check_data_dir(config, report.section(f"Data directory {config.data_dir}"))

    cert_section = report.section(f"Certificate {config.cert_path}")
    der = None
    try:
        pem = config.cert_path.read_bytes()
    except OSError as e:
        cert_section.fail(f"cannot read {config.cert_path}: {e.strerror}",
                          "set [tls] cert, or start the server once to make a self-signed one")
    else:
        cert = check_certificate(pem, config.hostname, now, cert_section)
        if cert is not None:
            from cryptography.hazmat.primitives.serialization import Encoding

            der = cert.public_bytes(Encoding.DER)

    local = domains[0] if domains else config.hostname
    for role, host, port in listener_targets(config, server):
        section = report.section(f"{role} listener {host}:{port}")
        try:
            if role in ("smtp", "submission", "submissions"):
                probe_smtp(role, host, port, config, local, timeout, section, der)
            elif role in ("imap", "imaps"):
                probe_imap(role, host, port, config, timeout, section, der)
            else:
                probe_pop3(role, host, port, config, timeout, section, der)
        except (OSError, ProbeError) as e:
            section.fail(f"cannot talk to {host}:{port}: {e}",
                         "is the server running (twistd -n mailtwist)? does a firewall"
                         " block the port?")

    out = config.outbound
    if dns_servers is None:
        dns_servers = ([parse_nameserver(s) for s in out.dns_servers] if out.dns_servers
                       else system_nameservers())
    resolver = BlockingResolver(dns_servers, min(out.dns_timeout, timeout))
    for domain in domains:
        check_dns(config, domain, resolver, report.section(f"DNS for {domain}"))
    return report
