"""mailtwist side by side with Postfix (SMTP) and Dovecot (IMAP) on this machine.

    python bench/compare.py            # the figures of docs/performance.md
    python bench/compare.py --quick    # a smaller run to try the harness

Sets every server up on loopback with temporary configs and data (Postfix and
Dovecot from Debian's packages when installed: apt-get install postfix
dovecot-imapd dovecot-pop3d; without them only mailtwist's figures are printed),
runs each load round by round, alternating the servers (this machine is noisy),
and prints medians, ranges and the ratio against the target of issue 7. Writes
results.json, a Markdown table and a PNG chart (when matplotlib is installed)
into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import loads  # noqa: E402
from harness.servers import Dovecot, Mailtwist, Postfix, stop_quietly  # noqa: E402


class Table:
    """Figures per (load, server), kept with their unit and direction."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, load: str, server: str, value: float, unit: str, higher: bool = True) -> None:
        row = self.rows.setdefault(load, {"unit": unit, "higher": higher, "values": {}})
        row["values"].setdefault(server, []).append(value)
        print(f"  {load:<38} {server:<9} {value:10.2f} {unit}", flush=True)

    def summary(self, targets: dict[str, tuple[str, float]]) -> str:
        lines = ["| load | mailtwist | reference | ratio | target |",
                 "|------|-----------|-----------|-------|--------|"]
        for load, row in self.rows.items():
            values = row["values"]
            ours = values.get("mailtwist", [])
            other_name = next((n for n in values if n != "mailtwist"), None)
            other = values.get(other_name, []) if other_name else []
            ratio = ""
            if ours and other:
                a, b = statistics.median(ours), statistics.median(other)
                r = (a / b) if row["higher"] else (b / a if a else float("inf"))
                ratio = f"{r:.2f}×"
            target = ""
            if load in targets:
                kind, goal = targets[load]
                if kind == "ratio" and ratio:
                    met = float(ratio[:-1]) >= goal
                    shown = (f"≥ {goal:g}×" if row["higher"]
                             else f"time ≤ {1 / goal:g}× {other_name}'s")
                    target = f"{shown} {'met' if met else 'MISSED'}"
                elif kind == "max" and ours:
                    met = statistics.median(ours) <= goal
                    target = f"≤ {goal:g} {row['unit']} {'met' if met else 'MISSED'}"
            lines.append(f"| {load} ({row['unit']}) | {_cell(ours)} | "
                         f"{_cell(other, other_name)} | {ratio} | {target} |")
        return "\n".join(lines)


def _cell(values: list[float], name: str | None = None) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    text = f"{med:.3g}" if med < 100 else f"{med:.0f}"
    if len(values) > 1:
        text += f" ({min(values):.3g}–{max(values):.3g})"
    return f"{name}: {text}" if name else text


