"""How long does IMAP SEARCH take on a 100,000-message mailbox? Prints milliseconds.

Builds ``--messages`` synthetic messages in memory (flags cycling through
four sets, sizes spread over 0-100,000 octets, a small header and body each)
and times ``parse_search`` plus ``evaluate`` for two kinds of query:

- flag-only searches (flags, sizes, sequence and UID sets), which never read
  a message: the cost of the evaluator itself;
- header searches (FROM, SUBJECT, HEADER...), which parse every message they
  cannot rule out by cheaper keys with ``mailtwist.imap.mime`` (from bytes in
  memory, so disk reads are not included) and decode and fold its fields;
- the same header searches answered from the folder's message cache
  (``mailtwist-cache.sqlite``, filled once first: its time is printed too),
  chunk by chunk as the server runs them: SQL over folded columns, no parsing.

Each figure is the best of ``--repeat`` runs, in milliseconds, with the
number of matches.  The tests count the work instead (attribute reads, which
do not depend on the machine); this script says what that work costs here.

    python bench/imap_search.py --messages 100000 --repeat 3
    python bench/imap_search.py --messages 10000 --repeat 1    # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailtwist.imap import mailbox as mailbox_module
from mailtwist.imap.mailbox import _ChunkIndex, cache_row
from mailtwist.imap.mime import ParsedMessage
from mailtwist.imap.search import evaluate, parse_search
from mailtwist.storage.index import MessageCache

FLAG_QUERIES = [
    b"UNSEEN NOT DELETED OR FLAGGED LARGER 50000 1:*",
    b"SEEN",
    b"KEYWORD $Junk",
    b"UID 1:4294967295",
    b"OR OR OR FLAGGED DRAFT ANSWERED SMALLER 100 NOT 5000:*",
]
HEADER_QUERIES = [
    b"FROM user7@",
    b'SUBJECT "report 4242"',
    b"HEADER X-Priority 1",
    b"FROM carol",
    b"FLAGGED SUBJECT report",
]
FLAG_SETS = [frozenset(), frozenset({"\\Seen"}), frozenset({"\\Seen", "\\Flagged"}),
             frozenset({"\\Deleted", "$Junk"})]
DAY = datetime.datetime(2024, 3, 10, 12, 0, tzinfo=datetime.UTC)


@dataclass(eq=False, slots=True)
class Message:
    """A SearchMessage whose text is parsed from memory on demand."""

    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    raw: bytes
    internaldate: datetime.datetime = DAY
    recent: bool = False

    def parsed(self) -> ParsedMessage:
        return ParsedMessage.parse(self.raw)


def mailbox(count: int) -> list[Message]:
    messages = []
    step = max(1, 100_000 // count)
    for i in range(1, count + 1):
        raw = (f"From: User {i % 1000} <user{i % 1000}@example.test>\r\n"
               f"To: team@example.test\r\nSubject: Weekly report {i}\r\n"
               f"X-Priority: {i % 5}\r\nDate: Sun, 10 Mar 2024 12:00:00 +0000\r\n"
               f"Message-ID: <{i}@example.test>\r\n\r\nNumbers for week {i}.\r\n").encode()
        messages.append(Message(i, i * 3, FLAG_SETS[i % 4], i * step, raw))
    return messages


def best_of(query: bytes, messages: list[Message], repeat: int) -> tuple[float, int]:
    best = float("inf")
    matches = 0
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        matches = len(evaluate(parse_search(query), messages))
        best = min(best, time.perf_counter() - start)
    return best, matches


def cached_best_of(query: bytes, messages: list[Message], cache: MessageCache,
                   repeat: int) -> tuple[float, int]:
    """Like best_of, but chunked with the cache as the server's SEARCH does."""
    chunk = mailbox_module.SEARCH_CHUNK
    best = float("inf")
    matches = 0
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        program = parse_search(query)
        found = 0
        for first in range(0, len(messages), chunk):
            part = messages[first:first + chunk]
            index = _ChunkIndex(cache, [(m.seq, m.uid, SimpleNamespace(
                info=SimpleNamespace(base=f"b{m.uid}"))) for m in part])
            found += len(evaluate(program, part, max_uid=messages[-1].uid,
                                  max_seq=len(messages), index=index))
        matches = found
        best = min(best, time.perf_counter() - start)
    return best, matches


def fill_cache(messages: list[Message], directory: str) -> MessageCache:
    cache = MessageCache(f"{directory}/cache.sqlite", 1)
    rows = []
    for m in messages:
        rows.append(cache_row(m.uid, f"b{m.uid}", m.size, ParsedMessage.parse(m.raw)))
        if len(rows) == 1000:
            cache.put(rows)
            rows = []
    cache.put(rows)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per query (best counts)")
    args = parser.parse_args()

    messages = mailbox(args.messages)
    print(f"Python {sys.version.split()[0]}, {args.messages:,} messages, "
          f"best of {args.repeat}, milliseconds")
    for title, queries in (("flag-only", FLAG_QUERIES), ("header", HEADER_QUERIES)):
        print(f"\n{title + ' searches':<60}{'ms':>9}{'matches':>10}")
        for query in queries:
            seconds, matches = best_of(query, messages, args.repeat)
            print(f"  {query.decode():<58}{seconds * 1000:>9.1f}{matches:>10}")
    directory = tempfile.mkdtemp(prefix="mailtwist-bench-")
    try:
        start = time.perf_counter()
        cache = fill_cache(messages, directory)
        print(f"\nfilling the message cache: {time.perf_counter() - start:.1f} s (once)")
        print(f"{'header searches from the message cache':<60}{'ms':>9}{'matches':>10}")
        for query in HEADER_QUERIES:
            seconds, matches = cached_best_of(query, messages, cache, args.repeat)
            print(f"  {query.decode():<58}{seconds * 1000:>9.1f}{matches:>10}")
        cache.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
