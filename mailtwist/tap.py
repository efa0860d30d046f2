"""``twistd mailtwist``: command-line options and the service tree.

Start-up problems (bad config, endpoint or certificate) print one line,
``mailtwist: error: ...``, and exit with status 1: no traceback.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mailtwist.config import IMPLICIT_TLS_ROLES, ROLES, Config, ConfigError, load_config

log = Logger()


class Options(usage.Options):
    """Options of ``twistd mailtwist``; each overrides the config file."""

    synopsis = "[options]"
    longdesc = ("Run the mailtwist mail server (SMTP, submission, POP3). With no "
                "config and no options it starts on an embedded default in "
                "./mailtwist-data. Listener options take Twisted endpoint strings "
                "(e.g. tcp:25, ssl:465, tcp:port=2525:interface=127.0.0.1), may be "
                "repeated, and 'none' disables that role.")
    optParameters = [
        ["config", "c", None, "TOML config file (default: ./mailtwist.toml when present)"],
        ["data-dir", "d", None, "data directory (default: ./mailtwist-data)"],
        ["hostname", None, None, "host name for greetings and Received headers"],
        ["workers", None, None, "processes serving the listeners (default 1; the cores "
                                "to use them all)"],
        ["log-format", None, "text", "text, or json for one JSON object per log line"],
    ]
    optFlags = [
        ["allow-plaintext-auth", None, "allow passwords over connections without TLS"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listen: dict[str, list[str]] = {}
        self.web: list[str] = []

    def _listener(role: str):  # noqa: N805 - builds the opt_ methods below
        def opt(self, endpoint: str) -> None:
            self.listen.setdefault(role, []).append(endpoint)
        opt.__doc__ = f"endpoint for the {role} listener (repeatable; 'none' disables)"
        return opt

    opt_smtp = _listener("smtp")
    opt_submission = _listener("submission")
    opt_submissions = _listener("submissions")
    opt_imap = _listener("imap")
    opt_imaps = _listener("imaps")
    opt_pop3 = _listener("pop3")
    opt_pop3s = _listener("pop3s")
    del _listener

    def opt_web(self, endpoint: str) -> None:
        """endpoint for the web listener: autoconfig, metrics (repeatable; 'none' disables)"""
        self.web.append(endpoint)

    def postOptions(self) -> None:
        """--log-format json becomes twistd's log observer (its --logger), which
        twistd reads from the parent options after they are parsed."""
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format: expected text or json, got "
                                   f"{self['log-format']!r}")
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None:
            if parent.get("logger"):
                raise usage.UsageError("--log-format json and twistd's --logger both choose"
                                       " the log observer: give one of them")
            from mailtwist.events import use_json_log

            parent["logger"] = use_json_log(parent.get("logfile"), bool(parent.get("nodaemon")))

    def overrides(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self["data-dir"]:
            result["data_dir"] = self["data-dir"]
        if self["hostname"]:
            result["hostname"] = self["hostname"]
        if self["allow-plaintext-auth"]:
            result["allow_plaintext_auth"] = True
        if self["workers"] is not None:
            try:
                result["workers"] = int(self["workers"])
            except ValueError:
                raise usage.UsageError(f"--workers: expected a number, got "
                                       f"{self['workers']!r}") from None
        if self.listen:
            result["listen"] = dict(self.listen)
        if self.web:
            result["web"] = {"listen": list(self.web)}
        return result


class ListenerService(service.Service):
    """Listens on one endpoint; says where, or why it could not."""

    def __init__(self, role: str, description: str, endpoint, factory, reactor) -> None:
        self.role = role
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()
        self._attempt: defer.Deferred | None = None

    def privilegedStartService(self) -> None:
        """Bind before twistd drops privileges (``--uid``), so ports below 1024 work."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._attempt is None:
            self._listen()

    def _listen(self) -> None:
        self._attempt = self.endpoint.listen(self.factory)
        self._attempt.addCallbacks(self._listening, self._failed)

    def _listening(self, port) -> None:
        self.port = port
        host = port.getHost()
        log.info("{role} listening on {desc} ({host}:{port})", role=self.role,
                 desc=self.description, host=getattr(host, "host", host),
                 port=getattr(host, "port", ""))
        self.listening.callback(port)

    def _failed(self, failure) -> None:
        log.critical("cannot listen for {role} on {desc}: {error}", role=self.role,
                     desc=self.description, error=failure.getErrorMessage())
        self.listening.errback(failure)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        self._attempt = None
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class ThreadPoolService(service.Service):
    """Starts and stops a thread pool with the application."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class TmpCleanupService(service.Service):
    """Once at start-up, in a worker thread: remove what crashed deliveries left
    in the Maildirs' tmp/ (rule: `Maildir.clean_tmp`) and in the quarantine
    (`QuarantineStore.clean_blocking`)."""

    def __init__(self, store, reactor, pool: ThreadPool, quarantine=None) -> None:
        self.store = store
        self.reactor = reactor
        self.pool = pool
        self.quarantine = quarantine
        self.done: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.threads import deferToThreadPool

        self.done = deferToThreadPool(self.reactor, self.pool, self._clean)
        self.done.addCallbacks(self._cleaned, self._failed)

    def _clean(self) -> tuple[int, int]:
        from mailtwist.storage.maildir import Maildir

        maildirs = removed = 0
        for domain in _subdirs(self.store.root):
            for account in _subdirs(domain):
                maildirs += 1
                removed += Maildir(account, hostname=self.store.hostname).clean_tmp()
        if self.quarantine is not None:
            removed += self.quarantine.clean_blocking()
        return maildirs, removed

    def _cleaned(self, result: tuple[int, int]) -> None:
        maildirs, removed = result
        log.info("tmp/ cleanup done: {removed} leftover file(s) removed in {maildirs} "
                 "Maildir(s)", removed=removed, maildirs=maildirs)

    def _failed(self, failure) -> None:
        log.error("tmp/ cleanup failed: {error}", error=failure.getErrorMessage())


def _subdirs(path) -> list:
    """The subdirectories of path (none if it does not exist)."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


