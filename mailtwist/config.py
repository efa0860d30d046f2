"""Configuration: one TOML file, a default for every key, clear errors.

Every key has a default, so mailtwist starts with no file at all. A wrong key or
value raises :class:`ConfigError` whose message names the key (or file) and
what is allowed; callers print that one line and stop.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ROLES = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
IMPLICIT_TLS_ROLES = frozenset({"submissions", "imaps", "pop3s"})

STANDARD_PORTS = {
    "smtp": 25,
    "submission": 587,
    "submissions": 465,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
}
UNPRIVILEGED_OFFSET = 10000

DEFAULT_CONFIG_FILE = "mailtwist.toml"
DEFAULT_DATA_DIR = "mailtwist-data"


class ConfigError(Exception):
    """A configuration problem, described in one line for the operator."""


def default_listeners(unprivileged: bool | None = None) -> dict[str, list[str]]:
    """Standard ports as root; every port plus 10000 otherwise (2525 is taken too often)."""
    if unprivileged is None:
        unprivileged = os.geteuid() != 0
    offset = UNPRIVILEGED_OFFSET if unprivileged else 0
    listeners = {}
    for role, port in STANDARD_PORTS.items():
        kind = "ssl" if role in IMPLICIT_TLS_ROLES else "tcp"
        listeners[role] = [f"{kind}:{port + offset}"]
    return listeners


@dataclass
class SMTPLimits:
    """Limits of the SMTP server, each with its config key under [smtp]."""

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 2048
    max_data_line: int = 65536
    max_errors: int = 20  # Postfix smtpd_hard_error_limit
    idle_timeout: int = 300


@dataclass
class QueueSettings:
    """Retry timing of the outbound queue, each with its config key under [queue].

    Times are seconds; the defaults follow Postfix (first retry after 5 minutes,
    doubling up to 4 hours, give up after 5 days, warn the sender after 4 hours).
    """

    retry_first: float = 300.0
    retry_max: float = 4 * 3600.0
    max_age: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    scan_interval: float = 60.0
    max_hops: int = 50
    concurrency: int = 20


@dataclass
class OutboundSettings:
    """How the queue talks to the world, each with its config key under [outbound]."""

    port: int = 25
    dns_servers: list[str] = field(default_factory=list)
    dns_timeout: float = 10.0
    ipv6: bool = True
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    tls: str = "may"
    tls_ca_file: Path | None = None
    max_recipients: int = 50
    relay_host: str | None = None
    relay_port: int = 587
    relay_tls: str = "starttls"
    relay_username: str | None = None
    relay_password: str | None = None
    relay_password_file: Path | None = None
    relay_domains: list[str] = field(default_factory=list)


@dataclass
class DKIMSettings:
    """DKIM signing of outgoing mail, under [dkim]."""

    sign: bool = True
    key_dir: Path | None = None


@dataclass
class FilterSettings:
    """The [filters] table: per SMTP role the filters to run, in order, the
    per-hook timeout and each filter's own settings ([filters.NAME])."""

    timeout: float = 30.0
    enabled: dict[str, list[str]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class AuthThrottleSettings:
    """Brute-force limits of logins (mailtwist/throttle.py), under [auth] next to
    failure_delay. Times are seconds."""

    max_delay: float = 30.0
    window: float = 900.0
    max_failures: int = 10
    block_time: float = 900.0
    account_max_failures: int = 100
    max_entries: int = 100_000
    #: Verified-login cache (mailtwist.auth.VerifiedCache): seconds an entry
    #: lives (0 turns the cache off) and how many entries are kept.
    cache_ttl: float = 300.0
    cache_size: int = 10_000


SMTP_ROLES = ("smtp", "submission", "submissions")
#: The [filters] lists: one per SMTP role, plus the outbound stage (mail leaving
#: for remote recipients) and IMAP mailbox events.
FILTER_CHAINS = (*SMTP_ROLES, "outbound", "mailbox")


@dataclass
class WebSettings:
    """The optional HTTP listener, under [web]: client autoconfiguration,
    the MTA-STS policy and Prometheus metrics (docs/operations.md)."""

    listen: list[str] = field(default_factory=list)
    autoconfig: bool = True
    metrics: bool = True


@dataclass
class LimitSettings:
    """Connection caps and slow-client limits, under [limits] (mailtwist/limits.py).

    Defaults follow Postfix (50 connections per client address, 500 bytes/s
    minimum DATA rate) and Dovecot (10 IMAP sessions per account and address,
    3 minutes to log in to IMAP); docs/security.md explains each.
    """

    max_connections: int = 5000
    max_connections_per_ip: int = 50
    max_sessions_per_user_ip: int = 10
    trusted_networks: list[str] = field(default_factory=list)
    min_data_rate: int = 500
    imap_login_timeout: int = 180
    imap_idle_timeout: int = 31 * 60


@dataclass
class Config:
    """The whole configuration, with defaults for every key."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    hostname: str = field(default_factory=socket.getfqdn)
    listen: dict[str, list[str]] = field(default_factory=default_listeners)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_auth: bool = False
    bcrypt_rounds: int = 12
    plus_separator: str = "+"
    postmaster: str | None = None
    pop3_idle_timeout: int = 600
    auth_failure_delay: float = 2.0
    shutdown_timeout: float = 30.0
    workers: int = 1
    auth_throttle: AuthThrottleSettings = field(default_factory=AuthThrottleSettings)
    smtp: SMTPLimits = field(default_factory=SMTPLimits)
    queue: QueueSettings = field(default_factory=QueueSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    dkim: DKIMSettings = field(default_factory=DKIMSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    web: WebSettings = field(default_factory=WebSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    source: Path | None = None

    @property
    def cert_path(self) -> Path:
        return self.tls_cert or self.data_dir / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.tls_key or self.tls_cert or self.data_dir / "tls" / "key.pem"


def _expect(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return value


def _positive_int(key: str, value: Any) -> int:
    _expect(key, value, int, "a positive integer")
    if value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _path(base: Path | None, key: str, value: Any) -> Path:
    _expect(key, value, str, "a file or directory path (string)")
    if not value:
        raise ConfigError(f"{key}: expected a path, got an empty string")
    if "\0" in value:
        raise ConfigError(f"{key}: a path cannot contain NUL")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~user" of no such user
        raise ConfigError(f"{key}: cannot expand {value.split('/')[0]!r}: no such user") from None
    if base is not None and not path.is_absolute():
        path = base / path
    return path


def _endpoints(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    _expect(key, value, list, "an endpoint string or a list of them (e.g. \"tcp:25\"), or \"none\"")
    result = []
    for item in value:
        _expect(key, item, str, "endpoint strings such as \"tcp:25\"")
        if item.strip().lower() == "none":
            return []
        if not item.strip():
            raise ConfigError(f"{key}: empty endpoint string")
        result.append(item.strip())
    return result


_TOP_KEYS = {
    "data_dir", "hostname", "allow_plaintext_auth", "bcrypt_rounds",
    "plus_separator", "postmaster", "shutdown_timeout", "workers", "listen", "tls", "smtp",
    "pop3", "auth",
    "queue", "outbound", "dkim", "filters", "web", "limits",
}


def _apply(config: Config, raw: Mapping[str, Any], base: Path | None) -> None:
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"unknown key {key!r}; allowed: {', '.join(sorted(_TOP_KEYS))}"
            )
    if "data_dir" in raw:
        config.data_dir = _path(base, "data_dir", raw["data_dir"])
    if "hostname" in raw:
        config.hostname = _hostname("hostname", raw["hostname"])
    if "allow_plaintext_auth" in raw:
        config.allow_plaintext_auth = _expect(
            "allow_plaintext_auth", raw["allow_plaintext_auth"], bool, "true or false"
        )
    if "bcrypt_rounds" in raw:
        rounds = _expect("bcrypt_rounds", raw["bcrypt_rounds"], int, "an integer 4..31")
        if not 4 <= rounds <= 31:
            raise ConfigError(f"bcrypt_rounds: expected an integer 4..31, got {rounds}")
        config.bcrypt_rounds = rounds
    if "plus_separator" in raw:
        sep = _expect("plus_separator", raw["plus_separator"], str, "one character or \"\"")
        if len(sep) > 1 or sep in ("@", " ", ":", ","):
            raise ConfigError(
                f"plus_separator: expected one character (e.g. \"+\" or \"-\") "
                f"or \"\" to disable, got {sep!r}"
            )
        config.plus_separator = sep
    if "postmaster" in raw:
        pm = _expect("postmaster", raw["postmaster"], str, "an address")
        if pm:
            from mailtwist.directory import DirectoryError, validate_address
            try:
                pm = validate_address(pm)
            except DirectoryError as e:
                raise ConfigError(f"postmaster: {e}") from None
        config.postmaster = pm or None
    if "workers" in raw:
        config.workers = _positive_int("workers", raw["workers"])
        if config.workers > 64:
            raise ConfigError(f"workers: expected at most 64 processes, got {config.workers}")
    if "shutdown_timeout" in raw:
        config.shutdown_timeout = _seconds("shutdown_timeout", raw["shutdown_timeout"],
                                           allow_zero=True)
    if "listen" in raw:
        listen = _expect("listen", raw["listen"], dict, "a table of role = endpoints")
        for role, value in listen.items():
            if role not in ROLES:
                raise ConfigError(
                    f"listen.{role}: unknown listener role; allowed: {', '.join(ROLES)}"
                )
            config.listen[role] = _endpoints(f"listen.{role}", value)
    if "tls" in raw:
        tls = _expect("tls", raw["tls"], dict, "a table with cert and key")
        for key in tls:
            if key not in ("cert", "key"):
                raise ConfigError(f"tls.{key}: unknown key; allowed: cert, key")
        if "cert" in tls:
            config.tls_cert = _path(base, "tls.cert", tls["cert"])
        if "key" in tls:
            config.tls_key = _path(base, "tls.key", tls["key"])
    if "smtp" in raw:
        smtp = _expect("smtp", raw["smtp"], dict, "a table of SMTP limits")
        allowed = [f.name for f in fields(SMTPLimits)]
        for key, value in smtp.items():
            if key not in allowed:
                raise ConfigError(f"smtp.{key}: unknown key; allowed: {', '.join(allowed)}")
            setattr(config.smtp, key, _positive_int(f"smtp.{key}", value))
    if "pop3" in raw:
        pop3 = _expect("pop3", raw["pop3"], dict, "a table")
        for key, value in pop3.items():
            if key != "idle_timeout":
                raise ConfigError(f"pop3.{key}: unknown key; allowed: idle_timeout")
            config.pop3_idle_timeout = _positive_int("pop3.idle_timeout", value)
    if "auth" in raw:
        auth = _expect("auth", raw["auth"], dict, "a table")
        throttle_keys = [f.name for f in fields(AuthThrottleSettings)]
        for key, value in auth.items():
            if key == "cache_ttl":
                _expect("auth.cache_ttl", value, (int, float), "seconds (a number >= 0)")
                if value < 0:
                    raise ConfigError(f"auth.cache_ttl: expected seconds >= 0, got {value}")
                config.auth_throttle.cache_ttl = float(value)
                continue
            if key in ("max_failures", "account_max_failures", "max_entries", "cache_size"):
                setattr(config.auth_throttle, key, _positive_int(f"auth.{key}", value))
                continue
            if key in throttle_keys:
                setattr(config.auth_throttle, key, _seconds(f"auth.{key}", value))
                continue
            if key != "failure_delay":
                raise ConfigError(f"auth.{key}: unknown key; allowed: "
                                  f"{', '.join(['failure_delay', *throttle_keys])}")
            _expect("auth.failure_delay", value, (int, float), "seconds (a number >= 0)")
            if value < 0:
                raise ConfigError(f"auth.failure_delay: expected seconds >= 0, got {value}")
            config.auth_failure_delay = float(value)
    _apply_queue(config, raw, base)
    if "filters" in raw:
        _apply_filters(config.filters, raw["filters"])
    if "web" in raw:
        _apply_web(config.web, raw["web"])
    if "limits" in raw:
        _apply_limits(config.limits, raw["limits"])


def _apply_limits(settings: LimitSettings, raw: Any) -> None:
    """[limits]: positive integers, trusted_networks a list of CIDR strings;
    the IMAP timeouts may not go below what RFC 3501 5.4 and clients need."""
    from mailtwist.limits import parse_networks

    table = _table(settings, "limits", raw)
    for key, value in table.items():
        name = f"limits.{key}"
        if key == "trusted_networks":
            _expect(name, value, list, 'a list of networks such as ["192.0.2.0/24"]')
            for item in value:
                _expect(name, item, str, 'network strings such as "192.0.2.0/24"')
            try:
                parse_networks(value)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
            settings.trusted_networks = list(value)
            continue
        value = _positive_int(name, value)
        if key == "imap_idle_timeout" and value < 30 * 60:
            raise ConfigError(f"{name}: expected at least 1800 seconds (RFC 3501 5.4: "
                              f"30 minutes), got {value}")
        setattr(settings, key, value)


def _apply_web(settings: WebSettings, raw: Any) -> None:
    """[web]: listen (endpoints, default none), autoconfig and metrics switches."""
    table = _table(settings, "web", raw)
    if "listen" in table:
        settings.listen = _endpoints("web.listen", table["listen"])
    for key in ("autoconfig", "metrics"):
        if key in table:
            setattr(settings, key, _expect(f"web.{key}", table[key], bool, "true or false"))


def _apply_filters(settings: FilterSettings, raw: Any) -> None:
    """[filters]: timeout, one list per SMTP role, and [filters.NAME] tables.
    Whether a name is installed and its settings are valid is checked when the
    filters are loaded (mailtwist.filters.loader)."""
    table = _expect("filters", raw, dict, "a table")
    for key, value in table.items():
        name = f"filters.{key}"
        if key == "timeout":
            settings.timeout = _seconds(name, value)
        elif key in FILTER_CHAINS:
            _expect(name, value, list, "a list of filter names")
            for item in value:
                if not isinstance(item, str) or not item.strip():
                    raise ConfigError(f"{name}: expected filter names (strings), got {item!r}")
            if len(set(value)) != len(value):
                raise ConfigError(f"{name}: a filter is listed twice")
            settings.enabled[key] = [item.strip() for item in value]
        elif isinstance(value, dict):
            settings.settings[key] = dict(value)
        else:
            raise ConfigError(f"{name}: unknown key; allowed: timeout, "
                              f"{', '.join(FILTER_CHAINS)}, or a [filters.NAME] settings table")
    enabled = {n for names in settings.enabled.values() for n in names}
    for key in settings.settings:
        if key not in enabled:
            raise ConfigError(f"filters.{key}: settings for a filter that no role enables")


def _seconds(key: str, value: Any, allow_zero: bool = False) -> float:
    _expect(key, value, (int, float), "seconds (a number)")
    if value < 0 or (value == 0 and not allow_zero):
        what = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: expected seconds {what}, got {value!r}")
    return float(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _table(config_part: Any, name: str, raw: Any) -> dict[str, Any]:
    table = _expect(name, raw, dict, "a table")
    allowed = [f.name for f in fields(config_part)]
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key; allowed: {', '.join(allowed)}")
    return table


def _apply_queue(config: Config, raw: Mapping[str, Any], base: Path | None) -> None:
    """The [queue], [outbound] and [dkim] tables."""
    if "queue" in raw:
        queue = _table(config.queue, "queue", raw["queue"])
        for key, value in queue.items():
            if key in ("max_hops", "concurrency"):
                setattr(config.queue, key, _positive_int(f"queue.{key}", value))
            else:
                setattr(config.queue, key,
                        _seconds(f"queue.{key}", value, allow_zero=key == "delay_warning"))
    if "outbound" in raw:
        out = _table(config.outbound, "outbound", raw["outbound"])
        for key, value in out.items():
            name = f"outbound.{key}"
            if key in ("port", "relay_port"):
                if _positive_int(name, value) > 65535:
                    raise ConfigError(f"{name}: expected a port 1..65535, got {value}")
            elif key in ("max_recipients",):
                _positive_int(name, value)
            elif key.endswith("_timeout"):
                value = _seconds(name, value)
            elif key == "ipv6":
                _expect(name, value, bool, "true or false")
            elif key == "tls":
                _choice(name, value, ("none", "may", "encrypt", "verify"))
            elif key == "relay_tls":
                _choice(name, value, ("starttls", "implicit", "verify", "none"))
            elif key in ("tls_ca_file", "relay_password_file"):
                value = _path(base, name, value)
            elif key == "dns_servers":
                value = _nameservers(name, value)
            elif key == "relay_domains":
                value = _domains(name, value)
            elif key == "relay_host":
                value = _relay_host(name, value)
            else:
                value = _expect(name, value, str, "a string") or None
            setattr(config.outbound, key, value)
        if config.outbound.relay_username and not (config.outbound.relay_password
                                                   or config.outbound.relay_password_file):
            raise ConfigError("outbound.relay_username: needs relay_password or "
                              "relay_password_file")
    if "dkim" in raw:
        dkim = _table(config.dkim, "dkim", raw["dkim"])
        if "sign" in dkim:
            config.dkim.sign = _expect("dkim.sign", dkim["sign"], bool, "true or false")
        if "key_dir" in dkim:
            config.dkim.key_dir = _path(base, "dkim.key_dir", dkim["key_dir"])


def _relay_host(key: str, value: Any) -> str | None:
    import ipaddress

    _expect(key, value, str, "a host name or IP address")
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return _hostname(key, value)


def _nameservers(key: str, value: Any) -> list[str]:
    from mailtwist.outbound.mx import parse_nameserver

    _expect(key, value, list, 'a list of addresses such as "192.0.2.53" or "127.0.0.1:5353"')
    for item in value:
        try:
            parse_nameserver(_expect(key, item, str, "address strings"))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IP address with an optional "
                              f"port") from None
    return list(value)


def _domains(key: str, value: Any) -> list[str]:
    _expect(key, value, list, "a list of domains")
    return [_hostname(key, item) for item in value]


def _hostname(key: str, value: Any) -> str:
    _expect(key, value, str, "a host name")
    labels = value.rstrip(".").split(".")
    if not value or any(
        not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label)
        for label in labels
    ) or not value.isascii():
        raise ConfigError(f"{key}: {value!r} is not a valid host name (e.g. mail.example.org)")
    return value.rstrip(".").lower()


def load_config(path: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the TOML file (``./mailtwist.toml`` when present if *path* is None),
    then apply *overrides* (command-line options, same keys as the file; ``listen``
    roles replace the file's list for that role)."""
    config = Config()
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
        try:
            _apply(config, raw, path.resolve().parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        config.source = path
    if overrides:
        _apply(config, dict(overrides), Path.cwd())
    return config


def sample_config() -> str:
    """The commented sample file ``mailtwist init`` writes."""
    listeners = default_listeners(unprivileged=False)
    listen_lines = "\n".join(
        f'# {role} = "{listeners[role][0]}"' for role in ROLES
    )
    limits = SMTPLimits()
    return f"""\
# mailtwist configuration. Every key is optional; shown are the defaults.
# Command-line options of `twistd mailtwist` override this file.

# Where accounts, mail, the queue and the self-signed certificate live.
# data_dir = "{DEFAULT_DATA_DIR}"

# The name this server gives in greetings and Received headers.
# hostname = "mail.example.org"

# Allow passwords over connections without TLS (never do this on the Internet).
# allow_plaintext_auth = false

# Cost of new password hashes.
# bcrypt_rounds = 12

# user+tag@domain is delivered to user@domain; "" disables.
# plus_separator = "+"

# Who gets postmaster@ mail of every domain without its own alias/account
# (default: the first account in the users file).
# postmaster = "admin@example.org"

# Processes serving the same listening sockets; the number of cores uses them
# all (docs/performance.md).
# workers = 1

# On stop, SMTP transactions in flight get this many seconds to finish;
# every other session is closed at once (docs/operations.md).
# shutdown_timeout = 30

[listen]
# Twisted endpoint strings, a string or a list; "none" disables a role.
# As root the standard ports are used; otherwise each port plus {UNPRIVILEGED_OFFSET}.
# "ssl:PORT" without a key uses the certificate from [tls].
{listen_lines}

[tls]
# PEM files; a self-signed certificate is made in data_dir/tls on first start.
# cert = "/etc/letsencrypt/live/mail.example.org/fullchain.pem"
# key = "/etc/letsencrypt/live/mail.example.org/privkey.pem"

[smtp]
# max_message_size = {limits.max_message_size}
# max_recipients = {limits.max_recipients}
# max_command_line = {limits.max_command_line}
# max_data_line = {limits.max_data_line}
# max_errors = {limits.max_errors}
# idle_timeout = {limits.idle_timeout}

[pop3]
# idle_timeout = 600

[auth]
# Seconds to wait before answering a failed login; doubled with each further
# failure from the same address or for the same account, up to max_delay.
# failure_delay = 2.0
# max_delay = 30
# Failures are forgotten after window seconds without one.
# window = 900
# An address with max_failures failures is refused for block_time seconds.
# max_failures = 10
# block_time = 900
# An account with this many failures is refused to addresses that have failed.
# account_max_failures = 100
# max_entries = 100000    # addresses (and accounts) remembered at most
# Successful logins are remembered (as keyed hashes, never the password) for
# cache_ttl seconds so repeated logins skip bcrypt; 0 turns this off. A
# password change or disabling the account ends the entry at once.
# cache_ttl = 300
# cache_size = 10000

[queue]
# Outbound retries, in seconds: first retry, doubling up to retry_max; give up
# and bounce after max_age; warn the sender once after delay_warning (0: never).
# retry_first = 300
# retry_max = 14400
# max_age = 432000
# delay_warning = 14400
# scan_interval = 60      # how soon `mailtwist queue flush|bounce` is noticed
# max_hops = 50           # Received headers before a message counts as a loop
# concurrency = 20        # messages delivered at once

[outbound]
# port = 25
# dns_servers = []        # e.g. ["192.0.2.53", "127.0.0.1:5353"]; default: resolv.conf
# tls = "may"             # none | may | encrypt | verify (certificate and host name)
# tls_ca_file = "/etc/ssl/certs/ca-certificates.crt"   # for "verify"; default: system
# connect_timeout = 30
# command_timeout = 300
# data_timeout = 600
# Send through a smarthost (all domains, or only relay_domains):
# relay_host = "smtp.example.net"
# relay_port = 587
# relay_tls = "starttls"  # starttls | implicit | verify | none
# relay_username = "user"
# relay_password_file = "/etc/mailtwist/relay-password"
# relay_domains = []

[filters]
# In-process filter plugins per SMTP role, run in this order (docs/filters.md);
# `mailtwist filters` lists the installed ones.
# timeout = 30            # seconds per hook; a timeout answers 451 4.7.1
# smtp = ["header_folder"]
# outbound = []           # before mail leaves for remote recipients
# mailbox = []            # told when IMAP copies/moves messages (e.g. into Junk)
# [filters.header_folder]
# header = "X-Spam-Flag"
# folder = "Junk"

[web]
# An HTTP listener for client autoconfiguration, the MTA-STS policy and
# Prometheus metrics (docs/operations.md); off by default.
# listen = "tcp:8080"     # "ssl:443" uses the certificate from [tls]
# autoconfig = true       # Thunderbird autoconfig, Outlook autodiscover, MTA-STS
# metrics = true          # /metrics

[limits]
# Connection caps (a connection over one is answered 421 / * BYE / -ERR at once)
# and slow-client limits; docs/security.md.
# max_connections = 5000          # all listeners together (also kept below the
#                                 # process's open-file limit)
# max_connections_per_ip = 50     # per client address (IPv6: per /64), per protocol
# max_sessions_per_user_ip = 10   # IMAP sessions of one account from one address
# trusted_networks = []           # exempt from the per-address caps, e.g. ["10.0.0.0/8"]
# min_data_rate = 500             # bytes/s a DATA or literal transfer must keep up
# imap_login_timeout = 180        # idle seconds before IMAP login
# imap_idle_timeout = 1860        # idle seconds after IMAP login (at least 1800)

[dkim]
# Sign mail from local domains with the keys `mailtwist dkim keygen DOMAIN` makes.
# sign = true
# key_dir = "<data_dir>/dkim"
"""
