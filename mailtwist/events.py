"""Structured log events: one per SMTP transaction, delivery attempt, login and
filter verdict, and a JSON log observer for them.

Every event is a ``twisted.logger`` event in the ``mailtwist.events``
namespace with an ``event_kind`` field (``smtp.transaction``,
``delivery.attempt``, ``login``, ``filter.verdict``) and the fields listed in
:data:`FIELDS` for that kind; the set is stable, so log processors can rely
on it.  The text logs of twistd show the same event as one readable line.

Nothing secret goes into an event: logins carry the user name, never the
password or the SASL blob.  The JSON observer writes only the text of an event
and the documented fields of its kind, never the other fields an event
carries, so a secret passed along to a logger as data cannot end up in it.

JSON output: ``twistd -n mailtwist --log-format json`` writes one JSON object
per line where twistd would write its text log (standard output, or
``--logfile``); ``twistd --logger mailtwist.events.json_observer -n mailtwist``
writes them to standard output (or to the file named by ``$MAILTWIST_JSON_LOG``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from zope.interface import implementer

log = Logger(namespace="mailtwist.events")

#: The fields of each event kind, in the order the JSON output lists them.
FIELDS: dict[str, tuple[str, ...]] = {
    "smtp.transaction": ("queue_id", "role", "peer", "helo", "sender", "recipients",
                         "size", "tls", "user", "code", "enhanced", "result"),
    "delivery.attempt": ("queue_id", "recipient", "relay", "status", "code", "enhanced",
                         "text", "attempt", "size", "age"),
    "login": ("protocol", "peer", "user", "result"),
    "filter.verdict": ("filter", "stage", "verdict", "code", "enhanced", "queue_id",
                       "peer", "role"),
}

def _emit(_kind: str, _format: str, _level: LogLevel = LogLevel.info, **fields: Any) -> None:
    # The whole check is an assert: nothing of it runs under python -O.
    assert fields.keys() >= set(FIELDS[_kind]), \
        f"{_kind} event without {set(FIELDS[_kind]) - fields.keys()}"
    log.emit(_level, _format, event_kind=_kind, **fields)


def _result_of(code: int | None) -> str:
    if code is None:
        return "unknown"
    return {2: "accepted", 4: "deferred", 5: "rejected"}.get(code // 100, "unknown")


def smtp_transaction(*, queue_id: str | None, role: str, peer: str, helo: str | None,
                     sender: str, recipients: int, size: int, tls: bool,
                     user: str | None, code: int, enhanced: str | None) -> None:
    """The end of one mail transaction (the reply to the end of DATA)."""
    _emit("smtp.transaction",
          "{queue_id} {role} from {peer} helo={helo} sender=<{sender}> "
          "recipients={recipients} size={size} tls={tls} user={user}: {code} {enhanced}",
          queue_id=queue_id, role=role, peer=peer, helo=helo, sender=sender,
          recipients=recipients, size=size, tls=tls, user=user, code=code,
          enhanced=enhanced, result=_result_of(code))


def delivery_attempt(*, queue_id: str, recipient: str, relay: str | None, status: str,
                     code: int | None, enhanced: str | None, text: str, attempt: int,
                     size: int, age: float = 0.0) -> None:
    """One outbound attempt for one recipient and its outcome
    (``delivered``, ``pending`` or ``failed``); *age* is the seconds since
    the message was queued."""
    _emit("delivery.attempt",
          "{queue_id} attempt {attempt} to=<{recipient}> relay={relay} size={size} "
          "status={status} {code} {enhanced} ({text})",
          queue_id=queue_id, recipient=recipient, relay=relay, status=status, code=code,
          enhanced=enhanced, text=text, attempt=attempt, size=size, age=round(age, 3))


def login(*, protocol: str, peer: str, user: str, result: str) -> None:
    """A login decision: *result* is ``success``, ``failure`` or ``throttled``.
    Never pass a password here: only the user name the client gave."""
    _emit("login", "{protocol} login {result} for {user!r} from {peer}",
          protocol=protocol, peer=peer, user=user, result=result)


def filter_verdict(*, filter_name: str, stage: str, verdict: object, session: Any = None) -> None:
    """A filter answered something other than Continue (Accept, Reject,
    TempFail, Discard) at *stage*."""
    _emit("filter.verdict",
          "{queue_id} filter {filter} at {stage}: {verdict} {code} {enhanced}",
          filter=filter_name, stage=stage, verdict=type(verdict).__name__,
          code=getattr(verdict, "code", None), enhanced=getattr(verdict, "enhanced", None),
          queue_id=getattr(session, "queue_id", None),
          peer=getattr(session, "peer_host", None), role=getattr(session, "role", None))


_PROTOCOLS = {"IMessageDelivery": "smtp", "IMailboxPOP3": "pop3", "IMailbox": "pop3",
              "IAccount": "imap", "IAccountIMAP": "imap"}


def protocol_of(interfaces: tuple) -> str:
    """The protocol name for the avatar interfaces a login asks for."""
    for interface in interfaces:
        name = _PROTOCOLS.get(getattr(interface, "__name__", ""))
        if name:
            return name
    return "unknown"


def _user_text(username: bytes | str) -> str:
    """The user name a client gave, as text (undecodable bytes replaced)."""
    return username.decode("utf-8", "replace") if isinstance(username, bytes) else str(username)


def watch_login(d, interfaces: tuple, peer: str, username: bytes | str) -> None:
    """Emit a :func:`login` event when *d* (a ``portal.login`` Deferred) fires;
    the result passes through unchanged."""
    user = _user_text(username)
    protocol = protocol_of(interfaces)

    def succeeded(result: object) -> object:
        login(protocol=protocol, peer=peer, user=user, result="success")
        return result

    def failed(failure):
        from twisted.cred import error

        if failure.check(error.UnauthorizedLogin):
            login(protocol=protocol, peer=peer, user=user, result="failure")
        return failure

    d.addCallbacks(succeeded, failed)


def login_throttled(interfaces: tuple, peer: str, username: bytes | str) -> None:
    """A login refused without a password check: too many failures (throttle.py)."""
    login(protocol=protocol_of(interfaces), peer=peer, user=_user_text(username),
          result="throttled")


# -- JSON output ---------------------------------------------------------------------


def event_as_record(event: LogEvent) -> dict[str, Any]:
    """The JSON-ready record of one log event: time, level, namespace, message,
    and for mailtwist events ``event_kind`` with that kind's fields."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", 0)))
        + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    kind = event.get("event_kind")
    if kind in FIELDS:
        record["event_kind"] = kind
        for name in FIELDS[kind]:
            record[name] = _plain(event.get(name))
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return record


