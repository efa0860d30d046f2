"""Modified UTF-7 is strict: one canonical encoding per name, no smuggled ASCII."""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.trial import unittest

from mailtwist import mutf7


class MUTF7Tests(unittest.SynchronousTestCase):
    def test_known_encodings(self) -> None:
        self.assertEqual(mutf7.encode("Entwürfe"), "Entw&APw-rfe")
        self.assertEqual(mutf7.encode("a&b"), "a&-b")
        self.assertEqual(mutf7.decode("&ZeVnLIqe-"), "日本語")

    def test_tricks_refused(self) -> None:
        for text in ("&AC4ALg-", "a&AC8-b", "&Jjo", "&2D0-", "Entw&AP-rfe",
                     "Entw&APw-&AHI-fe", "\x00", "ü"):
            with self.assertRaises(ValueError, msg=text):
                mutf7.decode(text)

    def test_control_characters_decode_for_validation_to_refuse(self) -> None:
        from mailtwist.storage.maildir import InvalidFolderName, validate_folder_name
        self.assertEqual(mutf7.decode("&AAA-"), "\x00")
        with self.assertRaises(InvalidFolderName):
            validate_folder_name(mutf7.decode("a&AAA-b"))

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
    def test_round_trip(self, text: str) -> None:
        self.assertEqual(mutf7.decode(mutf7.encode(text)), text)
