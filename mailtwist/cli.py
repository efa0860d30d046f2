"""``mailtwist``: the admin command for the data directory.

Sets up a data directory (``init``) and edits domains, users and aliases
through `mailtwist.directory.FileDirectory`; a running server picks the
changes up by itself.  Errors are printed as one line,
``mailtwist: error: ...``, with exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from mailtwist.config import (
    DEFAULT_CONFIG_FILE,
    Config,
    ConfigError,
    load_config,
    sample_config,
)
from mailtwist.directory import (
    DUMMY_HASH,
    DirectoryError,
    FileDirectory,
    NewAccount,
    validate_address,
    validate_domain,
)
from mailtwist.queue.envelope import EnvelopeError
from mailtwist.queue.spool import SpoolError

PROG = "mailtwist"

_QUOTA_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_QUOTA_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class CommandError(Exception):
    """A problem the admin must fix; printed as one line."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    observer = _print_directory_warnings
    globalLogPublisher.addObserver(observer)
    try:
        status = args.handler(args)
    except (CommandError, DirectoryError, ConfigError, SpoolError, EnvelopeError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(_describe_os_error(e))
    except (KeyboardInterrupt, EOFError):
        _fail("interrupted")
        return 130
    finally:
        globalLogPublisher.removeObserver(observer)
    return status if isinstance(status, int) else 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _describe_os_error(error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.filename is not None:
        return f"{error.filename}: {reason}"
    return reason


def _print_directory_warnings(event: LogEvent) -> None:
    """Show the admin what the directory skipped (malformed lines and such)."""
    if not event.get("log_namespace", "").startswith("mailtwist."):
        return
    if event.get("log_level", LogLevel.info) < LogLevel.warn:
        return
    print(f"{PROG}: warning: {formatEvent(event)}", file=sys.stderr)


# -- argument parsing ------------------------------------------------------------


def _quota(text: str) -> int:
    match = _QUOTA_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid quota {text!r}"
            " (bytes, optionally with K, M, G or T; 0 = unlimited)"
        )
    return int(match.group(1)) * _QUOTA_UNITS[match.group(2).lower()]


def _build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before and after the subcommand; SUPPRESS
    # keeps a subcommand's parser from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, default=argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer a mailtwist mail server: domains, users, aliases,"
        " the outbound queue and DKIM keys.",
        epilog="Changes take effect in a running server without a restart.",
    )
    _add_global_options(parser, default=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        parent: Any, name: str, handler: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    init = command(
        commands, "init", _init, "create the data directory and a sample config"
    )
    init.add_argument("--domain", help="a first local domain to add")
    init.add_argument(
        "--hostname", help="this server's host name (for the certificate)"
    )
    _add_init_options(init)

    domain = commands.add_parser(
        "domain", help="add, delete or list local domains", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    command(domain, "add", _domain_add, "add a local domain").add_argument("domain")
    command(
        domain, "del", _domain_del, "delete a domain without accounts or aliases"
    ).add_argument("domain")
    command(domain, "list", _domain_list, "list the local domains")

    user = commands.add_parser(
        "user", help="manage accounts", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    add = command(user, "add", _user_add, "create an account")
    add.add_argument("address")
    add.add_argument(
        "--quota",
        type=_quota,
        default=0,
        metavar="BYTES",
        help="mailbox quota in bytes; K, M, G, T suffixes are powers of 1024"
        " (default: 0, unlimited)",
    )
    passwd = command(user, "passwd", _user_passwd, "set an account's password")
    passwd.add_argument("address")
    for sub in (add, passwd):
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password as one line from standard input"
            " (otherwise it is asked for twice on the terminal)",
        )
    command(
        user, "del", _user_del, "delete an account (its stored mail is kept)"
    ).add_argument("address")
    command(user, "list", _user_list, "list accounts").add_argument(
        "domain", nargs="?", help="only this domain's accounts"
    )
    command(
        user, "disable", _user_disable, "forbid logins (mail is still delivered)"
    ).add_argument("address")
    command(user, "enable", _user_enable, "allow logins again").add_argument("address")
    user_import = command(
        user,
        "import",
        _user_import,
        "import accounts from a Dovecot passwd-file (bcrypt hashes only)",
    )
    user_import.add_argument("file", metavar="FILE", help="passwd-file, or - for stdin")
    user_import.add_argument(
        "--disabled-placeholder",
        action="store_true",
        help="create accounts whose hash scheme is not supported, disabled and"
        " with no usable password (set one with mailtwist user passwd, then"
        " mailtwist user enable)",
    )
    user_import.add_argument(
        "--domain",
        help="domain for user names without '@' (Dovecot's %%n logins)",
    )

    alias = commands.add_parser(
        "alias", help="manage aliases and catch-alls", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    alias_add = command(
        alias,
        "add",
        _alias_add,
        "add an alias (or targets to an existing one); '@domain' is a catch-all",
    )
    alias_add.add_argument("alias")
    alias_add.add_argument("targets", nargs="+", metavar="TARGET")
    alias_del = command(
        alias, "del", _alias_del, "delete an alias, or only one of its targets"
    )
    alias_del.add_argument("alias")
    alias_del.add_argument("target", nargs="?")
    command(alias, "list", _alias_list, "list aliases")
    alias_import = command(
        alias,
        "import",
        _alias_import,
        "merge a Postfix virtual alias map into the aliases",
    )
    alias_import.add_argument(
        "file", metavar="FILE", help="virtual map source file, or - for stdin"
    )
    for sub in (user_import, alias_import):
        sub.add_argument(
            "--add-domains",
            action="store_true",
            help="add the domains that are not local yet (otherwise their"
            " entries are reported and left out)",
        )

    queue = commands.add_parser(
        "queue", help="inspect and manage the outbound queue", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    command(queue, "list", _queue_list, "list queued messages and why they wait")
    command(queue, "show", _queue_show, "show one message's envelope and headers").add_argument(
        "id"
    )
    command(
        queue, "flush", _queue_flush, "retry now (all messages, or the ones given)"
    ).add_argument("ids", nargs="*", metavar="ID")
    command(
        queue, "delete", _queue_delete, "delete messages without notifying anyone"
    ).add_argument("ids", nargs="+", metavar="ID")
    command(
        queue, "bounce", _queue_bounce, "give up on messages and notify their senders"
    ).add_argument("ids", nargs="+", metavar="ID")

    dkim = commands.add_parser(
        "dkim", help="DKIM signing keys", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = command(
        dkim, "keygen", _dkim_keygen, "make a signing key and print the DNS record"
    )
    keygen.add_argument("domain")
    keygen.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (2048 bits, understood everywhere) or ed25519 (RFC 8463); default rsa",
    )
    keygen.add_argument(
        "--selector", help="DNS selector (default: ALGORITHM-YYYYMM, e.g. rsa-202611)"
    )
    command(dkim, "show", _dkim_show, "print the DNS records of a domain's keys").add_argument(
        "domain"
    )
    dns_command = command(commands, "dns", _dns,
                          "print the DNS records a domain needs, or check them (--check)")
    dns_command.add_argument("domain")
    dns_command.add_argument(
        "--check", action="store_true",
        help="look the records up (with [outbound] dns_servers) and report each as"
        " ok, missing or wrong; exit status 1 unless all are ok")
    _add_check_command(command(
        commands, "check", _check, "audit this server: config, files, certificate, its"
        " listeners (TLS, plaintext passwords, open relay) and each domain's DNS records"))
    command(commands, "filters", _filters,
            "list installed filters, the roles that enable them, and check their settings")
    reload_command = command(
        commands, "reload", _reload,
        "make the running server re-read its config, certificate, filters and users")
    reload_command.add_argument(
        "--pid-file", metavar="FILE",
        help="the server's pid file (default: DATA_DIR/mailtwist.pid, written by the"
        " server at start; or the file given to twistd --pidfile)")
    quarantine = commands.add_parser(
        "quarantine", help="messages held back by filters", parents=[common]
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    command(quarantine, "list", _quarantine_list, "list quarantined messages and why")
    command(quarantine, "show", _quarantine_show,
            "show one message's envelope and headers").add_argument("id")
    command(quarantine, "release", _quarantine_release,
            "deliver messages to their original recipients, skipping the filters"
            ).add_argument("ids", nargs="+", metavar="ID")
    command(quarantine, "delete", _quarantine_delete,
            "delete quarantined messages").add_argument("ids", nargs="+", metavar="ID")
    return parser


def _reload(args: argparse.Namespace) -> None:
    """Send SIGHUP to the running server; its log says "reloaded" or "reload refused"."""
    import signal

    from mailtwist.reload import pid_file

    path = Path(args.pid_file) if args.pid_file else pid_file(_load_config(args))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CommandError(f"the server is not running: no pid file {path} (start it with:"
                           " twistd mailtwist, or give --pid-file)") from None
    try:
        pid = int(text.strip())
        if pid <= 1:
            raise ValueError(pid)
    except ValueError:
        raise CommandError(f"{path}: not a process id: {text.strip()[:40]!r}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(f"the server is not running: process {pid} from {path} "
                           "is gone (stale pid file)") from None
    except PermissionError:
        raise CommandError(f"not allowed to signal process {pid}: run this as the "
                           "server's user or root") from None
    print(f"sent SIGHUP to mailtwist (pid {pid}); its log says \"reloaded configuration\""
          " or \"reload refused: <reason>\"")


def _filters(args: argparse.Namespace) -> None:
    from mailtwist.filters.loader import build_chains, format_listing

    config = _load_config(args)
    sys.stdout.write(format_listing(config))
    build_chains(config)


# -- quarantine ------------------------------------------------------------------


def _quarantine(args: argparse.Namespace):
    from mailtwist.quarantine import QuarantineStore

    config = _load_config(args)
    if not config.data_dir.is_dir():
        raise CommandError(f"data directory '{config.data_dir}' does not exist")
    return config, QuarantineStore(config.data_dir / "quarantine")


def _quarantine_call(function: Callable[..., Any], *args: Any) -> Any:
    from mailtwist.delivery import DeliveryError
    from mailtwist.quarantine import QuarantineError

    try:
        return function(*args)
    except (QuarantineError, DeliveryError) as e:
        raise CommandError(str(e)) from None


def _quarantine_list(args: argparse.Namespace) -> None:
    _, store = _quarantine(args)
    ids = store.ids()
    for entry_id in ids:
        try:
            entry = store.load(entry_id)
        except Exception as e:  # noqa: BLE001 - one bad entry must not hide the others
            print(f"{entry_id}  unreadable: {e}")
            continue
        where = f"{entry.stage} stage, filter {entry.filter or '?'}"
        print(f"{entry_id}  {_format_time(entry.created)}  <{entry.sender}>  ({where}):"
              f" {entry.reason}")
        for address in entry.recipients:
            print(f"    <{address}>")
    print(f"{len(ids)} message{'s' if len(ids) != 1 else ''} in quarantine")


def _quarantine_show(args: argparse.Namespace) -> None:
    from mailtwist.queue.dispatch import header_section

    _, store = _quarantine(args)
    entry = _quarantine_call(store.load, args.id)
    message = _quarantine_call(store.read_message, args.id)
    print(entry.to_json().decode().rstrip())
    print()
    print(header_section(message).decode("utf-8", "replace").replace("\r\n", "\n").rstrip())


def _quarantine_release(args: argparse.Namespace) -> None:
    from mailtwist.delivery import LocalDelivery
    from mailtwist.queue.service import dkim_key_dir, spool_for
    from mailtwist.storage.store import MailStore

    config, store = _quarantine(args)
    for entry_id in args.ids:  # all must exist before anything is delivered
        _quarantine_call(store.load, entry_id)
    local = LocalDelivery(MailStore(config.data_dir / "mail", config.hostname), None, None)
    signer = None
    if config.dkim.sign:
        from mailtwist.dkim import DKIMSigner

        signer = DKIMSigner(dkim_key_dir(config), _open_directory(config).is_local_domain)
    spool = spool_for(config)
    for entry_id in args.ids:
        entry = _quarantine_call(store.release_blocking, entry_id, local, spool, signer)
        queued = " (remote recipients queued; a running server sends them within" \
                 " queue.scan_interval)" if entry.remote else ""
        print(f"released {entry_id} to {', '.join(entry.recipients)}{queued}")


def _quarantine_delete(args: argparse.Namespace) -> None:
    _, store = _quarantine(args)
    for entry_id in args.ids:
        _quarantine_call(store.remove, entry_id)
        print(f"deleted {entry_id}")


def _add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help=f"TOML config file (default: ./{DEFAULT_CONFIG_FILE} if it exists)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help="data directory (overrides the config; default: ./mailtwist-data)",
    )


# -- shared helpers --------------------------------------------------------------


def _load_config(args: argparse.Namespace, **overrides: Any) -> Config:
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return load_config(args.config, overrides)


def _open_directory(config: Config) -> FileDirectory:
    directory = FileDirectory(
        config.data_dir,
        plus_separator=config.plus_separator,
        postmaster=config.postmaster,
    )
    directory.bcrypt_rounds = config.bcrypt_rounds
    return directory


def _directory(args: argparse.Namespace) -> FileDirectory:
    """Open the existing data directory named by the config and options."""
    config = _load_config(args)
    if not config.data_dir.is_dir():
        raise CommandError(
            f"data directory '{config.data_dir}' does not exist"
            " (create it with: mailtwist init, or pass --data-dir)"
        )
    return _open_directory(config)


def _read_password(args: argparse.Namespace, address: str) -> str:
    """Read a new password from stdin (--password-stdin) or ask twice on the tty."""
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CommandError("no password on standard input")
        if line.endswith("\n"):
            line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
        return line
    if not sys.stdin.isatty():
        raise CommandError(
            "standard input is not a terminal to ask for the password;"
            " use --password-stdin"
        )
    password = getpass.getpass(f"New password for {address}: ")
    if getpass.getpass("Repeat the password: ") != password:
        raise CommandError("the passwords do not match")
    return password


def _local_address(directory: FileDirectory, address: str) -> str:
    """Canonical address whose domain is local, or CommandError."""
    canonical = validate_address(address)
    domain = canonical.rpartition("@")[2]
    if not directory.is_local_domain(domain):
        raise CommandError(
            f"unknown domain {domain!r} (add it with: mailtwist domain add {domain})"
        )
    return canonical


def _existing_account(directory: FileDirectory, address: str) -> str:
    canonical = validate_address(address)
    if directory.get_account(canonical) is None:
        raise CommandError(f"no account {canonical!r}")
    return canonical


def _format_quota(quota_bytes: int) -> str:
    return str(quota_bytes) if quota_bytes else "unlimited"


# -- init ------------------------------------------------------------------------


def _add_init_options(init: argparse.ArgumentParser) -> None:
    init.add_argument("--cert", metavar="FILE",
                      help="an existing PEM certificate (chain) to use instead of a"
                      " self-signed one; written into the new config's [tls]")
    init.add_argument("--key", metavar="FILE", help="the private key of --cert")
    init.add_argument("--no-dkim", action="store_true",
                      help="make no DKIM key for --domain (later: mailtwist dkim keygen)")
    init.add_argument("--admin", metavar="ADDRESS",
                      help="create this first account (in --domain or another local domain)")
    init.add_argument("--password-stdin", action="store_true",
                      help="read the --admin password as one line from standard input")


def _init(args: argparse.Namespace) -> None:
    umask = os.umask(0o077)  # the data directory is private, all of it
    try:
        _init_steps(args)
    finally:
        os.umask(umask)


def _init_steps(args: argparse.Namespace) -> None:
    domain = validate_domain(args.domain) if args.domain is not None else None
    config_path = Path(args.config or DEFAULT_CONFIG_FILE)
    if (args.cert is None) != (args.key is None):
        raise CommandError("--cert and --key go together")
    if args.cert is not None:
        from mailtwist.tls import server_context_factory

        server_context_factory(Path(args.cert), Path(args.key))
        if config_path.exists():
            raise CommandError(f"{config_path} exists: set [tls] cert and key in it instead"
                               " of --cert/--key")
    overrides: dict[str, Any] = {}
    if args.hostname is not None:
        overrides["hostname"] = args.hostname
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    wrote_config = not config_path.exists()
    if wrote_config:
        _write_sample_config(config_path, args)
    try:
        config = load_config(config_path, overrides)
    except ConfigError:
        if wrote_config:
            config_path.unlink()
        raise

    data_dir = config.data_dir
    if data_dir.is_dir():
        print(f"data directory {data_dir} already exists")
    else:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700)
        os.chmod(data_dir, 0o700)
        print(f"created data directory {data_dir}")
    directory = _open_directory(config)
    for path in directory.initialize():
        print(f"created {path}")

    from mailtwist.tls import ensure_certificate
    from mailtwist.tls import fingerprint as cert_fingerprint

    if config.tls_cert is None:
        cert_path, key_path, fingerprint = ensure_certificate(data_dir, config.hostname)
        print(f"TLS certificate {cert_path} (self-signed; key {key_path})")
    else:
        cert_path, key_path = config.cert_path, config.key_path
        fingerprint = cert_fingerprint(cert_path.read_bytes())
        print(f"TLS certificate {cert_path} (key {key_path})")
    print(f"  SHA-256 fingerprint {fingerprint}")

    if wrote_config:
        print(f"wrote sample configuration {config_path} (defaults, commented out)")
    else:
        print(f"using existing configuration {config_path}")

    if domain is not None:
        if directory.is_local_domain(domain):
            print(f"domain {domain} is already local")
        else:
            directory.add_domain(domain)
            print(f"added domain {domain}")
    if domain is not None and not args.no_dkim:
        _init_dkim(config, domain)
    admin = _init_admin(args, directory) if args.admin else None
    owner = data_dir.stat()
    if owner.st_uid != 0:  # run as root on a user's data dir: what we made is theirs
        from mailtwist.tap import hand_over

        hand_over(config, (owner.st_uid, owner.st_gid))
    _print_checklist(args, config, directory.domains(), admin)


def _init_dkim(config: Config, domain: str) -> None:
    """A DKIM key for the first domain, unless it has one."""
    from mailtwist.dkim import default_selector, generate_key, public_records
    from mailtwist.queue.service import dkim_key_dir

    if public_records(dkim_key_dir(config), domain):
        print(f"DKIM key for {domain} already exists")
        return
    path, _ = generate_key(dkim_key_dir(config), domain, default_selector("rsa"), "rsa")
    print(f"created DKIM key {path}")


def _init_admin(args: argparse.Namespace, directory: FileDirectory) -> str:
    address = _local_address(directory, args.admin)
    if directory.get_account(address) is not None:
        print(f"account {address} already exists")
        return address
    account = directory.add_account(address, _read_password(args, address))
    print(f"added account {account.address}")
    return account.address


def firewall_lines(ports: list[int]) -> tuple[list[str], list[str]]:
    """(nftables lines, ufw lines) that open *ports* (TCP) to the world."""
    if not ports:
        return [], []
    nft = [f"nft add rule inet filter input tcp dport {{ {', '.join(map(str, ports))} }} accept"]
    ufw = [f"ufw allow {port}/tcp" for port in ports]
    return nft, ufw


def _print_checklist(args: argparse.Namespace, config: Config, domains: list[str],
                     admin: str | None) -> None:
    """What is left to do by hand: DNS records, firewall, the next commands."""
    from mailtwist.dkim import public_records
    from mailtwist.dnsrecords import (
        configured_ports,
        endpoint_port,
        expected_records,
        zone_text,
    )
    from mailtwist.queue.service import dkim_key_dir

    ports = configured_ports(config)
    web = [endpoint_port(d) for d in config.web.listen]
    all_ports = sorted(set(ports.values()) | {p for p in web if p})
    config_option = "" if args.config is None else f" --config {args.config}"
    print()
    print("Checklist")
    print()
    print("1. Publish these DNS records (zone-file format; your provider's form takes the"
          " same values):")
    for domain in domains:
        records = expected_records(config, domain, public_records(dkim_key_dir(config), domain),
                                   ports)
        for line in zone_text(config, domain, records).splitlines():
            print(f"   {line}")
    if not domains:
        print("   (none yet: add a domain, then run: mailtwist dns DOMAIN)")
    print()
    print(f"2. Open these TCP ports in the firewall: {', '.join(map(str, all_ports))}")
    nft, ufw = firewall_lines(all_ports)
    print("   nftables:")
    for line in nft:
        print(f"     {line}")
    print("   ufw:")
    for line in ufw:
        print(f"     {line}")
    print()
    print("3. Next commands:")
    if not domains:
        print(f"   add your domain:   mailtwist{config_option} domain add example.org")
    if admin is None:
        example = f"alice@{domains[0] if domains else 'example.org'}"
        print(f"   add a user:        mailtwist{config_option} user add {example}")
    print(f"   start the server:  twistd -n mailtwist{config_option}"
          "   (as root add --uid mailtwist --gid mailtwist: it binds, then drops privileges)")
    print(f"   audit it:          mailtwist{config_option} check")


def _write_sample_config(path: Path, args: argparse.Namespace) -> None:
    """Write the sample config, with the data_dir and hostname given to init set."""
    text = sample_config()
    if args.data_dir is not None:
        value = json.dumps(str(Path(args.data_dir).resolve()))
        text = _set_sample_key(text, "data_dir", value)
    if args.hostname is not None:
        text = _set_sample_key(text, "hostname", json.dumps(args.hostname))
    if getattr(args, "cert", None) is not None:
        text = _set_sample_key(text, "cert", json.dumps(str(Path(args.cert).resolve())))
        text = _set_sample_key(text, "key", json.dumps(str(Path(args.key).resolve())))
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def _set_sample_key(text: str, key: str, value: str) -> str:
    """Uncomment the sample's ``# key = ...`` line with a new value."""
    line = re.compile(rf"^# {re.escape(key)} = .*$", re.MULTILINE)
    new_text, count = line.subn(lambda _: f"{key} = {value}", text, count=1)
    if not count:
        raise CommandError(f"the sample configuration has no {key} setting")
    return new_text


# -- domain ----------------------------------------------------------------------


def _domain_add(args: argparse.Namespace) -> None:
    directory = _directory(args)
    directory.add_domain(args.domain)
    print(f"added domain {validate_domain(args.domain)}")


def _domain_del(args: argparse.Namespace) -> None:
    directory = _directory(args)
    directory.delete_domain(args.domain)
    print(f"deleted domain {validate_domain(args.domain)}")


def _domain_list(args: argparse.Namespace) -> None:
    for domain in _directory(args).domains():
        print(domain)


# -- user ------------------------------------------------------------------------


def _user_add(args: argparse.Namespace) -> None:
    directory = _directory(args)
    address = _local_address(directory, args.address)
    if directory.get_account(address) is not None:
        raise CommandError(f"account {address!r} already exists")
    password = _read_password(args, address)
    account = directory.add_account(address, password, args.quota)
    quota = _format_quota(account.quota_bytes)
    print(f"added account {account.address} (quota {quota})")


def _user_passwd(args: argparse.Namespace) -> None:
    directory = _directory(args)
    address = _existing_account(directory, args.address)
    directory.set_password(address, _read_password(args, address))
    print(f"changed the password of {address}")


def _user_del(args: argparse.Namespace) -> None:
    directory = _directory(args)
    address = validate_address(args.address)
    directory.delete_account(address)
    print(f"deleted account {address}; its stored mail was kept on disk")
    pointing = [
        alias for alias, targets in directory.aliases().items() if address in targets
    ]
    if pointing:
        print(f"note: still a target of {', '.join(pointing)} (mailtwist alias del)")


def _user_list(args: argparse.Namespace) -> None:
    directory = _directory(args)
    if args.domain is not None and not directory.is_local_domain(args.domain):
        raise CommandError(f"unknown domain {args.domain!r}")
    rows = [
        (
            account.address,
            "enabled" if account.enabled else "disabled",
            _format_quota(account.quota_bytes),
        )
        for account in directory.accounts(args.domain)
    ]
    width = max((len(row[0]) for row in rows), default=0)
    for address, state, quota in rows:
        print(f"{address:<{width}}  {state:<8}  {quota}")


def _user_disable(args: argparse.Namespace) -> None:
    directory = _directory(args)
    address = validate_address(args.address)
    directory.set_account_enabled(address, False)
    print(f"disabled logins of {address} (mail is still delivered)")


def _user_enable(args: argparse.Namespace) -> None:
    directory = _directory(args)
    address = validate_address(args.address)
    directory.set_account_enabled(address, True)
    print(f"enabled logins of {address}")


def _read_import_file(name: str) -> list[str]:
    """Return the lines of an import file (``-`` is standard input)."""
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        raise CommandError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})")
    return text.splitlines()


_BCRYPT_IMPORT_RE = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_SCHEME_RE = re.compile(r"\{([A-Za-z0-9._-]+)\}(.*)", re.DOTALL)
_BCRYPT_SCHEMES = ("BLF-CRYPT", "BCRYPT", "CRYPT")


def _import_hash(password_field: str) -> tuple[str | None, str]:
    """Return (bcrypt hash or None, scheme name) of a passwd-file password field.

    Dovecot's default scheme for a field without ``{SCHEME}`` is CRYPT,
    whose hash may be bcrypt (``$2y$``); ``$2x$`` (the buggy variant) is not
    accepted.
    """
    match = _SCHEME_RE.fullmatch(password_field)
    scheme, value = (match.group(1).upper(), match.group(2)) if match else (
        "CRYPT", password_field
    )
    if scheme in _BCRYPT_SCHEMES and _BCRYPT_IMPORT_RE.fullmatch(value):
        # bcrypt (and so check_password) reads $2a$, $2b$ and $2y$ alike.
        return value, scheme
    if scheme == "CRYPT" and value.startswith("$"):
        scheme = {"$1$": "MD5-CRYPT", "$5$": "SHA256-CRYPT", "$6$": "SHA512-CRYPT"}.get(
            value[:3], scheme
        )
    return None, scheme


def _user_import(args: argparse.Namespace) -> None:
    directory = _directory(args)
    default_domain = validate_domain(args.domain) if args.domain else None
    lines = _read_import_file(args.file)
    accounts: list[NewAccount] = []
    line_of: dict[str, int] = {}
    placeholders: set[str] = set()
    notes: list[tuple[int, str]] = []
    disabled_notes: dict[str, tuple[int, str]] = {}

    def skip(number: int, reason: str) -> None:
        notes.append((number, f"skipped line {number}: {reason}"))

    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":", 7)
        user = fields[0].strip()
        if len(fields) < 2:
            skip(number, "expected user:{SCHEME}hash:...")
            continue
        if "@" not in user and default_domain is not None:
            user = f"{user}@{default_domain}"
        try:
            address = validate_address(user)
        except DirectoryError as e:
            skip(number, f"{e}{' (use --domain)' if '@' not in user else ''}")
            continue
        if address in line_of:
            skip(number, f"{address}: duplicate of line {line_of[address]}")
            continue
        line_of[address] = number
        password_hash, scheme = _import_hash(fields[1].strip())
        if password_hash is not None:
            accounts.append(NewAccount(address, "{BLF-CRYPT}" + password_hash))
            continue
        reason = (f"scheme {scheme} not supported;"
                  " set a new password with mailtwist user passwd")
        if not args.disabled_placeholder:
            skip(number, f"{address}: {reason}")
            continue
        disabled_notes[address] = (number, f"disabled line {number}: {address}:"
                                            f" {reason}, then mailtwist user enable")
        placeholders.add(address)
        accounts.append(NewAccount(
            address, "{BLF-CRYPT}" + DUMMY_HASH.decode("ascii"), enabled=False
        ))
    result = directory.add_accounts(accounts, add_domains=args.add_domains)
    for address in result.existing:
        skip(line_of[address], f"{address}: account already exists")
    for address in result.unknown_domain:
        domain = address.rpartition("@")[2]
        skip(line_of[address], f"{address}: domain {domain} is not local"
                               f" (mailtwist domain add {domain}, or --add-domains)")
    skipped = len(notes)
    notes += [disabled_notes[a] for a in result.added if a in disabled_notes]
    for domain in result.domains_added:
        print(f"added domain {domain}")
    for _, note in sorted(notes):
        print(note)
    disabled = len(placeholders.intersection(result.added))
    summary = f"{_count(len(result.added) - disabled, 'account')} imported"
    if args.disabled_placeholder:
        summary += f", {disabled} created disabled"
    print(f"{summary}, {skipped} skipped")


