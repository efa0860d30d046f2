"""``mailtwist dns DOMAIN [--check]``: the records to publish, and checking them."""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import client, dns
from twisted.trial import unittest

from mailtwist.cli import main
from mailtwist.config import load_config
from mailtwist.dkim import public_records
from mailtwist.dnsrecords import (
    check_records,
    configured_ports,
    endpoint_port,
    expected_records,
    mta_sts_id,
)
from tests.dnsserver import TestDNSServer

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "example.test"
HOST = "mx.example.test"
LINE = re.compile(r"^(\S+)\. IN (MX|TXT|SRV) (.*)$")


def parse_zone(text: str) -> list[tuple[str, str, str]]:
    """(name, type, value) of each record line; TXT strings joined, as a resolver does."""
    records = []
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        match = LINE.match(line)
        assert match, f"not a zone line: {line!r}"
        name, rtype, value = match.groups()
        if rtype == "TXT":
            value = "".join(re.findall(r'"([^"]*)"', value))
        records.append((name, rtype, value))
    return records


class ConfigFixture:
    """A config file and data directory with one domain and a DKIM key."""

    def make_config(self, extra: str = "") -> Path:
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        self.data_dir = base / "data"
        self.config_path = base / "mailtwist.toml"
        self.config_path.write_text(
            f'data_dir = "{self.data_dir}"\nhostname = "{HOST}"\n'
            '[listen]\nsmtp = "tcp:25"\nsubmission = "tcp:587"\nsubmissions = "ssl:465"\n'
            'imap = "tcp:port=143:interface=0.0.0.0"\nimaps = "ssl:993"\n'
            'pop3 = "none"\npop3s = "ssl:995"\n' + extra)
        self.assertEqual(self.cli("init", "--domain", DOMAIN, "--no-dkim")[0], 0)
        self.assertEqual(self.cli("dkim", "keygen", DOMAIN, "--algorithm", "ed25519",
                                  "--selector", "ed1")[0], 0)
        return self.config_path

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--config", str(self.config_path), *argv])
        return code, out.getvalue(), err.getvalue()


