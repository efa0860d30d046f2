"""The account directory: local domains, accounts and aliases in plain files.

Three admin-readable files live in the data directory:

``domains``
    One local domain per line (lower-case ASCII; IDNA for non-ASCII names).
``users``
    Dovecot passwd-file lines,
    ``address:{BLF-CRYPT}<bcrypt hash>::::::<extra fields>``; the extra
    fields we use are ``quota_bytes=N`` and ``nologin`` (or
    ``disabled=yes``) for a disabled account.  Mode 0600.
``aliases``
    Postfix alias-map lines, ``alias@domain: target1, target2``;
    ``@domain: user@domain`` is a catch-all.  A line that starts with
    whitespace continues the previous entry.

``#`` starts a comment line in all three files (and a trailing comment in
``domains``).  A running server re-reads a file when it changes on disk, so
CLI edits and hand edits take effect without a restart.  Edits made through
`FileDirectory` are serialised with a lock file and replace files atomically;
lines they do not touch (comments, malformed lines, unknown extra fields)
are kept as they are.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import bcrypt
import idna
from twisted.logger import Logger

__all__ = [
    "DUMMY_HASH",
    "Account",
    "BulkResult",
    "DirectoryError",
    "FileDirectory",
    "NewAccount",
    "Resolution",
    "check_password",
    "hash_password",
    "validate_address",
    "validate_domain",
]

_log = Logger()

DOMAINS_FILE = "domains"
USERS_FILE = "users"
ALIASES_FILE = "aliases"
LOCK_FILE = ".directory.lock"

MAX_ALIAS_DEPTH = 20
MAX_ADDRESS_LENGTH = 254
MAX_LOCAL_PART_LENGTH = 64
MAX_DOMAIN_LENGTH = 253
BCRYPT_MAX_PASSWORD_BYTES = 72

# A bcrypt hash (cost 12) of a random string that was thrown away: checking a
# password against it costs as much as a real check and never succeeds.
DUMMY_HASH: bytes = b"$2b$12$S6kZTT8dgqRHSzhFrlLunuYuUoN.by8VzkHb75etMsnk4pWGbzQ76"

_SCHEME = "{BLF-CRYPT}"
_BCRYPT_HASH_RE = re.compile(rb"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Characters that are never valid unquoted in a local part; quoted local
# parts are not supported.
_BAD_LOCAL_CHARS = frozenset('"\\<>()[];@')
_DISABLED_FLAGS = ("nologin", "disabled")

_HEADERS = {
    DOMAINS_FILE: (
        "# mailtwist local domains, one per line (non-ASCII names in IDNA form).\n"
        "# Edit with: mailtwist domain add|del DOMAIN, or by hand: the server\n"
        "# re-reads this file when it changes.\n"
    ),
    USERS_FILE: (
        "# mailtwist accounts, Dovecot passwd-file format:\n"
        "#   address:{BLF-CRYPT}<bcrypt hash>::::::<extra fields>\n"
        "# Extra fields: quota_bytes=N (0 or absent = unlimited), nologin (disabled).\n"
        "# Edit with: mailtwist user add|passwd|del|disable|enable ADDRESS\n"
    ),
    ALIASES_FILE: (
        "# mailtwist aliases: alias@domain: target@domain, target@elsewhere.org\n"
        "# '@domain: user@domain' is a catch-all for addresses nobody else has.\n"
        "# Edit with: mailtwist alias add|del ALIAS [TARGET...]\n"
    ),
}
_FILE_MODES = {DOMAINS_FILE: 0o644, USERS_FILE: 0o600, ALIASES_FILE: 0o644}


class DirectoryError(Exception):
    """A directory operation failed; the message is one line meant for the admin."""


@dataclass(frozen=True)
class Account:
    """One mailbox owner from the users file."""

    address: str
    password_hash: bytes
    enabled: bool
    quota_bytes: int


@dataclass(frozen=True)
class Resolution:
    """Who receives mail sent to one address."""

    local: tuple[str, ...]
    remote: tuple[str, ...]


# -- validation and passwords ------------------------------------------------


def validate_domain(domain: str) -> str:
    """Return the canonical (lower-case ASCII, IDNA-encoded) form of a domain.

    Raises DirectoryError naming the problem when it is not a valid host name.
    """
    if not isinstance(domain, str) or not domain:
        raise DirectoryError("empty domain")
    name = domain[:-1] if domain.endswith(".") else domain
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise DirectoryError(f"invalid domain {domain!r}: {e}") from None
    name = name.lower()
    if len(name) > MAX_DOMAIN_LENGTH:
        raise DirectoryError(
            f"invalid domain {domain!r}: longer than {MAX_DOMAIN_LENGTH} characters"
        )
    labels = name.split(".")
    for label in labels:
        if not label:
            raise DirectoryError(f"invalid domain {domain!r}: empty label")
        if not _LABEL_RE.fullmatch(label):
            raise DirectoryError(
                f"invalid domain {domain!r}: label {label!r} must be 1-63 letters,"
                " digits or hyphens, not starting or ending with a hyphen"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise DirectoryError(
                    f"invalid domain {domain!r}: {label!r} is not valid IDNA"
                ) from None
    if labels[-1].isdigit():
        raise DirectoryError(
            f"invalid domain {domain!r}: looks like an IP address, not a host name"
        )
    return name


def validate_address(address: str) -> str:
    """Return the canonical ``local@domain`` form of an address.

    The local part and the domain are lower-cased and the domain IDNA-encoded.
    Raises DirectoryError with the reason when the address is invalid or
    could not be stored in the directory files.
    """
    if not isinstance(address, str) or not address:
        raise DirectoryError("empty address")
    for ch in address:
        if ch.isspace():
            raise DirectoryError(f"invalid address {address!r}: contains a space")
        if not ch.isprintable():
            raise DirectoryError(
                f"invalid address {address!r}: contains a control character"
            )
        if ch in ":,":
            raise DirectoryError(f"invalid address {address!r}: contains {ch!r}")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise DirectoryError(
            f"invalid address {address!r}: longer than {MAX_ADDRESS_LENGTH} characters"
        )
    if "@" not in address:
        raise DirectoryError(
            f"invalid address {address!r}: no '@' (expected local@domain)"
        )
    local, _, domain = address.rpartition("@")
    if not local:
        raise DirectoryError(f"invalid address {address!r}: empty local part")
    if not domain:
        raise DirectoryError(f"invalid address {address!r}: empty domain")
    bad = sorted(set(local) & _BAD_LOCAL_CHARS)
    if bad:
        raise DirectoryError(f"invalid address {address!r}: contains {bad[0]!r}")
    if local.startswith("#"):
        raise DirectoryError(f"invalid address {address!r}: starts with '#'")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART_LENGTH:
        raise DirectoryError(
            f"invalid address {address!r}: local part longer than"
            f" {MAX_LOCAL_PART_LENGTH} bytes"
        )
    try:
        canonical_domain = validate_domain(domain)
    except DirectoryError as e:
        raise DirectoryError(f"invalid address {address!r}: {e}") from None
    canonical = f"{local.lower()}@{canonical_domain}"
    if len(canonical) > MAX_ADDRESS_LENGTH:
        raise DirectoryError(
            f"invalid address {address!r}: longer than {MAX_ADDRESS_LENGTH} characters"
        )
    return canonical


def _check_new_password(password: str) -> bytes:
    """Return the password as UTF-8; DirectoryError if bcrypt can't take it."""
    if not password:
        raise DirectoryError("empty password")
    if "\0" in password:
        # SASL PLAIN separates fields with NUL, so such a password could never log in.
        raise DirectoryError("password must not contain a NUL character")
    data = password.encode("utf-8")
    if len(data) > BCRYPT_MAX_PASSWORD_BYTES:
        raise DirectoryError(
            f"password too long: {len(data)} bytes in UTF-8, bcrypt uses at most"
            f" {BCRYPT_MAX_PASSWORD_BYTES} and it is rejected rather than truncated"
        )
    return data