class MailService(service.MultiService):
    """The whole server: every listener plus the pools and stores behind them."""

    def __init__(self, config: Config) -> None:
        from mailtwist.shutdown import SessionTracker

        super().__init__()
        self.config = config
        self.listeners: dict[str, list[ListenerService]] = {}
        # Reload and graceful shutdown (mailtwist/reload.py, mailtwist/shutdown.py).
        self.config_overrides: dict[str, Any] = {}
        self.session_factories: list[tuple[str, Any]] = []
        self.sessions = SessionTracker()
        self.shutdown_clock: Any = None
        self.reloader: Any = None
        self._stopping: defer.Deferred | None = None

    def reload(self) -> bool:
        """Re-read the config, certificate, filters and directory (SIGHUP,
        ``mailtwist reload``); False when the new config was refused."""
        return self.reloader.reload()

    def startService(self) -> None:
        self._stopping = None
        super().startService()

    def stopService(self) -> defer.Deferred | None:
        """Graceful: stop listening and starting outbound deliveries; let SMTP
        transactions in flight finish within ``shutdown_timeout``, close every
        other session with a goodbye; then stop the pools and the rest."""
        if self._stopping is not None:
            waiter: defer.Deferred = defer.Deferred()
            self._stopping.addBoth(lambda result: (waiter.callback(None), result)[1])
            return waiter
        if not self.running:
            return None
        first = [defer.maybeDeferred(listener.stopService)
                 for listeners in self.listeners.values() for listener in listeners]
        queue = getattr(self, "queue", None)
        if queue is not None:
            first.append(defer.maybeDeferred(queue.stopService))
        clock = self.shutdown_clock
        if clock is None:
            from twisted.internet import reactor as clock
        d = defer.DeferredList(first, consumeErrors=True)
        d.addCallback(lambda _: self.sessions.drain(self.config.shutdown_timeout, clock))
        d.addErrback(lambda f: log.failure("graceful shutdown failed", f))
        d.addBoth(lambda _: service.MultiService.stopService(self))
        self._stopping = d
        return d

    def port_of(self, role: str, index: int = 0) -> int:
        return self.listeners[role][index].port.getHost().port

    def advertised_ports(self) -> dict[str, int]:
        """Role -> the port clients should use: the first listener's bound TCP port
        (or, before it listens, the port in its endpoint string)."""
        from mailtwist.dnsrecords import endpoint_port

        ports = {}
        for role, listeners in self.listeners.items():
            for listener in listeners:
                port = getattr(listener.port.getHost(), "port", None) if listener.port \
                    else endpoint_port(listener.description)
                if port:
                    ports[role] = port
                    break
        return ports


