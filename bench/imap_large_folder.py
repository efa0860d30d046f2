"""How does the IMAP server cope with a big folder? Prints seconds and milliseconds.

Fills an INBOX with ``--messages`` small messages (written straight into
``cur/`` with Dovecot-style ``,S=``/``,W=`` names, as delivery makes them),
starts the real service on 127.0.0.1 in this process and times, with imaplib
over TLS from a child process (so the client does not compete with the
server for the GIL): SELECT (first and second time), ``UID FETCH 1:*
(FLAGS)``, ``SEARCH UNSEEN``, ``UID SEARCH SMALLER 10000``, ``STORE 1:*
+FLAGS.SILENT`` and a NOOP after it.

For each step it also prints the reactor's worst lag (how late a 10 ms timer
fired: what any other session would have waited) and, at the end, how many
message files the server opened (none should be, for these commands) and the
server process's peak resident memory.

    python bench/imap_large_folder.py --messages 100000
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from mailtwist.config import ROLES, load_config
from mailtwist.tap import build_service

USER, PASSWORD = "big@example.test", "benchmark password"

CLIENT = r"""
import imaplib, json, ssl, sys, time
port, user, password, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context)
client.login(user, password)
steps = [
    ("SELECT (first scan)", lambda: client.select("INBOX")),
    ("SELECT again", lambda: client.select("INBOX")),
    ("UID FETCH 1:* (FLAGS)", lambda: client.uid("FETCH", "1:*", "(FLAGS)")),
    ("UID FETCH 1:* (UID RFC822.SIZE)", lambda: client.uid("FETCH", "1:*", "(UID RFC822.SIZE)")),
    ("SEARCH UNSEEN", lambda: client.search(None, "UNSEEN")),
    ("UID SEARCH FROM (first header search)", lambda: client.uid("SEARCH", None, "FROM a9@")),
    ("UID SEARCH SUBJECT (again)", lambda: client.uid("SEARCH", None, 'SUBJECT "message 9999"')),
    ("UID SEARCH HEADER Message-ID", lambda: client.uid("SEARCH", None, "HEADER Message-ID <77@")),
    ("FETCH 1:10000 (ENVELOPE)", lambda: client.fetch("1:10000", "(ENVELOPE)")),
    ("FETCH 1:10000 (BODYSTRUCTURE)", lambda: client.fetch("1:10000", "(BODYSTRUCTURE)")),
    ("UID SEARCH SMALLER 10000", lambda: client.uid("SEARCH", None, "SMALLER 10000")),
    ("STORE 1:* +FLAGS.SILENT (\\Flagged)",
     lambda: client.store("1:*", "+FLAGS.SILENT", "(\\Flagged)")),
    ("NOOP after the STORE", lambda: client.noop()),
]
for label, step in steps[:limit or None]:
    print(json.dumps({"start": label}), flush=True)
    start = time.monotonic()
    typ, _ = step()
    print(json.dumps({"label": label, "seconds": time.monotonic() - start, "status": typ}),
          flush=True)
client.logout()
"""


def fill(path: Path, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    body = (b"From: a%d@example.test\nSubject: message %d\nMessage-ID: <%d@example.test>\n"
            b"\nHello.\n")
    start = int(time.time()) - count
    for i in range(count):
        data = body % (i, i, i)
        vsize = len(data) + data.count(b"\n")
        flags = "S" if i % 3 else ""
        name = f"{start + i}.M{i}P1Q1.bench,S={len(data)},W={vsize}:2,{flags}"
        with open(path / "cur" / name, "wb") as f:
            f.write(data)


def profile_first_scan(service, stats_file: str) -> None:
    """Profile, in this thread, the pool work of a first SELECT: the scan that
    writes the uidlist and the index, and the diff against the empty state."""
    import cProfile
    import pstats

    from mailtwist.imap.mailbox import FolderRegistry

    registry = FolderRegistry(reactor, None)
    maildir = service.store.maildir(USER)
    shared = registry.get(maildir, "INBOX")
    profiler = cProfile.Profile()
    started = time.monotonic()
    profiler.runcall(shared._scan_blocking, True)
    print(f"first scan: {time.monotonic() - started:.2f} s (under the profiler)")
    profiler.dump_stats(stats_file)
    pstats.Stats(stats_file).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--no-warm-up", action="store_true",
                        help="do not fill the message cache in the background")
    parser.add_argument("--profile", metavar="FILE",
                        help="run only the first SELECT under cProfile and save the stats")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="mailtwist-bench-"))
    (data_dir / "domains").write_text("example.test\n")
    config = load_config(None, {
        "data_dir": str(data_dir), "hostname": "bench.example.test", "bcrypt_rounds": 4,
        "listen": {role: ["tcp:0:interface=127.0.0.1"] if role == "imaps" else "none"
                   for role in ROLES},
        "auth": {"failure_delay": 0}})
    if args.no_warm_up:
        try:
            from mailtwist.imap import mailbox
            mailbox.WARM_UP = False
        except (ImportError, AttributeError):
            pass
    service = build_service(config, reactor)
    service.directory.add_account(USER, PASSWORD)
    started = time.monotonic()
    fill(service.store.path_for(USER), args.messages)
    print(f"filled {args.messages} messages in {time.monotonic() - started:.1f} s")

    if args.profile:
        profile_first_scan(service, args.profile)
        shutil.rmtree(data_dir, ignore_errors=True)
        return

    opened = []
    real_open = builtins.open

    def counting_open(file, *a, **k):
        if ".bench," in str(file):
            opened.append(file)
        return real_open(file, *a, **k)

    real_os_open = os.open

    def counting_os_open(path, *a, **k):
        if ".bench," in str(path):
            opened.append(path)
        return real_os_open(path, *a, **k)

    builtins.open = counting_open
    os.open = counting_os_open
    lag = [0.0]
    mark = [0]
    last = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        lag[0] = max(lag[0], now - last[0] - 0.01)
        last[0] = now

    def run_client() -> None:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(service.port_of("imaps")), USER, PASSWORD,
                 "1" if args.profile else "0"],
                stdout=subprocess.PIPE, text=True)
            for line in child.stdout:
                event = json.loads(line)
                if "start" in event:
                    lag[0] = 0.0
                    mark[0] = len(opened)
                    continue
                print(f"{event['label']:38} {event['seconds']:7.2f} s  {event['status']:3}"
                      f"  reactor lag {lag[0] * 1000:5.0f} ms"
                      f"  files opened {len(opened) - mark[0]:6}")
            child.wait()
            print(f"message files opened by the server: {len(opened)}")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"peak resident memory of the server process: {peak:.0f} MB")
        finally:
            reactor.callFromThread(service.stopService)
            reactor.callFromThread(reactor.stop)

    service.startService()
    LoopingCall(tick).start(0.01)
    reactor.callWhenRunning(lambda: threading.Thread(target=run_client).start())
    reactor.run()
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