def hash_password(password: str, rounds: int = 12) -> bytes:
    """Hash a new password with bcrypt; DirectoryError if it is empty or too long."""
    return bcrypt.hashpw(_check_new_password(password), bcrypt.gensalt(rounds))


def check_password(password: str, password_hash: bytes) -> bool:
    """Tell whether a password matches a bcrypt hash; False on malformed input."""
    try:
        return bcrypt.checkpw(password.encode("utf-8"), password_hash)
    except (ValueError, TypeError, UnicodeError):
        return False


# -- file parsing --------------------------------------------------------------

_Warn = Callable[[int, str], None]


def _no_warn(line_number: int, reason: str) -> None:
    pass


def _split_lines(text: str) -> list[str]:
    """Split file text into lines without their line ends, keeping any '\\r'."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _join_lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _is_ignored(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _domain_of_line(line: str) -> str | None:
    """Return the canonical domain on a domains-file line, None for no content."""
    content = line.split("#", 1)[0].strip()
    if not content:
        return None
    return validate_domain(content)


def _parse_domains(lines: list[str], warn: _Warn) -> list[str]:
    domains: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        try:
            domain = _domain_of_line(line)
        except DirectoryError as e:
            warn(number, f"{e}; line skipped")
            continue
        if domain is None:
            continue
        if domain in domains:
            warn(number, f"duplicate domain {domain!r}")
        domains[domain] = None
    return list(domains)


@dataclass
class _UserLine:
    """The fields of a users-file line that we read or rewrite."""

    address: str
    scheme_and_hash: str
    middle: list[str]  # uid, gid, gecos, home, shell: kept as found
    extra: list[str]

    @classmethod
    def parse(cls, line: str) -> _UserLine:
        fields = line.rstrip("\r").split(":", 7)
        if len(fields) < 2:
            raise DirectoryError("expected address:password:...")
        address = validate_address(fields[0].strip())
        middle = fields[2:7]
        middle += [""] * (5 - len(middle))
        extra = fields[7].split() if len(fields) == 8 else []
        return cls(address, fields[1].strip(), middle, extra)

    def format(self) -> str:
        return ":".join(
            [self.address, self.scheme_and_hash, *self.middle, " ".join(self.extra)]
        )

    def password_hash(self) -> bytes | None:
        """Return the bcrypt hash, or None if the password field is not one."""
        value = self.scheme_and_hash
        if value.upper().startswith(_SCHEME):
            value = value[len(_SCHEME):]
        elif value.upper().startswith("{CRYPT}"):
            value = value[len("{CRYPT}"):]
        data = value.encode("ascii", "replace")
        return data if _BCRYPT_HASH_RE.fullmatch(data) else None

    def quota_bytes(self) -> int:
        quota = 0
        for item in self.extra:
            key, sep, value = item.partition("=")
            if key == "quota_bytes":
                if not (sep and value.isascii() and value.isdigit()):
                    raise DirectoryError(f"invalid {item!r} (expected quota_bytes=N)")
                quota = int(value)
        return quota

    def enabled(self) -> bool:
        for item in self.extra:
            key, sep, value = item.partition("=")
            if key == "nologin":
                return False
            if key == "disabled" and value.lower() in ("yes", "y", "true", "1"):
                return False
        return True

    def set_enabled(self, enabled: bool) -> None:
        self.extra = [
            item
            for item in self.extra
            if item.partition("=")[0] not in _DISABLED_FLAGS
        ]
        if not enabled:
            self.extra.append("nologin")

    def to_account(self, warn: Callable[[str], None]) -> Account:
        password_hash = self.password_hash()
        if password_hash is None:
            warn(
                f"password of {self.address!r} is not a {_SCHEME} bcrypt hash;"
                " the account receives mail but cannot log in"
            )
            password_hash = b""
        return Account(self.address, password_hash, self.enabled(), self.quota_bytes())


def _parse_users(lines: list[str], warn: _Warn) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for number, line in enumerate(lines, 1):
        if _is_ignored(line):
            continue
        try:
            entry = _UserLine.parse(line)
            account = entry.to_account(lambda reason: warn(number, reason))
        except DirectoryError as e:
            warn(number, f"{e}; line skipped")
            continue
        if account.address in accounts:
            warn(number, f"duplicate account {account.address!r}; line skipped")
            continue
        accounts[account.address] = account
    return accounts


def _user_line_address(line: str) -> str | None:
    """Return the canonical address a users-file line is about, if any.

    Edits match lines by this alone, so a line with a bad password or quota
    field can still be changed or deleted.
    """
    if _is_ignored(line):
        return None
    try:
        return _UserLine.parse(line).address
    except DirectoryError:
        return None


def _canonical_alias_key(alias: str) -> str:
    """Return ``local@domain`` or ``@domain`` (catch-all) in canonical form."""
    if alias.startswith("@"):
        try:
            return "@" + validate_domain(alias[1:])
        except DirectoryError as e:
            raise DirectoryError(f"invalid catch-all {alias!r}: {e}") from None
    return validate_address(alias)


@dataclass
class _AliasEntry:
    """One logical alias entry: a line plus its continuation lines."""

    first_line: int  # 0-based index into the file's lines
    last_line: int
    key_text: str
    targets: list[str] = field(default_factory=list)

    def key(self) -> str:
        return _canonical_alias_key(self.key_text)

    def format(self) -> str:
        return f"{self.key_text}: {', '.join(self.targets)}"


def _alias_entries(lines: list[str], warn: _Warn) -> list[_AliasEntry]:
    """Group alias-file lines into entries; malformed lines are reported and skipped."""
    entries: list[_AliasEntry] = []
    current: _AliasEntry | None = None
    for index, line in enumerate(lines):
        if _is_ignored(line):
            continue
        text = line.rstrip("\r")
        if text[0].isspace():
            if current is None:
                warn(index + 1, "continuation without an alias before it; line skipped")
                continue
            current.last_line = index
            current.targets.extend(_split_targets(text))
            continue
        key, sep, rest = text.partition(":")
        if not sep:
            warn(index + 1, "expected 'alias@domain: target, ...'; line skipped")
            current = None
            continue
        current = _AliasEntry(index, index, key.strip(), _split_targets(rest))
        entries.append(current)
    return entries


def _split_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _same_address(raw: str, canonical: str) -> bool:
    try:
        return validate_address(raw) == canonical
    except DirectoryError:
        return raw.lower() == canonical


def _parse_aliases(lines: list[str], warn: _Warn) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, dict[str, None]] = {}
    for entry in _alias_entries(lines, warn):
        number = entry.first_line + 1
        try:
            key = entry.key()
        except DirectoryError as e:
            warn(number, f"{e}; line skipped")
            continue
        targets: dict[str, None] = {}
        for raw in entry.targets:
            try:
                targets[validate_address(raw)] = None
            except DirectoryError as e:
                warn(number, f"alias {key!r}: {e}; target skipped")
        if not targets:
            warn(number, f"alias {key!r} has no valid target; line skipped")
            continue
        aliases.setdefault(key, {}).update(targets)
    return {key: tuple(targets) for key, targets in aliases.items()}


# -- the directory -------------------------------------------------------------

_StatKey = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class _State:
    """Parsed contents of the three files; replaced, never mutated, on reload."""

    domains: tuple[str, ...] = ()
    domain_set: frozenset[str] = frozenset()
    accounts: Mapping[str, Account] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class FileDirectory:
    """Domains, accounts and aliases read from (and edited in) the data directory.

    Lookups may run in several threads at once: each works on one parsed
    snapshot, which a reload replaces as a whole.
    """

    bcrypt_rounds: int = 12

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        plus_separator: str = "+",
        postmaster: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        if "@" in plus_separator:
            raise DirectoryError("the plus-address separator cannot contain '@'")
        self.plus_separator = plus_separator
        try:
            self.postmaster = validate_address(postmaster) if postmaster else None
        except DirectoryError as e:
            raise DirectoryError(f"postmaster: {e}") from None
        self._keys: dict[str, _StatKey | None] = {}
        self._state = _State()
        self._reload_lock = threading.Lock()
        self.reload_if_changed()

    # -- reading ----------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.data_dir / name

    def reload_if_changed(self) -> bool:
        """Re-parse each file whose inode, size or times changed since it was read.

        Costs three ``stat`` calls when nothing changed.  A file that cannot
        be read is logged and its previous contents are kept.
        """
        with self._reload_lock:
            state = self._state
            for name in (DOMAINS_FILE, USERS_FILE, ALIASES_FILE):
                key = self._stat_key(name)
                if name in self._keys and key == self._keys[name]:
                    continue
                try:
                    key, lines = self._read(name)
                except OSError as e:
                    _log.error(
                        "cannot read {path}: {error}; keeping its previous contents",
                        path=str(self._path(name)),
                        error=e.strerror or str(e),
                    )
                else:
                    state = self._parse_into(state, name, lines)
                self._keys[name] = key
            if state is self._state:
                return False
            self._state = state
            return True

    def _stat_key(self, name: str) -> _StatKey | None:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, -1, -1, -1, -1)
        return _key_of(st)

    def _read(self, name: str) -> tuple[_StatKey | None, list[str]]:
        """Return a file's lines and the stat key of exactly the version read."""
        try:
            f = open(
                self._path(name), encoding="utf-8", errors="surrogateescape", newline=""
            )
        except FileNotFoundError:
            return None, []
        with f:
            key = _key_of(os.fstat(f.fileno()))
            return key, _split_lines(f.read())

    def _parse_into(self, state: _State, name: str, lines: list[str]) -> _State:
        path = str(self._path(name))

        def warn(line_number: int, reason: str) -> None:
            _log.warn(
                "{path} line {line}: {reason}",
                path=path,
                line=line_number,
                reason=reason,
            )

        if name == DOMAINS_FILE:
            domains = tuple(_parse_domains(lines, warn))
            return replace(state, domains=domains, domain_set=frozenset(domains))
        if name == USERS_FILE:
            return replace(state, accounts=_parse_users(lines, warn))
        return replace(state, aliases=_parse_aliases(lines, warn))

    def _current(self) -> _State:
        self.reload_if_changed()
        return self._state

    def domains(self) -> list[str]:
        """Return the local domains in file order."""
        return list(self._current().domains)

    def is_local_domain(self, domain: str) -> bool:
        """Tell whether mail for this domain is delivered here."""
        state = self._current()
        try:
            return validate_domain(domain) in state.domain_set
        except DirectoryError:
            return False

    def get_account(self, address: str) -> Account | None:
        """Return the account for an address (case-insensitive), or None."""
        state = self._current()
        try:
            return state.accounts.get(validate_address(address))
        except DirectoryError:
            return None

    def accounts(self, domain: str | None = None) -> list[Account]:
        """Return all accounts in file order, or only those of one domain."""
        state = self._current()
        if domain is None:
            return list(state.accounts.values())
        try:
            suffix = "@" + validate_domain(domain)
        except DirectoryError:
            return []
        return [a for a in state.accounts.values() if a.address.endswith(suffix)]

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Return every alias (``local@domain`` or ``@domain``) with its targets."""
        return dict(self._current().aliases)

    # -- resolution -------------------------------------------------------------

    def resolve(self, address: str) -> Resolution | None:
        """Return who receives mail for an address, or None if nobody here does.

        Lookup order: exact alias, account, ``user+tag`` retried as ``user``,
        catch-all alias.  Aliases expand recursively; an alias target that is
        an account is delivered to that account.  ``postmaster`` (bare or in
        any local domain) always resolves while there is at least one account.
        """
        state = self._current()
        if address.lower() == "postmaster":
            if not state.domains:
                return self._postmaster_fallback(state)
            address = f"postmaster@{state.domains[0]}"
        try:
            canonical = validate_address(address)
        except DirectoryError:
            return None
        if canonical.rpartition("@")[2] not in state.domain_set:
            return None
        resolution = self._expand(state, canonical)
        if resolution is None and canonical.rpartition("@")[0] == "postmaster":
            return self._postmaster_fallback(state)
        return resolution

    def _postmaster_fallback(self, state: _State) -> Resolution | None:
        """Who gets postmaster mail nobody claims: the configured address, else
        the first account (preferring one in a local domain)."""
        if self.postmaster is not None:
            if self.postmaster.rpartition("@")[2] not in state.domain_set:
                return Resolution((), (self.postmaster,))
            resolution = self._expand(state, self.postmaster)
            if resolution is not None:
                return resolution
            _log.warn(
                "postmaster address {address} has no account or alias",
                address=self.postmaster,
            )
        in_local_domains = [
            a for a in state.accounts if a.rpartition("@")[2] in state.domain_set
        ]
        first = next(iter(in_local_domains or state.accounts), None)
        return Resolution((first,), ()) if first else None

    def _find(
        self, state: _State, address: str, prefer_account: bool
    ) -> tuple[str, str] | None:
        """Find the account or alias that takes mail for a local address.

        Returns ("account", address) or ("alias", key), or None.  Alias
        targets prefer an account of the same name, so an alias may list its
        own address to keep a local copy.
        """
        local_part, _, domain = address.rpartition("@")
        candidates = [address]
        if self.plus_separator and self.plus_separator in local_part:
            base = local_part.split(self.plus_separator, 1)[0]
            if base:
                candidates.append(f"{base}@{domain}")
        for candidate in candidates:
            if prefer_account and candidate in state.accounts:
                return ("account", candidate)
            if candidate in state.aliases:
                return ("alias", candidate)
            if candidate in state.accounts:
                return ("account", candidate)
        if "@" + domain in state.aliases:
            return ("alias", "@" + domain)
        return None

    def _expand(self, state: _State, address: str) -> Resolution | None:
        """Expand a local address through aliases into accounts and remote addresses."""
        local: dict[str, None] = {}
        remote: dict[str, None] = {}
        expanded: set[str] = set()

        def collect(target: str, depth: int, path: tuple[str, ...]) -> None:
            if target.rpartition("@")[2] not in state.domain_set:
                remote[target] = None
                return
            found = self._find(state, target, prefer_account=bool(path))
            if found is None:
                if path:
                    _log.warn(
                        "alias {alias}: target {target} has no account or alias",
                        alias=path[-1],
                        target=target,
                    )
                return
            kind, key = found
            if kind == "account":
                local[key] = None
                return
            if key in path:
                _log.warn(
                    "alias loop {loop} ignored",
                    loop=" -> ".join(path[path.index(key):] + (key,)),
                )
                return
            if key in expanded:
                return
            if depth >= MAX_ALIAS_DEPTH:
                _log.warn(
                    "alias {alias} nested deeper than {limit} levels ignored",
                    alias=key,
                    limit=MAX_ALIAS_DEPTH,
                )
                return
            expanded.add(key)
            for next_target in state.aliases[key]:
                collect(next_target, depth + 1, path + (key,))

        collect(address, 0, ())
        if not local and not remote:
            return None
        return Resolution(tuple(local), tuple(remote))

    # -- editing ----------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive directory lock that serialises all edits."""
        if not self.data_dir.is_dir():
            raise DirectoryError(
                f"data directory '{self.data_dir}' does not exist"
                " (create it with: mailtwist init)"
            )
        lock_path = self._path(LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._match_owner(fd, self.data_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _match_owner(self, fd: int, like: Path) -> None:
        """When run as root, give a new file the owner of ``like`` (the file it
        replaces, else the data directory), so a CLI run as root does not leave
        files the server's user cannot read."""
        if os.geteuid() != 0:
            return
        try:
            st = os.stat(like)
        except FileNotFoundError:
            st = os.stat(self.data_dir)
        with suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)

    def _read_locked(self, name: str) -> list[str]:
        """Return a file's lines for editing (header lines for a missing file)."""
        key, lines = self._read(name)
        if key is None:
            return _split_lines(_HEADERS[name])
        return lines

    def _write(self, name: str, lines: list[str]) -> None:
        """Atomically replace a file: temp file, fsync, rename, fsync the directory."""
        path = self._path(name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.data_dir)
        try:
            with os.fdopen(
                fd, "w", encoding="utf-8", errors="surrogateescape", newline=""
            ) as f:
                f.write(_join_lines(lines))
                f.flush()
                os.fchmod(f.fileno(), _FILE_MODES[name])
                self._match_owner(f.fileno(), path)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def initialize(self) -> list[Path]:
        """Create whichever of the three files are missing, with explanatory headers.

        Returns the paths created.
        """
        created = []
        with self._locked():
            for name in (DOMAINS_FILE, USERS_FILE, ALIASES_FILE):
                if not self._path(name).exists():
                    self._write(name, _split_lines(_HEADERS[name]))
                    created.append(self._path(name))
        return created

    def _require_local_domain(self, domain: str) -> None:
        domains = _parse_domains(self._read_locked(DOMAINS_FILE), _no_warn)
        if domain not in domains:
            raise DirectoryError(
                f"unknown domain {domain!r}"
                f" (add it with: mailtwist domain add {domain})"
            )

    def add_domain(self, domain: str) -> None:
        """Add a local domain; DirectoryError if it is invalid or already there."""
        canonical = validate_domain(domain)
        with self._locked():
            lines = self._read_locked(DOMAINS_FILE)
            if canonical in _parse_domains(lines, _no_warn):
                raise DirectoryError(f"domain {canonical!r} already exists")
            self._write(DOMAINS_FILE, lines + [canonical])

    def delete_domain(self, domain: str) -> None:
        """Remove a local domain that no longer has accounts or aliases."""
        canonical = validate_domain(domain)
        with self._locked():
            lines = self._read_locked(DOMAINS_FILE)
            if canonical not in _parse_domains(lines, _no_warn):
                raise DirectoryError(f"unknown domain {canonical!r}")
            suffix = "@" + canonical
            accounts = {
                a for a in map(_user_line_address, self._read_locked(USERS_FILE))
                if a is not None and a.endswith(suffix)
            }
            aliases = [
                a for a in _parse_aliases(self._read_locked(ALIASES_FILE), _no_warn)
                if a.endswith(suffix)
            ]
            if accounts or aliases:
                counts = []
                if accounts:
                    counts.append(_plural(len(accounts), "account"))
                if aliases:
                    counts.append(_plural(len(aliases), "alias", "aliases"))
                raise DirectoryError(
                    f"domain {canonical!r} still has {' and '.join(counts)};"
                    " delete them first"
                )
            self._write(DOMAINS_FILE, [
                line for line in lines if _quiet(_domain_of_line, line) != canonical
            ])

    def add_account(self, address: str, password: str, quota_bytes: int = 0) -> Account:
        """Create an account in a local domain with a bcrypt-hashed password."""
        canonical = validate_address(address)
        if quota_bytes < 0:
            raise DirectoryError(
                "quota must be 0 (unlimited) or a positive number of bytes"
            )
        _check_new_password(password)
        with self._locked():
            self._require_local_domain(canonical.rpartition("@")[2])
            lines = self._read_locked(USERS_FILE)
            if canonical in map(_user_line_address, lines):
                raise DirectoryError(f"account {canonical!r} already exists")
            password_hash = hash_password(password, self.bcrypt_rounds)
            entry = _UserLine(
                canonical,
                _SCHEME + password_hash.decode("ascii"),
                [""] * 5,
                [f"quota_bytes={quota_bytes}"] if quota_bytes else [],
            )
            self._write(USERS_FILE, lines + [entry.format()])
        return Account(canonical, password_hash, True, quota_bytes)

    def _edit_account(self, address: str, change: Callable[[_UserLine], None]) -> None:
        """Apply a change to every users-file line of an account, under the lock."""
        canonical = validate_address(address)
        with self._locked():
            lines = self._read_locked(USERS_FILE)
            found = False
            for index, line in enumerate(lines):
                if _user_line_address(line) == canonical:
                    entry = _UserLine.parse(line)
                    change(entry)
                    lines[index] = entry.format()
                    found = True
            if not found:
                raise DirectoryError(f"no account {canonical!r}")
            self._write(USERS_FILE, lines)

    def set_password(self, address: str, password: str) -> None:
        """Replace an account's password."""
        _check_new_password(password)
        scheme_and_hash = _SCHEME + hash_password(password, self.bcrypt_rounds).decode()

        def change(entry: _UserLine) -> None:
            entry.scheme_and_hash = scheme_and_hash

        self._edit_account(address, change)

    def set_account_enabled(self, address: str, enabled: bool) -> None:
        """Allow or forbid logins; a disabled account still receives mail."""
        self._edit_account(address, lambda entry: entry.set_enabled(enabled))

    def delete_account(self, address: str) -> None:
        """Remove an account from the users file; its stored mail is left on disk."""
        canonical = validate_address(address)
        with self._locked():
            lines = self._read_locked(USERS_FILE)
            kept = [line for line in lines if _user_line_address(line) != canonical]
            if len(kept) == len(lines):
                raise DirectoryError(f"no account {canonical!r}")
            self._write(USERS_FILE, kept)

    def add_alias(self, alias: str, targets: list[str]) -> None:
        """Add an alias (``local@domain`` or catch-all ``@domain``), merging targets."""
        key = _canonical_alias_key(alias)
        if not targets:
            raise DirectoryError(f"alias {key!r} needs at least one target")
        new_targets = list(dict.fromkeys(validate_address(t) for t in targets))
        with self._locked():
            self._require_local_domain(key.rpartition("@")[2])
            lines = self._read_locked(ALIASES_FILE)
            entries = [
                e for e in _alias_entries(lines, _no_warn) if _quiet(e.key) == key
            ]
            if not entries:
                entry = _AliasEntry(0, 0, key, new_targets)
                self._write(ALIASES_FILE, lines + [entry.format()])
                return
            present = [t for e in entries for t in e.targets]
            missing = [
                t for t in new_targets if not any(_same_address(p, t) for p in present)
            ]
            if missing:
                entries[0].targets.extend(missing)
                self._write(ALIASES_FILE, _rewrite_entries(lines, [entries[0]], []))

    def delete_alias(self, alias: str, target: str | None = None) -> None:
        """Remove an alias, or one of its targets (the alias goes with its last)."""
        key = _canonical_alias_key(alias)
        canonical_target = validate_address(target) if target is not None else None
        with self._locked():
            lines = self._read_locked(ALIASES_FILE)
            entries = [
                e for e in _alias_entries(lines, _no_warn) if _quiet(e.key) == key
            ]
            if not entries:
                raise DirectoryError(f"no alias {key!r}")
            if canonical_target is None:
                self._write(ALIASES_FILE, _rewrite_entries(lines, [], entries))
                return
            changed = []
            for entry in entries:
                kept = [
                    t for t in entry.targets if not _same_address(t, canonical_target)
                ]
                if len(kept) != len(entry.targets):
                    entry.targets = kept
                    changed.append(entry)
            if not changed:
                raise DirectoryError(
                    f"alias {key!r} has no target {canonical_target!r}"
                )
            self._write(
                ALIASES_FILE,
                _rewrite_entries(
                    lines,
                    [e for e in changed if e.targets],
                    [e for e in changed if not e.targets],
                ),
            )


    # -- bulk imports -----------------------------------------------------------

    def add_accounts(
        self, accounts: Sequence[NewAccount], add_domains: bool = False
    ) -> BulkResult:
        """Add many accounts with ready-made hashes in one locked edit.

        Accounts that exist are left alone; accounts in domains that are not
        local are left out unless ``add_domains``, which adds those domains
        first.  Each address ends up in exactly one list of the result.
        """
        result = BulkResult()
        with self._locked():
            domain_lines = self._read_locked(DOMAINS_FILE)
            domains = set(_parse_domains(domain_lines, _no_warn))
            lines = self._read_locked(USERS_FILE)
            present = {a for a in map(_user_line_address, lines) if a is not None}
            new_lines: list[str] = []
            for account in accounts:
                canonical = validate_address(account.address)
                domain = canonical.rpartition("@")[2]
                if canonical in present:
                    result.existing.append(canonical)
                    continue
                if not result.admit(domain, domains, add_domains, canonical):
                    continue
                entry = _UserLine(canonical, account.scheme_and_hash, [""] * 5, [])
                entry.set_enabled(account.enabled)
                new_lines.append(entry.format())
                present.add(canonical)
                result.added.append(canonical)
            if result.domains_added:
                self._write(DOMAINS_FILE, domain_lines + result.domains_added)
            if new_lines:
                self._write(USERS_FILE, lines + new_lines)
        return result

    def add_aliases(
        self, aliases: Mapping[str, Sequence[str]], add_domains: bool = False
    ) -> BulkResult:
        """Merge many aliases into the aliases file in one locked edit.

        A new alias is appended; the missing targets of an existing one are
        added to it (``existing`` lists those that needed nothing).  Aliases
        in domains that are not local are left out unless ``add_domains``.
        """
        result = BulkResult()
        with self._locked():
            domain_lines = self._read_locked(DOMAINS_FILE)
            domains = set(_parse_domains(domain_lines, _no_warn))
            lines = self._read_locked(ALIASES_FILE)
            by_key: dict[str, list[_AliasEntry]] = {}
            for entry in _alias_entries(lines, _no_warn):
                key = _quiet(entry.key)
                if isinstance(key, str):
                    by_key.setdefault(key, []).append(entry)
            updated: dict[int, _AliasEntry] = {}
            appended: list[_AliasEntry] = []
            for alias, raw_targets in aliases.items():
                key = _canonical_alias_key(alias)
                targets = list(dict.fromkeys(validate_address(t) for t in raw_targets))
                if not targets:
                    raise DirectoryError(f"alias {key!r} needs at least one target")
                domain = key.rpartition("@")[2]
                if not result.admit(domain, domains, add_domains, key):
                    continue
                entries = by_key.get(key)
                if not entries:
                    entry = _AliasEntry(-1, -1, key, targets)
                    by_key[key] = [entry]
                    appended.append(entry)
                    result.added.append(key)
                    continue
                present = [t for e in entries for t in e.targets]
                missing = [
                    t for t in targets if not any(_same_address(p, t) for p in present)
                ]
                if not missing:
                    result.existing.append(key)
                    continue
                entries[0].targets.extend(missing)
                if entries[0].first_line >= 0:
                    updated[entries[0].first_line] = entries[0]
                result.merged.append(key)
            new_lines = [entry.format() for entry in appended]
            if result.domains_added:
                self._write(DOMAINS_FILE, domain_lines + result.domains_added)
            if updated or new_lines:
                rewritten = _rewrite_entries(lines, list(updated.values()), [])
                self._write(ALIASES_FILE, rewritten + new_lines)
        return result


@dataclass(frozen=True)
class NewAccount:
    """An account to import: its address and a ready ``{SCHEME}hash`` field."""

    address: str
    scheme_and_hash: str
    enabled: bool = True


@dataclass
class BulkResult:
    """What a bulk import did, address by address (or alias key by key)."""

    added: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    unknown_domain: list[str] = field(default_factory=list)
    domains_added: list[str] = field(default_factory=list)

    def admit(self, domain: str, domains: set[str], add_domains: bool, name: str) -> bool:
        """Whether *name* (in *domain*) may be imported: a local domain, or one
        added to *domains* (and ``domains_added``) when *add_domains*; else
        *name* goes to ``unknown_domain``."""
        if domain in domains:
            return True
        if not add_domains:
            self.unknown_domain.append(name)
            return False
        domains.add(domain)
        self.domains_added.append(domain)
        return True


def _rewrite_entries(
    lines: list[str], updated: list[_AliasEntry], deleted: list[_AliasEntry]
) -> list[str]:
    """Return the alias-file lines with entries rewritten on one line each, or
    deleted together with their continuation lines."""
    result = list(lines)
    changes = [(e, [e.format()]) for e in updated] + [(e, []) for e in deleted]
    changes.sort(key=lambda change: change[0].first_line, reverse=True)
    for entry, new_lines in changes:
        result[entry.first_line : entry.last_line + 1] = new_lines
    return result


def _quiet(function: Callable[..., object], *args: object) -> object:
    """Call a parser, returning None instead of raising DirectoryError."""
    try:
        return function(*args)
    except DirectoryError:
        return None


def _key_of(st: os.stat_result) -> _StatKey:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, st.st_ctime_ns)


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"
