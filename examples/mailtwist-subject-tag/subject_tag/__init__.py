"""subject_tag: put a tag in front of the Subject of mail from outside.

A complete mailtwist filter: the Filter subclass, a factory that validates
its settings, and (in mailtwist/plugins/subject_tag_plugin.py) the plugin
module that makes ``smtp = ["subject_tag"]`` work once the distribution is
installed.  See docs/plugins.md of mailtwist for the walk-through.
"""

from __future__ import annotations

from typing import Any

from mailtwist.filters import Filter, FilterConfigError, FilterFactory, header_values
from mailtwist.interfaces import CONTINUE, AddHeader, ChangeHeader, Continue

__all__ = ["SubjectTag", "subject_tag"]


class SubjectTag(Filter):
    """Tags the Subject at the data stage when the envelope sender's domain is
    not one of ours.  Authenticated users' mail is never tagged."""

    name = "subject_tag"

    def __init__(self, tag: str, internal_domains: list[str]) -> None:
        self.tag = tag
        self.internal = {d.lower().rstrip(".") for d in internal_domains}

    def is_external(self, sender: str | None) -> bool:
        domain = (sender or "").rpartition("@")[2].lower().rstrip(".")
        return bool(domain) and domain not in self.internal

    def data(self, session, message):
        if session.user or not self.is_external(session.sender):
            return CONTINUE
        subjects = header_values(message, "Subject")
        if not subjects:
            return Continue(AddHeader("Subject", self.tag))
        if subjects[0].startswith(self.tag):
            return CONTINUE                      # already tagged (a reply, a loop)
        return Continue(ChangeHeader("Subject", f"{self.tag} {subjects[0]}"))


def _build(settings: dict[str, Any]) -> SubjectTag:
    tag = settings["tag"].strip()
    if not tag or any(c in tag for c in "\r\n\0"):
        raise FilterConfigError("tag", "must be one non-empty line")
    for domain in settings["internal_domains"]:
        if not isinstance(domain, str) or "@" in domain or not domain.strip():
            raise FilterConfigError("internal_domains", f"expected domain names, "
                                                        f"got {domain!r}")
    return SubjectTag(tag, settings["internal_domains"])


subject_tag = FilterFactory(
    "subject_tag", _build,
    description="tag the Subject of mail from outside our domains (example plugin)",
    defaults={"tag": "[EXTERNAL]", "internal_domains": []},
)