def chart(table: Table, idle_points: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in ("mailtwist", "postfix"):
        points = []
        for load, row in table.rows.items():
            if load.startswith("SMTP new connection, ") and server in row["values"]:
                sessions = int(load.split(", ")[1].split()[0])
                points.append((sessions, statistics.median(row["values"][server])))
        if points:
            points.sort()
            left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server)
    left.set_xlabel("SMTP sessions in parallel")
    left.set_ylabel("messages/s into Maildir (fsynced)")
    left.set_title("SMTP throughput")
    if left.lines:
        left.legend()
    for server, points in idle_points.items():
        points.sort()
        right.plot([p[0] for p in points], [p[1] / 2**20 for p in points], marker="o",
                   label=f"{server} (PSS)")
    right.set_xlabel("IMAP connections in IDLE")
    right.set_ylabel("server memory, MiB")
    right.set_title("Memory against idle connections")
    if right.lines:
        right.legend()
    fig.tight_layout()
    path = out / "performance.png"
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="smtp,imap,idle,large",
                        help="comma-separated subset of smtp,imap,idle,large")
    parser.add_argument("--messages", type=int, default=20000, help="SMTP messages per run")
    parser.add_argument("--size", type=int, default=4096, help="SMTP payload bytes")
    parser.add_argument("--imap-seconds", type=float, default=20.0)
    parser.add_argument("--imap-connections", type=int, default=20)
    parser.add_argument("--idle", type=int, default=10000, help="most idle IMAP connections")
    parser.add_argument("--idle-reference-max", type=int, default=2000,
                        help="most idle connections asked of Dovecot (one process each, "
                             "0.7-2 MB: 10,000 would take most of this machine's memory)")
    parser.add_argument("--large", type=int, default=100000, help="messages in the large folder")
    parser.add_argument("--bcrypt-rounds", type=int, default=12)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="mailtwist's workers setting (default: the number of CPUs)")
    parser.add_argument("--dovecot-auth-cache", choices=("on", "off"), default="on")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.imap_seconds = 1, 2000, 5.0
        args.idle, args.large = min(args.idle, 500), min(args.large, 5000)
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    work = Path(tempfile.mkdtemp(prefix="mailtwist-bench-"))
    os.chmod(work, 0o755)  # Postfix and Dovecot run as other users
    print(f"work directory {work}; {os.cpu_count()} CPUs; {os.uname().release}")
    mt = Mailtwist(work / "mailtwist", args.bcrypt_rounds, workers=args.workers)
    pf = Postfix(work / "postfix")
    dc = Dovecot(work / "dovecot", args.bcrypt_rounds, auth_cache=args.dovecot_auth_cache == "on")
    servers = [mt]
    for server in (pf, dc):
        missing = server.available()
        if missing:
            print(f"skipping {server.name}: {missing}")
        else:
            servers.append(server)
    table = Table()
    idle_points: dict[str, list[tuple[int, float]]] = {}
    targets: dict[str, tuple[str, float]] = {}
    try:
        for server in servers:
            server.start()
            print(f"{server.name} started (smtp {server.smtp_port}, imap {server.imap_port})")
        smtp_servers = [s for s in servers if s.smtp_port]
        imap_servers = [s for s in servers if s.imap_port]
        if "smtp" in only:
            targets["SMTP new connection, 10 sessions"] = ("ratio", 1.2)
            for sessions in (10, 50):
                for reuse in (False, True):
                    load = (f"SMTP {'reused connections' if reuse else 'new connection'}, "
                            f"{sessions} sessions")
                    for _ in range(args.rounds):
                        for server in smtp_servers:
                            result = loads.smtp_load(server, sessions, args.messages,
                                                     args.size, reuse)
                            table.add(load, server.name, result.value, "msg/s")
        if "imap" in only:
            for server in imap_servers:
                loads.fill_inbox(server, 200)
            targets["IMAP login-heavy"] = ("ratio", 1.0)
            targets["IMAP stay-logged-in"] = ("ratio", 0.5)
            for _ in range(args.rounds):
                for server in imap_servers:
                    r = loads.imap_load(server, "login", args.imap_connections,
                                        args.imap_seconds)
                    table.add("IMAP login-heavy", server.name, r.value, "sessions/s")
                    print(f"    server CPU {r.server_cpu:.1f} s, generator CPU {r.client_cpu:.1f} s")
                    r = loads.imap_load(server, "stay", args.imap_connections,
                                        args.imap_seconds)
                    table.add("IMAP stay-logged-in", server.name, r.value, "commands/s")
                    print(f"    server CPU {r.server_cpu:.1f} s, generator CPU {r.client_cpu:.1f} s")
        if "idle" in only:
            steps = sorted({max(1, args.idle // 10), args.idle // 2, args.idle})
            for server in imap_servers:
                for count in steps:
                    if server.name != "mailtwist" and count > args.idle_reference_max:
                        print(f"  {server.name}: {count} idle connections skipped "
                              f"(--idle-reference-max {args.idle_reference_max})")
                        continue
                    held, rss, pss = loads.idle_memory(server, count)
                    idle_points.setdefault(server.name, []).append((held, pss))
                    table.add(f"IDLE {count} connections: RSS", server.name, rss / 2**20,
                              "MiB", higher=False)
                    table.add(f"IDLE {count} connections: PSS", server.name, pss / 2**20,
                              "MiB", higher=False)
                    if held < count:
                        print(f"    only {held} of {count} connections got to IDLE")
            targets[f"IDLE {args.idle} connections: RSS"] = ("max", 300)
        if "large" in only:
            for server in imap_servers:
                path = server.folder("Big")
                loads.write_messages(path, args.large, 2048, prefix="big")
                server.fix_owner(path)
            for server in imap_servers:
                cold = loads.large_folder(server, "Big")
                table.add(f"large folder ({args.large}): first SELECT, index build",
                          server.name, cold["select"], "s", higher=False)
            for _ in range(args.rounds):
                for server in imap_servers:
                    warm = loads.large_folder(server, "Big")
                    for key, label in (("select", "SELECT"), ("fetch_flags", "UID FETCH 1:* (FLAGS)"),
                                       ("search_header", "UID SEARCH HEADER"),
                                       ("search_text", "UID SEARCH TEXT")):
                        table.add(f"large folder ({args.large}): {label}", server.name,
                                  warm[key], "s", higher=False)
            for server in imap_servers:
                rss, pss = server.memory()
                table.add(f"large folder ({args.large}): server RSS after", server.name,
                          rss / 2**20, "MiB", higher=False)
            targets[f"large folder ({args.large}): SELECT"] = ("ratio", 1 / 1.5)
            targets[f"large folder ({args.large}): UID FETCH 1:* (FLAGS)"] = ("ratio", 1 / 1.5)
    finally:
        for server in servers:
            stop_quietly(server)
    summary = table.summary(targets)
    print()
    print(summary)
    (args.out / "results.md").write_text(summary + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
         "args": {k: str(v) for k, v in vars(args).items()}, "rows": table.rows}, indent=1))
    path = chart(table, idle_points, args.out)
    if path:
        print(f"chart: {path}")
    print(f"ratios: higher is better for mailtwist; times are compared as reference/mailtwist")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
