"""The ``mailtwist`` admin command, run in-process against real temp directories."""

from __future__ import annotations

import io
import os
import stat
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial import unittest

from mailtwist.cli import main
from mailtwist.config import load_config
from mailtwist.directory import FileDirectory, check_password


class CLITestCase(unittest.TestCase):
    """Runs ``main()`` with a config (bcrypt_rounds = 4) in a temp directory."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.data_dir = self.base / "data"
        self.config = self.base / "test.toml"
        self.config.write_text(f'data_dir = "{self.data_dir}"\nbcrypt_rounds = 4\n')

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """Run the command; return its exit status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--config", str(self.config), *argv])
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "") -> str:
        code, out, err = self.run_cli(*argv, stdin=stdin)
        self.assertEqual((code, err), (0, ""))
        return out

    def fails(self, *argv: str, stdin: str = "") -> str:
        """Assert an error exit with one ``mailtwist: error:`` line; return the message."""
        code, out, err = self.run_cli(*argv, stdin=stdin)
        self.assertEqual(code, 1, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("mailtwist: error: "), err)
        return err[len("mailtwist: error: "):].rstrip("\n")

    def directory(self) -> FileDirectory:
        return FileDirectory(self.data_dir)

    def set_up_domain(self) -> None:
        self.data_dir.mkdir()
        self.ok("domain", "add", "example.org")


class InitTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        cwd = os.getcwd()
        os.chdir(self.base)
        self.addCleanup(os.chdir, cwd)

    def init(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_init(self):
        code, out, err = self.init(
            "init", "--domain", "Example.ORG", "--hostname", "mail.example.org"
        )
        self.assertEqual((code, err), (0, ""))
        data_dir = self.base / "mailtwist-data"
        self.assertEqual(stat.S_IMODE(data_dir.stat().st_mode), 0o700)
        self.assertEqual(FileDirectory(data_dir).domains(), ["example.org"])
        self.assertTrue((data_dir / "users").exists())
        self.assertTrue((data_dir / "aliases").exists())
        self.assertTrue((data_dir / "tls" / "cert.pem").exists())
        self.assertIn("SHA-256 fingerprint", out)
        self.assertIn("mailtwist user add alice@example.org", out)
        self.assertIn("twistd -n mailtwist", out)
        config = load_config(self.base / "mailtwist.toml")
        self.assertEqual(config.hostname, "mail.example.org")

        code, out, err = self.init("init", "--domain", "example.org")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("already exists", out)
        self.assertIn("using existing configuration", out)
        self.assertIn("domain example.org is already local", out)

    def test_init_with_data_dir_writes_it_into_the_config(self):
        code, out, err = self.init("--data-dir", "elsewhere", "init")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("mailtwist domain add example.org", out)
        code, out, err = self.init("domain", "add", "example.net")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            FileDirectory(self.base / "elsewhere").domains(), ["example.net"]
        )

    def test_init_with_bad_options_leaves_nothing(self):
        code, out, err = self.init("init", "--hostname", "not a host")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("hostname", err)
        self.assertEqual(list(self.base.iterdir()), [self.config])
        code, out, err = self.init("init", "--domain", "bad_domain")
        self.assertEqual(code, 1)
        self.assertIn("invalid domain", err)
        self.assertEqual(list(self.base.iterdir()), [self.config])


