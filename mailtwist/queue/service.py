"""Builds the outbound side from the config: resolver, transport, spool, runner."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet import ssl
from twisted.names import client
from twisted.python.threadpool import ThreadPool

from mailtwist.config import Config, ConfigError
from mailtwist.outbound.mx import MXResolver, parse_nameserver, system_nameservers
from mailtwist.outbound.transport import OutboundTransport, Relay
from mailtwist.queue.dispatch import Dispatcher
from mailtwist.queue.runner import QueueRunner
from mailtwist.queue.spool import Spool

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def spool_for(config: Config) -> Spool:
    return Spool(config.data_dir / "queue")


def dkim_key_dir(config: Config) -> Path:
    return config.dkim.key_dir or config.data_dir / "dkim"


def _trust_root(path: Path | None):
    if path is None:
        return ssl.platformTrust()
    try:
        pems = _PEM_CERT.findall(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"outbound.tls_ca_file: cannot read {path}: {e.strerror}") from None
    if not pems:
        raise ConfigError(f"outbound.tls_ca_file: no PEM certificate in {path}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])


def _relay(config: Config) -> Relay | None:
    out = config.outbound
    if not out.relay_host:
        return None
    password = out.relay_password
    if out.relay_password_file is not None:
        try:
            password = out.relay_password_file.read_text().strip("\r\n")
        except OSError as e:
            raise ConfigError(f"outbound.relay_password_file: cannot read "
                              f"{out.relay_password_file}: {e.strerror}") from None
    return Relay(out.relay_host, out.relay_port, out.relay_tls, out.relay_username, password,
                 tuple(out.relay_domains))


def build_outbound(config: Config, directory, local_delivery, reactor,
                   io_pool: ThreadPool, resolver=None) -> tuple[Dispatcher, QueueRunner]:
    """The dispatcher (for SMTP sessions) and the queue runner (a service to start)."""
    out = config.outbound
    if resolver is None:
        servers = ([parse_nameserver(s) for s in out.dns_servers] if out.dns_servers
                   else system_nameservers())
        resolver = client.Resolver(servers=servers, reactor=reactor)
    mx = MXResolver(resolver, ipv6=out.ipv6, timeout=out.dns_timeout)
    root = _trust_root(out.tls_ca_file) if "verify" in (out.tls, out.relay_tls) else None

    def verify_creator(hostname: str):
        return ssl.optionsForClientTLS(hostname, trustRoot=root)

    transport = OutboundTransport(
        reactor=reactor, mx=mx, helo_name=config.hostname, port=out.port, tls_mode=out.tls,
        verify_creator=verify_creator, relay=_relay(config),
        connect_timeout=out.connect_timeout, command_timeout=out.command_timeout,
        data_timeout=out.data_timeout)
    spool = spool_for(config)
    signer = None
    if config.dkim.sign:
        from mailtwist.dkim import DKIMSigner
        signer = DKIMSigner(dkim_key_dir(config), directory.is_local_domain)
    dispatcher = Dispatcher(local_delivery, spool, directory, reactor, io_pool, signer)
    queue_pool = ThreadPool(minthreads=0, maxthreads=4, name="queue-io")
    runner = QueueRunner(spool, config.queue, transport, dispatcher, config.hostname, reactor,
                         queue_pool, max_recipients=out.max_recipients)
    dispatcher.runner = runner
    return dispatcher, runner
