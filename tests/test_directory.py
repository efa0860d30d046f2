"""The account directory: file parsing, resolution, reloading and atomic edits."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from mailtwist.directory import (
    DUMMY_HASH,
    Account,
    DirectoryError,
    FileDirectory,
    Resolution,
    check_password,
    hash_password,
    validate_address,
    validate_domain,
)

ROOT = Path(__file__).resolve().parent.parent
HASH = hash_password("secret", rounds=4)
USER = f"{{BLF-CRYPT}}{HASH.decode()}::::::"


def bump_mtime(path: Path) -> None:
    """Move a file's mtime a second ahead, so same-second rewrites are seen."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class DirectoryTestCase(unittest.TestCase):
    """Writes the three files into a fresh temp data directory."""

    def make_directory(
        self, domains: str = "", users: str = "", aliases: str = "", **options
    ) -> FileDirectory:
        self.data_dir = Path(self.mktemp())
        self.data_dir.mkdir()
        for name, text in (("domains", domains), ("users", users), ("aliases", aliases)):
            (self.data_dir / name).write_text(textwrap.dedent(text))
        directory = FileDirectory(self.data_dir, **options)
        directory.bcrypt_rounds = 4
        return directory

    def rewrite(self, name: str, text: str) -> None:
        path = self.data_dir / name
        path.write_text(textwrap.dedent(text))
        bump_mtime(path)

    def read(self, name: str) -> str:
        return (self.data_dir / name).read_text()


class ValidationTests(unittest.TestCase):
    def test_address_is_canonical(self):
        self.assertEqual(validate_address("Alice@Example.ORG"), "alice@example.org")
        self.assertEqual(validate_address("a.b+c@example.org."), "a.b+c@example.org")
        self.assertEqual(validate_address("bob@Bücher.de"), "bob@xn--bcher-kva.de")

    def test_invalid_addresses(self):
        cases = {
            "": "empty address",
            "alice": "no '@'",
            "@example.org": "empty local part",
            "alice@": "empty domain",
            "al ice@example.org": "space",
            "al\x01ice@example.org": "control character",
            "al:ice@example.org": "':'",
            "al,ice@example.org": "','",
            "a@b@example.org": "'@'",
            '"al"@example.org': "'\"'",
            "#alice@example.org": "'#'",
            "alice@exa_mple.org": "invalid domain",
            "alice@-example.org": "invalid domain",
            "alice@1.2.3.4": "IP address",
            "a" * 65 + "@example.org": "local part longer than 64",
            "a" * 20 + "@" + ".".join(["b" * 60] * 4) + ".org": "longer than 254",
        }
        for address, reason in cases.items():
            with self.assertRaises(DirectoryError, msg=address) as caught:
                validate_address(address)
            self.assertIn(reason, str(caught.exception), address)
            self.assertNotIn("\n", str(caught.exception))

    def test_domain(self):
        self.assertEqual(validate_domain("Mail.Example.COM."), "mail.example.com")
        self.assertEqual(validate_domain("bücher.de"), "xn--bcher-kva.de")
        self.assertEqual(validate_domain("localhost"), "localhost")
        for bad in ("", ".", "a..b", "a_b.org", "-a.org", "a-.org", "x" * 64 + ".org",
                    "xn--zz.org", "10.0.0.1"):
            self.assertRaises(DirectoryError, validate_domain, bad)


class PasswordTests(unittest.TestCase):
    def test_hash_and_check(self):
        password_hash = hash_password("pässword", rounds=4)
        self.assertTrue(password_hash.startswith(b"$2b$04$"))
        self.assertTrue(check_password("pässword", password_hash))
        self.assertFalse(check_password("password", password_hash))
        self.assertFalse(check_password("", password_hash))

    def test_malformed_hashes_do_not_match(self):
        for bad in (b"", b"garbage", b"$2b$04$short", HASH[:-1]):
            self.assertFalse(check_password("secret", bad))
        self.assertFalse(check_password("x" * 100, HASH))

    def test_dummy_hash_is_cost_12_and_never_matches(self):
        self.assertTrue(DUMMY_HASH.startswith(b"$2b$12$"))
        self.assertEqual(len(DUMMY_HASH), 60)
        for guess in ("", "password", "secret", "dummy", "x" * 72):
            self.assertFalse(check_password(guess, DUMMY_HASH))

    def test_rejected_passwords(self):
        for password, reason in (
            ("", "empty password"),
            ("a\0b", "NUL"),
            ("x" * 73, "73 bytes"),
            ("é" * 37, "74 bytes"),
        ):
            with self.assertRaises(DirectoryError) as caught:
                hash_password(password, rounds=4)
            self.assertIn(reason, str(caught.exception))
        self.assertIn("72", str(caught.exception))
        self.assertTrue(check_password("x" * 72, hash_password("x" * 72, rounds=4)))


