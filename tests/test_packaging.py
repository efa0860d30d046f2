"""The wheel ships every package of mailtwist and the twistd plugin."""

from __future__ import annotations

import tomllib
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


class PackagingTests(unittest.SynchronousTestCase):
    def test_every_package_is_listed(self):
        listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                     ["tool"]["setuptools"]["packages"])
        on_disk = {".".join(p.parent.relative_to(ROOT).parts)
                   for p in (ROOT / "mailtwist").rglob("__init__.py")}
        self.assertEqual(on_disk - listed, set())
        self.assertIn("twisted.plugins", listed)
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())
