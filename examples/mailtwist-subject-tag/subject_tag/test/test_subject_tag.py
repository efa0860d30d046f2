"""subject_tag through mailtwist's real pipeline (mailtwist.testing), the way a
plugin author tests a filter: `python -m twisted.trial subject_tag`."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.filters import FilterConfigError, header_values
from mailtwist.testing import FilterTestServer, run_message
from subject_tag import SubjectTag, subject_tag


def subject(stored) -> list[str]:
    return header_values(stored.content.replace(b"\n", b"\r\n"), "Subject")


class SubjectTagTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_external_mail_is_tagged(self):
        """Mail from a domain that is not ours gets the tag in front of its Subject."""
        result = yield run_message(self, [SubjectTag("[EXT]", ["example.test"])],
                                   b"Subject: invoice\r\n\r\npay now\r\n",
                                   sender="ceo@evil.test")
        self.assertTrue(result.accepted, result)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(subject(stored), ["[EXT] invoice"])

    @defer.inlineCallbacks
    def test_internal_mail_untouched(self):
        """Mail from our own domain keeps its Subject."""
        result = yield run_message(self, [SubjectTag("[EXT]", ["example.test"])],
                                   b"Subject: lunch\r\n\r\nnoon?\r\n",
                                   sender="bob@example.test")
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(subject(stored), ["lunch"])

    @defer.inlineCallbacks
    def test_no_subject_and_already_tagged(self):
        """A missing Subject becomes the tag; a tagged one is not tagged twice."""
        server = yield FilterTestServer(self, [SubjectTag("[EXT]", [])]).start()
        first = yield server.send(b"\r\nno subject\r\n", sender="a@evil.test")
        second = yield server.send(b"Subject: [EXT] re: hi\r\n\r\nx\r\n",
                                   sender="a@evil.test", recipients=["bob@example.test"])
        self.assertEqual(subject(first.stored["alice@example.test"][0]), ["[EXT]"])
        self.assertEqual(subject(second.stored["bob@example.test"][0]), ["[EXT] re: hi"])

    @defer.inlineCallbacks
    def test_from_config(self):
        """The factory's settings, as mailtwist.toml gives them."""
        config = {"filters": {"smtp": ["subject_tag.subject_tag"],
                              "subject_tag.subject_tag": {"tag": "[OUTSIDE]"}}}
        server = yield FilterTestServer(self, None, config=config).start()
        result = yield server.send(b"Subject: hi\r\n\r\nx\r\n", sender="a@evil.test")
        self.assertEqual(subject(result.stored["alice@example.test"][0]), ["[OUTSIDE] hi"])

    def test_bad_settings(self):
        """An empty tag or an address among the domains is refused, naming the key."""
        for settings, key in [({"tag": " "}, "tag"),
                              ({"internal_domains": ["bob@example.test"]}, "internal_domains")]:
            with self.assertRaises(FilterConfigError) as cm:
                subject_tag.build(settings)
            self.assertEqual(cm.exception.key, key)
        with self.assertRaises(FilterConfigError) as cm:
            subject_tag.build({"tags": "[X]"})
        self.assertEqual(cm.exception.key, "tags")
        self.assertEqual(subject_tag.build({}).tag, "[EXTERNAL]")