def _count(number: int, noun: str, plural: str | None = None) -> str:
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"


# -- alias -----------------------------------------------------------------------


def _alias_add(args: argparse.Namespace) -> None:
    directory = _directory(args)
    directory.add_alias(args.alias, args.targets)
    if args.alias.startswith("@"):
        key = "@" + validate_domain(args.alias[1:])
    else:
        key = validate_address(args.alias)
    aliases = directory.aliases()
    targets = aliases.get(key, ())
    print(f"{key}: {', '.join(targets)}")
    if not key.startswith("@") and directory.get_account(key) and key not in targets:
        print(
            f"note: {key} is also an account; it now gets no mail unless the alias"
            f" lists it (mailtwist alias add {key} {key})"
        )
    for target in targets:
        domain = target.rpartition("@")[2]
        if (
            directory.is_local_domain(domain)
            and directory.get_account(target) is None
            and target not in aliases
        ):
            print(f"note: {target} has no account or alias yet")


def _alias_del(args: argparse.Namespace) -> None:
    directory = _directory(args)
    directory.delete_alias(args.alias, args.target)
    if args.target is None:
        print(f"deleted alias {args.alias}")
    else:
        print(f"removed {args.target} from alias {args.alias}")


def _alias_list(args: argparse.Namespace) -> None:
    for alias, targets in _directory(args).aliases().items():
        print(f"{alias}: {', '.join(targets)}")


