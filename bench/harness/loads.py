"""The loads the harness runs against each server, each returning one figure.

SMTP uses Postfix's ``smtp-source`` (the same generator for both servers) and
stops the clock when the last message is in the Maildir. IMAP uses a small
asyncio client in worker processes that speaks just enough IMAP (tagged
commands, literals) to stay cheap, so the generator is not the bottleneck: the
harness reports its CPU time next to the server's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import re
import shutil
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .servers import ADDRESS, PASSWORD, Server

LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


@dataclass
class Result:
    value: float
    server_cpu: float = 0.0
    client_cpu: float = 0.0


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def server_cpu(server: Server) -> float:
    from .servers import tree_pids

    pids: list[int] = []
    for pid in server.root_pids():
        pids += tree_pids(pid)
    return cpu_seconds(pids)


# -- SMTP ----------------------------------------------------------------------

def smtp_load(server: Server, sessions: int, messages: int, size: int, reuse: bool,
              timeout: float = 900.0) -> Result:
    """Messages per second from the first connection until the last message is
    in the Maildir."""
    server.empty_inbox()
    before = server_cpu(server)
    start = time.monotonic()
    if shutil.which("smtp-source"):
        args = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                "-f", "bench@client.test", "-t", ADDRESS, "-M", "client.test", "-C", "5"]
        if reuse:
            args.append("-d")
        subprocess.run(args + [f"127.0.0.1:{server.smtp_port}"], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        _python_smtp_source(server.smtp_port, sessions, messages, size, reuse)
    deadline = start + timeout
    while server.count_new() < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: only {server.count_new()} of {messages} "
                               "messages arrived")
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    return Result(messages / elapsed, server_cpu(server) - before)


def _python_smtp_source(port: int, sessions: int, messages: int, size: int,
                        reuse: bool) -> None:
    """smtp-source's job with smtplib threads, when Postfix isn't installed."""
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
    counter = iter(range(messages))
    lock = threading.Lock()

    def take() -> bool:
        with lock:
            return next(counter, None) is not None

    def worker() -> None:
        client = None
        while take():
            if client is None:
                client = smtplib.SMTP("127.0.0.1", port)
            client.sendmail("bench@client.test", [ADDRESS], body)
            if not reuse:
                client.quit()
                client = None
        if client is not None:
            client.quit()

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- a tiny IMAP client --------------------------------------------------------

class IMAPConnection:
    """Just enough IMAP for load: tagged commands, literals, IDLE."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.tag = 0

    @classmethod
    async def open(cls, port: int) -> "IMAPConnection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        conn = cls(reader, writer)
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"bad greeting {greeting!r}")
        return conn

    async def _response(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            match = LITERAL.search(line)
            if match:
                line += await self.reader.readexactly(int(match.group(1)))
                lines.append(line)
                continue
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1:].startswith(b"OK"):
                    raise RuntimeError(f"command failed: {line!r}")
                return lines

    async def command(self, text: bytes, literal: bytes | None = None) -> list[bytes]:
        self.tag += 1
        tag = b"t%d" % self.tag
        if literal is None:
            self.writer.write(tag + b" " + text + b"\r\n")
        else:
            self.writer.write(tag + b" " + text + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        return await self._response(tag)

    async def login(self) -> None:
        await self.command(b'LOGIN "%s" "%s"' % (ADDRESS.encode(), PASSWORD.encode()))

    async def idle(self) -> None:
        self.tag += 1
        self.writer.write(b"t%d IDLE\r\n" % self.tag)
        line = await self.reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE refused: {line!r}")

    async def close(self) -> None:
        try:
            self.writer.write(b"z LOGOUT\r\n")
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        self.writer.close()


def _uids(lines: list[bytes]) -> list[int]:
    for line in lines:
        if line.startswith(b"* SEARCH"):
            return [int(x) for x in line.split()[2:]]
    return []


async def _login_heavy_session(port: int) -> int:
    conn = await IMAPConnection.open(port)
    await conn.login()
    await conn.command(b"SELECT INBOX")
    await conn.command(b"UID FETCH 1:* (FLAGS)")
    await conn.command(b"FETCH 1 (BODY.PEEK[])")
    await conn.command(b"LOGOUT")
    conn.writer.close()
    return 6


async def _logged_in(port: int) -> IMAPConnection:
    conn = await IMAPConnection.open(port)
    await conn.login()
    await conn.command(b"SELECT INBOX")
    return conn


async def _stay_logged_in(conn: IMAPConnection, stop_at: float, message: bytes) -> int:
    rng = random.Random()
    done = 0
    while time.monotonic() < stop_at:
        roll = rng.random()
        if roll < 0.2:
            await conn.command(b"NOOP")
        elif roll < 0.5:
            await conn.command(b"FETCH %d (BODY.PEEK[])" % rng.randint(1, 50))
        elif roll < 0.6:
            await conn.command(b"FETCH 1:* (FLAGS)")
        elif roll < 0.8:
            sign = b"+" if rng.random() < 0.5 else b"-"
            await conn.command(b"STORE %d %sFLAGS.SILENT (\\Seen)" % (rng.randint(1, 50), sign))
        elif roll < 0.9:
            await conn.command(b"SEARCH UNSEEN")
        else:
            await conn.command(b"APPEND INBOX", message)
            uids = _uids(await conn.command(b"UID SEARCH SUBJECT scratch"))
            if uids:
                await conn.command(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[-1])
                await conn.command(b"EXPUNGE")
                done += 3
        done += 1
    await conn.close()
    return done


def _worker(kind: str, port: int, connections: int, duration: float, queue) -> None:
    """Run *connections* clients for *duration* s; put (count, seconds, CPU) on *queue*.
    Stay-logged-in clients log in before the clock starts."""
    message = b"From: a@client.test\r\nSubject: scratch\r\n\r\n" + b"x" * 2000 + b"\r\n"

    async def run() -> tuple[int, float]:
        conns = []
        if kind == "stay":
            conns = await asyncio.gather(*(_logged_in(port) for _ in range(connections)))
        start = time.monotonic()
        stop_at = start + duration

        async def login_loop() -> int:
            count = 0
            while time.monotonic() < stop_at:
                await _login_heavy_session(port)
                count += 1
            return count

        if kind == "stay":
            counts = await asyncio.gather(*(_stay_logged_in(c, stop_at, message) for c in conns))
        else:
            counts = await asyncio.gather(*(login_loop() for _ in range(connections)))
        return sum(counts), time.monotonic() - start

    started = time.process_time()
    count, elapsed = asyncio.run(run())
    queue.put((count, elapsed, time.process_time() - started))


def imap_load(server: Server, kind: str, connections: int, duration: float,
              processes: int = 2) -> Result:
    """Sessions/s ("login") or commands/s ("stay") over *duration* seconds."""
    before = server_cpu(server)
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per = [connections // processes + (1 if i < connections % processes else 0)
           for i in range(processes)]
    procs = [multiprocessing.Process(target=_worker, args=(kind, server.imap_port, n,
                                                           duration, queue))
             for n in per if n]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 600) for _ in procs]
    for p in procs:
        p.join()
    rate = sum(count / elapsed for count, elapsed, _ in results)
    return Result(rate, server_cpu(server) - before, sum(r[2] for r in results))