class DomainTests(CLITestCase):
    def test_add_list_delete(self):
        self.data_dir.mkdir()
        self.assertEqual(self.ok("domain", "add", "Example.ORG"), "added domain example.org\n")
        self.ok("domain", "add", "bücher.de")
        self.assertEqual(self.ok("domain", "list"), "example.org\nxn--bcher-kva.de\n")
        self.ok("domain", "del", "bücher.de")
        self.assertEqual(self.ok("domain", "list"), "example.org\n")

    def test_errors(self):
        self.set_up_domain()
        self.assertEqual(
            self.fails("domain", "add", "example.org"), "domain 'example.org' already exists"
        )
        self.assertIn("invalid domain", self.fails("domain", "add", "exa mple.org"))
        self.assertEqual(
            self.fails("domain", "del", "example.net"), "unknown domain 'example.net'"
        )
        self.ok("user", "add", "a@example.org", "--password-stdin", stdin="pw\n")
        self.assertIn("still has 1 account", self.fails("domain", "del", "example.org"))

    def test_missing_data_dir(self):
        message = self.fails("domain", "list")
        self.assertIn(f"data directory '{self.data_dir}' does not exist", message)
        self.assertIn("mailtwist init", message)

    def test_options_after_the_subcommand(self):
        other = self.base / "other"
        other.mkdir()
        (other / "domains").write_text("example.net\n")
        self.assertEqual(self.ok("domain", "list", "--data-dir", str(other)), "example.net\n")


class UserTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.set_up_domain()

    def test_add_with_password_on_stdin(self):
        out = self.ok(
            "user", "add", "Alice@example.org", "--password-stdin", "--quota", "2K",
            stdin="  two words  \r\nnext line\n",
        )
        self.assertEqual(out, "added account alice@example.org (quota 2048)\n")
        account = self.directory().get_account("alice@example.org")
        self.assertTrue(check_password("  two words  ", account.password_hash))
        self.assertEqual(account.quota_bytes, 2048)
        self.assertTrue(account.password_hash.startswith(b"$2b$04$"))

    def test_list_disable_enable_passwd_delete(self):
        self.ok("user", "add", "bob@example.org", "--password-stdin", stdin="pw")
        self.ok("user", "add", "al@example.org", "--password-stdin", "--quota", "1000",
                stdin="pw\n")
        self.assertEqual(
            self.ok("user", "list"),
            "bob@example.org  enabled   unlimited\n"
            "al@example.org   enabled   1000\n",
        )
        self.ok("user", "disable", "BOB@example.org")
        self.assertEqual(
            self.ok("user", "list", "example.org").splitlines()[0],
            "bob@example.org  disabled  unlimited",
        )
        self.ok("user", "enable", "bob@example.org")
        self.assertTrue(self.directory().get_account("bob@example.org").enabled)

        self.ok("user", "passwd", "bob@example.org", "--password-stdin", stdin="new\n")
        account = self.directory().get_account("bob@example.org")
        self.assertTrue(check_password("new", account.password_hash))

        self.ok("alias", "add", "info@example.org", "bob@example.org")
        out = self.ok("user", "del", "bob@example.org")
        self.assertIn("deleted account bob@example.org", out)
        self.assertIn("kept on disk", out)
        self.assertIn("still a target of info@example.org", out)
        self.assertEqual(self.ok("user", "list"), "al@example.org  enabled   1000\n")

    def test_add_errors(self):
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")
        self.assertEqual(
            self.fails("user", "add", "bob@example.net", "--password-stdin", stdin="pw\n"),
            "unknown domain 'example.net' (add it with: mailtwist domain add example.net)",
        )
        self.assertEqual(
            self.fails("user", "add", "ALICE@example.org", "--password-stdin", stdin="x\n"),
            "account 'alice@example.org' already exists",
        )
        self.assertEqual(
            self.fails("user", "add", "bob", "--password-stdin", stdin="pw\n"),
            "invalid address 'bob': no '@' (expected local@domain)",
        )
        self.assertEqual(
            self.fails("user", "add", "bob@example.org", "--password-stdin", stdin="\n"),
            "empty password",
        )
        self.assertEqual(
            self.fails("user", "add", "bob@example.org", "--password-stdin"),
            "no password on standard input",
        )
        self.assertIn(
            "bcrypt uses at most 72",
            self.fails("user", "add", "bob@example.org", "--password-stdin",
                       stdin="x" * 73 + "\n"),
        )
        self.assertIn(
            "use --password-stdin", self.fails("user", "add", "bob@example.org")
        )
        self.assertEqual(
            [a.address for a in self.directory().accounts()], ["alice@example.org"]
        )

    def test_other_errors(self):
        self.assertEqual(
            self.fails("user", "passwd", "nobody@example.org", "--password-stdin",
                       stdin="pw\n"),
            "no account 'nobody@example.org'",
        )
        for action in ("del", "disable", "enable"):
            self.assertEqual(
                self.fails("user", action, "nobody@example.org"),
                "no account 'nobody@example.org'",
            )
        self.assertEqual(
            self.fails("user", "list", "example.net"), "unknown domain 'example.net'"
        )

    def test_usage_errors_exit_2(self):
        for argv in (
            ("user",),
            ("user", "frob"),
            ("user", "add"),
            ("user", "add", "a@example.org", "--quota", "lots"),
            ("nonsense",),
        ):
            code, out, err = self.run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("usage:", err)
        code, out, err = self.run_cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("user", out)

    def test_bad_config(self):
        self.config.write_text("bcrypt_rounds = 2\n")
        message = self.fails("user", "list")
        self.assertIn("bcrypt_rounds", message)
        self.config.write_text("not toml [\n")
        self.assertIn("not valid TOML", self.fails("user", "list"))

    def test_os_error_on_the_data_dir(self):
        (self.data_dir / ".directory.lock").unlink()
        (self.data_dir / ".directory.lock").mkdir()
        message = self.fails("user", "add", "a@example.org", "--password-stdin", stdin="p\n")
        self.assertIn(str(self.data_dir / ".directory.lock"), message)

    def test_malformed_lines_are_reported(self):
        (self.data_dir / "users").write_text("# accounts\ngarbage\n")
        code, out, err = self.run_cli("user", "list")
        self.assertEqual((code, out), (0, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("mailtwist: warning:", err)
        self.assertIn(f"{self.data_dir / 'users'} line 2:", err)


class AliasTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.set_up_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")

    def test_add_list_delete(self):
        self.assertEqual(
            self.ok("alias", "add", "Info@example.org", "alice@example.org",
                    "Friend@Remote.example"),
            "info@example.org: alice@example.org, friend@remote.example\n",
        )
        self.ok("alias", "add", "@example.org", "alice@example.org")
        self.assertEqual(
            self.ok("alias", "list"),
            "info@example.org: alice@example.org, friend@remote.example\n"
            "@example.org: alice@example.org\n",
        )
        self.ok("alias", "del", "info@example.org", "friend@remote.example")
        self.ok("alias", "del", "@example.org")
        self.assertEqual(self.ok("alias", "list"), "info@example.org: alice@example.org\n")

    def test_notes(self):
        out = self.ok("alias", "add", "alice@example.org", "a@remote.example")
        self.assertIn("note: alice@example.org is also an account", out)
        out = self.ok("alias", "add", "team@example.org", "nobody@example.org")
        self.assertIn("note: nobody@example.org has no account or alias yet", out)

    def test_errors(self):
        self.assertIn(
            "unknown domain 'example.net'",
            self.fails("alias", "add", "x@example.net", "alice@example.org"),
        )
        self.assertIn(
            "invalid address 'not:valid'",
            self.fails("alias", "add", "x@example.org", "not:valid"),
        )
        self.assertEqual(
            self.fails("alias", "del", "x@example.org"), "no alias 'x@example.org'"
        )
        code, _, err = self.run_cli("alias", "add", "x@example.org")
        self.assertEqual(code, 2)


class FiltersCommandTests(CLITestCase):
    """``mailtwist filters``: what is installed, where it is enabled, and bad settings."""

    def test_lists_builtin_filter_and_its_roles(self) -> None:
        self.config.write_text(self.config.read_text()
                               + '[filters]\nsmtp = ["header_folder"]\n')
        out = self.ok("filters")
        [line] = [line for line in out.splitlines() if line.startswith("header_folder")]
        self.assertIn("smtp", line)

    def test_bad_setting_is_one_line(self) -> None:
        self.config.write_text(self.config.read_text() + '[filters]\nsmtp = ["header_folder"]\n'
                               '[filters.header_folder]\nfolder = 3\n')
        code, out, err = self.run_cli("filters")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("filters.header_folder.folder", err)