def _parse_virtual_map(
    lines: list[str],
) -> tuple[dict[str, list[str]], dict[str, int], list[tuple[int, str]]]:
    """Parse a Postfix virtual(5) source file.

    Returns the aliases (canonical key to targets, repeated keys merged),
    the line each key starts on, and one message per bad entry.
    """
    logical: list[tuple[int, str]] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if logical:
                logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
            else:
                problems.append((number, f"skipped line {number}: continuation"
                                         " line without an entry before it"))
            continue
        logical.append((number, line.strip()))
    aliases: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for number, text in logical:
        key_text = text.split(None, 1)[0]
        rest = text[len(key_text):]
        targets = [t for t in re.split(r"[\s,]+", rest) if t]
        try:
            if "@" not in key_text:
                raise CommandError(
                    f"key {key_text!r} has no '@' (a virtual alias domain line? add"
                    " it with mailtwist domain add)"
                )
            if key_text.startswith("@"):
                key = "@" + validate_domain(key_text[1:])
            else:
                key = validate_address(key_text)
            if not targets:
                raise CommandError(f"{key}: no target")
            canonical = [validate_address(t) for t in targets]
        except (CommandError, DirectoryError) as e:
            problems.append((number, f"skipped line {number}: {e}"))
            continue
        merged = aliases.setdefault(key, [])
        merged.extend(t for t in canonical if t not in merged)
        line_of.setdefault(key, number)
    return aliases, line_of, problems