class ParsingTests(DirectoryTestCase):
    def warnings(self, events) -> list[str]:
        return [formatEvent(e) for e in events if e["log_namespace"] == "mailtwist.directory"]

    def test_domains_file(self):
        with capturedLogs() as events:
            directory = self.make_directory(
                domains="""\
                # local domains
                Example.ORG

                other.example   # trailing comment
                not a domain
                example.org
                bücher.de
                """
            )
        self.assertEqual(
            directory.domains(), ["example.org", "other.example", "xn--bcher-kva.de"]
        )
        self.assertTrue(directory.is_local_domain("EXAMPLE.org"))
        self.assertTrue(directory.is_local_domain("Bücher.de"))
        self.assertFalse(directory.is_local_domain("example.com"))
        self.assertFalse(directory.is_local_domain("not valid"))
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(f"{self.data_dir / 'domains'} line 5:", warnings[0])
        self.assertIn("line skipped", warnings[0])
        self.assertIn("line 6: duplicate domain", warnings[1])

    def test_users_file(self):
        with capturedLogs() as events:
            directory = self.make_directory(
                domains="example.org\n",
                users=f"""\
                # accounts
                Alice@Example.org:{USER}quota_bytes=1000
                bob@example.org:{USER}nologin
                carol@example.org:{USER}disabled=yes userdb_foo=bar
                dave@example.org:{USER}disabled=no
                this line is malformed
                bad address@example.org:{USER}
                erin@example.org:{USER}quota_bytes=lots
                alice@example.org:{USER}
                frank@example.org:{{SHA512-CRYPT}}$6$abc$def::::::
                gina@example.org:{{BLF-CRYPT}}{HASH.decode()}
                """,
            )
        accounts = {a.address: a for a in directory.accounts()}
        self.assertEqual(
            list(accounts),
            ["alice@example.org", "bob@example.org", "carol@example.org",
             "dave@example.org", "frank@example.org", "gina@example.org"],
        )
        self.assertEqual(
            accounts["alice@example.org"],
            Account("alice@example.org", HASH, True, 1000),
        )
        self.assertFalse(accounts["bob@example.org"].enabled)
        self.assertFalse(accounts["carol@example.org"].enabled)
        self.assertTrue(accounts["dave@example.org"].enabled)
        self.assertEqual(accounts["frank@example.org"].password_hash, b"")
        self.assertFalse(check_password("", accounts["frank@example.org"].password_hash))
        self.assertTrue(check_password("secret", accounts["gina@example.org"].password_hash))
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 5, warnings)
        for warning, line in zip(warnings, (6, 7, 8, 9, 10)):
            self.assertIn(f"{self.data_dir / 'users'} line {line}:", warning)
        self.assertIn("cannot log in", warnings[4])

    def test_aliases_file(self):
        with capturedLogs() as events:
            directory = self.make_directory(
                domains="example.org\n",
                aliases="""\
                # aliases
                Info@Example.org: alice@example.org,
                    Bob@Example.org, friend@remote.example
                no colon here
                sales@example.org: alice@example.org, not an address, |/bin/cmd
                bad key@example.org: alice@example.org
                empty@example.org:
                @example.org: alice@example.org
                info@example.org: carol@example.org, alice@example.org
                """,
            )
        self.assertEqual(
            directory.aliases(),
            {
                "info@example.org": (
                    "alice@example.org", "bob@example.org", "friend@remote.example",
                    "carol@example.org",
                ),
                "sales@example.org": ("alice@example.org",),
                "@example.org": ("alice@example.org",),
            },
        )
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 5, warnings)
        self.assertIn("line 4:", warnings[0])
        self.assertIn("line 5: alias 'sales@example.org'", warnings[1])
        self.assertIn("target skipped", warnings[1])
        self.assertIn("line 6:", warnings[3])
        self.assertIn("line 7:", warnings[4])

    def test_missing_files_are_empty(self):
        directory = FileDirectory(self.mktemp())
        self.assertEqual(directory.domains(), [])
        self.assertEqual(directory.accounts(), [])
        self.assertEqual(directory.aliases(), {})
        self.assertIsNone(directory.resolve("postmaster"))

    def test_lookups_are_case_insensitive(self):
        directory = self.make_directory(
            domains="example.org\n", users=f"alice@example.org:{USER}\n"
        )
        self.assertEqual(directory.get_account("ALICE@Example.ORG").address,
                         "alice@example.org")
        self.assertIsNone(directory.get_account("alice+tag@example.org"))
        self.assertIsNone(directory.get_account("not an address"))
        self.assertEqual(len(directory.accounts("EXAMPLE.ORG")), 1)
        self.assertEqual(directory.accounts("example.com"), [])