def _endpoint(reactor, role: str, description: str, tls_context):
    """The endpoint and whether our factory must be wrapped in TLS (implicit-TLS roles
    given ``ssl:``/``tcp:`` without a key use the configured certificate)."""
    wrap = False
    if role in IMPLICIT_TLS_ROLES:
        kind, _, rest = description.partition(":")
        if kind in ("ssl", "tcp") and "privateKey=" not in rest and "certKey=" not in rest:
            description = "tcp:" + rest
            wrap = True
    try:
        return serverFromString(reactor, description), wrap
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"listen.{role}: bad endpoint {description!r}: {e}") from None


def _web_endpoint(reactor, description: str):
    """Like :func:`_endpoint` for ``[web] listen``: ``ssl:`` without a key uses [tls]."""
    kind, _, rest = description.partition(":")
    wrap = kind == "ssl" and "privateKey=" not in rest and "certKey=" not in rest
    try:
        return serverFromString(reactor, "tcp:" + rest if wrap else description), wrap
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"web.listen: bad endpoint {description!r}: {e}") from None


def _demo_account(config: Config, directory) -> None:
    """A fresh data directory gets a demo domain and user, so the server is usable at once."""
    if (config.data_dir / "domains").exists():
        return
    domain = "example.test"
    password = secrets.token_urlsafe(12)
    directory.add_domain(domain)
    directory.add_account(f"demo@{domain}", password)
    path = config.data_dir / "demo-password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"demo@{domain} {password}\n")
    log.warn("new data directory: created demo account demo@{domain}; its password is in "
             "{path}. Add your own domain with: mailtwist domain add yourdomain.org",
             domain=domain, path=path)


