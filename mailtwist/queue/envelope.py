"""The envelope of a queued message: who sent it, to whom, and how far it got.

Stored as JSON beside the message file (never pickle: the spool is read by
the CLI and by later versions of the server).  Every field is checked on
load, so a hand-edited or truncated file is reported instead of crashing the
queue runner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
_STATUSES = (PENDING, DELIVERED, FAILED)

NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY", "NEVER"})


class EnvelopeError(ValueError):
    """An envelope file is not valid; the message says what is wrong."""


@dataclass
class Recipient:
    """One remote recipient and its delivery state.

    ``notify`` is the RFC 3461 NOTIFY list, or None for the default
    (failure and delay notices).  ``code``/``enhanced``/``text`` hold the last
    reply or error for this recipient; ``remote_mta`` the host that gave it.
    ``reported`` is set once the DSN for a final state went out.
    """

    address: str
    orcpt: str | None = None
    notify: list[str] | None = None
    status: str = PENDING
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    remote_mta: str | None = None
    updated: float | None = None
    reported: bool = False
    dsn_relayed: bool = False

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def wants(self, kind: str) -> bool:
        """Whether the sender asked for (or by default gets) a notice of *kind*."""
        if self.notify is None:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@dataclass
class Envelope:
    """Everything the queue knows about one message except its content."""

    id: str
    sender: str
    recipients: list[Recipient]
    created: float
    next_attempt: float
    attempts: int = 0
    warned: bool = False
    ret: str | None = None
    envid: str | None = None
    user: str | None = None
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == PENDING]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EnvelopeError(f"not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise EnvelopeError("not a JSON object")
        if raw.get("version") != FORMAT_VERSION:
            raise EnvelopeError(f"unknown envelope version {raw.get('version')!r}")
        try:
            recipients = [_recipient(r) for r in _get(raw, "recipients", list)]
            if not recipients:
                raise EnvelopeError("no recipients")
            return cls(
                id=_get(raw, "id", str),
                sender=_get(raw, "sender", str),
                recipients=recipients,
                created=float(_get(raw, "created", (int, float))),
                next_attempt=float(_get(raw, "next_attempt", (int, float))),
                attempts=_get(raw, "attempts", int),
                warned=_get(raw, "warned", bool),
                ret=_optional(raw, "ret", str),
                envid=_optional(raw, "envid", str),
                user=_optional(raw, "user", str),
                extra=raw.get("extra") or {},
            )
        except KeyError as e:
            raise EnvelopeError(f"missing field {e.args[0]!r}") from None


def _get(raw: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise EnvelopeError(f"field {key!r} has the wrong type: {value!r}")
    return value


def _optional(raw: dict, key: str, kind: type) -> Any:
    if raw.get(key) is None:
        return None
    return _get(raw, key, kind)


def _recipient(raw: Any) -> Recipient:
    if not isinstance(raw, dict):
        raise EnvelopeError("a recipient is not a JSON object")
    status = _get(raw, "status", str)
    if status not in _STATUSES:
        raise EnvelopeError(f"unknown recipient status {status!r}")
    notify = raw.get("notify")
    if notify is not None and (not isinstance(notify, list)
                               or not set(notify) <= NOTIFY_VALUES):
        raise EnvelopeError(f"bad notify list {notify!r}")
    return Recipient(
        address=_get(raw, "address", str),
        orcpt=_optional(raw, "orcpt", str),
        notify=notify,
        status=status,
        code=_optional(raw, "code", int),
        enhanced=_optional(raw, "enhanced", str),
        text=_optional(raw, "text", str),
        remote_mta=_optional(raw, "remote_mta", str),
        updated=_optional(raw, "updated", (int, float)),
        reported=bool(raw.get("reported", False)),
        dsn_relayed=bool(raw.get("dsn_relayed", False)),
    )
