"""The mod-sequence index file (mailtwist.storage.index): format, append, rebuild."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from mailtwist.storage import index as index_module
from mailtwist.storage.index import (
    CACHE_NAME,
    FIELD_SEP,
    INDEX_NAME,
    NAME_SEP,
    CorruptIndex,
    MessageCache,
    ModseqIndex,
    missing_ranges,
    open_index,
)


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
        """A lost or damaged index restarts above every mod-sequence handed out
        before (RFC 7162: HIGHESTMODSEQ never goes down without a new
        UIDVALIDITY); only another UIDVALIDITY's index restarts from 1."""
        self.patch(index_module, "time_seed", lambda: 5000)
        messages = [(1, frozenset("S")), (2, frozenset())]
        index, reason = open_index(self.path, 9, messages)
        self.assertEqual(reason, "missing")
        self.assertEqual(index.messages, {1: (5000, "S"), 2: (5000, "")})
        self.assertEqual((index.highest, index.floor), (5000, 5000))
        index.append([index.set(2, 5008, "F")])
        loaded, reason = open_index(self.path, 9, messages)
        self.assertIsNone(reason)
        self.assertEqual(loaded.highest, 5008)
        self.path.write_bytes(b"mailtwist-index 1 9 7000\n+2 nonsense\n")
        rebuilt, reason = open_index(self.path, 9, messages)
        self.assertIn("line 2", reason)
        self.assertEqual(rebuilt.highest, 7001)
        self.assertEqual(ModseqIndex.load(self.path, 9).messages,
                         {1: (7001, "S"), 2: (7001, "")})
        rebuilt, reason = open_index(self.path, 10, messages[:1])
        self.assertIn("UIDVALIDITY", reason)
        self.assertEqual(ModseqIndex.load(self.path, 10).messages, {1: (1, "S")})
        self.assertEqual(rebuilt.highest, 1)

    def test_missing_index_of_a_folder_that_never_had_mail_starts_at_one(self):
        """UIDNEXT 1 proves no mod-sequence was ever given out: start from 1."""
        self.patch(index_module, "time_seed", lambda: 5000)
        index, reason = open_index(self.path, 9, [], uidnext=1)
        self.assertEqual((reason, index.highest, index.floor), ("missing", 1, 0))
        index, _ = open_index(self.dir / "other", 9, [], uidnext=4)
        self.assertEqual((index.highest, index.floor), (5000, 5000))

    def test_real_time_seed_is_above_small_modseqs(self):
        """The seed is the time in microseconds, far above counters from 1."""
        self.path.write_bytes(b"mailtwist-index 1 9 123456\n+1 123456 S\n+2 x\n")
        index, _ = open_index(self.path, 9, [(1, frozenset("S"))])
        self.assertGreater(index.highest, 123456)
        self.assertLess(index.highest, 2**63)

    def test_expunge_log_is_bounded_and_its_floor_persisted(self):
        """Only MAX_EXPUNGED expunges are kept; the floor says what was forgotten."""
        self.patch(index_module, "MAX_EXPUNGED", 10)
        index = ModseqIndex(self.path, 3)
        for uid in range(1, 31):
            index.set(uid, uid, "")
        for uid in range(1, 31):
            index.expunge(uid, 100 + uid)
        self.assertLessEqual(len(index.expunged), 11)
        self.assertEqual(set(index.expunged), set(range(31 - len(index.expunged), 31)))
        self.assertEqual(index.floor, 100 + 30 - len(index.expunged))
        index.write()
        self.assertTrue(self.path.read_bytes().startswith(b"mailtwist-index 2 3 130 %d\n"
                                                          % index.floor))
        loaded = ModseqIndex.load(self.path, 3)
        self.assertEqual((loaded.expunged, loaded.floor), (index.expunged, index.floor))

    def test_load_trims_an_appended_log(self):
        """Records appended since the last compaction are trimmed on load too."""
        self.patch(index_module, "MAX_EXPUNGED", 4)
        lines = [b"mailtwist-index 1 3 1\n"] + [b"-%d %d\n" % (u, u) for u in range(1, 21)]
        self.path.write_bytes(b"".join(lines))
        loaded = ModseqIndex.load(self.path, 3)
        self.assertEqual(sorted(loaded.expunged), [17, 18, 19, 20])
        self.assertEqual(loaded.floor, 16)

    def test_version_1_files_still_load(self):
        """Indexes written before the floor existed load with floor 0."""
        self.path.write_bytes(b"mailtwist-index 1 3 9\n+1 9 S\n-2 4\n")
        loaded = ModseqIndex.load(self.path, 3)
        self.assertEqual((loaded.highest, loaded.floor, loaded.expunged), (9, 0, {2: 4}))
        for bad in (b"mailtwist-index 2 3 9\n", b"mailtwist-index 1 3 9 4\n",
                    b"mailtwist-index 3 3 9 4\n"):
            with self.assertRaises(CorruptIndex):
                ModseqIndex.parse(self.path, bad, 3)

    def test_missing_ranges(self):
        """The UIDs a client may know that no longer exist, as ranges."""
        self.assertEqual(list(missing_ranges([2, 3, 7], 1, 9)), [(1, 1), (4, 6), (8, 9)])
        self.assertEqual(list(missing_ranges([2, 3, 7], 3, 7)), [(4, 6)])
        self.assertEqual(list(missing_ranges([], 1, 3)), [(1, 3)])
        self.assertEqual(list(missing_ranges([1, 2, 3], 1, 3)), [])
        self.assertEqual(list(missing_ranges([5], 6, 5)), [])

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