def fill_inbox(server: Server, count: int, size: int = 4096) -> None:
    """Put *count* messages into INBOX/cur directly (as a delivery would)."""
    server.empty_inbox()
    write_messages(server.inbox(), count, size, prefix="inbox")
    server.fix_owner(server.inbox())


def write_messages(maildir: Path, count: int, size: int, prefix: str,
                   needle_every: int = 1000) -> None:
    cur = maildir / "cur"
    cur.mkdir(parents=True, exist_ok=True)
    (maildir / "new").mkdir(exist_ok=True)
    (maildir / "tmp").mkdir(exist_ok=True)
    filler = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do\r\n"
              * max(1, size // 64))
    base = int(time.time()) - count
    for n in range(count):
        subject = b"needle %d" % n if n % needle_every == 0 else b"message %d" % n
        body = (b"From: Sender %d <sender%d@client.test>\r\nTo: <%s>\r\n"
                b"Subject: %s\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
                b"Message-ID: <%s.%d@client.test>\r\n\r\n" % (
                    n % 97, n % 97, ADDRESS.encode(), subject, prefix.encode(), n)) + filler
        if n % needle_every == 1:
            body += b"the haystack word is zanzibar\r\n"
        flags = "S" if n % 3 else ""
        name = f"{base + n}.M{n}P{os.getpid()}.bench,S={len(body)}:2,{flags}"
        with open(cur / name, "wb") as f:
            f.write(body)
        os.utime(cur / name, (base + n, base + n))


# -- idle connections ------------------------------------------------------------

def _idle_worker(port: int, count: int, ready, release, queue) -> None:
    async def run() -> None:
        conns = []
        failures = 0
        for start in range(0, count, 50):
            batch = await asyncio.gather(*(_idle_one(port) for _ in range(start, min(count, start + 50))),
                                         return_exceptions=True)
            for item in batch:
                if isinstance(item, BaseException):
                    failures += 1
                else:
                    conns.append(item)
        queue.put((len(conns), failures))
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        for conn in conns:
            conn.writer.close()

    asyncio.run(run())


async def _idle_one(port: int) -> IMAPConnection:
    conn = await IMAPConnection.open(port)
    await conn.login()
    await conn.command(b"SELECT INBOX")
    await conn.idle()
    return conn


def idle_memory(server: Server, count: int, processes: int = 2) -> tuple[int, int, int]:
    """(connections in IDLE, server RSS, server PSS) with *count* clients idling."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    queue: multiprocessing.Queue = multiprocessing.Queue()
    ready = [multiprocessing.Event() for _ in range(processes)]
    release = multiprocessing.Event()
    per = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    procs = [multiprocessing.Process(target=_idle_worker,
                                     args=(server.imap_port, n, ready[i], release, queue))
             for i, n in enumerate(per)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for event in ready:
        event.wait(60)
    time.sleep(2)
    rss, pss = server.memory()
    release.set()
    for p in procs:
        p.join(60)
    return sum(r[0] for r in results), rss, pss


# -- large folder -----------------------------------------------------------------

async def _timed(conn: IMAPConnection, command: bytes) -> float:
    start = time.monotonic()
    await conn.command(command)
    return time.monotonic() - start


def large_folder(server: Server, folder: str) -> dict[str, float]:
    """Seconds for SELECT, UID FETCH 1:* (FLAGS), UID SEARCH on a header and on text."""
    async def run() -> dict[str, float]:
        conn = await IMAPConnection.open(server.imap_port)
        await conn.login()
        result = {
            "select": await _timed(conn, b"SELECT %s" % folder.encode()),
            "fetch_flags": await _timed(conn, b"UID FETCH 1:* (FLAGS)"),
            "search_header": await _timed(conn, b'UID SEARCH HEADER Subject "needle 5"'),
            "search_text": await _timed(conn, b"UID SEARCH TEXT zanzibar"),
        }
        await conn.close()
        return result

    return asyncio.run(run())