def build_service(config: Config, reactor=None, filters: dict | None = None,
                  worker: dict | None = None, queue_notifier: Any = None) -> MailService:
    """Build the service tree for *config*; ConfigError for anything unusable.

    *filters* maps SMTP roles to ready FilterChains (mailtwist.testing passes
    filter objects this way); by default they are built from ``[filters]``.
    *worker* is given in the worker processes of ``workers = N``
    (mailtwist/workers.py): {(role, index): (fd, family)} of the listening
    sockets inherited from the main process, which alone runs the queue, the
    tmp/ cleanup and the web listener; *queue_notifier* then stands in for the
    queue runner.
    """
    if reactor is None:
        from twisted.internet import reactor
    from mailtwist.filters.loader import build_chains
    from mailtwist.auth import VerifiedCache, build_portal
    from mailtwist.delivery import LocalDelivery
    from mailtwist.directory import FileDirectory
    from mailtwist.imap.server import IMAPFactory, register_imap
    from mailtwist.limits import ConnectionLimiter, LimitedFactory, ensure_fd_limit
    from mailtwist.metrics import EventCounter, Metrics
    from mailtwist.pop3 import POP3Factory, register_pop3
    from mailtwist.quarantine import QuarantineStore
    from mailtwist.queue.service import build_outbound
    from mailtwist.quota import QuotaChecker
    from mailtwist.reload import Reloader, ReloadService
    from mailtwist.smtp.policy import SMTPPolicy, register_smtp
    from mailtwist.smtp.server import SMTPFactory
    from mailtwist.storage.store import MailStore
    from mailtwist.throttle import LoginThrottle
    from mailtwist.tls import ensure_default_certificate, server_context_factory
    from mailtwist.workers import AdoptedEndpoint

    try:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"data_dir: cannot create {config.data_dir}: {e.strerror}") from None
    if config.tls_cert is None:
        cert, key, fp = ensure_default_certificate(config.data_dir, config.hostname)
        log.info("TLS certificate {cert} (self-signed) SHA-256 fingerprint {fp}",
                 cert=cert, fp=fp)
    tls_context = server_context_factory(config.cert_path, config.key_path)
    if config.tls_cert is not None:
        log.info("TLS certificate {cert} SHA-256 fingerprint {fp}", cert=config.cert_path,
                 fp=tls_context.fingerprint)

    directory = FileDirectory(config.data_dir, plus_separator=config.plus_separator,
                              postmaster=config.postmaster)
    directory.bcrypt_rounds = config.bcrypt_rounds
    _demo_account(config, directory)
    store = MailStore(config.data_dir / "mail", config.hostname)

    top = MailService(config)
    top.tls, top.shutdown_clock, top.fixed_filters = tls_context, reactor, dict(filters or {})
    auth_pool = ThreadPool(minthreads=0, maxthreads=max(2, os.cpu_count() or 2), name="bcrypt")
    io_pool = ThreadPool(minthreads=0, maxthreads=8, name="mail-io")
    ThreadPoolService(auth_pool).setServiceParent(top)
    ThreadPoolService(io_pool).setServiceParent(top)
    top.io_pool = io_pool
    chains = build_chains(config, clock=reactor, threadpool=io_pool)
    chains.update(filters or {})
    if worker is None:
        top.tmp_cleanup = TmpCleanupService(store, reactor, io_pool)
        top.tmp_cleanup.setServiceParent(top)
    login_cache = VerifiedCache(reactor, config.auth_throttle.cache_ttl,
                                config.auth_throttle.cache_size)
    portal, realm = build_portal(directory, reactor, auth_pool, login_cache)
    # One brute-force throttle for every listener: SMTP AUTH, POP3 and IMAP.
    throttle = LoginThrottle.from_config(config, clock=reactor)
    quota = QuotaChecker(directory, store, reactor, io_pool)
    delivery = LocalDelivery(store, reactor, io_pool)
    metrics = Metrics()
    metrics.count_logins(portal)
    dispatcher, queue_runner = build_outbound(config, directory,
                                              metrics.count_deliveries(delivery), reactor,
                                              io_pool)
    metrics.watch_queue(lambda: len(queue_runner.spool.ids()))
    top.metrics = metrics
    EventCounter(metrics).setServiceParent(top)
    if worker is None:
        queue_runner.setServiceParent(top)
        top.queue = queue_runner
    else:
        dispatcher.runner = queue_notifier
        top.queue = None
    top.dispatcher = dispatcher
    dispatcher.outbound_filters = chains.get("outbound")
    register_smtp(realm, directory, dispatcher)
    register_pop3(realm, store, reactor, io_pool)
    register_imap(realm, store, reactor, io_pool, directory=directory)
    top.directory, top.store, top.delivery, top.portal = directory, store, delivery, portal
    top.throttle = throttle
    top.quarantine = QuarantineStore(config.data_dir / "quarantine", reactor, io_pool)
    if worker is None:
        top.tmp_cleanup.quarantine = top.quarantine
    top.filter_chains = chains

    # Connection caps of every listener (docs/security.md); the total stays
    # below what the open-file limit allows, so a flood is answered, not EMFILE.
    limiter = ConnectionLimiter.from_config(config)
    limiter.max_connections = ensure_fd_limit(config.limits.max_connections)
    if limiter.max_connections < config.limits.max_connections:
        log.warn("limits.max_connections lowered to {n}: the open-file limit allows no more",
                 n=limiter.max_connections)
    top.limiter = limiter

    for role in ROLES:
        for index, description in enumerate(config.listen.get(role, [])):
            endpoint, wrap = _endpoint(reactor, role, description, tls_context)
            if worker is not None:
                if (role, index) not in worker:
                    continue
                endpoint = AdoptedEndpoint(reactor, *worker[role, index])
            implicit = role in IMPLICIT_TLS_ROLES
            if role in ("smtp", "submission", "submissions"):
                factory = SMTPFactory(config, SMTPPolicy(role, directory),
                                      metrics.count_received(dispatcher, role), portal,
                                      tls_context, implicit_tls=implicit, reactor=reactor,
                                      filters=chains[role], throttle=throttle,
                                      quota=quota, outbound_filters=chains.get("outbound"),
                                      quarantine=top.quarantine)
            elif role in ("pop3", "pop3s"):
                factory = POP3Factory(portal, config, tls_context, implicit_tls=implicit,
                                      reactor=reactor, threadpool=io_pool, throttle=throttle)
            else:
                factory = IMAPFactory(portal, config, tls_context, implicit_tls=implicit,
                                      reactor=reactor, threadpool=io_pool, store=store,
                                      throttle=throttle,
                                      mailbox_filters=chains.get("mailbox"))
            factory.noisy = False
            factory.limiter = limiter
            top.session_factories.append((role, factory))
            factory = top.sessions.track(factory)
            factory = metrics.count_connections(factory, role)
            factory = LimitedFactory(factory, limiter, role, config.hostname)
            if wrap:
                factory = TLSMemoryBIOFactory(tls_context, False, factory)
                factory.noisy = False
            listener = ListenerService(role, description, endpoint, factory, reactor)
            listener.setServiceParent(top)
            top.listeners.setdefault(role, []).append(listener)
    if config.web.listen and worker is None:
        _add_web_listeners(top, config, directory, metrics, tls_context, reactor, io_pool)
    top.reloader = Reloader(top, reactor=reactor)
    top.reload_service = ReloadService(top.reloader, tls_context)
    top.reload_service.write_pid = worker is None
    top.reload_service.setServiceParent(top)
    return top


