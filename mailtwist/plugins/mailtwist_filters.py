"""The built-in filters, registered like a third party's (twisted.plugin)."""

from mailtwist.filters.authentication import auth_results
from mailtwist.filters.builtin import header_folder

__all__ = ["auth_results", "header_folder"]
