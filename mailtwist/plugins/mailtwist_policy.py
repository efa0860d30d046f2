"""The built-in policy filters (dnsbl, greylist, ratelimit), registered like a
third party's (twisted.plugin); see docs/builtin-filters.md."""

from mailtwist.filters.dnsbl import dnsbl
from mailtwist.filters.greylist import greylist
from mailtwist.filters.ratelimit import ratelimit

__all__ = ["dnsbl", "greylist", "ratelimit"]