def _row(uid: int, base: str, subject: str | None = None, fields: str = "") -> tuple:
    """A cache row with only the columns these tests look at filled in."""
    return (uid, base, 100, None, None, None, None, subject, None, None, fields,
            b"Subject: x\r\n\r\n", b"(ENV %d)" % uid, b"(BODY)", b"(BODYSTRUCTURE)")


class MessageCacheTests(unittest.TestCase):
    """The SQLite message cache: lookups, searches, and starting afresh."""

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / CACHE_NAME

    def cache(self, uidvalidity: int = 7) -> MessageCache:
        cache = MessageCache(self.path, uidvalidity)
        self.addCleanup(cache.close)
        return cache

    def test_rows_round_trip_and_are_checked_by_base_name(self):
        """A row is served only for the file it was made from."""
        cache = self.cache()
        cache.put([_row(1, "a", "hello"), _row(2, "b")])
        self.assertEqual(cache.get(1, "a").envelope, b"(ENV 1)")
        self.assertIsNone(cache.get(1, "other"))
        self.assertIsNone(cache.get(3, "c"))
        self.assertEqual(cache.known(1, 5), {1: "a", 2: "b"})
        self.assertEqual(sorted(cache.get_range(2, 9)), [2])
        self.assertEqual(sorted(cache.get_many([2, 1, 9])), [1, 2])
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)

    def test_header_search_by_sql_is_exact_for_unicode(self):
        """Folded values are matched with instr(): substrings, any script, any field."""
        cache = self.cache()
        sep, name = FIELD_SEP, NAME_SEP
        cache.put([_row(1, "a", "straße café", f"subject{name}straße café{sep}x-tag{name}red"),
                   _row(2, "b", "plain", f"subject{name}plain{sep}x-tag{name}blue"),
                   _row(3, "c", None, "")])
        self.assertEqual(cache.match_header("subject", "ße ca", 1, 3), {1})
        self.assertEqual(cache.match_header("subject", "", 1, 3), {1, 2})
        self.assertEqual(cache.match_header("x-tag", "blu", 1, 3), {2})
        self.assertEqual(cache.match_header("x-tag", "x-tag", 1, 3), set())
        self.assertEqual(cache.match_header("subject", "plain", 1, 1), set())
        self.assertEqual(cache.match_header_text("x-tag: red", 1, 3), {1})
        self.assertEqual(cache.match_header_text("café\nx-tag", 1, 3), {1})

    def test_forget_drops_rows(self):
        """Rows of expunged messages go."""
        cache = self.cache()
        cache.put([_row(1, "a"), _row(2, "b")])
        cache.forget([1])
        self.assertEqual(cache.known(1, 9), {2: "b"})

    def test_deleted_file_is_rebuilt(self):
        """Deleting the cache file is always safe: it comes back empty."""
        cache = self.cache()
        cache.put([_row(1, "a")])
        cache.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        again = self.cache()
        self.assertEqual(again.known(1, 9), {})
        again.put([_row(2, "b")])
        self.assertEqual(again.known(1, 9), {2: "b"})

    def test_file_deleted_while_open_is_recreated(self):
        """An administrator may delete the cache under a running server: it is
        noticed at the next use and rebuilt, not kept alive as a ghost."""
        cache = self.cache()
        cache.put([_row(1, "a")])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.assertEqual(cache.known(1, 9), {})
        cache.put([_row(2, "b")])
        self.assertTrue(self.path.exists())
        self.assertEqual(MessageCache(self.path, 7).known(1, 9), {2: "b"})

    def test_non_utf8_base_names_are_stored(self):
        """File names that are not UTF-8 (surrogate escapes) get rows too."""
        cache = self.cache()
        base = b"\xff\xfe-name".decode("utf-8", "surrogateescape")
        cache.put([_row(1, base, "subj\udcff")])
        self.assertIsNotNone(cache.get(1, base))
        self.assertEqual(cache.known(1, 1), {1: index_module.base_key(base)})

    def test_other_uidvalidity_or_version_starts_afresh(self):
        """Rows of another UIDVALIDITY or schema version are never served."""
        cache = self.cache(7)
        cache.put([_row(1, "a")])
        cache.close()
        self.assertEqual(self.cache(8).known(1, 9), {})
        self.cache(8).put([_row(1, "a")])
        self.patch(index_module, "CACHE_VERSION", index_module.CACHE_VERSION + 1)
        self.assertEqual(self.cache(8).known(1, 9), {})

    def test_other_renderer_starts_afresh(self):
        """Rows rendered by other code (a fixed ENVELOPE, new folding) are dropped."""
        cache = MessageCache(self.path, 7, "old code")
        cache.put([_row(1, "a")])
        cache.close()
        again = MessageCache(self.path, 7, "new code")
        self.addCleanup(again.close)
        self.assertEqual(again.known(1, 9), {})

    def test_garbage_file_is_replaced(self):
        """A damaged file is thrown away, not a reason to fail."""
        self.path.write_bytes(b"this is not a database" * 100)
        cache = self.cache()
        cache.put([_row(1, "a")])
        self.assertEqual(cache.known(1, 9), {1: "a"})
        self.assertIsNone(cache.broken)

    def test_planted_symlink_is_not_followed(self):
        """A symbolic link where the cache goes is replaced, its target untouched."""
        outside = self.dir / "outside"
        outside.write_bytes(b"precious")
        self.path.symlink_to(outside)
        cache = self.cache()
        cache.put([_row(1, "a")])
        self.assertFalse(self.path.is_symlink())
        self.assertEqual(outside.read_bytes(), b"precious")
