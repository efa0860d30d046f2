"""How long does the IMAP MIME code take on big and hostile messages? Prints milliseconds.

Times, for a 25 MB message with four base64 attachments and for each hostile
shape of tests/test_imap_mime.py at full size (1 to 20 MB each, built to make a
naive parser rescan, backtrack or recurse), what a FETCH of everything and a
SEARCH TEXT make the server compute on a freshly parsed message:
``ParsedMessage.parse``, then ENVELOPE, BODYSTRUCTURE, BODY[TEXT] and the
search text.  Each figure (per step, and the total of one run) is the best of
``--repeat`` runs, in milliseconds.

The tests count the work instead (calls and octets read, which do not depend
on the machine); this script says what that work costs here.

    python bench/imap_mime.py --repeat 3
    python bench/imap_mime.py --scale 0.1 --only html
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailtwist.imap.mime import ParsedMessage
from tests.test_imap_mime import hostile_shapes, message_with_attachments

STEPS: list[tuple[str, Callable[[ParsedMessage], object]]] = [
    ("envelope", lambda message: message.envelope()),
    ("bodystructure", lambda message: message.bodystructure()),
    ("BODY[TEXT]", lambda message: message.section("TEXT")),
    ("search text", lambda message: message.text_for_search()),
]


def measure(raw: bytes) -> tuple[dict[str, float], bool]:
    """Seconds per step for one fresh parse, and whether it degraded."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    message = ParsedMessage.parse(raw)
    seconds["parse"] = time.perf_counter() - start
    for name, step in STEPS:
        start = time.perf_counter()
        step(message)
        seconds[name] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    return seconds, message.degraded


def best_of(raw: bytes, repeat: int) -> tuple[dict[str, float], bool]:
    best: dict[str, float] = {}
    degraded = False
    for _ in range(repeat):
        gc.collect()
        seconds, was_degraded = measure(raw)
        degraded |= was_degraded
        for name, value in seconds.items():
            best[name] = min(value, best.get(name, value))
    return best, degraded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per message (best counts)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="size of the messages relative to the tests' full size")
    parser.add_argument("--only", default="", help="only messages whose name contains this")
    args = parser.parse_args()

    messages = {"text + 4 base64 attachments": message_with_attachments(round(4_800_000 * args.scale))}
    messages.update(hostile_shapes(args.scale))
    columns = ["parse"] + [name for name, _ in STEPS] + ["total"]
    print(f"Python {sys.version.split()[0]}, best of {args.repeat}, milliseconds")
    print(f"{'message':<36}{'MB':>7}" + "".join(f"{name:>15}" for name in columns))
    for name, raw in messages.items():
        if args.only not in name:
            continue
        seconds, degraded = best_of(raw, args.repeat)
        figures = "".join(f"{seconds[column] * 1000:>15.1f}" for column in columns)
        note = "  (degraded!)" if degraded else ""
        print(f"{name:<36}{len(raw) / 1e6:>7.1f}{figures}{note}")


if __name__ == "__main__":
    main()
