"""Temporary server instances on loopback: mailtwist, Postfix and Dovecot.

Each server gets a directory of its own under the run's work directory, the
same user (``sink@bench.test``, password ``benchmark-password``, a bcrypt hash
in a Dovecot passwd-file, which mailtwist reads natively) and a Maildir. Postfix
and Dovecot run from Debian's packages with private configs (``postfix -c``,
``dovecot -c``); they are skipped with the install command when missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "bench.test"
USER = "sink"
ADDRESS = f"{USER}@{DOMAIN}"
PASSWORD = "benchmark-password"
INSTALL_HINT = "apt-get install postfix dovecot-imapd dovecot-pop3d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def passwd_line(rounds: int) -> str:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds)).decode()
    return f"{ADDRESS}:{{BLF-CRYPT}}{hashed}::::::\n"


def mail_owner() -> tuple[int, int]:
    """The uid/gid Postfix and Dovecot store mail as (root can't be a mail user)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


def tree_pids(root_pid: int) -> list[int]:
    """*root_pid* and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_of(pids: list[int]) -> tuple[int, int]:
    """(total RSS, total PSS) in bytes of these processes; PSS shares shared pages fairly."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


@dataclass
class Server:
    """One running server: its name, ports, and where its user's INBOX lives."""

    name: str
    workdir: Path
    smtp_port: int = 0
    imap_port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def inbox(self) -> Path:
        raise NotImplementedError

    def folder(self, name: str) -> Path:
        """The Maildir++ folder *name* of the user (created if missing)."""
        path = self.inbox() / f".{name}"
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    def count_new(self) -> int:
        """Messages delivered into INBOX so far (new/ and cur/)."""
        total = 0
        for sub in ("new", "cur"):
            try:
                total += sum(1 for _ in os.scandir(self.inbox() / sub))
            except FileNotFoundError:
                pass
        return total

    def empty_inbox(self) -> None:
        for sub in ("new", "cur"):
            directory = self.inbox() / sub
            if directory.exists():
                for entry in os.scandir(directory):
                    os.unlink(entry.path)

    def root_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def memory(self) -> tuple[int, int]:
        pids: list[int] = []
        for pid in self.root_pids():
            pids += tree_pids(pid)
        return memory_of(pids)

    def fix_owner(self, path: Path) -> None:
        """Give files the test put into a mailbox to the server's mail user."""


class Mailtwist(Server):
    """``twistd -n mailtwist`` with a generated mailtwist.toml."""

    def __init__(self, workdir: Path, rounds: int, workers: int = 1) -> None:
        super().__init__("mailtwist", workdir)
        self.rounds = rounds
        self.workers = workers

    def start(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "domains").write_text(f"{DOMAIN}\n")
        (data / "users").write_text(passwd_line(self.rounds))
        self.smtp_port, self.imap_port = free_port(), free_port()
        config = self.workdir / "mailtwist.toml"
        config.write_text(
            f'data_dir = "{data}"\nhostname = "mailtwist.bench"\nworkers = {self.workers}\n'
            "allow_plaintext_auth = true\n"
            "[listen]\n"
            f'smtp = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            f'imap = ["tcp:{self.imap_port}:interface=127.0.0.1:backlog=1024"]\n'
            'submission = "none"\nsubmissions = "none"\npop3 = "none"\npop3s = "none"\nimaps = "none"\n'
            # the load comes from one address: lift the per-address caps
            "[limits]\nmax_connections = 100000\nmax_connections_per_ip = 100000\n"
            "max_sessions_per_user_ip = 100000\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = open(self.workdir / "twistd.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "mailtwist", "--config", str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir))
        wait_port(self.smtp_port)
        wait_port(self.imap_port)

    def inbox(self) -> Path:
        return self.workdir / "data" / "mail" / DOMAIN / USER


