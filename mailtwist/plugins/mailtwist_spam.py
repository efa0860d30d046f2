"""The spam-daemon and per-user rule filters, registered like a third party's
(twisted.plugin): ``spamd``, ``rspamd`` and ``rules``."""

from mailtwist.filters.rspamd import rspamd
from mailtwist.filters.rules import rules
from mailtwist.filters.spamd import spamd

__all__ = ["rspamd", "rules", "spamd"]
