"""The built-in filters, registered like a third party's (twisted.plugin)."""

from mailtwist.filters.builtin import header_folder

__all__ = ["header_folder"]
