"""mailtwist.testing, used the way a plugin author's own test suite would."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailtwist.filters import Filter, FilterFactory, header_values
from mailtwist.interfaces import AddHeader, Continue, Reject
from mailtwist.testing import FilterTestServer, run_message


class SubjectTagger(Filter):
    """A plugin author's filter: refuse one word, tag the rest."""

    name = "subject_tagger"

    def __init__(self, banned: str) -> None:
        self.banned = banned.encode()

    def data(self, session, message):
        if self.banned in message:
            return Reject(f"{self.banned.decode()} not welcome here", 550, "5.7.1")
        return Continue(AddHeader("X-Tagged-By", self.name))


subject_tagger = FilterFactory("subject_tagger", lambda s: SubjectTagger(s["banned"]),
                               defaults={"banned": "lottery"})


class PluginAuthorTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_rejected_message(self):
        result = yield run_message(self, [subject_tagger],
                                   b"Subject: you won the lottery\r\n\r\nclaim now\r\n")
        self.assertEqual((result.stage, result.code, result.enhanced),
                         ("data", 550, "5.7.1"))
        self.assertEqual(result.text, "lottery not welcome here")
        self.assertEqual(result.stored["alice@example.test"], [])

    @defer.inlineCallbacks
    def test_tagged_message(self):
        result = yield run_message(self, [SubjectTagger("casino")],
                                   b"Subject: lunch?\r\n\r\nat noon\r\n")
        self.assertTrue(result.accepted)
        [stored] = result.stored["alice@example.test"]
        self.assertEqual(header_values(stored.content, "X-Tagged-By"), ["subject_tagger"])

    @defer.inlineCallbacks
    def test_several_messages_on_one_server(self):
        server = yield FilterTestServer(self, [SubjectTagger("casino")]).start()
        first = yield server.send(b"Subject: casino\r\n\r\nx\r\n")
        second = yield server.send(b"Subject: ok\r\n\r\nx\r\n",
                                   recipients=["bob@example.test"])
        self.assertEqual((first.code, second.code), (550, 250))
        self.assertEqual(len(second.stored["bob@example.test"]), 1)
