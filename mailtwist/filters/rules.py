"""Per-user mail rules at the delivery stage: header, size and sender matches
choose a folder, add flags or discard a local copy.

Rules come from the filter's settings (``[[filters.rules.rules]]``, for every
account) and, for each account, from ``<user_dir>/<account>.toml`` (default
``user_dir``: the filter's state directory, ``<data_dir>/filters/rules``)::

    [[rule]]
    name = "python lists"
    header = "List-Id"
    contains = "python.org"
    folder = "Lists/python"

A rule's conditions must all match: ``header`` (present; with ``contains``: a
case-insensitive substring of a value, with ``regex``: a Python ``re.search``
on a value; RFC 2047 encoded words are decoded first), ``size_over`` (bytes),
``sender`` (the envelope sender: ``user@domain`` exactly, or ``@domain``;
case-insensitive).  Its actions: ``folder``, ``flags`` (IMAP system flags),
``discard`` (store nothing for this account).  The account's own rules are
tried first, then the shared ones; the first matching rule decides unless it
says ``stop = false``, in which case later matching rules add their flags
(the first folder chosen stays).

Bad rules in the settings are configuration errors naming the rule and key.
A bad per-user file is logged (one line, naming the file, the rule and the
key) and ignored until it is fixed: the mail goes to the INBOX, as Dovecot
does with a Sieve script that does not compile.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailtwist.filters import Filter, FilterConfigError, FilterFactory, header_values
from mailtwist.interfaces import CONTINUE, AddFlags, Continue, Discard, FileInto

log = Logger()

CONDITIONS = ("header", "contains", "regex", "size_over", "sender")
ACTIONS = ("folder", "flags", "discard")
KEYS = ("name", *CONDITIONS, *ACTIONS, "stop")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the rule and the key."""


@dataclass(frozen=True)
class Rule:
    """One rule: conditions (all must match) and actions."""

    name: str
    header: str | None = None
    contains: str | None = None
    regex: re.Pattern | None = None
    size_over: int | None = None
    sender: str | None = None
    folder: FileInto | None = None
    flags: AddFlags | None = None
    discard: bool = False
    stop: bool = True

    def matches(self, message: bytes, sender: str | None) -> bool:
        if self.size_over is not None and not len(message) > self.size_over:
            return False
        if self.sender is not None:
            address = (sender or "").lower()
            if self.sender.startswith("@"):
                if not address.endswith(self.sender):
                    return False
            elif address != self.sender:
                return False
        if self.header is not None:
            values = [_decoded(v) for v in header_values(message, self.header)]
            if not values:
                return False
            if self.contains is not None and not any(self.contains in v.lower()
                                                     for v in values):
                return False
            if self.regex is not None and not any(self.regex.search(v) for v in values):
                return False
        return True


def _decoded(value: str) -> str:
    """*value* with RFC 2047 encoded words decoded (as is when they are broken)."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def parse_rule(table: Any, where: str) -> Rule:
    """A Rule from one TOML table; RuleError("<where>: <key>: ...") when it is bad."""
    if not isinstance(table, Mapping):
        raise RuleError(f"{where}: expected a table of conditions and actions, got {table!r}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise RuleError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(KEYS)}")
    name = table.get("name", "")
    if not isinstance(name, str):
        raise RuleError(f"{where}: name: expected a string, got {name!r}")
    where = f"{where} ({name})" if name else where

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise RuleError(f"{where}: {key}: expected a non-empty string, got {value!r}")
        return value

    def boolean(key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise RuleError(f"{where}: {key}: expected true or false, got {value!r}")
        return value

    header, contains, sender, folder_name = (text("header"), text("contains"),
                                             text("sender"), text("folder"))
    regex_text = text("regex")
    if (contains is not None or regex_text is not None) and header is None:
        raise RuleError(f"{where}: {'contains' if contains else 'regex'}: "
                        "needs header (the header to look in)")
    regex = None
    if regex_text is not None:
        try:
            regex = re.compile(regex_text)
        except re.error as e:
            raise RuleError(f"{where}: regex: {e}") from None
    size_over = table.get("size_over")
    if size_over is not None and (isinstance(size_over, bool) or not isinstance(size_over, int)
                                  or size_over < 0):
        raise RuleError(f"{where}: size_over: expected a size in bytes, got {size_over!r}")
    if sender is not None:
        sender = sender.lower()
        if sender.count("@") != 1 or sender.endswith("@"):
            raise RuleError(f"{where}: sender: expected user@domain or @domain, got {sender!r}")
    if header is None and size_over is None and sender is None:
        raise RuleError(f"{where}: no condition; use header, size_over or sender")
    folder = None
    if folder_name is not None:
        try:
            folder = FileInto(folder_name)
        except ValueError as e:
            raise RuleError(f"{where}: folder: {e}") from None
    flags = None
    if "flags" in table:
        value = table["flags"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(f, str)
                                                               for f in value):
            raise RuleError(f"{where}: flags: expected a list of flags, got {table['flags']!r}")
        try:
            flags = AddFlags(tuple(value))
        except ValueError as e:
            raise RuleError(f"{where}: flags: {e}") from None
    discard = boolean("discard", False)
    if discard and (folder or flags):
        raise RuleError(f"{where}: discard: cannot be combined with folder or flags")
    if not (discard or folder or flags):
        raise RuleError(f"{where}: no action; use folder, flags or discard")
    return Rule(name=name or where, header=header,
                contains=contains.lower() if contains else None, regex=regex,
                size_over=size_over, sender=sender, folder=folder, flags=flags,
                discard=discard, stop=boolean("stop", True))


def parse_rules(tables: Any, where: str) -> tuple[Rule, ...]:
    """Rules from a list of tables; RuleError for the first bad one."""
    if not isinstance(tables, list):
        raise RuleError(f"{where}: expected a list of rule tables, got {tables!r}")
    return tuple(parse_rule(t, f"{where}[{i}]") for i, t in enumerate(tables))


def load_rules_file(path: Path) -> tuple[Rule, ...]:
    """The ``[[rule]]`` tables of a per-user file; RuleError naming the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RuleError(f"{path}: {e}") from None
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise RuleError(f"{path}: unknown key {unknown[0]!r}; rules are [[rule]] tables")
    return parse_rules(data.get("rule", []), f"{path}: rule")


