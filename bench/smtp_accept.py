"""How fast does mailtwist accept mail on port 25? Prints messages per second.

Starts ``twistd -n mailtwist`` on a temporary data directory and loopback port,
then sends messages from several client threads, each delivering over its own
connection with smtplib, and reports throughput and latency percentiles. Every
acknowledged message is fsynced, so the figure includes the disk.

    python bench/smtp_accept.py --messages 2000 --clients 8 --size 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    data_dir.mkdir()
    (data_dir / "domains").write_text("bench.test\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "mailtwist.cli", "--data-dir", str(data_dir),
                    "user", "add", "sink@bench.test", "--password-stdin"],
                   input="benchmark-password\n", text=True, check=True, env=env,
                   capture_output=True)
    args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "mailtwist", "--data-dir", str(data_dir),
            "--smtp", f"tcp:{port}:interface=127.0.0.1"]
    for role in ("submission", "submissions", "pop3", "pop3s", "imap", "imaps"):
        args += [f"--{role}", "none"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def client(port: int, count: int, message: bytes, latencies: list[float]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("bench.client")
        for _ in range(count):
            start = time.perf_counter()
            smtp.sendmail("bench@remote.test", ["sink@bench.test"], message)
            latencies.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096, help="body bytes per message")
    args = parser.parse_args()

    body = (b"x" * 76 + b"\r\n") * max(1, args.size // 78)
    message = b"Subject: bench\r\nFrom: bench@remote.test\r\n\r\n" + body
    tmp = Path(tempfile.mkdtemp(prefix="mailtwist-bench-"))
    port = free_port()
    proc = start_server(tmp / "data", port)
    try:
        per_client = args.messages // args.clients
        latencies: list[float] = []
        threads = [threading.Thread(target=client, args=(port, per_client, message, latencies))
                   for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    sent = len(latencies)
    quantiles = statistics.quantiles(latencies, n=100)
    print(f"messages={sent} clients={args.clients} size={len(message)}B")
    print(f"throughput={sent / elapsed:.1f} msg/s elapsed={elapsed:.2f}s")
    print(f"latency p50={quantiles[49] * 1000:.1f}ms p99={quantiles[98] * 1000:.1f}ms")


if __name__ == "__main__":
    main()
