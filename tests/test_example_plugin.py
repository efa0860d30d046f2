"""The example plugin distribution (examples/mailtwist-subject-tag), installed
with pip into a temporary directory, is found by twisted.plugin in a fresh
Python process: `mailtwist filters` lists it and a server built from a config
naming it applies it.  Nothing is installed into this test process."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import textwrap
from pathlib import Path

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mailtwist-subject-tag"


def can_build_wheels() -> bool:
    """pip --no-build-isolation needs setuptools' bdist_wheel (the wheel package,
    or setuptools >= 70.1 which has it built in)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


class ExamplePluginTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        if not can_build_wheels():
            raise unittest.SkipTest("building the example offline needs the 'wheel' package "
                                    "or setuptools >= 70.1 (pip install wheel)")
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        self.target = self.base / "site"
        return self.install()

    @defer.inlineCallbacks
    def install(self):
        """pip install --target a copy of the example (so no build/ lands in the repo)."""
        source = self.base / "src"
        shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
            "__pycache__", "dropin.cache", "build", "*.egg-info"))
        out, err, code = yield getProcessOutputAndValue(sys.executable, [
            "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
            "--disable-pip-version-check", "--quiet", "--target", str(self.target),
            str(source)], env=self.env(with_target=False))
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))

    def env(self, with_target: bool = True) -> dict[str, str]:
        """This checkout's mailtwist first, then the target dir (as site-packages)."""
        env = dict(os.environ)
        paths = [str(ROOT)] + ([str(self.target)] if with_target else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.pop("PYTHONSTARTUP", None)
        return env

    def run_python(self, *args: str) -> defer.Deferred:
        return getProcessOutputAndValue(sys.executable, args, env=self.env(),
                                        path=str(self.base))

    def test_installed_layout(self):
        """The wheel puts the plugin module in mailtwist/plugins/ without any __init__.py."""
        plugin = self.target / "mailtwist" / "plugins" / "subject_tag_plugin.py"
        self.assertTrue(plugin.is_file())
        self.assertFalse((self.target / "mailtwist" / "__init__.py").exists())
        self.assertFalse((self.target / "mailtwist" / "plugins" / "__init__.py").exists())
        self.assertTrue((self.target / "subject_tag" / "__init__.py").is_file())

    @defer.inlineCallbacks
    def test_mailtwist_filters_lists_it(self):
        """`mailtwist filters` in a process with the target on sys.path lists and checks it."""
        config = self.base / "mailtwist.toml"
        config.write_text(textwrap.dedent(f"""\
            data_dir = "{self.base / 'data'}"
            [filters]
            smtp = ["subject_tag"]
            [filters.subject_tag]
            tag = "[OUTSIDE]"
            internal_domains = ["example.test"]
            """))
        out, err, code = yield self.run_python("-m", "mailtwist.cli", "--config", str(config),
                                               "filters")
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        [line] = [x for x in out.decode().splitlines() if x.startswith("subject_tag ")]
        self.assertIn("smtp", line)
        self.assertIn("tag the Subject of mail from outside", line)

        config.write_text(config.read_text().replace('tag = "[OUTSIDE]"', 'tag = ""'))
        out, err, code = yield self.run_python("-m", "mailtwist.cli", "--config", str(config),
                                               "filters")
        self.assertNotEqual(code, 0)
        self.assertIn("filters.subject_tag.tag: must be one non-empty line", err.decode())

    @defer.inlineCallbacks
    def test_server_from_config_applies_it(self):
        """A server built from a [filters] config naming the plugin tags outside mail;
        the distribution's own trial tests pass where it is installed."""
        tests = self.base / "check_installed.py"
        tests.write_text(textwrap.dedent('''\
            from twisted.internet import defer
            from twisted.trial import unittest
            from mailtwist.filters import header_values
            from mailtwist.testing import FilterTestServer


            class Installed(unittest.TestCase):
                @defer.inlineCallbacks
                def test_applied(self):
                    config = {"filters": {"smtp": ["subject_tag"],
                                          "subject_tag": {"tag": "[OUTSIDE]",
                                                          "internal_domains": ["example.test"]}}}
                    server = yield FilterTestServer(self, None, config=config).start()
                    out = yield server.send(b"Subject: pay\\r\\n\\r\\nx\\r\\n", sender="a@evil.test")
                    ins = yield server.send(b"Subject: hi\\r\\n\\r\\nx\\r\\n",
                                            sender="bob@example.test",
                                            recipients=["bob@example.test"])
                    [tagged] = out.stored["alice@example.test"]
                    [plain] = ins.stored["bob@example.test"]
                    crlf = lambda m: m.content.replace(b"\\n", b"\\r\\n")
                    self.assertEqual(header_values(crlf(tagged), "Subject"), ["[OUTSIDE] pay"])
                    self.assertEqual(header_values(crlf(plain), "Subject"), ["hi"])
            '''))
        out, err, code = yield self.run_python("-m", "twisted.trial", "--temp-directory",
                                               str(self.base / "_trial_temp"),
                                               "check_installed", "subject_tag")
        output = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, output)
        self.assertIn("PASSED (successes=6)", output)