def _add_web_listeners(top: MailService, config: Config, directory, metrics, tls_context,
                       reactor, io_pool) -> None:
    """The optional [web] listener: autoconfig, MTA-STS policy, /metrics."""
    from mailtwist.web import build_site

    site = build_site(config, directory.is_local_domain, top.advertised_ports, metrics,
                      reactor, io_pool)
    for description in config.web.listen:
        endpoint, wrap = _web_endpoint(reactor, description)
        factory = metrics.count_connections(site, "web")
        if wrap:
            factory = TLSMemoryBIOFactory(tls_context, False, factory)
            factory.noisy = False
        listener = ListenerService("web", description, endpoint, factory, reactor)
        listener.setServiceParent(top)
        top.listeners.setdefault("web", []).append(listener)


def _twistd_owner(options: Options) -> tuple[int, int] | None:
    """The (uid, gid) twistd switches to after binding (``--uid``/``--gid``), or None."""
    parent = getattr(options, "parent", None)
    uid = parent.get("uid") if parent is not None else None
    gid = parent.get("gid") if parent is not None else None
    if uid is None and gid is None:
        return None
    if gid is None:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    return (os.getuid() if uid is None else uid), gid


def hand_over(config: Config, owner: tuple[int, int] | None) -> None:
    """Give the data directory (and an outside DKIM key dir) to the user twistd
    switches to, so the server can still write what makeService created as root.
    Symlinks are changed themselves, never followed."""
    if owner is None or os.geteuid() != 0:
        return
    uid, gid = owner
    roots = [config.data_dir] + ([config.dkim.key_dir] if config.dkim.key_dir else [])
    try:
        os.chmod(config.data_dir, 0o700)
        for root in roots:
            if not os.path.isdir(root):
                continue
            os.chown(root, uid, gid, follow_symlinks=False)
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    except OSError as e:
        raise ConfigError(f"data_dir: cannot hand {config.data_dir} over to uid {uid}: "
                          f"{e.strerror}") from None


def makeService(options: Options) -> service.IService:
    """twistd's entry point: build from the config file plus options, or exit with one line."""
    from mailtwist.directory import DirectoryError

    overrides = options.overrides()
    try:
        config = load_config(options["config"], overrides)
        os.umask(os.umask(0o077) | 0o077)  # whatever we create: private to the server
        top = build_service(config)
        hand_over(config, _twistd_owner(options))
    except (ConfigError, DirectoryError) as e:
        sys.stderr.write(f"mailtwist: error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1)
    # SIGHUP reloads with the same options; only the real server takes the signal.
    top.config_overrides = overrides
    top.reload_service.install_signal = True
    from twisted.internet import reactor

    from mailtwist.workers import spawn_workers

    spawn_workers(top, config, options["config"], top.config_overrides, reactor)
    return top
