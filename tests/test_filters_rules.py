"""The rules filter: shared and per-user rules at the delivery stage, and its
errors for bad rules."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailtwist.config import ConfigError
from mailtwist.filters.loader import build_filter, installed_factories
from mailtwist.filters.rules import (
    RuleError,
    decide,
    load_rules_file,
    parse_rule,
    rules,
)
from mailtwist.interfaces import (
    CONTINUE,
    AddFlags,
    Continue,
    Discard,
    FileInto,
    IFilter,
)
from mailtwist.testing import FilterTestServer

LIST_MAIL = (b"From: list@python.org\r\nList-Id: <python-dev.python.org>\r\n"
             b"Subject: =?utf-8?q?Caf=C3=A9_meeting?=\r\n\r\nhello\r\n")
PLAIN = b"From: bob@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"


class RulesServerTests(unittest.TestCase):
    def server(self, shared=(), **settings):
        config = {"filters": {"smtp": ["rules"],
                              "rules": {"rules": list(shared), **settings}}}
        return FilterTestServer(self, None, config=config).start()

    @defer.inlineCallbacks
    def test_shared_rule_files_into_folder(self):
        """A header rule from the settings files matching mail into its folder, with flags."""
        server = yield self.server([{"header": "List-Id", "contains": "PYTHON.org",
                                     "folder": "Lists/python", "flags": ["\\Seen"]}])
        result = yield server.send(LIST_MAIL)
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual((stored.folder, stored.flags), ("Lists/python", "S"))
        result = yield server.send(PLAIN, recipients=["bob@example.test"])
        [stored] = result.stored["bob@example.test"]
        self.assertEqual((stored.folder, stored.flags), ("INBOX", ""))

    @defer.inlineCallbacks
    def test_per_user_file(self):
        """<state_dir>/<account>.toml applies to that account's copy only, before shared rules."""
        server = yield self.server([{"header": "Subject", "regex": "^Caf", "folder": "Shared"}])
        user_dir = server.data_dir / "filters" / "rules"
        user_dir.mkdir(parents=True)
        (user_dir / "alice@example.test.toml").write_text(
            '[[rule]]\nname = "cafe"\nheader = "Subject"\nregex = "Café"\n'
            'folder = "Coffee"\nflags = ["\\\\Flagged"]\n')
        result = yield server.send(LIST_MAIL,
                                   recipients=["alice@example.test", "bob@example.test"])
        self.assertTrue(result.accepted, result)
        [alice] = result.stored["alice@example.test"]
        [bob] = result.stored["bob@example.test"]
        self.assertEqual((alice.folder, alice.flags), ("Coffee", "F"))
        self.assertEqual(bob.folder, "Shared")

    @defer.inlineCallbacks
    def test_user_file_change_is_seen(self):
        """Editing the per-user file takes effect for the next message."""
        server = yield self.server()
        user_dir = server.data_dir / "filters" / "rules"
        user_dir.mkdir(parents=True)
        path = user_dir / "alice@example.test.toml"
        path.write_text('[[rule]]\nsender = "@sender.test"\nfolder = "A"\n')
        first = yield server.send(PLAIN, sender="bob@sender.test")
        path.write_text('[[rule]]\nsender = "@sender.test"\nfolder = "Bee"\n'
                        '# longer file, another size\n')
        second = yield server.send(PLAIN, sender="bob@sender.test")
        self.assertEqual(sorted(m.folder for m in second.stored["alice@example.test"]),
                         ["A", "Bee"])
        self.assertEqual(first.stored["alice@example.test"][0].folder, "A")

    @defer.inlineCallbacks
    def test_discard_and_size(self):
        """discard stores nothing for the account; size_over matches big messages only."""
        server = yield self.server([{"size_over": 1000, "discard": True}])
        result = yield server.send(PLAIN + b"x" * 2000 + b"\r\n")
        self.assertTrue(result.accepted, result)
        self.assertEqual(result.stored["alice@example.test"], [])
        result = yield server.send(PLAIN)
        self.assertEqual(len(result.stored["alice@example.test"]), 1)

    @defer.inlineCallbacks
    def test_bad_user_file_is_logged_and_ignored(self):
        """A broken per-user file: one log line naming it, and the mail goes to the INBOX."""
        lines = []
        observer = lambda event: lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        server = yield self.server()
        user_dir = server.data_dir / "filters" / "rules"
        user_dir.mkdir(parents=True)
        (user_dir / "alice@example.test.toml").write_text(
            '[[rule]]\nheader = "Subject"\nfolderr = "X"\n')
        result = yield server.send(PLAIN)
        self.assertTrue(result.accepted, result)
        self.assertEqual(result.stored["alice@example.test"][0].folder, "INBOX")
        [line] = [x for x in lines if "rules:" in x]
        self.assertIn("alice@example.test.toml: rule[0]: unknown key 'folderr'", line)