def _alias_import(args: argparse.Namespace) -> None:
    directory = _directory(args)
    aliases, line_of, problems = _parse_virtual_map(_read_import_file(args.file))
    result = directory.add_aliases(aliases, add_domains=args.add_domains)
    for domain in result.domains_added:
        print(f"added domain {domain}")
    for key in result.unknown_domain:
        domain = key.rpartition("@")[2]
        problems.append((line_of[key], f"skipped line {line_of[key]}: {key}: domain"
                         f" {domain} is not local (mailtwist domain add {domain},"
                         " or --add-domains)"))
    for _, problem in sorted(problems):
        print(problem)
    print(f"{_count(len(result.added), 'alias', 'aliases')} added,"
          f" {len(result.merged)} merged, {len(result.existing)} unchanged,"
          f" {len(problems)} skipped")


# -- queue -----------------------------------------------------------------------

QUEUE_LOCK_WAIT = 10.0


def _spool(args: argparse.Namespace):
    from mailtwist.queue.service import spool_for

    config = _load_config(args)
    if not config.data_dir.is_dir():
        raise CommandError(f"data directory '{config.data_dir}' does not exist")
    return spool_for(config)


def _format_time(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _queue_list(args: argparse.Namespace) -> None:
    spool = _spool(args)
    count = 0
    for entry_id in spool.ids():
        try:
            env = spool.load(entry_id)
        except (EnvelopeError, SpoolError) as e:
            print(f"{entry_id}  unreadable: {e}")
            continue
        count += 1
        size = spool.message_size(entry_id)
        print(f"{entry_id}  {size:>9}  {_format_time(env.created)}  <{env.sender}>"
              f"  attempts={env.attempts}  next={_format_time(env.next_attempt)}")
        for r in env.recipients:
            reason = f"  ({r.text})" if r.text else ""
            print(f"    {r.status:<9} <{r.address}>{reason}")
    print(f"{count} message{'s' if count != 1 else ''} in the queue")


def _queue_show(args: argparse.Namespace) -> None:
    spool = _spool(args)
    env = spool.load(args.id)
    print(env.to_json().decode().rstrip())
    print()
    print(spool.read_headers(args.id).decode("utf-8", "replace").replace("\r\n", "\n").rstrip())


def _edit_entries(args: argparse.Namespace, ids: list[str], change) -> None:
    """Apply *change* to each entry under its lock (the server may be running)."""
    spool = _spool(args)
    for entry_id in ids:
        lock = spool.lock(entry_id, wait=QUEUE_LOCK_WAIT)
        if lock is None:
            raise CommandError(f"queue entry {entry_id} is being delivered right now;"
                               " try again")
        with lock:
            change(spool, entry_id)


def _queue_flush(args: argparse.Namespace) -> None:
    import time

    spool = _spool(args)
    ids = args.ids or spool.ids()

    def flush(spool, entry_id: str) -> None:
        env = spool.load(entry_id)
        env.next_attempt = time.time()
        spool.save(env)

    _edit_entries(args, ids, flush)
    print(f"{len(ids)} message{'s' if len(ids) != 1 else ''} will be retried now"
          " (a running server notices within queue.scan_interval)")


def _queue_delete(args: argparse.Namespace) -> None:
    _edit_entries(args, args.ids, lambda spool, entry_id: spool.remove(entry_id))
    for entry_id in args.ids:
        print(f"deleted {entry_id}")


def _queue_bounce(args: argparse.Namespace) -> None:
    import time

    def bounce(spool, entry_id: str) -> None:
        env = spool.load(entry_id)
        now = time.time()
        for r in env.pending():
            r.status, r.code, r.enhanced, r.updated = "failed", None, "5.0.0", now
            r.text = "returned to the sender by the postmaster"
        env.next_attempt = now
        spool.save(env)

    _edit_entries(args, args.ids, bounce)
    for entry_id in args.ids:
        print(f"{entry_id}: the server returns it to its sender on its next queue scan")


# -- dkim ------------------------------------------------------------------------


def _dkim_keygen(args: argparse.Namespace) -> None:
    from mailtwist.dkim import DKIMError, default_selector, generate_key, zone_line
    from mailtwist.queue.service import dkim_key_dir

    config = _load_config(args)
    domain = validate_domain(args.domain)
    selector = args.selector or default_selector(args.algorithm)
    try:
        path, value = generate_key(dkim_key_dir(config), domain, selector, args.algorithm)
    except DKIMError as e:
        raise CommandError(str(e)) from None
    print(f"wrote {path}; mail from {domain} is signed with it from now on")
    print("publish this DNS record:")
    print(zone_line(selector, domain, value))


def _dkim_show(args: argparse.Namespace) -> None:
    from mailtwist.dkim import public_records, zone_line
    from mailtwist.queue.service import dkim_key_dir

    config = _load_config(args)
    domain = validate_domain(args.domain)
    records = public_records(dkim_key_dir(config), domain)
    if not records:
        raise CommandError(f"no DKIM key for {domain} (make one: mailtwist dkim keygen {domain})")
    for selector, value in records:
        print(zone_line(selector, domain, value))


# -- dns -------------------------------------------------------------------------


def _dns(args: argparse.Namespace) -> int:
    from mailtwist.dkim import public_records
    from mailtwist.dnsrecords import configured_ports, expected_records, zone_text
    from mailtwist.queue.service import dkim_key_dir

    config = _load_config(args)
    domain = validate_domain(args.domain)
    if config.data_dir.is_dir() and not _open_directory(config).is_local_domain(domain):
        print(f"{PROG}: warning: {domain} is not a local domain"
              f" (add it with: mailtwist domain add {domain})", file=sys.stderr)
    records = expected_records(config, domain, public_records(dkim_key_dir(config), domain),
                               configured_ports(config))
    if not args.check:
        sys.stdout.write(zone_text(config, domain, records))
        return 0
    results = _run_dns_check(config, records)
    for result in results:
        print(result.line())
    bad = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(bad)} of {len(results)} records ok")
    return 1 if bad else 0