class ZoneTests(ConfigFixture, unittest.TestCase):
    def test_printed_records_parse_back(self):
        self.make_config()
        code, out, _ = self.cli("dns", DOMAIN)
        self.assertEqual(code, 0)
        records = parse_zone(out)
        by_name: dict[tuple[str, str], list[str]] = {}
        for name, rtype, value in records:
            by_name.setdefault((name, rtype), []).append(value)
        self.assertEqual(by_name[(DOMAIN, "MX")], [f"10 {HOST}."])
        self.assertEqual(by_name[(DOMAIN, "TXT")], ["v=spf1 mx -all"])
        [(_, key)] = public_records(self.data_dir / "dkim", DOMAIN)
        self.assertEqual(by_name[(f"ed1._domainkey.{DOMAIN}", "TXT")], [key])
        self.assertEqual(by_name[(f"_dmarc.{DOMAIN}", "TXT")],
                         [f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"])
        [sts] = by_name[(f"_mta-sts.{DOMAIN}", "TXT")]
        self.assertRegex(sts, r"^v=STSv1; id=[A-Za-z0-9]{1,32}$")
        self.assertEqual(by_name[(f"_smtp._tls.{DOMAIN}", "TXT")],
                         [f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"])
        srv = {name.split(".")[0]: values[0]
               for (name, rtype), values in by_name.items() if rtype == "SRV"}
        self.assertEqual(srv, {
            "_submissions": f"0 1 465 {HOST}.", "_submission": f"0 1 587 {HOST}.",
            "_imaps": f"0 1 993 {HOST}.", "_imap": f"0 1 143 {HOST}.",
            "_pop3s": f"0 1 995 {HOST}.", "_pop3": "0 0 0 .",
        })
        self.assertIn(f";   {HOST}. IN A ", out)

    def test_long_rsa_key_is_split_into_strings(self):
        self.make_config()
        self.assertEqual(self.cli("dkim", "keygen", DOMAIN, "--selector", "rsa1")[0], 0)
        _, out, _ = self.cli("dns", DOMAIN)
        line = next(x for x in out.splitlines() if x.startswith("rsa1._domainkey."))
        self.assertTrue(all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line)))
        [value] = [v for n, _, v in parse_zone(out) if n.startswith("rsa1.")]
        self.assertEqual(value, dict(public_records(self.data_dir / "dkim", DOMAIN))["rsa1"])

    def test_invalid_domain_is_an_error(self):
        self.make_config()
        code, out, err = self.cli("dns", "not a domain")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("invalid domain", err)

    def test_unknown_domain_is_warned_about(self):
        self.make_config()
        code, out, err = self.cli("dns", "other.test")
        self.assertEqual(code, 0)
        self.assertIn("not a local domain", err)
        self.assertIn("other.test. IN MX", out)


class EndpointPortTests(unittest.SynchronousTestCase):
    def test_ports(self):
        self.assertEqual(endpoint_port("tcp:25"), 25)
        self.assertEqual(endpoint_port("tcp:port=143:interface=::1"), 143)
        self.assertEqual(endpoint_port("ssl:993:privateKey=k.pem"), 993)
        self.assertIsNone(endpoint_port("unix:/run/mail.sock"))
        self.assertIsNone(endpoint_port("tcp:0:interface=127.0.0.1"))


def publish(server: TestDNSServer, records) -> None:
    """Serve *records* (from expected_records) as they should be."""
    for record in records:
        if record.type == "MX":
            pref, host = record.value.split()
            server.mx(record.name, int(pref), host.rstrip("."))
        elif record.type == "TXT":
            server.txt(record.name, record.value)
        else:
            priority, weight, port, target = record.value.split()
            server.add(record.name, dns.Record_SRV(int(priority), int(weight), int(port),
                                                   target.rstrip(".").encode()))


class CheckTests(ConfigFixture, unittest.TestCase):
    def setUp(self):
        self.dns = TestDNSServer()
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.make_config(f'[outbound]\ndns_servers = ["{self.dns.address}"]\n'
                         'dns_timeout = 5\n')
        self.config = load_config(self.config_path)
        self.records = expected_records(self.config, DOMAIN,
                                        public_records(self.data_dir / "dkim", DOMAIN),
                                        configured_ports(self.config))
        self.dns.a(HOST, "192.0.2.25")

    def check(self) -> defer.Deferred:
        resolver = client.Resolver(servers=[("127.0.0.1", self.dns.port)], reactor=reactor)
        return check_records(resolver, HOST, self.records, timeout=5)

    def spawn_cli(self) -> defer.Deferred:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return getProcessOutputAndValue(
            sys.executable, ["-m", "mailtwist.cli", "--config", str(self.config_path),
                             "dns", DOMAIN, "--check"], env=env, path=str(ROOT))

    def break_some(self) -> None:
        """Publish everything, then a wrong SPF, a missing DMARC, a wrong SRV port."""
        keep = [r for r in self.records
                if r.name not in (DOMAIN, f"_dmarc.{DOMAIN}", f"_imaps._tcp.{DOMAIN}")
                or r.type == "MX"]
        publish(self.dns, keep)
        self.dns.txt(DOMAIN, "v=spf1 a -all")
        self.dns.txt(DOMAIN, "google-site-verification=abc")
        self.dns.add(f"_imaps._tcp.{DOMAIN}", dns.Record_SRV(0, 1, 9993, HOST.encode()))

    @defer.inlineCallbacks
    def test_all_published(self):
        publish(self.dns, self.records)
        results = yield self.check()
        self.assertEqual([(r.record.type, r.record.name) for r in results if r.status != "ok"],
                         [])
        self.assertEqual(results[0].found, ("192.0.2.25",))
        out, err, code = yield self.spawn_cli()
        self.assertEqual(code, 0, err)
        self.assertIn(f"{len(results)} of {len(results)} records ok", out.decode())

    @defer.inlineCallbacks
    def test_wrong_and_missing(self):
        self.break_some()
        results = yield self.check()
        status = {(r.record.type, r.record.name): r for r in results}
        self.assertEqual(status[("MX", DOMAIN)].status, "ok")
        spf = status[("TXT", DOMAIN)]
        self.assertEqual(spf.status, "wrong")
        self.assertEqual(spf.found, ("v=spf1 a -all",))
        self.assertEqual(status[("TXT", f"_dmarc.{DOMAIN}")].status, "missing")
        srv = status[("SRV", f"_imaps._tcp.{DOMAIN}")]
        self.assertEqual(srv.status, "wrong")
        self.assertEqual(srv.found, (f"0 1 9993 {HOST}.",))
        self.assertEqual(status[("SRV", f"_pop3._tcp.{DOMAIN}")].status, "ok")
        self.assertEqual(status[("TXT", f"ed1._domainkey.{DOMAIN}")].status, "ok")
        self.assertEqual(sum(r.status != "ok" for r in results), 3)

        out, err, code = yield self.spawn_cli()
        self.assertEqual(code, 1, err)
        lines = out.decode().splitlines()
        self.assertIn(f"wrong    TXT    {DOMAIN}  expected: v=spf1 mx -all"
                      "  found: v=spf1 a -all", lines)
        self.assertIn(f"missing  TXT    _dmarc.{DOMAIN}  expected: v=DMARC1; p=quarantine; "
                      f"rua=mailto:postmaster@{DOMAIN}", lines)
        self.assertIn(f"ok       MX     {DOMAIN}", lines)

    @defer.inlineCallbacks
    def test_other_mta_sts_id_is_fine_and_a_missing_host_is_not(self):
        self.dns.authority.records.pop(HOST.lower())
        publish(self.dns, [r for r in self.records if not r.name.startswith("_mta-sts.")])
        self.dns.txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20260101")
        self.assertNotEqual(mta_sts_id(self.config), "20260101")
        results = yield self.check()
        self.assertEqual([(r.record.type, r.status) for r in results if r.status != "ok"],
                         [("A/AAAA", "missing")])