class RuleParsingTests(unittest.TestCase):
    def test_errors_name_rule_and_key(self):
        """Each kind of bad rule gives one line naming the rule and the key."""
        cases = [
            ({"header": "Subject"}, "rule: no action; use folder, flags or discard"),
            ({"folder": "X"}, "rule: no condition"),
            ({"contains": "x", "folder": "X"}, "rule: contains: needs header"),
            ({"header": "S", "regex": "(", "folder": "X"}, "rule: regex: "),
            ({"size_over": -1, "folder": "X"}, "rule: size_over: expected a size"),
            ({"size_over": "1k", "folder": "X"}, "rule: size_over: expected a size"),
            ({"sender": "nobody", "folder": "X"}, "rule: sender: expected user@domain"),
            ({"sender": "@x.test", "folder": "../etc"}, "rule: folder: "),
            ({"sender": "@x.test", "flags": ["\\Recent"]}, "rule: flags: unsupported flag"),
            ({"sender": "@x.test", "folder": "X", "discard": True}, "rule: discard: cannot"),
            ({"sender": "@x.test", "discard": "yes"}, "rule: discard: expected true or false"),
            ({"name": "n", "sender": "@x.test"}, "rule (n): no action"),
            ({"sender": "@x.test", "fold": "X"}, "rule: unknown key 'fold'"),
        ]
        for table, expected in cases:
            with self.assertRaises(RuleError) as cm:
                parse_rule(table, "rule")
            self.assertTrue(str(cm.exception).startswith(expected), (table, cm.exception))

    def test_config_error(self):
        """A bad shared rule is a ConfigError naming filters.rules.rules and the index."""
        with self.assertRaises(ConfigError) as cm:
            build_filter("rules", {"rules": [{"sender": "@x.test", "folder": "A"},
                                             {"header": "X"}]})
        self.assertTrue(str(cm.exception).startswith("filters.rules.rules: rule[1]: no action"),
                        cm.exception)

    def test_load_rules_file_errors(self):
        """A file that is not TOML, or has other keys than [[rule]], is refused."""
        path = Path(self.mktemp())
        path.write_text("[[rule]\n")
        self.assertRaises(RuleError, load_rules_file, path)
        path.write_text('[rules]\nsender = "@x.test"\n')
        with self.assertRaises(RuleError) as cm:
            load_rules_file(path)
        self.assertIn("unknown key 'rules'", str(cm.exception))

    def test_first_match_wins_unless_stop_false(self):
        """The first matching rule decides; stop = false lets later rules add flags."""
        first = parse_rule({"sender": "@x.test", "folder": "A", "flags": ["\\Seen"],
                            "stop": False}, "r")
        second = parse_rule({"header": "Subject", "folder": "B", "flags": "\\Flagged"}, "r")
        third = parse_rule({"header": "Subject", "discard": True}, "r")
        message = b"Subject: s\r\n\r\nx\r\n"
        self.assertEqual(decide((first, second, third), message, "u@x.test"),
                         Continue(FileInto("A"), AddFlags(("\\Seen", "\\Flagged"))))
        self.assertEqual(decide((second, third), message, "u@x.test"),
                         Continue(FileInto("B"), AddFlags(("\\Flagged",))))
        self.assertEqual(decide((third, second), message, "u@x.test"), Discard())
        self.assertIs(decide((first,), message, "u@y.test"), CONTINUE)

    def test_sender_match(self):
        """sender matches the whole address, or the domain with @domain, any case."""
        exact = parse_rule({"sender": "Bob@X.test", "folder": "A"}, "r")
        domain = parse_rule({"sender": "@x.test", "folder": "A"}, "r")
        self.assertTrue(exact.matches(b"\r\n", "bob@x.TEST"))
        self.assertFalse(exact.matches(b"\r\n", "bobby@x.test"))
        self.assertTrue(domain.matches(b"\r\n", "any@X.test"))
        self.assertFalse(domain.matches(b"\r\n", "any@ax.test.org"))
        self.assertFalse(domain.matches(b"\r\n", ""))

    def test_installed_plugin(self):
        """rules is found as a plugin and builds an IFilter without a server."""
        self.assertIs(installed_factories()["rules"], rules)
        verifyObject(IFilter, rules.build({}))
