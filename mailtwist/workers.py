"""``workers = N``: N processes serving the same listening sockets, to use every core.

The process twistd starts (the *main* process) binds every listener as usual
(before ``--uid`` drops privileges), then starts N-1 *worker* processes with
:func:`spawn_workers`, handing each listening socket down as an inherited file
descriptor.  A worker builds the same service from the same config, but adopts
those sockets (``reactor.adoptStreamPort``) instead of binding, and the kernel
spreads new connections over every process that accepts on them.

What stays in the main process only, so there is one of it:

- the outbound queue runner: a worker puts mail for remote recipients into the
  shared spool (durably, as always) and tells the main process the queue id over
  a pipe, which then schedules the delivery at once;
- logging: a worker sends its log events over the same pipe and the main
  process logs them (marked ``@workerN``) wherever its own logs go;
- the start-up cleanup of Maildir ``tmp/`` leftovers and the ``[web]`` listener
  (autoconfig, MTA-STS, /metrics: metrics are the main process's).

Everything else is safe across processes by construction: Maildir delivery is
tmp → fsync → link; UIDs are assigned under the ``dovecot-uidlist`` lock; IMAP
sessions notice other processes' changes by polling the Maildir (IDLE every
0.5 s); POP3 takes an ``flock`` per mailbox; greylisting is in SQLite.  Per-process
are: the login throttle, rate limits and connection caps (each counts the
connections and failures it sees; docs/performance.md says so).

Signals: SIGHUP to the main process reloads it and is passed to every worker;
stopping the main process stops the workers (SIGTERM: each finishes its
transactions in flight as in a normal graceful shutdown). A worker that dies is
started again after a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, eventAsJSON, eventFromJSON, globalLogPublisher
from zope.interface import implementer

log = Logger(namespace="mailtwist.workers")

#: Seconds before a worker that died is started again.
RESPAWN_DELAY = 1.0


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """An endpoint whose ``listen`` adopts an already-listening inherited socket."""

    def __init__(self, reactor: Any, fileno: int, family: socket.AddressFamily) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family

    def listen(self, factory: protocol.Factory) -> defer.Deferred:
        try:
            port = self.reactor.adoptStreamPort(self.fileno, self.family, factory)
        except Exception:  # noqa: BLE001 - the caller logs the failure
            return defer.fail()
        os.close(self.fileno)  # adoptStreamPort dup()s it
        return defer.succeed(port)


class MainPipe:
    """A worker's line to the main process: ``Q <queue id>`` for mail to deliver,
    ``L <event as JSON>`` for each log event (the main process logs it where
    its own logs go, JSON or text)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]

    def ready(self) -> None:
        """Tell the main process that SIGHUP may be sent now (it would kill a
        worker still starting up; one starting up reads the newest config anyway)."""
        self._send(b"R\n")

    def queued(self, envelope: Any) -> None:
        """Stands in for the queue runner: the main process's runner delivers."""
        try:
            self._send(b"Q " + envelope.id.encode("ascii") + b"\n")
        except OSError as e:
            # The mail is safe in the spool; the main process's periodic scan finds it.
            log.warn("cannot tell the main process about queued {id}: {error}",
                     id=envelope.id, error=e.strerror)

    def __call__(self, event: dict) -> None:
        try:
            self._send(b"L " + eventAsJSON(event).encode("utf-8") + b"\n")
        except (OSError, ValueError, TypeError):
            pass


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker as the main process sees it: its queue pipe and its exit."""

    def __init__(self, pool: "WorkerPoolService", index: int, queue_fd: int) -> None:
        self.pool = pool
        self.index = index
        self.queue_fd = queue_fd
        self.ready = False
        self.buffer = b""
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.queue_fd:
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            kind, _, rest = line.partition(b" ")
            if kind == b"Q":
                self.pool.queued(rest.decode("ascii", "replace"))
            elif kind == b"L":
                self.pool.log_event(self.index, rest)
            elif kind == b"R":
                self.ready = True

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPoolService(service.Service):
    """In the main process: starts ``count - 1`` workers once the listeners are
    bound, keeps them running, passes SIGHUP on and stops them on stop."""

    def __init__(self, top: Any, count: int, config_path: str | None,
                 overrides: dict[str, Any], reactor: Any) -> None:
        self.top = top
        self.count = count
        self.config_path = config_path
        self.overrides = overrides
        self.reactor = reactor
        self.processes: dict[int, Any] = {}
        self.protocols: dict[int, _WorkerProcess] = {}

    def startService(self) -> None:
        super().startService()
        listening = [listener.listening for listeners in self.top.listeners.values()
                     for listener in listeners if listener.role != "web"]
        d = defer.gatherResults(listening, consumeErrors=True)
        d.addCallback(lambda _: [self._spawn(i) for i in range(1, self.count)])
        d.addErrback(lambda f: log.error("workers not started: {e}", e=f.getErrorMessage()))

    def inherited(self) -> list[tuple[str, int, int, int]]:
        """(role, index, fd, address family) of every listening socket to hand down."""
        found = []
        for role, listeners in self.top.listeners.items():
            if role == "web":
                continue
            for index, listener in enumerate(listeners):
                if listener.port is None:
                    continue
                fd = listener.port.fileno()
                family = listener.port.socket.family
                found.append((role, index, fd, int(family)))
        return found

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        sockets = self.inherited()
        args = [sys.executable, "-m", "mailtwist.workers", "--index", str(index),
                "--overrides", json.dumps(self.overrides, default=str)]
        if self.config_path:
            args += ["--config", str(self.config_path)]
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for role, role_index, fd, family in sockets:
            child_fds[fd] = fd
            args += ["--listen", f"{role}:{role_index}:{fd}:{family}"]
        queue_fd = max(child_fds) + 1  # the worker's MainPipe
        child_fds[queue_fd] = "r"
        args += ["--pipe-fd", str(queue_fd)]
        proto = _WorkerProcess(self, index, queue_fd)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.processes[index] = self.reactor.spawnProcess(
            proto, sys.executable, args, env=env, childFDs=child_fds)
        self.protocols[index] = proto
        log.info("worker {index} started (pid {pid})", index=index,
                 pid=self.processes[index].pid)

    def queued(self, queue_id: str) -> None:
        runner = getattr(self.top, "queue", None)
        if runner is not None:
            runner.scan()

    def log_event(self, index: int, text: bytes) -> None:
        try:
            event = eventFromJSON(text.decode("utf-8", "replace"))
        except ValueError:
            return
        event["worker"] = index
        event["log_system"] = f"{event.get('log_namespace', '-')}@worker{index}"
        globalLogPublisher(event)

    def ended(self, proto: _WorkerProcess, reason: Any) -> None:
        self.processes.pop(proto.index, None)
        self.protocols.pop(proto.index, None)
        if self.running:
            log.error("worker {index} ended ({why}); starting it again",
                      index=proto.index, why=reason.getErrorMessage())
            self.reactor.callLater(RESPAWN_DELAY, self._spawn, proto.index)

    def signal_all(self, signum: int) -> None:
        """Send *signum* to every worker; SIGHUP only to those that said they are ready."""
        for index, process in list(self.processes.items()):
            proto = self.protocols.get(index)
            if signum == signal.SIGHUP and (proto is None or not proto.ready):
                continue
            try:
                process.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError):
                pass

    def stopService(self) -> defer.Deferred:
        super().stopService()
        ends = [p.ended for p in self.protocols.values()]
        self.signal_all(signal.SIGTERM)
        timeout = getattr(self.top.config, "shutdown_timeout", 30.0) + 10.0
        kill = self.reactor.callLater(timeout, self.signal_all, signal.SIGKILL)
        d = defer.DeferredList(ends)

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()

        return d.addCallback(done)


def spawn_workers(top: Any, config: Any, config_path: str | None,
                  overrides: dict[str, Any], reactor: Any) -> WorkerPoolService | None:
    """Attach a :class:`WorkerPoolService` to the main process's service tree
    when ``config.workers`` is above 1."""
    if getattr(config, "workers", 1) <= 1:
        return None
    pool = WorkerPoolService(top, config.workers, config_path, overrides, reactor)
    pool.setServiceParent(top)
    top.workers = pool
    return pool


def parse_listen(values: list[str]) -> dict[tuple[str, int], tuple[int, socket.AddressFamily]]:
    """``role:index:fd:family`` arguments → {(role, index): (fd, family)}."""
    inherited = {}
    for value in values:
        role, index, fd, family = value.split(":")
        inherited[(role, int(index))] = (int(fd), socket.AddressFamily(int(family)))
    return inherited


def main(argv: list[str] | None = None) -> None:
    """A worker process: build the service on the inherited sockets and run."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mailtwist.config import load_config
    from mailtwist.tap import build_service

    parser = argparse.ArgumentParser(prog="mailtwist-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--pipe-fd", type=int, required=True)
    args = parser.parse_args(argv)
    pipe = MainPipe(args.pipe_fd)
    globalLogBeginner.beginLoggingTo([pipe], redirectStandardIO=False)
    os.umask(os.umask(0o077) | 0o077)
    overrides = json.loads(args.overrides)
    config = load_config(args.config, overrides)
    top = build_service(config, reactor, worker=parse_listen(args.listen),
                        queue_notifier=pipe)
    top.worker_index = args.index
    top.config_overrides = overrides
    top.reload_service.install_signal = True
    service.IService(top).startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    pipe.ready()
    reactor.run(installSignalHandlers=True)


if __name__ == "__main__":
    main()
