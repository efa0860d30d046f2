"""The mod-sequence index file (mailtwist.storage.index): format, append, rebuild."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from mailtwist.storage import index as index_module
from mailtwist.storage.index import INDEX_NAME, CorruptIndex, ModseqIndex, open_index


class IndexFormatTests(unittest.TestCase):

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / INDEX_NAME

    def test_round_trip(self):
        index = ModseqIndex(self.path, 77)
        index.set(1, 3, "SF")
        index.set(2, 5, "")
        index.set(4, 6, "a")
        index.expunge(3, 4)
        index.write()
        loaded = ModseqIndex.load(self.path, 77)
        self.assertEqual(loaded.messages, {1: (3, "FS"), 2: (5, ""), 4: (6, "a")})
        self.assertEqual(loaded.expunged, {3: 4})
        self.assertEqual(loaded.highest, 6)
        self.assertEqual(loaded.serialize(), index.serialize())
        self.assertTrue(self.path.read_bytes().startswith(b"mailtwist-index 1 77 6\n"))

    def test_appended_records_replace_earlier_ones(self):
        index = ModseqIndex(self.path, 1)
        index.set(1, 2, "")
        index.write()
        index.append([index.set(1, 3, "S"), index.set(2, 4, ""), index.expunge(1, 5)])
        loaded = ModseqIndex.load(self.path, 1)
        self.assertEqual(loaded.messages, {2: (4, "")})
        self.assertEqual(loaded.expunged, {1: 5})
        self.assertEqual(loaded.highest, 5)

    def test_highest_never_below_header(self):
        index = ModseqIndex(self.path, 1)
        index.highest = 40
        index.set(1, 7, "")
        index.expunge(1, 9)
        index.write()
        self.assertEqual(ModseqIndex.load(self.path, 1).highest, 40)

    def test_torn_last_record_is_dropped_and_appends_start_a_new_line(self):
        index = ModseqIndex(self.path, 1)
        index.set(1, 2, "S")
        index.write()
        with open(self.path, "ab") as f:
            f.write(b"+2 3")
        loaded = ModseqIndex.load(self.path, 1)
        self.assertEqual(loaded.messages, {1: (2, "S")})
        loaded.append([loaded.set(3, 4, "")])
        again = ModseqIndex.load(self.path, 1)
        self.assertEqual(again.messages, {1: (2, "S"), 3: (4, "")})

    def test_corrupt_files_are_refused(self):
        for data in (b"", b"garbage\n", b"mailtwist-index 2 1 1\n",
                     b"mailtwist-index 1 1 1\n+x 1 S\n", b"mailtwist-index 1 1 1\n+1 0 S\n",
                     b"mailtwist-index 1 1 1\n*1 1\n", b"mailtwist-index 1 1 1\n+1 2 SF\n",
                     b"mailtwist-index 1 1 1\n-1 2 S\n"):
            with self.assertRaises(CorruptIndex, msg=data):
                ModseqIndex.parse(self.path, data, 1)

    def test_other_uidvalidity_is_refused(self):
        ModseqIndex(self.path, 5).write()
        with self.assertRaises(CorruptIndex):
            ModseqIndex.load(self.path, 6)

    def test_open_rebuilds_missing_corrupt_or_foreign_index(self):
        messages = [(1, frozenset("S")), (2, frozenset())]
        index, reason = open_index(self.path, 9, messages)
        self.assertEqual(reason, "missing")
        self.assertEqual(index.messages, {1: (1, "S"), 2: (1, "")})
        self.assertEqual(index.highest, 1)
        index.append([index.set(2, 8, "F")])
        loaded, reason = open_index(self.path, 9, messages)
        self.assertIsNone(reason)
        self.assertEqual(loaded.highest, 8)
        self.path.write_bytes(b"mailtwist-index 1 9 8\n+2 nonsense\n")
        rebuilt, reason = open_index(self.path, 9, messages)
        self.assertIn("line 2", reason)
        self.assertEqual(rebuilt.highest, 1)
        self.assertEqual(ModseqIndex.load(self.path, 9).messages, {1: (1, "S"), 2: (1, "")})
        rebuilt, reason = open_index(self.path, 10, messages[:1])
        self.assertIn("UIDVALIDITY", reason)
        self.assertEqual(ModseqIndex.load(self.path, 10).messages, {1: (1, "S")})

    def test_append_compacts_a_grown_file(self):
        self.patch(index_module, "COMPACT_SLACK", 5)
        index = ModseqIndex(self.path, 1)
        index.set(1, 1, "")
        index.write()
        for modseq in range(2, 30):
            index.append([index.set(1, modseq, "S" if modseq % 2 else "")])
        lines = self.path.read_bytes().splitlines()
        self.assertLess(len(lines), 10)
        loaded = ModseqIndex.load(self.path, 1)
        self.assertEqual(loaded.messages, {1: (29, "S")})
        self.assertEqual(loaded.highest, 29)

    def test_append_recreates_a_deleted_file(self):
        index = ModseqIndex(self.path, 1)
        index.set(1, 1, "")
        index.write()
        self.path.unlink()
        index.append([index.set(2, 2, "")])
        self.assertEqual(ModseqIndex.load(self.path, 1).messages, {1: (1, ""), 2: (2, "")})

    def test_failed_append_rewrites_whole_file_next_time(self):
        index = ModseqIndex(self.path, 1)
        index.set(1, 1, "")
        index.write()
        broken = [True]
        real_fsync = index_module._fsync

        def fsync(fd):
            if broken[0]:
                raise OSError(28, "No space left on device")
            real_fsync(fd)

        self.patch(index_module, "_fsync", fsync)
        with self.assertRaises(OSError):
            index.append([index.set(2, 2, "S")])
        self.assertTrue(index.dirty)
        broken[0] = False
        self.path.write_bytes(b"mailtwist-index 1 1 1\n+1 1 \n")
        index.append([index.set(3, 3, "")])
        self.assertFalse(index.dirty)
        self.assertEqual(ModseqIndex.load(self.path, 1).messages,
                         {1: (1, ""), 2: (2, "S"), 3: (3, "")})