def _plain(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(ILogObserver)
class JSONObserver:
    """Writes each event as one line of JSON to *out* (flushed per line)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        line = json.dumps(event_as_record(event), ensure_ascii=False, default=str)
        self.out.write(line + "\n")
        self.out.flush()


def json_observer() -> JSONObserver:
    """Observer factory for ``twistd --logger mailtwist.events.json_observer``:
    JSON lines on standard output, or appended to ``$MAILTWIST_JSON_LOG``."""
    path = os.environ.get("MAILTWIST_JSON_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return JSONObserver(os.fdopen(fd, "a", encoding="utf-8"))
    return JSONObserver(sys.stdout)


#: Where ``--log-format json`` writes: (twistd's --logfile, its --nodaemon).
_json_log_target: tuple[str | None, bool] = (None, True)


def use_json_log(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's *logfile* and *nodaemon* for :func:`json_log_observer`
    and return its dotted name, for twistd's ``--logger`` (which twistd
    imports by name after the plugin's options are parsed)."""
    global _json_log_target
    _json_log_target = (logfile, nodaemon)
    return "mailtwist.events.json_log_observer"


def json_log_observer() -> JSONObserver:
    """Observer factory for ``twistd mailtwist --log-format json``: JSON lines
    where twistd's text log would go — its ``--logfile`` (appended, created
    0600), standard output for ``-`` or in the foreground, else twistd.log."""
    logfile, nodaemon = _json_log_target
    if logfile == "-" or (not logfile and nodaemon):
        return JSONObserver(sys.stdout)
    fd = os.open(logfile or "twistd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return JSONObserver(os.fdopen(fd, "a", encoding="utf-8"))