def _run_dns_check(config: Config, records: list) -> list:
    """Run the lookups on a reactor of their own (this is a one-shot command)."""
    from twisted.internet.task import react
    from twisted.names import client

    from mailtwist.dnsrecords import check_records
    from mailtwist.outbound.mx import parse_nameserver, system_nameservers

    out = config.outbound
    servers = ([parse_nameserver(s) for s in out.dns_servers] if out.dns_servers
               else system_nameservers())
    results: list = []

    def run(reactor):
        resolver = client.Resolver(servers=servers, reactor=reactor)
        d = check_records(resolver, config.hostname, records, out.dns_timeout)
        d.addCallback(results.extend)
        return d

    try:
        react(run)
    except SystemExit as e:
        if e.code:
            raise CommandError("the DNS check failed") from None
    return results


# -- check -----------------------------------------------------------------------


def _add_check_command(check: argparse.ArgumentParser) -> None:
    check.add_argument("--server", metavar="HOST",
                       help="connect to HOST instead of the listeners' own addresses")
    check.add_argument("--dns-server", action="append", metavar="HOST[:PORT]",
                       help="DNS server to ask (repeatable; default: [outbound] dns_servers,"
                       " else resolv.conf)")
    check.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="per connection and lookup (default 10)")


def _check(args: argparse.Namespace) -> int:
    from mailtwist.check import Report, run_check
    from mailtwist.outbound.mx import parse_nameserver

    try:
        config = _load_config(args)
    except ConfigError as e:
        report = Report()
        report.section("Configuration").fail(f"the configuration does not load: {e}",
                                             "correct the setting named above")
        sys.stdout.write(report.format())
        return 1
    try:
        servers = ([parse_nameserver(s) for s in args.dns_server] if args.dns_server
                   else None)
    except ValueError as e:
        raise CommandError(f"--dns-server: {e}") from None
    report = run_check(config, server=args.server, dns_servers=servers, timeout=args.timeout)
    sys.stdout.write(report.format())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
