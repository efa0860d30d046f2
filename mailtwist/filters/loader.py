"""Finding filters (twisted.plugin in ``mailtwist.plugins``, or a dotted path)
and building each SMTP role's :class:`FilterChain` from the config."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.plugin import getPlugins
from twisted.python.reflect import namedAny

from mailtwist.config import FILTER_CHAINS, Config, ConfigError
from mailtwist.filters import FilterConfigError, accepts_context
from mailtwist.filters.chain import FilterChain
from mailtwist.interfaces import FilterContext, IFilter, IFilterFactory


def installed_factories() -> dict[str, IFilterFactory]:
    """Every filter factory in the ``mailtwist.plugins`` plugin package, by name."""
    import mailtwist.plugins

    found: dict[str, IFilterFactory] = {}
    for factory in getPlugins(IFilterFactory, mailtwist.plugins):
        found.setdefault(factory.name, factory)
    return dict(sorted(found.items()))


def find_factory(name: str, installed: dict[str, IFilterFactory] | None = None
                 ) -> IFilterFactory:
    """The factory called *name* (a plugin name or a dotted path), or ConfigError."""
    if installed is None:
        installed = installed_factories()
    if name in installed:
        return installed[name]
    if "." in name:
        try:
            obj = namedAny(name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"filter {name!r}: cannot import it: {e}") from None
        if not IFilterFactory.providedBy(obj):
            raise ConfigError(f"filter {name!r}: does not provide IFilterFactory "
                              "(see docs/filters.md)")
        return obj
    names = ", ".join(installed) or "none"
    raise ConfigError(f"filter {name!r}: not installed; installed filters: {names}")


def build_filter(name: str, settings: dict, installed: dict[str, IFilterFactory] | None = None,
                 context: FilterContext | None = None) -> IFilter:
    """Build one configured filter; ConfigError naming ``filters.NAME.key`` when its
    settings are refused.  *context* reaches factories whose ``build`` takes it."""
    factory = find_factory(name, installed)
    try:
        if accepts_context(factory.build):
            flt = factory.build(settings, context)
        else:
            flt = factory.build(settings)
    except FilterConfigError as e:
        where = f"filters.{name}" + (f".{e.key}" if e.key else "")
        raise ConfigError(f"{where}: {e}") from None
    if not IFilter.providedBy(flt):
        raise ConfigError(f"filter {name!r}: its factory built {flt!r}, not an IFilter")
    return flt


def filter_context(config: Config, name: str, reactor=None, threadpool=None) -> FilterContext:
    """The FilterContext filter *name* is built with under *config*."""
    return FilterContext(hostname=config.hostname,
                         state_dir=config.data_dir / "filters" / name,
                         dns_servers=tuple(config.outbound.dns_servers),
                         dns_timeout=config.outbound.dns_timeout,
                         reactor=reactor, threadpool=threadpool,
                         workers=getattr(config, "workers", 1))


def build_chains(config: Config, clock=None, threadpool=None) -> dict[str, FilterChain]:
    """A FilterChain per SMTP role, plus ``outbound`` and ``mailbox`` (empty
    where nothing is enabled).  A filter enabled in several lists is built once."""
    settings = config.filters
    installed = installed_factories() if settings.enabled else {}
    built: dict[str, IFilter] = {}
    chains = {}
    for role in FILTER_CHAINS:
        filters = []
        for name in settings.enabled.get(role, []):
            if name not in built:
                context = filter_context(config, name, clock, threadpool)
                built[name] = build_filter(name, settings.settings.get(name, {}), installed,
                                           context)
            filters.append(built[name])
        chains[role] = FilterChain(filters, timeout=settings.timeout, clock=clock)
    return chains


@dataclass(frozen=True)
class FilterListing:
    """One line of ``mailtwist filters``."""

    name: str
    description: str
    roles: tuple[str, ...]


def list_filters(config: Config) -> list[FilterListing]:
    """Installed filters plus enabled dotted-path ones, with the roles enabling each."""
    installed = installed_factories()
    names = list(installed)
    for role_names in config.filters.enabled.values():
        names += [n for n in role_names if n not in names]
    result = []
    for name in names:
        roles = tuple(r for r in FILTER_CHAINS if name in config.filters.enabled.get(r, []))
        try:
            description = find_factory(name, installed).description
        except ConfigError as e:
            description = f"ERROR: {e}"
        result.append(FilterListing(name, description, roles))
    return result


def format_listing(config: Config) -> str:
    """The text ``mailtwist filters`` prints."""
    lines = []
    for item in list_filters(config):
        enabled = ", ".join(item.roles) if item.roles else "-"
        lines.append(f"{item.name:<24} {enabled:<30} {item.description}")
    if not lines:
        return "no filters installed\n"
    return f"{'NAME':<24} {'ENABLED FOR':<30} DESCRIPTION\n" + "\n".join(lines) + "\n"
