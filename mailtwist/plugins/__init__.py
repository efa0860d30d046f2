"""The twisted.plugin package for mailtwist filters.

A module here (or in a ``mailtwist/plugins/`` directory of another
distribution, without an ``__init__.py``) exporting objects that provide
``IPlugin`` and :class:`mailtwist.interfaces.IFilterFactory` makes filters
installable by name; see docs/filters.md.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 - set by the import system
__all__: list[str] = []
