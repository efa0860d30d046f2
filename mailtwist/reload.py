"""Reload without restart: SIGHUP, ``mailtwist reload`` and certificate renewal.

A reload reads the config file again (with the command-line overrides given at
start), then checks everything it can before it changes anything: the TOML and
its values, the certificate and key (a TLS context is built from them) and the
filter chains (each filter is built). Any error is logged as one line,
``reload refused: <reason>``, and the running configuration stays as it was.

Once everything checked, the new settings are swapped in:

- the TLS context the listeners hold (:class:`mailtwist.tls.ServerTLS`): new
  handshakes use the new certificate, connections already encrypted keep theirs;
- the filter chains of the SMTP listeners (sessions under way keep theirs);
- the settings read per connection or per command ([smtp] limits, [pop3],
  ``allow_plaintext_auth``, ``shutdown_timeout``) and the directory's settings
  (``plus_separator``, ``postmaster``, ``bcrypt_rounds``); the directory files
  are read again.

Keys that the running listeners, queue and stores were built from
(:data:`RESTART_KEYS`) keep their old values; when they changed, one line says
that they need a restart.

:class:`ReloadService` installs the SIGHUP handler, writes the pid file that
``mailtwist reload`` signals, and checks every :attr:`ReloadService.cert_interval`
seconds whether the certificate or key file changed (an ACME renewal): then only
the TLS context is reloaded.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from mailtwist.config import SMTP_ROLES, Config, ConfigError, load_config

log = Logger()

PID_FILE = "mailtwist.pid"

# Config attributes the running service was built from: a reload leaves them
# as they are and says they need a restart.
RESTART_KEYS = {
    "data_dir": "data_dir",
    "hostname": "hostname",
    "listen": "listen",
    "web": "web",
    "queue": "queue",
    "outbound": "outbound",
    "dkim": "dkim",
    "auth_failure_delay": "auth.failure_delay",
    "auth_throttle": "auth (throttle limits)",
    "limits": "limits",
}
# Not settings at all.
_NOT_SETTINGS = {"source"}


def pid_file(config: Config) -> Path:
    """Where the running server writes its process id (``mailtwist reload`` reads it)."""
    return config.data_dir / PID_FILE


@dataclass
class ReloadPlan:
    """Everything a reload will switch to, built and checked before anything changes."""

    config: Config
    material: Any
    chains: dict[str, Any]
    restart_needed: list[str]


class Reloader:
    """Re-reads the configuration of a running :class:`mailtwist.tap.MailService`."""

    def __init__(self, top: Any, overrides: Mapping[str, Any] | None = None,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.top = top
        self.overrides = dict(overrides or {})
        self.reactor = reactor

    def reload(self) -> bool:
        """Check, then apply the config file as it is now; False (and one logged
        line) when it was refused and the old configuration stays."""
        try:
            plan = self.prepare()
        except Exception as e:  # noqa: BLE001 - any reason to refuse is reported
            reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            log.error("reload refused: {reason}", reason=reason.replace("\n", " "))
            return False
        self.apply(plan)
        return True

    def prepare(self) -> ReloadPlan:
        """Load and check everything; raise (ConfigError) on the first problem."""
        from mailtwist.filters.loader import build_chains
        from mailtwist.tls import ensure_default_certificate, load_server_tls

        live: Config = self.top.config
        overrides = {**getattr(self.top, "config_overrides", {}), **self.overrides}
        new = load_config(live.source, overrides)
        restart_needed = [label for name, label in RESTART_KEYS.items()
                          if getattr(new, name, None) != getattr(live, name, None)]
        # What the running service is built on stays: the data directory in
        # particular, since the default certificate lives there.
        for name in RESTART_KEYS:
            if hasattr(live, name):
                setattr(new, name, getattr(live, name))
        if new.tls_cert is None:
            # Back to the self-signed default: made on first use, as at start.
            ensure_default_certificate(new.data_dir, new.hostname)
        material = load_server_tls(new.cert_path, new.key_path)
        # plus_separator and postmaster need no check of their own: load_config
        # refuses what FileDirectory would.
        chains = build_chains(new, clock=self.reactor,
                              threadpool=getattr(self.top, "io_pool", None))
        chains.update(getattr(self.top, "fixed_filters", None) or {})
        return ReloadPlan(new, material, chains, restart_needed)

    def apply(self, plan: ReloadPlan) -> None:
        """Switch to *plan*: nothing here can fail half-way for a config reason."""
        top, new = self.top, plan.config
        live: Config = top.config
        for f in fields(Config):
            if f.name not in RESTART_KEYS and f.name not in _NOT_SETTINGS:
                setattr(live, f.name, getattr(new, f.name))
        live.source = new.source
        tls = getattr(top, "tls", None)
        if tls is not None:
            old = tls.fingerprint
            tls.switch(plan.material)
            if tls.fingerprint != old:
                log.info("TLS certificate {cert} SHA-256 fingerprint {fp} (new handshakes)",
                         cert=plan.material.cert_path, fp=tls.fingerprint)
        _switch_filters(top, plan.chains)
        directory = getattr(top, "directory", None)
        if directory is not None:
            directory.plus_separator = live.plus_separator
            directory.postmaster = live.postmaster
            directory.bcrypt_rounds = live.bcrypt_rounds
            _force_directory_reread(directory)
        if plan.restart_needed:
            log.warn("reload: {keys} changed; that needs a restart (the running values stay)",
                     keys=", ".join(plan.restart_needed))
        log.info("reloaded configuration from {source}",
                 source=live.source or "defaults and command-line options")


def _switch_filters(top: Any, chains: dict[str, Any]) -> None:
    """New sessions (and messages leaving, and IMAP mailbox events) use *chains*."""
    for role, factory in getattr(top, "session_factories", []):
        if role in SMTP_ROLES and role in chains:
            factory.filters = chains[role]
        if "outbound" in chains and hasattr(factory, "outbound_filters"):
            factory.outbound_filters = chains["outbound"]
        if "mailbox" in chains and hasattr(factory, "mailbox_filters"):
            factory.mailbox_filters = chains["mailbox"]
    dispatcher = getattr(top, "dispatcher", None)
    if "outbound" in chains and hasattr(dispatcher, "outbound_filters"):
        dispatcher.outbound_filters = chains["outbound"]
    if hasattr(top, "filter_chains"):
        top.filter_chains = chains


def _force_directory_reread(directory: Any) -> None:
    """Read the domains, users and aliases files again even if their stat looks the same.

    FileDirectory re-reads a file when its (inode, size, times) change; forgetting
    the remembered stat makes the next read unconditional.
    """
    keys = getattr(directory, "_keys", None)
    if isinstance(keys, dict):
        keys.clear()
    directory.reload_if_changed()


class ReloadService(service.Service):
    """SIGHUP handler, pid file and certificate watcher of a running server.

    *install_signal* is False in tests (the test process keeps its SIGHUP); the
    pid file is written either way, in the data directory.
    """

    cert_interval = 60.0
    #: False in the worker processes of ``workers = N``: the pid file names the main one.
    write_pid = True

    def __init__(self, reloader: Reloader, tls: Any, clock: Any = None,
                 install_signal: bool = False) -> None:
        self.reloader = reloader
        self.tls = tls
        self.clock = clock if clock is not None else reloader.reactor
        self.install_signal = install_signal
        self._previous_handler: Any = None
        self._watch: task.LoopingCall | None = None
        self._failed_stamps: Any = None
        self._pid_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.install_signal and hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.write_pid:
            self._write_pid()
        if self.tls is not None:
            self._watch = task.LoopingCall(self.check_certificate)
            self._watch.clock = self.clock
            self._watch.start(self.cert_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.install_signal and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
            self._previous_handler = None
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        self._remove_pid()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of the main thread: hand
        # the work to the reactor, which wakes up for it.
        self.reloader.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        log.info("reload requested")
        workers = getattr(self.reloader.top, "workers", None)
        if workers is not None:
            workers.signal_all(signal.SIGHUP)
        return self.reloader.reload()

    # -- certificate renewal -----------------------------------------------------

    def check_certificate(self) -> bool:
        """Switch to the certificate on disk when its file or the key's changed;
        True when it did. A pair that does not load (the key not written yet,
        say) is reported once and tried again when the files change again."""
        from mailtwist.tls import FileStamp, load_server_tls

        current = self.tls.material
        stamps = (FileStamp.of(current.cert_path), FileStamp.of(current.key_path))
        if stamps in (current.stamps, self._failed_stamps):
            return False
        try:
            material = load_server_tls(current.cert_path, current.key_path)
        except ConfigError as e:
            self._failed_stamps = stamps
            log.error("certificate reload refused: {reason}", reason=str(e))
            return False
        self._failed_stamps = None
        self.tls.switch(material)
        log.info("TLS certificate {cert} changed on disk; SHA-256 fingerprint {fp} "
                 "(new handshakes)", cert=material.cert_path, fp=material.fingerprint)
        return True

    # -- pid file --------------------------------------------------------------

    def _write_pid(self) -> None:
        path = pid_file(self.reloader.top.config)
        try:
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)
        except OSError as e:
            log.warn("cannot write the pid file {path}: {error}; `mailtwist reload` "
                     "will not find this server", path=path, error=e.strerror)
            return
        self._pid_path = path

    def _remove_pid(self) -> None:
        path, self._pid_path = self._pid_path, None
        if path is None:
            return
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        except OSError:
            pass