class ResolutionTests(DirectoryTestCase):
    def make(self, aliases: str = "", users: str = "alice bob carol", **options):
        return self.make_directory(
            domains="example.org\nexample.net\n",
            users="".join(f"{name}@example.org:{USER}\n" for name in users.split()),
            aliases=aliases,
            **options,
        )

    def test_account(self):
        directory = self.make()
        self.assertEqual(
            directory.resolve("Alice@EXAMPLE.org"),
            Resolution(("alice@example.org",), ()),
        )

    def test_unknown_and_foreign(self):
        directory = self.make()
        self.assertIsNone(directory.resolve("nobody@example.org"))
        self.assertIsNone(directory.resolve("nobody@example.net"))
        self.assertIsNone(directory.resolve("alice@example.com"))
        self.assertIsNone(directory.resolve("not an address"))

    def test_alias_with_local_and_remote_targets(self):
        directory = self.make(
            "team@example.org: bob@example.org, Friend@Remote.example, alice@example.org,"
            " bob@example.org\n"
        )
        self.assertEqual(
            directory.resolve("team@example.org"),
            Resolution(("bob@example.org", "alice@example.org"), ("friend@remote.example",)),
        )

    def test_alias_beats_account_and_may_keep_a_local_copy(self):
        directory = self.make(
            "alice@example.org: alice@example.org, alice@remote.example\n"
            "bob@example.org: bob@remote.example\n"
        )
        self.assertEqual(
            directory.resolve("alice@example.org"),
            Resolution(("alice@example.org",), ("alice@remote.example",)),
        )
        self.assertEqual(
            directory.resolve("bob@example.org"), Resolution((), ("bob@remote.example",))
        )

    def test_account_target_is_a_leaf(self):
        directory = self.make(
            "all@example.org: alice@example.org, bob@example.org\n"
            "alice@example.org: carol@example.org\n"
        )
        self.assertEqual(
            directory.resolve("all@example.org"),
            Resolution(("alice@example.org", "bob@example.org"), ()),
        )

    def test_recursive_alias(self):
        directory = self.make(
            "a@example.org: b@example.org, alice@example.org\n"
            "b@example.org: c@example.net, x@remote.example\n"
            "c@example.net: bob@example.org, a@example.org\n"
        )
        self.assertEqual(
            directory.resolve("a@example.org"),
            Resolution(("bob@example.org", "alice@example.org"), ("x@remote.example",)),
        )

    def test_alias_loop(self):
        directory = self.make(
            "a@example.org: b@example.org\n"
            "b@example.org: a@example.org\n"
            "c@example.org: c@example.org, carol@example.org\n"
        )
        with capturedLogs() as events:
            self.assertIsNone(directory.resolve("a@example.org"))
        self.assertIn(
            "alias loop a@example.org -> b@example.org -> a@example.org",
            [formatEvent(e) for e in events][0],
        )
        self.assertEqual(
            directory.resolve("c@example.org"), Resolution(("carol@example.org",), ())
        )

    def test_depth_limit(self):
        chain = "".join(f"a{i}@example.org: a{i + 1}@example.org\n" for i in range(1, 21))
        directory = self.make(chain + "a21@example.org: alice@example.org\n")
        self.assertEqual(
            directory.resolve("a2@example.org"), Resolution(("alice@example.org",), ())
        )
        with capturedLogs() as events:
            self.assertIsNone(directory.resolve("a1@example.org"))
        self.assertIn("deeper than 20", formatEvent(events[0]))

    def test_catch_all(self):
        directory = self.make(
            "@example.org: carol@example.org\n@example.net: x@remote.example\n"
        )
        self.assertEqual(
            directory.resolve("whoever@example.org"), Resolution(("carol@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("alice@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("whoever@example.net"), Resolution((), ("x@remote.example",))
        )

    def test_catch_all_to_missing_address_is_a_loop(self):
        directory = self.make("@example.org: nobody@example.org\n")
        self.assertIsNone(directory.resolve("whoever@example.org"))

    def test_dead_targets_are_dropped(self):
        directory = self.make(
            "gone@example.org: nobody@example.org\n"
            "half@example.org: nobody@example.org, bob@example.org\n"
        )
        self.assertIsNone(directory.resolve("gone@example.org"))
        self.assertEqual(
            directory.resolve("half@example.org"), Resolution(("bob@example.org",), ())
        )

    def test_plus_addressing(self):
        directory = self.make(
            "list@example.org: carol@example.org\n"
            "bob+exact@example.org: alice@example.org\n"
        )
        self.assertEqual(
            directory.resolve("Alice+News@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("alice+a+b@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("list+x@example.org"), Resolution(("carol@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("bob+exact@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertIsNone(directory.resolve("+tag@example.org"))
        self.assertIsNone(directory.resolve("nobody+tag@example.org"))

    def test_plus_addressing_before_catch_all(self):
        directory = self.make("@example.org: carol@example.org\n")
        self.assertEqual(
            directory.resolve("alice+x@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("nobody+x@example.org"), Resolution(("carol@example.org",), ())
        )

    def test_plus_addressing_disabled_or_other_separator(self):
        disabled = self.make(plus_separator="")
        self.assertIsNone(disabled.resolve("alice+x@example.org"))
        dash = self.make(plus_separator="-")
        self.assertEqual(
            dash.resolve("alice-x@example.org"), Resolution(("alice@example.org",), ())
        )
        self.assertIsNone(dash.resolve("alice+x@example.org"))

    def test_alias_target_with_plus_tag(self):
        directory = self.make("info@example.org: bob+info@example.org\n")
        self.assertEqual(
            directory.resolve("info@example.org"), Resolution(("bob@example.org",), ())
        )

    def test_disabled_account_receives_mail(self):
        directory = self.make_directory(
            domains="example.org\n", users=f"alice@example.org:{USER}nologin\n"
        )
        self.assertFalse(directory.get_account("alice@example.org").enabled)
        self.assertEqual(
            directory.resolve("alice@example.org"), Resolution(("alice@example.org",), ())
        )

    def test_postmaster_alias_or_account(self):
        directory = self.make(
            "postmaster@example.org: bob@example.org\n", users="alice bob postmaster"
        )
        self.assertEqual(
            directory.resolve("PostMaster@example.org"), Resolution(("bob@example.org",), ())
        )
        self.assertEqual(directory.resolve("postmaster"), Resolution(("bob@example.org",), ()))
        self.assertEqual(
            directory.resolve("postmaster@example.net"),
            Resolution(("alice@example.org",), ()),
        )

    def test_postmaster_falls_back_to_configured_address(self):
        local = self.make("admins@example.org: carol@example.org\n",
                          postmaster="Admins@Example.org")
        for address in ("postmaster", "POSTMASTER", "postmaster@example.net"):
            self.assertEqual(local.resolve(address), Resolution(("carol@example.org",), ()))
        remote = self.make(postmaster="admin@remote.example")
        self.assertEqual(
            remote.resolve("postmaster@example.org"), Resolution((), ("admin@remote.example",))
        )

    def test_postmaster_falls_back_to_first_account(self):
        directory = self.make(users="carol alice")
        self.assertEqual(
            directory.resolve("postmaster@example.net"), Resolution(("carol@example.org",), ())
        )
        self.assertEqual(directory.resolve("postmaster"), Resolution(("carol@example.org",), ()))
        broken = self.make(users="carol alice", postmaster="gone@example.org")
        self.assertEqual(
            broken.resolve("postmaster"), Resolution(("carol@example.org",), ())
        )

    def test_postmaster_without_accounts(self):
        directory = self.make(users="")
        self.assertIsNone(directory.resolve("postmaster"))
        self.assertIsNone(directory.resolve("postmaster@example.org"))

    def test_catch_all_takes_postmaster_before_fallbacks(self):
        directory = self.make("@example.net: bob@example.org\n", postmaster="alice@example.org")
        self.assertEqual(
            directory.resolve("postmaster@example.net"), Resolution(("bob@example.org",), ())
        )
        self.assertEqual(
            directory.resolve("postmaster@example.org"), Resolution(("alice@example.org",), ())
        )

    def test_invalid_postmaster_option(self):
        self.assertRaises(DirectoryError, FileDirectory, self.mktemp(), postmaster="a b@c")


class ReloadTests(DirectoryTestCase):
    def test_sees_external_edits(self):
        directory = self.make_directory(
            domains="example.org\n", users=f"alice@example.org:{USER}\n"
        )
        self.assertFalse(directory.reload_if_changed())
        self.assertIsNone(directory.get_account("bob@example.org"))
        self.rewrite("users", f"alice@example.org:{USER}\nbob@example.org:{USER}\n")
        self.rewrite("aliases", "info@example.org: bob@example.org\n")
        self.assertTrue(directory.reload_if_changed())
        self.assertFalse(directory.reload_if_changed())
        self.assertIsNotNone(directory.get_account("bob@example.org"))
        self.assertEqual(
            directory.resolve("info@example.org"), Resolution(("bob@example.org",), ())
        )

    def test_every_lookup_reloads(self):
        directory = self.make_directory(domains="example.org\n")
        self.rewrite("domains", "example.org\nexample.net\n")
        self.assertTrue(directory.is_local_domain("example.net"))
        self.rewrite("users", f"alice@example.net:{USER}\n")
        self.assertEqual([a.address for a in directory.accounts()], ["alice@example.net"])
        self.rewrite("aliases", "@example.net: alice@example.net\n")
        self.assertEqual(directory.aliases(), {"@example.net": ("alice@example.net",)})

    def test_same_size_in_place_edit(self):
        directory = self.make_directory(
            domains="example.org\n", users=f"alice@example.org:{USER}\n"
        )
        path = self.data_dir / "users"
        inode = path.stat().st_ino
        with open(path, "r+") as f:
            f.write("alicf")
        bump_mtime(path)
        self.assertEqual(path.stat().st_ino, inode)
        self.assertIsNone(directory.get_account("alice@example.org"))
        self.assertIsNotNone(directory.get_account("alicf@example.org"))

    def test_removed_file(self):
        directory = self.make_directory(domains="example.org\n")
        (self.data_dir / "domains").unlink()
        self.assertEqual(directory.domains(), [])

    def test_unreadable_file_keeps_previous_contents(self):
        directory = self.make_directory(domains="example.org\n")
        path = self.data_dir / "domains"
        path.unlink()
        path.mkdir()
        with capturedLogs() as events:
            self.assertEqual(directory.domains(), ["example.org"])
            self.assertEqual(directory.domains(), ["example.org"])
        self.assertEqual(len(events), 1)
        self.assertIn("cannot read", formatEvent(events[0]))

    def test_sees_edits_by_another_instance(self):
        reader = self.make_directory(domains="example.org\n")
        writer = FileDirectory(self.data_dir)
        writer.bcrypt_rounds = 4
        writer.add_account("alice@example.org", "pw")
        writer.add_domain("example.net")
        self.assertIsNotNone(reader.get_account("alice@example.org"))
        self.assertTrue(reader.is_local_domain("example.net"))


class EditTests(DirectoryTestCase):
    def test_missing_data_dir(self):
        directory = FileDirectory(self.mktemp())
        with self.assertRaises(DirectoryError) as caught:
            directory.add_domain("example.org")
        self.assertIn("does not exist", str(caught.exception))

    def test_creates_files_with_headers(self):
        directory = self.make_directory()
        for name in ("domains", "users", "aliases"):
            (self.data_dir / name).unlink()
        self.assertEqual(len(directory.initialize()), 3)
        self.assertEqual(directory.initialize(), [])
        self.assertTrue(self.read("users").startswith("# mailtwist accounts"))
        directory.add_domain("example.org")
        self.assertEqual(directory.domains(), ["example.org"])

    def test_domains(self):
        directory = self.make_directory(domains="# mine\nexample.org\n")
        directory.add_domain("Bücher.DE")
        self.assertEqual(self.read("domains"), "# mine\nexample.org\nxn--bcher-kva.de\n")
        for bad, reason in (
            ("example.ORG", "already exists"),
            ("bad domain", "invalid domain"),
        ):
            with self.assertRaises(DirectoryError) as caught:
                directory.add_domain(bad)
            self.assertIn(reason, str(caught.exception))
        directory.delete_domain("bücher.de")
        self.assertEqual(self.read("domains"), "# mine\nexample.org\n")
        with self.assertRaises(DirectoryError) as caught:
            directory.delete_domain("example.net")
        self.assertEqual(str(caught.exception), "unknown domain 'example.net'")

    def test_delete_domain_in_use(self):
        directory = self.make_directory(domains="example.org\nexample.net\n")
        directory.add_account("alice@example.org", "pw")
        directory.add_account("bob@example.org", "pw")
        directory.add_alias("@example.org", ["alice@example.org"])
        directory.add_alias("x@example.net", ["alice@example.org"])
        with self.assertRaises(DirectoryError) as caught:
            directory.delete_domain("example.org")
        self.assertEqual(
            str(caught.exception),
            "domain 'example.org' still has 2 accounts and 1 alias; delete them first",
        )
        with self.assertRaises(DirectoryError) as caught:
            directory.delete_domain("example.net")
        self.assertIn("still has 1 alias;", str(caught.exception))
        self.assertEqual(directory.domains(), ["example.org", "example.net"])

    def test_add_account(self):
        directory = self.make_directory(domains="example.org\n")
        account = directory.add_account("Alice@Example.org", "secret", quota_bytes=5000)
        self.assertEqual(account.address, "alice@example.org")
        self.assertEqual(account.quota_bytes, 5000)
        self.assertTrue(account.enabled)
        self.assertTrue(account.password_hash.startswith(b"$2b$04$"))
        self.assertEqual(directory.get_account("alice@example.org"), account)
        self.assertTrue(check_password("secret", account.password_hash))
        line = self.read("users").splitlines()[-1]
        self.assertEqual(
            line,
            f"alice@example.org:{{BLF-CRYPT}}{account.password_hash.decode()}"
            "::::::quota_bytes=5000",
        )
        mode = stat.S_IMODE((self.data_dir / "users").stat().st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(
            sorted(p.name for p in self.data_dir.iterdir()),
            [".directory.lock", "aliases", "domains", "users"],
        )

    def test_add_account_errors(self):
        directory = self.make_directory(domains="example.org\n")
        directory.add_account("alice@example.org", "secret")
        before = self.read("users")
        cases = [
            (("bob@example.net", "pw"), "unknown domain 'example.net'"
             " (add it with: mailtwist domain add example.net)"),
            (("ALICE@example.org", "pw"), "account 'alice@example.org' already exists"),
            (("bob example.org", "pw"), "invalid address"),
            (("bob@example.org", ""), "empty password"),
            (("bob@example.org", "x" * 80), "rejected rather than truncated"),
        ]
        for args, message in cases:
            with self.assertRaises(DirectoryError) as caught:
                directory.add_account(*args)
            self.assertIn(message, str(caught.exception))
        self.assertRaises(DirectoryError, directory.add_account, "b@example.org", "p", -1)
        self.assertEqual(self.read("users"), before)

    def test_set_password_keeps_other_fields(self):
        directory = self.make_directory(
            domains="example.org\n",
            users=f"# keep me\nalice@example.org:{USER}quota_bytes=7 nologin userdb_x=1\n",
        )
        directory.set_password("ALICE@example.org", "new one")
        account = directory.get_account("alice@example.org")
        self.assertTrue(check_password("new one", account.password_hash))
        self.assertFalse(check_password("secret", account.password_hash))
        self.assertEqual((account.quota_bytes, account.enabled), (7, False))
        self.assertTrue(self.read("users").startswith("# keep me\n"))
        self.assertIn("quota_bytes=7 nologin userdb_x=1\n", self.read("users"))
        self.assertRaises(DirectoryError, directory.set_password, "bob@example.org", "pw")
        self.assertRaises(DirectoryError, directory.set_password, "alice@example.org", "")

    def test_enable_and_disable(self):
        directory = self.make_directory(
            domains="example.org\n", users=f"alice@example.org:{USER}disabled=yes\n"
        )
        directory.set_account_enabled("alice@example.org", True)
        self.assertTrue(directory.get_account("alice@example.org").enabled)
        self.assertTrue(self.read("users").endswith("::::::\n"))
        directory.set_account_enabled("alice@example.org", False)
        directory.set_account_enabled("alice@example.org", False)
        self.assertFalse(directory.get_account("alice@example.org").enabled)
        self.assertTrue(self.read("users").endswith("::::::nologin\n"))
        self.assertRaises(
            DirectoryError, directory.set_account_enabled, "bob@example.org", True
        )

    def test_delete_account_keeps_unrelated_lines(self):
        directory = self.make_directory(
            domains="example.org\n",
            users=f"# head\nalice@example.org:{USER}\ngarbage line\n"
            f"bob@example.org:{USER}quota_bytes=x\n",
        )
        directory.delete_account("Alice@example.org")
        directory.delete_account("bob@example.org")
        self.assertEqual(self.read("users"), "# head\ngarbage line\n")
        with self.assertRaises(DirectoryError) as caught:
            directory.delete_account("alice@example.org")
        self.assertEqual(str(caught.exception), "no account 'alice@example.org'")

    def test_aliases(self):
        directory = self.make_directory(
            domains="example.org\n",
            aliases="# head\ninfo@example.org: alice@example.org,\n  bob@example.org\n",
        )
        directory.add_alias("INFO@example.org", ["bob@example.org", "x@Remote.example"])
        directory.add_alias("@example.org", ["alice@example.org"])
        self.assertEqual(
            self.read("aliases"),
            "# head\n"
            "info@example.org: alice@example.org, bob@example.org, x@remote.example\n"
            "@example.org: alice@example.org\n",
        )
        directory.delete_alias("info@example.org", "X@remote.example")
        self.assertEqual(
            directory.aliases()["info@example.org"], ("alice@example.org", "bob@example.org")
        )
        directory.delete_alias("info@example.org", "alice@example.org")
        directory.delete_alias("info@example.org", "bob@example.org")
        self.assertNotIn("info@example.org", directory.aliases())
        directory.delete_alias("@example.org")
        self.assertEqual(self.read("aliases"), "# head\n")

    def test_delete_alias_with_continuation_lines(self):
        directory = self.make_directory(
            domains="example.org\n",
            aliases="a@example.org: x@y.example,\n  z@y.example\nb@example.org: x@y.example\n",
        )
        directory.delete_alias("a@example.org")
        self.assertEqual(self.read("aliases"), "b@example.org: x@y.example\n")

    def test_alias_errors(self):
        directory = self.make_directory(
            domains="example.org\n", aliases="a@example.org: x@y.example\n"
        )
        cases = [
            (directory.add_alias, ("a@example.net", ["x@y.example"]), "unknown domain"),
            (directory.add_alias, ("@example.net", ["x@y.example"]), "unknown domain"),
            (directory.add_alias, ("a@example.org", ["not valid"]), "invalid address"),
            (directory.add_alias, ("a@example.org", []), "at least one target"),
            (directory.add_alias, ("@bad_domain", ["x@y.example"]), "invalid catch-all"),
            (directory.delete_alias, ("b@example.org",), "no alias 'b@example.org'"),
            (directory.delete_alias, ("a@example.org", "z@y.example"), "has no target"),
        ]
        for method, args, message in cases:
            with self.assertRaises(DirectoryError) as caught:
                method(*args)
            self.assertIn(message, str(caught.exception))
        self.assertEqual(self.read("aliases"), "a@example.org: x@y.example\n")

    def test_concurrent_processes_lose_no_update(self):
        """Eight processes adding users at once all get their lines in."""
        self.make_directory(domains="example.org\n")
        script = textwrap.dedent(
            """\
            import sys, time
            from mailtwist.directory import FileDirectory
            directory = FileDirectory(sys.argv[1])
            directory.bcrypt_rounds = 4
            start = float(sys.argv[3])
            time.sleep(max(0.0, start - time.time()))
            for i in range(5):
                directory.add_account(f"u{sys.argv[2]}-{i}@example.org", "pw")
                directory.add_alias("all@example.org", [f"u{sys.argv[2]}-{i}@example.org"])
            """
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        start = str(time.time() + 1.0)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(self.data_dir), str(n), start],
                env=env,
                stderr=subprocess.PIPE,
            )
            for n in range(8)
        ]
        for process in processes:
            _, err = process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0, err.decode())
        directory = FileDirectory(self.data_dir)
        expected = {f"u{n}-{i}@example.org" for n in range(8) for i in range(5)}
        self.assertEqual({a.address for a in directory.accounts()}, expected)
        self.assertEqual(set(directory.aliases()["all@example.org"]), expected)
        self.assertEqual(len(self.read("users").splitlines()), 40)
        leftovers = [p.name for p in self.data_dir.iterdir() if p.name.endswith(".tmp")]
        self.assertEqual(leftovers, [])
