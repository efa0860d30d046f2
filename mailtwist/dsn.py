"""Delivery status notifications (RFC 3464 reports, RFC 3461 parameters).

:func:`build_report` makes the ``multipart/report`` message the queue sends to
a sender when recipients failed, are delayed, or (when asked with
``NOTIFY=SUCCESS``) were delivered.  :func:`parse_notify`, :func:`parse_ret`,
:func:`parse_envid` and :func:`parse_orcpt` check the ESMTP DSN parameters
that our submission users may give on MAIL and RCPT.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from email.utils import formatdate

from mailtwist.outbound.wire import xtext_decode
from mailtwist.queue.envelope import Recipient

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
MAX_ENVID = 100
MAX_ORCPT = 500


class DSNParameterError(ValueError):
    """A DSN parameter on MAIL or RCPT is malformed."""


def parse_notify(value: str | None) -> list[str]:
    """``NOTIFY=NEVER`` or a comma list of SUCCESS, FAILURE, DELAY."""
    items = [v.strip().upper() for v in (value or "").split(",")]
    if not items or any(not v for v in items):
        raise DSNParameterError("NOTIFY needs NEVER or SUCCESS,FAILURE,DELAY")
    if "NEVER" in items and len(items) > 1:
        raise DSNParameterError("NOTIFY=NEVER cannot be combined with other values")
    if not set(items) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or len(set(items)) != len(items):
        raise DSNParameterError("NOTIFY needs NEVER or SUCCESS,FAILURE,DELAY")
    return items


def parse_ret(value: str | None) -> str:
    ret = (value or "").upper()
    if ret not in ("FULL", "HDRS"):
        raise DSNParameterError("RET must be FULL or HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    try:
        envid = xtext_decode(value or "")
    except ValueError as e:
        raise DSNParameterError(f"bad ENVID: {e}") from None
    if not envid or len(value or "") > MAX_ENVID:
        raise DSNParameterError(f"ENVID must be 1..{MAX_ENVID} characters of xtext")
    return envid


def parse_orcpt(value: str | None) -> str:
    """``ORCPT=rfc822;xtext-address`` → ``"rfc822;address"``."""
    kind, sep, address = (value or "").partition(";")
    if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", kind) or len(value or "") > MAX_ORCPT:
        raise DSNParameterError("ORCPT must be addr-type;xtext")
    try:
        decoded = xtext_decode(address)
    except ValueError as e:
        raise DSNParameterError(f"bad ORCPT: {e}") from None
    if not decoded or any(ord(c) < 32 for c in decoded):
        raise DSNParameterError("bad ORCPT address")
    return f"{kind.lower()};{decoded}"


@dataclass
class ReportItem:
    """One recipient in a report and what happened to it."""

    recipient: Recipient
    action: str


_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}

_INTROS = {
    "failed": "I'm sorry to have to inform you that your message could not be\n"
              "delivered to one or more recipients. The reasons are below.",
    "delayed": "Your message could not be delivered yet to one or more recipients.\n"
               "It will be retried until {until}; you need not send it again.",
    "delivered": "Your message was successfully delivered to the destination(s)\n"
                 "listed below, as you asked.",
    "relayed": "Your message was relayed to the destination(s) listed below, as you\n"
               "asked; the receiving system sends no further notices.",
}


def _clean(text: str | None, limit: int = 900) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text or "").strip()[:limit]


def _diagnostic(recipient: Recipient) -> str | None:
    if recipient.code is not None and recipient.text:
        return f"smtp; {_clean(recipient.text)}"
    if recipient.text:
        return f"X-mailtwist; {_clean(recipient.text)}"
    return None


def _status(recipient: Recipient, action: str) -> str:
    if recipient.enhanced:
        return recipient.enhanced
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")


def build_report(*, hostname: str, to: str, items: list[ReportItem], headers: bytes,
                 message: bytes | None = None, envid: str | None = None,
                 arrival: float | None = None, retry_until: float | None = None,
                 now: float | None = None) -> bytes:
    """An RFC 3464 ``multipart/report`` for *items*, addressed to *to*.

    *headers* is the original header section (always included as
    ``text/rfc822-headers``), unless *message* is given (RET=FULL on a
    failure), which is then included whole as ``message/rfc822``.
    """
    if not items:
        raise ValueError("a report needs at least one recipient")
    actions = [item.action for item in items]
    main = next(a for a in ("failed", "delayed", "delivered", "relayed") if a in actions)
    boundary = f"{os.urandom(12).hex()}/{hostname}"
    date = formatdate(now, localtime=False)
    until = formatdate(retry_until, localtime=False) if retry_until else "later"

    human = [f"This is the mail system at host {hostname}.", "",
             *_INTROS[main].format(until=until).split("\n"), "",
             "For further assistance, please contact your postmaster.", ""]
    for item in items:
        r = item.recipient
        where = f"host {r.remote_mta} said: " if r.remote_mta and r.code else ""
        reason = _clean(r.text) or _status(r, item.action)
        human.append(f"<{r.address}> ({item.action}): {where}{reason}")

    status = [f"Reporting-MTA: dns; {hostname}"]
    if envid:
        status.append(f"Original-Envelope-Id: {_clean(envid, 100)}")
    if arrival is not None:
        status.append(f"Arrival-Date: {formatdate(arrival, localtime=False)}")
    for item in items:
        r = item.recipient
        status.append("")
        status.append(f"Final-Recipient: rfc822; {r.address}")
        if r.orcpt:
            kind, _, address = r.orcpt.partition(";")
            status.append(f"Original-Recipient: {kind}; {_clean(address, 300)}")
        status.append(f"Action: {item.action}")
        status.append(f"Status: {_status(r, item.action)}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {r.remote_mta}")
        diagnostic = _diagnostic(r)
        if diagnostic and item.action in ("failed", "delayed"):
            status.append(f"Diagnostic-Code: {diagnostic}")
        if r.updated is not None:
            status.append(f"Last-Attempt-Date: {formatdate(r.updated, localtime=False)}")
        if item.action == "delayed" and retry_until:
            status.append(f"Will-Retry-Until: {until}")

    if message is not None:
        original_type = b"message/rfc822"
        original = message if message.endswith(b"\r\n") else message + b"\r\n"
    else:
        original_type = b"text/rfc822-headers"
        original = headers if headers.endswith(b"\r\n") else headers + b"\r\n"

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {_SUBJECTS[main]}",
        f"Date: {date}",
        f"Message-ID: <{os.urandom(8).hex()}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Description: " + ("Undelivered Message" if message is not None
                                   else "Undelivered Message Headers"),
        f"Content-Type: {original_type.decode()}",
        "",
    ]
    tail = f"\r\n--{boundary}--\r\n"
    return ("\r\n".join(head) + "\r\n").encode("utf-8") + original + tail.encode("ascii")
