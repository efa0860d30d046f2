"""Migration and deployment: ``user import``, ``alias import`` and contrib/."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import bcrypt

from mailtwist.directory import check_password
from tests.test_cli import CLITestCase

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def _bcrypt(password: str, prefix: str = "$2b$") -> str:
    """A cheap (rounds 4) bcrypt hash with the given variant prefix."""
    made = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode("ascii")
    return prefix + made[4:]


class UserImportTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.set_up_domain()
        self.passwd = self.base / "passwd"

    def write(self, text: str) -> str:
        self.passwd.write_text(text)
        return str(self.passwd)

    def test_bcrypt_accounts_log_in_and_others_are_reported(self) -> None:
        path = self.write(
            "# Dovecot passwd-file\n"
            f"alice@example.org:{{BLF-CRYPT}}{_bcrypt('alice pw')}:5000:5000::"
            "/home/alice::userdb_quota_rule=*:bytes=1G\n"
            f"bob@Example.ORG:{_bcrypt('bob pw', '$2y$')}::::::\n"
            f"carol@example.org:{{BCRYPT}}{_bcrypt('carol pw', '$2a$')}\n"
            "dave@example.org:{SHA512-CRYPT}$6$salt$hash:::::\n"
            f"eve@other.org:{{BLF-CRYPT}}{_bcrypt('eve pw')}\n"
            f"alice@example.org:{{BLF-CRYPT}}{_bcrypt('again')}\n"
            "no fields here\n"
        )
        out = self.ok("user", "import", path)
        self.assertEqual(
            out.splitlines(),
            [
                "skipped line 5: dave@example.org: scheme SHA512-CRYPT not supported;"
                " set a new password with mailtwist user passwd",
                "skipped line 6: eve@other.org: domain other.org is not local"
                " (mailtwist domain add other.org, or --add-domains)",
                "skipped line 7: alice@example.org: duplicate of line 2",
                "skipped line 8: expected user:{SCHEME}hash:...",
                "3 accounts imported, 4 skipped",
            ],
        )
        directory = self.directory()
        for name in ("alice", "bob", "carol"):
            account = directory.get_account(f"{name}@example.org")
            self.assertTrue(account.enabled)
            self.assertTrue(check_password(f"{name} pw", account.password_hash))
            self.assertFalse(check_password("wrong", account.password_hash))
        self.assertIsNone(directory.get_account("dave@example.org"))
        self.assertIsNone(directory.get_account("eve@other.org"))

        # Running it again imports nothing and says why.
        out = self.ok("user", "import", path)
        self.assertIn("skipped line 2: alice@example.org: account already exists", out)
        self.assertTrue(out.endswith("0 accounts imported, 7 skipped\n"), out)

    def test_placeholders_domains_and_bare_user_names(self) -> None:
        path = self.write(
            "dave:{SHA512-CRYPT}$6$salt$hash\n"
            f"eve@other.org:{{BLF-CRYPT}}{_bcrypt('eve pw')}\n"
            f"frank:{_bcrypt('frank pw')}\n"
        )
        out = self.ok(
            "user", "import", path, "--disabled-placeholder", "--add-domains",
            "--domain", "example.org",
        )
        self.assertEqual(
            out.splitlines(),
            [
                "added domain other.org",
                "disabled line 1: dave@example.org: scheme SHA512-CRYPT not supported;"
                " set a new password with mailtwist user passwd,"
                " then mailtwist user enable",
                "2 accounts imported, 1 created disabled, 0 skipped",
            ],
        )
        directory = self.directory()
        self.assertEqual(directory.domains(), ["example.org", "other.org"])
        dave = directory.get_account("dave@example.org")
        self.assertFalse(dave.enabled)
        self.assertFalse(check_password("", dave.password_hash))
        self.assertTrue(
            check_password("eve pw", directory.get_account("eve@other.org").password_hash)
        )
        self.ok("user", "passwd", "dave@example.org", "--password-stdin", stdin="new\n")
        self.ok("user", "enable", "dave@example.org")
        dave = self.directory().get_account("dave@example.org")
        self.assertTrue(dave.enabled)
        self.assertTrue(check_password("new", dave.password_hash))

    def test_bare_user_name_without_domain_option(self) -> None:
        out = self.ok("user", "import", self.write(f"frank:{_bcrypt('x')}\n"))
        self.assertIn("skipped line 1: invalid address 'frank'", out)
        self.assertIn("(use --domain)", out)

    def test_errors(self) -> None:
        message = self.fails("user", "import", str(self.base / "missing"))
        self.assertIn("No such file or directory", message)
        self.passwd.write_bytes(b"alice@example.org:\xff\n")
        self.assertIn("not UTF-8", self.fails("user", "import", str(self.passwd)))
        self.assertIn(
            "invalid domain", self.fails("user", "import", "-", "--domain", "bad_domain")
        )
        shutil.rmtree(self.data_dir)
        self.assertIn("does not exist", self.fails("user", "import", self.write("")))


class AliasImportTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.set_up_domain()
        self.ok("alias", "add", "info@example.org", "alice@example.org")
        self.virtual = self.base / "virtual"

    def test_virtual_map(self) -> None:
        self.virtual.write_text(
            "# Postfix virtual\n"
            "info@example.org    bob@example.org, alice@example.org\n"
            "\n"
            "sales@example.org   alice@example.org,\n"
            "    bob@example.org\n"
            "\tcarol@elsewhere.net\n"
            "@example.org        alice@example.org\n"
            "broken@example.org\n"
            "example.org         anything\n"
            "x@example.org       not-an-address\n"
            "y@other.org         alice@example.org\n"
        )
        out = self.ok("alias", "import", str(self.virtual))
        self.assertEqual(
            out.splitlines(),
            [
                "skipped line 8: broken@example.org: no target",
                "skipped line 9: key 'example.org' has no '@' (a virtual alias domain"
                " line? add it with mailtwist domain add)",
                "skipped line 10: invalid address 'not-an-address': no '@'"
                " (expected local@domain)",
                "skipped line 11: y@other.org: domain other.org is not local"
                " (mailtwist domain add other.org, or --add-domains)",
                "2 aliases added, 1 merged, 0 unchanged, 4 skipped",
            ],
        )
        aliases = self.directory().aliases()
        self.assertEqual(
            aliases["info@example.org"], ("alice@example.org", "bob@example.org")
        )
        self.assertEqual(
            aliases["sales@example.org"],
            ("alice@example.org", "bob@example.org", "carol@elsewhere.net"),
        )
        self.assertEqual(aliases["@example.org"], ("alice@example.org",))
        self.assertNotIn("y@other.org", aliases)

        out = self.ok("alias", "import", str(self.virtual), "--add-domains")
        self.assertIn("added domain other.org", out)
        self.assertTrue(out.endswith("1 alias added, 0 merged, 3 unchanged, 3 skipped\n"))
        self.assertEqual(self.directory().aliases()["y@other.org"], ("alice@example.org",))

    def test_errors(self) -> None:
        self.assertIn(
            "No such file", self.fails("alias", "import", str(self.base / "missing"))
        )
        self.virtual.write_text("  leading@example.org alice@example.org\n")
        out = self.ok("alias", "import", str(self.virtual))
        self.assertIn("skipped line 1: continuation line without an entry", out)


class SystemdUnitTests(CLITestCase):
    unit = CONTRIB / "mailtwist.service"

    def test_unit_file(self) -> None:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(self.unit.read_text())
        self.assertEqual(
            parser["Service"]["ExecStart"],
            "/usr/bin/twistd -n --pidfile= mailtwist"
            " --config /etc/mailtwist/mailtwist.toml",
        )
        self.assertEqual(parser["Service"]["User"], "mailtwist")
        self.assertEqual(
            parser["Service"]["AmbientCapabilities"], "CAP_NET_BIND_SERVICE"
        )
        self.assertEqual(parser["Service"]["ReadWritePaths"], "/var/lib/mailtwist")
        self.assertEqual(parser["Install"]["WantedBy"], "multi-user.target")

    def test_systemd_analyze_verify(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed")
        # Verify a copy whose ExecStart names an existing program, so only the
        # unit's syntax and options are judged, not this machine's installation.
        copy = self.base / "mailtwist.service"
        twistd = shutil.which("twistd") or shutil.which("true")
        copy.write_text(self.unit.read_text().replace("/usr/bin/twistd", twistd))
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        problems = [
            line for line in (result.stdout + result.stderr).splitlines()
            if "mailtwist.service" in line
        ]
        self.assertEqual(problems, [])
