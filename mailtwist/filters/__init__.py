"""Helpers for writing filters: a base class, a settings-validating factory and
header access.  The hook interfaces and verdicts are in :mod:`mailtwist.interfaces`;
see docs/filters.md.
"""

from __future__ import annotations

import inspect

from typing import Any, Callable, Mapping

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailtwist.filters.headers import apply_header_actions, header_values
from mailtwist.interfaces import CONTINUE, IFilter, IFilterFactory

__all__ = ["Filter", "FilterConfigError", "FilterFactory", "apply_header_actions",
           "header_values"]


class FilterConfigError(Exception):
    """A bad filter setting; *key* is the setting's name (None: the whole table)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


@implementer(IFilter)
class Filter:
    """Base class: every stage answers Continue; override the stages you need.
    Set ``name`` (logs and config use it; default: the class name)."""

    name = ""

    def connect(self, session):
        return CONTINUE

    def helo(self, session, name):
        return CONTINUE

    def auth(self, session, username, success):
        return CONTINUE

    def mail_from(self, session, sender):
        return CONTINUE

    def rcpt_to(self, session, recipient):
        return CONTINUE

    def data(self, session, message):
        return CONTINUE

    def delivery(self, session, message, target):
        return CONTINUE

    def outbound(self, session, message, recipients):
        return CONTINUE

    def mailbox_event(self, event):
        return CONTINUE


@implementer(IPlugin, IFilterFactory)
class FilterFactory:
    """A factory whose settings are checked against *defaults*: unknown keys and
    values of another type than the default's are refused; *build* gets the
    defaults updated with the settings.  Export an instance from a module in
    ``mailtwist/plugins/`` to make the filter installable by name."""

    def __init__(self, name: str, build: Callable[..., IFilter],
                 description: str = "", defaults: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.description = description
        self.defaults = dict(defaults or {})
        self._build = build

    def __repr__(self) -> str:
        return f"<FilterFactory {self.name}>"

    def validate(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated with *settings*, or FilterConfigError."""
        result = dict(self.defaults)
        for key, value in settings.items():
            if key not in self.defaults:
                allowed = ", ".join(sorted(self.defaults)) or "none"
                raise FilterConfigError(key, f"unknown setting; allowed: {allowed}")
            default = self.defaults[key]
            if default is not None and not _same_kind(default, value):
                raise FilterConfigError(key, f"expected {_kind(default)}, got {value!r}")
            result[key] = value
        return result

    def build(self, settings: Mapping[str, Any], context: Any = None) -> IFilter:
        """Validate *settings*, then call the build function with them, and with
        *context* too when it takes a second parameter."""
        validated = self.validate(settings)
        if accepts_context(self._build):
            return self._build(validated, context)
        return self._build(validated)


def accepts_context(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float)
                                                    or isinstance(value, int))
    if isinstance(default, list):
        return isinstance(value, list) and all(
            not default or _same_kind(default[0], v) for v in value)
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, list):
        return "a list" + (f" of {_kind(default[0])}" if default else "")
    return {int: "an integer", float: "a number", str: "a string",
            dict: "a table"}.get(type(default), type(default).__name__)