def decide(rules: tuple[Rule, ...], message: bytes, sender: str | None):
    """The delivery verdict of the first matching rule (and the ones after
    matching rules that say ``stop = false``)."""
    folder = None
    flags: list[str] = []
    matched = False
    for rule in rules:
        if not rule.matches(message, sender):
            continue
        matched = True
        if rule.discard:
            return Discard()
        if folder is None and rule.folder is not None:
            folder = rule.folder
        if rule.flags is not None:
            flags += [f for f in rule.flags.flags if f not in flags]
        if rule.stop:
            break
    if not matched:
        return CONTINUE
    actions = ([folder] if folder else []) + ([AddFlags(tuple(flags))] if flags else [])
    return Continue(*actions)


class RulesFilter(Filter):
    """Applies shared and per-account rules to each local copy."""

    name = "rules"

    def __init__(self, rules: tuple[Rule, ...] = (), user_dir: Path | None = None,
                 reactor: Any = None, threadpool: Any = None) -> None:
        self.rules = rules
        self.user_dir = user_dir
        self.reactor = reactor
        self.threadpool = threadpool
        self._cache: dict[str, tuple[tuple[int, int], tuple[Rule, ...]]] = {}

    def user_file(self, account: str) -> Path | None:
        """``<user_dir>/<account>.toml``, or None (no user_dir, odd account name)."""
        if self.user_dir is None or not account or "/" in account or account.startswith("."):
            return None
        return self.user_dir / f"{account.lower()}.toml"

    def user_rules(self, account: str) -> tuple[Rule, ...]:
        """The account's own rules (blocking: a stat, and a read when it changed)."""
        path = self.user_file(account)
        if path is None:
            return ()
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._cache.pop(str(path), None)
            return ()
        except OSError as e:
            log.warn("rules: cannot read {path}: {error}; its rules are ignored",
                     path=str(path), error=e.strerror or e)
            return ()
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(str(path))
        if cached and cached[0] == key:
            return cached[1]
        try:
            rules = load_rules_file(path)
        except RuleError as e:
            log.warn("rules: {error}; the file is ignored until it is fixed", error=str(e))
            rules = ()
        except OSError as e:
            log.warn("rules: cannot read {path}: {error}; its rules are ignored",
                     path=str(path), error=e.strerror or e)
            return ()
        self._cache[str(path)] = (key, rules)
        return rules

    def delivery(self, session, message, target):
        sender = session.sender
        if self.user_dir is None:
            return decide(self.rules, message, sender)
        if self.threadpool is not None and self.reactor is not None:
            d = threads.deferToThreadPool(self.reactor, self.threadpool, self.user_rules,
                                          target.account)
        else:
            d = defer.maybeDeferred(self.user_rules, target.account)
        return d.addCallback(lambda own: decide(own + self.rules, message, sender))


def _build(settings: dict[str, Any], context: Any = None) -> RulesFilter:
    try:
        rules = parse_rules(settings["rules"], "rule")
    except RuleError as e:
        raise FilterConfigError("rules", str(e)) from None
    user_dir = None
    if settings["user_files"]:
        if settings["user_dir"]:
            user_dir = Path(os.path.expanduser(settings["user_dir"]))
        elif getattr(context, "state_dir", None) is not None:
            user_dir = Path(context.state_dir)
        # built alone (a unit test without a server): no per-user files
    return RulesFilter(rules, user_dir, reactor=getattr(context, "reactor", None),
                       threadpool=getattr(context, "threadpool", None))


rules = FilterFactory(
    "rules", _build,
    description="per-user rules at delivery: header/size/sender matches to folder, "
                "flags or discard",
    defaults={"rules": [], "user_files": True, "user_dir": ""},
)