class Postfix(Server):
    """A private Postfix instance (``postfix -c DIR``) delivering to Maildir with
    its virtual(8) agent. Its Maildir delivery and queue files are fsynced."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("postfix", workdir)

    @staticmethod
    def available() -> str | None:
        if shutil.which("postfix") is None or not Path("/usr/lib/postfix/sbin/master").exists():
            return f"postfix not installed ({INSTALL_HINT})"
        if os.geteuid() != 0:
            return "postfix needs root to run a private instance"
        return None

    def start(self) -> None:
        conf = self.workdir / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        spool = self.workdir / "spool"
        data = self.workdir / "data"
        mail = self.workdir / "mail"
        for path in (spool, data, mail):
            path.mkdir(parents=True, exist_ok=True)
        uid, gid = mail_owner()
        chown_tree(mail, uid, gid)
        pf = pwd.getpwnam("postfix")
        os.chown(data, pf.pw_uid, pf.pw_gid)
        self.smtp_port = free_port()
        (conf / "vmailbox").write_text(f"{ADDRESS} {DOMAIN}/{USER}/\n")
        (conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = bench.local
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = reject_unauth_destination
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = texthash:{conf}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
virtual_destination_concurrency_limit = 50
default_process_limit = 200
maillog_file_prefixes = {self.workdir}
maillog_file = {self.workdir}/maillog
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
anvil_rate_time_unit = 60s
biff = no
""")
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        lines = []
        for line in master:
            fields = line.split()
            if fields and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.smtp_port}"
                fields[4] = "n"  # no chroot: the private queue has no copies of /etc
                line = " ".join(fields)
            lines.append(line)
        (conf / "master.cf").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, MAIL_CONFIG=str(conf))
        subprocess.run(["postfix", "-c", str(conf), "set-permissions"], env=env,
                       capture_output=True)
        result = subprocess.run(["postfix", "-c", str(conf), "start"], env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stderr.strip()}")
        self.conf = conf
        wait_port(self.smtp_port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)

    def root_pids(self) -> list[int]:
        try:
            return [int((self.workdir / "spool" / "pid" / "master.pid").read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    def inbox(self) -> Path:
        return self.workdir / "mail" / DOMAIN / USER


class Dovecot(Server):
    """A private Dovecot instance (``dovecot -F -c FILE``) over a Maildir, with the
    same passwd-file. Debian's defaults otherwise (no auth cache unless asked)."""

    def __init__(self, workdir: Path, rounds: int, auth_cache: bool = False) -> None:
        super().__init__("dovecot", workdir)
        self.rounds = rounds
        self.auth_cache = auth_cache

    @staticmethod
    def available() -> str | None:
        if shutil.which("dovecot") is None or not Path("/usr/lib/dovecot/imap").exists():
            return f"dovecot not installed ({INSTALL_HINT})"
        return None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        mail = self.workdir / "mail"
        (mail / DOMAIN / USER).mkdir(parents=True, exist_ok=True)
        uid, gid = mail_owner()
        chown_tree(mail, uid, gid)
        (self.workdir / "run").mkdir(exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        passwd = self.workdir / "users"
        passwd.write_text(passwd_line(self.rounds))
        self.imap_port = free_port()
        cache = ("auth_cache_size = 10M\nauth_cache_ttl = 300 s\n"
                 "auth_cache_verify_password_with_worker = yes\n" if self.auth_cache else "")
        config = self.workdir / "dovecot.conf"
        config.write_text(f"""\
base_dir = {self.workdir}/run
state_dir = {self.workdir}/state
log_path = {self.workdir}/dovecot.log
instance_name = bench-{self.imap_port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{mail}/%d/%n
first_valid_uid = 1
{cache}passdb {{
  driver = passwd-file
  args = scheme=BLF-CRYPT {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_limit = 2000
  client_limit = 1000
  service_count = 0
  process_min_avail = 2
}}
service imap {{
  process_limit = 12000
  client_limit = 1
}}
default_client_limit = 12000
default_vsz_limit = 1G
protocol imap {{
  mail_max_userip_connections = 20000
}}
""")
        log = open(self.workdir / "stdout.log", "wb")
        self.procs.append(subprocess.Popen(["dovecot", "-F", "-c", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT))
        wait_port(self.imap_port)

    def inbox(self) -> Path:
        return self.workdir / "mail" / DOMAIN / USER

    def fix_owner(self, path: Path) -> None:
        uid, gid = mail_owner()
        chown_tree(path, uid, gid)


def stop_quietly(server: Server) -> None:
    try:
        server.stop()
    except Exception as e:  # noqa: BLE001 - a failed stop must not hide the results
        print(f"warning: stopping {server.name}: {e}", file=sys.stderr)


