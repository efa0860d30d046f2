"""Built-in filters, written on the public API like any third-party filter."""

from __future__ import annotations

from typing import Any

from mailtwist.filters import Filter, FilterConfigError, FilterFactory, header_values
from mailtwist.interfaces import CONTINUE, AddFlags, Continue, FileInto


class HeaderFolderFilter(Filter):
    """Files local copies into a folder when a header has a given value
    (e.g. ``X-Spam-Flag: YES`` into Junk, as a spam scanner upstream marks it)."""

    name = "header_folder"

    def __init__(self, header: str, value: str, folder: str, flags: list[str]) -> None:
        self.header = header
        self.value = value.strip().lower()
        self.action = FileInto(folder)
        self.flags = AddFlags(tuple(flags)) if flags else None

    def matches(self, message: bytes) -> bool:
        values = [v.strip().lower() for v in header_values(message, self.header)]
        return bool(values) and (not self.value or self.value in values)

    def delivery(self, session, message, target):
        if not self.matches(message):
            return CONTINUE
        return Continue(self.action, *([self.flags] if self.flags else []))


def _build_header_folder(settings: dict[str, Any]) -> HeaderFolderFilter:
    if not settings["header"]:
        raise FilterConfigError("header", "must not be empty")
    try:
        return HeaderFolderFilter(settings["header"], settings["value"], settings["folder"],
                                  settings["flags"])
    except ValueError as e:
        key = "flags" if "flag" in str(e) else "folder"
        raise FilterConfigError(key, str(e)) from None


header_folder = FilterFactory(
    "header_folder", _build_header_folder,
    description="file local copies into a folder when a header has a value "
                "(default: X-Spam-Flag: YES into Junk)",
    defaults={"header": "X-Spam-Flag", "value": "YES", "folder": "Junk", "flags": []},
)
